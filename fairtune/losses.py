"""Every loss term of docs/protocol.md §3, one small function each (RepDistiller style).

A loss takes tensors and returns a scalar; it knows nothing of data, optimisers or logging. Teacher
inputs are always detached here, so a caller cannot leak gradient into a frozen teacher.

No function syncs with the host: no ``.item()``, no branching on tensor values, no boolean-mask
indexing (its output shape depends on the data). Per-(class, group) sums are one-hot weighted matrix
products and empty cells are masked, so the losses run on CUDA without stalls and under
``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Floor on squared distances, as the official MMDLoss.pdist (``clamp(min=eps)``).
_SQDIST_EPS = 1e-12


# ---------------------------------------------------------------------------------------------
# Output and feature distillation baselines
# ---------------------------------------------------------------------------------------------


def hkd_weight(epoch: int, num_epochs: int) -> float:
    """Annealed Hinton-KD weight of the official code: λ_h = 4 − 3·epoch/(E − 1).

    ``epoch`` is 0-based, so λ_h goes 4 → 1 over the run; a one-epoch run keeps 4.
    """
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    if num_epochs == 1:
        return 4.0
    return 4.0 - 3.0 * epoch / (num_epochs - 1)


def hkd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float, weight: float = 1.0) -> Tensor:
    """Hinton KD (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015).

        weight · T² · (1/B) Σ_i KL(softmax(t_i/T) ‖ softmax(s_i/T))

    KL summed over classes, averaged over the batch (``batchmean``); teacher probabilities detached.
    """
    log_p_student = F.log_softmax(student_logits / T, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / T, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return weight * T * T * kl


def hint_loss(student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
    """FitNet hint (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015), no regressor.

        ½ · mean_{i,d} (s_{i,d} − t_{i,d})²

    over all B×D elements, features flattened per sample; teacher detached.
    """
    s = student_feats.flatten(1)
    t = teacher_feats.detach().flatten(1)
    return 0.5 * F.mse_loss(s, t)


def _attention(feature_map: Tensor) -> Tensor:
    # q = normalise(mean_c x²) flattened over H×W; F.normalize's eps 1e-12 as in the official code.
    return F.normalize(feature_map.pow(2).mean(1).flatten(1), dim=1, eps=1e-12)


def at_loss(student_map: Tensor, teacher_map: Tensor, lam: float) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

        lam · ½ · mean_{i,p} (q_s[i,p] − q_t[i,p])²,   q[i] = normalise(mean_c x[i,c]²) ∈ R^{H·W}

    normalise = per-sample L2 (eps 1e-12); one layer; mean over B×HW; teacher detached.
    """
    q_s = _attention(student_map)
    q_t = _attention(teacher_map.detach())
    return lam * 0.5 * (q_s - q_t).pow(2).mean()


def nst_loss(student_map: Tensor, teacher_map: Tensor, lam: float) -> Tensor:
    """Neural selective transfer (Huang & Wang, "Like What You Like: Knowledge Distill via Neuron
    Selectivity Transfer", 2017).

        lam · [ mean k(t,t) + mean k(s,s) − 2 · mean k(t,s) ],   k(a, b) = (a·b)²

    The samples are each image's channels, every channel's flattened map L2-normalised (eps 1e-12);
    each mean runs over the B per-image C×C Gram matrices (B·C·C entries). No ½. Teacher detached.
    """
    s = F.normalize(student_map.flatten(2), dim=2, eps=1e-12)
    t = F.normalize(teacher_map.detach().flatten(2), dim=2, eps=1e-12)

    def poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
        return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()

    return lam * (poly_kernel_mean(t, t) + poly_kernel_mean(s, s) - 2 * poly_kernel_mean(t, s))


# ---------------------------------------------------------------------------------------------
# MFD and its teacherless ablation
# ---------------------------------------------------------------------------------------------


