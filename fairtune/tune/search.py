"""`fairtune search`: one method's hyperparameter on Ray Tune, Optuna TPE + ASHA.

The teacher (when the method needs one) is loaded from ``results/<D>/teachers/`` or trained as a
Ray task, and reaches every trial through the object store (``tune.with_parameters``), so no node
needs a shared filesystem for it. The experiment lives in ``results/<D>/search/<method>/``; the
search writes ``best.json`` and ``trials.csv`` beside Tune's files when it ends.
"""

from __future__ import annotations

import json
import pickletools
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import pandas as pd

from fairtune import io
from fairtune.data import DataOptions, dataset_info
from fairtune.engine import TrainConfig
from fairtune.errors import UserError
from fairtune.methods import get_method
from fairtune.metrics import objective_mode
from fairtune.schedule import asha_plan, default_grace_period  # noqa: F401 (default_grace_period: re-exported)
from fairtune.spaces import SPACES_DIR, SearchSpace, load_space
from fairtune.teachers import read_teacher_state, save_teacher, teacher_identity, teacher_paths
from fairtune.tune.cluster import check_resources, connect
from fairtune.tune.tasks import train_teacher_task

Printer = Callable[[str], None]


@dataclass(frozen=True)
class SearchSettings:
    base: TrainConfig  # method, epochs and fixed hyperparameters
    data: DataOptions
    data_dir: Path
    results_dir: Path
    num_samples: int = 16
    grace_period: int | None = None
    reduction_factor: int = 3
    max_concurrent: int | None = None
    cpus_per_trial: int = 1
    gpus_per_trial: float = 0.0
    max_failures: int = 2
    resume: bool = False
    address: str | None = None
    device: str = "auto"
    spaces_dir: Path = SPACES_DIR

    @property
    def experiment_dir(self) -> Path:
        return (Path(self.results_dir) / self.data.dataset / "search" / self.base.method).resolve()


def tune_space(space: SearchSpace) -> dict:
    from ray import tune

    if space.parameter is None:
        return {}
    if space.distribution == "choice":
        return {space.parameter: tune.choice(list(space.values))}
    return {space.parameter: tune.loguniform(space.low, space.high)}


def _teacher_state(settings: SearchSettings, say: Printer) -> dict | None:
    """The seed's teacher weights: from disk, or trained now as a Ray task with one trial's resources."""
    import ray

    options, info = settings.data, dataset_info(settings.data)
    record = teacher_paths(settings.results_dir, options.dataset, options.seed)
    if record.weights.exists():
        say(f"teacher: {record.weights}")
        return read_teacher_state(record, options, info)
    say(f"teacher: none at {record.weights}; training it first (a Ray task, {settings.base.epochs} epochs)")

    task = ray.remote(num_cpus=settings.cpus_per_trial, num_gpus=settings.gpus_per_trial)(train_teacher_task)
    state, metrics = ray.get(
        task.remote(settings.base, options, str(settings.data_dir), settings.device, settings.cpus_per_trial)
    )
    save_teacher(record, state, teacher_identity(options, info), settings.base.epochs, metrics)
    test = metrics["test"]
    say(f"teacher: wrote {record.weights} (test accuracy {test['accuracy']:.2f}, DEO_A {test['deo_a']:.2f})")
    return state


def _progress_callback(say: Printer, total: int, parameter: str | None, log_dir: Path, num_trials: int):
    from ray.tune import Callback

    class Progress(Callback):
        """One compact line per trial epoch; Ray's own tables are switched off (verbose=0)."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = f"{parameter}={trial.config[parameter]:<8.4g} " if parameter else ""
            say(
                f"  {trial.trial_id} {value}epoch {result['training_iteration']:>3}/{total}  obj {result['objective']:7.2f}  "
                f"acc {result['accuracy']:6.2f}  DEO_A {result['deo_a']:6.2f}  DEO_M {result['deo_m']:6.2f}"
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            done = sum(t.status in ("TERMINATED", "ERROR") for t in trials) + 1
            say(f"  {trial.trial_id} done after {trial.last_result.get('training_iteration', 0)} epochs ({done}/{num_trials} trials)")

        def on_trial_error(self, iteration, trials, trial, **info):
            say(f"  {trial.trial_id} FAILED: {_failure_reason(log_dir, trial.trial_id, trial.error_file)}")

    return Progress()


def _failure_reason(log_dir: Path, trial_id: str, error_file: str | Path | None) -> str:
    """The recorded non-finite reason, else the last line of Tune's error file."""
    from fairtune.tune.trainable import failure_marker

    marker = failure_marker(log_dir, trial_id)
    if marker.exists():
        return marker.read_text().strip()
    path = Path(error_file) if error_file else None
    if path is not None and path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return lines[-1].strip() if lines else "unknown error"
    return "unknown error"


