"""`fairtune final`: every chosen config rerun on each seed as Ray tasks, results on disk per seed.

The protocol is the search's (epochs, batch, lr, data options and sizes; only the seed changes), read
from the ``best.json`` files; flags given explicitly override it. *Choice*: the final runs train on
the training split only, not train+val. The searched value was chosen for a model trained on train
alone; the plateau scheduler keeps stepping on the selection split exactly as in the search; and
fmnist-s / cifar10s validation images are rendered in both colours, so adding them would change
the training skew the method is meant to cope with.

Seed ``k`` uses the teacher of seed ``k``. The `scratch` rows are those teachers: a scratch model
trained with the same protocol is exactly what the paper reports as "Teacher".

``--select RULE`` (``fairtune.selection``) picks which trial of each search is rerun, on validation
metrics: ``best`` (the default) is ``best.json``'s config; any other rule is applied to the search's
``trials.csv``, replacing the searched hyperparameter, and its finals go to ``final-<rule>/``. Every
seed record says which rule chose it, the trial and its validation metrics (``"selection"``). The
values a method fixes from another method's search (``ad+hkd``'s T, from hkd) are those its own search
ran with, from its ``best.json``: a rule re-picks only what the method's own search searched.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import pandas as pd

from fairtune import io
from fairtune.data import DataOptions, dataset_info, load_dataset
from fairtune.engine import TrainConfig, training_protocol
from fairtune.errors import UserError
from fairtune.hyperparameters import HYPERPARAMETERS
from fairtune.layout import Layout
from fairtune.methods import get_method, in_paper_order
from fairtune.metrics import DEFAULT_OBJECTIVE, parse_objective
from fairtune.records import ANY_RECORD, BestConfig, problem, read_best
from fairtune.runs import check_batches
from fairtune.selection import BEST, Rule, select_trial
from fairtune.progress import epoch_line
from fairtune.teachers import TeacherProvider

Printer = Callable[[str], None]
# A running run's epoch line is shown at most this often (its first epoch at once); seconds.
PROGRESS_EVERY_S = 30.0

# Fields of the protocol shared by every method of one final; the rest are the method's own.
PER_SEED_DATA_FIELDS = ("dataset", "seed")
PROTOCOL_FLAGS = ("epochs", "batch_size", "lr")  # protocol fields the command line sets
VAL_KEYS = ("accuracy", "deo_a", "deo_m")  # the chosen trial's validation metrics a seed record keeps


@dataclass(frozen=True)
class FinalSettings:
    dataset: str
    results_dir: Path
    data_dir: Path
    methods: tuple[str, ...] = ()  # empty: every method with a best.json, plus the teachers
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    train_overrides: dict = field(default_factory=dict)  # TrainConfig fields given as flags
    data_overrides: dict = field(default_factory=dict)  # DataOptions fields given as flags
    cpus_per_trial: int = 1
    gpus_per_trial: float = 0.0
    address: str | None = None
    device: str = "auto"
    force: bool = False
    rule: Rule = BEST  # which trial of each search is rerun (--select)


@dataclass(frozen=True)
class FinalJob:
    """One method's config, which of the requested seeds still have to run, and how the config was
    chosen (the ``"selection"`` every seed record gets)."""

    config: TrainConfig
    todo: tuple[int, ...]
    done: tuple[int, ...]
    selection: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.method


@dataclass(frozen=True)
class FinalPlan:
    data: DataOptions  # seed 0's options; each run replaces the seed
    jobs: tuple[FinalJob, ...]
    teacher_seeds: tuple[int, ...]  # seeds whose teacher some run needs

    def options(self, seed: int) -> DataOptions:
        return replace(self.data, seed=seed)

    @property
    def runs_todo(self) -> int:
        return sum(len(job.todo) for job in self.jobs)


def final_path(results_dir: Path, dataset: str, method: str, seed: int, rule: Rule = BEST) -> Path:
    return Layout(results_dir, dataset).final_run(method, seed, rule)


def _read_best(results_dir: Path, dataset: str, method: str) -> BestConfig | None:
    layout = Layout(results_dir, dataset)
    return read_best(layout, method) if layout.search(method).best.exists() else None


def _read_trials(settings: FinalSettings, method: str) -> pd.DataFrame:
    """The search's trials.csv, with what the rule reads; UserError (one line) otherwise."""
    path = Layout(settings.results_dir, settings.dataset).search(method).trials_csv
    redo = f"rerun `fairtune search --method {method} --dataset {settings.dataset}`, or use --select best"
    if not path.exists():
        raise UserError(f"--select {settings.rule.text} needs the trials of the {method} search, and {path} is missing; {redo}")
    try:
        trials = pd.read_csv(path, dtype={"trial_id": str, "error": str})
    except (OSError, ValueError) as exc:  # pandas' parse errors are ValueErrors
        raise UserError(f"{path} cannot be read as a table ({str(exc).splitlines()[0][:80]}); {redo}") from None
    searched = get_method(method).searched
    needed = ["trial_id", "status", *(f"final_{k}" for k in VAL_KEYS), *([searched] if searched else [])]
    missing = [c for c in needed if c not in trials]
    if missing:
        raise UserError(f"--select {settings.rule.text}: {path} has no {', '.join(missing)} column; {redo}")
    return trials


