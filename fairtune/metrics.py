"""Group fairness metrics of SPEC §5: acc[g,c], DEO_A, DEO_M, accuracy, and the search objectives.

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

import torch

OBJECTIVES = ("acc-deo_a", "acc", "deo_a", "deo_m", "acc-deo_m")


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


def objective_value(name: str, *, accuracy: float, deo_a: float, deo_m: float) -> float:
    """The search objective (maximised for accuracy-based ones, minimised for pure DEO ones)."""
    values = {
        "acc-deo_a": accuracy - deo_a,
        "acc": accuracy,
        "deo_a": deo_a,
        "deo_m": deo_m,
        "acc-deo_m": accuracy - deo_m,
    }
    if name not in values:
        raise ValueError(f"unknown objective '{name}'; valid: {', '.join(OBJECTIVES)}")
    return values[name]


def objective_mode(name: str) -> str:
    """'max' or 'min' for Ray Tune / Optuna."""
    return "min" if name in ("deo_a", "deo_m") else "max"
