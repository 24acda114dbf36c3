"""`fairtune final`: planning checks (no Ray), then real reruns on a shared local Ray with fixture data."""

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest

from fairtune import io
from fairtune.cli import main
from fairtune.errors import UserError
from fairtune.tune import final
from fairtune.tune.final import FinalSettings, final_path, plan_final

SIZES = ["--train-size", "300", "--eval-size", "100", "--batch-size", "40", "--epochs", "1"]


def fake_best(results: Path, method: str, hyper: dict, epochs: int = 3, train_size: int = 300) -> None:
    """A best.json as the search writes it (only the keys final reads)."""
    io.write_json(
        results / "fmnist-s" / "search" / method / "best.json",
        {
            "method": method, "hyperparameters": hyper,
            "val": {"accuracy": 50.0, "deo_a": 5.0},
            "settings": {
                "train": {"method": method, "epochs": epochs, "batch_size": 40, "lr": 0.001, "T": None, "lam": None},
                "data": {"dataset": "fmnist-s", "seed": 0, "skew": None, "train_size": train_size, "eval_size": 100,
                         "target": None, "select_on": "val"},
            },
        },
    )


def settings_for(results: Path, **kwargs) -> FinalSettings:
    return FinalSettings(dataset="fmnist-s", results_dir=results, data_dir=results, seeds=(0, 1), **kwargs)


def test_plan_takes_the_searches_protocol_and_best_values(tmp_path):
    fake_best(tmp_path, "mfd", {"lam": 0.25})
    fake_best(tmp_path, "ad+hkd", {"lam": 0.01, "T": 4.0})
    plan = plan_final(settings_for(tmp_path))
    assert [j.method for j in plan.jobs] == ["scratch", "ad+hkd", "mfd"]  # paper order, teachers included
    configs = {j.method: j.config for j in plan.jobs}
    assert configs["mfd"].hyperparameters["lam"] == 0.25 and configs["ad+hkd"].hyperparameters["T"] == 4.0 and configs["ad+hkd"].hyperparameters["lam"] == 0.01
    assert {c.epochs for c in configs.values()} == {3} and {c.batch_size for c in configs.values()} == {40}
    assert plan.data.train_size == 300 and plan.data.eval_size == 100
    assert plan.teacher_seeds == (0, 1) and all(j.todo == (0, 1) for j in plan.jobs)
    overridden = plan_final(settings_for(tmp_path, train_overrides={"epochs": 7}))
    assert {j.config.epochs for j in overridden.jobs} == {7}


def test_plan_refuses_searches_with_different_protocols(tmp_path):
    fake_best(tmp_path, "mfd", {"lam": 0.25}, epochs=3)
    fake_best(tmp_path, "hkd", {"T": 4.0}, epochs=5)
    with pytest.raises(UserError, match="different epochs.*--epochs"):
        plan_final(settings_for(tmp_path))
    assert {j.config.epochs for j in plan_final(settings_for(tmp_path, train_overrides={"epochs": 5})).jobs} == {5}


def test_plan_names_the_search_to_run(tmp_path):
    with pytest.raises(UserError, match="fairtune search --method mfd --dataset fmnist-s"):
        plan_final(settings_for(tmp_path))
    with pytest.raises(UserError, match="fairtune search --method hkd --dataset fmnist-s"):
        plan_final(settings_for(tmp_path, methods=("hkd",)))
    # Methods without a hyperparameter need no search.
    assert [j.method for j in plan_final(settings_for(tmp_path, methods=("ss", "scratch"))).jobs] == ["scratch", "ss"]


def test_plan_refuses_a_seed_file_from_another_config(tmp_path):
    fake_best(tmp_path, "mfd", {"lam": 0.25})
    plan = plan_final(settings_for(tmp_path, methods=("mfd",)))
    record = {"config": {**plan.jobs[0].config.record(), "lam": 9.0}, "data": plan.options(0).fingerprint()}
    io.write_json(final_path(tmp_path, "fmnist-s", "mfd", 0), record)
    with pytest.raises(UserError, match="lam 9.0 vs 0.25.*--force"):
        plan_final(settings_for(tmp_path, methods=("mfd",)))
    assert plan_final(settings_for(tmp_path, methods=("mfd",), force=True)).jobs[0].todo == (0, 1)
    io.write_json(final_path(tmp_path, "fmnist-s", "mfd", 0), record | {"config": plan.jobs[0].config.record()})
    assert plan_final(settings_for(tmp_path, methods=("mfd",))).jobs[0].todo == (1,)


