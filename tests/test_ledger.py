"""The search ledger on its own: records, the settings a resume must match, the trials table, and ASHA's
rungs rebuilt from it deciding exactly as an ASHA that never stopped."""

import json
import random

import pytest

from fairtune.errors import UserError
from fairtune.tune.ledger import COMPLETED, RUNNING, STOPPED, Ledger, differences, trials_table


def _epoch(epoch: int, objective: float) -> dict:
    return {"epoch": epoch, "accuracy": objective + 10, "deo_a": 10.0, "deo_m": 20.0, "objective": objective,
            "loss": 1.0, "acc_matrix": "[[1]]", "lr": 0.1, "train/ce": 2.0}


def test_records_are_written_atomically_and_read_back(tmp_path):
    ledger = Ledger.create(tmp_path, {"num_samples": 2})
    first = ledger.add({"lam": 0.5}, 0)
    assert first.id == "t000" and ledger.add({"lam": 2.0}, 1).id == "t001"
    assert ledger.record_epoch("t000", _epoch(1, 50.0)) is True
    assert ledger.record_epoch("t000", _epoch(1, 51.0)) is False  # a re-reported epoch replaces its record
    ledger.record_epoch("t001", _epoch(1, 40.0), stopped=True)
    ledger.record_epoch("t000", _epoch(2, 55.0))
    ledger.finish("t000", COMPLETED)
    ledger.finish("t001", COMPLETED)  # a decision already taken stays
    again = Ledger.load(tmp_path)
    assert [(t.id, t.status, t.epochs_run) for t in again.trials] == [("t000", COMPLETED, 2), ("t001", STOPPED, 1)]
    assert again.get("t000").epochs[0]["objective"] == 51.0 and "lr" not in again.get("t000").epochs[0]
    assert again.complete(2) and not again.complete(3)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_session_time_adds_up_over_sessions(tmp_path):
    ledger = Ledger.create(tmp_path, {})
    ledger.seconds_before = 12.0
    ledger.save()
    again = Ledger.load(tmp_path)
    again.begin_session()
    assert again.sessions == 2 and 12.0 <= again.seconds < 13.0


@pytest.mark.parametrize("content", ["", "{", "[]", '{"format": 1}', '{"format": 99, "trials": []}'])
def test_an_unreadable_ledger_is_a_one_line_error(tmp_path, content):
    (tmp_path / "ledger.json").write_text(content)
    with pytest.raises(UserError, match="cannot read the search record .*delete the folder"):
        Ledger.load(tmp_path)


def test_differences_walks_nested_settings():
    old = {"train": {"epochs": 1, "lr": 0.001}, "num_samples": 2, "space": {"values": [1, 2]}}
    new = {"train": {"epochs": 2, "lr": 0.001}, "num_samples": 3, "space": {"values": [1, 2]}}
    assert differences(old, new) == [("num_samples", 2, 3), ("train.epochs", 1, 2)]
    assert differences(old, old) == []


def test_trials_table_takes_final_and_best_epochs(tmp_path):
    ledger = Ledger.create(tmp_path, {})
    ledger.add({"T": 2}, 0)
    for epoch, objective in [(1, 10.0), (2, 30.0), (3, 20.0)]:
        ledger.record_epoch("t000", _epoch(epoch, objective))
    ledger.finish("t000", COMPLETED)
    ledger.add({"T": 4}, 1)
    row = trials_table(ledger, "T", "acc").iloc[0]
    assert (row["final_objective"], row["best_objective"], row["best_epoch"], row["epochs_run"]) == (20.0, 30.0, 2, 3)
    assert trials_table(ledger, "T", "deo_a").iloc[0]["best_epoch"] == 1  # minimised objectives pick the lowest
    assert trials_table(ledger, "T", "acc").iloc[1]["status"] == RUNNING


