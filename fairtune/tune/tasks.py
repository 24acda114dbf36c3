"""Whole runs as Ray tasks: a teacher, or one method on one seed.

They return data rather than writing files, so they can run on any node of a cluster without a
shared filesystem; the driver writes what comes back, atomically. Each finished epoch can also be
sent to the driver through a Ray queue, so that hours-long runs show progress as they go. Every
record names the node that computed it (``node``: Ray's node id and the machine's hostname).
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable

import torch

from fairtune.data import DataOptions, load_dataset
from fairtune.engine import TrainConfig
from fairtune.runs import run_method, run_record, train_teacher
from fairtune.teachers import teacher_model


def task_device(device: str) -> torch.device:
    """``auto`` means CUDA only when Ray gave this task a GPU, so CPU tasks on a GPU node stay off it."""
    if device != "auto":
        return torch.device(device)
    import ray

    return torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")


def node_identity() -> dict[str, str]:
    """The node this code runs on: Ray's node id (as ``ray.nodes()`` lists it) and the hostname."""
    import ray

    return {"id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}


def epoch_reporter(
    progress: Any, run: str, total: int, split: str, source: tuple[str, int] | None = None
) -> Callable[[dict], None] | None:
    """Send each finished epoch of ``run`` (metrics on the selection ``split``) to ``progress`` (a
    ``ray.util.queue.Queue``), or nothing. With ``source`` (method, seed) the epoch's whole metrics
    travel too, for the driver's TensorBoard run.

    Best effort: a progress line that cannot be delivered (the driver is gone) must not fail the run."""
    if progress is None:
        return None
    import ray

    last = time.perf_counter()

    def report(metrics: dict) -> None:
        nonlocal last
        now = time.perf_counter()
        line = {"run": run, "epoch": metrics["epoch"], "of": total, "split": split, "accuracy": metrics["accuracy"],
                "deo_a": metrics["deo_a"], "seconds": now - last}  # fmt: skip
        last = now
        if source is not None:
            line.update(method=source[0], seed=source[1], metrics=metrics)
        try:
            progress.put_nowait(line)
        except ray.exceptions.RayError:
            pass

    return report


def train_teacher_task(
    base: TrainConfig, options: DataOptions, data_dir: str, device: str, cpus: int, progress: Any = None
) -> tuple[dict, dict]:
    torch.set_num_threads(max(1, cpus))
    on_epoch = epoch_reporter(progress, f"teacher seed {options.seed}", base.total_epochs, options.select_on, ("scratch", options.seed))
    state, record = train_teacher(load_dataset(options, data_dir), base, task_device(device), on_epoch)
    return state, {**record, "node": node_identity()}


def method_run_task(
    config: TrainConfig,
    options: DataOptions,
    data_dir: str,
    device: str,
    cpus: int,
    teacher_state: dict | None,
    progress: Any = None,
) -> dict:
    """One method on one seed, evaluated on the test split; returns its run record."""
    torch.set_num_threads(max(1, cpus))
    started = time.perf_counter()
    data = load_dataset(options, data_dir)
    teacher = teacher_model(teacher_state, data.info) if teacher_state is not None else None
    where = task_device(device)
    on_epoch = epoch_reporter(
        progress, f"{config.method} seed {options.seed}", config.total_epochs, options.select_on, (config.method, options.seed)
    )
    record = run_record(config, data, run_method(config, data, teacher, where, on_epoch), where)
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    record["node"] = node_identity()
    return record


def hint_stage_task(
    config: TrainConfig, options: DataOptions, data_dir: str, device: str, cpus: int, teacher_state: dict, log: str
) -> dict:
    """FitNet's stage 1 (E/2 epochs of hints), once per search: it reads no T, so every trial of the
    search would run it identically. Returns the trainer's state at the stage's end."""
    import json
    import os
    from pathlib import Path

    from fairtune.engine import Trainer

    torch.set_num_threads(max(1, cpus))
    data = load_dataset(options, data_dir)
    trainer = Trainer(config, data, teacher_model(teacher_state, data.info), task_device(device))
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    node = node_identity()
    while trainer.epoch < trainer.hint_epochs:
        metrics = trainer.run_epoch()
        metrics["node"] = node  # kept in the trainer's history: the trials re-report these epochs
        with open(log, "a") as handle:
            handle.write(json.dumps({"epoch": metrics["epoch"], "pid": os.getpid()}) + "\n")
    return trainer.state_dict()
