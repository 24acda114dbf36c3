"""CelebA (Liu et al., ICCV 2015): one binary attribute as the target, Male as the sensitive one.

The official partition is kept. As in the official MFD code (``data_handler/celeba.py``), an
evaluation split is balanced to its smallest (group, class) cell by keeping the first n_min rows of
each cell in ``list_eval_partition.txt`` order; fairtune balances the valid partition the same way
(docs/protocol.md §4). Train stays unbalanced.

The annotation files are read here rather than through ``torchvision.datasets.CelebA``: that class
checks the MD5 of the real text files (which test fixtures cannot match) and insists on three more
annotation files fairtune never uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fairtune.data.base import DataOptions, DatasetInfo, DatasetOption, DatasetSplits, ImageView, Split
from fairtune.data.facecache import cache_path, decode_cache
from fairtune.errors import UserError

FOLDER = "celeba"
IMAGES = "img_align_celeba"
ATTRIBUTES = "list_attr_celeba.txt"
PARTITION = "list_eval_partition.txt"
EXPECTED = (
    f"{FOLDER}/ in torchvision's layout: {IMAGES}/*.jpg, {ATTRIBUTES}, {PARTITION} (the 'Align&Cropped' "
    "images and annotation files of the CelebA site, or torchvision.datasets.CelebA(<data dir>, download=True))"
)
DEFAULT_TARGET = "Attractive"
OPTIONS = (DatasetOption("target", "--target", str, "celeba target attribute, a column of list_attr_celeba.txt", default=DEFAULT_TARGET),)
SENSITIVE = "Male"
GROUP_NAMES = ("female", "male")  # Male = -1 / 1
HEIGHT, WIDTH = 218, 178  # native size of the aligned & cropped images
TRAIN, VALID, TEST = 0, 1, 2  # partition codes of list_eval_partition.txt


def target_name(options: DataOptions) -> str:
    return options.target or DEFAULT_TARGET


def info(options: DataOptions, data_dir: Path | None = None) -> DatasetInfo:
    target = target_name(options)
    return DatasetInfo(
        name="celeba",
        class_names=(f"not {target}", target),
        group_names=GROUP_NAMES,
        model="shufflenet_v2_x1_0",
        image_size=176,
        augment="random_resized_crop_flip",
        normalize=True,
    )


def locate(data_dir: Path) -> Path | None:
    folder = Path(data_dir) / FOLDER
    complete = (folder / IMAGES).is_dir() and (folder / ATTRIBUTES).is_file() and (folder / PARTITION).is_file()
    return folder if complete else None


def load(data_dir: Path, options: DataOptions) -> DatasetSplits:
    folder = locate(data_dir)
    if folder is None:
        raise UserError(
            f"no CelebA in {Path(data_dir) / FOLDER}: expected {EXPECTED}; pass --data-dir or set FAIRTUNE_DATA"
        )
    target = target_name(options)
    attributes = _read_attributes(folder / ATTRIBUTES)
    if target not in attributes.columns:
        valid = ", ".join(attributes.columns[:6])
        raise UserError(
            f"unknown CelebA attribute '{target}' for --target: valid names are line 2 of {folder / ATTRIBUTES}, "
            f"e.g. {valid}, ... ({len(attributes.columns)} in all)"
        )
    if target == SENSITIVE:
        raise UserError(f"--target {SENSITIVE} is CelebA's sensitive attribute; choose another, e.g. {DEFAULT_TARGET}")
    if SENSITIVE not in attributes.columns:
        raise UserError(f"{folder / ATTRIBUTES} has no {SENSITIVE} column; restore it from the CelebA archive")
    rows = _read_partition(folder / PARTITION)
    rows = rows.join(attributes[[target, SENSITIVE]], on="filename")
    unlabelled = rows[rows[[target, SENSITIVE]].isna().any(axis=1)]
    if len(unlabelled):
        raise UserError(
            f"{unlabelled['filename'].iloc[0]} is listed in {folder / PARTITION} but has no {target}/{SENSITIVE} "
            f"values in {folder / ATTRIBUTES}; restore both files from the CelebA archive"
        )
    for column in (target, SENSITIVE):
        if not rows[column].isin([-1, 1]).all():
            raise UserError(f"{folder / ATTRIBUTES}: column {column} holds values other than 1/-1; restore the file")
    rows["label"] = ((rows[target].astype(np.int64) + 1) // 2).astype(np.int64)
    rows["group"] = ((rows[SENSITIVE].astype(np.int64) + 1) // 2).astype(np.int64)

    image_dir = folder / IMAGES
    present = set(os.listdir(image_dir))  # one listing instead of 200k stat calls
    missing = [name for name in rows["filename"] if name not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(
            f"missing CelebA image {image_dir / missing[0]}{more}, listed in {folder / PARTITION}; "
            f"extract img_align_celeba.zip into {folder}"
        )

    # One cache for every listed image in partition-file order, so that changing --target (which
    # changes the balanced evaluation rows) never decodes anything again.
    images = decode_cache(
        [image_dir / name for name in rows["filename"]], HEIGHT, WIDTH, cache_path(data_dir, f"celeba-{HEIGHT}x{WIDTH}.u8")
    )
    positions = np.arange(len(rows))

    def split_of(keep: np.ndarray) -> Split:
        return Split(
            ImageView(images, positions[keep]),
            torch.from_numpy(rows["label"].to_numpy()[keep]),
            torch.from_numpy(rows["group"].to_numpy()[keep]),
        )

    train = (rows["partition"] == TRAIN).to_numpy()
    if not train.any():
        raise UserError(f"no training rows (partition 0) in {folder / PARTITION}; restore the original file")
    return DatasetSplits(
        info=info(options),
        options=options,
        train=split_of(train),
        val=split_of(_balanced(rows, VALID, folder, target)),
        test=split_of(_balanced(rows, TEST, folder, target)),
    )


def _balanced(rows: pd.DataFrame, partition: int, folder: Path, target: str) -> np.ndarray:
    """Mask of the first n_min rows of each (group, class) cell of ``partition``, in file order."""
    in_partition = rows[rows["partition"] == partition]
    cells = pd.MultiIndex.from_product([[0, 1], [0, 1]])  # (group, label); an absent cell counts 0
    counts = in_partition.groupby(["group", "label"]).size().reindex(cells, fill_value=0)
    n_min = int(counts.min())
    if n_min == 0:
        group, label = counts.idxmin()
        raise UserError(
            f"partition {partition} of {folder / PARTITION} has no {GROUP_NAMES[group]} images with "
            f"{target} = {'1' if label else '-1'}, so it cannot be balanced; choose another --target"
        )
    rank = in_partition.groupby(["group", "label"]).cumcount()
    keep = np.zeros(len(rows), dtype=bool)
    keep[rank.index[rank.to_numpy() < n_min]] = True
    return keep


def _read_attributes(path: Path) -> pd.DataFrame:
    """The attribute table indexed by file name: line 1 a count, line 2 the names, then 1/-1 rows."""
    try:
        with open(path) as handle:
            handle.readline()
            names = handle.readline().split()
        # Names are taken from line 2 explicitly: the real file ends that line with a space.
        table = pd.read_csv(
            path,
            sep=r"\s+",
            skiprows=2,
            header=None,
            names=["filename", *names],
            index_col="filename",
            dtype={"filename": str},
        )
    except (OSError, ValueError) as exc:  # pandas' parser errors are ValueErrors
        raise UserError(f"cannot read {path} ({exc}); restore it from the CelebA archive") from None
    if not names or not table.index.is_unique:
        raise UserError(f"{path} lacks attribute names on line 2 or repeats a file; restore it from the CelebA archive")
    return table


def _read_partition(path: Path) -> pd.DataFrame:
    """``filename partition`` rows in file order, with a default RangeIndex (row = position)."""
    try:
        rows = pd.read_csv(path, sep=r"\s+", header=None, names=["filename", "partition"], dtype={"filename": str})
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} ({exc}); restore it from the CelebA archive") from None
    if not rows["partition"].isin([TRAIN, VALID, TEST]).all():
        raise UserError(f"{path}: partitions must be 0 (train), 1 (valid) or 2 (test); restore the original file")
    if not rows["filename"].is_unique:
        raise UserError(f"{path} lists a file twice; restore the original file")
    return rows
