"""Any folder of labelled images: ``--dataset imagefolder --data-dir DIR``.

``DIR/labels.csv`` has a header naming the columns ``path,label,group`` and optionally ``split``
(``train``, ``val`` or ``test``); other columns are ignored and paths are relative to DIR. Labels
(and, separately, groups) are either all integers 0..K-1, named "0".."K-1" (a missing value is
refused: it would be a class no row has), or all names, numbered in sorted order so that the
numbering never depends on the order of the rows.

Splits. A ``split`` column is followed row by row. Without one, each (class, group) cell of n rows
is split with the fixed ``SPLIT_SEED`` (not the run seed, so every seed is tuned and tested on the
same images, and not the row order: rows are taken in path order before shuffling): the first
n_test of the shuffled cell go to test, the next n_val to val, the rest to train, where

- n_test = round(test_fraction · n) and n_val = round(val_fraction · n), halves rounded up; the
  fractions default to ``TEST_FRACTION`` 0.2 and ``VAL_FRACTION`` 0.1 (``--test-fraction``,
  ``--val-fraction``);
- a cell of n ≥ 3 gives test and val at least one each and keeps at least one for train (test is
  served first); n = 2 gives one to test and one to train; n = 1 gives its row to test.

With ``--select-on test`` (the official procedure) val *is* test, as for the built-in datasets: no
val is carved (those rows train), and rows a split column marks val are left out. Every (class, group) cell needs a test sample, or its accuracy, and so the
fairness gaps, could not be measured.

Images of any size and mode are decoded once (``facecache``, under ``DIR/.fairtune-cache/``),
converted to RGB and resized to ``--image-size``: by default 32 when no image is larger than 64 px
(every image's size is read from its header, which is cheap; ``--image-size`` skips the scan), else
176. At ≤ 64 px the images are held in memory as a torch tensor, like cifar10s, the model is the
6-conv CNN and augmentation a flip; larger ones stay in the memory-mapped cache, the model is
resnet18 with ImageNet normalisation and augmentation "crop_flip" (UTKFace's resize-and-crop at
this size). ``--model`` picks another architecture.

Results of every image folder go to ``<results>/imagefolder/``, and a teacher is matched on the
options, class count and model, not on the folder: give each folder its own ``--results-dir``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fairtune.data.base import DataOptions, DatasetInfo, DatasetOption, DatasetSplits, ImageView, Split
from fairtune.errors import checked
from fairtune.data.facecache import UndecodableImage, cache_path, decode_cache
from fairtune.errors import UserError
from fairtune.models import MODELS

NAME = "imagefolder"
LABELS = "labels.csv"
COLUMNS = ("path", "label", "group")
SPLITS = ("train", "val", "test")
TEST_FRACTION, VAL_FRACTION = 0.2, 0.1
SPLIT_SEED = 20_210_619  # fixed: the carved split must not depend on the run seed
SMALL_SIDE = 64  # images up to this side: the CNN's size class (CIFAR-like)
SMALL_SIZE, LARGE_SIZE = 32, 176  # default model input of each size class
MIN_SIZE = 8  # the CNN pools three times

EXPECTED = (
    f"DIR/{LABELS} with a header and columns path,label,group[,split] (paths relative to DIR; split "
    "train/val/test, else carved per (class, group) cell) next to the images; pass DIR itself as --data-dir"
)
_fraction = checked(float, lambda v: 0.0 < v < 1.0, "a number strictly between 0 and 1")
OPTIONS = (
    DatasetOption(
        "test_fraction", "--test-fraction", _fraction,
        f"share of each (class, group) cell carved out for test when {LABELS} has no split column", default=TEST_FRACTION,
    ),
    DatasetOption(
        "val_fraction", "--val-fraction", _fraction,
        f"share of each (class, group) cell carved out for val when {LABELS} has no split column", default=VAL_FRACTION,
    ),
    DatasetOption(
        "image_size", "--image-size", checked(int, lambda v: v >= MIN_SIZE, f"an integer >= {MIN_SIZE}"),
        f"side in px the images are resized to; default {SMALL_SIZE} when no image exceeds {SMALL_SIDE} px, else {LARGE_SIZE}",
    ),
    DatasetOption(
        "model", "--model", str, f"architecture; default cnn up to {SMALL_SIDE} px, else resnet18", choices=tuple(MODELS),
    ),
)
_INTEGER = re.compile(r"-?[0-9]+")
_TRAIN, _VAL, _TEST = range(3)


@dataclass(frozen=True, eq=False)
class Table:
    """labels.csv, checked: one entry per row, in file order."""

    csv: Path
    paths: tuple[str, ...]  # as written, relative to the folder
    lines: np.ndarray  # int64: line of the file each row starts on (the header is line 1)
    labels: np.ndarray  # int64 class index
    groups: np.ndarray  # int64 group index
    splits: np.ndarray | None  # int64 _TRAIN/_VAL/_TEST; None without a split column
    class_names: tuple[str, ...]
    group_names: tuple[str, ...]

    def where(self, row: int) -> str:
        return f"{self.csv}, line {int(self.lines[row])}"


def locate(data_dir: Path) -> Path | None:
    folder = Path(data_dir)
    return folder if (folder / LABELS).is_file() else None


def info(options: DataOptions, data_dir: Path | None = None) -> DatasetInfo:
    version = _version(_folder(data_dir))
    table = _read_table(*version)
    size = options.option("image_size")
    if size is None:
        size = SMALL_SIZE if _largest_side(*version) <= SMALL_SIDE else LARGE_SIZE
    elif not isinstance(size, int) or size < MIN_SIZE:
        raise UserError(f"--image-size must be an integer >= {MIN_SIZE}, got {size!r}")
    model = options.option("model", "cnn" if size <= SMALL_SIDE else "resnet18")
    if model not in MODELS:
        raise UserError(f"--model {model!r} is not one of {', '.join(MODELS)}")
    return DatasetInfo(
        name=NAME,
        class_names=table.class_names,
        group_names=table.group_names,
        model=model,
        image_size=size,
        augment="flip" if size <= SMALL_SIDE else "crop_flip",
        normalize=model != "cnn",  # ImageNet statistics for the torchvision models, as the built-ins
    )


def load(data_dir: Path, options: DataOptions) -> DatasetSplits:
    folder = _folder(data_dir)
    table = _table(folder)
    data_info = info(options, folder)
    split = _assign_splits(table, options)
    _check_splits(table, split, options)

    # Rows are cached in path order, so reordering labels.csv reuses the cache; the sidecar names
    # them by relative path because files in different folders may share a name.
    order = sorted(range(len(table.paths)), key=lambda i: table.paths[i])
    side = data_info.image_size
    try:
        images = decode_cache(
            [folder / table.paths[i] for i in order], side, side, cache_path(folder, f"{NAME}-{side}x{side}.u8"),
            names=[table.paths[i] for i in order],
        )
    except UndecodableImage as exc:
        row = next(i for i in range(len(table.paths)) if folder / table.paths[i] == exc.path)
        raise UserError(f"{table.where(row)}: cannot decode image {exc.path} ({exc.reason}); replace the file or drop its row") from None
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    # Small images fit in memory and then go to the device once, as the CIFAR-sized datasets do.
    pixels = torch.from_numpy(np.array(images)) if side <= SMALL_SIDE else images

    def split_of(kind: int) -> Split:
        rows = np.flatnonzero(split == kind)
        index = position[rows]
        chosen = pixels[torch.from_numpy(index)] if isinstance(pixels, torch.Tensor) else ImageView(pixels, index)
        return Split(chosen, torch.from_numpy(table.labels[rows]), torch.from_numpy(table.groups[rows]))

    test = split_of(_TEST)
    return DatasetSplits(
        info=data_info,
        options=options,
        train=split_of(_TRAIN),
        val=test if options.select_on == "test" else split_of(_VAL),
        test=test,
        notes={"source_dir": str(folder)},
    )


def carve_counts(n: int, test_fraction: float, val_fraction: float | None) -> tuple[int, int]:
    """(test, val) rows carved from a cell of ``n`` rows; see the module docstring for the rule.
    ``val_fraction`` None holds out no val (``--select-on test``): test still leaves train one row."""

    def share(fraction: float) -> int:
        return math.floor(fraction * n + 0.5 + 1e-9)  # halves up; the epsilon absorbs 0.35 * 10 = 3.4999...

    if val_fraction is None or n <= 2:
        return min(max(share(test_fraction), 1), max(n - 1, 1)) if n else 0, 0
    n_test = min(max(share(test_fraction), 1), n - 2)
    n_val = min(max(share(val_fraction), 1), n - n_test - 1)
    return n_test, n_val


def _folder(data_dir: Path | None) -> Path:
    if data_dir is None or locate(data_dir) is None:
        where = f"no {Path(data_dir) / LABELS}" if data_dir is not None else "no data dir given"
        raise UserError(f"{where}: imagefolder expects {EXPECTED}")
    return Path(data_dir)


def _version(folder: Path) -> tuple[str, str]:
    """labels.csv's path and a digest of its bytes: the key of the per-process memos (hashing the
    file is cheap next to checking every row's image; an mtime can repeat within a clock tick)."""
    path = folder / LABELS
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


