"""TensorBoard, read back with TensorBoard's own reader: two searches with different hyperparameters
(hkd searches T, mfd searches λ) and a final in one results folder."""

import json
from pathlib import Path

import pytest

from fairtune.cli import main
from fairtune.layout import Layout
from fairtune.tune import board
from tests.fixtures.idx import write_fashion_mnist
from tests.helpers import experiment, ledger

SIZES = ["--train-size", "300", "--eval-size", "100", "--batch-size", "40", "--epochs", "2", "--gpus-per-trial", "0"]
SELECTION = ("val/accuracy", "val/deo_a", "val/deo_m", "val/objective")
HYPER = {"hkd": "T", "mfd": "lam"}


def test_group_accuracies_weigh_cells_by_their_counts():
    acc = board.group_accuracies([[100.0, 50.0], [None, 0.0]], [[1, 2], [0, 4]], ("gray", "color"))
    assert acc == {"gray": pytest.approx(200 / 3), "color": 0.0}


def test_epoch_scalars_keep_fairtunes_numbers_under_groups_and_drop_rays_bookkeeping():
    result = {"epoch": 2, "accuracy": 60.0, "deo_a": 5.0, "deo_m": 9.0, "objective": 55.0, "loss": 1.2, "lr": 1e-3,
              "kd_weight": 3.0, "hint_stage": 0, "train/ce": 0.9, "train/hkd": 0.1, "group_acc/gray": 61.0,
              "group_acc/color": float("nan"), "done": False, "time_this_iter_s": 1.5, "training_iteration": 2,
              "acc_matrix": "[[1]]", "stage2_epoch": 2}  # fmt: skip
    assert board.epoch_scalars(result, "hkd") == {
        "val/accuracy": 60.0, "val/deo_a": 5.0, "val/deo_m": 9.0, "val/objective": 55.0, "val/loss": 1.2,
        "train/ce": 0.9, "train/hkd": 0.1, "val/group_acc/gray": 61.0, "schedule/lr": 1e-3, "schedule/kd_weight": 3.0,
    }  # fmt: skip
    assert "schedule/kd_weight" not in board.epoch_scalars(result, "mfd")


def raw_epoch(epoch: int, accuracy: float) -> dict:
    """An epoch's metrics as the engine returns them (what a final's progress queue carries)."""
    return {"epoch": epoch, "stage2_epoch": epoch, "stage": "main", "kd_weight": 2.0, "lr": 1e-3, "train/loss": 1.0,
            "train/ce": 0.8, "train/hkd": 0.2, "loss": 1.5, "accuracy": accuracy, "deo_a": 4.0, "deo_m": 8.0,
            "objective": accuracy - 4.0, "acc_matrix": [[accuracy], [accuracy - 8.0]], "cell_counts": [[10], [10]],
            "empty_cells": []}  # fmt: skip


