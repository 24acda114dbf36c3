"""Joining a Ray cluster as Ray users start one: the token rules (no Ray needed), then a real two-node
cluster — a head with no CPUs and one worker node with 2, each its own `ray start` processes, token
authentication on — started by the README's cluster recipe. `fairtune search` and `final` join it with
nothing else set, every trial, teacher and final run lands on the worker and records it, and a machine
without the cluster's token is refused in one line.

The cluster is kept apart from anything else on the machine (the test session's own local Ray, other
users' clusters): its own HOME (so its token, never the user's ~/.ray), temp dirs, free ports, ports on
127.0.0.1 only (tests/fixtures/loopback_ray.py), and the fairtune commands run as subprocesses. It is
stopped by ending exactly its own processes — every process whose environment carries this cluster's
marker — since `ray stop` would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import psutil
import pytest

from fairtune.errors import UserError
from fairtune.tune import cluster as cluster_module
from tests.fixtures.idx import write_fashion_mnist
from tests.helpers import assert_one_line_error, experiment, ledger_trials, read_trials
from tests.test_ray_local import is_loopback

REPO = Path(__file__).resolve().parent.parent
RECIPE_MARK = "<!-- cluster recipe: tests/test_cluster.py runs this block -->"
MARKER = "FAIRTUNE_TEST_CLUSTER"  # in the environment of every process of the test cluster
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# What the test adds to the recipe's commands: tiny sizes, fixture data, its own folders.
SEARCH_SIZES = ["--train-size", "300", "--eval-size", "100", "--batch-size", "40", "--epochs", "1",
                "--num-samples", "2", "--cpus-per-trial", "1", "--gpus-per-trial", "0"]
FINAL_SIZES = ["--seeds", "0", "--cpus-per-trial", "1", "--gpus-per-trial", "0"]
TIMEOUT = 600


# -- the token rules, without a cluster -------------------------------------------------------------


@pytest.fixture()
def token_env(tmp_path, monkeypatch):
    """An empty HOME and no Ray auth variables: the token sources as each test sets them."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in AUTH_ENV:
        monkeypatch.setenv(name, "")  # recorded as it was, so what the code under test sets is undone
        monkeypatch.delenv(name)
    return home


def test_the_token_is_found_where_ray_looks_for_it(token_env, tmp_path, monkeypatch):
    assert cluster_module.find_token() == (None, str(token_env / ".ray" / "auth_token"))
    (token_env / ".ray").mkdir()
    (token_env / ".ray" / "auth_token").write_text("home-token\n")
    assert cluster_module.find_token() == ("home-token", str(token_env / ".ray" / "auth_token"))
    (tmp_path / "copied").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "copied"))
    assert cluster_module.find_token() == ("path-token", f"RAY_AUTH_TOKEN_PATH ({tmp_path / 'copied'})")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert cluster_module.find_token() == ("env-token", "RAY_AUTH_TOKEN")


def test_a_token_path_naming_no_file_is_a_one_line_error(token_env, tmp_path, monkeypatch):
    (token_env / ".ray").mkdir()
    (token_env / ".ray" / "auth_token").write_text("home-token")  # Ray does not fall back to it either
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # as in a fresh `fairtune` process
    with pytest.raises(UserError, match=r"RAY_AUTH_TOKEN_PATH=.*missing names no readable token file; .*unset it"):
        cluster_module.prepare_environment("127.0.0.1:6379")


def test_token_mode_is_switched_on_only_to_join_a_cluster_with_a_token(token_env, monkeypatch):
    # As before `import ray` in a fresh `fairtune` process (afterwards the mode is left alone).
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    cluster_module.prepare_environment("127.0.0.1:6379")
    assert "RAY_AUTH_MODE" not in os.environ  # no token: nothing to send
    (token_env / ".ray").mkdir()
    (token_env / ".ray" / "auth_token").write_text("home-token")
    cluster_module.prepare_environment(None)
    assert "RAY_AUTH_MODE" not in os.environ  # the local Ray is left as it was
    cluster_module.prepare_environment("auto")
    assert os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster_module.prepare_environment("10.0.0.1:6379")
    assert os.environ["RAY_AUTH_MODE"] == "disabled"  # the user's choice is kept