def _table(folder: Path) -> Table:
    return _read_table(*_version(folder))


@functools.lru_cache(maxsize=4)
def _read_table(path_text: str, digest: str) -> Table:
    """The checked table (memoised per file version: ``info`` and ``load`` both need it)."""
    path = Path(path_text)
    header, rows, lines = _read_rows(path)
    where = {name: i for i, name in enumerate(header)}
    missing = [name for name in COLUMNS if name not in where]
    if missing:
        raise UserError(f"{path}, line 1: no {', '.join(missing)} column; the header must name {','.join(COLUMNS)} (and optionally split)")

    def column(name: str) -> list[str]:
        values = [row[where[name]] for row in rows]
        for i, value in enumerate(values):
            if not value:
                raise UserError(f"{path}, line {lines[i]}: empty {name}; fill it in or drop the row")
        return values

    paths = column("path")
    labels, class_names = _codes(column("label"), "label", path, lines)
    groups, group_names = _codes(column("group"), "group", path, lines)
    for what, names in (("label", class_names), ("group", group_names)):
        if len(names) < 2:
            raise UserError(f"{path}: every row has {what} {names[0]!r}; fairtune needs at least two {what}s")
    splits = None
    if "split" in where:
        splits = np.empty(len(rows), dtype=np.int64)
        for i, value in enumerate(column("split")):
            if value not in SPLITS:
                raise UserError(f"{path}, line {lines[i]}: split {value!r} is not one of {', '.join(SPLITS)}")
            splits[i] = SPLITS.index(value)
    seen: dict[str, int] = {}
    for i, name in enumerate(paths):
        key = os.path.normpath(name)
        if key in seen:
            raise UserError(f"{path}, line {lines[i]}: {name} is listed again (first on line {lines[seen[key]]}); list each image once")
        seen[key] = i
        if not (path.parent / name).is_file():
            raise UserError(f"{path}, line {lines[i]}: no file {path.parent / name}; fix the path (relative to {path.parent}) or drop the row")
    return Table(path, tuple(paths), np.asarray(lines, dtype=np.int64), labels, groups, splits, class_names, group_names)


