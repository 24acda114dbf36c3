"""fairtune.losses against independent, deliberately slow formulations (loops per class, group,
sample, channel), in float64: values and student gradients to 1e-5; teachers never get a gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fairtune.losses import (
    ClassAdversaries,
    ad_loss,
    at_loss,
    grad_reverse,
    hint_loss,
    hkd_loss,
    hkd_weight,
    mfd_loss,
    mmd_loss,
    nst_loss,
)

TOL = dict(rtol=1e-5, atol=1e-5)
NUM_CLASSES, NUM_GROUPS = 4, 4


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def leaf(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=gen(seed), dtype=torch.float64)).requires_grad_()


def student_grad(loss_fn, student: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss value, d loss / d student) with a fresh graph."""
    s = student.detach().clone().requires_grad_()
    value = loss_fn(s, *others)
    (grad,) = torch.autograd.grad(value, s)
    return value.detach(), grad


def assert_matches(fast, slow, student: torch.Tensor, *others: torch.Tensor) -> None:
    v_fast, g_fast = student_grad(fast, student, *others)
    v_slow, g_slow = student_grad(slow, student, *others)
    torch.testing.assert_close(v_fast, v_slow, **TOL)
    torch.testing.assert_close(g_fast, g_slow, **TOL)


def assert_teacher_untouched(loss_fn, student: torch.Tensor, teacher: torch.Tensor) -> None:
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_()
    loss_fn(s, t).backward()
    assert t.grad is None
    assert s.grad is not None


@pytest.fixture
def skewed_cells() -> tuple[torch.Tensor, torch.Tensor]:
    """Labels/groups over 4 classes × 4 groups with empty cells; class 3 is absent entirely."""
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0, 1, 2, 0])
    groups = torch.tensor([0, 0, 1, 2, 3, 3, 0, 0, 0, 2, 2, 3, 3, 1, 1, 0, 3, 1, 1, 0, 3, 2])
    return labels, groups


# ------------------------------------------------------------------------------- plain references


def ref_hkd(s: torch.Tensor, t: torch.Tensor, T: float, weight: float) -> torch.Tensor:
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        p_t = torch.softmax(t[i].detach() / T, dim=0)
        p_s = torch.softmax(s[i] / T, dim=0)
        total = total + (p_t * (p_t.log() - p_s.log())).sum()
    return weight * T**2 * total / s.shape[0]


def ref_hint(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s, t = s.reshape(s.shape[0], -1), t.detach().reshape(t.shape[0], -1)
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        for d in range(s.shape[1]):
            total = total + (s[i, d] - t[i, d]) ** 2
    return 0.5 * total / s.numel()


def ref_at(s: torch.Tensor, t: torch.Tensor, lam: float) -> torch.Tensor:
    t = t.detach()
    total = s.new_zeros(())
    count = 0
    for i in range(s.shape[0]):
        qs = sum(s[i, c] ** 2 for c in range(s.shape[1])).reshape(-1) / s.shape[1]
        qt = sum(t[i, c] ** 2 for c in range(t.shape[1])).reshape(-1) / t.shape[1]
        qs = qs / torch.clamp(qs.norm(), min=1e-12)
        qt = qt / torch.clamp(qt.norm(), min=1e-12)
        total = total + ((qs - qt) ** 2).sum()
        count += qs.numel()
    return lam * 0.5 * total / count


def ref_nst(s: torch.Tensor, t: torch.Tensor, lam: float) -> torch.Tensor:
    t = t.detach()
    B, C = s.shape[:2]

    def unit(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1)
        return x / torch.clamp(x.norm(), min=1e-12)

    k_tt = k_ss = k_ts = s.new_zeros(())
    for b in range(B):
        for i in range(C):
            for j in range(C):
                ti, tj, si, sj = unit(t[b, i]), unit(t[b, j]), unit(s[b, i]), unit(s[b, j])
                k_tt = k_tt + torch.dot(ti, tj) ** 2
                k_ss = k_ss + torch.dot(si, sj) ** 2
                k_ts = k_ts + torch.dot(ti, sj) ** 2
    n = B * C * C
    return lam * (k_tt / n + k_ss / n - 2 * k_ts / n)


def ref_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.unsqueeze(1) - b.unsqueeze(0)) ** 2).sum(-1).clamp(min=1e-12)


