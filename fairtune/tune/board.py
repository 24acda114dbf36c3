"""TensorBoard a researcher can read: one run per search trial and per final seed, readable tags, and
one HParams table in which every search shows its own hyperparameter.

Layout (``tensorboard --logdir results/<D>``)::

    search/<M>/tb/<t000 lam=3>/     one run per trial (fairtune's stable id and the sampled value)
    final/<M>/tb/seed<k>/           one run per final rerun

Every run holds, per epoch (the step), ``val/{accuracy,deo_a,deo_m,objective,loss}`` on the selection
split with ``val/group_acc/<group>``, ``train/<loss term>`` and ``schedule/lr`` (``schedule/kd_weight`` and
``schedule/hint_stage`` for the methods that have them); a final run adds ``test/…`` at its last epoch.

*Choice*, for HParams: TensorBoard shows a single experiment per logdir, and where several runs
carry an experiment config it takes "the first one" it happens to list (``_find_experiment_tag`` in
``tensorboard/plugins/hparams/backend_context.py``; the Rust data server lists runs in no fixed order).
Configs that differ per search — Ray Tune's, one per trial, declaring only that trial's
hyperparameter — therefore showed one random search's column and left the others empty. Here every
run carries the *same* config: ``method``, ``kind`` (search or final), ``seed``, ``dataset`` and every
row of the hyperparameter table (T, lam, distill_lam and any a plugin adds), then the metrics with accuracy, DEO_A,
DEO_M and the objective first. Whichever copy TensorBoard picks, ``--logdir results/D`` (several
searches), ``results/D/search/M`` (one) or ``results`` (several datasets) show each run's own values;
each session records only the hyperparameters its method has.

Ray Tune's own TensorBoard logger is switched off (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS`` in
``fairtune.tune.cluster``, its CSV and JSON loggers passed back explicitly): its ``ray/tune/…`` tags
and per-trial experiment configs are what made the view unreadable. Its ``progress.csv`` and
``result.json`` stay in ``search/<M>/tune/``.

Everything is written by the driver (search: a Tune callback; final: the results and the progress
queue that reach it), so no worker needs the results folder.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from fairtune.data import DATASETS, DataOptions
from fairtune.engine import TrainConfig
from fairtune.hyperparameters import HYPERPARAMETERS
from fairtune.layout import Layout, SearchDir
from fairtune.methods import all_method_names, get_method
from fairtune.metrics import DEFAULT_OBJECTIVE, objective_value
from fairtune.selection import BEST, Rule
from fairtune.tune.ledger import TRIAL_KEY, Ledger

SEARCH, FINAL = "search", "final"
# Selection-split metric -> tag; these four lead the HParams table (its first columns are ticked).
VAL_TAGS = {"accuracy": "val/accuracy", "deo_a": "val/deo_a", "deo_m": "val/deo_m", "objective": "val/objective", "loss": "val/loss"}


def _experiment_pb():
    """The one HParams experiment config every run carries (see the module docstring for why it is
    the same everywhere). TensorBoard's MetricInfo has no goal field: directions are in the names."""
    # summary_v2 rather than hparams.api, which imports TensorFlow (for its Keras callback).
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp

    hparams = [
        hp.HParam("method", hp.Discrete(all_method_names()), description="fairtune method"),
        hp.HParam("kind", hp.Discrete([SEARCH, FINAL]), description="a search trial or a final rerun"),
        hp.HParam("seed", description="data, teacher and training seed"),
        hp.HParam("dataset", hp.Discrete(sorted(DATASETS)), description="for a --logdir holding several datasets"),
    ]
    hparams += [
        hp.HParam(row.name, display_name=None if row.symbol == row.name else row.symbol, description=row.help)
        for row in HYPERPARAMETERS.values()
    ]
    split = "selection split (val; test under --select-on test), last epoch"
    metrics = [
        hp.Metric("val/accuracy", display_name="accuracy ↑", description=f"accuracy on the {split}"),
        hp.Metric("val/deo_a", display_name="DEO_A ↓", description=f"mean over classes of the group accuracy gap, {split}"),
        hp.Metric("val/deo_m", display_name="DEO_M ↓", description=f"largest group accuracy gap of any class, {split}"),
        hp.Metric(
            "val/objective", display_name="objective",
            description=f"the search's --objective on the {split}: {DEFAULT_OBJECTIVE} (default) and acc higher is better; deo_a, deo_m lower",
        ),
        hp.Metric("test/accuracy", display_name="test accuracy ↑", description="final runs: test split after the last epoch"),
        hp.Metric("test/deo_a", display_name="test DEO_A ↓", description="final runs: test split after the last epoch"),
        hp.Metric("test/deo_m", display_name="test DEO_M ↓", description="final runs: test split after the last epoch"),
        hp.Metric("val/loss", display_name="val loss", description=f"student cross-entropy on the {split}"),
    ]
    summary = hp.hparams_config_pb(hparams, metrics, time_created_secs=0.0)
    # The plugin lists hyperparameters that differ first, then by name, and the dashboard ticks the first
    # five: `differs` (which the API does not set) leaves dataset and the hyperparameters no method
    # searches (distill_lam: fixed in ad+at, ad+nst) last, unticked.
    searched = {get_method(name).searched for name in all_method_names()}
    experiment = plugin_data_pb2.HParamsPluginData.FromString(summary.value[0].metadata.plugin_data.content)
    for info in experiment.experiment.hparam_infos:
        info.differs = info.name != "dataset" and (info.name not in HYPERPARAMETERS or info.name in searched)
    summary.value[0].metadata.plugin_data.content = experiment.SerializeToString()
    return summary


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def epoch_scalars(flat: dict, method: str) -> dict[str, float]:
    """Tag -> value for one epoch's flat metrics (``trainable.flat_metrics``, as Tune reports them):
    fairtune's numbers under their groups; Ray's bookkeeping (done, timing, iterations) left out."""
    spec = get_method(method)
    tags = {tag: flat[key] for key, tag in VAL_TAGS.items() if key in flat}
    tags.update({k: v for k, v in flat.items() if k.startswith("train/")})
    tags.update({f"val/{k}": v for k, v in flat.items() if k.startswith("group_acc/")})
    if "lr" in flat:
        tags["schedule/lr"] = flat["lr"]
    if spec.uses_kd_annealing and "kd_weight" in flat:
        tags["schedule/kd_weight"] = flat["kd_weight"]
    if spec.hint_stage and "hint_stage" in flat:
        tags["schedule/hint_stage"] = flat["hint_stage"]
    # A non-finite value (an empty group's accuracy is NaN) would make TensorBoard's axis useless.
    return {tag: float(v) for tag, v in tags.items() if _finite(v)}


