"""Search efficiency on fmnist-s at a shape that means something on CPU (16 trials, 12 epochs, 2,000
training images). Arm 1: ASHA + TPE (fairtune's default) searching MFD's λ. Arm 2: the same λ values,
every trial to the end (ASHA off), to rank ASHA's pick among all trials. Arm 3: an HKD search of T,
which now runs as a grid (7 values, each once); what it would have cost before is replayed exactly:
the same seeded TPE, the paper's value first, asked 16 times and told each value's recorded result —
a repeat costs what the value's trial cost (on CPU a repeat is bit-identical to the first run).
Needs Ray (the other benchmarks do not) and the Fashion-MNIST files.
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
from fairtune.layout import SearchDir  # noqa: E402
from fairtune.records import BestConfig  # noqa: E402
from fairtune.schedule import default_grace_period  # noqa: E402
from fairtune.tune.search import SearchSettings, run_search  # noqa: E402

METHOD, EPOCHS, SAMPLES, REDUCTION = "mfd", 12, 16, 3
DATA = DataOptions("fmnist-s", seed=0, train_size=2000, eval_size=1000)


def run_arm(settings: SearchSettings) -> tuple[BestConfig, pd.DataFrame]:
    best = run_search(settings, say=lambda line: None)
    trials = pd.read_csv(SearchDir(settings.experiment_dir).trials_csv, dtype={"trial_id": str})
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


def tpe_replay(trials: pd.DataFrame, space, num_samples: int, seed: int) -> list:
    """The values fairtune's former sampling would have trained: a seeded TPE with the paper's value
    first, asked ``num_samples`` times, each value told the grid's recorded result for it."""
    import optuna

    from fairtune.tune.search import _distribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial({space.parameter: space.start(DATA.dataset)})
    result = {float(r[space.parameter]): r for _, r in trials.iterrows()}
    asked = []
    for _ in range(num_samples):
        trial = study.ask({space.parameter: _distribution(space)})
        value = trial.params[space.parameter]
        asked.append(value)
        row = result[float(value)]
        if row["status"] == "STOPPED":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, row["final_objective"])
    return asked


def main() -> None:
    reason = missing_prerequisite()
    if reason:
        print(f"bench_search: skipped: {reason}")
        return
    from fairtune.spaces import load_space

    dev = device()
    gpus = 0.5 if dev.type == "cuda" else 0.0  # fractional GPUs: two trials share one
    with tempfile.TemporaryDirectory() as tmp:
        asha = SearchSettings(
            base=TrainConfig(method=METHOD, epochs=EPOCHS), data=DATA, data_dir=default_data_dir(),
            results_dir=Path(tmp) / "asha", num_samples=SAMPLES, reduction_factor=REDUCTION,
            cpus_per_trial=1, gpus_per_trial=gpus, max_failures=0,
        )
        asha_best, asha_trials = run_arm(asha)  # also trains the seed's teacher, outside the timed budget
        # Every trial to the end, on exactly ASHA's λ values: a choice space of them runs as a grid.
        spaces = Path(tmp) / "spaces"
        spaces.mkdir()
        values = ", ".join(repr(float(v)) for v in asha_trials["lam"])
        start = repr(float(asha_trials["lam"].iloc[0]))
        (spaces / f"{METHOD}.yaml").write_text(
            f"method: {METHOD}\nparameter: lam\ndistribution: choice\nvalues: [{values}]\ndefault: {start}\n"
        )
        full = replace(asha, results_dir=Path(tmp) / "full", grace_period=EPOCHS, spaces_dir=spaces)
        shutil.copytree(Path(tmp) / "asha" / DATA.dataset / "teachers", Path(tmp) / "full" / DATA.dataset / "teachers")
        full_best, full_trials = run_arm(full)
        hkd = replace(asha, base=TrainConfig(method="hkd", epochs=EPOCHS), results_dir=Path(tmp) / "asha")
        hkd_best, hkd_trials = run_arm(hkd)

    same_samples = sorted(asha_trials["lam"].round(10)) == sorted(full_trials["lam"].round(10))
    full_rank = full_trials.sort_values("final_objective", ascending=False)["lam"].round(10).tolist()
    rank_of_asha_pick = full_rank.index(round(asha_best.hyperparameters["lam"], 10)) + 1
    rows = []
    for name, best, trials in (("ASHA + TPE", asha_best, asha_trials), ("every trial to the end", full_best, full_trials)):
        budget = best.budget
        stopped = int((trials["status"] == "STOPPED").sum())
        epochs_per_trial = Spread(tuple(trials["epochs_run"].astype(float)))
        rows.append(
            f"| {name} | {budget['epochs_run']} of {SAMPLES * EPOCHS} | {stopped} | "
            f"{epochs_per_trial.text('.0f')} | {budget['seconds']:.0f} s | λ={best.hyperparameters['lam']:.4g} | "
            f"{best.objective_value:.2f} |"
        )
    saved = 1 - asha_best.budget["epochs_run"] / full_best.budget["epochs_run"]
    space = load_space("hkd")
    replay = tpe_replay(hkd_trials, space, SAMPLES, DATA.seed)
    cost = dict(zip(hkd_trials["T"].astype(float), hkd_trials["epochs_run"]))
    before = int(sum(cost[float(v)] for v in replay))
    after = hkd_best.budget["epochs_run"]
    lines = [
        f"{METHOD} on {DATA.dataset}, train-size {DATA.train_size}, eval-size {DATA.eval_size}, {EPOCHS} epochs, "
        f"{SAMPLES} trials (TPE seed {DATA.seed}; the paper's λ first), objective {asha.base.objective} on the validation split; "
        f"ASHA grace period {default_grace_period(EPOCHS)}, reduction factor {REDUCTION}; "
        f"{'1 CPU' + (f' + {gpus:g} GPU' if gpus else '')} per trial. One search per arm (the budget is the figure, not a timing).",
        f"Same λ values in both arms: {'yes' if same_samples else 'NO'}.",
        "",
        "| arm | epochs run | trials stopped early | epochs per trial, median (min–max) | search wall time | chosen | its final objective |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"ASHA spent {100 * saved:.0f} % fewer epochs; its pick ranks {rank_of_asha_pick} of {len(full_rank)} "
        "by final objective when every trial runs to the end.",
        "",
        f"hkd, T in {{{', '.join(f'{v:g}' for v in space.values)}}}, same sizes, ASHA on: the grid ran {len(hkd_trials)} trials, "
        f"{after} epochs, {hkd_best.budget['seconds']:.0f} s, chose T={hkd_best.hyperparameters['T']:g}. "
        f"The former sampling (replayed TPE) would have trained {len(set(replay))} distinct of {SAMPLES} proposals "
        f"({', '.join(f'{v:g}' for v in replay)}): {before} epochs. Saved: {before - after} epochs "
        f"({100 * (1 - after / before):.0f} %).",
    ]
    append_results("bench_search: ASHA at 16 × 12, and T searches as a grid", dev, lines)
    print(json.dumps({"asha": asha_best.budget, "full": full_best.budget, "hkd": hkd_best.budget, "hkd_before": before}))


if __name__ == "__main__":
    main()
