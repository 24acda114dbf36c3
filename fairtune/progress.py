"""The one per-epoch progress line every command prints (`train`, `teacher`, the search's trials, the
final runs, and through them protocol.log):

    [label ]epoch   e/E  [split ]acc  AA.AA  DEO_A  DD.DD  DEO_M  MM.MM  obj  OO.OO  | [stage ]loss L (terms)  lr R  S.S s

Parts whose metrics an epoch record lacks are left out (a final's progress queue may carry only
accuracy and DEO_A; Tune's results carry no stage), so each command shows what it has, the same way.
"""

from __future__ import annotations

from typing import Mapping


def epoch_line(
    metrics: Mapping, total: int, label: str = "", split: str | None = None, seconds: float | None = None
) -> str:
    """One epoch's line from its metrics (the engine's record, or a part of it with ``epoch``,
    ``accuracy`` and ``deo_a``); ``split``: the split the metrics are measured on; ``seconds``: the
    epoch's duration."""
    parts = [f"{label + ' ' if label else ''}epoch {metrics['epoch']:>3}/{total}"]
    scores = [f"{split + ' ' if split else ''}acc {metrics['accuracy']:6.2f}", f"DEO_A {metrics['deo_a']:6.2f}"]
    if "deo_m" in metrics:
        scores.append(f"DEO_M {metrics['deo_m']:6.2f}")
    if "objective" in metrics:
        scores.append(f"obj {metrics['objective']:7.2f}")
    parts.append("  ".join(scores))
    if "train/loss" in metrics:
        terms = " ".join(f"{k[6:]} {v:.4g}" for k, v in metrics.items() if k.startswith("train/") and k != "train/loss")
        stage = f"{metrics['stage']} " if "stage" in metrics else ""
        train = f"| {stage}loss {metrics['train/loss']:.4f}" + (f" ({terms})" if terms else "")
        if "lr" in metrics:
            train += f"  lr {metrics['lr']:.1e}"
        parts.append(train)
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)


__all__ = ["epoch_line"]
