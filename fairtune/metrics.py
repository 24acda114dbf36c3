"""Group fairness metrics of docs/protocol.md §5: acc[g,c], DEO_A, DEO_M, accuracy, and the search objectives.

Definitions, for predictions on one evaluation split:
  acc[g, c]  accuracy among samples of group g and class c;
  gap[c]     max_g acc[g, c] - min_g acc[g, c], over the groups that have samples of class c;
  DEO_A      mean_c gap[c];   DEO_M   max_c gap[c];   accuracy  over all samples.
All are reported in percent. A cell with no samples has no accuracy: it is left out of its class's
gap and listed in ``empty_cells``; a class with fewer than two non-empty groups has no gap and is
left out of DEO_A/DEO_M (and listed in ``classes_without_gap``) instead of turning them into NaN.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

# Scalar search objectives: one number per epoch, maximised (accuracy-based) or minimised (pure DEO).
OBJECTIVES = ("acc-deo_a", "acc", "deo_a", "deo_m", "acc-deo_m")
DEFAULT_OBJECTIVE = OBJECTIVES[0]  # the paper's trade-off: accuracy minus DEO_A
# The metrics a multi-objective search takes two of (``--objective acc,deo_a``), in canonical order,
# with the key each has in a metrics dict (``final_<key>`` in trials.csv) and its better direction.
METRICS = ("acc", "deo_a", "deo_m")
METRIC_KEYS = {"acc": "accuracy", "deo_a": "deo_a", "deo_m": "deo_m"}
METRIC_DIRECTIONS = {"acc": "max", "deo_a": "min", "deo_m": "min"}
MAX_OBJECTIVES = 2
OBJECTIVE_HELP = f"{', '.join(OBJECTIVES)}, or two of {', '.join(METRICS)} joined by a comma (e.g. acc,deo_a)"


@dataclass(frozen=True)
class FairnessReport:
    accuracy: float
    deo_a: float
    deo_m: float
    acc_matrix: list[list[float | None]]  # [group][class], percent; None for an empty cell
    cell_counts: list[list[int]]  # [group][class]
    empty_cells: list[tuple[int, int]]  # (group, class)
    classes_without_gap: list[int]

    def as_dict(self) -> dict:
        return asdict(self)


def cell_tallies(
    labels: torch.Tensor, predictions: torch.Tensor, *, groups: torch.Tensor, num_classes: int, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, C) counts of correct predictions and of samples, on the tensors' device (no host sync).

    Tallies add up across batches, which is how the training loop evaluates a whole split.
    """
    cell = groups * num_classes + labels
    size = num_groups * num_classes
    correct = torch.bincount(cell, weights=(predictions == labels).to(torch.float64), minlength=size)
    total = torch.bincount(cell, minlength=size).to(torch.float64)
    return correct.reshape(num_groups, num_classes), total.reshape(num_groups, num_classes)