def group_accuracies(acc_matrix: list, cell_counts: list, group_names: tuple[str, ...]) -> dict[str, float]:
    """Accuracy per group, from the per-(group, class) accuracies and counts."""
    found = {}
    for g, name in enumerate(group_names):
        n = sum(cell_counts[g])
        if n:
            found[name] = sum((a or 0.0) * c for a, c in zip(acc_matrix[g], cell_counts[g])) / n
    return found


def test_scalars(test: dict, group_names: tuple[str, ...], objective: str) -> dict[str, float]:
    tags = {f"test/{k}": test[k] for k in ("accuracy", "deo_a", "deo_m", "loss") if k in test}
    tags["test/objective"] = objective_value(objective, accuracy=test["accuracy"], deo_a=test["deo_a"], deo_m=test["deo_m"])
    if "acc_matrix" in test and "cell_counts" in test:
        for name, value in group_accuracies(test["acc_matrix"], test["cell_counts"], group_names).items():
            tags[f"test/group_acc/{name}"] = value
    return {tag: float(v) for tag, v in tags.items() if _finite(v)}


class RunWriter:
    """One TensorBoard run. The experiment config and the session's hyperparameters are written once,
    when the folder gets its first event file; a later driver session (``--resume``) appends a new
    event file to the same run."""

    def __init__(self, folder: Path, hparams: dict, name: str):
        from tensorboard.plugins.hparams import summary_v2
        from torch.utils.tensorboard import SummaryWriter

        fresh = not any(Path(folder).glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(str(folder))
        if fresh:
            self.writer.file_writer.add_summary(_experiment_pb())
            # ``name`` is the row's "trial id" in the HParams table (the API's default is a hash).
            self.writer.file_writer.add_summary(summary_v2.hparams_pb(hparams, trial_id=name))
            self.writer.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a killed driver loses at most the epoch in flight, not two minutes of them

    def close(self) -> None:
        self.writer.close()


def _session_hparams(dataset: str, method: str, kind: str, seed: int, hyperparameters: dict) -> dict:
    values = {k: float(v) for k, v in hyperparameters.items() if k in HYPERPARAMETERS and v is not None}
    return {"dataset": dataset, "method": method, "kind": kind, "seed": seed, **values}


def search_callback(ledger: Ledger, experiment_dir: Path, base_config: TrainConfig, parameter: str | None, data: DataOptions):
    """A Tune callback writing each trial's run, to be listed after the ledger's callback: an epoch is
    in the ledger before it is written here, so a killed driver can leave a gap in a curve (the epoch
    in flight) but never a repeated point. ``ray.tune`` is imported here, after
    ``cluster.prepare_environment``."""
    from ray.tune import Callback

    class BoardCallback(Callback):
        """Writes each new epoch once: a resumed or retried trial re-reports the epochs it holds,
        and those the ledger had recorded before this session, or this session already wrote, are
        skipped (TensorBoard would draw a repeated step as a line going back)."""

        def __init__(self):
            self.written = {t.id: t.epochs_run for t in ledger.trials}
            self.runs: dict[str, RunWriter] = {}

        def _run(self, trial) -> RunWriter:
            trial_id = trial.config[TRIAL_KEY]
            if trial_id not in self.runs:
                value = trial.config.get(parameter) if parameter else None
                hyper = {**base_config.hyperparameters, **{k: v for k, v in trial.config.items() if k != TRIAL_KEY}}
                folder = SearchDir(experiment_dir).tb_run(trial_id, parameter, value)
                hparams = _session_hparams(data.dataset, base_config.method, SEARCH, data.seed, hyper)
                self.runs[trial_id] = RunWriter(folder, hparams, f"{base_config.method} {folder.name}")
            return self.runs[trial_id]

        def on_trial_start(self, iteration, trials, trial, **info):
            self._run(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            trial_id, epoch = trial.config[TRIAL_KEY], int(result["epoch"])
            if epoch <= self.written.get(trial_id, 0):
                return
            self.written[trial_id] = epoch
            self._run(trial).scalars(epoch, epoch_scalars(result, base_config.method))

        def _close(self, trial) -> None:
            run = self.runs.pop(trial.config[TRIAL_KEY], None)
            if run is not None:
                run.close()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial)

        def on_experiment_end(self, trials, **info):
            for run in self.runs.values():
                run.close()
            self.runs.clear()

    return BoardCallback()


def tune_loggers() -> list:
    """Tune's CSV and JSON loggers (progress.csv, result.json), passed explicitly because
    ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS`` (set to keep Tune's TensorBoard logger off) drops them too."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()]


class FinalBoard:
    """The final's runs, written by the driver: the selection-split curve as the progress queue brings
    each epoch, then (with the result) any epoch the queue missed and the test metrics."""

    def __init__(self, results_dir: Path, dataset: str, group_names: tuple[str, ...], rule: Rule = BEST):
        self.results_dir, self.dataset, self.group_names, self.rule = Path(results_dir), dataset, tuple(group_names), rule
        self.runs: dict[tuple[str, int], tuple[RunWriter, set[int], str]] = {}

    def start(self, config, seed: int) -> None:
        """A run that starts now trains from its first epoch: an older run of it (interrupted,
        or replaced by --force) is cleared."""
        folder = Layout(self.results_dir, self.dataset).final_tb(config.method, seed, self.rule)
        shutil.rmtree(folder, ignore_errors=True)
        hparams = _session_hparams(self.dataset, config.method, FINAL, seed, config.hyperparameters)
        kind = "final" if self.rule == BEST else f"final ({self.rule.text})"
        run = RunWriter(folder, hparams, f"{config.method} {kind} seed{seed}")
        self.runs[(config.method, seed)] = (run, set(), config.objective)

    def epoch(self, method: str, seed: int, metrics: dict) -> None:
        from fairtune.tune.trainable import flat_metrics

        found = self.runs.get((method, seed))
        if found is None or metrics["epoch"] in found[1]:
            return
        run, written, _ = found
        written.add(metrics["epoch"])
        run.scalars(metrics["epoch"], epoch_scalars(flat_metrics(metrics, self.group_names), method))

    def finish(self, method: str, seed: int, record: dict | None) -> None:
        """The run's result (None: it failed; its curve so far stays)."""
        found = self.runs.get((method, seed))
        if found is None:
            return
        if record is not None:
            for metrics in record.get("history") or []:
                self.epoch(method, seed, metrics)
            run, _, objective = found
            run.scalars(int(record["epochs_run"]), test_scalars(record["test"], self.group_names, objective))
        self.runs.pop((method, seed))[0].close()

    def close(self) -> None:
        for run, _, _ in self.runs.values():
            run.close()
        self.runs.clear()


__all__ = [
    "FinalBoard", "RunWriter", "epoch_scalars", "search_callback", "test_scalars", "tune_loggers",
]