def _chosen_config(settings: FinalSettings, method: str, best: BestConfig | None) -> tuple[dict, dict]:
    """(hyperparameters, selection record) of the config ``settings.rule`` picks for ``method``."""
    rule = settings.rule
    if best is None:  # nothing searched (the teachers, or a method without hyperparameters): one config
        return {}, {"rule": rule.text, "trial_id": None, "val": None}
    if rule == BEST:
        val = {k: getattr(best.val, k, None) for k in VAL_KEYS}  # None: the record has none (or lacks deo_m)
        return best.hyperparameters, {"rule": rule.text, "trial_id": best.trial_id, "val": val}
    path = Layout(settings.results_dir, settings.dataset).search(method).best
    trained = (best.settings.train if best.settings else None) or {}
    objective = best.objective or trained.get("objective") or DEFAULT_OBJECTIVE
    try:
        objective = parse_objective(str(objective)).text
    except ValueError as exc:
        raise UserError(f"{path}: {exc}; rerun `fairtune search --method {method} --dataset {settings.dataset}`") from None
    row = select_trial(_read_trials(settings, method), rule, objective, where=f"the {method} search")
    hyper = dict(best.hyperparameters)
    searched = get_method(method).searched
    if searched:
        hyper[searched] = float(row[searched])
    val = {k: float(row[f"final_{k}"]) for k in VAL_KEYS}
    return hyper, {"rule": rule.text, "trial_id": str(row["trial_id"]), "val": val}


def chosen_methods(settings: FinalSettings) -> list[str]:
    """The named methods, else every method with a best config plus `scratch` (the teachers)."""
    if settings.methods:
        return in_paper_order(get_method(name).name for name in settings.methods)
    layout = Layout(settings.results_dir, settings.dataset)
    folder = layout.search_root
    searched = [search.method for search in layout.searches() if search.best.exists()]
    if not searched:
        raise UserError(
            f"no best configs in {folder}; run a search first, e.g. "
            f"`fairtune search --method mfd --dataset {settings.dataset}`, or name methods with --method"
        )
    return in_paper_order([*searched, "scratch"])


def _protocol(settings: FinalSettings, bests: dict[str, BestConfig]) -> tuple[dict, dict]:
    """Training and data settings shared by every run: the searches' (which must agree), then flags."""
    train_names = [f.name for f in fields(TrainConfig) if f.name not in ("method", "hyperparameters")]
    data_names = [f.name for f in fields(DataOptions) if f.name not in PER_SEED_DATA_FIELDS]
    resolved: list[dict] = []
    for names, part, overrides in ((train_names, "train", settings.train_overrides), (data_names, "data", settings.data_overrides)):
        values = {}
        recorded = {m: getattr(b.settings, part) for m, b in bests.items() if b.settings and getattr(b.settings, part) is not None}
        for name in names:
            if name == "extra":  # dataset options, one by one: a flag replaces its own option only
                given = overrides.get("extra", {})
                # A record without "extra" had no dataset options (the fingerprint leaves it out then).
                seen = {m: {k: v for k, v in data.get("extra", {}).items() if k not in given} for m, data in recorded.items()}
                flag = "the dataset option flags"
            elif name in overrides:
                values[name] = overrides[name]
                continue
            else:
                seen = {m: recorded[m][name] for m in recorded if name in recorded[m]}
                flag = f"--{name.replace('_', '-')}"
            if len(set(json.dumps(v, sort_keys=True) for v in seen.values())) > 1:
                shown = ", ".join(f"{m}: {v}" for m, v in seen.items())
                raise UserError(
                    f"the searches of {settings.dataset} used different {'dataset options' if name == 'extra' else name} ({shown}); rerun them alike, or pass "
                    f"{flag} to fix it for every final run"
                )
            if name == "extra":
                values[name] = {**next(iter(seen.values()), {}), **given}
            elif seen:
                values[name] = next(iter(seen.values()))
        resolved.append(values)
    return resolved[0], resolved[1]