def ref_mfd(s, t, labels, groups, num_classes, num_groups, lam, sigma=1.0):
    """The official MMDLoss.forward per-cell loop, with boolean masks."""
    student = s.reshape(s.shape[0], -1)
    teacher = t.reshape(t.shape[0], -1).detach()
    with torch.no_grad():
        sigma_avg = ref_sq_dists(teacher, student).mean()

    def kernel(a, b):
        return torch.exp(-ref_sq_dists(a, b) / (2 * sigma * sigma_avg))

    total = s.new_zeros(())
    for c in range(num_classes):
        if (labels == c).sum() == 0:
            continue
        for g in range(num_groups):
            cell = (labels == c) & (groups == g)
            if cell.sum() == 0:
                continue
            t_c, s_cg = teacher[labels == c], student[cell]
            total = total + kernel(t_c, t_c).mean() + kernel(s_cg, s_cg).mean() - 2 * kernel(t_c, s_cg).mean()
    return 0.5 * lam * total


def ref_mmd(s, labels, groups, num_classes, num_groups, lam, sigma=1.0):
    """The official scratch_mmd MMDLoss.forward per-cell loop."""
    student = s.reshape(s.shape[0], -1)
    total = s.new_zeros(())
    for c in range(num_classes):
        anchor = student[labels == c].detach()
        for g in range(num_groups):
            cell = (labels == c) & (groups == g)
            if cell.sum() == 0:
                continue
            s_cg = student[cell]
            sigma_avg = ref_sq_dists(anchor, s_cg).mean().detach()

            def kernel(a, b):
                return torch.exp(-ref_sq_dists(a, b) / (2 * sigma**2 * sigma_avg))

            mmd2 = kernel(anchor, anchor).mean() + kernel(s_cg, s_cg).mean() - 2 * kernel(anchor, s_cg).mean()
            total = total + torch.clamp(mmd2, min=0.0)
    return lam * total / (2 * num_groups)


# ---------------------------------------------------------------------------------------- HKD


@pytest.mark.parametrize(
    ("epoch", "expected"), [(0, 4.0), (1, 3.25), (2, 2.5), (3, 1.75), (4, 1.0)]
)
def test_hkd_weight_anneals_4_to_1(epoch, expected):
    assert hkd_weight(epoch, 5) == pytest.approx(expected)


def test_hkd_weight_single_epoch():
    assert hkd_weight(0, 1) == 4.0


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_hkd_matches_explicit_kl(T):
    s, t = leaf(8, 5, seed=1, scale=3), leaf(8, 5, seed=2, scale=3)
    assert_matches(
        lambda s_, t_: hkd_loss(s_, t_, T, weight=2.5), lambda s_, t_: ref_hkd(s_, t_, T, 2.5), s, t
    )
    assert_teacher_untouched(lambda s_, t_: hkd_loss(s_, t_, T), s, t)


def test_hkd_zero_when_logits_agree():
    t = leaf(6, 4, seed=3)
    assert hkd_loss(t.detach(), t, 3.0).abs() < 1e-12


# ------------------------------------------------------------------------------- hint, AT, NST


def test_hint_matches_loop_and_flattens():
    s, t = leaf(5, 3, 2, 2, seed=4), leaf(5, 3, 2, 2, seed=5)
    assert_matches(hint_loss, ref_hint, s, t)
    assert_teacher_untouched(hint_loss, s, t)


def test_at_matches_loop():
    s, t = leaf(3, 4, 5, 6, seed=6), leaf(3, 4, 5, 6, seed=7)
    assert_matches(lambda a, b: at_loss(a, b, 0.7), lambda a, b: ref_at(a, b, 0.7), s, t)
    assert_teacher_untouched(lambda a, b: at_loss(a, b, 0.7), s, t)