def test_token_mode_is_left_alone_once_ray_is_imported(token_env, monkeypatch):
    """Set after the import it would split this process (the mode it read) from the Ray processes it
    starts (the new one): a later local ray.init fails to start its GCS."""
    (token_env / ".ray").mkdir()
    (token_env / ".ray" / "auth_token").write_text("home-token")
    monkeypatch.setitem(sys.modules, "ray", sys.modules.get("ray") or types.ModuleType("ray"))
    cluster_module.prepare_environment("127.0.0.1:6379")
    assert "RAY_AUTH_MODE" not in os.environ


def test_ray_init_refusals_are_told_from_other_connection_failures():
    """ray.init's own failure when the token was not asked for first (a ray:// address): a
    ConnectionError caused by the GCS refusing the token (docs/ray.md), or AuthenticationError."""
    refused = RuntimeError("Failed to connect to GCS. Last connection error: ... RPC error: InvalidAuthToken: ...")
    chained = ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")
    chained.__cause__ = refused
    assert cluster_module._refused_token(chained)
    assert not cluster_module._refused_token(ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379"))

    class AuthenticationError(Exception):  # ray.exceptions' class, matched by name: no ray import here
        pass

    assert cluster_module._refused_token(AuthenticationError("no authentication token was found"))


def test_readme_recipe_is_the_one_this_module_runs():
    assert [kind for kind, _, _ in recipe()] == ["token", "head", "copy", "worker", "search", "final", "protocol", "stop"]


# -- the recipe, on a real cluster ------------------------------------------------------------------


def recipe() -> list[tuple[str, dict, list[str]]]:
    """(kind, environment, words) of each command of the README's cluster recipe."""
    text = (REPO / "README.md").read_text()
    block = text.split(RECIPE_MARK, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    steps = []
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words, env = shlex.split(line), {}
        while "=" in words[0]:
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if words[0] == "mkdir" and "scp" in words:
            kind = "copy"
        elif words[:2] == ["ray", "start"]:
            kind = "head" if "--head" in words else "worker"
        elif words[:2] == ["ray", "get-auth-token"]:
            kind = "token"
        else:
            kind = words[1] if words[0] == "fairtune" else " ".join(words[:2]).removeprefix("ray ")
        steps.append((kind, env, words))
    return steps


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """The recipe's head and worker node on this machine; ``address`` is the head's."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.address = f"127.0.0.1:{self.port}"
        (root / "home").mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in ("PYTHONPATH",)}
        env.update(
            HOME=str(root / "home"), PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", **{MARKER: str(root)},
            # Node IP 127.0.0.1, hence every Ray port on loopback (tests/fixtures/loopback_ray.py); the
            # drivers need it too, or Ray rewrites --address 127.0.0.1 into the machine's address.
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        )
        self.env = env
        self.head_id = self.worker_id = ""

    def argv(self, kind: str, words: list[str]) -> list[str]:
        words = [w.replace("HEAD", "127.0.0.1").replace("6379", str(self.port)) for w in words]
        if words[0] == "fairtune":
            return [sys.executable, "-m", "fairtune", *words[1:]]
        extra = []
        if kind in ("head", "worker"):
            # Each node its own temp dir (as on its own machine), no fixed default port that another
            # Ray on this machine may hold, and a small object store.
            extra = [f"--temp-dir={self.root / kind}", f"--dashboard-agent-listen-port={free_port()}",
                     "--object-store-memory=150000000"]
        if kind == "head":
            extra += ["--num-cpus=0", "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                      f"--dashboard-port={free_port()}"]
        if kind == "worker":
            extra += ["--num-cpus=2"]
        return [sys.executable, "-m", "tests.fixtures.loopback_ray", *words[1:], *extra]

    def run(self, argv: list[str], env: dict | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(
            argv, cwd=REPO, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout,
            start_new_session=True,
        )

    def nodes(self, wanted: int, timeout: float = 120) -> list[dict]:
        """The alive nodes, once ``wanted`` of them have registered (polled, up to ``timeout`` s)."""
        script = (
            "import json, sys, time, ray\n"
            "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
            "deadline = time.monotonic() + float(sys.argv[3])\n"
            "while len(alive := [n for n in ray.nodes() if n['Alive']]) < int(sys.argv[2]) and time.monotonic() < deadline:\n"
            "    time.sleep(0.2)\n"
            "print(json.dumps([{'id': n['NodeID'], 'cpus': n['Resources'].get('CPU', 0),\n"
            "                   'head': 'node:__internal_head__' in n['Resources']} for n in alive]))\n"
        )
        done = self.run([sys.executable, "-c", script, self.address, str(wanted), str(timeout)],
                        env={"RAY_AUTH_MODE": "token"}, timeout=timeout + 60)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: those carrying its marker, and their descendants. Ray's
        agents and workers set their process title over the start of their environment block, which
        hides it from ``psutil``'s parser: the raw block is searched, and children are followed."""
        marker = f"{MARKER}={self.root}".encode()
        found = {}
        for proc in psutil.process_iter():
            try:
                raw = Path(f"/proc/{proc.pid}/environ").read_bytes()
                if marker in raw.split(b"\0"):
                    found[proc.pid] = proc
                    found.update((child.pid, child) for child in proc.children(recursive=True))
            except (OSError, psutil.Error):
                continue
        return list(found.values())

    def stop(self) -> list[psutil.Process]:
        """The recipe's `ray stop`, for this cluster alone; returns the processes that outlived it."""
        for _ in range(3):  # a dying raylet may still start a worker: sweep until none is left
            procs = self.processes()
            if not procs:
                break
            for proc in procs:
                try:
                    proc.terminate()
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(procs, timeout=5)  # `ray stop` waits 16 s; a test need not
            for proc in alive:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(alive, timeout=10)
        return [p for p in self.processes() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def cluster():
    """Steps 1 and 2 of the recipe (token, head, worker); stopped and removed also when a test fails."""
    # A short path: Ray's socket paths under it must stay within the 107 bytes of a Unix socket name.
    root = Path(tempfile.mkdtemp(prefix="ft-cluster-", dir="/tmp"))
    started = time.monotonic()
    handle = Cluster(root)
    try:
        for kind, env, words in recipe():
            if kind in ("token", "head", "worker"):
                done = handle.run(handle.argv(kind, words), env=env)
                assert done.returncode == 0, (kind, done.stdout[-2000:], done.stderr[-3000:])
                if kind == "head":  # Ray's default once a token exists, nothing the recipe sets
                    assert "Token authentication is enabled" in done.stdout + done.stderr
            elif kind == "copy":
                assert (root / "home" / ".ray" / "auth_token").exists()  # one machine: already in place
        nodes = handle.nodes(2)
        [head], [worker] = [n for n in nodes if n["head"]], [n for n in nodes if not n["head"]]
        assert (head["cpus"], worker["cpus"]) == (0, 2), nodes
        handle.head_id, handle.worker_id = head["id"], worker["id"]
        print(f"\ncluster at {handle.address} up in {time.monotonic() - started:.1f} s: head {handle.head_id}, "
              f"worker {handle.worker_id}")
        yield handle
    finally:
        left = handle.stop()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the test cluster still alive: {left}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # 520 per class: fmnist-s holds out 500 per class for validation before the subsample.
    root = tmp_path_factory.mktemp("data")
    write_fashion_mnist(root, n_train_per_class=520, n_test_per_class=20)
    return root


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


def step(kind: str) -> tuple[dict, list[str]]:
    [(env, words)] = [(env, words) for k, env, words in recipe() if k == kind]
    return env, words


@pytest.mark.slow
def test_every_ray_port_of_the_cluster_is_on_loopback(cluster):
    pids = {p.pid for p in cluster.processes()}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert len({c.pid for c in listening}) >= 4, listening  # both GCS and raylets, agents: the check has teeth
    assert cluster.port in {c.laddr.port for c in listening}
    assert not [(c.pid, c.laddr) for c in listening if not is_loopback(c.laddr.ip)]


@pytest.mark.slow
def test_a_machine_without_the_token_is_refused_in_one_line(cluster, data_dir, results, tmp_path, monkeypatch):
    env, words = step("search")
    elsewhere = tmp_path / "elsewhere"  # another machine: a HOME with no ~/.ray/auth_token
    elsewhere.mkdir()
    argv = cluster.argv("search", words) + ["--data-dir", str(data_dir), "--results-dir", str(tmp_path / "r"), *SEARCH_SIZES]
    started = time.monotonic()
    done = cluster.run(argv, env={**env, "HOME": str(elsewhere)})
    assert_one_line_error(done.returncode, done.stderr, f"the Ray cluster at --address {cluster.address} requires a token",
                          "copy the head node's ~/.ray/auth_token to", "RAY_AUTH_TOKEN=")
    assert "InvalidAuthToken" not in done.stdout + done.stderr and time.monotonic() - started < 60
    assert not (tmp_path / "r" / "fmnist-s" / "search").exists()

    print(f"\nwithout the token: {done.stderr.strip()}")

    # The same question in-process, for each way a token can fail (no Ray involved: one gRPC call).
    token = (cluster.root / "home" / ".ray" / "auth_token").read_text().strip()
    wrong = elsewhere / ".ray" / "auth_token"
    wrong.parent.mkdir()
    wrong.write_text("0" * len(token))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(elsewhere))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(UserError, match=rf"rejected the token in {wrong} \(not the head node's\): copy the head node's ~/.ray/auth_token to {wrong}"):
        cluster_module.check_token(cluster.address)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "1" * len(token))
    with pytest.raises(UserError, match=r"rejected the token in RAY_AUTH_TOKEN \(not the head node's\): set RAY_AUTH_TOKEN to the head"):
        cluster_module.check_token(cluster.address)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    cluster_module.check_token(cluster.address)  # accepted
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(UserError, match="RAY_AUTH_MODE=disabled keeps Ray from sending the one in RAY_AUTH_TOKEN"):
        cluster_module.check_token(cluster.address)


@pytest.mark.slow
def test_search_runs_every_trial_on_the_worker_node(cluster, data_dir, results):
    env, words = step("search")
    assert "RAY_AUTH_MODE" not in env  # fairtune switches token mode on itself
    done = cluster.run(cluster.argv("search", words) + ["--data-dir", str(data_dir), "--results-dir", str(results), *SEARCH_SIZES], env=env)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    folder = experiment(results, "mfd")
    trials = read_trials(folder / "trials.csv")
    print(f"\ntrials on: {sorted(set(trials['node']))}")
    assert len(trials) == 2 and set(trials["status"]) == {"COMPLETED"}
    assert trials["node"].tolist() == [cluster.worker_id] * 2
    assert trials["hostname"].tolist() == [socket.gethostname()] * 2
    for trial in ledger_trials(folder).values():
        assert [e["node"] for e in trial["epochs"]] == [{"id": cluster.worker_id, "hostname": socket.gethostname()}]
    teacher = json.loads((results / "fmnist-s" / "teachers" / "seed0.json").read_text())
    assert teacher["node"]["id"] == cluster.worker_id  # trained as a Ray task, on the only node with CPUs


@pytest.mark.slow
def test_final_runs_every_seed_on_the_worker_node(cluster, data_dir, results):
    from fairtune.tune.final import final_path

    assert (experiment(results, "mfd") / "best.json").exists(), "needs the search of the test above"
    env, words = step("final")
    done = cluster.run(cluster.argv("final", words) + ["--data-dir", str(data_dir), "--results-dir", str(results), *FINAL_SIZES], env=env)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    for method in ("mfd", "scratch"):  # scratch: the search's teacher, the record it brought back
        record = json.loads(final_path(results, "fmnist-s", method, 0).read_text())
        assert record["node"] == {"id": cluster.worker_id, "hostname": socket.gethostname()}, method
    print(f"\nfinal seed records on: {cluster.worker_id}")


@pytest.mark.slow
def test_protocol_runs_every_search_and_final_on_the_worker_node(cluster, data_dir, tmp_path):
    """The protocol's drivers are tasks pinned to the node of its driver, with no CPU: on the head,
    which has none. Every trial and run they start needs one, so lands on the worker."""
    from fairtune.tune.final import final_path

    env, words = step("protocol")
    extra = ["--data-dir", str(data_dir), "--results-dir", str(tmp_path), *SEARCH_SIZES, "--method", "scratch", "hkd",
             "--seeds", "0", "1", "--grace-period", "1"]
    done = cluster.run(cluster.argv("protocol", words) + extra, env=env)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    trials = read_trials(experiment(tmp_path, "hkd") / "trials.csv")
    assert len(trials) == 2 and trials["node"].tolist() == [cluster.worker_id] * 2
    for method in ("scratch", "hkd"):
        for seed in (0, 1):
            record = json.loads(final_path(tmp_path, "fmnist-s", method, seed).read_text())
            assert record["node"]["id"] == cluster.worker_id, (method, seed)
    lines = done.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("[") and " slots " in line)
    block = lines[start:start + 3]  # the last status block: the whole run, then scratch and hkd
    print("\nprotocol on the cluster, its last status block:\n" + "\n".join(block))
    assert "slots" in block[0] and all("final 2/2 seeds" in row for row in block[1:])


@pytest.mark.slow
def test_stop_ends_every_process_of_the_cluster(cluster):
    assert step("stop")[1] == ["ray", "stop"]
    names = {p.name() for p in cluster.processes()}
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names
    assert cluster.stop() == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", cluster.port), timeout=2).close()
