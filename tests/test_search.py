"""`fairtune search` end to end on a shared local Ray: outputs, ASHA, failures, fixed T, resume."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fairtune.cli import main
from tests.helpers import Driver, assert_one_line_error, assert_search_consistent, experiment, ledger, ledger_trials, read_trials, snapshot

pytestmark = pytest.mark.slow
SIZES = ["--train-size", "300", "--eval-size", "100", "--batch-size", "40", "--cpus-per-trial", "1", "--gpus-per-trial", "0.5"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


def search(capsys, data_dir, results, *argv):
    code = main(["search", "--dataset", "fmnist-s", "--data-dir", str(data_dir), "--results-dir", str(results), *SIZES, *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def starting_at_once(monkeypatch):
    """How many trials Tune's controller lets start together (docs/ray.md): 1 unless --max-concurrent."""
    from ray.tune.execution import tune_controller

    seen, real = [], tune_controller._get_max_pending_trials
    monkeypatch.setattr(tune_controller, "_get_max_pending_trials", lambda alg: seen.append(real(alg)) or seen[-1])
    return seen


def test_mfd_search_writes_best_trials_and_tensorboard(ray_session, data_dir, results, capsys, starting_at_once):
    code, out, err = search(capsys, data_dir, results, "--method", "mfd", "--epochs", "2", "--num-samples", "3")
    assert code == 0, err
    assert starting_at_once and set(starting_at_once) == {1}  # one at a time: trials reach ASHA's rungs in a stable order
    folder = experiment(results, "mfd")
    trials = read_trials(folder / "trials.csv")
    assert len(trials) == 3 and trials["trial_id"].is_unique
    assert 3.0 in trials["lam"].round(6).tolist()  # the start value (fmnist-s mirrors cifar10s) is evaluated
    assert (trials["epochs_run"] >= 1).all() and set(trials["status"]) <= {"COMPLETED", "STOPPED"}
    best = json.loads((folder / "best.json").read_text())
    row = trials[trials["trial_id"] == best["trial_id"]].iloc[0]
    assert best["hyperparameters"] == {"lam": pytest.approx(row["lam"])}
    assert best["objective_value"] == pytest.approx(row["final_accuracy"] - row["final_deo_a"])
    completed = trials[trials["status"] == "COMPLETED"]
    assert best["objective_value"] == pytest.approx(completed["final_objective"].max())
    assert best["budget"]["epochs_run"] == trials["epochs_run"].sum()
    assert (results / "fmnist-s" / "teachers" / "seed0.pt").exists()  # trained as a Ray task
    assert "tensorboard --logdir" in out and "best: lam=" in out

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(folder.glob("tb/*/events.out.tfevents.*"))  # fairtune's runs (tests/test_board.py)
    assert len(events) == 3 and not list(folder.glob("tune/*/events.out.tfevents.*"))
    tags = set(EventAccumulator(str(events[0])).Reload().Tags()["scalars"])
    for tag in ("val/accuracy", "val/deo_a", "val/deo_m", "val/objective", "schedule/lr", "train/ce", "train/mfd", "val/group_acc/gray", "val/group_acc/color"):
        assert tag in tags, (tag, sorted(tags))
    assert "lam" in hparams_logged(events[0])  # the HParams view lists the searched hyperparameter


def hparams_logged(event_file: Path) -> dict:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    for event in EventFileLoader(str(event_file)).Load():
        for value in event.summary.value:
            if value.tag == "_hparams_/session_start_info":
                data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                return dict(data.session_start_info.hparams)
    return {}


