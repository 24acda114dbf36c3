"""Dataset registry: one module per dataset, each reading its real on-disk layout.

What a dataset provides (``info``, ``EXPECTED``, ``locate``, ``load``, ``OPTIONS``) is written down
once, as :class:`fairtune.data.base.DatasetSource`; ``DATASETS`` maps names to such objects. A
dataset's own settings are data (``OPTIONS``): the CLI makes their flags (:func:`add_dataset_options`)
and records their values in ``DataOptions.extra``, so a new dataset with options needs no edit
outside its module. Subsampling (``--train-size``/``--eval-size``) is applied here, once, for every
dataset.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fairtune.data import celeba, cifar10s, fmnist, imagefolder, utkface
from fairtune.data.base import (
    OPTION_FIELDS,
    DataOptions,
    DatasetInfo,
    DatasetOption,
    DatasetSource,
    DatasetSplits,
    Split,
    eval_subsample,
    stratified_subsample,
)
from fairtune.errors import UserError
from fairtune.registry import lookup

DATASETS: dict[str, DatasetSource] = {
    "cifar10s": cifar10s,
    "utkface": utkface,
    "celeba": celeba,
    "fmnist-s": fmnist,
    "imagefolder": imagefolder,
}

# Subsamples of val/test are the same for every run seed, so seeds are compared on one test set.
EVAL_SUBSAMPLE_SEED = 12345


def default_data_dir() -> Path:
    return Path(os.environ.get("FAIRTUNE_DATA", "./data"))


def dataset_module(name: str) -> DatasetSource:
    return lookup(DATASETS, name, "dataset", "valid")


def dataset_options() -> dict[str, dict[str, DatasetOption]]:
    """Every dataset option by name: the datasets declaring it (registry order), each with its declaration."""
    found: dict[str, dict[str, DatasetOption]] = {}
    for dataset, source in DATASETS.items():
        for option in getattr(source, "OPTIONS", ()):
            declared = found.setdefault(option.name, {})
            first = next(iter(declared.values()), option)
            if option.flag != first.flag:  # one name, one flag: the values share DataOptions.extra
                raise ValueError(f"dataset option {option.name} is {first.flag} in {next(iter(declared))} but {option.flag} in {dataset}")
            declared[dataset] = option
    return found


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    """A flag for every registered dataset option, once however many datasets take it (type, choices
    and help from the first). Unset flags stay None, so a run records only the options it was given."""
    for name, declared in dataset_options().items():
        option = next(iter(declared.values()))
        defaults = [str(d) for d in dict.fromkeys(o.default for o in declared.values()) if d is not None]
        default = f"; default {' / '.join(defaults)}" if defaults else ""
        parser.add_argument(
            option.flag, dest=name, type=option.type, choices=option.choices, default=None,
            help=f"{option.help} ({', '.join(declared)}{default})",
        )


def given_options(args: argparse.Namespace) -> dict:
    """``DataOptions`` keyword arguments for the dataset options given on the command line: skew and
    target as their fields, the rest as ``extra`` (present only when some are given)."""
    values = {name: getattr(args, name) for name in dataset_options() if getattr(args, name, None) is not None}
    fields = {name: values.pop(name) for name in OPTION_FIELDS if name in values}
    return {**fields, **({"extra": values} if values else {})}


def check_options(options: DataOptions) -> None:
    """Refuse a value for an option the dataset does not take, rather than ignore it."""
    known = dataset_options()
    for name in options.given_options():
        declared = known.get(name, {})
        if options.dataset in declared:
            continue
        if not declared:
            raise UserError(f"{name} is an option of no dataset; dataset options: {', '.join(known) or 'none'}")
        flag = next(iter(declared.values())).flag
        raise UserError(f"{flag} applies to {', '.join(declared)} only, not {options.dataset}; drop {flag}")


def dataset_info(options: DataOptions, data_dir: Path | str | None = None) -> DatasetInfo:
    """The dataset's classes, groups and pipeline; ``data_dir`` (default as for :func:`load_dataset`)
    matters only to datasets that read their classes from their files."""
    source = dataset_module(options.dataset)
    check_options(options)
    return source.info(options, Path(data_dir) if data_dir is not None else default_data_dir())


def load_dataset(options: DataOptions, data_dir: Path | str | None = None) -> DatasetSplits:
    """The dataset's splits, subsampled to the requested sizes.

    Options the dataset has no use for are refused rather than ignored; a size above what a split
    holds keeps the whole split and says so in ``notes["clamped"]`` (one line each, for the CLI)."""
    module = dataset_module(options.dataset)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"data dir {data_dir} is a file, not a folder; point --data-dir (or FAIRTUNE_DATA) at the folder holding the datasets")
    check_options(options)
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
    "DatasetOption",
    "DatasetSource",
    "DatasetSplits",
    "Split",
    "add_dataset_options",
    "check_options",
    "dataset_info",
    "dataset_module",
    "dataset_options",
    "default_data_dir",
    "given_options",
    "load_dataset",
]
