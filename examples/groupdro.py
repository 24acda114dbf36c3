"""GroupDRO as a fairtune plugin: a hyperparameter, a trained loss term, a sampler and a method.

Sagawa, Koh, Hashimoto and Liang, "Distributionally Robust Neural Networks for Group Shifts: On the
Importance of Regularization for Worst-Case Generalization", ICLR 2020 (Algorithm 1, online GroupDRO).

The student minimises the worst group's loss through online weights q over the G groups, uniform at
the start of a run. At every training step, with L_g the mean cross-entropy of the batch's samples
of group g:

    q_g ← q_g · exp(η · L_g)    for every group g present in the batch (absent groups keep theirs)
    q   ← q / Σ_g q_g
    loss = Σ_g q_g · L_g         (with the updated q; no gradient flows through q)

This loss replaces the plain cross-entropy (the method has ``ce=False``). q is kept as log q
(log q_g += η·L_g, then minus the log-sum-exp): the same update, but a group whose weight a long
run of small losses drove below float32's range can still come back. The update is committed in
``step()``, after the optimiser's, so a step the loop retries (torch.compile's eager fallback)
moves q once. Not included: the paper's group adjustment C/√n_g and its strong ℓ2 penalty.

- ``eta`` (η, the step size of q): positive; standard space log-uniform [1e-3, 1], default 0.01 (the
  step size of the authors' code), tried first. ``groupdro.yaml`` beside this file is the method's
  search space (fairtune reads ``<method>.yaml`` next to a plugin file); edit it to search another range.
- sampler ``group-balanced``: every batch holds floor(B / G) samples of each group (not of each
  (class, group) cell: GroupDRO reweights groups only); see :func:`group_balanced_plan`.
- ``evaluation()`` reports the current q as ``group_weights`` in every epoch's metrics.

Run it like a built-in method (``--plugin`` on every command; search and final start Ray, whose
workers import this file from the same path)::

    fairtune search --plugin examples/groupdro.py --method groupdro --dataset imagefolder --data-dir DIR
    fairtune final --plugin examples/groupdro.py --dataset imagefolder --data-dir DIR   # + the Teacher rows
    fairtune report --plugin examples/groupdro.py --dataset imagefolder

or export ``FAIRTUNE_PLUGINS=$PWD/examples/groupdro.py`` once instead of passing ``--plugin``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fairtune import plugin
from fairtune.data.sampler import stratum_balanced_plan

plugin.hyperparameter(
    "eta", "η", "GroupDRO's step size η of the group weights q", positive=True, low=1e-3, high=1.0, default=0.01,
)


def group_losses(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, present): L_g, the mean cross-entropy of the samples of group g (0 where none), and
    whether group g has a sample in the batch. One-hot sums, not scatter: deterministic on a GPU."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    onehot = F.one_hot(groups, num_groups).to(ce.dtype)
    counts = onehot.sum(0)
    return (ce @ onehot) / counts.clamp(min=1), counts > 0


@plugin.trained_term
class GroupDRO(plugin.TrainedTerm):
    """The online group weights q (one per group) and the loss Σ_g q_g·L_g."""

    name = "groupdro"
    reads = ("eta",)
    needs_teacher = False

    def __init__(self, info, config, device: torch.device) -> None:
        super().__init__(info, config, device)
        self.log_q = torch.full((info.num_groups,), -math.log(info.num_groups), device=device)
        self._pending: torch.Tensor | None = None  # this step's log q, committed by step()

    @property
    def q(self) -> torch.Tensor:
        return self.log_q.exp()

    def loss(self, student, teacher, batch, hp):
        losses, present = group_losses(student.logits, batch.labels, batch.groups, batch.num_groups)
        with torch.no_grad():
            log_q = self.log_q + hp["eta"] * torch.where(present, losses.detach(), 0.0)
            log_q = log_q - torch.logsumexp(log_q, 0)
        self._pending = log_q
        return (log_q.exp() * losses).sum()

    def step(self) -> None:
        if self._pending is not None:
            self.log_q, self._pending = self._pending, None

    def evaluation(self) -> dict:
        return {"group_weights": self.q.tolist()}

    def state_dict(self) -> dict:
        return {"log_q": self.log_q.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.log_q = state["log_q"].to(self.device, torch.float32)
        self._pending = None


def group_balanced_plan(
    labels: torch.Tensor, groups: torch.Tensor, num_classes: int, num_groups: int, batch_size: int, generator: torch.Generator,
) -> torch.Tensor:
    """An epoch of batches with exactly floor(B / G) samples of every group, whatever the classes.

    A batch has floor(B / G)·G samples: when B is not a multiple of G it is smaller than B rather
    than unbalanced. An epoch has floor(n_max / per_group) batches, n_max being the largest group:
    each group is drawn as repeated reshuffled passes over its members, so smaller groups are
    oversampled and every sample of the largest group but its last n_max mod per_group (the partial
    batch, dropped as the random sampler drops its own) appears in each epoch. A group with no
    training sample (a tiny subsample) is skipped, which shrinks the batch. Every random number
    comes from ``generator``, so a resumed run draws the same batches.
    """
    per_group = batch_size // num_groups
    if per_group == 0:
        raise ValueError(f"batch size {batch_size} is smaller than the {num_groups} groups; a group-balanced batch needs one sample of each")
    return stratum_balanced_plan(groups, num_groups, per_group, generator, "group")


plugin.sampler("group-balanced", group_balanced_plan)
plugin.method("groupdro", "GroupDRO", terms=["groupdro"], sampler="group-balanced", searched="eta", ce=False)