def test_asha_stops_some_trials_early(ray_session, data_dir, results, capsys, starting_at_once):
    code, out, err = search(
        capsys, data_dir, results, "--method", "ad", "--epochs", "4", "--num-samples", "6",
        "--grace-period", "1", "--reduction-factor", "2", "--max-concurrent", "2",
    )
    assert code == 0, err
    assert starting_at_once and set(starting_at_once) == {2}  # --max-concurrent 2: two start together
    trials = read_trials(experiment(results, "ad") / "trials.csv")
    assert len(trials) == 6
    stopped = trials[trials["status"] == "STOPPED"]
    assert len(stopped) >= 1 and (stopped["epochs_run"] < 4).all()
    assert trials["epochs_run"].sum() < 6 * 4
    best = json.loads((experiment(results, "ad") / "best.json").read_text())
    assert best["budget"]["epochs_if_no_early_stopping"] == 24
    assert_optuna_was_told(experiment(results, "ad"), ("objective",))  # ASHA's stops are PRUNED in Optuna
    # Two trials at 0.5 GPU each shared the session's one (logical) GPU at the same time.
    spans = []
    for progress in experiment(results, "ad").glob("tune/*/progress.csv"):
        frame = pd.read_csv(progress)
        spans.append((frame["timestamp"].iloc[0] - frame["time_this_iter_s"].iloc[0], frame["timestamp"].iloc[-1]))
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1 :])


def assert_optuna_was_told(folder: Path, told: tuple[str, ...]) -> None:
    """Optuna's stored study (what a resume reads) holds each trial's outcome as the ledger has it:
    COMPLETE with the final epoch's ``told`` values, PRUNED when ASHA stopped it, FAIL on an error;
    per-epoch objectives as intermediate values only in a single-objective study."""
    import optuna

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert len(study.directions) == len(told)
    states = {"COMPLETED": "COMPLETE", "STOPPED": "PRUNED", "ERROR": "FAIL"}
    for trial in ledger(folder)["trials"]:
        frozen = study.trials[trial["optuna_number"]]
        assert frozen.params == {"lam": trial["config"]["lam"]}
        assert frozen.state.name == states[trial["status"]], (trial["id"], frozen.state)
        if trial["status"] == "COMPLETED":
            assert frozen.values == pytest.approx([trial["epochs"][-1][key] for key in told])
        multi = len(told) > 1
        assert frozen.intermediate_values == ({} if multi else {e["epoch"]: pytest.approx(e["objective"]) for e in trial["epochs"]})


def test_multi_objective_search_tells_optuna_both_values_and_writes_the_pareto_set(ray_session, data_dir, tmp_path, capsys):
    results = tmp_path / "results"
    code, out, err = search(
        capsys, data_dir, results, "--method", "ad", "--objective", "deo_a,acc", "--epochs", "3", "--num-samples", "6",
        "--grace-period", "1", "--reduction-factor", "2", "--max-concurrent", "1",
    )
    assert code == 0, err
    folder = experiment(results, "ad")
    trials = assert_search_consistent(folder, 6, 3)  # best.json: the best scalarisation (acc - DEO_A) of the completed trials
    stopped, completed = trials[trials["status"] == "STOPPED"], trials[trials["status"] == "COMPLETED"]
    assert len(stopped) >= 1 and len(completed) >= 2  # ASHA stopped some trials on the scalarisation
    assert (trials["final_objective"] == trials["final_accuracy"] - trials["final_deo_a"]).all()

    import optuna

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert_optuna_was_told(folder, ("accuracy", "deo_a"))

    # pareto.csv: exactly the completed trials no other completed trial beats on both objectives.
    points = {row.trial_id: (row.final_accuracy, row.final_deo_a) for row in completed.itertuples()}
    front = [t for t, (acc, deo) in points.items()
             if not any(a >= acc and d <= deo and (a, d) != (acc, deo) for a, d in points.values())]
    pareto = read_trials(folder / "pareto.csv")
    assert pareto["trial_id"].tolist() == front and len(front) >= 1
    for column in ("lam", "final_accuracy", "final_deo_a", "final_deo_m"):
        assert pareto[column].tolist() == pytest.approx(trials.set_index("trial_id").loc[front, column].tolist())
    best = json.loads((folder / "best.json").read_text())
    assert best["objective"] == "acc,deo_a" and best["objectives"] == {"acc": "max", "deo_a": "min"}
    assert best["scalarised"] == "acc-deo_a" and best["pareto_trials"] == front
    assert f"Pareto set on acc and deo_a (val, completed trials): {', '.join(front)}" in out