def _sq_dists(a: Tensor, b: Tensor, a_sq: Tensor | None = None, b_sq: Tensor | None = None) -> Tensor:
    """(N, M) squared Euclidean distances ‖a_i − b_j‖², clamped at 1e-12 (the official ``pdist``).

    ``a_sq`` / ``b_sq``: the rows' squared norms, when the caller already has them.
    """
    a_sq = a.pow(2).sum(1) if a_sq is None else a_sq
    b_sq = b.pow(2).sum(1) if b_sq is None else b_sq
    return torch.addmm(a_sq.unsqueeze(1) + b_sq.unsqueeze(0), a, b.t(), alpha=-2).clamp(min=_SQDIST_EPS)


def _mean_weights(labels: Tensor, groups: Tensor, num_classes: int, num_groups: int, dtype: torch.dtype):
    """Weights turning kernel-matrix sums into per-class and per-cell means.

    Returns ``class_w`` (B, C·G), column k = (c, g) holding 1/n_c on class-c samples (the class's
    column repeated for each of its groups); ``cell_w`` (B, C·G) holding 1/n_cg on cell-(c, g)
    samples; and ``cell_present`` (C·G,) bool. Cell k = c·G + g.
    """
    class_onehot = (labels.unsqueeze(1) == torch.arange(num_classes, device=labels.device)).to(dtype)
    cell_index = labels * num_groups + groups
    cell_onehot = (cell_index.unsqueeze(1) == torch.arange(num_classes * num_groups, device=labels.device)).to(dtype)
    class_counts = class_onehot.sum(0)
    cell_counts = cell_onehot.sum(0)
    # clamp(min=1) only guards 0/0 for absent classes and cells; their weights are zero anyway.
    class_w = class_onehot / class_counts.clamp(min=1)
    class_w = class_w.unsqueeze(2).expand(-1, -1, num_groups).reshape(labels.shape[0], num_classes * num_groups)
    cell_w = cell_onehot / cell_counts.clamp(min=1)
    return class_w, cell_w, cell_counts > 0


def _weighted_means(kernel: Tensor, row_w: Tensor, col_w: Tensor) -> Tensor:
    """out[k] = row_w[:, k]ᵀ · kernel · col_w[:, k]; ``kernel`` is (B, B) or a (K, B, B) stack."""
    if kernel.dim() == 2:
        return (row_w * (kernel @ col_w)).sum(0)
    return torch.einsum("bk,kbd,dk->k", row_w, kernel, col_w)


def mfd_loss(
    student_feats: Tensor,
    teacher_feats: Tensor,
    labels: Tensor,
    groups: Tensor,
    num_classes: int,
    num_groups: int,
    lam: float,
    sigma: float = 1.0,
) -> Tensor:
    """MFD (Jung et al., "Fair Feature Distillation for Visual Recognition", CVPR 2021).

        λ/2 · Σ_c Σ_g MMD²(T_c, S_cg)
        MMD²(X, Y) = mean K(X, X) + mean K(Y, Y) − 2 · mean K(X, Y)      (biased: diagonals included)
        K(a, b)    = exp(−max(‖a − b‖², 1e-12) / (2 · σ · d̄²))

    T_c: teacher features of every class-c sample of the batch (all groups); S_cg: student features
    of class c and group g. d̄² = mean clamped squared distance over all B×B teacher–student pairs,
    once per batch, without gradient. Cells with no student sample are skipped. Raw features,
    flattened to (B, D); teacher detached. As the official ``MMDLoss`` (rbf kernel).

    Vectorised: the B×B kernel matrices K_tt, K_ss, K_ts are computed once for the whole batch,
    and with A (B, C·G) holding 1/n_c on the class-c samples of column (c, g) and Bw (B, C·G)
    holding 1/n_cg on the samples of cell (c, g), Σ_cells MMD² = Σ K_tt ⊙ AAᵀ + Σ K_ss ⊙ Bw Bwᵀ
    − 2 Σ K_ts ⊙ A Bwᵀ: no loop over classes or groups, the same few dozen kernels whatever C·G
    is. K_tt carries no gradient, so its term is built without autograd.
    """
    student = student_feats.flatten(1)
    teacher = teacher_feats.detach().flatten(1).to(student.dtype)
    class_w, cell_w, cell_present = _mean_weights(labels, groups, num_classes, num_groups, student.dtype)
    class_w = class_w * cell_present  # an empty cell's column is zero on both sides: skipped

    student_sq = student.pow(2).sum(1)
    teacher_sq = teacher.pow(2).sum(1)
    d_ts = _sq_dists(teacher, student, teacher_sq, student_sq)
    d_ss = _sq_dists(student, student, student_sq, student_sq)
    scale = -1.0 / (2 * sigma * d_ts.detach().mean())
    with torch.no_grad():
        d_tt = _sq_dists(teacher, teacher, teacher_sq, teacher_sq)
        teacher_term = (torch.exp(d_tt * scale) * (class_w @ class_w.t())).sum()
        ss_pairs = cell_w @ cell_w.t()
        ts_pairs = class_w @ cell_w.t()
    student_term = (torch.exp(d_ss * scale) * ss_pairs).sum()
    cross_term = (torch.exp(d_ts * scale) * ts_pairs).sum()
    return 0.5 * lam * (teacher_term + student_term - 2 * cross_term)