def _has_state(experiment_dir: Path) -> bool:
    return any(experiment_dir.glob("experiment_state-*.json"))


# Tune's state, one set per driver session: experiment_state-<session>.json and its searcher's files.
_STATE_FILE = re.compile(r"(experiment_state|search_gen_state|searcher-state|basic-variant-state)-(.+)\.(json|pkl)")


def _is_whole(path: Path) -> bool:
    """A JSON document, or a pickle stream that reaches its STOP opcode (walked, never loaded)."""
    data = path.read_bytes()
    try:
        json.loads(data)
        return True
    except ValueError:
        pass
    try:
        for _ in pickletools.genops(data):
            pass
    except Exception:  # truncated: "pickle exhausted before seeing STOP", or garbage
        return False
    return bool(data)


def _drop_torn_state(folder: Path, say: Printer) -> None:
    """Tune saves its state in a staging folder and copies it here file by file, not atomically (every
    session's files, at every save): a driver killed mid-copy leaves torn files, on which Tuner.restore
    crashes. Drop the newest sessions' state while torn, so the restore takes the last whole one
    (trials since then re-run); when none is whole, say so and touch nothing."""
    sessions: dict[str, list[Path]] = {}
    for path in folder.iterdir():
        match = _STATE_FILE.fullmatch(path.name)
        if match and path.is_file():
            sessions.setdefault(match.group(2), []).append(path)
    newest_first = sorted(sessions, reverse=True)
    torn = {s: sorted(p.name for p in sessions[s] if not _is_whole(p)) for s in newest_first}
    whole = [s for s in newest_first if not torn[s]]
    if not newest_first or not torn[newest_first[0]]:
        return
    if not whole:
        raise UserError(
            f"the saved search state in {folder} is torn ({', '.join(sum(torn.values(), []))}), as by a kill while Ray "
            "Tune copied it there, and no older whole state is left to resume from; delete the folder to start over"
        )
    for session in newest_first[: newest_first.index(whole[0])]:
        say(f"the search state saved at {session} is torn ({', '.join(torn[session])}), as by a kill while it was "
            f"written; resuming from the state saved at {whole[0]}")
        for path in sessions[session]:
            path.unlink()


def run_search(settings: SearchSettings, say: Printer = print) -> dict:
    """Run (or resume) the search; returns the content written to ``best.json``."""
    method = get_method(settings.base.method)
    space = load_space(method.name, settings.spaces_dir)
    folder = settings.experiment_dir
    if settings.resume and folder.is_dir():
        _drop_torn_state(folder, say)
    if not _has_state(folder):
        if folder.exists():
            # Killed before Tune saved any state: nothing can be resumed (Tuner.restore would fail,
            # or run a single trial), and stale trial folders would mix into a new experiment.
            say(f"no saved search state in {folder}; starting the search afresh")
            shutil.rmtree(folder)
        settings = replace(settings, resume=False)
    elif not settings.resume:
        raise UserError(f"a search already exists in {folder}; pass --resume to continue it, or delete the folder to start over")

    resources = connect(settings.address)
    check_resources(resources, settings.cpus_per_trial, settings.gpus_per_trial)

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mode = objective_mode(settings.base.objective)
    epochs = settings.base.total_epochs
    teacher_state = _teacher_state(settings, say) if method.needs_teacher else None

    from fairtune.tune.trainable import LOG_FOLDER, TrialSpec, run_trial

    log_dir = folder / LOG_FOLDER
    log_dir.mkdir(parents=True, exist_ok=True)
    spec = TrialSpec(
        settings.base, settings.data, str(Path(settings.data_dir).resolve()), str(log_dir), settings.cpus_per_trial, settings.device
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec, teacher_state=teacher_state),
        {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
    )
    num_samples = settings.num_samples if space.parameter else 1
    if not space.parameter:
        say(f"{method.name} has no hyperparameter to search: running one trial")
    # ASHA counts stage-2 epochs: FitNet's hint stage is never judged, and FitNet gets as many rungs
    # over its stage 2 as other methods over their run (see fairtune.schedule for why).
    rungs = asha_plan(settings.base.epochs, settings.base.hint_epochs, settings.grace_period, settings.reduction_factor)
    scheduler = ASHAScheduler(
        metric="objective", mode=mode, time_attr=rungs.time_attr, max_t=rungs.max_t,
        grace_period=rungs.grace_period, reduction_factor=rungs.reduction_factor,
    )
    searcher = None
    if space.parameter:
        start = space.start(settings.data.dataset)
        searcher = OptunaSearch(
            metric="objective", mode=mode, points_to_evaluate=[{space.parameter: start}],
            sampler=optuna.samplers.TPESampler(seed=settings.data.seed),
        )
    run_config = tune.RunConfig(
        name=method.name,
        storage_path=str(folder.parent),
        verbose=0,
        callbacks=[_progress_callback(say, epochs, space.parameter, log_dir, num_samples)],
        # Two, not one: the experiment state saved on disk can lag the driver by a step, so after a crash
        # it may name a trial's previous checkpoint, which keeping one would already have deleted.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        failure_config=tune.FailureConfig(max_failures=settings.max_failures),
    )
    started = time.time()
    if settings.resume:
        say(f"resuming the search in {folder}")
        tuner = tune.Tuner.restore(str(folder), trainable, resume_unfinished=True, resume_errored=True)
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(space),
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                max_concurrent_trials=settings.max_concurrent,
            ),
            run_config=run_config,
        )
    grid = tuner.fit()
    trials = trials_table(grid, space.parameter, epochs, settings.base.objective, log_dir)
    io.write_text(folder / "trials.csv", trials.to_csv(index=False))
    best = best_record(trials, settings, space, epochs, time.time() - started)
    io.write_json(folder / "best.json", best)
    return best


