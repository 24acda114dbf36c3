"""Multi-objective search vs scalar search on the same trial budget: the validation front each reaches.

MFD's λ on fmnist-s at a CPU shape (1,000 training images, 500 per evaluation split, 5 epochs, 8
trials, ASHA on, the same TPE seed and the paper's λ first in both). Arm 1 searches ``acc,deo_a``
(Optuna's multi-objective TPE; ASHA on the scalarisation accuracy - DEO_A). Arm 2 searches the scalar
``acc-deo_a``, today's default. For each: the hypervolume of the validation Pareto front of its
completed trials on (accuracy ↑, DEO_A ↓) against the fixed reference point accuracy 0 %, DEO_A 100 %
(the worst a model can score, so every completed trial counts), and the epochs it spent.

Hypervolume: ``fairtune.selection.hypervolume_2d``, hand-written because Optuna 5 keeps its own in a
private module (tests/test_selection.py checks the two agree). Needs Ray and the Fashion-MNIST files.

    python benchmarks/bench_pareto.py           # the full shape; appends an entry to RESULTS.md
    python benchmarks/bench_pareto.py --smoke   # 3 trials x 2 epochs on 200 images: checks it runs, writes nothing
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fairtune.tune.cluster import prepare_environment

prepare_environment(None)  # before anything imports ray: a loopback-only local Ray

import pandas as pd  # noqa: E402

from _timing import append_results, device  # noqa: E402
from bench_search import missing_prerequisite, run_arm  # noqa: E402
from fairtune.data import DataOptions, default_data_dir  # noqa: E402
from fairtune.engine import TrainConfig  # noqa: E402
from fairtune.selection import completed_trials, hypervolume_2d, losses, pareto_set  # noqa: E402
from fairtune.schedule import default_grace_period  # noqa: E402
from fairtune.tune.search import SearchSettings  # noqa: E402

METHOD, REDUCTION = "mfd", 3
ARMS = (("multi-objective acc,deo_a", "acc,deo_a"), ("scalar acc-deo_a", "acc-deo_a"))
# Accuracy 0 %, DEO_A 100 %, as losses (-accuracy, DEO_A): every real model is strictly inside.
REFERENCE = (0.0, 100.0)
BOX = 100.0 * 100.0  # the area between the ideal point (100 %, 0) and the reference


@dataclass(frozen=True)
class Shape:
    train_size: int
    eval_size: int
    epochs: int
    samples: int
    batch_size: int = 128


# 16 trials, fairtune's default: Optuna's TPE samples its first 10 trials at random (n_startup_trials)
# in both modes, so with fewer the two arms train the very same λ values.
FULL = Shape(train_size=1000, eval_size=500, epochs=5, samples=16)
SMOKE = Shape(train_size=200, eval_size=100, epochs=2, samples=3, batch_size=64)


def front_hypervolume(trials: pd.DataFrame) -> float:
    """Hypervolume (percentage points²) of the completed trials on (accuracy, DEO_A)."""
    points = losses(completed_trials(trials), ("acc", "deo_a"))
    return hypervolume_2d(points, (-REFERENCE[0], REFERENCE[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny shape that only checks the benchmark runs; RESULTS.md untouched")
    shape = SMOKE if parser.parse_args().smoke else FULL
    reason = missing_prerequisite()
    if reason:
        print(f"bench_pareto: skipped: {reason}")
        return
    dev = device()
    gpus = 0.5 if dev.type == "cuda" else 0.0  # fractional GPUs: two trials share one
    data = DataOptions("fmnist-s", seed=0, train_size=shape.train_size, eval_size=shape.eval_size)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, objective) in enumerate(ARMS):
            folder = Path(tmp) / f"arm{i}"
            if i:  # the teacher the first arm trained, outside both budgets
                shutil.copytree(Path(tmp) / "arm0" / data.dataset / "teachers", folder / data.dataset / "teachers")
            settings = SearchSettings(
                base=TrainConfig(method=METHOD, epochs=shape.epochs, batch_size=shape.batch_size, objective=objective), data=data,
                data_dir=default_data_dir(), results_dir=folder, num_samples=shape.samples, reduction_factor=REDUCTION,
                cpus_per_trial=1, gpus_per_trial=gpus, max_failures=0,
            )
            best, trials = run_arm(settings)
            results[name] = (settings, best, trials)

    rows, summary = [], {}
    for name, (settings, best, trials) in results.items():
        front = pareto_set(trials, "acc,deo_a")
        volume = front_hypervolume(trials)
        budget = best["budget"]
        shown = ", ".join(f"({r.final_accuracy:.1f}, {r.final_deo_a:.1f})" for r in front.sort_values("final_deo_a").itertuples())
        rows.append(
            f"| {name} | {volume:.0f} ({100 * volume / BOX:.2f} %) | {len(front)} of {len(completed_trials(trials))} | {shown} | "
            f"{budget['epochs_run']} of {budget['epochs_if_no_early_stopping']} | {int((trials['status'] == 'STOPPED').sum())} | "
            f"{budget['seconds']:.0f} s |"
        )
        summary[name] = {"hypervolume": volume, "front": front["trial_id"].tolist(), "epochs_run": budget["epochs_run"]}
    multi, scalar = (summary[name]["hypervolume"] for name, _ in ARMS)
    lines = [
        f"{METHOD} on fmnist-s, train-size {shape.train_size}, eval-size {shape.eval_size}, {shape.epochs} epochs, {shape.samples} trials "
        f"per arm (TPE seed 0; the paper's λ first); ASHA grace period {default_grace_period(shape.epochs)}, reduction factor "
        f"{REDUCTION}, on accuracy - DEO_A in both arms; {'1 CPU' + (f' + {gpus:g} GPU' if gpus else '')} per trial. One search per arm. "
        "Optuna's TPE samples its first 10 trials at random in both modes (n_startup_trials): the arms differ from trial 11 on.",
        f"Hypervolume of the validation Pareto front of each arm's completed trials on (accuracy ↑, DEO_A ↓), reference point "
        f"accuracy {REFERENCE[0]:g} %, DEO_A {REFERENCE[1]:g} %; in percentage points², and as a share of the {BOX:.0f} pp² box.",
        "",
        "| arm | hypervolume | front of completed | front (accuracy, DEO_A) | epochs run | trials stopped early | search wall time |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Multi-objective minus scalar hypervolume: {multi - scalar:+.0f} pp² ({100 * (multi - scalar) / BOX:+.2f} % of the box).",
    ]
    if shape is FULL:
        append_results(f"bench_pareto: multi-objective vs scalar search, {shape.samples} × {shape.epochs}", dev, lines)
    else:
        print("\n".join(["bench_pareto (smoke shape; RESULTS.md untouched)", *lines]))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
