"""ASHA's clock for a search (docs/protocol.md §7): which epochs a trial can be stopped at. Pure, Ray-free.

*Decision*: ASHA counts **stage-2 epochs** (``STAGE2_EPOCH``, reported by the engine every epoch),
with max_t = E and grace = E/10 for every method. For methods without a hint stage that is simply
the epoch. For ``fitnet`` / ``ss+fitnet`` (E/2 hint epochs, then E epochs of CE + KD) the hint
epochs count 0, so:

- no trial is judged before stage 2 has run ``grace`` ≥ 1 epochs (docs/protocol.md §7: T plays no part in the
  hint stage, so an objective there says nothing about the searched T);
- FitNet gets the same rungs over its stage 2 as HKD over its run (E=50, rf 3: after 5, 15 and 45
  KD epochs, i.e. trial epochs 30, 40, 70).

Why not the alternatives: counting ``training_iteration`` with the grace period shifted by the hint
stage (fairtune's earlier rule) gives ASHA a span of only max_t/grace = 75/30 = 2.5 < rf to place
geometric rungs in, so FitNet got one rung where others get three; counting ``training_iteration``
from an unshifted grace period would stop FitNet trials on hint-stage scores. The price is that every
FitNet trial pays its E/2 hint epochs, which docs/protocol.md §7 requires anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STAGE2_EPOCH = "stage2_epoch"  # the metric name ASHA's time_attr reads


def default_grace_period(epochs: int) -> int:
    """ASHA's first rung: a tenth of the run (at least one epoch)."""
    return max(1, epochs // 10)


def stage2_epoch(epochs_done: int, hint_epochs: int) -> int:
    """Epochs of the main (KD) stage done after ``epochs_done`` epochs of the run; 0 in the hint stage."""
    return max(0, epochs_done - hint_epochs)


def asha_milestones(grace_period: int, max_t: int, reduction_factor: int) -> list[int]:
    """The rungs, ascending, in ``time_attr`` units, of Ray Tune's ``ASHAScheduler`` (one bracket):
    grace·rf^k for k < ⌊log_rf(max_t / grace)⌋ + 1. A rung at max_t itself decides nothing, as a
    trial that reaches max_t stops anyway."""
    # Ray's own expression, numpy's log included: math.log rounds differently at exact powers
    # (log 243 / log 3 falls just below 5 with it, not with numpy), which would drop a rung.
    count = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
    return [grace_period * reduction_factor**k for k in range(count)]


@dataclass(frozen=True)
class AshaPlan:
    """ASHAScheduler's arguments for one search, and where its rungs fall in a trial's epochs."""

    time_attr: str
    max_t: int
    grace_period: int
    reduction_factor: int
    hint_epochs: int

    @property
    def milestones(self) -> list[int]:
        return asha_milestones(self.grace_period, self.max_t, self.reduction_factor)

    @property
    def rung_epochs(self) -> list[int]:
        """Trial epochs (1-based, hint epochs included) after which ASHA may stop a trial."""
        return [self.hint_epochs + m for m in self.milestones if m < self.max_t]


def asha_plan(epochs: int, hint_epochs: int, grace_period: int | None, reduction_factor: int) -> AshaPlan:
    """The ASHA schedule of a method trained for ``epochs`` (E) after ``hint_epochs`` of hints.

    ``grace_period`` (``--grace-period``) counts stage-2 epochs; None means E/10.
    """
    grace = min(grace_period or default_grace_period(epochs), epochs)
    return AshaPlan(STAGE2_EPOCH, epochs, grace, reduction_factor, hint_epochs)


__all__ = ["STAGE2_EPOCH", "AshaPlan", "asha_milestones", "asha_plan", "default_grace_period", "stage2_epoch"]
