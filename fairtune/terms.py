"""Loss terms: what a method adds to the student's cross-entropy.

A term declares what it needs — the hyperparameters it reads **by name** (rows of
:mod:`fairtune.hyperparameters`), whether it needs the teacher, which teacher outputs it reads — and
the training loop (:mod:`fairtune.engine`) runs any term from those declarations alone. Two kinds:

- :class:`LossTerm`: a pure function of the two models' outputs and the batch (HKD, hints, AT, NST,
  MFD, MMD); the loss itself lives in :mod:`fairtune.losses`.
- :class:`TrainedTerm`: a term with trainable state of its own — modules, optimisers, schedulers, an
  evaluation signal, state for an exact resume. AD's per-class adversaries are one.

Plugins add both kinds with :func:`fairtune.plugin.term`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

import torch
from torch import Tensor

from fairtune import losses
from fairtune.errors import UserError
from fairtune.registry import lookup
from fairtune.models import ModelOutput

OUTPUTS = frozenset({"logits", "features", "feature_map"})


@dataclass(frozen=True)
class Batch:
    """What a loss term may look at besides the two models' outputs."""

    labels: Tensor
    groups: Tensor
    num_classes: int
    num_groups: int
    kd_weight: float = 0.0  # the epoch's annealed λ_h, for terms declared ``annealed``


# (student outputs, teacher outputs or None, batch, the term's hyperparameters by name) -> scalar
TermFn = Callable[[ModelOutput, "ModelOutput | None", Batch, Mapping[str, float]], Tensor]


@dataclass(frozen=True)
class LossTerm:
    name: str  # also its key in the epoch's ``train/<name>`` statistics
    fn: TermFn
    reads: tuple[str, ...] = ()  # hyperparameter names, passed to ``fn`` in a mapping
    needs_teacher: bool = True
    # Teacher outputs read; a term reading "feature_map" keeps the teacher's forward in every step
    # (the per-image teacher table holds logits and features only: a feature map is too big).
    teacher_outputs: frozenset[str] = frozenset({"logits", "features"})
    annealed: bool = False  # weighted by the epoch's annealed λ_h (Hinton KD's schedule, Batch.kd_weight)

    def __call__(self, student, teacher, batch: Batch, hp: Mapping[str, float]) -> Tensor:
        return self.fn(student, teacher, batch, hp)


class TrainedTerm:
    """A loss term with trainable state: one instance per run, built from the run's settings.

    The loop calls, in order: ``train()`` at an epoch's start; per step ``loss(...)`` (inside the
    student's loss, so one backward reaches both), ``zero_grad()`` before the backward and ``step()``
    after the student's optimiser step (main stage only); per evaluation batch ``observe(...)``, then
    ``evaluation()`` once per evaluation (extra metrics, e.g. AD's adversary loss per class), and
    ``end_epoch(evaluation)`` after a main-stage epoch (scheduler steps). ``state_dict`` must hold
    everything a resumed run needs to continue exactly.
    """

    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]] = ()
    needs_teacher: ClassVar[bool] = False
    teacher_outputs: ClassVar[frozenset[str]] = frozenset()
    annealed: ClassVar[bool] = False
    config_fields: ClassVar[tuple[str, ...]] = ()  # TrainConfig settings only this term reads

    def __init__(self, info, config, device: torch.device) -> None:  # DatasetInfo, TrainConfig
        self.info, self.config, self.device = info, config, device

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, hp: Mapping[str, float]) -> Tensor:
        raise NotImplementedError

    def train(self) -> None: ...
    def eval(self) -> None: ...
    def zero_grad(self) -> None: ...
    def step(self) -> None: ...
    def observe(self, logits: Tensor, labels: Tensor, groups: Tensor) -> None: ...

    def evaluation(self) -> dict:
        return {}

    def end_epoch(self, evaluation: dict) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


Term = LossTerm | type[TrainedTerm]
TERMS: dict[str, Term] = {}


