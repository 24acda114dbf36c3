"""`fairtune search`: one method's hyperparameter on Ray Tune, Optuna TPE + ASHA.

The teacher (when the method needs one) is loaded from ``results/<D>/teachers/`` or trained as a
Ray task, and reaches every trial through the object store (``tune.with_parameters``), so no node
needs a shared filesystem for it. The experiment lives in ``results/<D>/search/<method>/``; the
search writes ``best.json`` and ``trials.csv`` beside Tune's files when it ends.

A multi-objective search (``--objective acc,deo_a``: two of acc, deo_a, deo_m; ``fairtune.metrics.
Objective`` defines them) keeps the same machinery. Optuna's study is created with both directions
and its TPESampler samples as MOTPE. Each trial is told COMPLETE with its two final-epoch values,
PRUNED when ASHA stopped it, FAIL on an error; it is never given intermediate values, which
``Trial.report`` refuses in a multi-objective study. ASHA needs one number, so it ranks the trials at
its rungs on the equal-weight scalarisation every epoch reports as ``objective`` (accuracy - DEO_A
for acc,deo_a: today's default objective); see ``run_search``. ``best.json`` holds the trial best on
that scalarisation (the ``best`` rule: ``fairtune final`` without ``--select`` reruns it), names the
objectives, and lists the validation Pareto set, written in full to ``pareto.csv`` beside
``trials.csv``; other picks from the front are named rules (``fairtune.selection``).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import pandas as pd

from fairtune import io
from fairtune.data import DataOptions, dataset_info
from fairtune.engine import TrainConfig
from fairtune.errors import UserError
from fairtune.layout import HINT_STAGE, TUNE_FOLDER, Layout, SearchDir
from fairtune.methods import get_method
from fairtune.metrics import objective_mode, parse_objective
from fairtune.records import BestConfig, BestSettings, ValMetrics
from fairtune.progress import epoch_line
from fairtune.schedule import asha_plan
from fairtune.selection import BEST, pareto_set, select_trial
from fairtune.spaces import SPACES_DIR, SearchSpace, load_space
from fairtune.teachers import TeacherProvider
from fairtune.tune.cluster import check_resources, connect
from fairtune.tune.ledger import (
    COMPLETED, ERROR, FINISHED, RUNNING, STOPPED, TRIAL_KEY, Ledger, TrialRecord, differences, trials_table,
)
from fairtune.tune.tasks import train_teacher_task

Printer = Callable[[str], None]
STUDY_NAME = "search"
OBJECTIVE_ATTR = "objective"  # the study's user attribute naming the --objective it was created for
MAX_REPEATS = 50  # proposals in a row that repeat a trained config before one is picked by hand


class SearchInterrupted(Exception):
    """The search ended before every trial finished (Ctrl-C): the ledger keeps it resumable."""


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
        return Layout(self.results_dir, self.data.dataset).search(self.base.method).path.resolve()




def teacher_state(settings: SearchSettings, say: Printer) -> dict | None:
    """The seed's teacher weights: from disk, or trained now as a Ray task with one trial's resources."""
    import ray

    options, info = settings.data, dataset_info(settings.data, settings.data_dir)
    teachers = TeacherProvider(settings.results_dir, options.dataset, settings.base)
    record = teachers.files(options.seed)

    def train(base, options):
        say(f"teacher: none at {record.weights}; training it first (a Ray task, {base.epochs} epochs)")
        task = ray.remote(num_cpus=settings.cpus_per_trial, num_gpus=settings.gpus_per_trial)(train_teacher_task)
        return ray.get(task.remote(base, options, str(settings.data_dir), settings.device, settings.cpus_per_trial))

    state, trained = teachers.get(options, info, train)
    if not trained:
        say(f"teacher: {record.weights}")
        return state
    test = json.loads(record.metrics.read_text())["test"]
    say(f"teacher: wrote {record.weights} (test accuracy {test['accuracy']:.2f}, DEO_A {test['deo_a']:.2f})")
    return state


def _shared_hint_stage(settings: SearchSettings, space: SearchSpace, teacher_state: dict, say: Printer) -> None:
    """FitNet's stage 1 reads no T: train it once, as a Ray task, for every trial of the search to
    continue from (written atomically; a resumed search reuses it)."""
    import ray

    from fairtune.tune.tasks import hint_stage_task

    folder = SearchDir(settings.experiment_dir)
    target = folder.hint_stage_state
    if target.exists():
        return
    say(f"hint stage: training FitNet's stage 1 ({settings.base.hint_epochs} epochs) once, for every trial to continue from")
    config = settings.base.with_hyperparameters({space.parameter: space.start(settings.data.dataset)})
    task = ray.remote(num_cpus=settings.cpus_per_trial, num_gpus=settings.gpus_per_trial)(hint_stage_task)
    state = ray.get(task.remote(
        config, settings.data, str(Path(settings.data_dir).resolve()), settings.device, settings.cpus_per_trial,
        teacher_state, str(folder.epoch_log(HINT_STAGE)),
    ))
    io.save_torch(target, state)


# -- the search's hooks into Tune: searcher, scheduler and callback all read and write the ledger ---------


def _open_study(folder: Path, space: SearchSpace, objective: str, seed: int, dataset: str, grid: bool):
    """The searcher's memory in Optuna's own storage (SQLite, transactional, so a kill never tears it;
    ``optuna-dashboard sqlite:///…/optuna.db`` opens it). Created with the paper's value enqueued first,
    and the objective it optimises recorded in it (what each trial is told follows from that)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{SearchDir(folder).study}")
    existed = bool(optuna.study.get_all_study_names(storage))
    goal = parse_objective(objective)
    directions = ["maximize" if d == "max" else "minimize" for d in goal.directions]
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=storage, load_if_exists=True,
        **({"directions": directions} if goal.multi else {"direction": directions[0]}),
        # TPESampler handles several directions itself (MOTPE: optuna/samplers/_tpe/sampler.py).
        # A resumed search reseeds with the number of trials so far: never re-proposes the same sequence.
        sampler=optuna.samplers.TPESampler(seed=seed),
    )
    if OBJECTIVE_ATTR not in study.user_attrs:  # (checked, not assumed: a kill may fall right after creation)
        study.set_user_attr(OBJECTIVE_ATTR, goal.text)
    if not existed:
        for value in _first_values(space, dataset, grid):
            study.enqueue_trial({space.parameter: value})
    return study


