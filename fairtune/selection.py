"""Named rules that pick a search's config from its trials, on validation metrics only.

A rule is written on the command line (`fairtune final --select RULE`, `fairtune report --select ...`)
and applied to a finished search's ``trials.csv`` (``select_trial``: pandas, no Ray, nothing rerun):

- ``best``: the best final objective among completed trials (the search's own pick, ``best.json``;
  ``best_record`` in ``fairtune.tune.search`` calls ``select_trial`` with it). For a multi-objective
  search that objective is the scalarisation of its two (``fairtune.metrics.Objective``);
- ``constrained:deo_a<=X`` (or ``deo_m``): the highest accuracy among completed trials whose
  validation DEO is at most X; when none qualifies, a UserError names the closest trial (smallest DEO);
- ``utopia``: the completed trial nearest (Euclidean) to the ideal point — the best value of each of
  the two rule metrics over the completed trials — after min-max normalising each metric over them;
- ``knee``: on the Pareto front of the completed trials on the two rule metrics, normalised as for
  utopia, the point farthest from the line through the front's two extremes *on the ideal point's
  side* (a point beyond the line is a dent in the front, the worst trade-off there, not a knee). A
  front of one or two points, or one with no point on that side, gives its best point on the first
  rule metric (accuracy, when it is one).

The two rule metrics (``rule_metrics``) are the two objectives of a multi-objective search and
accuracy and DEO_A for a scalar one. A scalar search works for every rule: each of its trials records
accuracy, DEO_A and DEO_M at every epoch whatever the objective (trials.csv's ``final_*``), so its
completed trials can be ranked on any of them; the sampler simply aimed at another target.

Only trials that ran every epoch (COMPLETED) are candidates: a trial ASHA stopped was never trained
to the end. ``best`` alone falls back on every trial that reported something when none completed,
as the search always has. Ties go to the trial created first (the lower trial id: t003 before t010).

The finals of ``best`` live in ``final/``, those of any other rule in ``final-<slug>/``
(``fairtune.layout.Layout.final_dir``), so a rule's reruns never overwrite another's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fairtune.errors import UserError
from fairtune.metrics import DEFAULT_OBJECTIVE, METRIC_DIRECTIONS, METRIC_KEYS, parse_objective

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


COMPLETED = "COMPLETED"  # a trial that ran every epoch (fairtune.tune.ledger.COMPLETED)
RULE_METRICS_OF_SCALAR = ("acc", "deo_a")


def rule_metrics(objective: str = DEFAULT_OBJECTIVE) -> tuple[str, str]:
    """The two metrics utopia and knee weigh: a multi-objective search's own, else accuracy and DEO_A."""
    parsed = parse_objective(objective)
    return (parsed.metrics[0], parsed.metrics[1]) if parsed.multi else RULE_METRICS_OF_SCALAR


def _column(metric: str) -> str:
    return f"final_{METRIC_KEYS[metric]}"


def _first(pool: pd.DataFrame, key) -> pd.Series:
    """The row of ``pool`` with the smallest ``key`` (one number per row); ties go to the trial
    created first (t999 before t1000)."""
    ids = pool["trial_id"].astype(str).to_numpy()
    lengths = np.array([len(i) for i in ids])
    return pool.iloc[np.lexsort((ids, lengths, np.asarray(key, dtype=float)))[0]]


# Distances in normalised units are compared to 12 decimals, so a tie by construction (two trials
# as far from the ideal point) stays a tie despite rounding in the last bits, and goes to the lower id.
DECIMALS = 12


def completed_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials that ran every epoch and have final metrics."""
    if "status" not in trials or "final_accuracy" not in trials:
        return trials.iloc[0:0]
    return trials[(trials["status"] == COMPLETED) & trials["final_accuracy"].notna()]


def losses(trials: pd.DataFrame, metrics: tuple[str, str]) -> np.ndarray:
    """(n, 2): the two metrics' final values, signed so smaller is better (accuracy negated)."""
    signs = [-1.0 if METRIC_DIRECTIONS[m] == "max" else 1.0 for m in metrics]
    return trials[[_column(m) for m in metrics]].to_numpy(dtype=float).reshape(-1, 2) * signs


def normalised_losses(trials: pd.DataFrame, metrics: tuple[str, str]) -> np.ndarray:
    """``losses`` min-max normalised over ``trials``: per metric 0 the best value, 1 the worst; a
    metric all trials share is 0 for each (it cannot tell them apart)."""
    raw = losses(trials, metrics)
    if not len(raw):
        return raw
    low, span = raw.min(axis=0), raw.max(axis=0) - raw.min(axis=0)
    return np.where(span > 0, (raw - low) / np.where(span > 0, span, 1.0), 0.0)