def group_class_accuracy(correct: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """(G, C) accuracy in percent, NaN where a cell is empty."""
    correct, total = correct.double().cpu(), total.double().cpu()
    return torch.where(total > 0, 100.0 * correct / total.clamp(min=1), torch.full_like(total, float("nan")))


def fairness_report(correct: torch.Tensor, total: torch.Tensor) -> FairnessReport:
    """Accuracy, DEO_A and DEO_M from per-cell tallies (see the module docstring)."""
    correct, total = correct.double().cpu(), total.double().cpu()
    if float(total.sum()) == 0:
        raise ValueError("cannot evaluate an empty split")
    acc = group_class_accuracy(correct, total)
    present = total > 0
    highest = torch.where(present, acc, torch.full_like(acc, -torch.inf)).amax(dim=0)
    lowest = torch.where(present, acc, torch.full_like(acc, torch.inf)).amin(dim=0)
    has_gap = present.sum(dim=0) >= 2
    gaps = (highest - lowest)[has_gap]
    return FairnessReport(
        accuracy=float(100.0 * correct.sum() / total.sum()),
        deo_a=float(gaps.mean()) if len(gaps) else 0.0,
        deo_m=float(gaps.max()) if len(gaps) else 0.0,
        acc_matrix=[[None if v != v else float(v) for v in row] for row in acc.tolist()],
        cell_counts=[[int(v) for v in row] for row in total.tolist()],
        empty_cells=[(int(g), int(c)) for g, c in torch.nonzero(~present).tolist()],
        classes_without_gap=torch.nonzero(~has_gap).flatten().tolist(),
    )


def evaluate_predictions(
    labels: torch.Tensor, predictions: torch.Tensor, *, groups: torch.Tensor, num_classes: int, num_groups: int
) -> FairnessReport:
    """Convenience for whole arrays at once: tallies then report."""
    correct, total = cell_tallies(
        torch.as_tensor(labels), torch.as_tensor(predictions), groups=torch.as_tensor(groups),
        num_classes=num_classes, num_groups=num_groups,
    )
    return fairness_report(correct, total)


@dataclass(frozen=True)
class Objective:
    """What a search optimises, defined once for every reader: the trainable's reported
    ``objective``, the ledger and trials.csv, ASHA's rungs, Optuna's study and best.json.

    A scalar objective (``acc-deo_a`` ...) is one number per epoch. A multi-objective one names two
    metrics (``acc,deo_a``): Optuna is told both (accuracy maximised, DEO minimised), and the single
    ``objective`` every epoch reports is their equal-weight scalarisation signed so bigger is better
    (``acc,deo_a`` -> accuracy - DEO_A, today's default scalar objective; ``deo_a,deo_m`` ->
    -(DEO_A + DEO_M)). ASHA's rungs and the ``best`` rule compare that scalarisation.
    """

    text: str  # canonical: a scalar name, or the metrics in METRICS order joined by a comma
    metrics: tuple[str, ...]  # multi-objective: the metrics Optuna optimises; scalar: (text,)

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1

    @property
    def directions(self) -> tuple[str, ...]:
        """'max' or 'min' per value Optuna is told."""
        if self.multi:
            return tuple(METRIC_DIRECTIONS[m] for m in self.metrics)
        return ("min" if self.text in ("deo_a", "deo_m") else "max",)

    @property
    def mode(self) -> str:
        """The direction of the scalar ``objective`` (Ray Tune's mode; the scalarisation is maximised)."""
        return "max" if self.multi else self.directions[0]

    @property
    def scalar_text(self) -> str:
        """The scalar ``objective`` written as a formula: ``acc-deo_a`` for ``acc,deo_a``."""
        if not self.multi:
            return self.text
        return "".join(("+" if METRIC_DIRECTIONS[m] == "max" else "-") + m for m in self.metrics).lstrip("+")

    def value(self, *, accuracy: float, deo_a: float, deo_m: float) -> float:
        """The scalar ``objective`` of one evaluation."""
        named = {"acc": accuracy, "deo_a": deo_a, "deo_m": deo_m}
        if self.multi:
            return sum(named[m] if METRIC_DIRECTIONS[m] == "max" else -named[m] for m in self.metrics)
        return {
            "acc-deo_a": accuracy - deo_a,
            "acc": accuracy,
            "deo_a": deo_a,
            "deo_m": deo_m,
            "acc-deo_m": accuracy - deo_m,
        }[self.text]

    def values(self, *, accuracy: float, deo_a: float, deo_m: float) -> tuple[float, ...]:
        """What Optuna is told for one evaluation: the metrics' values, or the scalar alone."""
        if not self.multi:
            return (self.value(accuracy=accuracy, deo_a=deo_a, deo_m=deo_m),)
        named = {"acc": accuracy, "deo_a": deo_a, "deo_m": deo_m}
        return tuple(named[m] for m in self.metrics)


@lru_cache(maxsize=None)
def parse_objective(text: str) -> Objective:
    """The objective ``text`` names; ValueError (one line: what is wrong, what is valid) otherwise.
    Two metrics are put in canonical order (``deo_a,acc`` is ``acc,deo_a``): the same search."""
    text = text.strip()
    if text in OBJECTIVES:
        return Objective(text, (text,))
    if "," not in text:
        raise ValueError(f"invalid choice: {text!r} (choose from {OBJECTIVE_HELP})")
    names = [part.strip() for part in text.split(",")]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"{text!r} names an unknown metric {unknown[0]!r}; a multi-objective search takes two of {', '.join(METRICS)}")
    repeated = [n for n in METRICS if names.count(n) > 1]
    if repeated:
        raise ValueError(f"{text!r} names {repeated[0]} twice; name two different metrics of {', '.join(METRICS)}")
    if len(names) > MAX_OBJECTIVES:
        raise ValueError(f"{text!r} names {len(names)} metrics; a multi-objective search takes exactly two of {', '.join(METRICS)}")
    metrics = tuple(m for m in METRICS if m in names)
    return Objective(",".join(metrics), metrics)


def objective_value(name: str, *, accuracy: float, deo_a: float, deo_m: float) -> float:
    """The search objective's scalar value (see ``Objective``)."""
    return parse_objective(name).value(accuracy=accuracy, deo_a=deo_a, deo_m=deo_m)


def objective_mode(name: str) -> str:
    """'max' or 'min' for Ray Tune (the direction of the scalar objective)."""
    return parse_objective(name).mode
