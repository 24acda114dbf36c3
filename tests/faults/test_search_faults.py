"""Fault injection into `fairtune search`: a driver SIGKILLed at three moments, a trial's worker killed
mid-epoch, Ctrl-C, a teacher whose outputs overflow. After each, the outcome is exact: exactly the
requested trials, decisions taken before a kill kept, finished trials never re-run, at most one epoch
recomputed per kill, best.json consistent with trials.csv.

Moments are read from files on disk (fairtune's ledger, the trainable's epoch logs and state files),
never guessed with sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from fairtune import io
from fairtune.cli import main
from fairtune.data import DataOptions, dataset_info
from fairtune.layout import SearchDir
from fairtune.models import build_model
from fairtune.teachers import save_teacher, teacher_identity, teacher_paths
from tests.helpers import (
    Driver, assert_one_line_error, assert_search_consistent, epoch_runs, experiment, ledger, ledger_trials, read_trials,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
EPOCHS, TRIALS = 4, 4
SEARCH = ["--dataset", "fmnist-s", "--method", "ad", "--epochs", str(EPOCHS), "--num-samples", str(TRIALS),
          "--objective", "acc", "--grace-period", "2", "--reduction-factor", "4", "--max-concurrent", "2",
          "--train-size", "200", "--eval-size", "200", "--batch-size", "10", "--cpus-per-trial", "1",
          "--gpus-per-trial", "0"]  # fmt: skip
# So that ASHA surely stops a trial: the first trial (the default λ) learns, the other λ keep their trials
# at chance accuracy, and ASHA (one rung, after epoch 2, reduction factor 4) stops any trial that reaches
# it below the best so far. After one epoch all four can still sit at chance (a tie stops nothing); after
# two the first is well above. Four values, four trials: the search runs them as a grid, in this order.
AD_SPACE = "method: ad\nparameter: lam\ndistribution: choice\nvalues: [1.0e-4, 10.0, 30.0, 100.0]\ndefault: 1.0e-4\n"
KILLS = 3
SS_EPOCHS = 3  # the one-trial ss searches of the worker-kill and Ctrl-C tests


def _trials_now(folder: Path) -> dict[str, dict]:
    return ledger_trials(folder) if (folder / "ledger.json").exists() else {}


def test_driver_killed_at_three_moments_then_resumed(ray_session, fmnist_dir, tmp_path, capsys):
    results, spaces = tmp_path / "results", tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "ad.yaml").write_text(AD_SPACE)
    folder = experiment(results, "ad")
    argv = [*SEARCH, "--search-spaces", str(spaces), "--data-dir", str(fmnist_dir), "--results-dir", str(results)]
    moments = [
        # 1. Before any epoch: trials exist, none has recorded an epoch.
        ("started trial", lambda t: t and not any(x["epochs"] for x in t.values())),
        # 2. Mid-trial: a running trial has recorded an epoch and has more to run.
        ("trial part-way through", lambda t: any(x["status"] == "RUNNING" and 1 <= len(x["epochs"]) < EPOCHS for x in t.values())),
        # 3. Right after ASHA stopped a trial.
        ("trial stopped by ASHA", lambda t: any(x["status"] == "STOPPED" for x in t.values())),
    ]
    at_kill: list[dict[str, dict]] = []
    drivers: list[Driver] = []
    try:
        for k, (what, condition) in enumerate(moments):
            drivers.append(driver := Driver([*argv, *(["--resume"] if k else [])], tmp_path / f"driver{k}.log", REPO))
            assert driver.wait_for(lambda: condition(_trials_now(folder)), what), f"search ended before {what}:\n{driver.output()}"
            driver.kill()
            at_kill.append(ledger_trials(folder))
    finally:
        for driver in drivers:
            if driver.proc.poll() is None:
                driver.kill()
            driver.reap()
    assert not (folder / "best.json").exists()

    # 4. Resume to the end (in this process, on the session's Ray).
    code = main(["search", *argv, "--resume"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "resuming the search" in out
    trials = assert_search_consistent(folder, TRIALS, EPOCHS, max_recomputed=KILLS)
    final = ledger_trials(folder)
    for snapshot_at_kill in at_kill:  # every decision recorded before a kill is kept, its epochs unchanged
        for trial_id, trial in snapshot_at_kill.items():
            if trial["status"] != "RUNNING":
                assert final[trial_id]["status"] == trial["status"]
                assert final[trial_id]["epochs"] == trial["epochs"]
    stopped = [t for t, x in at_kill[2].items() if x["status"] == "STOPPED"]
    assert stopped and (trials.set_index("trial_id").loc[stopped, "status"] == "STOPPED").all()
    # The trial part-way at kill 2 went on from its saved state in a new worker, not from scratch.
    partway = [t for t, x in at_kill[1].items() if x["status"] == "RUNNING" and x["epochs"]]
    for trial_id in partway:
        runs = epoch_runs(folder, trial_id)
        firsts = {}
        for run in runs:
            firsts.setdefault(run["pid"], run["epoch"])
        # Epoch 1 ran once; any later worker started past it. (The killed driver's worker may itself
        # finish the epoch in flight and save it, leaving the resumed trial nothing to run: no later worker.)
        assert [run["epoch"] for run in runs].count(1) == 1, (trial_id, runs)
        later = list(firsts.values())[1:]
        assert all(epoch >= len(at_kill[1][trial_id]["epochs"]) > 0 for epoch in later), (trial_id, runs, at_kill[1][trial_id])
    # Optuna's own storage learned every finished trial exactly once: ASHA's stops as pruned.
    import optuna

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{folder / 'optuna.db'}")
    told = {t.number: t.state.name for t in study.trials if t.state.name != "FAIL"}
    expected = {x["optuna_number"]: {"COMPLETED": "COMPLETE", "STOPPED": "PRUNED", "ERROR": "FAIL"}[x["status"]] for x in final.values()}
    assert told == {n: s for n, s in expected.items() if s != "FAIL"}, (told, expected)
    assert ledger(folder)["sessions"] == KILLS + 1


def test_a_killed_trial_worker_resumes_from_its_last_state(ray_session, fmnist_dir, tmp_path, capsys):
    results = tmp_path / "results"
    folder = experiment(results, "ss")
    stop, seen = threading.Event(), {}

    def kill_mid_epoch() -> None:
        # The moment: the worker has saved epoch 1's state and is inside epoch 2.
        while not stop.is_set():
            runs = epoch_runs(folder, "t000")
            if runs and SearchDir(folder).state_files("t000"):
                seen.update(pid=runs[-1]["pid"], logged=[r["epoch"] for r in runs])
                os.kill(runs[-1]["pid"], signal.SIGKILL)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_mid_epoch, daemon=True)
    killer.start()
    try:
        code = main(["search", "--dataset", "fmnist-s", "--method", "ss", "--epochs", str(SS_EPOCHS), "--train-size", "600",
                     "--eval-size", "200", "--batch-size", "40", "--gpus-per-trial", "0", "--max-failures", "1",
                     "--data-dir", str(fmnist_dir), "--results-dir", str(results)])
    finally:
        stop.set()
        killer.join()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert seen, "the worker was never killed"
    assert seen["logged"] == [1], seen  # killed inside epoch 2
    trials = assert_search_consistent(folder, 1, SS_EPOCHS)
    assert trials["status"].tolist() == ["COMPLETED"] and trials["epochs_run"].tolist() == [SS_EPOCHS]
    runs = epoch_runs(folder, "t000")
    assert [r["epoch"] for r in runs if r["pid"] == seen["pid"]] == [1]
    assert [r["epoch"] for r in runs if r["pid"] != seen["pid"]] == list(range(2, SS_EPOCHS + 1))  # from the epoch-1 state
    state = io.load_torch(SearchDir(folder).state_files("t000")[-1])
    assert [m["epoch"] for m in json.loads(state["history"])] == list(range(1, SS_EPOCHS + 1))  # no gap, no repeat
    assert [p.name for p in SearchDir(folder).state_files("t000")] == [f"state-{e:04d}.pt" for e in (SS_EPOCHS - 1, SS_EPOCHS)]  # newest two


def test_ctrl_c_stops_cleanly_and_resume_finishes(ray_session, fmnist_dir, tmp_path, capsys):
    results = tmp_path / "results"
    folder = experiment(results, "ss")
    argv = ["--dataset", "fmnist-s", "--method", "ss", "--epochs", str(SS_EPOCHS), "--train-size", "600", "--eval-size", "200",
            "--batch-size", "40", "--gpus-per-trial", "0", "--data-dir", str(fmnist_dir), "--results-dir", str(results)]
    driver = Driver(argv, tmp_path / "driver.log", REPO)
    output = driver.interrupt_when(lambda: any(x["epochs"] for x in _trials_now(folder).values()), "first epoch")
    assert driver.proc.returncode == 130, output
    assert "Traceback" not in output, output
    assert "--resume" in output.strip().splitlines()[-1], output
    spent = ledger(folder)["seconds"]
    assert spent > 0 and not (folder / "best.json").exists()
    code = main(["search", *argv, "--resume"])
    out, err = capsys.readouterr()
    assert code == 0, err
    trials = assert_search_consistent(folder, 1, SS_EPOCHS, max_recomputed=1)
    best = json.loads((folder / "best.json").read_text())
    assert best["budget"]["seconds"] > spent  # the budget counts both sessions
    assert trials["status"].tolist() == ["COMPLETED"]


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
    assert not epoch_runs(experiment(results, "hkd"), "t000")  # no epoch was recorded as run
