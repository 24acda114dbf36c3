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
}


def prepare_environment(address: str | None) -> None:
    """Environment Ray reads at import time; call before anything imports ray."""
    for key, value in TUNE_ENV.items():
        os.environ.setdefault(key, value)
    if address is None:
        if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
            raise RuntimeError("ray was imported before the loopback-only environment was set")
        os.environ.update(LOCAL_ONLY_ENV)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a dead ``host:port``: ``ray.init`` would retry for minutes, logging as it goes."""
    if address == "auto":
        return  # Ray itself reports at once when no local cluster is running
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address} is not auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(
            f"cannot reach the Ray cluster at --address {address} ({exc.strerror or type(exc).__name__}); "
            "check that `ray start --head` runs there and the port is right, or omit --address for a local Ray"
        ) from None


def connect(address: str | None, num_cpus: int | None = None, num_gpus: float | None = None) -> dict:
    """Start a local Ray (``address=None``) or join a cluster; returns the cluster's resources.

    An already initialised Ray (a test session's shared instance) is reused as it is.
    """
    prepare_environment(address)
    if address is not None:
        check_reachable(address)
    import ray

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
