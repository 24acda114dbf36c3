"""The baselines the benchmarks race: the official MFD code's algorithms, written from their
definitions (docs/protocol.md §3) in its shape — a Python loop over (class, group) cells or over adversaries,
boolean-mask selections, several small kernel matrices per cell.

They are deliberately not vectorised; each benchmark first checks that fairtune computes the same
values and gradients, then times both.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairtune.losses import grad_reverse


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """‖a_i − b_j‖² = ‖a_i‖² + ‖b_j‖² − 2 a_i·b_j, floored at 1e-12 (docs/protocol.md §3, `mfd`)."""
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2 * a @ b.t()).clamp(min=1e-12)


def gaussian_kernel(a: Tensor, b: Tensor, bandwidth: Tensor) -> Tensor:
    return torch.exp(-squared_distances(a, b) / bandwidth)


def per_cell_mfd_loss(
    student_feats: Tensor,
    teacher_feats: Tensor,
    labels: Tensor,
    groups: Tensor,
    num_classes: int,
    num_groups: int,
    lam: float,
    sigma: float = 1.0,
) -> Tensor:
    """λ/2 · Σ_c Σ_g MMD²(T_c, S_cg), one cell at a time: three kernel matrices per cell.

    T_c = teacher features of class c (every group), S_cg = student features of class c, group g;
    Gaussian kernel with bandwidth 2σ·d̄², d̄² the mean squared teacher–student distance over the
    whole batch, once, without gradient; biased estimator; empty cells skipped.
    """
    student = student_feats.flatten(1)
    teacher = teacher_feats.detach().flatten(1)
    with torch.no_grad():
        bandwidth = 2 * sigma * squared_distances(teacher, student).mean()
    total = student.new_zeros(())
    for c in range(num_classes):
        in_class = labels == c
        teacher_c = teacher[in_class]
        for g in range(num_groups):
            student_cg = student[in_class & (groups == g)]
            if len(student_cg) == 0:  # a host sync on CUDA, as in the official loop
                continue
            k_tt = gaussian_kernel(teacher_c, teacher_c, bandwidth)
            k_ss = gaussian_kernel(student_cg, student_cg, bandwidth)
            k_ts = gaussian_kernel(teacher_c, student_cg, bandwidth)
            total = total + k_tt.mean() + k_ss.mean() - 2 * k_ts.mean()
    return 0.5 * lam * total


def per_class_ad_loss(student_logits: Tensor, labels: Tensor, groups: Tensor, adversaries: Sequence[nn.Module], lam: float) -> Tensor:
    """Σ_c CE(adv_c(GR_λ(logits of class-c samples)), their groups): one adversary at a time."""
    reversed_logits = grad_reverse(student_logits, lam)
    total = student_logits.new_zeros(())
    for c, adversary in enumerate(adversaries):
        in_class = labels == c
        if not bool(in_class.any()):
            continue
        total = total + F.cross_entropy(adversary(reversed_logits[in_class]), groups[in_class])
    return total
