"""cifar10s and fmnist-s: the skew construction, the file readers and their error messages."""

from __future__ import annotations

import gzip
import os
import pickle
import pickletools
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fairtune.data import cifar10s, fmnist, skewed
from fairtune.data.base import DataOptions, Split
from fairtune.errors import UserError
from tests.fixtures.cifar import write_cifar10
from tests.fixtures.idx import write_fashion_mnist

TRAIN_PER_CLASS, TEST_PER_CLASS, VAL_PER_CLASS = 30, 7, 5
REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- the rule, computed independently


def expected_train_cells(class_counts: list[int], skew: float) -> list[list[int]]:
    """(G, C) train counts: exact floor(skew·n) gray in classes 0-4, the complement gray in 5-9."""
    gray = []
    for c, n in enumerate(class_counts):
        majority = int(Fraction(str(skew)) * n)  # exact rational arithmetic, no float error
        gray.append(majority if c < len(class_counts) // 2 else n - majority)
    return [gray, [n - g for n, g in zip(class_counts, gray)]]


def cells(split: Split) -> list[list[int]]:
    return split.cell_counts(10, 2).tolist()


def image_keys(images: torch.Tensor) -> list[bytes]:
    return [bytes(row) for row in images.reshape(len(images), -1).numpy()]


def pil_gray(images: torch.Tensor) -> torch.Tensor:
    """The reference: PIL's convert('L') of each (3, H, W) image, one at a time."""
    grays = [np.asarray(Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB").convert("L")) for img in images]
    return torch.from_numpy(np.stack(grays))[:, None]


def read_cifar_source(folder: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [pickle.loads((folder / name).read_bytes(), encoding="bytes") for name in names]
    images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b[b"labels"] for b in batches])
    return torch.from_numpy(images), torch.from_numpy(labels)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, TRAIN_PER_CLASS, TEST_PER_CLASS, seed=3)
    return root


def load_cifar(root: Path, seed: int = 0, **options) -> "cifar10s.DatasetSplits":
    return cifar10s.load(root, DataOptions("cifar10s", seed=seed, **options), val_per_class=VAL_PER_CLASS)


# ---------------------------------------------------------------- gray rendering


def test_luma_is_bit_identical_to_pil():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 9, 7), generator=gen, dtype=torch.uint8)
    images[0] = 255  # the extremes, where a rounding slip would show first
    images[1] = 0
    assert torch.equal(skewed.luma(images), pil_gray(images))


# ---------------------------------------------------------------- cifar10s


def test_cifar_cell_counts_follow_the_rule(cifar_dir):
    splits = load_cifar(cifar_dir)
    kept = TRAIN_PER_CLASS - VAL_PER_CLASS
    assert cells(splits.train) == expected_train_cells([kept] * 10, 0.8) == [[20] * 5 + [5] * 5, [5] * 5 + [20] * 5]
    assert cells(splits.val) == [[VAL_PER_CLASS] * 10] * 2
    assert cells(splits.test) == [[TEST_PER_CLASS] * 10] * 2
    assert cells(load_cifar(cifar_dir, skew=0.6).train) == expected_train_cells([kept] * 10, 0.6)
    assert splits.info.class_names == cifar10s.CLASS_NAMES and splits.info.group_names == ("gray", "color")
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape[1:] == (3, 32, 32)


def test_cifar_test_is_a_gray_and_a_colour_copy_of_every_test_image(cifar_dir):
    source, labels = read_cifar_source(cifar_dir / "cifar-10-batches-py", ["test_batch"])
    test = load_cifar(cifar_dir).test
    n = len(source)
    gray, colour = test.images[:n], test.images[n:]
    assert torch.equal(colour, source)
    assert torch.equal(gray, pil_gray(colour).expand(-1, 3, -1, -1))
    assert torch.equal(test.groups, torch.cat([torch.zeros(n), torch.ones(n)]).long())
    assert torch.equal(test.labels, labels.repeat(2))


