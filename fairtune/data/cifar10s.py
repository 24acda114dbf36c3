"""CIFAR-10S: CIFAR-10 with colour skewed by class (Wang et al., CVPR 2020), read from the python pickles.

The files are read here rather than through ``torchvision.datasets.CIFAR10`` because that class
insists on the real files' MD5s (so no test fixture could pass) and unpickles without restriction.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np
import torch

from fairtune.data.base import DataOptions, DatasetInfo, DatasetSplits
from fairtune.data.skewed import build_skewed_splits, gray_from_rgb, skew_option
from fairtune.errors import UserError

NAME = "cifar10s"
DEFAULT_SKEW = 0.8  # the official code's value
OPTIONS = (skew_option(DEFAULT_SKEW),)
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SIDE = 32

EXPECTED = (
    f"{FOLDER}/ with {', '.join(TRAIN_FILES)}, {TEST_FILE}, {META_FILE}: download the "
    '"CIFAR-10 python version" (https://www.cs.toronto.edu/~kriz/cifar.html) and extract it into the '
    "data dir (--data-dir or FAIRTUNE_DATA)"
)


def _numpy_reconstruct():
    # The private array-rebuild function moved (numpy.core -> numpy._core in numpy 2); take it from
    # the object itself instead of importing either path.
    return np.empty(0).__reduce__()[0]


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else.

    A pickle can call any importable function while loading (``os.system`` included), and the data
    dir is a path the user points at, possibly a download. The real batches only need numpy's array
    rebuild; ``_codecs.encode`` is how Python 3 writes bytes at protocol 2, so re-pickled copies load.
    """

    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # the real files were pickled by Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        raise UserError(f"refusing to unpickle {module}.{name} from file {self.path}: not a CIFAR-10 batch")


def _read_pickle(path: Path) -> dict:
    try:
        with path.open("rb") as file:
            content = _BatchUnpickler(file, path).load()
    except UserError:
        raise
    except Exception as error:  # a truncated or garbled pickle fails in many ways: all mean the same here
        raise UserError(f"{path} is truncated or corrupt ({type(error).__name__}); {EXPECTED}") from None
    if not isinstance(content, dict):
        raise UserError(f"{path} is not a CIFAR-10 batch (a {type(content).__name__}, not a dict); {EXPECTED}")
    return content


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (n, 3, 32, 32) images, int64 (n,) labels) of one batch file, checked."""
    batch = _read_pickle(path)
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE:
        raise UserError(f"{path}: b'data' is not a uint8 (n, 3072) array; the file is corrupt; {EXPECTED}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: b'labels' is not a list of integers; the file is corrupt; {EXPECTED}") from None
    if labels.shape != (len(data),) or (len(labels) and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES))):
        raise UserError(f"{path}: {len(data)} images but labels {labels.shape} outside 0..9; the file is corrupt; {EXPECTED}")
    return data.reshape(-1, 3, SIDE, SIDE), labels  # rows are channel-major: R plane, G plane, B plane


def _read_class_names(path: Path) -> tuple[str, ...]:
    names = _read_pickle(path).get(b"label_names")
    if not isinstance(names, list) or len(names) != len(CLASS_NAMES) or not all(isinstance(n, bytes) for n in names):
        raise UserError(f"{path}: b'label_names' is not a list of {len(CLASS_NAMES)} names; the file is corrupt; {EXPECTED}")
    return tuple(n.decode() for n in names)


def info(options: DataOptions, data_dir: Path | None = None, class_names: tuple[str, ...] = CLASS_NAMES) -> DatasetInfo:
    return DatasetInfo(
        name=NAME,
        class_names=class_names,
        group_names=("gray", "color"),
        model="cnn",
        image_size=SIDE,
        augment="flip",
        normalize=False,
    )


def locate(data_dir: Path) -> Path | None:
    folder = Path(data_dir) / FOLDER
    needed = (*TRAIN_FILES, TEST_FILE, META_FILE)
    return folder if all((folder / name).is_file() for name in needed) else None


def load(data_dir: Path, options: DataOptions, *, val_per_class: int | None = None) -> DatasetSplits:
    """Read the batches and build the skewed splits (``fairtune.data.skewed``)."""
    folder = locate(data_dir)
    if folder is None:
        looked = Path(data_dir) / FOLDER
        missing = [n for n in (*TRAIN_FILES, TEST_FILE, META_FILE) if not (looked / n).is_file()]
        raise UserError(f"no CIFAR-10 at {looked} (missing {', '.join(missing)}); expected {EXPECTED}")
    train = [_read_batch(folder / name) for name in TRAIN_FILES]
    test_images, test_labels = _read_batch(folder / TEST_FILE)
    class_names = _read_class_names(folder / META_FILE)
    skew = DEFAULT_SKEW if options.skew is None else options.skew
    train_split, val_split, test_split = build_skewed_splits(
        torch.from_numpy(np.concatenate([images for images, _ in train])),
        torch.from_numpy(np.concatenate([labels for _, labels in train])),
        torch.from_numpy(test_images),
        torch.from_numpy(test_labels),
        skew=skew,
        seed=options.seed,
        select_on=options.select_on,
        num_classes=len(class_names),
        render_gray=gray_from_rgb,
        render_color=lambda images, _generator: images,  # colour is the source image itself
        val_per_class=val_per_class,
    )
    return DatasetSplits(
        info=info(options, data_dir, class_names),
        options=options,
        train=train_split,
        val=val_split,
        test=test_split,
        notes={"source_dir": str(folder), "skew": skew},
    )
