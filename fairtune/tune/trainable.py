"""The Ray Tune function trainable: the engine's loop, reporting and checkpointing every epoch.

A trial restores from ``tune.get_checkpoint()`` (a retry after a crash, or a resumed experiment),
so it continues from its last finished epoch with the exact optimiser, scheduler, adversary and RNG
state. A non-finite loss is a deterministic failure: the trial records the reason in its folder and
raises, and any retry raises again at once instead of re-running the epoch.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from ray import tune

from fairtune import io
from fairtune.data import DataOptions, load_dataset
from fairtune.engine import NonFiniteLoss, Trainer, TrainConfig
from fairtune.teachers import teacher_model
from fairtune.tune.tasks import task_device

STATE_FILE = "state.pt"
# Side files live in the experiment's `trial_logs/` folder, written straight to storage: Tune's own
# trial folder is a per-session working copy synced up on checkpoints, so a resumed session would
# overwrite what the killed one wrote there.
LOG_FOLDER = "trial_logs"


def epoch_log(log_dir: str | Path, trial_id: str) -> Path:
    """One JSON line per epoch actually run, recomputed ones included: proof of what ran."""
    return Path(log_dir) / f"{trial_id}.epochs.jsonl"


def failure_marker(log_dir: str | Path, trial_id: str) -> Path:
    return Path(log_dir) / f"{trial_id}.nonfinite.txt"


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial needs besides its sampled hyperparameters (which arrive as ``config``)."""

    base: TrainConfig  # the fixed hyperparameters are already filled in
    data: DataOptions
    data_dir: str
    log_dir: str  # the experiment's LOG_FOLDER
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


def run_trial(config: dict, spec: TrialSpec, teacher_state: dict | None = None) -> None:
    torch.set_num_threads(max(1, spec.cpus))
    trial_id = tune.get_context().get_trial_id()
    failure = failure_marker(spec.log_dir, trial_id)
    if failure.exists():
        raise NonFiniteLoss(failure.read_text().strip())

    data = load_dataset(spec.data, spec.data_dir)
    teacher = teacher_model(teacher_state, data.info) if teacher_state is not None else None
    trainer = Trainer(replace(spec.base, **config), data, teacher, task_device(spec.device))
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(io.load_torch(Path(folder) / STATE_FILE))

    while trainer.epoch < trainer.total_epochs:
        try:
            metrics = trainer.run_epoch()
        except NonFiniteLoss as exc:
            failure.write_text(str(exc) + "\n")
            raise
        with open(epoch_log(spec.log_dir, trial_id), "a") as log:
            log.write(json.dumps({"epoch": metrics["epoch"], "pid": os.getpid()}) + "\n")
        with tempfile.TemporaryDirectory() as folder:
            torch.save(trainer.state_dict(), Path(folder) / STATE_FILE)
            tune.report(flat_metrics(metrics, data.info.group_names), checkpoint=tune.Checkpoint.from_directory(folder))