def test_final_without_best_configs_is_one_line(tmp_path, capsys):
    assert main(["final", "--dataset", "fmnist-s", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fairtune search --method" in err
    assert main(["final", "--results-dir", str(tmp_path)]) == 2  # no dataset given, none found
    assert "fairtune search" in capsys.readouterr().err


def fake_trials(results: Path, method: str, rows: list[tuple], parameter: str = "lam") -> pd.DataFrame:
    """A trials.csv as the search writes it: rows of (trial id, value, status, accuracy, DEO_A, DEO_M)."""
    frame = pd.DataFrame(
        [{"trial_id": t, parameter: v, "epochs_run": 3, "status": s, "error": "", "final_accuracy": a, "final_deo_a": d,
          "final_deo_m": m, "final_objective": a - d} for t, v, s, a, d, m in rows]
    )
    io.write_text(results / "fmnist-s" / "search" / method / "trials.csv", frame.to_csv(index=False))
    return frame


TRIALS = [("t000", 3.0, "COMPLETED", 80.0, 9.0, 20.0), ("t001", 0.5, "COMPLETED", 75.0, 2.0, 4.0),
          ("t002", 0.01, "STOPPED", 90.0, 1.0, 2.0), ("t003", 10.0, "COMPLETED", 70.0, 1.5, 3.0)]


def test_plan_with_a_rule_takes_its_trial_and_records_the_choice(tmp_path):
    from fairtune.selection import parse_rule, select_trial

    fake_best(tmp_path, "mfd", {"lam": 3.0})
    fake_best(tmp_path, "ad+hkd", {"lam": 0.2, "T": 4.0})
    trials = fake_trials(tmp_path, "mfd", TRIALS)
    fake_trials(tmp_path, "ad+hkd", [("t000", 0.2, "COMPLETED", 70.0, 5.0, 9.0), ("t001", 0.7, "COMPLETED", 60.0, 1.0, 2.0)])
    for text in ("utopia", "knee", "constrained:deo_a<=2"):
        rule = parse_rule(text)
        plan = plan_final(settings_for(tmp_path, methods=("mfd", "ad+hkd"), rule=rule))
        jobs = {j.method: j for j in plan.jobs}
        row = select_trial(trials, rule)
        assert row["trial_id"] != "t002"  # stopped by ASHA: never a candidate, however good
        assert jobs["mfd"].config.hyperparameters["lam"] == row["lam"]
        assert jobs["mfd"].selection == {
            "rule": text, "trial_id": row["trial_id"],
            "val": {"accuracy": row["final_accuracy"], "deo_a": row["final_deo_a"], "deo_m": row["final_deo_m"]},
        }
        # ad+hkd's λ is re-picked from its own trials; its T stays the one its search ran with (hkd's best).
        assert jobs["ad+hkd"].config.hyperparameters["T"] == 4.0 and jobs["ad+hkd"].config.hyperparameters["lam"] in (0.2, 0.7)
    assert select_trial(trials, parse_rule("constrained:deo_a<=2"))["trial_id"] == "t001"  # 75 % beats t003's 70 %
    # Seeds done under one rule are that rule's: another rule's folder still has every seed to run.
    rule = parse_rule("utopia")
    plan = plan_final(settings_for(tmp_path, methods=("mfd",), rule=rule))
    io.write_json(final_path(tmp_path, "fmnist-s", "mfd", 0, rule), {"config": plan.jobs[0].config.record(), "data": plan.options(0).fingerprint()})
    assert final_path(tmp_path, "fmnist-s", "mfd", 0, rule).parent.parent.name == "final-utopia"
    assert plan_final(settings_for(tmp_path, methods=("mfd",), rule=rule)).jobs[0].todo == (1,)
    assert plan_final(settings_for(tmp_path, methods=("mfd",))).jobs[0].todo == (0, 1)
    # The default rule reads best.json, as before, and records it.
    best = plan_final(settings_for(tmp_path, methods=("mfd", "ss")))
    jobs = {j.method: j for j in best.jobs}
    assert jobs["mfd"].config.hyperparameters["lam"] == 3.0 and jobs["mfd"].selection == {
        "rule": "best", "trial_id": None, "val": {"accuracy": 50.0, "deo_a": 5.0, "deo_m": None}}  # fake_best has no id
    assert jobs["ss"].selection == {"rule": "best", "trial_id": None, "val": None}  # nothing searched


def select(capsys, argv, rule):
    code = main([*argv, "--select", rule])
    return code, capsys.readouterr().err


def test_a_rule_the_search_cannot_serve_is_one_line(tmp_path, capsys):
    from tests.helpers import assert_one_line_error

    argv = ["final", "--dataset", "fmnist-s", "--results-dir", str(tmp_path), "--data-dir", str(tmp_path), "--method", "mfd"]
    fake_best(tmp_path, "mfd", {"lam": 3.0})
    assert_one_line_error(*select(capsys, argv, "knee"), "--select knee needs the trials of the mfd search", "trials.csv is missing")
    fake_trials(tmp_path, "mfd", [(t, v, "STOPPED", a, d, m) for t, v, _, a, d, m in TRIALS])
    assert_one_line_error(*select(capsys, argv, "utopia"), "--select utopia: no trial of the mfd search ran every epoch")
    fake_trials(tmp_path, "mfd", TRIALS)
    # t002 (DEO_A 1.0) was stopped: the closest completed trial is t003.
    assert_one_line_error(*select(capsys, argv, "constrained:deo_a<=1.2"), "no completed trial of the mfd search has validation deo_a <= 1.2",
                          "the closest is t003 with deo_a 1.5")
    trials = tmp_path / "fmnist-s" / "search" / "mfd" / "trials.csv"
    trials.write_text(pd.read_csv(trials).drop(columns="final_deo_m").to_csv(index=False))
    assert_one_line_error(*select(capsys, argv, "constrained:deo_m<=5"), "has no final_deo_m column")
    trials.write_bytes(b"\x00\xff\xfe garbage")
    assert_one_line_error(*select(capsys, argv, "knee"), "trials.csv cannot be read as a table", "or use --select best")
    assert not (tmp_path / "fmnist-s" / "final-knee").exists()


class ListQueue:
    """The two calls `_show_epochs` makes on a ``ray.util.queue.Queue``, over a plain list."""

    def __init__(self):
        self.items = []

    def qsize(self):
        return len(self.items)

    def get_nowait_batch(self, n):
        taken, self.items = self.items[:n], self.items[n:]
        return taken


def test_epoch_lines_show_each_runs_newest_epoch_at_most_every_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(final.time, "monotonic", lambda: clock[0])
    queue, shown, printed = ListQueue(), {}, []

    def epoch(run, k):
        queue.items.append({"run": run, "epoch": k, "of": 9, "split": "val", "accuracy": 50 + k, "deo_a": 10 - k, "seconds": 2.0})

    for k in (1, 2, 3):
        epoch("hkd seed 0", k)
    epoch("mfd seed 1", 1)
    final._show_epochs(queue, shown, printed.append)
    assert printed == [  # a new run's newest epoch at once, one line per run
        "  hkd seed 0 epoch   3/9  val acc  53.00  DEO_A   7.00  2.0 s",
        "  mfd seed 1 epoch   1/9  val acc  51.00  DEO_A   9.00  2.0 s",
    ]
    clock[0] += final.PROGRESS_EVERY_S - 1
    epoch("hkd seed 0", 4)
    epoch("teacher seed 2", 1)
    final._show_epochs(queue, shown, printed.append)
    assert printed[2:] == ["  teacher seed 2 epoch   1/9  val acc  51.00  DEO_A   9.00  2.0 s"]  # hkd: too soon
    clock[0] += 1
    epoch("hkd seed 0", 5)
    final._show_epochs(queue, shown, printed.append)
    assert printed[3:] == ["  hkd seed 0 epoch   5/9  val acc  55.00  DEO_A   5.00  2.0 s"]
    assert queue.items == []
    final._show_epochs(queue, shown, printed.append)  # nothing new, nothing printed
    assert len(printed) == 4


# -- end to end on Ray ------------------------------------------------------------------------


def run(capsys, *argv):
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def deo_from_matrix(matrix):
    """DEO_A / DEO_M by a plain loop over classes (every cell is filled at these sizes)."""
    gaps = [max(row[c] for row in matrix) - min(row[c] for row in matrix) for c in range(len(matrix[0]))]
    return sum(gaps) / len(gaps), max(gaps)


@pytest.mark.slow
def test_final_reruns_best_configs_per_seed_then_skips_and_forces(ray_session, data_dir, tmp_path, capsys):
    common = ["--dataset", "fmnist-s", "--data-dir", data_dir, "--results-dir", tmp_path]
    for method in ("ss", "hkd"):
        code, _, err = run(capsys, "search", "--method", method, *common, *SIZES, "--num-samples", "1", "--gpus-per-trial", "0")
        assert code == 0, err
    best_t = json.loads((tmp_path / "fmnist-s" / "search" / "hkd" / "best.json").read_text())["hyperparameters"]["T"]

    code, out, err = run(capsys, "final", *common, "--seeds", "0", "1", "--gpus-per-trial", "0")
    assert code == 0, err
    records = {}
    for method in ("scratch", "hkd", "ss"):
        for seed in (0, 1):
            record = json.loads(final_path(tmp_path, "fmnist-s", method, seed).read_text())
            assert record["seed"] == seed and record["method"] == method and record["epochs_run"] == 1
            assert record["data"]["train_size"] == 300 and record["config"]["epochs"] == 1
            deo_a, deo_m = deo_from_matrix(record["test"]["acc_matrix"])
            assert record["test"]["deo_a"] == pytest.approx(deo_a) and record["test"]["deo_m"] == pytest.approx(deo_m)
            records[method, seed] = record
    assert records["hkd", 0]["hyperparameters"] == {"T": best_t}
    lines = out.splitlines()
    for (method, seed), record in records.items():
        if (method, seed) == ("scratch", 0):
            continue  # the search's teacher, not trained here
        name = "teacher" if method == "scratch" else method
        shown = [i for i, line in enumerate(lines) if line.startswith(f"  {name} seed {seed} epoch   1/1  val acc ")]
        result = [i for i, line in enumerate(lines) if f"] {method} seed {seed}: test accuracy" in line]
        assert len(shown) == 1 and len(result) == 1 and shown[0] < result[0], out  # progress, then the result
        last = record["history"][-1]  # the whole epoch travels: every metric the other commands show
        assert f"val acc {last['accuracy']:6.2f}  DEO_A {last['deo_a']:6.2f}  DEO_M {last['deo_m']:6.2f}  obj {last['objective']:7.2f}" in lines[shown[0]]
    assert (tmp_path / "fmnist-s" / "teachers" / "seed1.pt").exists()  # trained by final for seed 1
    for (method, seed), record in records.items():  # a TensorBoard run each (tests/test_board.py reads more)
        assert val_curve(tmp_path, method, seed) == [(1, pytest.approx(record["history"][0]["accuracy"], rel=1e-6))]
    # Seed 0's teacher came from the search: the scratch row of seed 0 is that teacher's test result.
    teacher0 = json.loads((tmp_path / "fmnist-s" / "teachers" / "seed0.json").read_text())
    assert records["scratch", 0]["test"] == teacher0["test"]
    weights = [io.load_torch(tmp_path / "fmnist-s" / "teachers" / f"seed{s}.pt")["state_dict"] for s in (0, 1)]
    assert any(not (weights[0][k] == weights[1][k]).all() for k in weights[0])  # each seed its own teacher

    table = pd.read_csv(tmp_path / "fmnist-s" / "table.csv").set_index("method")
    assert list(table.index) == ["scratch", "hkd", "ss"]
    for method in table.index:
        for metric in ("accuracy", "deo_a", "deo_m"):
            values = [records[method, s]["test"][metric] for s in (0, 1)]
            assert table.loc[method, f"{metric}_mean"] == pytest.approx(statistics.mean(values), abs=1e-4)
            assert table.loc[method, f"{metric}_std"] == pytest.approx(statistics.stdev(values), abs=1e-4)
    assert (tmp_path / "fmnist-s" / "table.md").read_text().strip() in out
    assert (tmp_path / "fmnist-s" / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "fmnist-s" / "final").glob("*/*.json")}
    code, out, err = run(capsys, "final", *common, "--seeds", "0", "1")
    assert code == 0 and "every seed is done" in out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    code, out, err = run(capsys, "final", *common, "--method", "ss", "--seeds", "1", "--force", "--gpus-per-trial", "0")
    assert code == 0, err
    changed = {p for p in stamps if p.stat().st_mtime_ns != stamps[p]}
    assert changed == {final_path(tmp_path, "fmnist-s", "ss", 1)}
    rerun = json.loads(final_path(tmp_path, "fmnist-s", "ss", 1).read_text())
    assert rerun["test"] == records["ss", 1]["test"]  # same seed, same data, CPU: identical
    assert len(val_curve(tmp_path, "ss", 1)) == 1  # the rerun's curve replaced the first one


@pytest.mark.slow
def test_final_select_reruns_the_rules_trial_into_its_own_folder(ray_session, data_dir, tmp_path, capsys):
    from fairtune.selection import parse_rule, select_trial
    from tests.helpers import read_trials

    common = ["--dataset", "fmnist-s", "--data-dir", data_dir, "--results-dir", tmp_path, "--gpus-per-trial", "0"]
    code, _, err = run(capsys, "search", "--method", "ad", *common, *SIZES, "--num-samples", "3")  # a scalar search
    assert code == 0, err
    search = tmp_path / "fmnist-s" / "search" / "ad"
    trials, best = read_trials(search / "trials.csv"), json.loads((search / "best.json").read_text())

    rule = parse_rule("utopia")
    code, out, err = run(capsys, "final", *common, "--method", "ad", "--seeds", "0", "--select", "utopia")
    assert code == 0, err
    row = select_trial(trials, rule)  # the rule itself: tests/test_selection.py
    record = json.loads(final_path(tmp_path, "fmnist-s", "ad", 0, rule).read_text())
    assert final_path(tmp_path, "fmnist-s", "ad", 0, rule).parent.parent.name == "final-utopia"
    assert record["hyperparameters"] == {"lam": pytest.approx(row["lam"])} and record["config"]["lam"] == pytest.approx(row["lam"])
    assert record["selection"] == {
        "rule": "utopia", "trial_id": row["trial_id"],
        "val": {k: pytest.approx(row[f"final_{k}"]) for k in ("accuracy", "deo_a", "deo_m")},
    }
    assert f"ad: trial {row['trial_id']}" in out and "final-utopia" in out
    assert not (tmp_path / "fmnist-s" / "final").exists() and not (tmp_path / "fmnist-s" / "table.md").exists()

    code, out, err = run(capsys, "final", *common, "--method", "ad", "--seeds", "0")  # --select best, the default
    assert code == 0, err
    record = json.loads(final_path(tmp_path, "fmnist-s", "ad", 0).read_text())
    assert record["hyperparameters"] == best["hyperparameters"]
    assert list(record)[-1] == "selection" and record["selection"] == {
        "rule": "best", "trial_id": best["trial_id"], "val": {k: best["val"][k] for k in ("accuracy", "deo_a", "deo_m")},
    }
    assert (tmp_path / "fmnist-s" / "table.md").exists()


def val_curve(results: Path, method: str, seed: int) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fairtune.layout import Layout

    run = EventAccumulator(str(Layout(results, "fmnist-s").final_tb(method, seed))).Reload()
    return [(e.step, e.value) for e in run.Scalars("val/accuracy")]


def store_teacher(results: Path, seed: int, **config) -> None:
    """A stored teacher as `fairtune teacher` leaves it (only what final's planning reads)."""
    from fairtune.engine import TrainConfig
    from fairtune.teachers import teacher_paths

    files = teacher_paths(results, "fmnist-s", seed)
    io.write_bytes(files.weights, b"weights")
    io.write_json(files.metrics, {"config": TrainConfig(method="scratch", batch_size=40, **config).record(), "test": {}})


def test_plan_refuses_a_stored_teacher_of_another_protocol(tmp_path, capsys):
    fake_best(tmp_path, "hkd", {"T": 4.0}, epochs=3)
    store_teacher(tmp_path, 0, epochs=3)
    store_teacher(tmp_path, 1, epochs=50, lr=0.01)  # e.g. from `fairtune teacher` with its defaults
    with pytest.raises(UserError, match=r"seed1.pt was trained with epochs 50 \(this final: 3\), lr 0.01 \(this final: 0.001\); "
                                        r"pass --force to retrain.*or pass --epochs 50 --lr 0.01"):
        plan_final(settings_for(tmp_path))
    with pytest.raises(UserError, match="--force and name scratch in --method"):
        plan_final(settings_for(tmp_path, methods=("hkd",)))
    # only seed 0 asked for: its teacher matches
    assert plan_final(FinalSettings(dataset="fmnist-s", results_dir=tmp_path, data_dir=tmp_path, seeds=(0,))).teacher_seeds == (0,)
    assert plan_final(settings_for(tmp_path, force=True)).teacher_seeds == (0, 1)  # --force retrains the teachers
    # settings that do not change what a teacher learns are not held against it
    store_teacher(tmp_path, 1, epochs=3, objective="acc", eval_batch_size=7, adv_lr=0.5)
    assert plan_final(settings_for(tmp_path)).teacher_seeds == (0, 1)
    store_teacher(tmp_path, 1, epochs=50)
    argv = ["final", "--dataset", "fmnist-s", "--results-dir", str(tmp_path), "--data-dir", str(tmp_path)]
    assert main([*argv, "--seeds", "0", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fairtune: error: teacher ") and "--force" in err
