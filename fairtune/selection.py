"""Named rules that pick a search's config from its trials, on validation metrics only.

A rule is written on the command line (`fairtune final --select RULE`, `fairtune report --select ...`):

- ``best``: the best final objective among completed trials (the search's own pick, ``best.json``);
- ``constrained:deo_a<=X`` (or ``deo_m``): the highest accuracy among trials whose validation DEO is at
  most X;
- ``utopia``: the smallest distance to the ideal point, each metric min-max normalised over the trials;
- ``knee``: the point of the validation Pareto front farthest from the line through its two ends.

The finals of ``best`` live in ``final/``, those of any other rule in ``final-<slug>/``, so a rule's
reruns never overwrite another's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fairtune.errors import UserError

RULES = ("best", "constrained", "utopia", "knee")
BOUNDED_METRICS = ("deo_a", "deo_m")
RULE_HELP = "best, constrained:deo_a<=X, constrained:deo_m<=X, utopia or knee"
_CONSTRAINED = re.compile(r"constrained:(?P<metric>\w+)<=(?P<bound>.*)")


@dataclass(frozen=True)
class Rule:
    name: str
    metric: str | None = None  # constrained: the bounded metric
    bound: float | None = None  # constrained: its bound, in percentage points

    @property
    def text(self) -> str:
        """The rule as written on the command line (canonical form)."""
        return f"constrained:{self.metric}<={self.bound:g}" if self.name == "constrained" else self.name

    @property
    def slug(self) -> str:
        """A folder-safe name: ``constrained:deo_a<=2.5`` -> ``constrained-deo_a-le-2.5``."""
        return f"constrained-{self.metric}-le-{self.bound:g}" if self.name == "constrained" else self.name

    @property
    def caption(self) -> str:
        """How the configs were chosen, for a table's caption."""
        if self.name == "constrained":  # the only caption with a bound to format (None for the others)
            return f"the highest validation accuracy among trials with validation {self.metric} ≤ {self.bound:g}"
        return {
            "best": "the best final validation objective among completed trials",
            "utopia": "the trial closest to the ideal point on validation (min-max normalised)",
            "knee": "the knee of the validation Pareto front",
        }[self.name]


BEST = Rule("best")


def parse_rule(text: str) -> Rule:
    """The rule ``text`` names; UserError (one line: what is wrong, what is valid) otherwise."""
    text = text.strip()
    if text in ("best", "utopia", "knee"):
        return Rule(text)
    match = _CONSTRAINED.fullmatch(text.replace(" ", ""))
    if match is None:
        raise UserError(f"--select {text!r}: unknown rule; valid: {RULE_HELP}")
    metric = match["metric"]
    if metric not in BOUNDED_METRICS:
        raise UserError(f"--select {text!r}: cannot bound {metric!r}; valid: {RULE_HELP}")
    try:
        bound = float(match["bound"])
    except ValueError:
        bound = float("nan")
    if not bound == bound or bound < 0 or bound == float("inf"):  # NaN, negative or infinite
        raise UserError(f"--select {text!r}: the bound must be a number ≥ 0 (DEO in percentage points), e.g. {metric}<=2.5")
    return Rule("constrained", metric, bound)


def final_dir(results_dir: Path, dataset: str, rule: Rule = BEST) -> Path:
    """Where the final reruns of the configs ``rule`` picks live."""
    name = "final" if rule.name == "best" else f"final-{rule.slug}"
    return Path(results_dir) / dataset / name


__all__ = ["BEST", "RULES", "RULE_HELP", "Rule", "final_dir", "parse_rule"]