def test_nothing_to_search_runs_one_trial(ray_session, data_dir, results, capsys):
    code, out, err = search(capsys, data_dir, results, "--method", "ss", "--epochs", "1", "--num-samples", "5")
    assert code == 0, err
    assert "no hyperparameter to search: running one trial" in out
    assert len(read_trials(experiment(results, "ss") / "trials.csv")) == 1
    assert json.loads((experiment(results, "ss") / "best.json").read_text())["hyperparameters"] == {}


def test_impossible_resources_and_existing_searches_are_one_line_errors(ray_session, data_dir, results, capsys):
    code, _, err = search(capsys, data_dir, results, "--method", "at", "--gpus-per-trial", "2")
    assert code == 2 and "exceeds the cluster's 1 GPUs" in err and len(err.strip().splitlines()) == 1
    assert not experiment(results, "at").exists()
    code, _, err = search(capsys, data_dir, results, "--method", "ss", "--epochs", "1")
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1


def test_non_finite_trial_fails_with_its_reason_and_the_rest_finish(ray_session, data_dir, results, tmp_path, capsys):
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    # λ = 1e39 overflows float32: that trial's loss is inf from its first step.
    (spaces / "mmd.yaml").write_text(
        "method: mmd\nparameter: lam\ndistribution: choice\nvalues: [1.0e+39, 0.5]\ndefault: 1.0e+39\n"
    )
    code, out, err = search(
        capsys, data_dir, results, "--method", "mmd", "--epochs", "1", "--num-samples", "4", "--search-spaces", spaces,
        "--max-failures", "2",
    )
    assert code == 0, err
    trials = read_trials(experiment(results, "mmd") / "trials.csv")
    failed = trials[trials["status"] == "ERROR"]
    # Two values, four samples: a grid, each value once; the overflowing one fails, the other completes.
    assert trials["lam"].tolist() == [1e39, 0.5] and trials["status"].tolist() == ["ERROR", "COMPLETED"]
    assert failed["error"].str.contains("non-finite").all()
    logs = experiment(results, "mmd") / "trials"
    for trial_id in failed["trial_id"]:  # retries re-raised at once instead of re-running the epoch
        assert (logs / trial_id / "nonfinite.txt").exists()
        assert not (logs / trial_id / "epochs.jsonl").exists()
    best = json.loads((experiment(results, "mmd") / "best.json").read_text())
    assert best["hyperparameters"]["lam"] == 0.5 and best["budget"]["failed_trials"] == len(failed)


def test_ad_hkd_takes_T_from_the_hkd_search(ray_session, data_dir, results, capsys):
    code, _, err = search(capsys, data_dir, results, "--method", "ad+hkd", "--epochs", "1", "--num-samples", "1")
    assert code == 2 and "fairtune search --method hkd --dataset fmnist-s" in err and len(err.strip().splitlines()) == 1
    hkd = experiment(results, "hkd")
    hkd.mkdir(parents=True)
    (hkd / "best.json").write_text(json.dumps({"hyperparameters": {"T": 4.0}}))
    code, out, err = search(capsys, data_dir, results, "--method", "ad+hkd", "--epochs", "1", "--num-samples", "1")
    assert code == 0, err
    best = json.loads((experiment(results, "ad+hkd") / "best.json").read_text())
    assert best["hyperparameters"]["T"] == 4.0 and best["searched"] == "lam"
    assert "T=4 fixed" in out