def trial_id_of(trial_dir: Path) -> str:
    """Tune names trial folders `<trainable>_<id>_<n>_<params>_<time>`; run_trial has one underscore."""
    return trial_dir.name.split("_")[2]


def trials_table(grid, parameter: str | None, epochs: int, objective: str, log_dir: Path) -> pd.DataFrame:
    """One row per trial: its hyperparameter, final and best metrics, epochs run, status, failure reason."""
    mode = objective_mode(objective)
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        trial_dir = Path(result.path)
        trial_id = (result.metrics or {}).get("trial_id") or trial_id_of(trial_dir)
        row = {
            "trial_id": trial_id,
            parameter or "parameter": result.config.get(parameter) if parameter else None,
            "epochs_run": 0,
            "status": "ERROR" if result.error else "COMPLETED",
            "error": _failure_reason(log_dir, trial_id, trial_dir / "error.txt") if result.error else "",
        }
        if frame is not None and len(frame):
            frame = frame.drop_duplicates("training_iteration", keep="last").sort_values("training_iteration")
            last = frame.iloc[-1]
            best = frame.loc[frame["objective"].idxmax() if mode == "max" else frame["objective"].idxmin()]
            row["epochs_run"] = int(last["training_iteration"])
            if not result.error and row["epochs_run"] < epochs:
                row["status"] = "STOPPED"  # by ASHA
            for key in ("accuracy", "deo_a", "deo_m", "objective"):
                row[f"final_{key}"] = float(last[key])
                row[f"best_{key}"] = float(best[key])
            row["best_epoch"] = int(best["training_iteration"])
            row["final_acc_matrix"] = last.get("acc_matrix", "")
        rows.append(row)
    return pd.DataFrame(rows).sort_values("trial_id", kind="stable").reset_index(drop=True)


def best_record(trials: pd.DataFrame, settings: SearchSettings, space: SearchSpace, epochs: int, seconds: float) -> dict:
    """The chosen config: best final-epoch objective among trials that ran every epoch (SPEC §6
    reports the model after the last epoch), else among all trials that reported anything."""
    mode = objective_mode(settings.base.objective)
    scored = trials[trials["final_objective"].notna()] if "final_objective" in trials else trials.iloc[0:0]
    complete = scored[scored["status"] == "COMPLETED"]
    pool = complete if len(complete) else scored
    if not len(pool):
        raise UserError(
            f"every trial of the {settings.base.method} search failed (see {settings.experiment_dir / 'trials.csv'}); "
            "check the errors there, e.g. lower the λ range or --lr"
        )
    row = pool.loc[pool["final_objective"].idxmax() if mode == "max" else pool["final_objective"].idxmin()]
    hyper = {p: v for p, v in settings.base.hyperparameters().items()}
    if space.parameter:
        hyper[space.parameter] = float(row[space.parameter])
    return {
        "method": settings.base.method,
        "dataset": settings.data.dataset,
        "hyperparameters": hyper,
        "searched": space.parameter,
        "objective": settings.base.objective,
        "mode": mode,
        "objective_value": float(row["final_objective"]),
        "val": {
            "accuracy": float(row["final_accuracy"]),
            "deo_a": float(row["final_deo_a"]),
            "deo_m": float(row["final_deo_m"]),
            "acc_matrix": json.loads(row["final_acc_matrix"]) if row.get("final_acc_matrix") else None,
            "epoch": int(row["epochs_run"]),
        },
        "trial_id": row["trial_id"],
        "selection_split": settings.data.select_on,
        "budget": {
            "trials": int(len(trials)),
            "epochs_run": int(trials["epochs_run"].sum()),
            "epochs_if_no_early_stopping": int(len(trials) * epochs),
            "failed_trials": int((trials["status"] == "ERROR").sum()),
            "seconds": round(seconds, 1),
        },
        "settings": {
            "epochs": settings.base.epochs,
            "num_samples": settings.num_samples,
            "data": asdict(settings.data),
            "train": asdict(settings.base),
        },
    }
