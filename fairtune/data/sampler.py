"""Epoch index plans: which sample indices make up each mini-batch of one epoch.

A plan is a (num_batches, batch_size) int64 tensor drawn from a caller-owned ``torch.Generator``,
so the training loop can checkpoint the generator and a resumed run draws the same batches.
"""

from __future__ import annotations

from typing import Callable

import torch


def random_plan(num_samples: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Shuffled indices cut into full batches; the last partial batch is dropped (docs/protocol.md §6)."""
    num_batches = num_samples // batch_size
    if num_batches == 0:
        raise ValueError(f"{num_samples} training samples cannot fill one batch of {batch_size}")
    order = torch.randperm(num_samples, generator=generator)
    return order[: num_batches * batch_size].reshape(num_batches, batch_size)


def balanced_per_cell(batch_size: int, num_classes: int, num_groups: int) -> int:
    """Samples of each (class, group) cell in one balanced batch: floor(B / (C*G)).

    When B is not a multiple of C*G the batch is smaller than B (120 instead of 128 for 10 x 2
    cells) rather than unbalanced, unlike the official sampler (docs/protocol.md §3, `ss`).
    """
    per_cell = batch_size // (num_classes * num_groups)
    if per_cell == 0:
        raise ValueError(
            f"batch size {batch_size} is smaller than the {num_classes * num_groups} (class, group) cells; "
            "a balanced batch needs at least one sample of each"
        )
    return per_cell


def balanced_plan(
    labels: torch.Tensor,
    groups: torch.Tensor,
    num_classes: int,
    num_groups: int,
    batch_size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Strategic sampling: every batch holds exactly ``per_cell`` samples of every non-empty cell.

    An epoch has floor(n_max / per_cell) batches, n_max being the largest cell; each cell is drawn
    as repeated reshuffled passes over its members, so minority cells are oversampled and every
    sample of a cell with at most ``num_batches * per_cell`` members appears in each epoch. Empty
    cells (possible in tiny subsamples) are skipped, which shrinks the batch accordingly.
    """
    per_cell = balanced_per_cell(batch_size, num_classes, num_groups)
    cells = groups * num_classes + labels
    return stratum_balanced_plan(cells, num_classes * num_groups, per_cell, generator, "(class, group) cell")


def stratum_balanced_plan(
    strata: torch.Tensor, num_strata: int, per_stratum: int, generator: torch.Generator, what: str = "stratum"
) -> torch.Tensor:
    """Batches of exactly ``per_stratum`` samples of every non-empty stratum (a cell, a group ...).

    An epoch has floor(n_max / per_stratum) batches, n_max being the largest stratum; each stratum is
    drawn as repeated reshuffled passes over its members, so smaller strata are oversampled and every
    sample of a stratum with at most ``num_batches * per_stratum`` members appears in each epoch. Empty
    strata are skipped, which shrinks the batch. Every random number comes from ``generator``.
    """
    strata = strata.cpu()
    order = torch.argsort(strata, stable=True)
    counts = torch.bincount(strata, minlength=num_strata)
    num_batches = int(counts.max()) // per_stratum
    if num_batches == 0:
        raise ValueError(f"the largest {what} has fewer than {per_stratum} samples: no balanced batch fits")
    needed = num_batches * per_stratum
    columns = []
    start = 0
    for count in counts.tolist():  # one iteration per stratum per epoch, not per sample
        members = order[start : start + count]
        start += count
        if count == 0:
            continue
        passes = -(-needed // count)
        draws = torch.argsort(torch.rand(passes, count, generator=generator), dim=1)
        columns.append(members[draws.flatten()[:needed]].reshape(num_batches, per_stratum))
    return torch.cat(columns, dim=1)


# A sampler: (labels, groups, num_classes, num_groups, batch_size, generator) -> (num_batches, B) plan.
# Plugins add theirs with fairtune.plugin.sampler; a method names one by key.
Sampler = Callable[[torch.Tensor, torch.Tensor, int, int, int, torch.Generator], torch.Tensor]
SAMPLERS: dict[str, Sampler] = {
    "random": lambda labels, groups, num_classes, num_groups, batch_size, generator: random_plan(len(labels), batch_size, generator),
    "balanced": balanced_plan,
}


def register(name: str, sampler: Sampler) -> Sampler:
    from fairtune.errors import UserError

    if name in SAMPLERS and SAMPLERS[name] is not sampler:
        raise UserError(f"sampler '{name}' is already registered")
    SAMPLERS[name] = sampler
    return sampler
