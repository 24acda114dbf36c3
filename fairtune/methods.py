"""The method registry: every method is data — loss terms, a sampler, optional stages and adversaries,
and the one hyperparameter a search tunes. The training loop reads these entries; it has no
per-method branches.

Fairness prefixes compose with the distillation methods: ``ss+X`` trains X with the balanced
sampler (X's hyperparameter is searched), ``ad+X`` adds adversarial debiasing to X (AD's λ is
searched and X's own hyperparameter is fixed to the best found for X; FitNet becomes one-stage).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch

from fairtune import losses
from fairtune.errors import UserError
from fairtune.models import ModelOutput

Sampler = Literal["random", "balanced"]


@dataclass(frozen=True)
class Batch:
    """What a loss term may look at besides the two models' outputs."""

    labels: torch.Tensor
    groups: torch.Tensor
    num_classes: int
    num_groups: int


# Each term: (student, teacher, batch, hyperparameter value, annealed λ_h) -> scalar.
TermFn = Callable[[ModelOutput, "ModelOutput | None", Batch, "float | None", float], torch.Tensor]

TERMS: dict[str, TermFn] = {
    "hkd": lambda s, t, b, T, kd_weight: losses.hkd_loss(s.logits, t.logits, T, weight=kd_weight),
    "hint": lambda s, t, b, _, __: losses.hint_loss(s.features, t.features),
    "at": lambda s, t, b, lam, _: losses.at_loss(s.feature_map, t.feature_map, lam),
    "nst": lambda s, t, b, lam, _: losses.nst_loss(s.feature_map, t.feature_map, lam),
    "mfd": lambda s, t, b, lam, _: losses.mfd_loss(
        s.features, t.features, b.labels, b.groups, b.num_classes, b.num_groups, lam
    ),
    "mmd": lambda s, t, b, lam, _: losses.mmd_loss(s.features, b.labels, b.groups, b.num_classes, b.num_groups, lam),
}
TEACHERLESS_TERMS = {"mmd"}


@dataclass(frozen=True)
class Term:
    loss: str  # key of TERMS
    param: str | None = None  # the hyperparameter it reads: "T", "lam" or "distill_lam"


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # the paper's row name
    terms: tuple[Term, ...] = ()
    sampler: Sampler = "random"
    adversary: bool = False
    hint_stage: bool = False  # FitNet: E/2 epochs of hint loss alone before CE + KD
    searched: str | None = None  # "T" or "lam"; None = nothing to search
    fixed_from: tuple[tuple[str, str], ...] = ()  # (hyperparameter, method whose best config provides it)

    @property
    def needs_teacher(self) -> bool:
        return self.hint_stage or any(term.loss not in TEACHERLESS_TERMS for term in self.terms)

    @property
    def params(self) -> tuple[str, ...]:
        """Every hyperparameter the method reads, searched one first."""
        names = [self.searched] if self.searched else []
        names += [p for p, _ in self.fixed_from]
        names += [t.param for t in self.terms if t.param]
        return tuple(dict.fromkeys(n for n in names if n))

    @property
    def uses_kd_annealing(self) -> bool:
        return any(term.loss == "hkd" for term in self.terms)


BASE_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("scratch", "Teacher"),
        Method("hkd", "HKD", (Term("hkd", "T"),), searched="T"),
        Method("fitnet", "FitNet", (Term("hkd", "T"),), hint_stage=True, searched="T"),
        Method("at", "AT", (Term("at", "lam"),), searched="lam"),
        Method("nst", "NST", (Term("nst", "lam"),), searched="lam"),
        Method("ss", "SS", sampler="balanced"),
        Method("ad", "AD", adversary=True, searched="lam"),
        Method("mfd", "MFD", (Term("mfd", "lam"),), sampler="balanced", searched="lam"),
        # Teacherless ablation (official `scratch_mmd`), trained with MFD's balanced sampler.
        Method("mmd", "MMD", (Term("mmd", "lam"),), sampler="balanced", searched="lam"),
    )
}
DISTILLATION_METHODS = ("hkd", "fitnet", "at", "nst")
PREFIXES = ("ss", "ad")

# The paper's row order; composed extras follow in the order they are asked for.
PAPER_ORDER = ("scratch", "hkd", "fitnet", "at", "nst", "ss", "ad", "ss+hkd", "ss+fitnet", "ad+hkd", "ad+fitnet", "mfd")
EXTRA_METHODS = ("mmd",)


def _with_balanced_sampler(base: Method) -> Method:
    return replace(base, name=f"ss+{base.name}", label=f"SS+{base.label}", sampler="balanced")


def _with_adversary(base: Method) -> Method:
    # AD's λ becomes the searched "lam"; the distillation term's own λ is renamed so both coexist.
    renamed = tuple(replace(t, param="distill_lam") if t.param == "lam" else t for t in base.terms)
    fixed = "distill_lam" if base.searched == "lam" else base.searched
    hint = (Term("hint"),) if base.hint_stage else ()  # AD+FitNet is one-stage: hint + KD from the start
    return Method(
        name=f"ad+{base.name}",
        label=f"AD+{base.label}",
        terms=hint + renamed,
        sampler=base.sampler,
        adversary=True,
        searched="lam",
        fixed_from=((fixed, base.name),),
    )


def valid_method_names() -> str:
    return f"{', '.join(BASE_METHODS)}, and ss+X / ad+X for X in {', '.join(DISTILLATION_METHODS)}"


def get_method(name: str) -> Method:
    """Resolve a CLI name, composing ``ss+`` / ``ad+`` prefixes; unknown names raise UserError."""
    if name in BASE_METHODS:
        return BASE_METHODS[name]
    prefix, plus, rest = name.partition("+")
    if plus and prefix in PREFIXES and rest in DISTILLATION_METHODS:
        base = BASE_METHODS[rest]
        return _with_balanced_sampler(base) if prefix == "ss" else _with_adversary(base)
    raise UserError(f"unknown method '{name}'; valid: {valid_method_names()}")


def all_method_names() -> list[str]:
    """Paper methods in paper order, then the extras and every other composition."""
    composed = [f"{p}+{x}" for p in PREFIXES for x in DISTILLATION_METHODS]
    return list(dict.fromkeys([*PAPER_ORDER, *EXTRA_METHODS, *composed]))


def in_paper_order(names) -> list[str]:
    """Distinct names in the paper's row order, then the extras, then any other name alphabetically."""
    known = all_method_names()
    return sorted(set(names), key=lambda n: (known.index(n) if n in known else len(known), n))