def _first_values(space: SearchSpace, dataset: str, grid: bool) -> list:
    """What the sampler is given first: the paper's value; for a grid, then every other value in order."""
    start = space.start(dataset)
    return [start, *(v for v in space.values if v != start)] if grid else [start]


def is_grid(space: SearchSpace, num_samples: int) -> bool:
    """A categorical space with no more values than trials is run as a grid, each value once: TPE would
    otherwise propose repeats (7 distinct of 16 for T), each a config trained again for nothing."""
    return space.distribution == "choice" and len(space.values) <= num_samples


def _distribution(space: SearchSpace):
    import optuna

    if space.distribution == "choice":
        return optuna.distributions.CategoricalDistribution(list(space.values))
    return optuna.distributions.FloatDistribution(space.low, space.high, log=True)


def _tell(study, trial: TrialRecord) -> None:
    """Give Optuna a finished trial exactly once: its per-epoch objectives as intermediate values (a
    single-objective study only), then COMPLETE with the last epoch's value(s), PRUNED when ASHA
    stopped it, FAIL on an error."""
    import optuna

    if trial.optuna_number is None:
        return
    frozen = study.get_trials(deepcopy=False)[trial.optuna_number]
    if frozen.state.is_finished():
        return
    if len(study.directions) == 1:  # Trial.report raises NotImplementedError in a multi-objective study
        live = optuna.Trial(study, frozen._trial_id)
        for record in trial.epochs:
            if record["epoch"] not in frozen.intermediate_values:
                live.report(record["objective"], record["epoch"])
    _tell_result(study, trial.optuna_number, trial)


