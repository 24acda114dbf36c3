"""Trials starting together (`--max-concurrent` = the cluster's slots) against the default, Tune's own
for a custom searcher, which keeps one trial starting at a time (docs/ray.md, "Tune API details the
code depends on"; `TUNE_MAX_PENDING_TRIALS_PG=1` pins it even with max_concurrent_trials set, so both
arms pass the same settings). Short trials (1 epoch, 200 images) so that starting a trial's worker
is a large part of each one, as it is for packed GPU trials. The same search (AD's λ, no teacher to
train) runs in both arms, interleaved, on a local Ray.
Needs Ray and the Fashion-MNIST files.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fairtune.tune.cluster import prepare_environment

prepare_environment(None)  # before anything imports ray: a loopback-only local Ray

from _timing import Spread, append_results, device, ratio  # noqa: E402
from bench_search import missing_prerequisite  # noqa: E402
from fairtune.data import DataOptions, default_data_dir  # noqa: E402
from fairtune.engine import TrainConfig  # noqa: E402
from fairtune.tune.search import SearchSettings, run_search  # noqa: E402

METHOD, SAMPLES, ROUNDS = "ad", 8, 3
DATA = DataOptions("fmnist-s", seed=0, train_size=200, eval_size=200)
PENDING = "TUNE_MAX_PENDING_TRIALS_PG"


def trial_slots(resources: dict, cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials the cluster holds at once: its totals divided by one trial's request."""
    fits = [resources.get(key, 0) / need for key, need in (("CPU", cpus_per_trial), ("GPU", gpus_per_trial)) if need > 0]
    return max(1, int(min(fits) + 1e-9)) if fits else 1


def tune_seconds(results: Path, slots: int, one_at_a_time: bool) -> float:
    """Seconds of the Tune phase of one search (its budget's figure: Ray's start and the data check
    are outside it)."""
    settings = SearchSettings(
        base=TrainConfig(method=METHOD, epochs=1), data=DATA, data_dir=default_data_dir(), results_dir=results,
        num_samples=SAMPLES, grace_period=1, cpus_per_trial=1, gpus_per_trial=0.5 if device().type == "cuda" else 0.0,
        max_concurrent=slots, max_failures=0,
    )
    if one_at_a_time:
        os.environ[PENDING] = "1"
    try:
        return run_search(settings, say=lambda line: None).budget["seconds"]
    finally:
        os.environ.pop(PENDING, None)


def main() -> None:
    reason = missing_prerequisite()
    if reason:
        print(f"bench_trial_starts: skipped: {reason}")
        return

    from fairtune.tune.cluster import connect

    seconds: dict[str, list[float]] = {"one at a time": [], "together": []}
    with tempfile.TemporaryDirectory() as tmp:
        slots = trial_slots(connect(None), 1, 0.5 if device().type == "cuda" else 0.0)
        tune_seconds(Path(tmp) / "warm-up", slots, False)  # Ray's start and the first workers' imports, untimed
        for round_ in range(ROUNDS):
            for arm in seconds:
                seconds[arm].append(tune_seconds(Path(tmp) / f"{arm}-{round_}".replace(" ", "-"), slots, arm == "one at a time"))
    before, after = Spread(tuple(seconds["one at a time"])), Spread(tuple(seconds["together"]))
    append_results(
        "bench_trial_starts: trials starting together vs one at a time",
        device(),
        [
            f"{METHOD} on {DATA.dataset}, train-size {DATA.train_size}, eval-size {DATA.eval_size}, {SAMPLES} trials × 1 epoch, "
            f"{slots} slots; {ROUNDS} interleaved rounds after an untimed warm-up. Tune-phase seconds, median (min–max):",
            "",
            "| arm | seconds |",
            "|---|---|",
            f"| one trial starting at a time (the default, Tune's for a custom searcher) | {before.text('.1f')} |",
            f"| --max-concurrent {slots} (the slots, started together) | {after.text('.1f')} |",
            "",
            f"Speed-up: {ratio(before, after).text('.2f', '×')}.",
        ],
    )


if __name__ == "__main__":
    main()
