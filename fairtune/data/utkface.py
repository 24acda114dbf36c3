"""UTKFace (Zhang et al., CVPR 2017): age bin of a face, race as the sensitive attribute.

Labels come from the file names ``age_gender_race_date.jpg.chip.jpg``. The split is the official
MFD code's (``data_handler/utkface.py``): natural-sort the names, drop malformed and race-4 ("Others")
names, shuffle with ``random.seed(1)``, then scan from the end and send the first ``PER_CELL`` of each
(group, class) cell to test. fairtune's validation split continues the same scan (docs/protocol.md §4), so the
split never depends on the run seed. ``select_on="test"`` is the official procedure: the official code
trains on everything that is not test and selects on test, so no validation images are carved out of
training and val *is* test.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fairtune.data.base import DataOptions, DatasetInfo, DatasetSplits, ImageView, Split
from fairtune.data.facecache import cache_path, decode_cache
from fairtune.errors import UserError

FOLDER = "UTKFace"
EXPECTED = (
    "UTKFace/ holding files named age_gender_race_date.jpg.chip.jpg (the 'Aligned&Cropped Faces' archive "
    "UTKFace.tar.gz from https://susanqq.github.io/UTKFace/, extracted there)"
)
CLASS_NAMES = ("0-19", "20-39", "40+")
GROUP_NAMES = ("White", "Black", "Asian", "Indian")  # races 0-3 of the file names
OTHERS_RACE = 4
PER_CELL = 100  # samples per (group, class) cell in test, and again in val
SPLIT_SEED = 1  # the official code's random.seed(1)
SIDE = 200  # native size of the aligned & cropped faces
OPTIONS = ()  # no settings of its own

_DIGITS = re.compile(r"([0-9]+)")
_UNSIGNED_INT = re.compile(r"[0-9]+")


def info(options: DataOptions, data_dir: Path | None = None) -> DatasetInfo:
    return DatasetInfo(
        name="utkface",
        class_names=CLASS_NAMES,
        group_names=GROUP_NAMES,
        model="resnet18",
        image_size=176,
        augment="resize_crop_flip",
        normalize=True,
    )


def locate(data_dir: Path) -> Path | None:
    folder = Path(data_dir) / FOLDER
    return folder if folder.is_dir() and _jpeg_names(folder) else None


def load(data_dir: Path, options: DataOptions, per_cell: int = PER_CELL) -> DatasetSplits:
    folder = locate(data_dir)
    if folder is None:
        raise UserError(
            f"no UTKFace images in {Path(data_dir) / FOLDER}: expected files named age_gender_race_date.jpg.chip.jpg "
            "(the 'Aligned&Cropped Faces' archive UTKFace.tar.gz, extracted there); pass --data-dir or set FAIRTUNE_DATA"
        )
    names = sorted(_jpeg_names(folder), key=natural_key)
    cells: dict[str, tuple[int, int]] = {}  # name -> (class, group)
    malformed = others = 0
    for name in names:
        parsed = parse_name(name)
        if parsed is None:
            malformed += 1
        elif parsed[1] == OTHERS_RACE:
            others += 1
        else:
            age, race = parsed
            cells[name] = (age_bin(age), race)
    kept = list(cells)
    if not kept:
        raise UserError(
            f"no usable UTKFace images in {folder}: all {len(names)} .jpg names are malformed or race 4 ('Others'); "
            "expected age_gender_race_date.jpg.chip.jpg names from the 'Aligned&Cropped Faces' archive"
        )
    random.Random(SPLIT_SEED).shuffle(kept)
    test, val, train = _reverse_scan(kept, cells, per_cell, hold_out_val=options.select_on != "test")

    # One cache in shuffled order for all three splits: it does not depend on per_cell, and the
    # training rows, the bulk of the reads, are then in increasing file order.
    images = decode_cache([folder / name for name in kept], SIDE, SIDE, cache_path(data_dir, f"utkface-{SIDE}x{SIDE}.u8"))
    position = {name: i for i, name in enumerate(kept)}

    def split_of(split_names: list[str]) -> Split:
        index = np.array([position[name] for name in split_names], dtype=np.int64)
        labels = torch.tensor([cells[name][0] for name in split_names], dtype=torch.int64)
        groups = torch.tensor([cells[name][1] for name in split_names], dtype=torch.int64)
        return Split(ImageView(images, index), labels, groups)

    return DatasetSplits(
        info=info(options),
        options=options,
        train=split_of(train),
        val=split_of(test if options.select_on == "test" else val),
        test=split_of(test),
        notes={"malformed_skipped": malformed, "others_dropped": others},
    )


def parse_name(name: str) -> tuple[int, int] | None:
    """(age, race) from ``age_gender_race_date.jpg.chip.jpg``; None when the name is malformed.

    Malformed (docs/protocol.md §4): not exactly four ``_``-separated fields, or an age that is not an integer
    ≥ 0, or a race that is not an integer 0-4. Gender and date are not used, so not checked.
    """
    fields = name.split("_")
    if len(fields) != 4:
        return None
    age, race = fields[0], fields[2]
    if not (_UNSIGNED_INT.fullmatch(age) and _UNSIGNED_INT.fullmatch(race)) or int(race) > OTHERS_RACE:
        return None
    return int(age), int(race)


def age_bin(age: int) -> int:
    """Class of an age: 0 for <20, 1 for 20-39, 2 for ≥40."""
    return 0 if age < 20 else 1 if age < 40 else 2


def natural_key(name: str) -> tuple[list[int | str], str]:
    """Sort key comparing digit runs as numbers, as the official code's ``natsorted`` does.

    ``re.split`` with a capturing group puts text at even and digits at odd positions, so the
    lists never compare an int with a str; the name itself breaks ties such as "01" vs "1".
    """
    parts = _DIGITS.split(name)
    return [int(part) if i % 2 else part for i, part in enumerate(parts)], name


def _reverse_scan(
    shuffled: list[str], cells: dict[str, tuple[int, int]], per_cell: int, hold_out_val: bool = True
) -> tuple[list[str], list[str], list[str]]:
    """(test, val, train): from the end, the first ``per_cell`` of each cell, then the next ones.

    test and val keep the scan's (reversed) order, as the official code appends them; train keeps
    the shuffled order. Without ``hold_out_val`` (the official procedure) val is empty and train is
    everything that is not test.
    """
    seen: Counter[tuple[int, int]] = Counter()
    test, val = [], []
    for name in reversed(shuffled):
        seen[cells[name]] += 1
        if seen[cells[name]] <= per_cell:
            test.append(name)
        elif hold_out_val and seen[cells[name]] <= 2 * per_cell:
            val.append(name)
    held_out = set(test) | set(val)
    train = [name for name in shuffled if name not in held_out]
    return test, val, train


def _jpeg_names(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return [entry.name for entry in entries if entry.name.endswith(".jpg") and entry.is_file()]