def _same_run(record: dict, config: TrainConfig, options: DataOptions) -> str | None:
    """Why an existing seed file does not belong to this plan (None when it does). Settings a
    record predates (fields added later) are not held against it."""
    stored = record.get("config") or {}
    diff = [
        f"{k} {stored.get(k)!r} vs {v!r}"
        for k, v in config.record().items()
        if (k in stored or k in HYPERPARAMETERS or k == "method") and stored.get(k) != v
    ]
    if diff:
        return "; ".join(diff)
    if record.get("data") != options.fingerprint():
        return "other data settings"
    return None


def plan_final(settings: FinalSettings) -> FinalPlan:
    """Everything checked before any run starts: configs, protocol, done seeds. UserError otherwise."""
    names = chosen_methods(settings)
    bests = {m: b for m in names if (b := _read_best(settings.results_dir, settings.dataset, m)) is not None}
    train, data = _protocol(settings, bests)
    options = DataOptions(dataset=settings.dataset, seed=settings.seeds[0], **data)
    jobs, teacher_seeds = [], set()
    for name in names:
        method = get_method(name)
        if name not in bests and method.params:
            search = f"fairtune search --method {name} --dataset {settings.dataset}"
            raise UserError(f"{name} has no best config ({Layout(settings.results_dir, settings.dataset).search(name).best}); run `{search}` first")
        hyper, selection = _chosen_config(settings, name, bests.get(name))
        config = TrainConfig(method=name, **train, hyperparameters=hyper)
        todo, done = [], []
        for seed in settings.seeds:
            path = final_path(settings.results_dir, settings.dataset, name, seed, settings.rule)
            if path.exists() and not settings.force:
                record, broken = problem(path, ANY_RECORD)
                if broken:
                    raise UserError(f"{path} {broken}; pass --force to rerun the seeds asked for, or delete the file")
                why = _same_run(record, config, replace(options, seed=seed))
                if why:
                    raise UserError(f"{path} holds another run ({why}); pass --force to rerun it with the current config")
                done.append(seed)
            else:
                todo.append(seed)
        jobs.append(FinalJob(config, tuple(todo), tuple(done), selection))
        if method.needs_teacher or name == "scratch":
            teacher_seeds.update(todo)
    _check_stored_teachers(settings, _teacher_provider(settings, names, TrainConfig(method="scratch", **train)), sorted(teacher_seeds))
    return FinalPlan(options, tuple(jobs), tuple(sorted(teacher_seeds)))


def _teacher_provider(settings: FinalSettings, methods, base: TrainConfig) -> TeacherProvider:
    """The final's teachers: with --force and scratch among the methods, every one is retrained."""
    return TeacherProvider(settings.results_dir, settings.dataset, base, force=settings.force and "scratch" in methods)


def _check_stored_teachers(settings: FinalSettings, provider: TeacherProvider, seeds: list[int]) -> None:
    """Refuse a stored teacher trained with another protocol (epochs, lr, ...) than this final's.

    It would be used as it is: the Teacher row would report it and every KD student would learn from
    it, so the table would silently mix protocols. Its data settings are checked when it is loaded.
    """
    wanted = training_protocol(provider.base.record())
    for seed in seeds:
        if provider.to_train(seed):  # missing, or retrained (--force)
            continue
        files = provider.files(seed)
        try:
            trained = training_protocol(json.loads(files.metrics.read_text()).get("config") or {})
        except (OSError, ValueError):
            continue  # unreadable metrics: reading the teacher itself reports it
        differ = [k for k in wanted if k in trained and trained[k] != wanted[k]]
        if differ:
            shown = ", ".join(f"{k} {trained[k]!r} (this final: {wanted[k]!r})" for k in differ)
            scratch = "" if not settings.methods or "scratch" in settings.methods else " and name scratch in --method"
            flags = [f"--{k.replace('_', '-')} {trained[k]}" for k in differ if k in PROTOCOL_FLAGS]
            theirs = f", or pass {' '.join(flags)} to run the final with theirs" if len(flags) == len(differ) else ""
            raise UserError(
                f"teacher {files.weights} was trained with {shown}; pass --force{scratch} to retrain the teachers "
                f"with this final's protocol{theirs}"
            )