def test_cifar_train_images_are_source_pixels_or_their_pil_gray(cifar_dir):
    names = [f"data_batch_{i}" for i in range(1, 6)]
    source, _ = read_cifar_source(cifar_dir / "cifar-10-batches-py", names)
    colour_keys = set(image_keys(source))
    gray_keys = set(image_keys(pil_gray(source).expand(-1, 3, -1, -1)))
    train = load_cifar(cifar_dir).train
    for key, group in zip(image_keys(train.images), train.groups.tolist()):
        assert key in (gray_keys if group == skewed.GRAY else colour_keys)


def source_indices(split_images: torch.Tensor, source: torch.Tensor) -> list[int]:
    """Which source image each row shows (as itself or as its gray)."""
    lookup = {key: i for i, key in enumerate(image_keys(source))}
    lookup.update({key: i for i, key in enumerate(image_keys(skewed.gray_from_rgb(source)))})
    return [lookup[key] for key in image_keys(split_images)]


def test_cifar_val_is_held_out_and_the_same_for_every_run_seed(cifar_dir):
    names = [f"data_batch_{i}" for i in range(1, 6)]
    source, _ = read_cifar_source(cifar_dir / "cifar-10-batches-py", names)
    seed0, seed1 = load_cifar(cifar_dir, seed=0), load_cifar(cifar_dir, seed=1)
    val_sources = source_indices(seed0.val.images, source)
    train_sources = source_indices(seed0.train.images, source)
    n_val = len(val_sources) // 2
    assert val_sources[:n_val] == val_sources[n_val:]  # gray copies then colour copies of the same images
    assert set(val_sources).isdisjoint(train_sources)
    assert sorted(set(val_sources) | set(train_sources)) == list(range(len(source)))
    assert len(train_sources) == len(set(train_sources))
    assert torch.equal(seed0.val.images, seed1.val.images) and torch.equal(seed0.val.labels, seed1.val.labels)
    assert torch.equal(seed0.test.images, seed1.test.images)


def test_cifar_seeds_choose_different_gray_images_with_the_same_counts(cifar_dir):
    a, b, a_again = load_cifar(cifar_dir, seed=0), load_cifar(cifar_dir, seed=1), load_cifar(cifar_dir, seed=0)
    assert cells(a.train) == cells(b.train)
    assert torch.equal(a.train.labels, b.train.labels)  # same images, same order: only the rendering differs
    assert not torch.equal(a.train.groups, b.train.groups)
    for field in ("images", "labels", "groups"):
        assert torch.equal(getattr(a.train, field), getattr(a_again.train, field))


def test_cifar_select_on_test_uses_every_training_image_and_selects_on_test(cifar_dir):
    splits = load_cifar(cifar_dir, select_on="test")
    assert len(splits.train) == 10 * TRAIN_PER_CLASS
    assert cells(splits.train) == expected_train_cells([TRAIN_PER_CLASS] * 10, 0.8)
    assert splits.val is splits.test and splits.selection is splits.test


def test_cifar_reads_python2_and_python3_pickles_alike(tmp_path, cifar_dir):
    py2_batch = (cifar_dir / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    globals_used = {arg for op, arg, _ in pickletools.genops(py2_batch) if op.name == "GLOBAL"}
    assert globals_used == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}  # as the real files
    write_cifar10(tmp_path, TRAIN_PER_CLASS, TEST_PER_CLASS, seed=3, python2=False)
    py3, py2 = load_cifar(tmp_path), load_cifar(cifar_dir)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(py3, name).images, getattr(py2, name).images)


def test_cifar_refuses_a_malicious_pickle(tmp_path):
    folder = write_cifar10(tmp_path, 2, 1)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": Payload(), b"labels": []}, protocol=2))
    with pytest.raises(UserError, match=r"refusing to unpickle .*system from file .*data_batch_2"):
        cifar10s.load(tmp_path, DataOptions("cifar10s"), val_per_class=1)
    assert not marker.exists()