def mmd_loss(
    student_feats: Tensor,
    labels: Tensor,
    groups: Tensor,
    num_classes: int,
    num_groups: int,
    lam: float,
    sigma: float = 1.0,
) -> Tensor:
    """Teacherless MFD ablation (the official ``scratch_mmd``; Jung et al., CVPR 2021).

        λ/(2G) · Σ_c Σ_g max(0, MMD²(sg(S_c), S_cg))
        K_cg(a, b) = exp(−max(‖a − b‖², 1e-12) / (2 · σ² · d̄²_cg))

    S_c: student features of class c, detached (sg = stop-gradient); S_cg: those of cell (c, g), with
    gradient. d̄²_cg = mean clamped squared distance between sg(S_c) and S_cg, detached, so every
    cell has its own bandwidth. Biased estimator; empty cells skipped; features flattened to (B, D).

    The max(0, ·) is kept from the official code; with one PSD kernel per cell the biased MMD² is a
    squared RKHS norm, so it only clips rounding noise (e.g. a class whose samples all lie in one
    group, where S_c = S_cg).
    """
    student = student_feats.flatten(1)
    anchor = student.detach()
    class_w, cell_w, cell_present = _mean_weights(labels, groups, num_classes, num_groups, student.dtype)

    d_xy = _sq_dists(anchor, student)  # gradient only through the cell side
    d_xx = d_xy.detach()  # same values as _sq_dists(anchor, anchor)
    d_yy = _sq_dists(student, student)
    cell_sq_dist = _weighted_means(d_xy.detach(), class_w, cell_w)
    # An empty cell has d̄² = 0; a unit bandwidth there keeps 0/0 out of the backward pass.
    bandwidth = 2 * sigma**2 * torch.where(cell_present, cell_sq_dist, torch.ones_like(cell_sq_dist))
    bandwidth = bandwidth.view(-1, 1, 1)

    mean_xx = _weighted_means(torch.exp(-d_xx.unsqueeze(0) / bandwidth), class_w, class_w)
    mean_yy = _weighted_means(torch.exp(-d_yy.unsqueeze(0) / bandwidth), cell_w, cell_w)
    mean_xy = _weighted_means(torch.exp(-d_xy.unsqueeze(0) / bandwidth), class_w, cell_w)
    mmd2 = (mean_xx + mean_yy - 2 * mean_xy).clamp(min=0)
    return lam / (2 * num_groups) * torch.where(cell_present, mmd2, torch.zeros_like(mmd2)).sum()


# ---------------------------------------------------------------------------------------------
# Adversarial debiasing
# ---------------------------------------------------------------------------------------------


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return -ctx.lam * grad_output, None