def _failure(exc: BaseException) -> str:
    """The original error of a Ray task, in one line."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".strip(": ")


def _scratch_record(teacher_record: dict, teacher_file: Path) -> dict:
    return {**teacher_record, "method": "scratch", "teacher": str(teacher_file)}


def _selected(record: dict, job: FinalJob) -> dict:
    """The seed record as written: the run's result, then how its config was chosen."""
    return {**record, "selection": job.selection}


def run_final(settings: FinalSettings, plan: FinalPlan, say: Printer = print) -> list[str]:
    """Run the plan's missing seeds; returns one line per failed run. Each result is written the
    moment it arrives, so an interrupted final loses only the runs in flight."""
    failed: list[str] = []
    shown = ", ".join(f"{j.method} ({len(j.todo)} to run)" if j.todo else f"{j.method} (done)" for j in plan.jobs)
    rule = "" if settings.rule == BEST else f" (configs chosen by --select {settings.rule.text})"
    say(f"final on {settings.dataset}, seeds {' '.join(map(str, settings.seeds))}{rule}: {shown}")
    for job in plan.jobs if settings.rule != BEST else ():
        if job.selection.get("trial_id") is not None:
            val = job.selection["val"]
            hyper = ", ".join(f"{k}={v:g}" for k, v in job.config.hyperparameters.items()) or "no hyperparameters"
            say(f"  {job.method}: trial {job.selection['trial_id']} ({hyper}; val accuracy {val['accuracy']:.2f}, "
                f"DEO_A {val['deo_a']:.2f}, DEO_M {val['deo_m']:.2f})")
    if not plan.runs_todo:
        say("every seed is done already (--force reruns)")
        return failed
    data = load_dataset(plan.data, settings.data_dir)  # missing data: one line now, not a failed task later
    for note in data.notes.get("clamped", []):
        say(f"note: {note}")
    base = replace(plan.jobs[0].config, method="scratch", hyperparameters={})
    provider = _teacher_provider(settings, [job.method for job in plan.jobs], base)
    untrained = [s for s in plan.teacher_seeds if provider.to_train(s)]
    check_batches([job.method for job in plan.jobs if job.todo] + ["scratch"] * bool(untrained), plan.jobs[0].config.batch_size, data)

    import ray
    from ray.util.queue import Queue

    from fairtune.tune.board import FinalBoard
    from fairtune.tune.cluster import check_resources, connect
    from fairtune.tune.tasks import method_run_task, train_teacher_task

    check_resources(connect(settings.address), settings.cpus_per_trial, settings.gpus_per_trial)
    resources = {"num_cpus": settings.cpus_per_trial, "num_gpus": settings.gpus_per_trial}
    teacher_task = ray.remote(**resources)(train_teacher_task).options(num_returns=2)
    run_task = ray.remote(**resources)(method_run_task)
    data_dir = str(Path(settings.data_dir).resolve())
    progress = Queue(actor_options={"num_cpus": 0})  # epochs finished by the tasks, for the progress lines
    board = FinalBoard(settings.results_dir, settings.dataset, dataset_info(plan.data, settings.data_dir).group_names, settings.rule)  # TensorBoard runs
    try:
        args = (data_dir, settings.device, settings.cpus_per_trial)
        jobs = {job.method: job for job in plan.jobs}
        scratch = jobs.get("scratch")
        info = dataset_info(plan.data, settings.data_dir)

        stored: dict[int, dict] = {}  # read (and checked against this data) before anything runs
        for seed in plan.teacher_seeds:
            state = provider.stored(plan.options(seed), info)  # protocol checked by plan_final
            if state is not None:
                stored[seed] = state

        pending: dict = {}  # object ref -> (method, seed, teacher state ref or None)
        teachers: dict[int, object] = {}
        for seed in plan.teacher_seeds:
            if seed in stored:
                teachers[seed] = ray.put(stored.pop(seed))
                if scratch and seed in scratch.todo:
                    files = provider.files(seed)
                    _write_scratch_from_disk(settings, scratch, files, seed, say)
                    board.start(base, seed)
                    board.finish("scratch", seed, json.loads(files.metrics.read_text()))
                continue
            state_ref, record_ref = teacher_task.remote(base, plan.options(seed), *args, progress)
            teachers[seed] = state_ref
            pending[record_ref] = ("scratch", seed, state_ref)
            if scratch and seed in scratch.todo:
                board.start(base, seed)
            say(f"  teacher seed {seed}: training ({base.total_epochs} epochs)")
        for job in plan.jobs:
            if job.method == "scratch":
                continue
            teacher_needed = get_method(job.method).needs_teacher
            for seed in job.todo:
                ref = run_task.remote(job.config, plan.options(seed), *args, teachers[seed] if teacher_needed else None, progress)
                pending[ref] = (job.method, seed, None)
                board.start(job.config, seed)

        total, finished = len(pending), 0
        shown_at: dict[str, float] = {}  # run -> when its last epoch line was shown
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            _show_epochs(progress, shown_at, say, board)  # before the results: a run's epochs come before its result
            if not ready:
                continue
            [ref] = ready
            method, seed, state_ref = pending.pop(ref)
            finished += 1
            try:
                record = ray.get(ref)
            except ray.exceptions.RayError as exc:
                failed.append(f"{method} seed {seed}: {_failure(exc)}")
                say(f"  [{finished}/{total}] {method} seed {seed} FAILED: {_failure(exc)}")
                board.finish(method, seed, None)
                continue
            path = final_path(settings.results_dir, settings.dataset, method, seed, settings.rule)
            try:
                if state_ref is not None:  # a teacher: store it; it is also the scratch row of its seed
                    files = provider.store(plan.options(seed), info, ray.get(state_ref), record)
                    if not (scratch and seed in scratch.todo):
                        say(f"  [{finished}/{total}] teacher seed {seed}: wrote {files.weights}")
                        continue
                    record = _scratch_record(record, files.weights)
                record = _selected(record, jobs[method])
                io.write_json(path, record)
            except OSError as exc:  # a full or read-only disk: this run is lost, the others still land
                reason = f"cannot write under {path.parent} ({exc.strerror or exc})"
                failed.append(f"{method} seed {seed}: {reason}")
                say(f"  [{finished}/{total}] {method} seed {seed} FAILED: {reason}")
                continue
            board.finish(method, seed, record)
            test = record["test"]
            say(
                f"  [{finished}/{total}] {method} seed {seed}: test accuracy {test['accuracy']:.2f}  DEO_A {test['deo_a']:.2f}  "
                f"DEO_M {test['deo_m']:.2f}  ({record['epochs_run']} epochs, {record['seconds_per_epoch']:.1f} s/epoch) -> {path}"
            )
    finally:
        progress.shutdown(force=True)
        board.close()
    return failed


