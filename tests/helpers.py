"""Helpers shared by the end-to-end tests: a search's outputs on disk, one-line errors, folder snapshots."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

def experiment(results: Path, method: str, dataset: str = "fmnist-s") -> Path:
    """The Ray Tune experiment folder of a search (``results/<D>/search/<M>``)."""
    return Path(results) / dataset / "search" / method


def read_trials(path: Path) -> pd.DataFrame:
    # Tune's hex trial ids can look like numbers ("12345678", "1e5a..."): keep them text.
    return pd.read_csv(path, dtype={"trial_id": str, "error": str}).fillna({"error": ""})


def ledger(folder: Path) -> dict:
    """fairtune's own record of a search (``ledger.json``)."""
    return json.loads((Path(folder) / "ledger.json").read_text())


def ledger_trials(folder: Path) -> dict[str, dict]:
    return {t["id"]: t for t in ledger(folder)["trials"]}


def tune_dirs(folder: Path) -> dict[str, list[Path]]:
    """Ray Tune's trial folders by fairtune trial id (one per driver session that ran the trial);
    they are named ``<fairtune id>_<param>=<value>_<Tune id>``."""
    found: dict[str, list[Path]] = {}
    for path in sorted((Path(folder) / "tune").glob("t[0-9]*")):
        if path.is_dir():
            found.setdefault(path.name.split("_")[0], []).append(path)
    return found


def epoch_runs(folder: Path, trial_id: str) -> list[dict]:
    """The trainable's side log: one {"epoch", "pid"} per epoch actually run, recomputed ones included."""
    log = Path(folder) / "trials" / trial_id / "epochs.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fairtune: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` (path -> sha256 of its bytes), to prove a command changed nothing."""
    files = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def assert_search_consistent(folder: Path, num_samples: int, epochs: int, max_recomputed: int = 0,
                             allowed_errors: tuple[str, ...] = ("non-finite",), shared_hint_epochs: int = 0) -> pd.DataFrame:
    """What a finished search must look like, however often it was interrupted and resumed.

    Exactly ``num_samples`` trials, ids t000, t001 … in order, each in the ledger as in trials.csv; a
    trial ends in error only for a real failure (``allowed_errors``); a COMPLETED trial ran every epoch,
    a STOPPED one fewer; every trial's recorded epochs are exactly 1..n and trials.csv holds the last;
    the side log shows every recorded epoch ran, each worker ran consecutive epochs, and at most
    ``max_recomputed`` epochs of a trial ran twice (one per kill of the driver or of its worker) —
    but for the ``shared_hint_epochs`` of FitNet's stage 1, run once for the whole search; best.json is the best finished trial of trials.csv and its budget adds up.
    """
    trials = read_trials(folder / "trials.csv")
    assert trials["trial_id"].tolist() == [f"t{i:03d}" for i in range(num_samples)], trials
    assert set(trials["status"]) <= {"COMPLETED", "STOPPED", "ERROR"}, trials
    recorded = ledger_trials(folder)
    assert sorted(recorded) == trials["trial_id"].tolist()
    for row in trials.itertuples():
        trial = recorded[row.trial_id]
        assert trial["status"] == row.status, (row, trial["status"])
        if row.status == "ERROR":
            assert any(reason in row.error for reason in allowed_errors), (row.trial_id, row.error)
            continue
        assert 1 <= row.epochs_run <= epochs, row
        assert (row.epochs_run == epochs) == (row.status == "COMPLETED"), row
        assert [e["epoch"] for e in trial["epochs"]] == list(range(1, row.epochs_run + 1)), (row.trial_id, trial["epochs"])
        assert row.final_accuracy == pytest.approx(trial["epochs"][-1]["accuracy"]), row
        assert row.final_objective == pytest.approx(trial["epochs"][-1]["objective"]), row
        runs = epoch_runs(folder, row.trial_id)
        logged = [run["epoch"] for run in runs]
        assert set(logged) == set(range(min(shared_hint_epochs, row.epochs_run) + 1, row.epochs_run + 1)), (row.trial_id, runs)
        assert len(logged) - len(set(logged)) <= max_recomputed, (row.trial_id, runs)
        for pid in {run["pid"] for run in runs}:
            mine = [run["epoch"] for run in runs if run["pid"] == pid]
            assert mine == list(range(mine[0], mine[0] + len(mine))), (row.trial_id, pid, runs)
    best = json.loads((folder / "best.json").read_text())
    chosen = trials[trials["trial_id"] == best["trial_id"]].iloc[0]
    searched = best["searched"]
    if searched:
        assert best["hyperparameters"][searched] == pytest.approx(chosen[searched])
    assert best["objective_value"] == pytest.approx(chosen["final_objective"])
    pool = trials[trials["status"] == "COMPLETED"]
    if not len(pool):
        pool = trials[trials["final_objective"].notna()]
    target = pool["final_objective"].max() if best["mode"] == "max" else pool["final_objective"].min()
    assert best["objective_value"] == pytest.approx(target)
    budget = best["budget"]
    assert budget["trials"] == num_samples
    assert budget["epochs_run"] == trials["epochs_run"].sum()
    assert budget["epochs_if_no_early_stopping"] == num_samples * epochs
    assert budget["failed_trials"] == (trials["status"] == "ERROR").sum()
    assert budget["seconds"] == pytest.approx(ledger(folder)["seconds"], abs=0.5)
    return trials


class Driver:
    """A `fairtune search` (or other ``command``) subprocess (its own local Ray), output to a file, to be killed at a moment
    read from disk. Shared by the fault tests and benchmarks/stress_resume.py."""

    def __init__(self, argv: list[str], log: Path, cwd: Path, command: str = "search") -> None:
        import subprocess
        import sys

        self.log = log
        self.handle = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fairtune", command, *argv], cwd=cwd, stdout=self.handle,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.leftovers: list = []

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition, what: str, timeout: float = 300, poll: float = 0.05) -> bool:
        """Wait until ``condition()``; False when the search exited first. Fails on a timeout."""
        import time

        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout} s:\n{self.output()[-4000:]}")
            time.sleep(poll)
        return True

    def interrupt_when(self, condition, what: str, timeout: float = 120) -> str:
        """Ctrl-C (SIGINT) the driver once ``condition()`` holds; its output once it has exited."""
        import signal

        try:
            assert self.wait_for(condition, what), self.output()
            self.signal(signal.SIGINT)
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.kill()
            self.reap()
        return self.output()

    def signal(self, signum) -> None:
        import os

        os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        """SIGKILL the driver alone, as a crash would. Its Ray processes (trial workers among them) are
        left to notice on their own while the next driver starts; `reap` ends any still there later."""
        import contextlib
        import os
        import signal

        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            self.leftovers = psutil.Process(self.proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.handle.close()

    def reap(self) -> None:
        import contextlib

        import psutil

        alive = []
        for proc in self.leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                alive += [proc, *proc.children(recursive=True)]
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
