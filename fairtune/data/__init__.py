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
    if name not in DATASETS:
        from fairtune.plugin import ensure_loaded

        ensure_loaded()
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(f"unknown dataset '{name}'; valid: {', '.join(DATASETS)}") from None


def dataset_info(options: DataOptions) -> DatasetInfo:
    return dataset_module(options.dataset).info(options)


def load_dataset(options: DataOptions, data_dir: Path | str | None = None) -> DatasetSplits:
    """The dataset's splits, subsampled to the requested sizes.

    Options the dataset has no use for are refused rather than ignored; a size above what a split
    holds keeps the whole split and says so in ``notes["clamped"]`` (one line each, for the CLI)."""
    module = dataset_module(options.dataset)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"data dir {data_dir} is a file, not a folder; point --data-dir (or FAIRTUNE_DATA) at the folder holding the datasets")
    # Only the colour-skewed datasets have a skew, only CelebA a choice of target attribute.
    for flag, value, needed in (("--skew", options.skew, "DEFAULT_SKEW"), ("--target", options.target, "DEFAULT_TARGET")):
        if value is not None and not hasattr(module, needed):
            users = ", ".join(name for name, m in DATASETS.items() if hasattr(m, needed))
            raise UserError(f"{flag} applies to {users} only, not {options.dataset}; drop {flag}")
    splits = module.load(data_dir, options)
    info = splits.info
    c, g = info.num_classes, info.num_groups
    for name, size in (("train-size", options.train_size), ("eval-size", options.eval_size)):
        if size is not None and size < c * g:
            raise UserError(f"--{name} {size} is below the {c * g} (class, group) cells of {info.name}; use at least {c * g}")
    clamped = [
        f"--{flag} {size} exceeds the {len(split)} {what} samples of {info.name}: all {len(split)} are used"
        for flag, size, what, split in (
            ("train-size", options.train_size, "training", splits.train),
            ("eval-size", options.eval_size, "validation", splits.val),
            ("eval-size", options.eval_size, "test", splits.test),
        )
        if size is not None and size > len(split)
    ]
    splits.notes["clamped"] = clamped
    splits.train = stratified_subsample(splits.train, options.train_size, c, g, seed=options.seed)
    # Train per (class, group) cell; val and test by source image where gray and colour are paired.
    splits.val = eval_subsample(splits.val, options.eval_size, c, g, seed=EVAL_SUBSAMPLE_SEED)
    splits.test = eval_subsample(splits.test, options.eval_size, c, g, seed=EVAL_SUBSAMPLE_SEED)
    return splits


def register_dataset(name: str, source) -> None:
    """A plugin's dataset: a module or object with the contract in this module's docstring."""
    missing = [attr for attr in ("info", "EXPECTED", "locate", "load") if not hasattr(source, attr)]
    if missing:
        raise UserError(f"dataset '{name}' lacks {', '.join(missing)} (see the contract in fairtune.data)")
    if name in DATASETS and DATASETS[name] is not source:
        raise UserError(f"dataset '{name}' is already registered")
    DATASETS[name] = source


__all__ = [
    "DATASETS",
    "register_dataset",
    "DataOptions",
    "DatasetInfo",
    "DatasetSplits",
    "Split",
    "dataset_info",
    "dataset_module",
    "default_data_dir",
    "load_dataset",
]