def _told_values(study, epoch: dict) -> float | list[float]:
    """What Optuna is told for a trial that ended at ``epoch``: its objective, or in a
    multi-objective study the values of the metrics the study was created for."""
    if len(study.directions) == 1:
        return epoch["objective"]
    goal = parse_objective(study.user_attrs[OBJECTIVE_ATTR])
    return list(goal.values(accuracy=epoch["accuracy"], deo_a=epoch["deo_a"], deo_m=epoch["deo_m"]))


def _tell_result(study, number: int, trial: TrialRecord) -> None:
    """Tell Optuna's trial ``number`` the outcome of ``trial`` (itself, or the trial it repeats).

    PRUNED takes no values in any study (optuna/study/_tell.py); with no intermediate value, as in a
    multi-objective study, the trial keeps none, and MOTPE ranks it after every completed trial."""
    from optuna.trial import TrialState

    if trial.status == COMPLETED and trial.epochs:
        study.tell(number, _told_values(study, trial.epochs[-1]))
    else:
        study.tell(number, state=TrialState.PRUNED if trial.status == STOPPED else TrialState.FAIL)


def _tell_repeats(study, ledger: Ledger) -> None:
    """Repeated proposals whose earlier trial has finished get its result (once)."""
    running = {t.number for t in study.get_trials(deepcopy=False) if not t.state.is_finished()}
    for repeat in ledger.repeats:
        earlier = ledger.get(repeat["same_as"])
        if repeat["optuna_number"] in running and earlier.status in FINISHED:
            _tell_result(study, repeat["optuna_number"], earlier)


def _reconcile(study, ledger: Ledger) -> None:
    """Bring Optuna's storage in line with the ledger after a kill: finished trials it was not yet told
    are told; a suggestion the ledger never recorded (the kill fell between the two writes) is failed
    and its value queued again, so the sampler's proposal is not lost."""
    from optuna.trial import TrialState

    known = {t.optuna_number: t for t in ledger.trials if t.optuna_number is not None}
    repeats = {r["optuna_number"] for r in ledger.repeats}
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if frozen.number in known:
            if known[frozen.number].status in FINISHED:
                _tell(study, known[frozen.number])
        elif frozen.number not in repeats:
            study.tell(frozen.number, state=TrialState.FAIL)
            study.enqueue_trial(frozen.params, skip_if_exists=False)
    _tell_repeats(study, ledger)


