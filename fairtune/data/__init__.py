"""Dataset registry: one module per dataset, each reading its real on-disk layout.

A dataset module provides ``info(options) -> DatasetInfo``, ``EXPECTED`` (a one-line description of
the layout, for errors and ``fairtune list``), ``locate(data_dir) -> Path | None`` and
``load(data_dir, options) -> DatasetSplits``. Subsampling (``--train-size``/``--eval-size``) is
applied here, once, for every dataset.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from fairtune.data import celeba, cifar10s, fmnist, utkface
from fairtune.data.base import DataOptions, DatasetInfo, DatasetSplits, Split, eval_subsample, stratified_subsample
from fairtune.errors import UserError

DATASETS: dict[str, ModuleType] = {
    "cifar10s": cifar10s,
    "utkface": utkface,
    "celeba": celeba,
    "fmnist-s": fmnist,
}

# Subsamples of val/test are the same for every run seed, so seeds are compared on one test set.
EVAL_SUBSAMPLE_SEED = 12345


def default_data_dir() -> Path:
    return Path(os.environ.get("FAIRTUNE_DATA", "./data"))


def dataset_module(name: str) -> ModuleType:
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(f"unknown dataset '{name}'; valid: {', '.join(DATASETS)}") from None


def dataset_info(options: DataOptions) -> DatasetInfo:
    return dataset_module(options.dataset).info(options)


def load_dataset(options: DataOptions, data_dir: Path | str | None = None) -> DatasetSplits:
    module = dataset_module(options.dataset)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    splits = module.load(data_dir, options)
    info = splits.info
    c, g = info.num_classes, info.num_groups
    for name, size in (("train-size", options.train_size), ("eval-size", options.eval_size)):
        if size is not None and size < c * g:
            raise UserError(f"--{name} {size} is below the {c * g} (class, group) cells of {info.name}; use at least {c * g}")
    splits.train = stratified_subsample(splits.train, options.train_size, c, g, seed=options.seed)
    # Train per (class, group) cell; val and test by source image where gray and colour are paired.
    splits.val = eval_subsample(splits.val, options.eval_size, c, g, seed=EVAL_SUBSAMPLE_SEED)
    splits.test = eval_subsample(splits.test, options.eval_size, c, g, seed=EVAL_SUBSAMPLE_SEED)
    return splits


__all__ = [
    "DATASETS",
    "DataOptions",
    "DatasetInfo",
    "DatasetSplits",
    "Split",
    "dataset_info",
    "dataset_module",
    "default_data_dir",
    "load_dataset",
]
