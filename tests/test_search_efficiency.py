"""No config trained twice in a search, and FitNet's hint stage trained once per search: a grid for small
categorical spaces, repeats told the earlier result (the shared stage's exactness: tests/test_engine.py), in a
multi-objective study too."""

import json

import pytest

from fairtune.layout import SearchDir
from fairtune.spaces import SearchSpace
from fairtune.tune.ledger import Ledger
from tests.helpers import assert_search_consistent, epoch_runs, experiment


class ScriptedSampler:
    """Proposes values from a script (with repeats), as a sampler stuck on known values would."""

    def __new__(cls, script):
        import optuna

        class Sampler(optuna.samplers.RandomSampler):
            def sample_independent(self, study, trial, name, distribution):
                return script.pop(0) if script else super().sample_independent(study, trial, name, distribution)

        return Sampler(seed=0)


def test_a_repeated_proposal_is_never_trained_and_gets_the_earlier_result(tmp_path):
    import optuna

    from fairtune.tune.cluster import prepare_environment

    prepare_environment(None)
    from fairtune.tune.search import _ray_hooks, _reconcile

    space = SearchSpace("hkd", "T", "choice", values=(1, 2, 3, 4, 5, 10, 20), default=4)
    study = optuna.create_study(direction="maximize", sampler=ScriptedSampler([4, 4, 2, 4, 2, 10]))
    ledger = Ledger.create(tmp_path, {})
    LedgerSearcher, _, _ = _ray_hooks()
    searcher = LedgerSearcher(ledger, study, space, 3, "max")
    first = searcher.suggest("a")
    ledger.record_epoch(first["fairtune_trial"], {"epoch": 1, "objective": 40.0, "accuracy": 50.0, "deo_a": 10.0, "deo_m": 20.0})
    ledger.finish(first["fairtune_trial"], "COMPLETED")
    second, third = searcher.suggest("b"), searcher.suggest("c")
    assert [first["T"], second["T"], third["T"]] == [4, 2, 10]
    assert searcher.suggest("d") == "FINISHED"
    assert [r["same_as"] for r in ledger.repeats] == ["t000", "t000", "t001"]
    states = {t.number: (t.state.name, t.value) for t in study.trials}
    assert states[1] == ("COMPLETE", 40.0) and states[3] == ("COMPLETE", 40.0)  # repeats of t000: its result
    assert states[4][0] == "RUNNING"  # a repeat of t001, still running: told when it finishes
    ledger.record_epoch("t001", {"epoch": 1, "objective": 30.0, "accuracy": 40.0, "deo_a": 10.0, "deo_m": 20.0}, stopped=True)
    _reconcile(study, ledger)  # as a resume does
    assert study.trials[2].state.name == study.trials[4].state.name == "PRUNED"  # t001 and its repeat, once each


def test_a_multi_objective_study_is_told_both_values_and_never_intermediate_ones(tmp_path):
    import optuna

    from fairtune.tune.cluster import prepare_environment

    prepare_environment(None)
    from fairtune.tune.search import _open_study, _ray_hooks, _reconcile

    space = SearchSpace("hkd", "T", "choice", values=(1, 2, 3, 4, 5, 10, 20), default=4)
    created = _open_study(tmp_path, space, "acc,deo_a", 0, "fmnist-s", grid=False)  # T=4 enqueued first
    assert [d.name for d in created.directions] == ["MAXIMIZE", "MINIMIZE"]
    storage = f"sqlite:///{SearchDir(tmp_path).study}"
    study = optuna.load_study(study_name="search", storage=storage, sampler=ScriptedSampler([4, 2]))
    ledger = Ledger.create(tmp_path, {})
    LedgerSearcher, _, _ = _ray_hooks()
    searcher = LedgerSearcher(ledger, study, space, 2, "max")
    first = searcher.suggest("a")
    for epoch, accuracy in ((1, 50.0), (2, 55.5)):
        ledger.record_epoch(first["fairtune_trial"], {"epoch": epoch, "objective": accuracy - 10.25, "accuracy": accuracy, "deo_a": 10.25, "deo_m": 20.0})
    ledger.finish(first["fairtune_trial"], "COMPLETED")  # the driver is killed before Optuna is told
    second = searcher.suggest("b")  # Optuna repeats T=4 (told t000's result at once), then proposes 2
    assert [first["T"], second["T"]] == [4, 2] and ledger.repeats == [{"optuna_number": 1, "same_as": "t000"}]
    ledger.record_epoch("t001", {"epoch": 1, "objective": 30.0, "accuracy": 40.0, "deo_a": 10.0, "deo_m": 20.0}, stopped=True)
    lost = study.ask()  # a suggestion the kill kept from the ledger
    resumed = optuna.load_study(study_name="search", storage=storage)
    _reconcile(resumed, ledger)  # as a resume does
    told = {t.number: (t.state.name, t.values, t.intermediate_values) for t in resumed.trials}
    assert told[0] == told[1] == ("COMPLETE", [55.5, 10.25], {})  # t000 and its repeat: accuracy and DEO_A
    assert told[2] == ("PRUNED", None, {})  # stopped by ASHA
    assert told[lost.number][0] == "FAIL" and told[lost.number + 1][0] == "WAITING"  # its proposal queued again


SIZES = ["--train-size", "300", "--eval-size", "100", "--batch-size", "40", "--cpus-per-trial", "1", "--gpus-per-trial", "0"]


@pytest.mark.slow
def test_fitnet_grid_search_trains_each_T_once_and_the_hint_stage_once(ray_session, tmp_path, capsys):
    from fairtune.cli import main
    from tests.fixtures.idx import write_fashion_mnist

    data_dir, results, spaces = tmp_path / "data", tmp_path / "results", tmp_path / "spaces"
    write_fashion_mnist(data_dir, n_train_per_class=520, n_test_per_class=20)
    spaces.mkdir()
    (spaces / "fitnet.yaml").write_text("method: fitnet\nparameter: T\ndistribution: choice\nvalues: [2, 4, 10]\ndefault: 4\n")
    argv = ["search", "--dataset", "fmnist-s", "--method", "fitnet", "--epochs", "2", "--num-samples", "5",
            "--grace-period", "2", "--search-spaces", str(spaces), "--data-dir", str(data_dir), "--results-dir", str(results), *SIZES]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "T takes 3 values, no more than --num-samples 5: running each once" in out
    folder = experiment(results, "fitnet")
    trials = assert_search_consistent(folder, 3, 3, shared_hint_epochs=1)
    assert trials["T"].tolist() == [4, 2, 10]  # the paper's value first, then the others in order
    assert [r["epoch"] for r in epoch_runs(folder, "hint-stage")] == [1]  # stage 1 ran once
    for trial_id in trials["trial_id"]:
        assert [r["epoch"] for r in epoch_runs(folder, trial_id)] == [2, 3]
    budget = json.loads((folder / "best.json").read_text())["budget"]
    assert budget["grid"] is True and budget["trials"] == 3
    assert budget["epochs_run"] == 9 and budget["epochs_computed"] == 7  # 3 × (1 + 2), the hint epoch once