def _ray_hooks():
    """The Searcher, scheduler and callback classes (defined here: they subclass Ray's, which must be
    imported only after ``cluster.prepare_environment``)."""
    from ray.tune import Callback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import Searcher

    class LedgerSearcher(Searcher):
        """Relaunches the ledger's interrupted trials first, then asks Optuna for the missing ones.

        Hand-written rather than Ray's OptunaSearch: that one keeps its study in memory and saves it
        with Tune's own (racy) experiment state, which a search never restores (docs/ray.md, "Why a
        search never restores Tune's own state"); here Optuna's storage is the durable record. A
        multi-objective search keeps it for the same reason: only the study's directions change."""

        def __init__(self, ledger: Ledger, study, space: SearchSpace, num_samples: int, mode: str):
            super().__init__(metric="objective", mode=mode)
            self.ledger, self.study, self.space, self.num_samples = ledger, study, space, num_samples
            self.relaunch = [t.id for t in ledger.unfinished()]

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True

        def suggest(self, trial_id: str):
            if self.relaunch:
                trial = self.ledger.get(self.relaunch.pop(0))
            elif len(self.ledger.trials) < self.num_samples:
                trial = self._new_trial() if self.space.parameter else self.ledger.add({}, None)
            else:
                return Searcher.FINISHED
            return {**trial.config, TRIAL_KEY: trial.id}

        def _new_trial(self) -> TrialRecord:
            """Ask Optuna until it proposes a config not yet trained; a repeat is told the earlier
            trial's result (now, or when that trial finishes) and costs nothing."""
            distributions = {self.space.parameter: _distribution(self.space)}
            for _ in range(MAX_REPEATS):
                asked = self.study.ask(distributions)
                earlier = self.ledger.find(asked.params)
                if earlier is None:
                    return self.ledger.add(asked.params, asked.number)
                self.ledger.add_repeat(asked.number, earlier.id)
                _tell_repeats(self.study, self.ledger)
            # A sampler stuck on known values: take the first value of the space not yet run.
            unused = next(v for v in self.space.values if self.ledger.find({self.space.parameter: v}) is None)
            self.study.enqueue_trial({self.space.parameter: unused})
            asked = self.study.ask(distributions)
            return self.ledger.add(asked.params, asked.number)

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            pass  # the callback records the outcome in the ledger, then tells Optuna

        def save_to_dir(self, *args, **kwargs) -> None:
            pass  # the ledger and Optuna's storage are the state

    class _Key:
        """A trial as ASHA sees it: keyed by fairtune's stable id, not Tune's per-session one."""

        def __init__(self, trial):
            self.trial_id = trial.config[TRIAL_KEY]

    class LedgerASHA(ASHAScheduler):
        """ASHA whose rungs survive a driver kill: Ray keeps them in memory only (docs/ray.md), so they
        are rebuilt from the ledger's recorded epochs, keyed by fairtune's trial ids. Uses ASHA's
        private ``_brackets``/``_rungs``; tests/test_search.py pins the rebuilt decisions."""

        def __init__(self, ledger: Ledger, **kwargs):
            super().__init__(**kwargs)
            for bracket in self._brackets:
                for milestone, recorded in bracket._rungs:
                    for trial in ledger.trials:
                        value = trial.value_at(self._time_attr, milestone)
                        if value is not None:
                            recorded[trial.id] = self._metric_op * value

        def on_trial_add(self, tune_controller, trial):
            super().on_trial_add(tune_controller, _Key(trial))

        def on_trial_result(self, tune_controller, trial, result):
            return super().on_trial_result(tune_controller, _Key(trial), result)

        def on_trial_complete(self, tune_controller, trial, result):
            super().on_trial_complete(tune_controller, _Key(trial), result)

        def on_trial_remove(self, tune_controller, trial):
            super().on_trial_remove(tune_controller, _Key(trial))

    class LedgerCallback(Callback):
        """Writes every trial event to the ledger (then Optuna) and prints one compact line per new epoch."""

        def __init__(self, ledger: Ledger, study, say: Printer, total: int, parameter: str | None, num_trials: int, split: str):
            self.ledger, self.study, self.say = ledger, study, say
            self.total, self.parameter, self.num_trials, self.split = total, parameter, num_trials, split

        def _tell(self, record: TrialRecord) -> None:
            if self.study is not None:
                _tell(self.study, record)
                _tell_repeats(self.study, self.ledger)

        def _label(self, trial) -> str:
            record = self.ledger.get(trial.config[TRIAL_KEY])
            value = f" {self.parameter}={record.config[self.parameter]:<8.4g}" if self.parameter else ""
            return f"{record.id}{value}"

        def on_trial_result(self, iteration, trials, trial, result, **info):
            trial_id = trial.config[TRIAL_KEY]
            # Tune adds done=True to the result on which the scheduler decided to stop the trial.
            stopped = bool(result.get("done")) and result["epoch"] < self.total
            if self.ledger.record_epoch(trial_id, result, stopped=stopped):
                self.say("  " + epoch_line(result, self.total, self._label(trial), self.split, result.get("time_this_iter_s")))

        def on_trial_complete(self, iteration, trials, trial, **info):
            record = self.ledger.get(trial.config[TRIAL_KEY])
            if record.epochs_run >= self.total:
                self.ledger.finish(record.id, COMPLETED)
            if record.status == RUNNING:
                return  # ended without a decision (the search was interrupted): resumed later
            self._tell(record)
            done = sum(t.status in FINISHED for t in self.ledger.trials)
            how = "stopped by ASHA" if record.status == STOPPED else "done"
            self.say(f"  {self._label(trial)} {how} after {record.epochs_run} epochs ({done}/{self.num_trials} trials)")

        def on_trial_error(self, iteration, trials, trial, **info):
            record = self.ledger.get(trial.config[TRIAL_KEY])
            reason = _failure_reason(Path(self.ledger.path).parent, record.id, trial.error_file)
            self.ledger.finish(record.id, ERROR, reason)
            self._tell(record)
            self.say(f"  {self._label(trial)} FAILED: {reason}")

    return LedgerSearcher, LedgerASHA, LedgerCallback


