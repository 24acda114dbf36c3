"""The hyperparameter table: the one place a hyperparameter's name is spelled out.

Each row says how the CLI takes the value (``flag``), how tables and plots write it (``symbol``),
which values are valid, and the search space a method searching it gets when it ships no YAML of its
own. The CLI, configs, search spaces, reports, TensorBoard and best configs all read this table;
loss terms read values by name from a run's mapping. Plugins add rows with
:func:`fairtune.plugin.hyperparameter`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fairtune.errors import UserError
from fairtune.registry import lookup


@dataclass(frozen=True)
class Hyperparameter:
    name: str  # the key in configs, records, search spaces and Tune's trial configs
    symbol: str  # in tables, plots and TensorBoard
    help: str  # one line for --help and TensorBoard's description
    positive: bool = False  # True: > 0 (a temperature); False: >= 0 (a weight)
    # The space of a method that searches it without a YAML of its own: "choice" with ``values``,
    # or "loguniform" over ``(low, high)``; ``default`` is evaluated first.
    distribution: str = "loguniform"
    values: tuple[float, ...] = ()
    low: float | None = 1e-4
    high: float | None = 1e2
    default: float = 1.0
    description: str = field(default="", compare=False)  # `fairtune list`: the standard space in words

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def problem(self, value: float) -> str | None:
        """Why ``value`` is invalid, or None."""
        ok = math.isfinite(value) and (value > 0 if self.positive else value >= 0)
        return None if ok else f"{self.flag} {value} is out of range; use a finite value {'> 0' if self.positive else '>= 0'}"

    def space_text(self) -> str:
        if self.description:
            return self.description
        if self.distribution == "choice":
            return f"{self.name} in {{{','.join(f'{v:g}' for v in self.values)}}}"
        return f"{self.symbol} log-uniform [{self.low:g}, {self.high:g}]"


HYPERPARAMETERS: dict[str, Hyperparameter] = {}


def register(row: Hyperparameter) -> Hyperparameter:
    """Add a row; a name (or flag) already in the table is refused unless the row is identical."""
    known = HYPERPARAMETERS.get(row.name)
    if known is not None and known != row:
        raise UserError(f"hyperparameter '{row.name}' is already registered with other settings")
    if not row.name.isidentifier():
        raise UserError(f"hyperparameter name {row.name!r} must be a Python identifier (it becomes the flag {row.flag})")
    if row.distribution not in ("choice", "loguniform"):
        raise UserError(f"hyperparameter '{row.name}': distribution must be choice or loguniform, not {row.distribution!r}")
    HYPERPARAMETERS[row.name] = row
    return row


def get(name: str) -> Hyperparameter:
    return lookup(HYPERPARAMETERS, name, "hyperparameter")


def symbol(name: str) -> str:
    row = HYPERPARAMETERS.get(name)
    return row.symbol if row else name


def check(values: dict[str, float]) -> None:
    """UserError for the first invalid value."""
    for name, value in values.items():
        why = get(name).problem(value)
        if why:
            raise UserError(why)


# The built-in rows. The T grid and the λ range are docs/protocol.md §3's standard spaces.
register(Hyperparameter(
    "T", "T", "KD temperature", positive=True, distribution="choice", values=(1, 2, 3, 4, 5, 10, 20), low=None,
    high=None, default=4.0,
))
register(Hyperparameter("lam", "λ", "the method's loss weight λ", description="λ log-uniform [1e-4, 1e2]"))
register(Hyperparameter("distill_lam", "λ_distill", "λ of the distillation term in ad+at / ad+nst (fixed)", description="λ log-uniform [1e-4, 1e2]"))
