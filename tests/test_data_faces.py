"""UTKFace and CelebA loaders and the decode-once cache, on fixture folders in the real layouts.

Expected splits are re-derived here from the files themselves, the way docs/protocol.md §4 words them, and
compared exactly (membership, order, labels, groups and pixels).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fairtune.data import celeba, utkface
from fairtune.data.base import DataOptions, Split
from fairtune.data.facecache import CACHE_DIR, decode_cache, decode_image
from fairtune.errors import UserError
from tests.fixtures.faces import UTK_ODD_SIZE, write_celeba, write_utkface

K = 3  # scaled-down per_cell
# (race, age bin) -> count: cells of <= K (wholly test), K < n <= 2K (test + part of val), > 2K (train too)
UTK_CELLS = {
    (0, 0): 2, (0, 1): 9, (0, 2): 7,
    (1, 0): 3, (1, 1): 4, (1, 2): 10,
    (2, 0): 1, (2, 1): 6, (2, 2): 8,
    (3, 0): 5, (3, 1): 7, (3, 2): 3,
}  # fmt: skip
UTK_MALFORMED, UTK_OTHERS = 4, 2
CELEBA_CELLS = {  # partition -> {(male, attractive): count}
    0: {(0, 0): 5, (0, 1): 3, (1, 0): 4, (1, 1): 2},
    1: {(0, 0): 4, (0, 1): 2, (1, 0): 3, (1, 1): 5},  # n_min 2
    2: {(0, 0): 3, (0, 1): 6, (1, 0): 4, (1, 1): 5},  # n_min 3
}
UTK = DataOptions(dataset="utkface")
CELEBA = DataOptions(dataset="celeba")


def cached_names(cache_file: Path, split: Split) -> list[str]:
    """File names of a split's rows, read back through the cache's sidecar."""
    names = json.loads(cache_file.with_name(cache_file.name + ".json").read_text())["names"]
    return [names[i] for i in split.images.index]


def pil_pixels(path: Path, size: tuple[int, int]) -> np.ndarray:
    rgb = Image.open(path).convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(rgb).transpose(2, 0, 1)


def cache_identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


# ---------------------------------------------------------------- UTKFace


def utk_fields(name: str) -> tuple[int, ...] | None:
    """(age, gender, race, stamp) of a valid fixture name, else None."""
    fields = name.removesuffix(".jpg.chip.jpg").split("_")
    if len(fields) != 4 or not all(f.isdigit() for f in fields) or int(fields[2]) > 4:
        return None
    return tuple(int(f) for f in fields)


def expected_utk_split(folder: Path, per_cell: int, hold_out_val: bool = True) -> dict[str, list[str]]:
    """docs/protocol.md §4 literally: natural sort, drop malformed and race 4, random.seed(1) shuffle, reverse scan.
    Without ``hold_out_val`` (``--select-on test``) val is test and train everything else."""
    valid = [p.name for p in folder.iterdir() if (f := utk_fields(p.name)) is not None and f[2] != 4]
    # The names differ only in their four integer fields, so natural order is their numeric order.
    valid.sort(key=utk_fields)
    state = random.getstate()
    random.seed(1)
    random.shuffle(valid)
    random.setstate(state)

    def cell(name: str) -> tuple[int, int]:
        age, _, race, _ = utk_fields(name)
        return race, (age >= 20) + (age >= 40)

    backwards = valid[::-1]
    test, val = set(), set()
    for c in {cell(n) for n in valid}:
        members = [n for n in backwards if cell(n) == c]
        test.update(members[:per_cell])
        if hold_out_val:
            val.update(members[per_cell : 2 * per_cell])
    if not hold_out_val:
        val = test
    return {
        "test": [n for n in backwards if n in test],
        "val": [n for n in backwards if n in val],
        "train": [n for n in valid if n not in test and n not in val],
    }


@pytest.fixture(scope="module")
def utk_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("utk")
    write_utkface(root, UTK_CELLS, malformed=UTK_MALFORMED, others=UTK_OTHERS, seed=3)
    return root


@pytest.fixture(scope="module")
def utk_splits(utk_root: Path):
    return utkface.load(utk_root, UTK, per_cell=K)


def utk_cache(root: Path) -> Path:
    return root / CACHE_DIR / "utkface-200x200.u8"


def test_utkface_cell_counts_follow_the_per_cell_rule(utk_splits) -> None:
    expected = {name: np.zeros((4, 3), dtype=np.int64) for name in ("train", "val", "test")}
    for (race, age_bin), n in UTK_CELLS.items():
        expected["test"][race, age_bin] = min(n, K)
        expected["val"][race, age_bin] = min(max(n - K, 0), K)
        expected["train"][race, age_bin] = max(n - 2 * K, 0)
    for name in expected:
        counts = getattr(utk_splits, name).cell_counts(3, 4).numpy()
        np.testing.assert_array_equal(counts, expected[name], err_msg=name)
    # the cell of 1 and the cells of 2 and 3 went wholly to test
    assert utk_splits.test.cell_counts(3, 4)[2, 0] == 1 and utk_splits.val.cell_counts(3, 4)[2, 0] == 0


def test_utkface_split_is_the_official_one(utk_root: Path, utk_splits) -> None:
    expected = expected_utk_split(utk_root / "UTKFace", K)
    for name, names in expected.items():
        split = getattr(utk_splits, name)
        assert cached_names(utk_cache(utk_root), split) == names, name
        fields = [utk_fields(n) for n in names]
        assert split.groups.tolist() == [f[2] for f in fields]
        assert split.labels.tolist() == [(f[0] >= 20) + (f[0] >= 40) for f in fields]


def test_utkface_select_on_test_trains_on_everything_but_test(utk_root: Path) -> None:
    """The official procedure (docs/protocol.md §4): test is the same reverse scan, training keeps every other
    image (the second ``per_cell`` of each cell included, in shuffled order) and val is test."""
    splits = utkface.load(utk_root, DataOptions(dataset="utkface", select_on="test"), per_cell=K)
    expected = expected_utk_split(utk_root / "UTKFace", K, hold_out_val=False)
    for name in ("train", "val", "test"):
        assert cached_names(utk_cache(utk_root), getattr(splits, name)) == expected[name], name
    assert expected["val"] == expected["test"]
    for (race, age_bin), n in UTK_CELLS.items():
        assert int(splits.train.cell_counts(3, 4)[race, age_bin]) == max(n - K, 0)
    assert cached_names(utk_cache(utk_root), splits.selection) == expected["test"]


def test_utkface_splits_are_disjoint_and_cover_every_valid_name(utk_root: Path, utk_splits) -> None:
    parts = [set(cached_names(utk_cache(utk_root), getattr(utk_splits, s))) for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == len(set.union(*parts)) == sum(UTK_CELLS.values())
    valid = {p.name for p in (utk_root / "UTKFace").iterdir() if (f := utk_fields(p.name)) and f[2] < 4}
    assert set.union(*parts) == valid


def test_utkface_counts_malformed_and_drops_others(utk_root: Path, utk_splits) -> None:
    assert utk_splits.notes["malformed_skipped"] == UTK_MALFORMED
    assert utk_splits.notes["others_dropped"] == UTK_OTHERS
    for split in (utk_splits.train, utk_splits.val, utk_splits.test):
        assert int(split.groups.max()) <= 3
    assert len(list((utk_root / "UTKFace").iterdir())) == sum(UTK_CELLS.values()) + UTK_MALFORMED + UTK_OTHERS


def test_utkface_parse_name_rules() -> None:
    assert utkface.parse_name("26_1_3_20170119180000000.jpg.chip.jpg") == (26, 3)
    assert utkface.parse_name("0_0_4_20170119180000000.jpg.chip.jpg") == (0, 4)
    for bad in ("39_1_20170116174525125.jpg.chip.jpg", "x_0_1_2017.jpg.chip.jpg", "-3_0_1_2017.jpg.chip.jpg",
                "25_0_7_2017.jpg.chip.jpg", "25_0__2017.jpg.chip.jpg", "1_2_3_4_5.jpg.chip.jpg"):  # fmt: skip
        assert utkface.parse_name(bad) is None, bad
    names = ["10_0_1_5.jpg", "9_0_1_5.jpg", "100_0_1_5.jpg", "9_0_1_40.jpg", "9_0_1_6.jpg"]
    assert sorted(names, key=utkface.natural_key) == ["9_0_1_5.jpg", "9_0_1_6.jpg", "9_0_1_40.jpg", "10_0_1_5.jpg", "100_0_1_5.jpg"]


def test_utkface_cache_holds_the_decoded_pixels(utk_root: Path, utk_splits) -> None:
    folder = utk_root / "UTKFace"
    odd_seen = False
    for name in ("train", "val", "test"):
        split = getattr(utk_splits, name)
        rows = split.images[np.arange(len(split))]
        assert rows.shape == (len(split), 3, 200, 200) and rows.dtype == np.uint8
        for row, file in zip(rows, cached_names(utk_cache(utk_root), split)):
            odd_seen |= Image.open(folder / file).size == UTK_ODD_SIZE
            np.testing.assert_array_equal(row, pil_pixels(folder / file, (200, 200)))
    assert odd_seen  # the resize path was exercised


def test_utkface_default_per_cell_and_info(utk_root: Path) -> None:
    splits = utkface.load(utk_root, UTK)  # every fixture cell has <= 100 samples: all go to test
    assert len(splits.test) == sum(UTK_CELLS.values()) and len(splits.val) == len(splits.train) == 0
    assert utkface.PER_CELL == 100
    info = utkface.info(UTK)
    assert (info.class_names, info.group_names) == (("0-19", "20-39", "40+"), ("White", "Black", "Asian", "Indian"))
    assert (info.model, info.image_size, info.augment, info.normalize) == ("resnet18", 176, "resize_crop_flip", True)


def test_utkface_cache_is_reused_and_rebuilt_when_sources_change(tmp_path: Path) -> None:
    folder = write_utkface(tmp_path, {(0, 0): 2, (1, 1): 2, (2, 2): 1}, malformed=0, others=0)
    first = utkface.load(tmp_path, UTK, per_cell=1)
    built = cache_identity(utk_cache(tmp_path))
    again = utkface.load(tmp_path, UTK, per_cell=1)
    assert cache_identity(utk_cache(tmp_path)) == built
    np.testing.assert_array_equal(first.test.images[np.arange(3)], again.test.images[np.arange(3)])

    source = next(folder.iterdir())
    stamp = source.stat().st_mtime_ns + 10**9
    os.utime(source, ns=(stamp, stamp))
    utkface.load(tmp_path, UTK, per_cell=1)
    touched = cache_identity(utk_cache(tmp_path))
    assert touched != built

    Image.new("RGB", (200, 200), (9, 9, 9)).save(folder / "45_0_3_20170101000000001.jpg.chip.jpg")
    grown = utkface.load(tmp_path, UTK, per_cell=1)
    assert cache_identity(utk_cache(tmp_path)) != touched
    assert len(grown.train) + len(grown.val) + len(grown.test) == 6


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_utkface_corrupt_jpeg_is_a_user_error_naming_it(tmp_path: Path, damage: str) -> None:
    folder = write_utkface(tmp_path, {(0, 1): 2, (3, 2): 1}, malformed=0, others=0)
    victim = sorted(folder.iterdir())[1]
    data = victim.read_bytes()
    victim.write_bytes(b"not a jpeg at all" if damage == "garbage" else data[: len(data) // 3])
    with pytest.raises(UserError, match=victim.name):
        utkface.load(tmp_path, UTK)
    # nothing that could pass for a cache, and no temp file left behind
    assert list((tmp_path / CACHE_DIR).iterdir()) == []


def test_utkface_missing_or_empty_folder(tmp_path: Path) -> None:
    assert utkface.locate(tmp_path) is None
    with pytest.raises(UserError, match=r"UTKFace.*age_gender_race_date.*--data-dir"):
        utkface.load(tmp_path, UTK)
    (tmp_path / "UTKFace").mkdir()
    (tmp_path / "UTKFace" / "README.txt").write_text("not an image")
    assert utkface.locate(tmp_path) is None
    with pytest.raises(UserError, match="no UTKFace images"):
        utkface.load(tmp_path, UTK)
    Image.new("RGB", (200, 200)).save(tmp_path / "UTKFace" / "20_0_4_1.jpg.chip.jpg")  # only race 4
    assert utkface.locate(tmp_path) == tmp_path / "UTKFace"
    with pytest.raises(UserError, match="no usable UTKFace images"):
        utkface.load(tmp_path, UTK)


# ---------------------------------------------------------------- CelebA


def celeba_rows(folder: Path, target: str) -> list[tuple[str, int, int, int]]:
    """(file, partition, label, group) in list_eval_partition.txt order, parsed by hand."""
    lines = (folder / "list_attr_celeba.txt").read_text().splitlines()
    names = lines[1].split()
    attrs = {fields[0]: fields[1:] for fields in (line.split() for line in lines[2:])}
    rows = []
    for line in (folder / "list_eval_partition.txt").read_text().splitlines():
        file, partition = line.split()
        values = attrs[file]
        label = int(values[names.index(target)] == "1")
        group = int(values[names.index("Male")] == "1")
        rows.append((file, int(partition), label, group))
    return rows


def expected_balanced(rows, partition: int) -> list[str]:
    mine = [r for r in rows if r[1] == partition]
    n_min = min(sum(1 for r in mine if (r[3], r[2]) == cell) for cell in [(0, 0), (0, 1), (1, 0), (1, 1)])
    kept, taken = [], {}
    for file, _, label, group in mine:
        if taken.get((group, label), 0) < n_min:
            taken[(group, label)] = taken.get((group, label), 0) + 1
            kept.append(file)
    return kept


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("celeba")
    write_celeba(root, CELEBA_CELLS, seed=5)
    return root


@pytest.fixture(scope="module")
def celeba_splits(celeba_root: Path):
    return celeba.load(celeba_root, CELEBA)


def celeba_cache(root: Path) -> Path:
    return root / CACHE_DIR / "celeba-218x178.u8"


def test_celeba_eval_splits_are_balanced_first_rows_of_each_cell(celeba_root: Path, celeba_splits) -> None:
    rows = celeba_rows(celeba_root / "celeba", "Attractive")
    for name, partition, n_min in (("val", 1, 2), ("test", 2, 3)):
        split = getattr(celeba_splits, name)
        np.testing.assert_array_equal(split.cell_counts(2, 2).numpy(), np.full((2, 2), n_min))
        assert cached_names(celeba_cache(celeba_root), split) == expected_balanced(rows, partition)


def test_celeba_train_is_the_whole_unbalanced_partition(celeba_root: Path, celeba_splits) -> None:
    rows = celeba_rows(celeba_root / "celeba", "Attractive")
    train = [r for r in rows if r[1] == 0]
    assert cached_names(celeba_cache(celeba_root), celeba_splits.train) == [r[0] for r in train]
    assert celeba_splits.train.labels.tolist() == [r[2] for r in train]
    assert celeba_splits.train.groups.tolist() == [r[3] for r in train]
    expected = np.zeros((2, 2), dtype=np.int64)
    for (male, attractive), n in CELEBA_CELLS[0].items():
        expected[male, attractive] = n
    np.testing.assert_array_equal(celeba_splits.train.cell_counts(2, 2).numpy(), expected)


def test_celeba_labels_groups_and_pixels(celeba_root: Path, celeba_splits) -> None:
    folder = celeba_root / "celeba"
    by_file = {r[0]: r for r in celeba_rows(folder, "Attractive")}
    for name in ("train", "val", "test"):
        split = getattr(celeba_splits, name)
        files = cached_names(celeba_cache(celeba_root), split)
        assert split.labels.tolist() == [by_file[f][2] for f in files]
        assert split.groups.tolist() == [by_file[f][3] for f in files]
        rows = split.images[np.arange(len(split))]
        assert rows.shape == (len(split), 3, 218, 178)
        for row, file in zip(rows, files):
            np.testing.assert_array_equal(row, pil_pixels(folder / "img_align_celeba" / file, (178, 218)))
    info = celeba.info(CELEBA)
    assert info.class_names == ("not Attractive", "Attractive") and info.group_names == ("female", "male")
    assert (info.model, info.image_size, info.augment, info.normalize) == ("shufflenet_v2_x1_0", 176, "random_resized_crop_flip", True)


def test_celeba_other_target_reuses_the_cache(celeba_root: Path, celeba_splits) -> None:
    built = cache_identity(celeba_cache(celeba_root))
    options = DataOptions(dataset="celeba", target="Smiling")
    splits = celeba.load(celeba_root, options)
    assert cache_identity(celeba_cache(celeba_root)) == built
    assert celeba.info(options).class_names == ("not Smiling", "Smiling")
    rows = celeba_rows(celeba_root / "celeba", "Smiling")
    by_file = {r[0]: r for r in rows}
    for name, partition in (("val", 1), ("test", 2)):
        split = getattr(splits, name)
        files = cached_names(celeba_cache(celeba_root), split)
        assert files == expected_balanced(rows, partition)
        assert split.labels.tolist() == [by_file[f][2] for f in files]
        counts = split.cell_counts(2, 2)
        assert bool((counts == counts[0, 0]).all())
    assert len(splits.train) == sum(CELEBA_CELLS[0].values())


def test_celeba_bad_target_is_a_user_error(celeba_root: Path) -> None:
    with pytest.raises(UserError, match=r"unknown CelebA attribute 'Handsome'.*--target.*Attractive"):
        celeba.load(celeba_root, DataOptions(dataset="celeba", target="Handsome"))
    with pytest.raises(UserError, match="sensitive"):
        celeba.load(celeba_root, DataOptions(dataset="celeba", target="Male"))


def test_celeba_missing_image_or_folder(tmp_path: Path) -> None:
    assert celeba.locate(tmp_path) is None
    with pytest.raises(UserError, match=r"celeba.*img_align_celeba.*--data-dir"):
        celeba.load(tmp_path, CELEBA)
    folder = write_celeba(tmp_path, {p: {(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 1} for p in (0, 1, 2)})
    assert celeba.locate(tmp_path) == folder
    (folder / "img_align_celeba" / "000006.jpg").unlink()
    with pytest.raises(UserError, match="000006.jpg"):
        celeba.load(tmp_path, CELEBA)


def test_celeba_empty_cell_cannot_be_balanced(tmp_path: Path) -> None:
    write_celeba(tmp_path, {0: {(0, 0): 1, (1, 1): 1}, 1: {(0, 0): 1, (0, 1): 1, (1, 0): 1}, 2: {(1, 1): 2}})
    with pytest.raises(UserError, match="cannot be balanced"):
        celeba.load(tmp_path, CELEBA)


# ---------------------------------------------------------------- decode_cache


def test_decode_cache_rebuilds_on_shape_order_or_damaged_sidecar(tmp_path: Path) -> None:
    folder = write_utkface(tmp_path, {(0, 0): 2, (1, 0): 1}, malformed=0, others=0)
    paths = sorted(folder.iterdir())
    cache = tmp_path / "c.u8"
    calls = []
    images = decode_cache(paths, 200, 200, cache, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert isinstance(images, np.memmap) and images.mode == "r" and images.shape == (3, 3, 200, 200)
    built = cache_identity(cache)
    decode_cache(paths, 200, 200, cache)
    assert cache_identity(cache) == built

    small = decode_cache(paths, 50, 40, cache)
    assert small.shape == (3, 3, 50, 40)
    np.testing.assert_array_equal(small[1], decode_image(paths[1], 50, 40))

    flipped = decode_cache(paths[::-1], 50, 40, cache)
    np.testing.assert_array_equal(flipped[0], small[2])

    cache.with_name("c.u8.json").write_text("{not json")
    resized = cache_identity(cache)
    decode_cache(paths[::-1], 50, 40, cache)
    assert cache_identity(cache) != resized

    assert decode_cache([], 200, 200, tmp_path / "empty.u8").shape == (0, 3, 200, 200)
