"""Types every dataset module returns, and the helpers they share.

A split is three aligned arrays: uint8 images (N, 3, H, W), class labels and group labels. Small
datasets hold the images as a torch tensor; face datasets as a read-only ``numpy.memmap`` over the
decode-once cache, so that only the batches in flight are ever in memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch


Augment = Literal["flip", "resize_crop_flip", "random_resized_crop_flip", "crop_flip"]

# Dataset options that predate ``DataOptions.extra`` and stay fields: records and teacher identities
# written before it hold them under these names.
OPTION_FIELDS = ("skew", "target")


@dataclass(frozen=True)
class DatasetOption:
    """A setting only some datasets take, declared in the dataset's ``OPTIONS``; the CLI makes a flag of it.

    ``type`` is the argparse type (it converts and range-checks the text), ``default`` what the
    dataset uses when the flag is not given (shown in the help; None where it depends on the data).
    """

    name: str  # key in DataOptions.extra (or one of OPTION_FIELDS)
    flag: str
    type: Callable[[str], object]
    help: str
    default: object = None
    choices: tuple | None = None


@dataclass(frozen=True)
class DataOptions:
    """Everything that decides which samples a run sees; part of a teacher's identity."""

    dataset: str
    seed: int = 0
    skew: float | None = None  # cifar10s / fmnist-s; None = the dataset's default
    train_size: int | None = None  # stratified subsample of train (class x group)
    eval_size: int | None = None  # stratified subsample of val and of test
    target: str | None = None  # celeba attribute; None = Attractive
    select_on: Literal["val", "test"] = "val"
    # Values of the other dataset options (DatasetOption.name -> value) given for this run. A mapping
    # is accepted; it is kept as pairs sorted by name, so equal settings compare (and hash) equal.
    extra: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        pairs = self.extra.items() if isinstance(self.extra, Mapping) else self.extra
        object.__setattr__(self, "extra", tuple(sorted(dict(pairs).items())))

    def option(self, name: str, default: object = None) -> object:
        """The value given for dataset option ``name``, else ``default``."""
        value = getattr(self, name) if name in OPTION_FIELDS else dict(self.extra).get(name)
        return default if value is None else value

    def given_options(self) -> dict[str, object]:
        """Every dataset option given a value (skew and target included), by name."""
        fields = {name: getattr(self, name) for name in OPTION_FIELDS if getattr(self, name) is not None}
        return {**fields, **dict(self.extra)}

    def fingerprint(self) -> dict:
        """The settings a trained model depends on; a teacher with another fingerprint is refused.

        Without dataset options this is the dict records have always held (no "extra" key), so
        teachers and results written before ``extra`` existed still match.
        """
        settings = asdict(self)
        extra = settings.pop("extra")
        if extra:
            settings["extra"] = dict(extra)
        return settings


class ImageView:
    """Rows ``index`` of a memory-mapped (N, 3, H, W) uint8 array, read only when gathered."""

    def __init__(self, array: "np.ndarray | ImageView", index: np.ndarray) -> None:
        if isinstance(array, ImageView):
            array, index = array.array, array.index[index]
        self.array = array
        self.index = np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.array.shape[1:])

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return self.array[self.index[rows]]


@dataclass
class Split:
    images: "torch.Tensor | np.ndarray | ImageView"  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)
    groups: torch.Tensor  # int64 (N,)
    # int64 (N,) source image of each sample, on splits that show one image in several groups (the
    # gray and colour renderings of cifar10s / fmnist-s val and test); None where every sample is its
    # own image. Subsampling keeps such renderings together (``source_subsample``).
    sources: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if len(self.labels) != n or len(self.groups) != n:
            raise ValueError(f"split arrays disagree: {n} images, {len(self.labels)} labels, {len(self.groups)} groups")
        if self.sources is not None and len(self.sources) != n:
            raise ValueError(f"split arrays disagree: {n} images, {len(self.sources)} sources")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        index = torch.as_tensor(index, dtype=torch.long)
        if isinstance(self.images, torch.Tensor):
            images = self.images[index]
        else:  # a memmap stays on disk: keep a lazy view instead of copying the rows
            images = ImageView(self.images, index.numpy())
        sources = None if self.sources is None else self.sources[index]
        return Split(images, self.labels[index], self.groups[index], sources)

    def cell_counts(self, num_classes: int, num_groups: int) -> torch.Tensor:
        """(G, C) number of samples per (group, class) cell."""
        flat = self.groups * num_classes + self.labels
        return torch.bincount(flat, minlength=num_groups * num_classes).reshape(num_groups, num_classes)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    class_names: tuple[str, ...]
    group_names: tuple[str, ...]
    model: str  # key of fairtune.models.build_model
    image_size: int  # side the model sees
    augment: Augment
    normalize: bool  # ImageNet mean/std (faces); small datasets stay in [0, 1]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)


