"""Starting or joining Ray, safely.

When fairtune starts Ray itself, every Ray listener must stay on 127.0.0.1: on Linux Ray binds its
GCS, raylet and worker ports to all interfaces by default, and ``_node_ip_address="127.0.0.1"`` is
overridden. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` set *before* ``import ray`` is what makes Ray
bind loopback only (measured with Ray 2.60); a test lists the sockets to keep that true.
"""

from __future__ import annotations

import os
import socket
import sys

from fairtune.errors import UserError

LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# fairtune never restores Tune's own experiment state (its search ledger is the record), so Tune
# keeps its default saving period.
TUNE_ENV = {
    # The classic output path honours verbose=0; fairtune prints its own compact progress lines.
    "RAY_AIR_NEW_OUTPUT": "0",
    # Tune's TensorBoard logger off: fairtune.tune.board writes readable runs (CSV/JSON passed back there).
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}


def prepare_environment(address: str | None) -> None:
    """Environment Ray reads at import time; call before anything imports ray."""
    for key, value in TUNE_ENV.items():
        os.environ.setdefault(key, value)
    if address is None:
        if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
            raise RuntimeError("ray was imported before the loopback-only environment was set")
        os.environ.update(LOCAL_ONLY_ENV)


def resolve_auto() -> tuple[str, str]:
    """What ``--address auto`` means, found the way ``ray.init`` finds it (RAY_ADDRESS, else the newest
    cluster recorded under Ray's temp folder, else any running GCS), and where it was found. Resolved
    here so that a stale record is refused at once instead of retried for minutes by ``ray.init``."""
    from ray._private.services import get_ray_address_from_environment

    source = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "the Ray running on this machine"
    try:
        found = get_ray_address_from_environment("auto", None)
    except (ConnectionError, RuntimeError, ValueError):
        found = None
    if not found or found == "auto":
        raise UserError(
            "--address auto found no running Ray cluster on this machine; start one with `ray start --head` "
            "(and `ray start --address=HEAD:6379` on the other nodes), or pass --address host:port"
        )
    return found, source


def check_reachable(address: str, timeout: float = 5.0, found_in: str | None = None) -> None:
    """Fail fast on a dead ``host:port``: ``ray.init`` would retry for minutes, logging as it goes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address} is not auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        named = f"--address auto ({address}, from {found_in})" if found_in else f"--address {address}"
        raise UserError(
            f"cannot reach the Ray cluster at {named} ({exc.strerror or type(exc).__name__}); "
            "check that `ray start --head` runs there and the port is right, or omit --address for a local Ray"
        ) from None


def connect(address: str | None, num_cpus: int | None = None, num_gpus: float | None = None) -> dict:
    """Start a local Ray (``address=None``) or join a cluster; returns the cluster's resources.

    An already initialised Ray (a test session's shared instance) is reused as it is.
    """
    prepare_environment(address)
    import ray

    if address == "auto" and not ray.is_initialized():
        address, found_in = resolve_auto()
        check_reachable(address, found_in=found_in)
    elif address is not None:
        check_reachable(address)

    if not ray.is_initialized():
        try:
            if address is None:
                ray.init(
                    address="local", include_dashboard=False, num_cpus=num_cpus, num_gpus=num_gpus,
                    log_to_driver=False, logging_level="ERROR",
                )
            else:
                ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"cannot join the Ray cluster at --address {address} ({first}); start it with `ray start --head` "
                "and pass its address (auto, or ray://host:10001), or omit --address for a local Ray"
            ) from None
    return ray.cluster_resources()


def check_resources(resources: dict, cpus_per_trial: float, gpus_per_trial: float) -> None:
    """Refuse a per-trial request no node could ever satisfy (Tune would wait forever)."""
    if cpus_per_trial > resources.get("CPU", 0):
        raise UserError(
            f"--cpus-per-trial {cpus_per_trial:g} exceeds the cluster's {resources.get('CPU', 0):g} CPUs; lower it"
        )
    if gpus_per_trial > resources.get("GPU", 0):
        have = resources.get("GPU", 0)
        raise UserError(
            f"--gpus-per-trial {gpus_per_trial:g} exceeds the cluster's {have:g} GPUs; "
            + ("use 0 on a CPU-only cluster" if not have else f"use at most {have:g} (fractions share a GPU)")
        )
