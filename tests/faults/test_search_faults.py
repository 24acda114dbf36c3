"""Fault injection into `fairtune search`: a driver SIGKILLed at three moments, a trial's worker killed
mid-epoch, a teacher whose outputs overflow. After each, nothing is lost: exactly the requested trials,
distinct ids, every trial's epochs continuous, best.json consistent with trials.csv.

Moments are read from files on disk (Tune's trial folders, checkpoints and progress.csv, the trainable's
epoch log, the driver's own output), never guessed with sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from fairtune import io
from fairtune.cli import main
from fairtune.data import DataOptions, dataset_info
from fairtune.models import build_model
from fairtune.teachers import save_teacher, teacher_identity, teacher_paths
from fairtune.tune.trainable import STATE_FILE
from tests.helpers import (
    ALL_STATE_TORN, UNRESTORABLE, assert_one_line_error, assert_search_consistent, epoch_runs, experiment, read_trials,
    snapshot, trial_dirs,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
EPOCHS, TRIALS = 3, 4
SEARCH = ["--dataset", "fmnist-s", "--method", "ad", "--epochs", str(EPOCHS), "--num-samples", str(TRIALS),
          "--objective", "acc", "--grace-period", "1", "--reduction-factor", "4", "--max-concurrent", "2",
          "--train-size", "200", "--eval-size", "200", "--batch-size", "10", "--cpus-per-trial", "1",
          "--gpus-per-trial", "0"]  # fmt: skip
# So that ASHA surely stops trials in a tiny search: the first trial (the default) learns, the others' λ
# keep them at chance accuracy, and ASHA (one rung, at epoch 1, reduction factor 4) stops any trial
# that reaches it below the best so far.
AD_SPACE = "method: ad\nparameter: lam\ndistribution: choice\nvalues: [1.0e-4, 10.0, 100.0]\ndefault: 1.0e-4\n"
KILLS = 3


class Driver:
    """A `fairtune search` subprocess (its own local Ray), output to a file, to be killed at a moment."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self.handle = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fairtune", "search", *argv], cwd=REPO, stdout=self.handle,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.leftovers: list[psutil.Process] = []

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                if ALL_STATE_TORN in self.output():
                    pytest.xfail(f"Ray 2.60 state-copy race: a kill tore every saved state ({self.output().strip().splitlines()[-1]})")
                pytest.fail(f"the search exited ({self.proc.returncode}) before {what}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {timeout} s:\n{self.output()[-4000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the driver alone, as a crash would. Its Ray processes (trial workers among them) are
        left to notice on their own while the next driver starts; `reap` ends any still there later."""
        with contextlib.suppress(psutil.NoSuchProcess):
            self.leftovers = psutil.Process(self.proc.pid).children(recursive=True)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.handle.close()

    def reap(self) -> None:
        alive = []
        for proc in self.leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                alive += [proc, *proc.children(recursive=True)]
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)


def progress_rows(trial_dir: Path) -> int:
    path = trial_dir / "progress.csv"
    if not path.exists():
        return 0
    return max(0, len([line for line in path.read_text().splitlines() if line.strip()]) - 1)


def checkpoints(folder: Path) -> list[Path]:
    return list(folder.glob("run_trial_*/checkpoint_*"))


def test_driver_killed_at_three_moments_then_resumed(ray_session, fmnist_dir, tmp_path, capsys):
    results, spaces = tmp_path / "results", tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "ad.yaml").write_text(AD_SPACE)
    folder = experiment(results, "ad")
    argv = [*SEARCH, "--search-spaces", str(spaces), "--data-dir", str(fmnist_dir), "--results-dir", str(results)]
    drivers: list[Driver] = []
    seen: dict[str, object] = {}
    try:
        # 1. Before any checkpoint: Tune has saved its state and started trials, none has finished an epoch.
        drivers.append(first := Driver(argv, tmp_path / "driver1.log"))
        first.wait_for(lambda: any(folder.glob("experiment_state-*.json")) and trial_dirs(folder), "started trial")
        seen["checkpoints before kill 1"] = len(checkpoints(folder))
        first.kill()

        # 2. Mid-trial: a trial has checkpointed an epoch and has more to run.
        drivers.append(second := Driver([*argv, "--resume"], tmp_path / "driver2.log"))

        def mid_trial() -> bool:
            partway = [t for t, d in trial_dirs(folder).items() if list(d.glob("checkpoint_*")) and 1 <= progress_rows(d) < EPOCHS]
            seen["partway at kill 2"] = partway
            return bool(partway)

        second.wait_for(mid_trial, "trial part-way through")
        second.kill()

        # 3. While ASHA stops trials: right after it stopped one (its "done" line says fewer than all epochs).
        drivers.append(third := Driver([*argv, "--resume"], tmp_path / "driver3.log"))
        early = re.compile(rf"(\w+) done after ([1-{EPOCHS - 1}]) epochs")
        third.wait_for(lambda: early.search(third.output()), "trial stopped early by ASHA")
        seen["stopped at kill 3"] = early.search(third.output()).group(1)
        third.kill()
    finally:
        for driver in drivers:
            if driver.proc.poll() is None:
                driver.kill()
            driver.reap()
    assert not (folder / "best.json").exists()
    assert seen["checkpoints before kill 1"] == 0

    # 4. Resume to the end (in this process, on the session's Ray).
    code = main(["search", *argv, "--resume"])
    out, err = capsys.readouterr()
    if code == 2 and ALL_STATE_TORN in err:
        pytest.xfail(f"Ray 2.60 state-copy race: a kill tore every saved state ({err.strip()})")
    assert code == 0, err
    assert "resuming the search" in out
    # A kill that lands while Tune copies its state into the folder tears a file; the resume then falls back
    # to the state saved before (a rare race here, forced in the worker test below).
    torn = any("is torn" in text for text in [out, *(d.output() for d in drivers)])
    # Known Ray 2.60 races, seen here with sub-second epochs on a busy machine: Tune copies its state into
    # the folder in a background thread, skipping copies while one runs and racing the next save. A kill
    # can then leave (a) a mix of two saves whose stale trial counter makes the searcher create a trial
    # too many (its Tune index repeats), (b) a state naming a checkpoint that checkpoint rotation has
    # already deleted, so that trial cannot be restored, or (c) every saved state torn (above). Each is
    # told apart, checked as far as it goes and reported as an expected failure, never passed silently.
    extra = len(read_trials(folder / "trials.csv")) - TRIALS
    trials = assert_search_consistent(
        folder, TRIALS + max(extra, 0), EPOCHS, max_runs_per_epoch=1 + KILLS, torn_state_dropped=torn, driver_killed=True,
        allowed_errors=("non-finite", UNRESTORABLE),
    )
    lost = int(trials["error"].str.contains(UNRESTORABLE).sum())
    assert (trials["status"] == "STOPPED").any()
    # A trial interrupted after a checkpoint went on from it in a new worker, not from scratch.
    restarts = []  # the first epoch each later worker of a trial ran
    for trial_id in trials["trial_id"]:
        firsts: dict[int, int] = {}
        for run in epoch_runs(folder, trial_id):
            firsts.setdefault(run["pid"], run["epoch"])
        restarts += list(firsts.values())[1:]
    continued = any(epoch > 1 for epoch in restarts)
    print(f"\nkills: {seen}; trials:\n{trials[['trial_id', 'lam', 'status', 'epochs_run']].to_string(index=False)}")
    if extra > 0:
        indices = [re.match(r"run_trial_\w{8}_(\d+)_", trial_dirs(folder)[t].name).group(1) for t in trials["trial_id"]]
        assert len(indices) - len(set(indices)) == extra, indices  # re-created under an index already used
    if extra > 0 or lost:
        pytest.xfail(f"Ray 2.60 state-copy race before a kill: {extra} trial(s) too many, {lost} unrestorable")
    if not continued:
        # Tune's saved state lags its driver by up to a step (RAY-NOTES): a kill just after the part-way
        # trial's checkpoint can leave a state that does not name it yet, and that trial starts over.
        # Continuing from a checkpoint in a new worker is proven without this race by the worker test below.
        pytest.xfail(f"Ray 2.60 saved state lagged kill 2: no trial continued from a checkpoint ({seen}, restarts {restarts})")


def test_a_killed_trial_worker_resumes_from_its_last_checkpoint(ray_session, fmnist_dir, tmp_path, capsys):
    results = tmp_path / "results"
    folder = experiment(results, "ss")
    stop, seen = threading.Event(), {}

    def kill_mid_epoch() -> None:
        # The moment: the driver has recorded epoch 1 (its progress row, hence its checkpoint); the
        # worker that wrote it is now inside epoch 2.
        while not stop.is_set():
            for trial_id, trial_dir in trial_dirs(folder).items():
                runs = epoch_runs(folder, trial_id)
                if progress_rows(trial_dir) >= 1 and list(trial_dir.glob("checkpoint_*")) and runs:
                    seen.update(trial_id=trial_id, pid=runs[-1]["pid"], logged=[r["epoch"] for r in runs])
                    os.kill(runs[-1]["pid"], signal.SIGKILL)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_mid_epoch, daemon=True)
    killer.start()
    try:
        code = main(["search", "--dataset", "fmnist-s", "--method", "ss", "--epochs", str(EPOCHS), "--train-size", "600",
                     "--eval-size", "200", "--batch-size", "40", "--gpus-per-trial", "0", "--max-failures", "1",
                     "--data-dir", str(fmnist_dir), "--results-dir", str(results)])
    finally:
        stop.set()
        killer.join()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert seen, "the worker was never killed"
    assert seen["logged"] == [1], seen  # killed inside epoch 2
    trials = assert_search_consistent(folder, 1, EPOCHS, max_runs_per_epoch=2)
    assert trials["status"].tolist() == ["COMPLETED"] and trials["epochs_run"].tolist() == [EPOCHS]
    runs = epoch_runs(folder, seen["trial_id"])
    assert [r["epoch"] for r in runs if r["pid"] == seen["pid"]] == [1]
    assert [r["epoch"] for r in runs if r["pid"] != seen["pid"]] == [2, 3]  # from the epoch-1 checkpoint
    state = io.load_torch(max(trial_dirs(folder)[seen["trial_id"]].glob("checkpoint_*")) / STATE_FILE)
    assert [m["epoch"] for m in json.loads(state["history"])] == [1, 2, 3]  # the trainer's own history: no gap, no repeat

    # Then a later driver is killed while Tune copies its state into the folder (Tune writes it in a
    # staging folder and copies it file by file): its newest state files are torn. Resume takes the
    # last whole state instead of crashing on the torn one.
    newest = max(folder.glob("experiment_state-*.json"))
    later = "2999-01-01_00-00-00"
    (folder / f"experiment_state-{later}.json").write_bytes(newest.read_bytes())
    searcher = max(folder.glob("basic-variant-state-*.json"))
    (folder / f"basic-variant-state-{later}.json").write_bytes(searcher.read_bytes()[: len(searcher.read_bytes()) // 2])
    code = main(["search", "--dataset", "fmnist-s", "--method", "ss", "--epochs", str(EPOCHS), "--train-size", "600",
                 "--eval-size", "200", "--batch-size", "40", "--gpus-per-trial", "0", "--resume",
                 "--data-dir", str(fmnist_dir), "--results-dir", str(results)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"state saved at {later} is torn (basic-variant-state-{later}.json)" in out
    assert not list(folder.glob(f"*{later}*"))
    assert assert_search_consistent(folder, 1, EPOCHS, max_runs_per_epoch=2).equals(trials)

    # With no whole state left, the resume says so in one line and deletes nothing (no fresh start).
    states = sorted(folder.glob("experiment_state-*.json"))
    for state in states:
        state.write_bytes(state.read_bytes()[:100])
    before = snapshot(results)
    code = main(["search", "--dataset", "fmnist-s", "--method", "ss", "--epochs", str(EPOCHS), "--train-size", "600",
                 "--eval-size", "200", "--batch-size", "40", "--gpus-per-trial", "0", "--resume",
                 "--data-dir", str(fmnist_dir), "--results-dir", str(results)])
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, ALL_STATE_TORN, states[-1].name, "delete the folder to start over")
    assert snapshot(results) == before


def test_a_teacher_that_overflows_fails_each_trial_with_its_reason(ray_session, fmnist_dir, tmp_path, capsys):
    """Finite weights (so not refused on load) whose outputs overflow: the trial's loss is non-finite. The
    trial fails with that reason, the search ends with one line (every trial failed), trials.csv says why."""
    results = tmp_path / "results"
    options = DataOptions("fmnist-s", seed=0, train_size=200, eval_size=200)
    state = {k: v * 1e20 if v.is_floating_point() else v for k, v in build_model("cnn", 10, 32).state_dict().items()}
    save_teacher(teacher_paths(results, "fmnist-s", 0), state, teacher_identity(options, dataset_info(options)), 1, {"test": {}})
    code = main(["search", "--dataset", "fmnist-s", "--method", "hkd", "--epochs", "1", "--num-samples", "1",
                 "--train-size", "200", "--eval-size", "200", "--batch-size", "40", "--gpus-per-trial", "0",
                 "--max-failures", "0", "--data-dir", str(fmnist_dir), "--results-dir", str(results)])
    _, err = capsys.readouterr()
    assert code == 2, err  # (Ray may log each trial's failure above the one line of the CLI)
    assert_one_line_error(code, err.strip().splitlines()[-1], "every trial of the hkd search failed", "trials.csv")
    trials = read_trials(experiment(results, "hkd") / "trials.csv")
    assert len(trials) == 1 and (trials["status"] == "ERROR").all()
    assert trials["error"].str.contains("training loss became non-finite in epoch 1").all(), trials["error"].tolist()
    assert not epoch_runs(experiment(results, "hkd"), trials["trial_id"][0])  # no epoch was recorded as run