def grad_reverse(x: Tensor, lam: float) -> Tensor:
    """Gradient-reversal layer (Ganin & Lempitsky, "Unsupervised Domain Adaptation by
    Backpropagation", ICML 2015): identity forward, gradient multiplied by −lam backward."""
    return _GradReverse.apply(x, lam)


class ClassAdversaries(nn.Module):
    """One group-predicting MLP per class (Zhang, Lemoine & Mitchell, "Mitigating Unwanted Biases
    with Adversarial Learning", AIES 2018), as the official AD baseline: in → hidden, ReLU → groups.

    The adversaries are separate modules (``self.adversaries[c]``) so each can own an optimiser and an
    LR scheduler; ``forward`` still evaluates all of them in one batched computation.
    """

    def __init__(self, num_classes: int, num_groups: int, in_features: int | None = None, hidden: int = 32):
        super().__init__()
        self.num_classes = num_classes
        self.num_groups = num_groups
        in_features = num_classes if in_features is None else in_features  # they read the logits
        self.adversaries = nn.ModuleList(
            nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_groups))
            for _ in range(num_classes)
        )
        # The same Linear modules, listed once: Sequential's integer indexing is slow Python, and
        # forward reads 4·C parameters every step.
        self._first = [adv[0] for adv in self.adversaries]
        self._second = [adv[2] for adv in self.adversaries]

    def __len__(self) -> int:
        return len(self.adversaries)

    def __getitem__(self, c: int) -> nn.Module:
        return self.adversaries[c]

    def __iter__(self):
        return iter(self.adversaries)

    def forward(self, x: Tensor) -> Tensor:
        """(B, num_classes, num_groups): every adversary's group logits on every sample."""
        w1 = torch.stack([layer.weight for layer in self._first])  # (C, H, in)
        b1 = torch.stack([layer.bias for layer in self._first])  # (C, H)
        w2 = torch.stack([layer.weight for layer in self._second])  # (C, G, H)
        b2 = torch.stack([layer.bias for layer in self._second])  # (C, G)
        num_classes, hidden_size, _ = w1.shape
        # First layers of all C adversaries as one (B, in) × (in, C·H) matmul, second layers as
        # one batched matmul over C (plain BLAS calls; einsum's permutes cost more at this size).
        hidden = torch.relu(torch.addmm(b1.flatten(), x, w1.flatten(0, 1).t()))
        hidden = hidden.view(-1, num_classes, hidden_size).transpose(0, 1)  # (C, B, H)
        return torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2)).transpose(0, 1)

    def per_sample_ce(self, x: Tensor, labels: Tensor, groups: Tensor) -> Tensor:
        """(B,) cross-entropy of each sample's own-class adversary predicting its group."""
        own_logits = self(x).gather(1, labels.view(-1, 1, 1).expand(-1, 1, self.num_groups)).squeeze(1)
        return F.cross_entropy(own_logits, groups, reduction="none")


def ad_loss(student_logits: Tensor, labels: Tensor, groups: Tensor, adversaries: ClassAdversaries, lam: float) -> Tensor:
    """Adversarial debiasing (Zhang, Lemoine & Mitchell, AIES 2018), per-class adversaries (docs/protocol.md §3).

        Σ_{c present} mean_{i: y_i = c} CE(adv_c(GR_λ(s_i)), g_i)  =  Σ_i CE_i / n_{y_i}

    GR_λ is the gradient-reversal layer: one backward pass trains the adversaries on their plain
    gradient and the student on −λ times it. The value itself carries no λ.
    """
    ce = adversaries.per_sample_ce(grad_reverse(student_logits, lam), labels, groups)
    class_onehot = (labels.unsqueeze(1) == torch.arange(adversaries.num_classes, device=labels.device)).to(ce.dtype)
    class_counts = class_onehot.sum(0)
    return (ce / (class_onehot @ class_counts)).sum()