def test_at_zero_map_is_finite():
    s = torch.zeros(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    t = leaf(2, 3, 4, 4, seed=8)
    loss = at_loss(s, t, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_nst_matches_per_channel_pair_loop():
    s, t = leaf(3, 4, 3, 3, seed=9), leaf(3, 4, 3, 3, seed=10)
    assert_matches(lambda a, b: nst_loss(a, b, 1.3), lambda a, b: ref_nst(a, b, 1.3), s, t)
    assert_teacher_untouched(lambda a, b: nst_loss(a, b, 1.3), s, t)


# --------------------------------------------------------------------------------------- MFD


@pytest.mark.parametrize("sigma", [1.0, 0.6])
def test_mfd_matches_official_loop(skewed_cells, sigma):
    labels, groups = skewed_cells
    s, t = leaf(len(labels), 6, seed=11), leaf(len(labels), 6, seed=12)
    kw = dict(labels=labels, groups=groups, num_classes=NUM_CLASSES, num_groups=NUM_GROUPS, lam=3.0, sigma=sigma)
    assert_matches(lambda a, b: mfd_loss(a, b, **kw), lambda a, b: ref_mfd(a, b, **kw), s, t)
    assert_teacher_untouched(lambda a, b: mfd_loss(a, b, **kw), s, t)


def test_mfd_flattens_feature_maps(skewed_cells):
    labels, groups = skewed_cells
    s, t = leaf(len(labels), 2, 2, 2, seed=13), leaf(len(labels), 2, 2, 2, seed=14)
    kw = dict(labels=labels, groups=groups, num_classes=NUM_CLASSES, num_groups=NUM_GROUPS, lam=1.0)
    assert_matches(lambda a, b: mfd_loss(a, b, **kw), lambda a, b: ref_mfd(a, b, **kw), s, t)


def test_mfd_float32_close_to_float64(skewed_cells):
    labels, groups = skewed_cells
    s, t = leaf(len(labels), 6, seed=15), leaf(len(labels), 6, seed=16)
    kw = dict(labels=labels, groups=groups, num_classes=NUM_CLASSES, num_groups=NUM_GROUPS, lam=1.0)
    low = mfd_loss(s.detach().float(), t.detach().float(), **kw)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), ref_mfd(s, t, **kw).detach(), rtol=1e-4, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 10),
    num_classes=st.integers(1, 3),
    num_groups=st.integers(1, 4),
    dim=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_mfd_property_matches_loop(data, batch, num_classes, num_groups, dim, seed):
    labels = torch.tensor(data.draw(st.lists(st.integers(0, num_classes - 1), min_size=batch, max_size=batch)))
    groups = torch.tensor(data.draw(st.lists(st.integers(0, num_groups - 1), min_size=batch, max_size=batch)))
    s, t = leaf(batch, dim, seed=seed), leaf(batch, dim, seed=seed + 1)
    kw = dict(labels=labels, groups=groups, num_classes=num_classes, num_groups=num_groups, lam=0.5)
    assert_matches(lambda a, b: mfd_loss(a, b, **kw), lambda a, b: ref_mfd(a, b, **kw), s, t)


# ---------------------------------------------------------------------------- teacherless mmd


@pytest.mark.parametrize("sigma", [1.0, 0.6])
def test_mmd_matches_official_loop(skewed_cells, sigma):
    labels, groups = skewed_cells
    s = leaf(len(labels), 6, seed=17)
    kw = dict(labels=labels, groups=groups, num_classes=NUM_CLASSES, num_groups=NUM_GROUPS, lam=2.0, sigma=sigma)
    assert_matches(lambda a: mmd_loss(a, **kw), lambda a: ref_mmd(a, **kw), s)


def test_mmd_single_group_class_contributes_nothing():
    # With one PSD kernel per cell the biased MMD² is a squared RKHS norm: it cannot go negative,
    # so max(0, ·) only ever clips rounding noise. Where a class lives in a single group,
    # S_c = S_cg and the term is (numerically) zero, never negative.
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    groups = torch.tensor([2, 2, 2, 0, 0, 0, 0])
    s = leaf(len(labels), 5, seed=18)
    loss = mmd_loss(s, labels, groups, num_classes=2, num_groups=4, lam=1.0)
    loss.backward()
    assert 0.0 <= loss.item() < 1e-12
    assert s.grad.abs().max() < 1e-10


# ------------------------------------------------------------------------- adversarial debiasing


