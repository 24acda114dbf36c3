"""`fairtune protocol`: the paper's whole protocol — teachers, every method's search, the final reruns,
the tables — as one resumable command on one Ray session.

Each piece of work is the same driver function that `fairtune search` / `fairtune final` run
(``run_search``, ``run_final``, the search's teacher provider), started as a Ray task that takes no
CPU and is pinned to this machine: Tune's own pattern for a Tuner driven through Ray Client
(``_force_on_current_node``). Each gets its own process, so several Tune drivers run at once without
sharing a process's Tune globals, and the files land where `search`/`final` would write them,
byte for byte. Their trials and runs are what hold CPUs and GPUs, so Ray's scheduler packs the work of
every search and final onto the cluster's slots: no slot idles while any trial or run could start.

Order is kept by the driver loop below: a search needing a teacher waits for it, a search whose fixed
hyperparameter comes from another method's best config (``ad+hkd`` reads ``hkd``'s T) starts the
moment that ``best.json`` exists, and a method's final reruns start as soon as its search is done and
every seed's teacher exists. A rerun of the same command continues: finished searches and seed files
are kept, an interrupted search resumes from its ledger (exact, docs/ray.md). Ctrl-C kills the tasks,
which a search survives by design (its ledger is written before anything acts on an event).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from fairtune import io
from fairtune.errors import UserError
from fairtune.layout import Layout, SearchDir
from fairtune.methods import get_method, in_paper_order
from fairtune.records import BestConfig
from fairtune.runs import resolve_hyperparameters
from fairtune.teachers import TeacherProvider
from fairtune.tune.final import FinalSettings, final_path, plan_final
from fairtune.tune.ledger import FINISHED, STOPPED, Ledger
from fairtune.tune.search import SearchSettings, search_status

Printer = Callable[[str], None]
WAITING, RUNNING, DONE, FAILED = "waiting", "running", "done", "failed"


@dataclass(frozen=True)
class ProtocolSettings:
    search: SearchSettings  # the template: every method's search uses it (method and hyperparameters replaced)
    final: FinalSettings  # the template of every method's final (methods replaced)
    methods: tuple[str, ...]
    given: dict = field(default_factory=dict)  # fixed hyperparameters given as flags (--T, --distill-lam)

    @property
    def dataset(self) -> str:
        return self.search.data.dataset

    @property
    def layout(self) -> Layout:
        return Layout(self.search.results_dir, self.dataset)


def check_methods(names: list[str], dataset: str, given: dict, results_dir: Path) -> tuple[str, ...]:
    """The methods in paper order; one line for an unknown or repeated name, or a fixed hyperparameter
    with no source (its method neither run here, searched before, nor given as a flag)."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"--method names {', '.join(repeated)} more than once; name each method once")
    methods = in_paper_order(get_method(name).name for name in names)
    for name in methods:
        for param, source in get_method(name).fixed_from:
            if given.get(param) is None and source not in methods and not Layout(results_dir, dataset).search(source).best.exists():
                flag = "--" + param.replace("_", "-")
                raise UserError(
                    f"{name} takes {param} from the best {source} config, but {source} is not in --method and has not been "
                    f"searched; add {source} to --method, or pass {flag}"
                )
    return tuple(methods)


def search_settings(settings: ProtocolSettings, method: str) -> SearchSettings:
    """``method``'s search: the template with its fixed hyperparameters resolved now (a source's best
    config exists by the time this is called) and resumed when a ledger exists."""
    template = settings.search
    hyper = resolve_hyperparameters(method, settings.dataset, settings.given, template.results_dir, template.spaces_dir)
    searched = get_method(method).searched
    if searched:
        hyper.pop(searched)
    base = replace(template.base, method=method, hyperparameters=hyper)
    draft = replace(template, base=base)
    return replace(draft, resume=SearchDir(draft.experiment_dir).ledger.exists())


# -- the jobs: driver functions run in tasks pinned to this machine ---------------------------------


