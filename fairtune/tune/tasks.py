"""Whole runs as Ray tasks: a teacher, or one method on one seed.

They return data rather than writing files, so they can run on any node of a cluster without a
shared filesystem; the driver writes what comes back, atomically.
"""

from __future__ import annotations

import time

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


def train_teacher_task(base: TrainConfig, options: DataOptions, data_dir: str, device: str, cpus: int) -> tuple[dict, dict]:
    torch.set_num_threads(max(1, cpus))
    return train_teacher(load_dataset(options, data_dir), base, task_device(device))


def method_run_task(
    config: TrainConfig, options: DataOptions, data_dir: str, device: str, cpus: int, teacher_state: dict | None
) -> dict:
    """One method on one seed, evaluated on the test split; returns its run record."""
    torch.set_num_threads(max(1, cpus))
    started = time.perf_counter()
    data = load_dataset(options, data_dir)
    teacher = teacher_model(teacher_state, data.info) if teacher_state is not None else None
    where = task_device(device)
    record = run_record(config, data, run_method(config, data, teacher, where), where)
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    return record