def test_resume_after_the_driver_is_killed(ray_session, data_dir, tmp_path, capsys):
    results = tmp_path / "results"
    ad = ["--method", "ad", "--epochs", "3", "--num-samples", "3", "--max-concurrent", "1", "--grace-period", "3",
          "--gpus-per-trial", "0"]  # its own Ray has no GPU
    argv = ["--dataset", "fmnist-s", "--data-dir", str(data_dir), "--results-dir", str(results), *SIZES, *ad]
    folder = experiment(results, "ad")
    driver = Driver(argv, tmp_path / "driver.log", REPO)

    def two_epochs_recorded() -> bool:
        return (folder / "ledger.json").exists() and sum(len(t["epochs"]) for t in ledger(folder)["trials"]) >= 2

    try:
        assert driver.wait_for(two_epochs_recorded, "two recorded epochs"), driver.output()
    finally:
        driver.kill()
        driver.reap()
    assert not (folder / "best.json").exists()
    before = ledger_trials(folder)

    code, out, err = search(capsys, data_dir, results, *ad, "--resume")
    assert code == 0, err
    assert "resuming the search" in out
    trials = assert_search_consistent(folder, 3, 3, max_recomputed=1)
    assert (trials["epochs_run"] == 3).all() and (trials["status"] == "COMPLETED").all()
    for trial_id, trial in before.items():  # what was recorded before the kill is kept as it was
        assert ledger_trials(folder)[trial_id]["epochs"][: len(trial["epochs"])] == trial["epochs"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted((folder / "tb").iterdir())  # one TensorBoard run per trial over both sessions
    assert len(runs) == 3
    for run in runs:  # re-reported epochs were not written again (the epoch in flight at the kill may be missing)
        steps = [e.step for e in EventAccumulator(str(run)).Reload().Scalars("val/accuracy")]
        assert steps == sorted(set(steps)) and steps[-1] == 3, (run.name, steps)

    # Resuming the finished search runs nothing, keeps every record and adds its time to the budget.
    spent = json.loads((folder / "best.json").read_text())["budget"]["seconds"]
    kept = ledger_trials(folder)
    code, out, err = search(capsys, data_dir, results, *ad, "--resume")
    assert code == 0, err
    assert "3 trial(s) finished, 0 to continue, 0 to start" in out
    assert ledger_trials(folder) == kept and read_trials(folder / "trials.csv").equals(trials)
    assert json.loads((folder / "best.json").read_text())["budget"]["seconds"] >= spent


def test_resume_with_other_settings_is_refused(ray_session, data_dir, tmp_path, capsys):
    results = tmp_path / "results"
    code, _, err = search(capsys, data_dir, results, "--method", "scratch", "--epochs", "1", "--num-samples", "2")
    assert code == 0, err
    folder = experiment(results, "scratch")
    before = snapshot(folder)
    code, _, err = search(capsys, data_dir, results, "--method", "scratch", "--epochs", "2", "--num-samples", "3", "--resume")
    assert_one_line_error(code, err, "--resume", "--epochs 1 -> 2", "delete the folder")
    code, _, err = search(capsys, data_dir, results, "--method", "scratch", "--epochs", "1", "--lr", "0.01", "--resume")
    assert_one_line_error(code, err, "--lr 0.001 -> 0.01")
    assert snapshot(folder) == before  # nothing ran, nothing was rewritten
    assert json.loads((folder / "best.json").read_text())["settings"]["epochs"] == 1


def test_resume_before_any_record_starts_afresh(ray_session, data_dir, results, capsys):
    # Killed before the ledger was first written: the folder holds only what Tune began.
    folder = experiment(results, "nst")
    (folder / "tune").mkdir(parents=True)
    (folder / "tune" / "tuner.pkl").write_bytes(b"partial")
    code, out, err = search(capsys, data_dir, results, "--method", "nst", "--epochs", "1", "--num-samples", "2", "--resume")
    assert code == 0, err
    assert "no search record" in out
    assert len(read_trials(folder / "trials.csv")) == 2


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}", "nonsense", "auto"])
def test_unreachable_address_is_a_one_line_error(data_dir, results, capsys, address):
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.time()
    if address == "auto":
        # auto finds a stale cluster address (here through RAY_ADDRESS): refused at once, in a fresh
        # process (this one's Ray is already initialised).
        argv = ["search", "--dataset", "fmnist-s", "--data-dir", str(data_dir), "--results-dir", str(results),
                "--method", "scratch", "--address", "auto"]
        env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        proc = subprocess.run([sys.executable, "-m", "fairtune", *argv], cwd=REPO, env=env, capture_output=True, text=True)
        code, err = proc.returncode, proc.stderr
        assert f"--address auto (127.0.0.1:{port}, from RAY_ADDRESS)" in err, err
    else:
        code, _, err = search(capsys, data_dir, results, "--method", "scratch", "--address", address.format(port=port))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--address" in err, err
    assert time.time() - started < 30