def _logger(log: str, label: str) -> Printer:
    """Lines of one job, appended to the protocol's log (one write per line: O_APPEND keeps lines whole)."""

    def say(line: str) -> None:
        with open(log, "a") as handle:
            handle.write(f"{time.strftime('%H:%M:%S')} [{label}] {line}\n")

    return say


def _teacher_job(search: SearchSettings, log: str) -> None:
    from fairtune.tune.search import teacher_state

    teacher_state(search, _logger(log, f"teacher seed {search.data.seed}"))


def _search_job(search: SearchSettings, log: str) -> BestConfig:
    from fairtune.tune.search import run_search

    return run_search(search, _logger(log, f"search {search.base.method}"))


def _final_job(final: FinalSettings, log: str) -> list[str]:
    from fairtune.tune.final import run_final

    return run_final(final, plan_final(final), _logger(log, f"final {final.methods[0]}"))


# -- progress -----------------------------------------------------------------------------------


@dataclass
class MethodProgress:
    method: str
    search: str = WAITING
    final: str = WAITING
    waiting_for: str = ""
    trials_done: int = 0
    trials_running: int = 0
    trials_stopped: int = 0
    trials_planned: int = 0
    epochs_done: int = 0
    epochs_budget: int = 0
    best: float | None = None
    seeds_done: int = 0
    seeds_planned: int = 0
    error: str = ""


@dataclass
class Status:
    """What the status block shows, read from the files the jobs write (ledgers, seed files)."""

    methods: list[MethodProgress]
    elapsed: float
    slots_busy: float
    slots_total: float
    epochs_done: int
    epochs_budget: int  # an upper bound: early stopping only lowers it
    seconds_per_epoch: float | None  # slot-seconds per epoch, measured over this run
    eta: float | None  # seconds, at the measured pace, for the budget left (an upper bound)


def _read_search(row: MethodProgress, folder: Path, total_epochs: int, mode: str) -> None:
    try:
        ledger = Ledger.load(folder)
    except UserError:
        return
    trials = ledger.trials
    row.trials_planned = max(int(ledger.settings.get("num_samples", len(trials))), len(trials))
    row.trials_done = sum(t.status in FINISHED for t in trials)
    row.trials_stopped = sum(t.status == STOPPED for t in trials)
    row.trials_running = len(trials) - row.trials_done
    row.epochs_done = sum(t.epochs_run for t in trials)
    # A trial stopped by ASHA or failed spends no more: its unrun epochs leave the budget.
    row.epochs_budget = sum(t.epochs_run if t.status in FINISHED else total_epochs for t in trials)
    row.epochs_budget += (row.trials_planned - len(trials)) * total_epochs
    scores = [t.epochs[-1]["objective"] for t in trials if t.epochs]
    if scores:
        row.best = max(scores) if mode == "max" else min(scores)


# -- the driver -----------------------------------------------------------------------------------


