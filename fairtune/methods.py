"""The method registry: every method is data — loss terms, a sampler, an optional stage of one term
alone, and the one hyperparameter a search tunes. The training loop reads these entries; it has no
per-method branches. Terms live in :mod:`fairtune.terms`, hyperparameters in
:mod:`fairtune.hyperparameters`, samplers in :mod:`fairtune.data.sampler`.

Fairness prefixes compose with the distillation methods (and any method registered ``composable``):
``ss+X`` trains X with the balanced sampler (X's hyperparameter is searched), ``ad+X`` adds
adversarial debiasing to X (AD's λ is searched and X's own hyperparameter is fixed to the best found
for X; a method with a hint stage becomes one-stage, hint term from the start).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fairtune import hyperparameters, terms
from fairtune.errors import UserError


@dataclass(frozen=True)
class Use:
    """A term as a method uses it: ``rename`` maps a hyperparameter the term reads to the name the
    method's config holds it under (``ad+at``'s AT term reads its λ from ``distill_lam``)."""

    term: str
    rename: tuple[tuple[str, str], ...] = ()

    @property
    def spec(self) -> terms.Term:
        return terms.get(self.term)

    def bindings(self) -> dict[str, str]:
        """The term's hyperparameter name -> the method config's name for it."""
        names = dict(self.rename)
        return {own: names.get(own, own) for own in self.spec.reads}


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # the paper's row name
    terms: tuple[Use, ...] = ()
    sampler: str = "random"  # key of fairtune.data.sampler.SAMPLERS
    hint_term: str | None = None  # FitNet: E/2 epochs of this term alone before the main stage
    searched: str | None = None  # the hyperparameter a search tunes; None = nothing to search
    fixed_from: tuple[tuple[str, str], ...] = ()  # (hyperparameter, method whose best config provides it)
    ce: bool = True  # the student's cross-entropy is a term (GroupDRO replaces it with its own)
    composable: bool = False  # ss+X and ad+X exist for it

    @property
    def hint_stage(self) -> bool:
        return self.hint_term is not None

    def specs(self) -> list[terms.Term]:
        return [use.spec for use in self.terms]

    @property
    def needs_teacher(self) -> bool:
        return self.hint_stage or any(spec.needs_teacher for spec in self.specs())

    @property
    def params(self) -> tuple[str, ...]:
        """Every hyperparameter the method reads, searched one first."""
        names = [self.searched] if self.searched else []
        names += [p for p, _ in self.fixed_from]
        names += [name for use in self.terms for name in use.bindings().values()]
        return tuple(dict.fromkeys(n for n in names if n))

    @property
    def uses_kd_annealing(self) -> bool:
        return any(spec.annealed for spec in self.specs())

    @property
    def teacher_outputs(self) -> frozenset[str]:
        hint = terms.get(self.hint_term).teacher_outputs if self.hint_term else frozenset()
        return hint.union(*(spec.teacher_outputs for spec in self.specs()))

    @property
    def config_fields(self) -> frozenset[str]:
        """Settings of TrainConfig beyond the shared ones that its terms read (AD: ``adv_lr``)."""
        return frozenset(f for spec in self.specs() for f in getattr(spec, "config_fields", ()))


BASE_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("scratch", "Teacher"),
        Method("hkd", "HKD", (Use("hkd"),), searched="T", composable=True),
        Method("fitnet", "FitNet", (Use("hkd"),), hint_term="hint", searched="T", composable=True),
        Method("at", "AT", (Use("at"),), searched="lam", composable=True),
        Method("nst", "NST", (Use("nst"),), searched="lam", composable=True),
        Method("ss", "SS", sampler="balanced"),
        Method("ad", "AD", (Use("adversary"),), searched="lam"),
        Method("mfd", "MFD", (Use("mfd"),), sampler="balanced", searched="lam"),
        # Teacherless ablation (official `scratch_mmd`), trained with MFD's balanced sampler.
        Method("mmd", "MMD", (Use("mmd"),), sampler="balanced", searched="lam"),
    )
}
BUILTIN_METHODS = frozenset(BASE_METHODS)
PREFIXES = ("ss", "ad")
# AD's λ is the searched one in ad+X; X's own λ moves aside to this name so both coexist.
AD_SEARCHED, AD_RENAMED = "lam", "distill_lam"

# The paper's row order; composed extras follow in the order they are asked for.
PAPER_ORDER = ("scratch", "hkd", "fitnet", "at", "nst", "ss", "ad", "ss+hkd", "ss+fitnet", "ad+hkd", "ad+fitnet", "mfd")
EXTRA_METHODS = ("mmd",)


def composable_methods() -> tuple[str, ...]:
    return tuple(name for name, m in BASE_METHODS.items() if m.composable)


def _with_balanced_sampler(base: Method) -> Method:
    return replace(base, name=f"ss+{base.name}", label=f"SS+{base.label}", sampler="balanced", composable=False)


def _with_adversary(base: Method) -> Method:
    def moved(use: Use) -> Use:
        bound = use.bindings()
        rename = tuple((own, AD_RENAMED if name == AD_SEARCHED else name) for own, name in bound.items())
        return replace(use, rename=tuple(pair for pair in rename if pair[0] != pair[1]))

    renamed = tuple(moved(use) for use in base.terms)
    fixed = AD_RENAMED if base.searched == AD_SEARCHED else base.searched
    hint = (Use(base.hint_term),) if base.hint_term else ()  # AD+FitNet is one-stage: hint + KD from the start
    return Method(
        name=f"ad+{base.name}",
        label=f"AD+{base.label}",
        terms=hint + renamed + (Use("adversary"),),
        sampler=base.sampler,
        searched=AD_SEARCHED,
        fixed_from=((fixed, base.name),) if fixed else (),
        ce=base.ce,
    )


def register(method: Method) -> Method:
    """Add a plugin's method; its terms, sampler and hyperparameters must be registered first."""
    from fairtune.data.sampler import SAMPLERS

    if method.name in BASE_METHODS:
        raise UserError(f"method '{method.name}' is already registered")
    if "+" in method.name or not method.name or method.name != method.name.strip():
        raise UserError(f"method name {method.name!r} may not contain '+' (it composes ss+X / ad+X) or spaces")
    for use in method.terms:
        use.spec  # raises for an unknown term
    if method.hint_term:
        terms.get(method.hint_term)
    if method.sampler not in SAMPLERS:
        raise UserError(f"method '{method.name}': unknown sampler '{method.sampler}'; known: {', '.join(SAMPLERS)}")
    for name in (method.searched, *(p for p, _ in method.fixed_from)):
        if name:
            hyperparameters.get(name)
    BASE_METHODS[method.name] = method
    return method