@pytest.mark.parametrize("lam", [0.5, 3.0])
def test_grad_reverse_identity_forward_scaled_negated_backward(lam):
    x = leaf(4, 3, seed=19)
    w = torch.randn(4, 3, generator=gen(20), dtype=torch.float64)
    y = grad_reverse(x, lam)
    torch.testing.assert_close(y, x)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, -lam * w)


def make_adversaries(seed: int = 21) -> ClassAdversaries:
    torch.manual_seed(seed)
    return ClassAdversaries(NUM_CLASSES, NUM_GROUPS).double()


def test_adversaries_are_separate_mlps():
    adv = make_adversaries()
    assert len(adv) == NUM_CLASSES and isinstance(adv.adversaries, torch.nn.ModuleList)
    first, last = adv[0][0], adv[NUM_CLASSES - 1][2]
    assert first.in_features == NUM_CLASSES and first.out_features == 32
    assert last.out_features == NUM_GROUPS
    assert len({id(p) for p in adv.parameters()}) == 4 * NUM_CLASSES


def test_adversaries_forward_equals_module_loop():
    adv = make_adversaries()
    x = leaf(7, NUM_CLASSES, seed=22)
    expected = torch.stack([adv[c](x) for c in range(NUM_CLASSES)], dim=1)
    torch.testing.assert_close(adv(x), expected)


def test_per_sample_ce_uses_own_class_adversary(skewed_cells):
    labels, groups = skewed_cells
    adv = make_adversaries()
    x = leaf(len(labels), NUM_CLASSES, seed=23)
    expected = torch.stack(
        [F.cross_entropy(adv[int(y)](x[i : i + 1]), groups[i : i + 1]) for i, y in enumerate(labels)]
    )
    torch.testing.assert_close(adv.per_sample_ce(x, labels, groups), expected)


def test_ad_loss_value_and_gradients(skewed_cells):
    labels, groups = skewed_cells
    lam = 2.5
    adv = make_adversaries()
    logits = leaf(len(labels), NUM_CLASSES, seed=24)

    plain = logits.new_zeros(())
    for c in range(NUM_CLASSES):
        members = labels == c
        if members.sum() == 0:
            continue
        plain = plain + F.cross_entropy(adv[c](logits[members]), groups[members])
    plain.backward()
    plain_logit_grad = logits.grad.clone()
    # the absent class's adversary takes no part in the loop: its gradient is zero
    plain_param_grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in adv.parameters()]

    logits.grad = None
    adv.zero_grad(set_to_none=True)
    loss = ad_loss(logits, labels, groups, adv, lam)
    loss.backward()
    torch.testing.assert_close(loss.detach(), plain.detach(), **TOL)
    torch.testing.assert_close(logits.grad, -lam * plain_logit_grad, **TOL)
    for p, expected in zip(adv.parameters(), plain_param_grads):
        torch.testing.assert_close(p.grad, expected, **TOL)
    assert all((p.grad == 0).all() for p in adv[3].parameters())


# ------------------------------------------------------------------------------------ on CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda(skewed_cells):
    labels, groups = (x.cuda() for x in skewed_cells)
    B = len(labels)
    dev = dict(device="cuda")
    s_feat, t_feat = torch.randn(B, 8, **dev, requires_grad=True), torch.randn(B, 8, **dev)
    s_map, t_map = torch.randn(B, 4, 3, 3, **dev, requires_grad=True), torch.randn(B, 4, 3, 3, **dev)
    logits = torch.randn(B, NUM_CLASSES, **dev, requires_grad=True)
    adv = ClassAdversaries(NUM_CLASSES, NUM_GROUPS).cuda()
    cells = dict(labels=labels, groups=groups, num_classes=NUM_CLASSES, num_groups=NUM_GROUPS, lam=1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = (
            hkd_loss(logits, logits.detach() + 1, 4.0, hkd_weight(2, 5))
            + hint_loss(s_feat, t_feat)
            + at_loss(s_map, t_map, 1.0)
            + nst_loss(s_map, t_map, 1.0)
            + mfd_loss(s_feat, t_feat, **cells)
            + mmd_loss(s_feat, **cells)
            + ad_loss(logits, labels, groups, adv, 1.0)
        )
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(total.item())