def test_trials_table_names_the_nodes_each_trial_ran_on(tmp_path):
    ledger = Ledger.create(tmp_path, {})
    ledger.add({"T": 2}, 0)
    head, worker = {"id": "aa11", "hostname": "head"}, {"id": "bb22", "hostname": "gpu-7"}
    for epoch, node in [(1, worker), (2, head), (3, worker)]:  # retried on the head, then back
        ledger.record_epoch("t000", {**_epoch(epoch, 10.0), "node": node})
    ledger.add({"T": 4}, 1)
    ledger.record_epoch("t001", {**_epoch(1, 5.0), "node": worker})
    ledger.add({"T": 8}, 2)  # never reported an epoch
    assert Ledger.load(tmp_path).get("t000").epochs[1]["node"] == head
    table = trials_table(ledger, "T", "acc")
    assert table["node"].tolist()[:2] == ["bb22 aa11", "bb22"]
    assert table["hostname"].tolist()[:2] == ["gpu-7 head", "gpu-7"]
    assert table["node"].isna().tolist() == [False, False, True]
    # Appended after the existing columns: readers that index the older ones see them unchanged.
    assert table.columns.tolist()[-2:] == ["node", "hostname"]


def test_rebuilt_asha_rungs_decide_as_an_uninterrupted_asha(tmp_path):
    """Feed one ASHA every result of a random search; feed another only the results after a cut, with
    the earlier ones restored from the ledger. Every later decision must be the same."""
    from fairtune.tune.cluster import prepare_environment

    prepare_environment(None)
    from ray.tune.schedulers import ASHAScheduler

    from fairtune.tune.search import _ray_hooks
    from fairtune.tune.ledger import TRIAL_KEY

    _, LedgerASHA, _ = _ray_hooks()
    rng = random.Random(7)
    results = []  # (trial, epoch, objective) in arrival order: trials interleaved as in a real search
    progress = {f"t{i:03d}": 0 for i in range(16)}
    while any(e < 9 for e in progress.values()):
        started = list(progress)[: 1 + len(results) // 4]  # trials start one after another, as slots free up
        trial = rng.choice([t for t in started if progress[t] < 9])
        progress[trial] += 1
        results.append((trial, progress[trial], rng.uniform(0, 100)))

    class FakeTrial:
        def __init__(self, trial_id):
            self.trial_id = trial_id
            self.config = {TRIAL_KEY: trial_id}

    kwargs = dict(metric="objective", mode="max", time_attr="epoch", max_t=9, grace_period=1, reduction_factor=3)
    plain = ASHAScheduler(**kwargs)
    cut = len(results) // 2
    ledger = Ledger.create(tmp_path, {})
    stopped: set[str] = set()
    decisions = []
    for trial in progress:
        plain.on_trial_add(None, FakeTrial(trial))
        ledger.add({}, None)
    for index, (trial, epoch, objective) in enumerate(results):
        if trial in stopped:
            continue
        decision = plain.on_trial_result(None, FakeTrial(trial), {"epoch": epoch, "objective": objective})
        if index < cut:
            ledger.record_epoch(trial, _epoch(epoch, objective), stopped=decision == "STOP" and epoch < 9)
        else:
            decisions.append((trial, epoch, decision))
        if decision == "STOP":
            stopped.add(trial)
    assert any(d == "STOP" for _, e, d in decisions if e < 9)  # the check has teeth

    restored = LedgerASHA(ledger, **kwargs)
    for trial in ledger.trials:
        if trial.status == RUNNING:
            restored.on_trial_add(None, FakeTrial(trial.id))
    replayed = []
    gone = {t.id for t in ledger.trials if t.status == STOPPED}
    for trial, epoch, objective in results[cut:]:
        if trial in gone:
            continue
        decision = restored.on_trial_result(None, FakeTrial(trial), {"epoch": epoch, "objective": objective})
        replayed.append((trial, epoch, decision))
        if decision == "STOP":
            gone.add(trial)
    assert replayed == decisions
    assert json.loads((tmp_path / "ledger.json").read_text())["format"] == 1
