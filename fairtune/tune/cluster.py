"""Starting or joining Ray, safely.

When fairtune starts Ray itself, every Ray listener must stay on 127.0.0.1: on Linux Ray binds its
GCS, raylet and worker ports to all interfaces by default, and ``_node_ip_address="127.0.0.1"`` is
overridden. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` set *before* ``import ray`` is what makes Ray
bind loopback only (measured with Ray 2.60); a test lists the sockets to keep that true.

Joining a cluster (``--address``): Ray 2.60's ``ray start --head`` turns token authentication on when
a token exists (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``), but a driver sends
the token only in ``RAY_AUTH_MODE=token``, read when ray is imported, and ``ray.init`` does not switch
it on for an explicit address. fairtune switches it on whenever a token is found (harmless for a
cluster without authentication, measured), and asks the cluster once, before ``ray.init``, whether
it accepts this machine: a refused token would otherwise cost ~20 s of retries and a page of Ray's
log lines ending in a chained traceback (docs/ray.md).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

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


def job_env() -> dict[str, str]:
    """Environment every Ray job fairtune starts carries to its workers, on any node: Tune's settings
    and the plugins this process loaded (``fairtune.plugin``), so workers know the same names."""
    from fairtune.plugin import ENV

    return {**TUNE_ENV, **({ENV: os.environ[ENV]} if os.environ.get(ENV) else {})}


AUTH_MODE = "RAY_AUTH_MODE"
# Where Ray 2.60's token loader (C++, AuthenticationTokenLoader) looks, first match wins; a
# RAY_AUTH_TOKEN_PATH naming no readable, non-empty file is an error there, not a fall-through.
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
# The GCS call that `ray.init` makes first (gcs_client.cc "get cluster ID"); an empty request.
GCS_PROBE = "/ray.rpc.NodeInfoGcsService/GetClusterId"


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def find_token() -> tuple[str | None, str]:
    """The token Ray would send and where it comes from, found as Ray finds it (see TOKEN_ENV)."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip(), TOKEN_ENV
    named = os.environ.get(TOKEN_PATH_ENV)
    path = Path(named) if named else default_token_path()
    try:
        token = path.read_text().strip()
    except OSError:
        token = ""
    if named and not token:
        raise UserError(
            f"{TOKEN_PATH_ENV}={named} names no readable token file; point it at a copy of the head node's "
            f"~/.ray/auth_token, or unset it"
        )
    return token or None, f"{TOKEN_PATH_ENV} ({path})" if named else str(path)


def prepare_environment(address: str | None) -> None:
    """Environment Ray reads at import time; call before anything imports ray."""
    for key, value in TUNE_ENV.items():
        os.environ.setdefault(key, value)
    if address is None:
        if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
            raise RuntimeError("ray was imported before the loopback-only environment was set")
        os.environ.update(LOCAL_ONLY_ENV)
    elif AUTH_MODE not in os.environ and "ray" not in sys.modules and find_token()[0] is not None:
        # What `ray.init(address="auto")` does itself, for every address; a RAY_AUTH_MODE the user
        # set is theirs to keep. Only before the import: set after it, this process keeps the mode it
        # read while the processes it starts take the new one (a later local ray.init then fails
        # with "Failed to start GCS", measured).
        os.environ[AUTH_MODE] = "token"


def _named(address: str, found_in: str | None) -> str:
    return f"--address auto ({address}, from {found_in})" if found_in else f"--address {address}"


def check_token(address: str, found_in: str | None = None, timeout: float = 5.0) -> None:
    """Refuse, in one line saying what to set, a cluster that does not accept this machine's token
    (or its lack of one). Asks the GCS with the call ``ray.init`` makes first, carrying the token as
    Ray's clients do (``authorization: Bearer``); only UNAUTHENTICATED is judged here, anything
    else is left to ``ray.init`` to report."""
    try:
        import grpc  # installed with tensorboard and ray's own extras, not with ray itself
    except ImportError:
        return
    token, where = find_token()
    mode = os.environ.get(AUTH_MODE, "")
    sent = token if mode.lower() == "token" else None
    channel = grpc.insecure_channel(address)
    try:
        probe = channel.unary_unary(GCS_PROBE)  # raw bytes: an empty request, the reply unread
        probe(b"", timeout=timeout, metadata=[("authorization", f"Bearer {sent}")] if sent else None)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise UserError(_token_refused(_named(address, found_in), token, where, sent is not None)) from None
    finally:
        channel.close()


def _token_refused(named: str, token: str | None, where: str, sent: bool) -> str:
    """The one line for a cluster that refused this machine, with the fix for where the token came from
    (a token in RAY_AUTH_TOKEN wins over any file, so only replacing it there helps)."""
    prints = "`ray get-auth-token` on the head prints it"
    if token is None:
        return (
            f"the Ray cluster at {named} requires a token and none was found here: copy the head node's "
            f"~/.ray/auth_token to {default_token_path()} on this machine, or set {TOKEN_ENV}=<token> ({prints})"
        )
    if not sent:
        return (
            f"the Ray cluster at {named} requires a token, but {AUTH_MODE}={os.environ.get(AUTH_MODE)} keeps Ray "
            f"from sending the one in {where}: unset {AUTH_MODE} or set it to token"
        )
    if where == TOKEN_ENV:
        fix = f"set {TOKEN_ENV} to the head node's token ({prints})"
    else:
        path = os.environ.get(TOKEN_PATH_ENV) or default_token_path()
        fix = f"copy the head node's ~/.ray/auth_token to {path}, or set {TOKEN_ENV}=<token> ({prints})"
    return f"the Ray cluster at {named} rejected the token in {where} (not the head node's): {fix}"


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
        named = _named(address, found_in)
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

    found_in = None
    if address == "auto" and not ray.is_initialized():
        address, found_in = resolve_auto()
        check_reachable(address, found_in=found_in)
    elif address is not None:
        check_reachable(address)
    if address is not None and not address.startswith("ray://") and not ray.is_initialized():
        check_token(address, found_in)

    if not ray.is_initialized():
        try:
            if address is None:
                ray.init(
                    address="local", include_dashboard=False, num_cpus=num_cpus, num_gpus=num_gpus,
                    log_to_driver=False, logging_level="ERROR", runtime_env={"env_vars": job_env()},
                )
            else:
                ray.init(address=address, log_to_driver=False, logging_level="ERROR", runtime_env={"env_vars": job_env()})
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.AuthenticationError) as exc:
            # Not probed above (a Ray Client address, ray://, or no grpc module): Ray's own failure.
            if address is not None and _refused_token(exc):
                token, where = find_token()
                sent = token is not None and os.environ.get(AUTH_MODE, "").lower() == "token"
                raise UserError(_token_refused(_named(address, found_in), token, where, sent)) from None
            if not isinstance(exc, (ConnectionError, RuntimeError, ValueError)):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"cannot join the Ray cluster at --address {address} ({first}); start it with `ray start --head` "
                "and pass its address (auto, or ray://host:10001), or omit --address for a local Ray"
            ) from None
    return ray.cluster_resources()


def _refused_token(exc: BaseException | None) -> bool:
    """Whether ``ray.init`` failed on authentication: it raises AuthenticationError when token mode has
    no token, and a ConnectionError caused by one ("InvalidAuthToken") when the cluster refuses it."""
    while exc is not None:
        if type(exc).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(exc):
            return True
        exc = exc.__cause__
    return False


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