class Protocol:
    """Schedules the jobs on Ray and keeps the progress rows; ``run`` returns one line per failure."""

    def __init__(self, settings: ProtocolSettings, say: Printer, show: Callable[[Status], None], refresh_s: float):
        self.settings, self.say, self.show, self.refresh_s = settings, say, show, refresh_s
        self.rows = {m: MethodProgress(m) for m in settings.methods}
        self.searches: dict[str, SearchSettings] = {}
        self.failures: list[str] = []
        self.log = str(settings.layout.protocol_log)
        self.started = time.monotonic()
        self.busy_samples: list[float] = []
        self.epochs_at_start = 0

    # Seeds whose teacher a job needs: the searches' seed (KD searches) and every final seed.
    def _teacher_seeds(self) -> list[int]:
        needs = [get_method(m).needs_teacher for m in self.settings.methods]
        seeds = list(self.settings.final.seeds) if any(needs) or "scratch" in self.settings.methods else []
        if any(needs):
            seeds.append(self.settings.search.data.seed)
        return sorted(set(seeds))

    def run(self) -> list[str]:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from fairtune.tune.cluster import job_env

        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        # Tune reads its environment at import: a raylet started by `ray start` has not got it.
        job = dict(num_cpus=0, scheduling_strategy=here, runtime_env={"env_vars": job_env()}, max_retries=0)
        teacher_job = ray.remote(**job)(_teacher_job)
        search_job = ray.remote(**job)(_search_job)
        final_job = ray.remote(**job)(_final_job)
        settings = self.settings
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        _logger(self.log, "protocol")(f"start: {', '.join(settings.methods)}; seeds {' '.join(map(str, settings.final.seeds))}")

        pending: dict = {}  # ref -> (kind, key)
        teachers: dict[int, str] = {}
        provider = TeacherProvider(settings.search.results_dir, settings.dataset)
        for seed in self._teacher_seeds():
            if not provider.to_train(seed):  # read (and checked) by the jobs that use it
                teachers[seed] = DONE
            else:
                teachers[seed] = RUNNING
                options = replace(settings.search.data, seed=seed)
                pending[teacher_job.remote(replace(settings.search, data=options), self.log)] = ("teacher", seed)
                self.say(f"teacher seed {seed}: training")
        self._refresh_rows()
        self.epochs_at_start = sum(r.epochs_done for r in self.rows.values())
        last_shown = -float("inf")
        while True:
            for method, row in self.rows.items():
                if row.search == WAITING:
                    self._maybe_start_search(method, row, teachers, pending, search_job)
                if row.search == DONE and row.final == WAITING and all(s == DONE for s in teachers.values()):
                    row.final = RUNNING
                    final = replace(settings.final, methods=(method,))
                    pending[final_job.remote(final, self.log)] = ("final", method)
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                self._finished(*pending.pop(ref), ref, teachers)
            now = time.monotonic()
            self._sample_slots()
            if now - last_shown >= self.refresh_s:
                self._refresh_rows()
                self.show(self.status())
                last_shown = now
        self._refresh_rows()
        status = self.status()
        self.show(status)
        io.write_json(settings.layout.protocol_summary, {
            "methods": list(settings.methods), "seeds": list(settings.final.seeds),
            "seconds": round(status.elapsed, 1), "slot_use": self.slot_use(),
            "failures": self.failures,
        })
        return self.failures

    def _maybe_start_search(self, method: str, row: MethodProgress, teachers: dict, pending: dict, search_job) -> None:
        settings = self.settings
        waiting = [s for _, s in get_method(method).fixed_from if s in self.rows and self.rows[s].search != DONE]
        failed = [s for s in waiting if self.rows[s].search == FAILED]
        if failed:
            row.search = row.final = FAILED
            row.error = f"its source search {failed[0]} failed"
            self.failures.append(f"{method}: not run, {row.error}")
            self.say(f"search {method}: not run ({row.error})")
            return
        if get_method(method).needs_teacher and teachers.get(settings.search.data.seed) != DONE:
            row.waiting_for = f"teacher seed {settings.search.data.seed}"
            if teachers.get(settings.search.data.seed) == FAILED:
                row.search = row.final = FAILED
                row.error = "its teacher failed"
                self.failures.append(f"{method}: not run, {row.error}")
            return
        if waiting:
            row.waiting_for = f"{waiting[0]}'s best config"
            return
        row.waiting_for = ""
        search = search_settings(settings, method)
        self.searches[method] = search
        if search_status(search) == "done":
            row.search = DONE
            self.say(f"search {method}: done before ({SearchDir(search.experiment_dir).best})")
            return
        row.search = RUNNING
        pending[search_job.remote(search, self.log)] = ("search", method)
        self.say(f"search {method}: {'resuming' if search.resume else 'started'}")

    def _finished(self, kind: str, key, ref, teachers: dict) -> None:
        import ray

        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as exc:
            reason = _cause(exc)
            if kind == "teacher":
                teachers[key] = FAILED
                self.failures.append(f"teacher seed {key}: {reason}")
            else:
                row = self.rows[key]
                setattr(row, kind, FAILED)
                if kind == "search":
                    row.final = FAILED
                row.error = reason
                self.failures.append(f"{key} {kind}: {reason}")
            self.say(f"{kind} {key}: FAILED: {reason}")
            return
        if kind == "teacher":
            teachers[key] = DONE
            self.say(f"teacher seed {key}: done")
        elif kind == "search":
            self.rows[key].search = DONE
            hyper = ", ".join(f"{k}={v:g}" for k, v in result.hyperparameters.items()) or "no hyperparameters"
            self.say(f"search {key}: done, best {hyper} ({result.objective} {result.objective_value:.2f})")
        else:
            row = self.rows[key]
            row.final = FAILED if result else DONE
            for line in result:
                self.failures.append(f"{key} final: {line}")
            self.say(f"final {key}: {'done' if not result else 'FAILED: ' + '; '.join(result)}")

    def _refresh_rows(self) -> None:
        from fairtune.metrics import objective_mode

        template = self.settings.search
        for method, row in self.rows.items():
            folder = replace(template, base=replace(template.base, method=method)).experiment_dir
            total = replace(template.base, method=method).total_epochs
            if SearchDir(folder).ledger.exists():
                _read_search(row, folder, total, objective_mode(template.base.objective))
            elif row.trials_planned == 0:
                planned = template.num_samples if get_method(method).searched else 1
                row.trials_planned, row.epochs_budget = planned, planned * total
            seeds = self.settings.final.seeds
            row.seeds_planned = len(seeds)
            row.seeds_done = sum(final_path(template.results_dir, self.settings.dataset, method, s).exists() for s in seeds)

    def _sample_slots(self) -> None:
        import ray

        total, free = ray.cluster_resources(), ray.available_resources()
        key = "GPU" if total.get("GPU") and self.settings.search.gpus_per_trial else "CPU"
        self.busy_samples.append((total.get(key, 0) - free.get(key, 0)) / max(total.get(key, 0), 1e-9))

    def slot_use(self) -> float | None:
        return round(sum(self.busy_samples) / len(self.busy_samples), 3) if self.busy_samples else None

    def status(self) -> Status:
        import ray

        total, free = ray.cluster_resources(), ray.available_resources()
        key = "GPU" if total.get("GPU") and self.settings.search.gpus_per_trial else "CPU"
        busy, slots = total.get(key, 0) - free.get(key, 0), total.get(key, 0)
        per_slot = self.settings.search.gpus_per_trial if key == "GPU" else self.settings.search.cpus_per_trial
        final_epochs = {m: replace(self.settings.search.base, method=m).total_epochs for m in self.rows}
        epochs_done = sum(r.epochs_done + r.seeds_done * final_epochs[m] for m, r in self.rows.items())
        budget = sum(r.epochs_budget + r.seeds_planned * final_epochs[m] for m, r in self.rows.items())
        elapsed = time.monotonic() - self.started
        fresh = epochs_done - self.epochs_at_start
        use = self.slot_use() or 0.0
        pace = elapsed * use * slots / per_slot / fresh if fresh > 0 and per_slot else None
        eta = (budget - epochs_done) * pace / max(slots / per_slot, 1) if pace else None
        return Status(list(self.rows.values()), elapsed, busy / per_slot if per_slot else 0, slots / per_slot if per_slot else 0,
                      epochs_done, budget, pace, eta)


def _cause(exc: BaseException) -> str:
    """The job's own error in one line (a UserError's text as it is)."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, UserError):
        return str(cause)
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".strip(": ")


def run_protocol(settings: ProtocolSettings, say: Printer, show: Callable[[Status], None], refresh_s: float) -> list[str]:
    """Run (or continue) the protocol; returns one line per failed search, final or teacher."""
    from fairtune.tune.cluster import check_resources, connect

    check_resources(connect(settings.search.address), settings.search.cpus_per_trial, settings.search.gpus_per_trial)
    protocol = Protocol(settings, say, show, refresh_s)
    try:
        return protocol.run()
    except KeyboardInterrupt:
        import ray

        ray.shutdown()  # kills every job and trial: the ledgers and seed files keep what finished
        raise


__all__ = ["ProtocolSettings", "Status", "check_methods", "run_protocol", "search_settings"]