def _read_rows(path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    """(header, rows, line each row starts on), every field stripped, blank lines skipped.

    The csv module rather than pandas: its ``line_num`` gives every row's exact line in the file
    (quoted fields spanning lines and blank lines included), and a row with more fields than the
    header is an error here, where pandas warns, or silently makes the first column an index.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheets write a BOM
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            if not any(header):
                raise UserError(f"{path} is empty; expected a header {','.join(COLUMNS)}[,split] and one row per image")
            rows, lines, end = [], [], reader.line_num
            for fields in reader:
                start, end = end + 1, reader.line_num
                fields = [field.strip() for field in fields]
                if not any(fields):
                    continue
                if len(fields) != len(header):
                    raise UserError(f"{path}, line {start}: {len(fields)} fields, but the header has {len(header)}; fix the row")
                rows.append(fields)
                lines.append(start)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise UserError(f"{path}, line {reader.line_num}: {exc}; fix the row") from None
    if not rows:
        raise UserError(f"{path} has a header but no rows; add one row per image")
    return header, rows, lines


def _codes(values: list[str], what: str, path: Path, lines: list[int]) -> tuple[np.ndarray, tuple[str, ...]]:
    """(index per row, names): integers 0..K-1 as they are, names numbered in sorted order."""
    integer = [_INTEGER.fullmatch(v) is not None for v in values]
    odd = next((i for i, flag in enumerate(integer) if flag != integer[0]), None)
    if odd is not None:
        kind = "an integer" if integer[odd] else "a name"
        raise UserError(
            f"{path}, line {lines[odd]}: {what} {values[odd]!r} is {kind} but line {lines[0]}'s {what} {values[0]!r} is not; "
            f"{what}s must be all integers 0..K-1 or all names"
        )
    if not integer[0]:
        names = tuple(sorted(set(values)))
        index = {name: i for i, name in enumerate(names)}
        return np.array([index[v] for v in values], dtype=np.int64), names
    codes = np.array([int(v) for v in values], dtype=np.int64)
    if codes.min() < 0:
        row = int(np.argmin(codes))
        raise UserError(f"{path}, line {lines[row]}: {what} {codes[row]} is negative; integer {what}s must be 0..K-1")
    count = int(codes.max()) + 1
    absent = sorted(set(range(count)) - set(codes.tolist()))
    if absent:
        row = int(np.flatnonzero(codes > absent[0])[0])
        raise UserError(
            f"{path}, line {lines[row]}: {what} {codes[row]}, but no row has {what} {absent[0]}; integer {what}s must be "
            f"0..K-1 with none missing: renumber them or use names"
        )
    return codes, tuple(str(i) for i in range(count))


@functools.lru_cache(maxsize=4)
def _largest_side(path_text: str, digest: str) -> int:
    """The largest width or height of all the images, read from their headers only (memoised like
    the table: ``info`` is asked several times per command)."""
    table = _read_table(path_text, digest)
    largest = 0
    for row, name in enumerate(table.paths):
        file = table.csv.parent / name
        try:
            with Image.open(file) as image:
                largest = max(largest, *image.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise UserError(f"{table.where(row)}: cannot read image {file} ({exc}); replace the file or drop its row") from None
    return largest


def _fractions(options: DataOptions, table: Table) -> tuple[float, float]:
    test, val = options.option("test_fraction"), options.option("val_fraction")
    # A fraction that carves nothing is refused rather than silently ignored.
    if table.splits is not None:
        given = [flag for flag, value in (("--test-fraction", test), ("--val-fraction", val)) if value is not None]
        if given:
            raise UserError(f"{table.csv} has a split column, so {' and '.join(given)} would change nothing; drop {given[0]}")
    if options.select_on == "test" and val is not None:
        raise UserError("--val-fraction holds out nothing under --select-on test (val is test there); drop --val-fraction")
    test = TEST_FRACTION if test is None else test
    val = VAL_FRACTION if val is None else val
    for flag, value in (("--test-fraction", test), ("--val-fraction", val)):
        if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise UserError(f"{flag} must be a number strictly between 0 and 1, got {value!r}")
    if test + val >= 1.0:
        raise UserError(f"--test-fraction {test:g} and --val-fraction {val:g} leave nothing to train on; make their sum below 1")
    return float(test), float(val)


def _assign_splits(table: Table, options: DataOptions) -> np.ndarray:
    """_TRAIN/_VAL/_TEST per row: the split column, else carved per cell (module docstring)."""
    test_fraction, val_fraction = _fractions(options, table)
    if table.splits is not None:
        return table.splits
    num_groups = len(table.group_names)
    cell = table.labels * num_groups + table.groups
    by_path = np.array(sorted(range(len(cell)), key=lambda i: table.paths[i]), dtype=np.int64)
    shuffled = by_path[np.random.default_rng(SPLIT_SEED).permutation(len(cell))]
    ranked = shuffled[np.argsort(cell[shuffled], kind="stable")]
    counts = np.bincount(cell, minlength=len(table.class_names) * num_groups)
    starts = np.cumsum(counts) - counts
    rank = np.empty(len(cell), dtype=np.int64)
    rank[ranked] = np.arange(len(cell)) - starts[cell[ranked]]
    hold_out = val_fraction if options.select_on == "val" else None  # under select_on test, val is test
    carved = np.array([carve_counts(int(n), test_fraction, hold_out) for n in counts], dtype=np.int64).reshape(-1, 2)
    n_test, n_val = carved[cell, 0], carved[cell, 1]
    return np.where(rank < n_test, _TEST, np.where(rank < n_test + n_val, _VAL, _TRAIN))


def _check_splits(table: Table, split: np.ndarray, options: DataOptions) -> None:
    """Every cell in test, and a train and a selection split to run on."""
    num_groups = len(table.group_names)
    cell = table.labels * num_groups + table.groups
    test_counts = np.bincount(cell[split == _TEST], minlength=len(table.class_names) * num_groups)
    if (test_counts == 0).any():
        empty = int(np.flatnonzero(test_counts == 0)[0])
        label, group = divmod(empty, num_groups)
        rows = int((cell == empty).sum())
        how = "it has no rows at all" if rows == 0 else f"none of its {rows} rows has split test"
        raise UserError(
            f"{table.csv}: no test samples in cell (class {table.class_names[label]!r}, group {table.group_names[group]!r}): "
            f"{how}; every (class, group) cell needs one to measure its accuracy"
        )
    if not (split == _TRAIN).any():
        fix = "mark some rows split train" if table.splits is not None else "every cell is too small to spare one; add rows"
        raise UserError(f"{table.csv}: no row is left for train; {fix}")
    if options.select_on == "val" and not (split == _VAL).any():
        why = "no row has split val" if table.splits is not None else "no (class, group) cell has the 3 rows a val sample needs"
        raise UserError(f"{table.csv}: {why}; add some, or pass --select-on test")