def valid_method_names() -> str:
    return f"{', '.join(BASE_METHODS)}, and ss+X / ad+X for X in {', '.join(composable_methods())}"


def get_method(name: str) -> Method:
    """Resolve a CLI name, composing ``ss+`` / ``ad+`` prefixes; unknown names raise UserError."""
    if name not in BASE_METHODS:
        from fairtune.plugin import ensure_loaded

        ensure_loaded()
    if name in BASE_METHODS:
        return BASE_METHODS[name]
    prefix, plus, rest = name.partition("+")
    if plus and prefix in PREFIXES and rest in composable_methods():
        base = BASE_METHODS[rest]
        return _with_balanced_sampler(base) if prefix == "ss" else _with_adversary(base)
    raise UserError(f"unknown method '{name}'; valid: {valid_method_names()}")


def all_method_names() -> list[str]:
    """Paper methods in paper order, then the extras, every other composition, then plugins' methods."""
    composed = [f"{p}+{x}" for p in PREFIXES for x in composable_methods() if x in BUILTIN_METHODS]
    plugins = [name for name in BASE_METHODS if name not in BUILTIN_METHODS]
    plugins += [f"{p}+{x}" for p in PREFIXES for x in composable_methods() if x not in BUILTIN_METHODS]
    return list(dict.fromkeys([*PAPER_ORDER, *EXTRA_METHODS, *composed, *plugins]))


def in_paper_order(names) -> list[str]:
    """Distinct names in the paper's row order, then the extras, then any other name alphabetically."""
    known = all_method_names()
    return sorted(set(names), key=lambda n: (known.index(n) if n in known else len(known), n))