def test_cifar_truncated_batch_is_a_user_error_naming_the_file(tmp_path):
    folder = write_cifar10(tmp_path, 4, 1)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])
    with pytest.raises(UserError, match="data_batch_3 is truncated or corrupt") as error:
        cifar10s.load(tmp_path, DataOptions("cifar10s"), val_per_class=1)
    assert "\n" not in str(error.value)


def test_cifar_missing_folder(tmp_path):
    assert cifar10s.locate(tmp_path) is None
    with pytest.raises(UserError, match=r"no CIFAR-10 at .*cifar-10-batches-py.*CIFAR-10 python version") as error:
        cifar10s.load(tmp_path, DataOptions("cifar10s"))
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- the construction on uneven classes


def test_skew_counts_on_uneven_classes_are_exact():
    class_counts = [100, 37, 58, 9, 64, 100, 21, 40, 13, 77]
    labels = torch.repeat_interleave(torch.arange(10), torch.tensor(class_counts))
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    images = torch.arange(len(labels), dtype=torch.int64).view(-1, 1, 1, 1).expand(-1, 3, 1, 1).to(torch.uint8)
    for skew in (0.29, 0.57, 0.8, 0.95, 1.0, 0.0):  # 0.29 * 100 is 28.999... in floats
        train, val, _ = skewed.build_skewed_splits(
            images, labels, images[:10], labels[:10], skew=skew, seed=4, select_on="val", num_classes=10,
            render_gray=lambda x: x, render_color=lambda x, _g: x, val_per_class=3,
        )  # fmt: skip
        assert cells(train) == expected_train_cells([n - 3 for n in class_counts], skew)
        assert cells(val) == [[3] * 10] * 2
    with pytest.raises(UserError, match="cannot hold out 9 validation images"):
        skewed.build_skewed_splits(
            images, labels, images, labels, skew=0.8, seed=0, select_on="val", num_classes=10,
            render_gray=lambda x: x, render_color=lambda x, _g: x, val_per_class=9,
        )  # fmt: skip


# ---------------------------------------------------------------- fmnist-s


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmnist")
    write_fashion_mnist(root, 20, 6, seed=1)
    return root


@pytest.fixture
def no_system_fmnist(monkeypatch):
    monkeypatch.setattr(fmnist, "SYSTEM_DIRS", ())


def load_fmnist(root: Path, seed: int = 0, **options) -> "fmnist.DatasetSplits":
    return fmnist.load(root, DataOptions("fmnist-s", seed=seed, **options), val_per_class=4)


def test_fmnist_counts_padding_and_tint(fmnist_dir, no_system_fmnist):
    splits = load_fmnist(fmnist_dir)
    assert cells(splits.train) == expected_train_cells([16] * 10, 0.95)
    assert cells(splits.val) == [[4] * 10] * 2
    assert cells(splits.test) == [[6] * 10] * 2
    source = torch.from_numpy(fmnist.read_idx(fmnist_dir / "fashion-mnist" / "t10k-images-idx3-ubyte.gz", 2051, 3).copy())
    test = splits.test
    n = len(source)
    assert test.images.shape == (2 * n, 3, 32, 32)
    gray, colour = test.images[:n], test.images[n:]
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert not test.images[:, :, border].any()
    assert torch.equal(gray[:, 0, 2:30, 2:30], source)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 0], gray[:, 2])
    # Full saturation: one channel is the gray image, another is black; so every colour image has differing channels.
    spread = colour.amax(dim=1).int() - colour.amin(dim=1).int()
    assert (spread.flatten(1).amax(dim=1) > 0).all()
    assert torch.equal(colour.amax(dim=1), gray[:, 0])
    train_gray = splits.train.images[splits.train.groups == skewed.GRAY]
    train_colour = splits.train.images[splits.train.groups == skewed.COLOR]
    assert torch.equal(train_gray[:, 0], train_gray[:, 1])
    assert not torch.equal(train_colour[:, 0], train_colour[:, 1])