def _failure_reason(experiment_dir: Path, trial_id: str, error_file: str | Path | None) -> str:
    """The recorded non-finite reason, else the last line of Tune's error file."""
    marker = SearchDir(experiment_dir).failure_marker(trial_id)
    if marker.exists():
        return marker.read_text().strip()
    path = Path(error_file) if error_file else None
    if path is not None and path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return lines[-1].strip() if lines else "unknown error"
    return "unknown error"


def search_identity(settings: SearchSettings, space: SearchSpace, grace: int) -> dict:
    """What defines a search's results; a resume must match it (execution flags may change)."""
    return {
        "train": settings.base.record(),
        "data": settings.data.fingerprint(),  # as before dataset options existed, when none are given
        "num_samples": settings.num_samples if space.parameter else 1,
        "grace_period": grace,
        "reduction_factor": settings.reduction_factor,
        "space": json.loads(json.dumps(asdict(space))),
    }


def _flag(key: str) -> str:
    """The flag behind a recorded setting: ``train.lr`` -> ``--lr``; the space's keys come from the
    search-space file (``space.values`` -> ``--search-spaces (space.values)``)."""
    if key.split(".", 1)[0] == "space":
        return f"--search-spaces ({key})"
    return "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def _resumable_ledger(settings: SearchSettings, identity: dict) -> Ledger:
    """The recorded search, refused (one line) unless resumed with the settings it was started with."""
    folder = settings.experiment_dir
    if not settings.resume:
        raise UserError(f"a search already exists in {folder}; pass --resume to continue it, or delete the folder to start over")
    ledger = Ledger.load(folder)
    changed = differences(ledger.settings, identity)
    if changed:
        listed = ", ".join(f"{_flag(key)} {old!r} -> {new!r}" for key, old, new in changed[:4])
        raise UserError(
            f"--resume: the search in {folder} was run with other settings ({listed}); resume with the flags it was "
            "started with, or delete the folder to start a new search"
        )
    return ledger


def _open_ledger(settings: SearchSettings, identity: dict, planned: int, say: Printer) -> Ledger:
    """The ledger of the search being resumed, or of a new one."""
    folder = settings.experiment_dir
    if SearchDir(folder).ledger.exists():
        ledger = _resumable_ledger(settings, identity)
        ledger.begin_session()
        done = sum(t.status in FINISHED for t in ledger.trials)
        missing = max(planned - len(ledger.trials), 0)
        say(f"resuming the search in {folder}: {done} trial(s) finished, {len(ledger.unfinished())} to continue, {missing} to start")
        return ledger
    if folder.exists():
        # Killed before the ledger was first written: nothing ran that could be kept.
        say(f"no search record in {folder}; starting the search afresh")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return Ledger.create(folder, identity)


def _search_plan(settings: SearchSettings):
    """(space, ASHA's rungs, grid?, trials to run, the search's identity) for ``settings``."""
    space = load_space(settings.base.method, settings.spaces_dir)
    # ASHA counts stage-2 epochs: FitNet's hint stage is never judged, and FitNet gets as many rungs
    # over its stage 2 as other methods over their run (see fairtune.schedule for why).
    rungs = asha_plan(settings.base.epochs, settings.base.hint_epochs, settings.grace_period, settings.reduction_factor)
    grid = is_grid(space, settings.num_samples)
    num_samples = (len(space.values) if grid else settings.num_samples) if space.parameter else 1
    return space, rungs, grid, num_samples, search_identity(settings, space, rungs.grace_period)


def search_status(settings: SearchSettings) -> str:
    """``new``, ``unfinished`` or ``done`` (its best config written); UserError when the recorded
    search was run with other settings (a resume would be refused)."""
    folder = SearchDir(settings.experiment_dir)
    if not folder.ledger.exists():
        return "new"
    *_, num_samples, identity = _search_plan(settings)
    ledger = _resumable_ledger(replace(settings, resume=True), identity)
    return "done" if ledger.complete(num_samples) and folder.best.exists() else "unfinished"


