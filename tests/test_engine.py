import io
import math

import pytest
import torch

from fairtune import losses
from fairtune.engine import NonFiniteLoss, Trainer, TrainConfig
from fairtune.methods import get_method
from fairtune.models import build_model
from tests.fixtures.synthetic import tiny_splits

DEVICE = torch.device("cpu")
HYPER = {"T": 3.0, "lam": 0.5, "distill_lam": 0.5}
METHODS = ["scratch", "hkd", "fitnet", "at", "nst", "ss", "ad", "ss+hkd", "ss+fitnet", "ad+hkd", "ad+fitnet", "mfd", "mmd", "ad+at"]
EXPECTED_TERMS = {
    "scratch": {"ce"}, "hkd": {"ce", "hkd"}, "fitnet": {"ce", "hkd"}, "at": {"ce", "at"}, "nst": {"ce", "nst"},
    "ss": {"ce"}, "ad": {"ce", "adversary"}, "ss+hkd": {"ce", "hkd"}, "ss+fitnet": {"ce", "hkd"},
    "ad+hkd": {"ce", "hkd", "adversary"}, "ad+fitnet": {"ce", "hint", "hkd", "adversary"}, "mfd": {"ce", "mfd"},
    "mmd": {"ce", "mmd"}, "ad+at": {"ce", "at", "adversary"},
}


@pytest.fixture(scope="module")
def data():
    return tiny_splits(size=16)


@pytest.fixture(scope="module")
def teacher(data):
    torch.manual_seed(99)
    return build_model("cnn", data.info.num_classes, 16).eval().requires_grad_(False)


def config_for(method: str, epochs: int = 2, **overrides) -> TrainConfig:
    params = {p: HYPER[p] for p in get_method(method).params}
    return TrainConfig(method=method, epochs=epochs, batch_size=64, eval_batch_size=100, **{**params, **overrides})


def make_trainer(method, data, teacher, **overrides):
    needs = get_method(method).needs_teacher
    return Trainer(config_for(method, **overrides), data, teacher if needs else None, DEVICE)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_for_real(method, data, teacher):
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = make_trainer(method, data, teacher)
    student_before = [p.detach().clone() for p in trainer.student.parameters()]
    history = trainer.fit()
    main_epochs = [m for m in history if m["stage"] == "main"]
    assert len(main_epochs) == 2
    terms = {k[6:] for k in main_epochs[-1] if k.startswith("train/") and k != "train/loss"}
    assert terms == EXPECTED_TERMS[method]
    for m in history:
        for key in ("accuracy", "deo_a", "deo_m", "objective", "loss", *[f"train/{t}" for t in terms if m["stage"] == "main"]):
            assert math.isfinite(m[key]), (method, key, m[key])
        assert len(m["acc_matrix"]) == 2 and len(m["acc_matrix"][0]) == 10
    changed = [not torch.equal(a, b) for a, b in zip(student_before, trainer.student.parameters())]
    assert all(changed), f"{method}: {changed.count(False)} parameter tensors never changed"
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"{method} changed the teacher's {k}"
    if get_method(method).adversary:
        assert len(history[-1]["adversary_loss"]) == 10


def test_fitnet_hint_stage_then_ce_plus_kd(data, teacher):
    trainer = make_trainer("fitnet", data, teacher, epochs=4)
    history = trainer.fit()
    assert [m["stage"] for m in history] == ["hint"] * 2 + ["main"] * 4
    for m in history[:2]:
        assert {k for k in m if k.startswith("train/")} == {"train/loss", "train/hint"}
        assert m["lr"] == 1e-3
    # λ_h annealed linearly 4 -> 1 over stage 2's E epochs
    assert [m["kd_weight"] for m in history[2:]] == pytest.approx([4.0, 3.0, 2.0, 1.0])
    assert trainer.total_epochs == 6


def test_hint_stage_leaves_the_classifier_untouched(data, teacher):
    trainer = make_trainer("fitnet", data, teacher, epochs=2)
    head = trainer.student.head.weight.detach().clone()
    trainer.run_epoch()
    assert torch.equal(head, trainer.student.head.weight)
    trainer.run_epoch()
    assert not torch.equal(head, trainer.student.head.weight)


def test_hkd_annealing_values(data, teacher):
    history = make_trainer("hkd", data, teacher, epochs=3).fit()
    assert [m["kd_weight"] for m in history] == pytest.approx([4.0, 2.5, 1.0])


def test_same_seed_same_metrics(data, teacher):
    a = make_trainer("mfd", data, teacher).fit()
    b = make_trainer("mfd", data, teacher).fit()
    assert a == b


@pytest.mark.parametrize("method", ["mfd", "ad", "fitnet", "ad+fitnet"])
def test_resume_mid_run_equals_uninterrupted(method, data, teacher):
    straight = make_trainer(method, data, teacher, epochs=2)
    straight.fit()

    first = make_trainer(method, data, teacher, epochs=2)
    first.run_epoch()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    torch.manual_seed(12345)  # the global RNG must come from the checkpoint, not from here
    resumed = make_trainer(method, data, teacher, epochs=2)
    resumed.load_state_dict(state)
    resumed.fit()
    assert resumed.history == straight.history
    for a, b in zip(straight.student.state_dict().values(), resumed.student.state_dict().values()):
        assert torch.equal(a, b)
    if straight.adversaries is not None:
        for a, b in zip(straight.adversaries.state_dict().values(), resumed.adversaries.state_dict().values()):
            assert torch.equal(a, b)


def test_checkpoint_from_another_config_is_refused(data, teacher):
    state = make_trainer("mfd", data, teacher).state_dict()
    other = make_trainer("mfd", data, teacher, lam=2.0)
    with pytest.raises(ValueError, match="configuration"):
        other.load_state_dict(state)


def test_corrupted_teacher_stops_with_a_reason(data, teacher):
    broken = build_model("cnn", 10, 16)
    with torch.no_grad():
        for p in broken.parameters():
            p.fill_(float("nan"))
    trainer = Trainer(config_for("mfd"), data, broken.eval(), DEVICE)
    with pytest.raises(NonFiniteLoss, match="epoch 1.*mfd=nan"):
        trainer.run_epoch()


def test_plateau_scheduler_follows_selection_loss(data, teacher):
    trainer = make_trainer("scratch", data, teacher, epochs=3, plateau_patience=0)
    history = trainer.fit()
    # patience 0: any epoch whose selection CE does not improve cuts the lr by 10
    best = math.inf
    lr = 1e-3
    for m in history:
        if m["loss"] < best * (1 - 1e-4):
            best = m["loss"]
        else:
            lr *= 0.1
        assert m["lr"] == pytest.approx(lr)


def test_each_adversary_has_its_own_optimiser_at_the_supplement_lr(data):
    trainer = make_trainer("ad", data, None)
    assert isinstance(trainer.adversaries, losses.ClassAdversaries)
    assert len(trainer.adv_optimizers) == 10 and all(o.param_groups[0]["lr"] == 3e-3 for o in trainer.adv_optimizers)