def test_fmnist_seeds_val_and_layouts(tmp_path, fmnist_dir, no_system_fmnist):
    a, b, a_again = load_fmnist(fmnist_dir, 0), load_fmnist(fmnist_dir, 1), load_fmnist(fmnist_dir, 0)
    assert cells(a.train) == cells(b.train) and not torch.equal(a.train.groups, b.train.groups)
    assert torch.equal(a.train.images, a_again.train.images) and torch.equal(a.train.groups, a_again.train.groups)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.test.images, b.test.images)
    # torchvision's layout, uncompressed, is found too and reads the same.
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (fmnist_dir / "fashion-mnist").iterdir():
        (raw / path.name.removesuffix(".gz")).write_bytes(gzip.decompress(path.read_bytes()))
    assert fmnist.locate(tmp_path) == raw
    assert torch.equal(load_fmnist(tmp_path).train.images, a.train.images)
    everything = load_fmnist(fmnist_dir, select_on="test")
    assert len(everything.train) == 200 and everything.val is everything.test


@pytest.mark.parametrize("damage", ["truncate-gz", "truncate-raw", "magic"])
def test_fmnist_damaged_idx_is_a_user_error_naming_the_file(tmp_path, damage, no_system_fmnist):
    folder = write_fashion_mnist(tmp_path, 2, 1, gz=damage != "truncate-raw")
    name = "train-images-idx3-ubyte" + (".gz" if damage != "truncate-raw" else "")
    path = folder / name
    if damage == "magic":
        raw = bytearray(gzip.decompress(path.read_bytes()))
        raw[3] = 0x01  # 2049, the label magic
        path.write_bytes(gzip.compress(bytes(raw)))
        pattern = "magic number 2049, expected 2051"
    else:
        path.write_bytes(path.read_bytes()[:-40])
        pattern = "truncated or corrupt"
    with pytest.raises(UserError, match=f"{name} .*{pattern}") as error:
        fmnist.load(tmp_path, DataOptions("fmnist-s"), val_per_class=1)
    assert "\n" not in str(error.value)


def test_fmnist_missing_folder(tmp_path, no_system_fmnist):
    assert fmnist.locate(tmp_path) is None
    with pytest.raises(UserError, match=r"no Fashion-MNIST in .*fashion-mnist.*FashionMNIST/raw.*apt install"):
        fmnist.load(tmp_path, DataOptions("fmnist-s"))


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fmnist_cell_counts(tmp_path):
    assert fmnist.locate(tmp_path) == REAL_FMNIST  # found automatically
    train_labels = fmnist.read_idx(REAL_FMNIST / "train-labels-idx1-ubyte.gz", 2049, 1)
    test_labels = fmnist.read_idx(REAL_FMNIST / "t10k-labels-idx1-ubyte.gz", 2049, 1)
    assert len(train_labels) == 60_000 and len(test_labels) == 10_000
    train_counts = np.bincount(train_labels, minlength=10).tolist()
    test_counts = np.bincount(test_labels, minlength=10).tolist()
    splits = fmnist.load(tmp_path, DataOptions("fmnist-s"))
    held = skewed.VAL_PER_CLASS
    assert cells(splits.train) == expected_train_cells([n - held for n in train_counts], 0.95)
    assert cells(splits.val) == [[held] * 10] * 2
    assert cells(splits.test) == [test_counts, test_counts]
    # Fashion-MNIST is balanced: 6,000 / 1,000 per class, so 5,500 left to train on per class.
    assert cells(splits.train) == [[5225] * 5 + [275] * 5, [275] * 5 + [5225] * 5]
    assert cells(splits.test) == [[1000] * 10] * 2