def test_final_board_writes_each_epoch_once_then_the_test_metrics(tmp_path):
    from fairtune.engine import TrainConfig
    from fairtune.tune.final import _show_epochs

    class Queue:
        def __init__(self, lines):
            self.lines = lines

        def qsize(self):
            return len(self.lines)

        def get_nowait_batch(self, n):
            taken, self.lines = self.lines[:n], self.lines[n:]
            return taken

    final = board.FinalBoard(tmp_path, "fmnist-s", ("gray", "color"))
    stale = Layout(tmp_path, "fmnist-s").final_tb("hkd", 1) / "events.out.tfevents.0.old"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    final.start(TrainConfig(method="hkd", epochs=3, hyperparameters={"T": 4.0}), seed=1)
    assert not stale.exists()  # a rerun starts its curve afresh
    line = {"run": "hkd seed 1", "epoch": 1, "of": 3, "split": "val", "accuracy": 50.0, "deo_a": 4.0, "seconds": 1.0}
    queue = Queue([{**line, "method": "hkd", "seed": 1, "metrics": raw_epoch(1, 50.0)}, {**line, "run": "teacher seed 1"}])
    _show_epochs(queue, {}, lambda text: None, final)
    history = [raw_epoch(1, 50.0), raw_epoch(2, 55.0), raw_epoch(3, 60.0)]  # epoch 1 again: not a second point
    test = {"accuracy": 58.0, "deo_a": 6.0, "deo_m": 9.0, "loss": 1.4, "acc_matrix": [[61.0], [55.0]], "cell_counts": [[10], [10]]}
    final.finish("hkd", 1, {"epochs_run": 3, "history": history, "test": test})

    run, _, hparams = read_run(Layout(tmp_path, "fmnist-s").final_tb("hkd", 1))
    assert hparams == {"dataset": "fmnist-s", "method": "hkd", "kind": "final", "seed": 1, "T": 4.0}
    assert curve(run, "val/accuracy") == [(1, 50.0), (2, 55.0), (3, 60.0)]
    assert curve(run, "val/group_acc/color") == [(1, 42.0), (2, 47.0), (3, 52.0)]
    assert curve(run, "schedule/kd_weight") == [(1, 2.0), (2, 2.0), (3, 2.0)]
    assert curve(run, "test/accuracy") == [(3, 58.0)] and curve(run, "test/group_acc/gray") == [(3, 61.0)]
    assert curve(run, "test/objective") == [(3, 52.0)]  # acc-deo_a, the default objective


def runs_under(root: Path) -> dict[str, Path]:
    """TensorBoard's runs for ``--logdir root``: every folder holding an event file, by relative path."""
    return {p.parent.relative_to(root).as_posix(): p.parent for p in root.rglob("events.out.tfevents.*")}


