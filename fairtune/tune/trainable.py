"""The Ray Tune function trainable: the engine's loop, reporting every epoch and keeping its own state.

Each trial saves its full training state (optimiser, scheduler, adversaries, RNG) after every epoch to
its own folder in the experiment, ``trials/<id>/state-<epoch>.pt``, before reporting the epoch. A
trial started again — a retry after a crash, or a search resumed by a new driver from fairtune's ledger
— loads the newest state there, re-reports the epochs it holds (the ledger may have missed the newest
one when the driver died) and continues exactly as if never stopped. Tune's own checkpoints are not
used: they live in Tune's experiment state, which lags a killed driver (docs/ray.md).

State files are named by epoch, so a worker of a killed driver that finishes an epoch late can never
replace a newer state with an older one. A non-finite loss is a deterministic failure: the trial
records the reason in its folder and raises, and any retry raises again at once.

Every reported epoch names the node that computed it (``node``: Ray's node id and the hostname),
kept in the saved history, so an epoch re-reported by a trial continued elsewhere keeps its node.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from ray import tune

from fairtune import io
from fairtune.data import DataOptions, load_dataset
from fairtune.engine import NonFiniteLoss, Trainer, TrainConfig
from fairtune.layout import SearchDir
from fairtune.teachers import teacher_model
from fairtune.tune.ledger import TRIAL_KEY
from fairtune.tune.tasks import node_identity, task_device

KEEP_STATES = 2


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial needs besides its sampled hyperparameters (which arrive as ``config``)."""

    base: TrainConfig  # the fixed hyperparameters are already filled in
    data: DataOptions
    data_dir: str
    experiment_dir: str
    cpus: int
    device: str = "auto"


def flat_metrics(metrics: dict, group_names: tuple[str, ...]) -> dict:
    """Numbers only (TensorBoard plots them); the acc[g,c] matrix travels as a JSON string."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    flat["hint_stage"] = int(metrics["stage"] == "hint")
    matrix, counts = metrics["acc_matrix"], metrics["cell_counts"]
    for g, name in enumerate(group_names):
        n = sum(counts[g])
        correct = sum((a or 0.0) * c for a, c in zip(matrix[g], counts[g])) / 100.0
        flat[f"group_acc/{name}"] = 100.0 * correct / n if n else float("nan")
    flat["acc_matrix"] = json.dumps(matrix)
    return flat


def _save_state(spec: TrialSpec, trial_id: str, trainer: Trainer) -> None:
    folder = SearchDir(spec.experiment_dir)
    io.save_torch(folder.state_file(trial_id, trainer.epoch), trainer.state_dict())
    for old in folder.state_files(trial_id)[:-KEEP_STATES]:
        old.unlink(missing_ok=True)


def _load_newest_state(spec: TrialSpec, trial_id: str, trainer: Trainer) -> bool:
    for path in reversed(SearchDir(spec.experiment_dir).state_files(trial_id)):
        try:
            state = io.load_torch(path)
        except (OSError, RuntimeError, EOFError):
            continue  # removed by a rotation meanwhile
        trainer.load_state_dict(state)
        return True
    return False


def _start_after_hint_stage(spec: TrialSpec, trainer: Trainer, sampled: dict) -> None:
    """Continue from the search's shared hint stage (identical for every T, see tasks.hint_stage_task):
    the state equals the one this trial would reach itself, but for the sampled values it records."""
    state = io.load_torch(SearchDir(spec.experiment_dir).hint_stage_state)
    mine = trainer.config.record()
    differing = [k for k, v in state["config"].items() if k not in sampled and mine.get(k) != v]
    if differing:
        raise ValueError(f"the shared hint stage was trained with other settings ({', '.join(differing)})")
    trainer.load_state_dict({**state, "config": mine})


def run_trial(config: dict, spec: TrialSpec, teacher_state: dict | None = None) -> None:
    torch.set_num_threads(max(1, spec.cpus))
    config = dict(config)
    trial_id = config.pop(TRIAL_KEY)
    folder = SearchDir(spec.experiment_dir)
    failure = folder.failure_marker(trial_id)
    if failure.exists():
        raise NonFiniteLoss(failure.read_text().strip())

    data = load_dataset(spec.data, spec.data_dir)
    teacher = teacher_model(teacher_state, data.info) if teacher_state is not None else None
    trainer = Trainer(spec.base.with_hyperparameters(config), data, teacher, task_device(spec.device))
    if not _load_newest_state(spec, trial_id, trainer) and trainer.hint_epochs and folder.hint_stage_state.exists():
        _start_after_hint_stage(spec, trainer, config)
    node = node_identity()
    for metrics in trainer.history:  # idempotent in the ledger; ASHA skips rungs it has recorded
        tune.report({**flat_metrics(metrics, data.info.group_names), "node": metrics.get("node", node)})

    while trainer.epoch < trainer.total_epochs:
        try:
            metrics = trainer.run_epoch()
        except NonFiniteLoss as exc:
            failure.parent.mkdir(parents=True, exist_ok=True)
            failure.write_text(str(exc) + "\n")
            raise
        metrics["node"] = node  # into the trainer's history, saved with the state below
        log = folder.epoch_log(trial_id)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as handle:
            handle.write(json.dumps({"epoch": metrics["epoch"], "pid": os.getpid()}) + "\n")
        _save_state(spec, trial_id, trainer)
        tune.report({**flat_metrics(metrics, data.info.group_names), "node": node})
