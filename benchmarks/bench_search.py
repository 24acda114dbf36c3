"""Search efficiency on fmnist-s: ASHA + TPE (fairtune's default) vs the same search with early
stopping switched off (ASHA's grace period = the whole run), MFD's λ, same seed, so TPE samples the
same λ values in both (they are all start-up samples). Reports epochs spent, wall time and the best
objective each finds. Needs Ray (the other benchmarks do not) and the Fashion-MNIST files.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from fairtune.tune.cluster import prepare_environment

prepare_environment(None)  # before anything imports ray: a loopback-only local Ray

import pandas as pd  # noqa: E402

from _timing import Spread, append_results, device  # noqa: E402
from fairtune.data import DataOptions, default_data_dir  # noqa: E402
from fairtune.engine import TrainConfig  # noqa: E402
from fairtune.tune.search import SearchSettings, default_grace_period, run_search  # noqa: E402

METHOD, EPOCHS, SAMPLES, REDUCTION = "mfd", 4, 6, 3
DATA = DataOptions("fmnist-s", seed=0, train_size=1000, eval_size=500)


def run_arm(settings: SearchSettings) -> tuple[dict, pd.DataFrame]:
    best = run_search(settings, say=lambda line: None)
    trials = pd.read_csv(settings.experiment_dir / "trials.csv", dtype={"trial_id": str})
    return best, trials


def missing_prerequisite() -> str | None:
    """Why this benchmark cannot run here (``make bench`` installs both), or None."""
    import importlib.util

    from fairtune.data import fmnist

    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install 'ray[tune]')"
    if fmnist.locate(default_data_dir()) is None:
        return f"no Fashion-MNIST found ({fmnist.EXPECTED})"
    return None


def main() -> None:
    reason = missing_prerequisite()
    if reason:
        print(f"bench_search: skipped: {reason}")
        return
    dev = device()
    gpus = 0.5 if dev.type == "cuda" else 0.0  # fractional GPUs: two trials share one
    with tempfile.TemporaryDirectory() as tmp:
        asha = SearchSettings(
            base=TrainConfig(method=METHOD, epochs=EPOCHS), data=DATA, data_dir=default_data_dir(),
            results_dir=Path(tmp) / "asha", num_samples=SAMPLES, reduction_factor=REDUCTION,
            cpus_per_trial=1, gpus_per_trial=gpus, max_failures=0,
        )
        full = replace(asha, results_dir=Path(tmp) / "full", grace_period=EPOCHS)
        asha_best, asha_trials = run_arm(asha)  # also trains the seed's teacher, outside the timed budget
        shutil.copytree(Path(tmp) / "asha" / DATA.dataset / "teachers", Path(tmp) / "full" / DATA.dataset / "teachers")
        full_best, full_trials = run_arm(full)

    same_samples = sorted(asha_trials["lam"].round(10)) == sorted(full_trials["lam"].round(10))
    full_rank = full_trials.sort_values("final_objective", ascending=False)["lam"].round(10).tolist()
    rank_of_asha_pick = full_rank.index(round(asha_best["hyperparameters"]["lam"], 10)) + 1
    rows = []
    for name, best, trials in (("ASHA + TPE", asha_best, asha_trials), ("every trial to the end", full_best, full_trials)):
        budget = best["budget"]
        stopped = int((trials["status"] == "STOPPED").sum())
        epochs_per_trial = Spread(tuple(trials["epochs_run"].astype(float)))
        rows.append(
            f"| {name} | {budget['epochs_run']} of {budget['epochs_if_no_early_stopping']} | {stopped} | "
            f"{epochs_per_trial.text('.0f')} | {budget['seconds']:.0f} s | λ={best['hyperparameters']['lam']:.4g} | "
            f"{best['objective_value']:.2f} |"
        )
    saved = 1 - asha_best["budget"]["epochs_run"] / full_best["budget"]["epochs_run"]
    lines = [
        f"{METHOD} on {DATA.dataset}, train-size {DATA.train_size}, eval-size {DATA.eval_size}, {EPOCHS} epochs, "
        f"{SAMPLES} trials (TPE seed {DATA.seed}; the paper's λ first), objective {asha.base.objective} on the validation split; "
        f"ASHA grace period {default_grace_period(EPOCHS)}, reduction factor {REDUCTION}; "
        f"{'1 CPU' + (f' + {gpus:g} GPU' if gpus else '')} per trial. One search per arm (the budget is the figure, not a timing).",
        f"Same λ samples in both arms: {'yes' if same_samples else 'NO'}.",
        "",
        "| arm | epochs run | trials stopped early | epochs per trial, median (min–max) | search wall time | chosen | its final objective |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"ASHA spent {100 * saved:.0f} % fewer epochs; its pick ranks {rank_of_asha_pick} of {len(full_rank)} "
        "by final objective when every trial runs to the end.",
    ]
    append_results("bench_search: ASHA + TPE vs no early stopping", dev, lines)
    print(json.dumps({"asha": asha_best["budget"], "full": full_best["budget"]}))


if __name__ == "__main__":
    main()