def pareto_mask(losses: np.ndarray) -> np.ndarray:
    """True for each row of ``losses`` (smaller is better in every column) that no other row
    dominates: none is at most as large in every column and smaller in one. Equal rows are all kept."""
    losses = np.asarray(losses, dtype=float)
    at_most = (losses[:, None, :] <= losses[None, :, :]).all(axis=2)  # [j, i]: j is no worse than i anywhere
    smaller = (losses[:, None, :] < losses[None, :, :]).any(axis=2)  # [j, i]: j is better than i somewhere
    return ~(at_most & smaller).any(axis=0)


def pareto_set(trials: pd.DataFrame, objective: str = DEFAULT_OBJECTIVE) -> pd.DataFrame:
    """The completed trials no other completed trial beats on both rule metrics (a multi-objective
    search's two objectives), in trial order."""
    pool = completed_trials(trials)
    return pool[pareto_mask(losses(pool, rule_metrics(objective)))]


def hypervolume_2d(losses: np.ndarray, reference: tuple[float, float]) -> float:
    """Area dominated by the points of ``losses`` (smaller is better in both columns) and bounded by
    ``reference``; points not strictly better than it in both count for nothing.

    Hand-written because Optuna 5 keeps its own (``optuna._hypervolume.compute_hypervolume``) in a
    private module; in 2-D it is a sweep: sort by the first loss, add the strip each point's second
    loss improves on (tests/test_selection.py checks it against Optuna's and a grid count).
    """
    points = np.asarray(losses, dtype=float).reshape(-1, 2)
    points = points[(points[:, 0] < reference[0]) & (points[:, 1] < reference[1])]
    area, lowest = 0.0, float(reference[1])
    for x, y in sorted(map(tuple, points)):
        if y < lowest:
            area += (reference[0] - x) * (lowest - y)
            lowest = y
    return area


def select_trial(trials: pd.DataFrame, rule: Rule, objective: str = DEFAULT_OBJECTIVE, where: str = "the search") -> pd.Series:
    """The trials.csv row ``rule`` picks (see the module docstring); UserError, naming ``where``,
    when no trial qualifies."""
    if rule.name == "best":
        return _best(trials, objective, where)
    pool = completed_trials(trials)
    if not len(pool):
        raise UserError(f"--select {rule.text}: no trial of {where} ran every epoch (COMPLETED), so there is nothing to choose from")
    if rule.name == "constrained":
        return _constrained(pool, rule, where)
    normalised = normalised_losses(pool, rule_metrics(objective))
    if rule.name == "utopia":
        return _first(pool, np.round(np.hypot(normalised[:, 0], normalised[:, 1]), DECIMALS))
    return _knee(pool, normalised)


def _best(trials: pd.DataFrame, objective: str, where: str) -> pd.Series:
    scored = trials[trials["final_objective"].notna()] if "final_objective" in trials else trials.iloc[0:0]
    complete = scored[scored["status"] == COMPLETED]
    pool = complete if len(complete) else scored
    if not len(pool):
        raise UserError(f"--select best: no trial of {where} reported a result")
    values = pool["final_objective"].astype(float)
    return _first(pool, -values if parse_objective(objective).mode == "max" else values)


def _constrained(pool: pd.DataFrame, rule: Rule, where: str) -> pd.Series:
    deo = pool[_column(rule.metric)].astype(float)
    allowed = pool[deo <= rule.bound]
    if not len(allowed):
        closest = _first(pool, deo)
        raise UserError(
            f"--select {rule.text}: no completed trial of {where} has validation {rule.metric} <= {rule.bound:g}; the closest "
            f"is {closest['trial_id']} with {rule.metric} {float(closest[_column(rule.metric)]):.4g}: raise the bound or use another rule"
        )
    return _first(allowed, -allowed["final_accuracy"].astype(float))


def _knee(pool: pd.DataFrame, normalised: np.ndarray) -> pd.Series:
    on_front = pareto_mask(normalised)
    front, points = pool[on_front], normalised[on_front]
    # On a front the trials best on one metric are copies of one point: each extreme is one point.
    a, b = points[np.argmin(points[:, 0])], points[np.argmin(points[:, 1])]
    best_first = _first(front, points[:, 0])
    chord = b - a
    if len(front) <= 2 or not chord.any():
        return best_first
    normal = np.array([chord[1], -chord[0]]) / math.hypot(*chord)
    if np.dot(-a, normal) < 0:  # point the normal at the ideal point (the origin)
        normal = -normal
    towards_ideal = np.round((points - a) @ normal, DECIMALS)
    if not (towards_ideal > 0).any():  # a straight or concave front has no knee
        return best_first
    return _first(front, -towards_ideal)


__all__ = [
    "BEST", "RULES", "RULE_HELP", "Rule", "completed_trials", "hypervolume_2d", "losses", "normalised_losses",
    "pareto_mask", "pareto_set", "parse_rule", "rule_metrics", "select_trial",
]