class DatasetSource(Protocol):
    """What ``fairtune.data.DATASETS`` holds for each dataset: a module (the built-ins) or any object.

    ``OPTIONS`` lists the settings only this dataset takes (an object without it takes none); the
    registry refuses a value given for an option the dataset does not declare, so a module reads its
    own with ``options.option(name, default)`` and never sees a stray one.
    """

    EXPECTED: str  # the on-disk layout in one line, for errors and `fairtune list`
    OPTIONS: tuple[DatasetOption, ...]

    def info(self, options: DataOptions, data_dir: Path | None = None) -> DatasetInfo:
        """Classes, groups, model and input pipeline. Built-ins ignore ``data_dir``; a dataset whose
        classes are read from its files (imagefolder) raises ``UserError`` where they cannot be read."""
        ...

    def locate(self, data_dir: Path) -> Path | None:
        """Where under ``data_dir`` the dataset's files are, or None when they are not there."""
        ...

    def load(self, data_dir: Path, options: DataOptions) -> DatasetSplits:
        """The full train, val and test splits (subsampling is the registry's); ``UserError`` with the
        fix on missing or malformed files."""
        ...


@dataclass
class DatasetSplits:
    info: DatasetInfo
    options: DataOptions
    train: Split
    val: Split
    test: Split
    notes: dict = field(default_factory=dict)  # e.g. {"malformed_skipped": 3}

    @property
    def selection(self) -> Split:
        """The split the search and the LR scheduler look at (docs/protocol.md §4: never test, unless asked)."""
        return self.test if self.options.select_on == "test" else self.val


def _largest_remainder(counts: torch.Tensor, size: int) -> torch.Tensor:
    """How many of each stratum to keep so that ``size`` are kept in proportion to ``counts``.

    Largest remainder; a non-empty stratum keeps at least one when ``size`` allows it, so a quick run
    never silently loses a whole cell (or class).
    """
    counts = counts.double()
    quota = counts * size / counts.sum()
    take = quota.floor().long()
    nonempty = counts > 0
    starved = nonempty & (take == 0)
    take[starved] = 1
    remaining = size - int(take.sum())
    if remaining > 0:
        remainder = (quota - quota.floor()).masked_fill(starved | (take >= counts.long()), -1.0)
        extra = torch.argsort(remainder, descending=True, stable=True)[:remaining]
        take[extra] += 1
    return take


def _draw_per_stratum(strata: torch.Tensor, take: torch.Tensor, seed: int) -> torch.Tensor:
    """Sorted positions of ``take[s]`` members drawn at random from each stratum ``s``."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(strata), generator=gen)
    chosen = [order[strata[order] == s][: int(take[s])] for s in torch.nonzero(take).flatten().tolist()]
    return torch.sort(torch.cat(chosen)).values


def stratified_subsample(split: Split, size: int | None, num_classes: int, num_groups: int, seed: int) -> Split:
    """Keep ``size`` samples with every (class, group) cell in proportion (largest remainder).

    Cells that are non-empty keep at least one sample when ``size`` allows it, so a quick run never
    silently loses a whole cell.
    """
    if size is None or size >= len(split):
        return split
    if size <= 0:
        raise ValueError(f"subsample size must be positive, got {size}")
    flat = split.groups * num_classes + split.labels
    take = _largest_remainder(torch.bincount(flat, minlength=num_classes * num_groups), size)
    return split.subset(_draw_per_stratum(flat, take, seed))


def source_subsample(split: Split, size: int | None, num_classes: int, seed: int) -> Split:
    """Keep about ``size`` samples by drawing whole *source images* per class, every rendering of each.

    DEO compares a class's accuracy in each group; on cifar10s / fmnist-s val and test the groups are
    the same images rendered gray and colour, so a colour-blind model scores a gap of exactly 0. Drawing
    each (class, group) cell on its own would pair a class's gray and colour cells on different images
    (about 2.5 shared of 50 at ``--eval-size 1000``) and add several points of sampling noise to every
    gap. Here ``size // k`` sources are kept (k renderings per source; an odd size rounds down), spread
    over classes in proportion, and the split's order (all gray, then all colour) is kept.
    :func:`eval_subsample` sends splits without ``sources`` to :func:`stratified_subsample` instead.
    """
    if split.sources is None:
        raise ValueError("source_subsample needs a split with sources")
    if size is None or size >= len(split):
        return split
    if size <= 0:
        raise ValueError(f"subsample size must be positive, got {size}")
    ids, first = _first_rows(split.sources)
    renderings = len(split) // len(ids)
    source_labels = split.labels[first]
    take = _largest_remainder(torch.bincount(source_labels, minlength=num_classes), max(size // renderings, 1))
    kept_sources = ids[_draw_per_stratum(source_labels, take, seed)]
    return split.subset(torch.nonzero(torch.isin(split.sources, kept_sources)).flatten())


def eval_subsample(split: Split, size: int | None, num_classes: int, num_groups: int, seed: int) -> Split:
    """``--eval-size`` for val and test: by source image where renderings are paired, else per cell."""
    if split.sources is not None:
        return source_subsample(split, size, num_classes, seed)
    return stratified_subsample(split, size, num_classes, num_groups, seed)


def _first_rows(sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct source ids ascending, the first row holding each)."""
    ids, inverse = torch.unique(sources, sorted=True, return_inverse=True)
    rows = torch.arange(len(sources))
    first = torch.full((len(ids),), len(sources), dtype=torch.long).scatter_reduce(0, inverse, rows, reduce="amin")
    return ids, first


def file_fingerprint(paths: list[Path]) -> str:
    """Cheap identity of a set of source files (name, size, mtime), to know when a cache is stale."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        stat = path.stat()
        digest.update(json.dumps([path.name, stat.st_size, int(stat.st_mtime_ns)]).encode())
    return digest.hexdigest()[:16]
