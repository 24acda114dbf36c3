import io
import math
from dataclasses import replace

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
    hyper = {**params, **{k: overrides.pop(k) for k in list(overrides) if k in HYPER}}
    return TrainConfig(method=method, epochs=epochs, batch_size=64, eval_batch_size=100, hyperparameters=hyper, **overrides)


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
    if "adversary" in trainer.trained:
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
    for name, term in straight.trained.items():  # AD's adversaries, their optimisers and schedulers
        assert str(term.state_dict()) == str(resumed.trained[name].state_dict())
        for a, b in zip(term.adversaries.state_dict().values(), resumed.trained[name].adversaries.state_dict().values()):
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
    adversary = trainer.trained["adversary"]
    assert isinstance(adversary.adversaries, losses.ClassAdversaries)
    assert len(adversary.optimizers) == 10 and all(o.param_groups[0]["lr"] == 3e-3 for o in adversary.optimizers)


# -- --compile --------------------------------------------------------------------------------


class _FailsInBackward(torch.autograd.Function):
    """Identity forward whose backward raises: a compiler that only breaks on the backward graph."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward compilation failed (simulated)")


def _broken_compile(where: str):
    def compile(model, **kwargs):
        if where == "at compile":
            raise RuntimeError("torch.compile is not supported on this Python (simulated)")

        def forward(x):
            if where == "in forward":
                raise RuntimeError("no working C++ compiler (simulated)")
            out = model(x)
            return out._replace(logits=_FailsInBackward.apply(out.logits))

        return forward

    return compile


@pytest.mark.parametrize("where", ["at compile", "in forward", "in backward"])
def test_failed_compile_warns_once_and_trains_exactly_as_eager(where, data, teacher, monkeypatch, caplog):
    eager = make_trainer("mfd", data, teacher).fit()
    monkeypatch.setattr(torch, "compile", _broken_compile(where))
    with caplog.at_level("WARNING", logger="fairtune.engine"):
        trainer = make_trainer("mfd", data, teacher, compile=True)
        history = trainer.fit()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "torch.compile failed" in warnings[0].getMessage()
    assert "simulated" in warnings[0].getMessage()
    assert history == eager  # the retried first step sees the same RNG draws


def test_compile_trains_the_student(data, teacher, caplog):
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this platform")
    with caplog.at_level("WARNING", logger="fairtune.engine"):
        trainer = make_trainer("mfd", data, teacher, epochs=1, compile=True)
        before = [p.detach().clone() for p in trainer.student.parameters()]
        history = trainer.fit()
    fell_back = any("torch.compile failed" in r.getMessage() for r in caplog.records)
    assert fell_back or trainer._train_forward is not trainer.student  # compiled, or said why not
    assert math.isfinite(history[-1]["train/loss"]) and math.isfinite(history[-1]["accuracy"])
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
    assert not any(k.startswith("_orig_mod") for k in trainer.state_dict()["student"])


@pytest.mark.parametrize("command", ["train", "search", "teacher"])
def test_compile_flag_reaches_the_train_config(command):
    from fairtune.cli import _train_config, build_parser

    argv = [command, "--dataset", "cifar10s", *(["--method", "mfd"] if command != "teacher" else [])]
    assert _train_config(build_parser().parse_args(argv), "mfd", {"lam": 1.0}).compile is False
    assert _train_config(build_parser().parse_args([*argv, "--compile"]), "mfd", {"lam": 1.0}).compile is True


# -- the teacher table ------------------------------------------------------------------------


def test_teacher_table_holds_the_teachers_outputs_for_both_flips(data, teacher):
    trainer = make_trainer("mfd", data, teacher)
    table = trainer.teacher_table
    n = len(data.train)
    assert table.shape == (2 * n, 10 + 256)
    source = trainer.train_source
    index = torch.tensor([0, 5, n - 1])
    images, _, _ = source.gather(index)
    for flip in (False, True):
        with torch.no_grad():
            out = trainer.teacher(source.train_batch(images, {"flip": torch.full((3,), flip)}))
        rows = table[index * 2 + int(flip)]
        torch.testing.assert_close(rows[:, :10], out.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rows[:, 10:], out.features, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["scratch", "mmd", "at", "nst", "ad+at"])
def test_no_teacher_table_without_a_teacher_or_for_feature_map_methods(method, data, teacher):
    assert make_trainer(method, data, teacher).teacher_table is None


def test_no_teacher_table_under_random_crops(data, teacher):
    from dataclasses import replace

    cropped = replace(data, info=replace(data.info, augment="resize_crop_flip"))  # a crop makes outputs per-draw
    assert make_trainer("mfd", cropped, teacher).teacher_table is None


@pytest.mark.parametrize("method", ["mfd", "fitnet", "ad+hkd"])
def test_training_from_the_table_matches_running_the_teacher(method, data, teacher):
    cached = make_trainer(method, data, teacher).fit()
    live = make_trainer(method, data, teacher)
    live.teacher_table = None  # run the teacher's forward in every step instead
    for a, b in zip(cached, live.fit()):
        for key in (k for k in a if k.startswith("train/")):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["mfd", "ad+hkd", "nst", "mmd"])
def test_training_steps_never_wait_for_the_gpu(method, data, teacher):
    """No .item(), no data-dependent shapes: every step only queues work (docs/performance.md, 'The GPU data path')."""
    needs = get_method(method).needs_teacher
    trainer = Trainer(config_for(method, epochs=1), data, teacher if needs else None, torch.device("cuda"))
    step = trainer._train_step

    def strict_step(*args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    trainer._train_step = strict_step
    assert math.isfinite(trainer.run_epoch()["train/loss"])


def test_continuing_from_the_shared_hint_stage_equals_a_trial_of_its_own(data, teacher, tmp_path):
    from fairtune.layout import SearchDir
    from fairtune.tune.trainable import TrialSpec, _start_after_hint_stage

    config = TrainConfig(method="fitnet", epochs=4, batch_size=64, eval_batch_size=100, hyperparameters={"T": 4.0})
    own = Trainer(config, data, teacher, DEVICE)
    own.fit()

    shared = Trainer(config.with_hyperparameters({"T": 2.0}), data, teacher, DEVICE)  # the stage is trained with another T
    while shared.epoch < shared.hint_epochs:
        shared.run_epoch()
    SearchDir(tmp_path).hint_stage_state.parent.mkdir(parents=True)
    torch.save(shared.state_dict(), SearchDir(tmp_path).hint_stage_state)
    torch.manual_seed(12345)  # the RNG must come from the stage's state, not from here
    trial = Trainer(config, data, teacher, DEVICE)
    spec = TrialSpec(config, data.options, "", str(tmp_path), 1)
    _start_after_hint_stage(spec, trial, {"T": 4.0})
    assert trial.epoch == config.hint_epochs == 2
    trial.fit()
    assert trial.history == own.history
    for a, b in zip(own.student.state_dict().values(), trial.student.state_dict().values()):
        assert torch.equal(a, b)

    other = Trainer(replace(config, lr=0.01), data, teacher, DEVICE)
    with pytest.raises(ValueError, match="other settings .*lr"):
        _start_after_hint_stage(spec, other, {"T": 4.0})