def run_search(settings: SearchSettings, say: Printer = print) -> BestConfig:
    """Run (or resume) the search; returns the best config it wrote to ``best.json``."""
    method = get_method(settings.base.method)
    space, rungs, grid, num_samples, identity = _search_plan(settings)
    folder = settings.experiment_dir
    files = SearchDir(folder)
    mode = objective_mode(settings.base.objective)
    epochs = settings.base.total_epochs
    if files.ledger.exists():
        _resumable_ledger(settings, identity)  # refused before Ray starts

    resources = connect(settings.address)
    check_resources(resources, settings.cpus_per_trial, settings.gpus_per_trial)
    teacher = teacher_state(settings, say) if method.needs_teacher else None
    ledger = _open_ledger(settings, identity, num_samples, say)
    if not space.parameter and not ledger.trials:
        say(f"{method.name} has no hyperparameter to search: running one trial")
    if grid and not ledger.trials:
        say(f"{space.parameter} takes {len(space.values)} values, no more than --num-samples {settings.num_samples}: "
            f"running each once (a grid, the paper's value first) instead of sampling repeats")
    study = _open_study(folder, space, settings.base.objective, settings.data.seed, settings.data.dataset, grid) if space.parameter else None
    if study is not None:
        _reconcile(study, ledger)
    if settings.base.hint_epochs and space.parameter and not ledger.complete(num_samples):
        _shared_hint_stage(settings, space, teacher, say)

    from ray import tune

    from fairtune.tune import board
    from fairtune.tune.trainable import TrialSpec, run_trial

    LedgerSearcher, LedgerASHA, LedgerCallback = _ray_hooks()
    spec = TrialSpec(
        settings.base, settings.data, str(Path(settings.data_dir).resolve()), str(folder), settings.cpus_per_trial, settings.device
    )
    trainable = tune.with_parameters(run_trial, spec=spec, teacher_state=teacher)
    # Tune registers a trainable by its name in one registry per Ray job: searches running at once
    # in one job (`fairtune protocol`) would otherwise run each other's trials (docs/ray.md).
    trainable.__name__ = re.sub(r"\W", "_", f"fairtune_{settings.data.dataset}_{method.name}")
    trainable = tune.with_resources(trainable, {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial})
    launches = len(ledger.unfinished()) + max(num_samples - len(ledger.trials), 0)
    if launches:
        # ASHA ranks the trials at a rung on one number, the reported ``objective``. In a
        # multi-objective search that is the equal-weight scalarisation of its two objectives, signed so
        # bigger is better (acc,deo_a: accuracy - DEO_A, the default scalar objective): ASHA still stops
        # the trials poor on that trade-off and saves their epochs. The price: a trial headed for an end
        # of the front (very accurate but unfair, say) can be stopped before it gets there;
        # ``--grace-period E`` turns early stopping off where the whole front matters more than epochs.
        scheduler = LedgerASHA(
            ledger, metric="objective", mode=mode, time_attr=rungs.time_attr, max_t=rungs.max_t,
            grace_period=rungs.grace_period, reduction_factor=rungs.reduction_factor,
        )
        name = lambda trial: _trial_name(trial, space.parameter)  # noqa: E731
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=LedgerSearcher(ledger, study, space, num_samples, mode), scheduler=scheduler,
                num_samples=launches, max_concurrent_trials=settings.max_concurrent,
                trial_name_creator=name, trial_dirname_creator=name,
            ),
            run_config=tune.RunConfig(
                name=TUNE_FOLDER, storage_path=str(folder), verbose=0,
                callbacks=[
                    LedgerCallback(ledger, study, say, epochs, space.parameter, num_samples, settings.data.select_on),
                    board.search_callback(ledger, folder, settings.base, space.parameter, settings.data),
                    *board.tune_loggers(),
                ],
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            ),
        )
        tuner.fit()
    ledger.save()
    if not ledger.complete(num_samples):
        raise SearchInterrupted(
            f"the search stopped with {len(ledger.unfinished())} trial(s) unfinished; its state is kept in {folder}: "
            "rerun the same command with --resume to continue"
        )
    trials = trials_table(ledger, space.parameter, settings.base.objective)
    io.write_text(files.trials_csv, trials.to_csv(index=False))
    if parse_objective(settings.base.objective).multi:
        io.write_text(files.pareto_csv, pareto_table(trials, space.parameter, settings.base.objective).to_csv(index=False))
    shared = settings.base.hint_epochs if files.hint_stage_state.exists() else 0
    best = best_record(trials, settings, space, epochs, ledger.seconds)
    best = replace(best, budget=dict(
        best.budget, grid=grid, repeats_not_trained=len(ledger.repeats),
        # Every trial that reached stage 2 continued from the one shared hint stage.
        epochs_computed=int(trials["epochs_run"].sum()) - shared * max(int((trials["epochs_run"] >= shared).sum()) - 1, 0)
        if shared else int(trials["epochs_run"].sum()),
    ))
    io.write_json(files.best, best.to_json())
    return best