def _show_epochs(progress, shown_at: dict[str, float], say: Printer, board=None) -> None:
    """Print the newest epoch each task finished since the last call: a run's first line at once,
    then at most one line per run every PROGRESS_EVERY_S, so many long runs stay readable. Every
    epoch goes to ``board`` (TensorBoard)."""
    import ray

    try:
        waiting = progress.qsize()  # only the driver takes from the queue, so these are all there
        lines = progress.get_nowait_batch(waiting) if waiting else []
    except ray.exceptions.RayError:  # the queue's actor is gone (its node died): results still come
        return
    for line in lines if board is not None else ():
        if "metrics" in line:
            board.epoch(line["method"], line["seed"], line["metrics"])
    now = time.monotonic()
    newest = {line["run"]: line for line in lines}
    for run, line in newest.items():
        if run in shown_at and now - shown_at[run] < PROGRESS_EVERY_S:
            continue
        shown_at[run] = now
        say("  " + epoch_line(line.get("metrics") or line, line["of"], run, line["split"], line["seconds"]))


def _write_scratch_from_disk(settings: FinalSettings, job: FinalJob, files, seed: int, say: Printer) -> None:
    """A teacher trained earlier (by the search) is the scratch result of its seed."""
    stored = json.loads(files.metrics.read_text())
    path = final_path(settings.results_dir, settings.dataset, "scratch", seed, settings.rule)
    io.write_json(path, _selected(_scratch_record(stored, files.weights), job))
    test = stored["test"]
    say(f"  scratch seed {seed}: the stored teacher, test accuracy {test['accuracy']:.2f}  DEO_A {test['deo_a']:.2f} -> {path}")


__all__ = ["FinalPlan", "FinalSettings", "final_path", "plan_final", "run_final"]
