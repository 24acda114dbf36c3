"""fmnist-s: Fashion-MNIST built like CIFAR-10S, with colour as a random per-image tint.

Fashion-MNIST has no colour, so "colour" (group 1) is the gray image multiplied by a tint of random
hue at full saturation and value, one per image: the hue is noise, so colour carries no class signal
and only the class-skewed *presence* of colour can bias a model. Gray (group 0) is the source image
on 3 channels. Training tints come from the run seed; val and test tints from fixed seeds, so every
seed is tuned and tested on the same pixels. Images are zero-padded from 28 to 32 px so the CIFAR
CNN applies unchanged.

The IDX files are read here rather than with ``torchvision.datasets.mnist.read_image_file``: that
reader does not open ``.gz`` files, checks the header with ``assert`` (gone under ``python -O``) and
does not notice a truncated file.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from fairtune.data.base import DataOptions, DatasetInfo, DatasetSplits
from fairtune.data.skewed import build_skewed_splits, skew_option
from fairtune.errors import UserError

NAME = "fmnist-s"
DEFAULT_SKEW = 0.95
OPTIONS = (skew_option(DEFAULT_SKEW),)
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SOURCE_SIDE, SIDE = 28, 32
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Where Debian's dataset-fashion-mnist package installs the files; searched after the data dir.
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
_TINT_CHUNK = 8192  # images per float pass: bounds the temporary to ~100 MB

EXPECTED = (
    "fashion-mnist/ (or torchvision's FashionMNIST/raw/) with train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each may be .gz): download them from "
    "https://github.com/zalandoresearch/fashion-mnist into <data dir>/fashion-mnist/ (--data-dir or "
    "FAIRTUNE_DATA), or apt install dataset-fashion-mnist"
)


def info(options: DataOptions, data_dir: Path | None = None) -> DatasetInfo:
    return DatasetInfo(
        name=NAME,
        class_names=CLASS_NAMES,
        group_names=("gray", "color"),
        model="cnn",
        image_size=SIDE,
        augment="flip",
        normalize=False,
    )


def _own_dirs(data_dir: Path) -> tuple[Path, ...]:
    return (Path(data_dir) / "fashion-mnist", Path(data_dir) / "FashionMNIST" / "raw")


def _candidate_dirs(data_dir: Path) -> tuple[Path, ...]:
    return (*_own_dirs(data_dir), *SYSTEM_DIRS)


def _find_file(folder: Path, name: str) -> Path | None:
    # torchvision's raw folder holds both forms; the uncompressed one is faster to read.
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def locate(data_dir: Path) -> Path | None:
    for folder in _candidate_dirs(data_dir):
        if all(_find_file(folder, name) for name in FILES.values()):
            return folder
    return None


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """A uint8 IDX array (big-endian header: magic, then one uint32 per dimension), checked whole."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as file:
            data = file.read()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path} is truncated or corrupt ({error}); re-download it: {EXPECTED}") from None
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise UserError(f"{path} is truncated ({len(data)} bytes, no IDX header); re-download it: {EXPECTED}")
    found, *dims = struct.unpack(f">{1 + ndim}I", data[:header])
    if found != magic:
        raise UserError(f"{path} has magic number {found}, expected {magic}: not this IDX file; {EXPECTED}")
    if len(data) - header != int(np.prod(dims)):
        raise UserError(f"{path} is truncated or corrupt: header says {dims}, found {len(data) - header} data bytes; {EXPECTED}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_pair(folder: Path, images_key: str, labels_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (n, 1, 32, 32) zero-padded images, int64 labels)."""
    images_path, labels_path = _find_file(folder, FILES[images_key]), _find_file(folder, FILES[labels_key])
    images = read_idx(images_path, IMAGE_MAGIC, 3)
    labels = read_idx(labels_path, LABEL_MAGIC, 1)
    if images.shape[1:] != (SOURCE_SIDE, SOURCE_SIDE):
        raise UserError(f"{images_path} holds {images.shape[1:]} images, expected 28x28 Fashion-MNIST; {EXPECTED}")
    if len(images) != len(labels) or (len(labels) and labels.max() >= len(CLASS_NAMES)):
        raise UserError(f"{labels_path} does not match {images_path} ({len(labels)} labels for {len(images)} images, classes 0..9)")
    pad = (SIDE - SOURCE_SIDE) // 2
    padded = torch.zeros((len(images), 1, SIDE, SIDE), dtype=torch.uint8)
    padded[:, 0, pad : pad + SOURCE_SIDE, pad : pad + SOURCE_SIDE] = torch.from_numpy(images.copy())
    return padded, torch.from_numpy(labels.astype(np.int64))


def gray_on_three_channels(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1).contiguous()


def hue_to_rgb(hue: torch.Tensor) -> torch.Tensor:
    """(N,) hues in [0, 1) -> (N, 3) RGB in [0, 1] at full saturation and value (the HSV formula)."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6.0 * hue[:, None]) % 6.0
    return 1.0 - torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def tint(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 (N, 1, H, W) gray -> uint8 (N, 3, H, W): each image times its own random full-colour tint."""
    rgb = hue_to_rgb(torch.rand(len(images), generator=generator))
    out = torch.empty((len(images), 3, *images.shape[2:]), dtype=torch.uint8)
    for start in range(0, len(images), _TINT_CHUNK):
        chunk = images[start : start + _TINT_CHUNK].float()
        tinted = chunk * rgb[start : start + _TINT_CHUNK, :, None, None]
        out[start : start + _TINT_CHUNK] = tinted.round_().to(torch.uint8)
    return out


def load(data_dir: Path, options: DataOptions, *, val_per_class: int | None = None) -> DatasetSplits:
    """Read the IDX files and build the skewed splits (``fairtune.data.skewed``)."""
    own = _own_dirs(data_dir)
    for candidate in own:
        # Some files but not all: a download that stopped. The system copy is not what was meant.
        missing = [name for name in FILES.values() if _find_file(candidate, name) is None]
        if 0 < len(missing) < len(FILES):
            raise UserError(f"{candidate} lacks {', '.join(missing)} (a partial download?); add them (.gz or not) or remove the folder")
    folder = locate(data_dir)
    if folder is None:
        looked = ", ".join(str(d) for d in _candidate_dirs(data_dir))
        raise UserError(f"no Fashion-MNIST in {looked}; expected {EXPECTED}")
    train_images, train_labels = _read_pair(folder, "train_images", "train_labels")
    test_images, test_labels = _read_pair(folder, "test_images", "test_labels")
    skew = DEFAULT_SKEW if options.skew is None else options.skew
    train, val, test = build_skewed_splits(
        train_images,
        train_labels,
        test_images,
        test_labels,
        skew=skew,
        seed=options.seed,
        select_on=options.select_on,
        num_classes=len(CLASS_NAMES),
        render_gray=gray_on_three_channels,
        render_color=tint,
        val_per_class=val_per_class,
    )
    notes = {"source_dir": str(folder), "skew": skew}
    if folder not in own:
        notes["fallback"] = f"no Fashion-MNIST under data dir {data_dir}: using the system copy in {folder}"
    return DatasetSplits(info=info(options), options=options, train=train, val=val, test=test, notes=notes)
