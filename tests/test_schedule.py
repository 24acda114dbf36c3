"""ASHA's rungs per method (fairtune.schedule), cross-checked against Ray Tune's own ASHAScheduler."""

from types import SimpleNamespace

import pytest

from fairtune.engine import TrainConfig
from fairtune.schedule import STAGE2_EPOCH, asha_milestones, asha_plan, stage2_epoch


def plan_for(method: str, epochs: int, grace: int | None = None, rf: int = 3):
    config = TrainConfig(method=method, epochs=epochs)
    return config, asha_plan(config.epochs, config.hint_epochs, grace, rf)


def judged_epochs(scheduler_kwargs: dict, total_epochs: int, hint_epochs: int, trials: int = 5) -> dict[int, list[int]]:
    """Drive Ray's real ASHAScheduler with a run's per-epoch results (as the trainable reports them)
    and return, per trial, the trial epochs at which ASHA recorded it in a rung or stopped it.

    Each later trial scores better than all before it, so none is stopped at a rung and the first
    walks through every rung; the epochs are where the scheduler looked, whatever it decided.
    """
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    scheduler = ASHAScheduler(metric="objective", mode="max", **scheduler_kwargs)
    bracket = None
    judged: dict[int, list[int]] = {}
    for i in range(trials):
        trial = SimpleNamespace(trial_id=f"t{i}")
        scheduler.on_trial_add(None, trial)
        bracket = scheduler._trial_info[trial.trial_id]
        for epoch in range(1, total_epochs + 1):
            result = {"training_iteration": epoch, STAGE2_EPOCH: stage2_epoch(epoch, hint_epochs), "objective": float(i)}
            seen = sum(trial.trial_id in recorded for _, recorded in bracket._rungs)
            action = scheduler.on_trial_result(None, trial, result)
            if sum(trial.trial_id in recorded for _, recorded in bracket._rungs) > seen or action == TrialScheduler.STOP:
                judged.setdefault(i, []).append(epoch)
            if action == TrialScheduler.STOP:
                break
    return judged


@pytest.mark.parametrize("grace, max_t, rf", [(5, 50, 3), (1, 4, 3), (1, 10, 2), (3, 75, 3), (30, 75, 3), (1, 243, 3), (2, 100, 4)])
def test_milestones_are_rays(grace, max_t, rf):
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(metric="objective", mode="max", grace_period=grace, max_t=max_t, reduction_factor=rf)
    assert asha_milestones(grace, max_t, rf) == sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs)


def test_fitnet_gets_as_many_rungs_after_its_hint_stage_as_hkd_over_its_run():
    hkd, hkd_plan = plan_for("hkd", 50)
    fitnet, fitnet_plan = plan_for("fitnet", 50)
    assert (hkd.total_epochs, fitnet.total_epochs, fitnet.hint_epochs) == (50, 75, 25)
    assert hkd_plan.rung_epochs == [5, 15, 45]
    assert fitnet_plan.rung_epochs == [30, 40, 70]  # 5, 15, 45 epochs into stage 2
    # the old rule (training_iteration, grace shifted by the hint stage) had a single rung for FitNet
    assert asha_milestones(5 + 25, 75, 3) == [30]
    # the demo: E=4, --grace-period 1
    assert plan_for("hkd", 4, grace=1)[1].rung_epochs == [1, 3]
    assert plan_for("ss+fitnet", 4, grace=1)[1].rung_epochs == [3, 5]
    assert asha_milestones(1 + 2, 6, 3) == [3]  # the old rule, demo sizes


@pytest.mark.parametrize("method, epochs, grace", [("hkd", 50, None), ("fitnet", 50, None), ("ss+fitnet", 4, 1), ("mfd", 4, 1), ("fitnet", 20, 1)])
def test_rays_scheduler_judges_at_the_planned_epochs_and_never_in_the_hint_stage(method, epochs, grace):
    config, plan = plan_for(method, epochs, grace)
    kwargs = dict(time_attr=plan.time_attr, max_t=plan.max_t, grace_period=plan.grace_period, reduction_factor=plan.reduction_factor)
    judged = judged_epochs(kwargs, config.total_epochs, config.hint_epochs)
    assert judged[0] == [*plan.rung_epochs, config.total_epochs]  # every rung, then the stop at the last epoch
    assert min(e for epochs_ in judged.values() for e in epochs_) > config.hint_epochs
    plain, plain_plan = plan_for("hkd", epochs, grace)
    assert len(plan.rung_epochs) == len(plain_plan.rung_epochs)


def test_engine_reports_the_stage2_clock(tmp_path):
    from fairtune.engine import Trainer
    from fairtune.models import build_model
    from tests.fixtures.synthetic import tiny_splits

    data = tiny_splits(n_train=64, n_eval=40)
    teacher = build_model("cnn", 10, 32).eval()
    history = Trainer(TrainConfig(method="fitnet", epochs=2, hyperparameters={"T": 4.0}, batch_size=32), data, teacher).fit()
    assert [m[STAGE2_EPOCH] for m in history] == [0, 1, 2] and [m["stage"] for m in history] == ["hint", "main", "main"]
    history = Trainer(TrainConfig(method="mfd", epochs=2, hyperparameters={"lam": 1.0}, batch_size=32), data, teacher).fit()
    assert [m[STAGE2_EPOCH] for m in history] == [1, 2]