def _trial_name(trial, parameter: str | None) -> str:
    """Readable trial folders and names: fairtune's id, the value, Tune's id (unique per session)."""
    value = f"_{parameter}={trial.config[parameter]:.4g}" if parameter else ""
    return f"{trial.config[TRIAL_KEY]}{value}_{trial.trial_id}"


def pareto_table(trials: pd.DataFrame, parameter: str | None, objective: str) -> pd.DataFrame:
    """pareto.csv: the validation Pareto set of the completed trials on the search's two objectives."""
    columns = ["trial_id", parameter or "parameter", "final_accuracy", "final_deo_a", "final_deo_m", "final_objective"]
    return pareto_set(trials, objective)[columns]


def best_record(trials: pd.DataFrame, settings: SearchSettings, space: SearchSpace, epochs: int, seconds: float) -> BestConfig:
    """The chosen config: the ``best`` rule (fairtune.selection): best final-epoch objective among
    trials that ran every epoch (docs/protocol.md §6 reports the model after the last epoch), else among all
    trials that reported anything."""
    goal = parse_objective(settings.base.objective)
    if "final_objective" not in trials or trials["final_objective"].isna().all():
        raise UserError(
            f"every trial of the {settings.base.method} search failed (see {SearchDir(settings.experiment_dir).trials_csv}); "
            "check the errors there, e.g. lower the λ range or --lr"
        )
    row = select_trial(trials, BEST, goal.text)
    hyper = dict(settings.base.hyperparameters)
    if space.parameter:
        hyper[space.parameter] = float(row[space.parameter])
    return BestConfig(
        method=settings.base.method,
        dataset=settings.data.dataset,
        hyperparameters=hyper,
        searched=space.parameter,
        objective=settings.base.objective,
        mode=goal.mode,
        objective_value=float(row["final_objective"]),
        **(dict(
            objectives=dict(zip(goal.metrics, goal.directions)),
            scalarised=goal.scalar_text,  # what objective_value, ASHA's rungs and this pick compare
            pareto_trials=pareto_set(trials, goal.text)["trial_id"].tolist(),
        ) if goal.multi else {}),
        val=ValMetrics(
            accuracy=float(row["final_accuracy"]),
            deo_a=float(row["final_deo_a"]),
            deo_m=float(row["final_deo_m"]),
            acc_matrix=json.loads(row["final_acc_matrix"]) if row.get("final_acc_matrix") else None,
            epoch=int(row["epochs_run"]),
        ),
        trial_id=row["trial_id"],
        selection_split=settings.data.select_on,
        budget={
            "trials": int(len(trials)),
            "epochs_run": int(trials["epochs_run"].sum()),
            "epochs_if_no_early_stopping": int(len(trials) * epochs),
            "failed_trials": int((trials["status"] == "ERROR").sum()),
            "seconds": round(seconds, 1),
        },
        settings=BestSettings(
            epochs=settings.base.epochs,
            num_samples=settings.num_samples,
            data=settings.data.fingerprint(),
            train=settings.base.record(),
        ),
    )