def read_run(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = EventAccumulator(str(folder)).Reload()
    content = run.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return run, experiment, hparams


def curve(run, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in run.Scalars(tag)]


@pytest.mark.slow
def test_two_searches_and_a_final_read_back_with_tensorboards_reader(ray_session, tmp_path, capsys):
    data, results = tmp_path / "data", tmp_path / "results"
    write_fashion_mnist(data, n_train_per_class=520, n_test_per_class=20)
    common = ["--dataset", "fmnist-s", "--data-dir", str(data), "--results-dir", str(results), *SIZES]
    for method in HYPER:
        assert main(["search", "--method", method, "--num-samples", "2", *common]) == 0, capsys.readouterr().err
    assert main(["final", "--seeds", "0", *common]) == 0, capsys.readouterr().err
    root = results / "fmnist-s"

    searches = {m: ledger(experiment(results, m))["trials"] for m in HYPER}
    expected = {
        f"search/{m}/tb/{t['id']} {HYPER[m]}={t['config'][HYPER[m]]:.4g}": (m, t) for m, trials in searches.items() for t in trials
    }
    finals = {f"final/{m}/tb/seed0": m for m in ("scratch", *HYPER)}
    runs = runs_under(root)
    assert set(runs) == set(expected) | set(finals), sorted(runs)  # Tune's own TensorBoard logger is off
    assert all(list(experiment(results, m).glob("tune/*/progress.csv")) for m in HYPER)  # its CSV logger is not

    experiments = set()
    for name, (method, trial) in expected.items():
        run, declared, hparams = read_run(runs[name])
        experiments.add(declared.SerializeToString())
        value = trial["config"][HYPER[method]]
        assert hparams == {"dataset": "fmnist-s", "method": method, "kind": "search", "seed": 0, HYPER[method]: pytest.approx(value)}
        tags = set(run.Tags()["scalars"])
        wanted = {*SELECTION, "val/loss", "val/group_acc/gray", "val/group_acc/color", "train/loss", "train/ce", f"train/{method}", "schedule/lr"}
        assert wanted <= tags and all(t.split("/")[0] in {"val", "train", "schedule"} for t in tags), tags
        assert ("schedule/kd_weight" in tags) == (method == "hkd")
        epochs = trial["epochs"]
        for key in ("accuracy", "deo_a", "deo_m", "objective", "loss"):  # one point per recorded epoch, the ledger's value
            assert curve(run, f"val/{key}") == [(e["epoch"], pytest.approx(e[key], rel=1e-6)) for e in epochs]

    for name, method in finals.items():
        run, declared, hparams = read_run(runs[name])
        experiments.add(declared.SerializeToString())
        record = json.loads((root / "final" / method / "seed0.json").read_text())
        assert hparams == {"dataset": "fmnist-s", "method": method, "kind": "final", "seed": 0, **record["hyperparameters"]}
        history = record["history"]
        assert curve(run, "val/accuracy") == [(e["epoch"], pytest.approx(e["accuracy"], rel=1e-6)) for e in history]
        last = record["epochs_run"]
        for key in ("accuracy", "deo_a", "deo_m"):
            assert curve(run, f"test/{key}") == [(last, pytest.approx(record["test"][key], rel=1e-6))]
        assert {"test/group_acc/gray", "test/group_acc/color", "test/objective"} <= set(run.Tags()["scalars"])
    best = {m: json.loads((experiment(results, m) / "best.json").read_text())["hyperparameters"] for m in HYPER}
    assert best["hkd"].keys() == {"T"} and best["mfd"].keys() == {"lam"}

    # One experiment config, the same in every run: TensorBoard picks any one of them for a logdir, and
    # each search's hyperparameter is declared in it, the metrics with accuracy, DEO_A, DEO_M, objective first.
    from tensorboard.plugins.hparams import api_pb2

    [raw] = experiments
    declared = api_pb2.Experiment.FromString(raw)
    assert [h.name for h in declared.hparam_infos] == ["method", "kind", "seed", "dataset", "T", "lam", "distill_lam"]
    assert set(declared.hparam_infos[0].domain_discrete) >= {"hkd", "mfd", "scratch"}
    metrics = [(m.name.tag, m.display_name) for m in declared.metric_infos]
    assert metrics[:4] == [("val/accuracy", "accuracy ↑"), ("val/deo_a", "DEO_A ↓"), ("val/deo_m", "DEO_M ↓"), ("val/objective", "objective")]
    assert {"test/accuracy", "test/deo_a", "test/deo_m"} <= {tag for tag, _ in metrics}

    # What the HParams dashboard gets for `--logdir results/fmnist-s`: both hyperparameters, each row its own.
    shown, rows = hparams_dashboard(root)
    assert shown == ["T", "kind", "lam", "method", "seed", "dataset", "distill_lam"]  # the dashboard ticks the first five
    assert len(rows) == len(expected) + len(finals)
    for name, (method, trial) in expected.items():
        hparams, values = rows[f"{method} {name.rsplit('/', 1)[1]}"]
        assert hparams.keys() == {"dataset", "method", "kind", "seed", HYPER[method]}
        assert values["val/accuracy"] == pytest.approx(trial["epochs"][-1]["accuracy"], rel=1e-6)
    assert rows["hkd final seed0"][0]["T"] == best["hkd"]["T"] and rows["mfd final seed0"][0]["lam"] == pytest.approx(best["mfd"]["lam"])


def hparams_dashboard(logdir: Path) -> tuple[list[str], dict[str, tuple[dict, dict]]]:
    """The HParams plugin's own answers (its backend handlers, as the dashboard calls them): the
    hyperparameter columns in order, and per row (session group) its hyperparameters and metric values."""
    from google.protobuf import json_format
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, get_experiment, hparams_plugin, list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    backend = hparams_plugin.HParamsPlugin(base_plugin.TBContext(logdir=str(logdir), data_provider=provider))._context
    request = context.RequestContext()
    declared = get_experiment.Handler(request, backend, "", api_pb2.GetExperimentRequest()).run()
    query = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=1000, allowed_statuses=[api_pb2.STATUS_UNKNOWN])
    for info in declared.hparam_infos:
        query.col_params.add(hparam=info.name)
    for info in declared.metric_infos:
        query.col_params.add(metric=info.name)
    groups = list_session_groups.Handler(request, backend, "", query).run().session_groups
    rows = {
        g.name: ({k: json_format.MessageToDict(v) for k, v in g.hparams.items()}, {m.name.tag: m.value for m in g.metric_values})
        for g in groups
    }
    return [h.name for h in declared.hparam_infos], rows
