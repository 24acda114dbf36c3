"""Whole runs on one machine: a teacher, or one method on one seed. The search and final reruns wrap
these; the CLI's ``train`` and ``teacher`` commands call them directly.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from fairtune import hyperparameters, io
from fairtune.data import DataOptions, DatasetSplits
from fairtune.data.sampler import SAMPLERS
from fairtune.engine import Trainer, TrainConfig
from fairtune.errors import UserError
from fairtune.layout import Layout
from fairtune.methods import get_method
from fairtune.records import read_best
from fairtune.spaces import SPACES_DIR, load_space

def resolve_hyperparameters(
    method_name: str, dataset: str, given: dict[str, float | None], results_dir: Path, spaces_dir: Path = SPACES_DIR
) -> dict[str, float]:
    """The values a run uses: given ones, else the search space's start (searched) or the best
    config found for the source method (fixed). Misplaced or impossible values raise UserError."""
    method = get_method(method_name)
    flag = lambda name: hyperparameters.get(name).flag  # noqa: E731
    for name, value in given.items():
        if value is None:
            continue
        if name not in method.params:
            takes = ", ".join(flag(p) for p in method.params) or "no hyperparameter"
            raise UserError(f"method {method.name} does not use {flag(name)}; it takes {takes}")
        hyperparameters.check({name: value})
    values: dict[str, float] = {}
    space = load_space(method.name, spaces_dir)
    if method.searched:
        value = given.get(method.searched)
        values[method.searched] = float(value if value is not None else space.start(dataset))
    layout = Layout(results_dir, dataset)
    for param, source in method.fixed_from:
        if given.get(param) is not None:
            values[param] = float(given[param])
            continue
        path = layout.search(source).best
        if not path.exists():
            raise UserError(
                f"{method.name} needs {param} from the best {source} config ({path} is missing); "
                f"run `fairtune search --method {source} --dataset {dataset}` or pass {flag(param)}"
            )
        searched = get_method(source).searched
        redo = f"rerun `fairtune search --method {source} --dataset {dataset}` or pass {flag(param)}"
        best = read_best(layout, source, redo)
        if searched not in best.hyperparameters:
            raise UserError(f"{path} has no hyperparameters.{searched}; {redo}")
        values[param] = float(best.hyperparameters[searched])
    return values


def check_batches(methods: list[str], batch_size: int, data: DatasetSplits) -> None:
    """Refuse a batch size the training split cannot fill with ``methods``' samplers before anything
    runs: otherwise every epoch of every run (every trial and retry of a search) fails the same way."""
    info, train = data.info, data.train
    cells = info.num_classes * info.num_groups
    size = f" (--train-size {data.options.train_size})" if data.options.train_size else ""
    for name in methods:
        sampler = get_method(name).sampler
        if sampler not in ("balanced", "random"):
            # A plugin's sampler states its limits by failing: draw one epoch's plan now, with a
            # throwaway generator, rather than in every epoch of every run.
            try:
                plan = SAMPLERS[sampler](train.labels, train.groups, info.num_classes, info.num_groups, batch_size, torch.Generator().manual_seed(0))
            except (ValueError, RuntimeError) as exc:
                raise UserError(f"--batch-size {batch_size} does not fit {name}'s sampler '{sampler}' on {info.name}{size}: {exc}") from None
            if len(plan) == 0:
                raise UserError(f"--batch-size {batch_size} leaves {name}'s sampler '{sampler}' no batch on {info.name}{size}; use a smaller --batch-size")
        elif sampler == "balanced":
            largest = int(train.cell_counts(info.num_classes, info.num_groups).max())
            most = (largest + 1) * cells - 1  # above it, a cell's share of a batch exceeds its largest cell
            if not cells <= batch_size <= most:
                raise UserError(
                    f"--batch-size {batch_size} does not fit {name}'s balanced batches on {info.name}: each takes "
                    f"floor(B / {cells}) samples of every (class, group) cell, and the largest cell holds {largest} "
                    f"training samples{size}; use a --batch-size from {cells} to {most}"
                )
        elif batch_size > len(train):
            raise UserError(
                f"--batch-size {batch_size} is more than the {len(train)} training samples of {info.name}{size}, so "
                f"{name} has no full batch to train on; use a --batch-size of at most {len(train)} or a larger --train-size"
            )


@dataclass(frozen=True)
class RunResult:
    history: list[dict]
    test: dict
    seconds_per_epoch: float
    trainer: Trainer


def run_method(
    config: TrainConfig,
    data: DatasetSplits,
    teacher: torch.nn.Module | None,
    device: torch.device,
    on_epoch: Callable[[dict], None] | None = None,
) -> RunResult:
    trainer = Trainer(config, data, teacher, device)
    start = time.perf_counter()
    history = trainer.fit(on_epoch)
    seconds = (time.perf_counter() - start) / max(len(history), 1)
    return RunResult(history, trainer.test_metrics(), seconds, trainer)


def train_teacher(
    data: DatasetSplits, base: TrainConfig, device: torch.device, on_epoch: Callable[[dict], None] | None = None
) -> tuple[dict, dict]:
    """Train a `scratch` model with ``base``'s protocol; returns (CPU state dict, run record).

    Returns data rather than writing files so it can run as a Ray task on any node; a
    ``fairtune.teachers.TeacherProvider`` decides when it runs and stores what it returns."""
    config = replace(base, method="scratch", hyperparameters={})
    result = run_method(config, data, None, device, on_epoch)
    state = {k: v.detach().cpu() for k, v in result.trainer.student.state_dict().items()}
    return state, run_record(config, data, result, device)


def run_record(config: TrainConfig, data: DatasetSplits, result: RunResult, device: torch.device) -> dict:
    """What a finished run leaves on disk (``train`` and ``final`` write the same record)."""
    return {
        "method": config.method,
        "dataset": data.options.dataset,
        "seed": data.options.seed,
        "hyperparameters": dict(config.hyperparameters),
        "config": config.record(),
        "data": data.options.fingerprint(),
        "device": str(device),
        "epochs_run": len(result.history),
        "seconds_per_epoch": result.seconds_per_epoch,
        "test": result.test,
        "history": result.history,
    }


def train_run_path(results_dir: Path, config: TrainConfig, options: DataOptions) -> Path:
    """Where `fairtune train` keeps a run: ``train/<method>/<run>/seed<k>.json``, ``<run>`` being the
    hyperparameters and a digest of every other setting (protocol, data, sizes). Runs that differ in
    anything but the seed never overwrite each other; the seeds of one setting share a folder."""
    hyper = "_".join(f"{name}{value:g}" for name, value in config.hyperparameters.items()) or "run"
    settings = {"train": config.record(), "data": {k: v for k, v in options.fingerprint().items() if k != "seed"}}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return Layout(results_dir, options.dataset).train_run(config.method, f"{hyper}-{digest}", options.seed)


def write_run(path: Path, config: TrainConfig, data: DatasetSplits, result: RunResult, device: torch.device) -> None:
    io.write_json(path, run_record(config, data, result, device))


__all__ = [
    "RunResult",
    "check_batches",
    "resolve_hyperparameters",
    "run_method",
    "run_record",
    "train_run_path",
    "write_run",
]