def register(term: Term) -> Term:
    name = term.name
    if name in TERMS and TERMS[name] is not term:
        raise UserError(f"loss term '{name}' is already registered")
    if name in ("ce", "loss"):
        raise UserError(f"loss term name '{name}' is reserved (the cross-entropy and the total)")
    unknown = set(term.teacher_outputs) - OUTPUTS
    if unknown:
        raise UserError(f"loss term '{name}' reads teacher outputs {sorted(unknown)}; valid: {', '.join(sorted(OUTPUTS))}")
    from fairtune import hyperparameters

    for param in term.reads:
        hyperparameters.get(param)  # a term reading an unregistered name is refused at registration
    TERMS[name] = term
    return term


def get(name: str) -> Term:
    return lookup(TERMS, name, "loss term")


class Adversary(TrainedTerm):
    """Adversarial debiasing (AD): per-class group adversaries on the student's logits, behind a
    gradient-reversal layer of strength λ, each with its own Adam and plateau scheduler, fresh at the
    start of a run (docs/protocol.md §3). Their validation loss per class drives their schedulers."""

    name = "adversary"
    reads = ("lam",)
    config_fields = ("adv_lr",)  # a setting of the run that only this term reads

    def __init__(self, info, config, device: torch.device) -> None:
        super().__init__(info, config, device)
        self.adversaries = losses.ClassAdversaries(info.num_classes, info.num_groups).to(device)
        self.optimizers = [torch.optim.Adam(m.parameters(), lr=config.adv_lr) for m in self.adversaries]
        self.schedulers = [
            torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="min", factor=config.plateau_factor, patience=config.plateau_patience)
            for o in self.optimizers
        ]
        self._sums = self._counts = None

    def loss(self, student, teacher, batch, hp):
        return losses.ad_loss(student.logits, batch.labels, batch.groups, self.adversaries, hp["lam"])

    def train(self) -> None:
        self.adversaries.train()

    def eval(self) -> None:
        self.adversaries.eval()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def observe(self, logits, labels, groups) -> None:
        per_sample = self.adversaries.per_sample_ce(logits, labels, groups)
        s = torch.bincount(labels, weights=per_sample.double(), minlength=self.info.num_classes)
        n = torch.bincount(labels, minlength=self.info.num_classes)
        self._sums, self._counts = (s, n) if self._sums is None else (self._sums + s, self._counts + n)

    def evaluation(self) -> dict:
        sums, counts, self._sums, self._counts = self._sums, self._counts, None, None
        if sums is None:
            return {}
        return {"adversary_loss": [float(s) / int(n) if int(n) else None for s, n in zip(sums.cpu(), counts.cpu())]}

    def end_epoch(self, evaluation: dict) -> None:
        for scheduler, adv_loss in zip(self.schedulers, evaluation.get("adversary_loss", [])):
            if adv_loss is not None:
                scheduler.step(adv_loss)

    def state_dict(self) -> dict:
        return {
            "adversaries": self.adversaries.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
        }

    def load_state_dict(self, state: dict) -> None:
        self.adversaries.load_state_dict(state["adversaries"])
        for optimizer, s in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(s)
        for scheduler, s in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(s)


def _builtins() -> None:
    feature_map = frozenset({"feature_map"})
    for term in (
        LossTerm("hkd", lambda s, t, b, hp: losses.hkd_loss(s.logits, t.logits, hp["T"], weight=b.kd_weight), ("T",), annealed=True),
        LossTerm("hint", lambda s, t, b, hp: losses.hint_loss(s.features, t.features), teacher_outputs=frozenset({"features"})),
        LossTerm("at", lambda s, t, b, hp: losses.at_loss(s.feature_map, t.feature_map, hp["lam"]), ("lam",), teacher_outputs=feature_map),
        LossTerm("nst", lambda s, t, b, hp: losses.nst_loss(s.feature_map, t.feature_map, hp["lam"]), ("lam",), teacher_outputs=feature_map),
        LossTerm(
            "mfd", lambda s, t, b, hp: losses.mfd_loss(s.features, t.features, b.labels, b.groups, b.num_classes, b.num_groups, hp["lam"]),
            ("lam",), teacher_outputs=frozenset({"features"}),
        ),
        LossTerm(
            "mmd", lambda s, t, b, hp: losses.mmd_loss(s.features, b.labels, b.groups, b.num_classes, b.num_groups, hp["lam"]),
            ("lam",), needs_teacher=False, teacher_outputs=frozenset(),
        ),
        Adversary,
    ):
        register(term)


_builtins()
