"""When fairtune starts Ray itself, nothing listens beyond loopback (docs/ray.md, 'Starting Ray locally, loopback only': by default Ray binds
its GCS, raylet and worker ports to every interface on Linux)."""

import ipaddress

import psutil
import pytest

pytestmark = pytest.mark.slow


def ray_pids() -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        text = " ".join([proc.info["name"] or "", *(proc.info["cmdline"] or [])])
        if any(key in text for key in ("raylet", "gcs_server", "ray::", "ray/_private", "ray/dashboard", "default_worker")):
            pids.add(proc.info["pid"])
    return pids


def is_loopback(text: str) -> bool:
    address = ipaddress.ip_address(text)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4 loopback
    return (mapped or address).is_loopback


def test_local_ray_listens_on_loopback_only(ray_session):
    import ray

    @ray.remote
    def ping():
        return 1

    assert ray.get(ping.remote()) == 1  # a worker is up, with its own ports
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    pids = ray_pids()
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening, "found no Ray listener to check"
    exposed = [(c.pid, c.laddr) for c in listening if not is_loopback(c.laddr.ip)]
    assert not exposed, f"Ray ports open beyond loopback: {exposed}"
