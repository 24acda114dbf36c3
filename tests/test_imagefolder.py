"""``--dataset imagefolder`` on real PNG/JPEG folders: labels, splits, sizes, pixels, the cache, bad CSVs,
and dataset options as data (flags made from OPTIONS, values in ``DataOptions.extra``).

Which rows landed in which split is read back from the pixels: every fixture image is its own noise,
so each sample is matched to the one file whose PIL decoding (``convert("RGB")`` and a bilinear
resize, written here independently of the loader) it equals byte for byte.
"""

from __future__ import annotations

import re
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fairtune import io
from fairtune.cli import main
from fairtune.data import DataOptions, dataset_info, load_dataset
from fairtune.data.base import ImageView
from fairtune.data.facecache import CACHE_DIR
from fairtune.errors import UserError
from tests.fixtures.imagefolder import LARGE_SIZES, MODES, Row, write_imagefolder, write_labels
from tests.helpers import assert_one_line_error

# Cells of 10, 7, 5, 3, 2 and 1 rows: every branch of the carving rule.
INT_CELLS = {(0, 0): 10, (0, 1): 7, (1, 0): 5, (1, 1): 3, (2, 0): 2, (2, 1): 1}
# (test, val, train) per cell, worked out by hand from the module docstring's rule.
CARVED_DEFAULT = {(0, 0): (2, 1, 7), (0, 1): (1, 1, 5), (1, 0): (1, 1, 3), (1, 1): (1, 1, 1), (2, 0): (1, 0, 1), (2, 1): (1, 0, 0)}
CARVED_HALF_QUARTER = {(0, 0): (5, 3, 2), (0, 1): (4, 2, 1), (1, 0): (3, 1, 1), (1, 1): (1, 1, 1), (2, 0): (1, 0, 1), (2, 1): (1, 0, 0)}
CARVED_SELECT_ON_TEST = {(0, 0): (2, 0, 8), (0, 1): (1, 0, 6), (1, 0): (1, 0, 4), (1, 1): (1, 0, 2), (2, 0): (1, 0, 1), (2, 1): (1, 0, 0)}


def options(**kwargs) -> DataOptions:
    return DataOptions("imagefolder", **kwargs)


def pil_rgb(path: Path, side: int) -> np.ndarray:
    """(3, side, side) uint8 as PIL itself decodes and resizes the file."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)).transpose(2, 0, 1)


def members(folder: Path, rows: list[Row], split, side: int) -> list[Row]:
    """The labels.csv row of every sample of ``split``, in order, found by its pixels."""
    by_pixels = {pil_rgb(folder / row.path, side).tobytes(): row for row in rows}
    assert len(by_pixels) == len(rows), "fixture images must differ"
    images = split.images
    array = images.numpy() if isinstance(images, torch.Tensor) else images[np.arange(len(images))]
    found = [by_pixels.get(image.tobytes()) for image in array]
    assert None not in found, "a decoded image equals no file's PIL decoding"
    return found


def cell_counts(found: list[Row]) -> Counter:
    return Counter((int(row.label), int(row.group)) for row in found)


@pytest.fixture()
def int_folder(tmp_path) -> tuple[Path, list[Row]]:
    folder = tmp_path / "ints"
    return folder, write_imagefolder(folder, INT_CELLS)


# ---------------------------------------------------------------- labels and names


def test_integer_labels_keep_their_numbers(int_folder) -> None:
    folder, rows = int_folder
    data = load_dataset(options(), folder)
    assert data.info.class_names == ("0", "1", "2") and data.info.group_names == ("0", "1")
    for split in (data.train, data.val, data.test):
        found = members(folder, rows, split, 32)
        assert split.labels.tolist() == [int(row.label) for row in found]
        assert split.groups.tolist() == [int(row.group) for row in found]
    assert len(data.train) + len(data.val) + len(data.test) == len(rows)


def test_name_labels_are_numbered_in_sorted_order(tmp_path) -> None:
    cells = {("dog", "m"): 3, ("cat", "f"): 3, ("bird", "f"): 4, ("cat", "m"): 3, ("dog", "f"): 3, ("bird", "m"): 3}
    rows = write_imagefolder(tmp_path, cells)
    info = dataset_info(options(), tmp_path)
    assert info.class_names == ("bird", "cat", "dog") and info.group_names == ("f", "m")
    data = load_dataset(options(), tmp_path)
    for split in (data.train, data.val, data.test):
        found = members(tmp_path, rows, split, 32)
        assert [info.class_names[i] for i in split.labels.tolist()] == [row.label for row in found]
        assert [info.group_names[i] for i in split.groups.tolist()] == [row.group for row in found]


# ---------------------------------------------------------------- splits


def test_split_column_is_followed_row_by_row(tmp_path) -> None:
    splits = {
        (0, 0): ["train", "train", "val", "test"],
        (0, 1): ["test", "train", "train", "val", "test"],
        (1, 0): ["val", "train", "test"],
        (1, 1): ["train", "test", "train"],
    }
    rows = write_imagefolder(tmp_path, {cell: len(values) for cell, values in splits.items()}, splits=splits)
    data = load_dataset(options(), tmp_path)
    for name in ("train", "val", "test"):
        found = members(tmp_path, rows, getattr(data, name), 32)
        assert sorted(row.path for row in found) == sorted(row.path for row in rows if row.split == name)
    official = load_dataset(options(select_on="test"), tmp_path)
    assert official.val is official.test  # val is test; rows marked val are then not trained on either
    assert sorted(r.path for r in members(tmp_path, rows, official.train, 32)) == sorted(r.path for r in rows if r.split == "train")


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, CARVED_DEFAULT),
        ({"extra": {"test_fraction": 0.5, "val_fraction": 0.25}}, CARVED_HALF_QUARTER),
        ({"select_on": "test"}, CARVED_SELECT_ON_TEST),
    ],
)
def test_carved_splits_follow_the_documented_rounding(int_folder, kwargs, expected) -> None:
    folder, rows = int_folder
    data = load_dataset(options(**kwargs), folder)
    counts = {name: cell_counts(members(folder, rows, getattr(data, name), 32)) for name in ("test", "val", "train")}
    if kwargs.get("select_on") == "test":
        assert data.val is data.test  # nothing held out: the rows a val would take train
        counts["val"] = Counter()
    for cell, (n_test, n_val, n_train) in expected.items():
        assert (counts["test"][cell], counts["val"][cell], counts["train"][cell]) == (n_test, n_val, n_train), cell


def test_carved_split_is_fixed_by_the_files_alone(int_folder) -> None:
    folder, rows = int_folder

    def membership(data) -> dict[str, list[str]]:
        return {name: sorted(r.path for r in members(folder, rows, getattr(data, name), 32)) for name in ("train", "val", "test")}

    first = membership(load_dataset(options(seed=0), folder))
    assert membership(load_dataset(options(seed=0), folder)) == first
    assert membership(load_dataset(options(seed=7), folder)) == first  # not the run seed's
    write_labels(folder, rows[::-1])
    assert membership(load_dataset(options(seed=3), folder)) == first  # nor the row order's


# ---------------------------------------------------------------- sizes, models, pixels, cache


def test_small_images_default_to_32_px_cnn_and_flip_in_memory(int_folder) -> None:
    folder, rows = int_folder
    data = load_dataset(options(), folder)
    info = data.info
    assert (info.image_size, info.model, info.augment, info.normalize) == (32, "cnn", "flip", False)
    assert isinstance(data.train.images, torch.Tensor) and data.train.images.shape[1:] == (3, 32, 32)


def test_large_images_default_to_176_px_resnet18_and_crop_in_the_memmap(tmp_path) -> None:
    rows = write_imagefolder(tmp_path, {(0, 0): 3, (0, 1): 3, (1, 0): 3, (1, 1): 3}, sizes=LARGE_SIZES)
    data = load_dataset(options(), tmp_path)
    info = data.info
    assert (info.image_size, info.model, info.augment, info.normalize) == (176, "resnet18", "crop_flip", True)
    assert isinstance(data.train.images, ImageView) and data.train.images.shape[1:] == (3, 176, 176)
    found = [row for name in ("train", "val", "test") for row in members(tmp_path, rows, getattr(data, name), 176)]
    assert sorted(row.path for row in found) == sorted(row.path for row in rows)


@pytest.mark.parametrize(
    "sizes, extra, expected",
    [
        (None, {"image_size": 48, "model": "resnet18"}, (48, "resnet18", "flip", True)),
        (LARGE_SIZES, {"image_size": 24}, (24, "cnn", "flip", False)),
        (LARGE_SIZES, {"model": "cnn"}, (176, "cnn", "crop_flip", False)),
        (LARGE_SIZES, {"image_size": 96, "model": "shufflenet_v2_x1_0"}, (96, "shufflenet_v2_x1_0", "crop_flip", True)),
    ],
)
def test_image_size_and_model_options_override_the_defaults(tmp_path, sizes, extra, expected) -> None:
    rows = write_imagefolder(tmp_path, {(0, 0): 3, (0, 1): 3, (1, 0): 3, (1, 1): 3}, **({"sizes": sizes} if sizes else {}))
    data = load_dataset(options(extra=extra), tmp_path)
    info = data.info
    assert (info.image_size, info.model, info.augment, info.normalize) == expected
    side = expected[0]
    assert data.test.images.shape[1:] == (3, side, side)
    assert len(members(tmp_path, rows, data.test, side)) == len(data.test)


def test_every_mode_decodes_to_pils_own_rgb(int_folder) -> None:
    folder, rows = int_folder
    data = load_dataset(options(), folder)
    found = [row for name in ("train", "val", "test") for row in members(folder, rows, getattr(data, name), 32)]
    assert sorted(row.path for row in found) == sorted(row.path for row in rows)  # each matched byte for byte
    with_modes = {Image.open(folder / row.path).mode for row in found}
    assert with_modes == set(MODES)
    assert {Path(row.path).suffix for row in found} == {".png", ".jpg"}
    assert {Image.open(folder / row.path).size for row in found} >= {(20, 24), (64, 40), (17, 50)}


def test_the_cache_is_built_once_and_survives_reordered_rows(int_folder) -> None:
    folder, rows = int_folder
    load_dataset(options(), folder)
    cache = folder / CACHE_DIR / "imagefolder-32x32.u8"
    before = (cache.stat().st_ino, cache.stat().st_mtime_ns)
    load_dataset(options(seed=1), folder)
    assert (cache.stat().st_ino, cache.stat().st_mtime_ns) == before
    write_labels(folder, rows[::-1])
    data = load_dataset(options(), folder)
    assert (cache.stat().st_ino, cache.stat().st_mtime_ns) == before
    found = members(folder, rows, data.test, 32)  # the reused cache still gives each row its own pixels
    assert data.test.labels.tolist() == [int(row.label) for row in found]


# ---------------------------------------------------------------- bad CSVs


def _lines(rows: list[Row]) -> list[str]:
    """labels.csv as lines: the header (line 1), then row i on line i + 2."""
    return ["path,label,group", *(f"{row.path},{row.label},{row.group}" for row in rows)]


def _with_split(rows: list[Row], split_of) -> list[str]:
    lines = _lines(rows)
    return [lines[0] + ",split", *(f"{line},{split_of(i, row)}" for i, (line, row) in enumerate(zip(lines[1:], rows)))]


def _truncated(folder: Path, row: Row) -> None:
    path = folder / row.path
    path.write_bytes(path.read_bytes()[:120])  # the header survives, the pixels do not


def _not_an_image(folder: Path) -> str:
    (folder / "0" / "notes.png").write_text("not a picture")
    return "0/notes.png,0,1"


# case -> (labels.csv lines made from the good rows (None: no file), dataset options, fragments of
# the message). INT_CELLS puts rows 0-9 in cell (0, 0), 10-16 in (0, 1), 17-21 in (1, 0), 22-24 in
# (1, 1), 25-26 in (2, 0) and 27 in (2, 1); row i is on line i + 2 unless a case shifts it.
BAD_CSVS = {
    "no-labels-file": (lambda f, r: None, {}, ["no", "labels.csv", "path,label,group"]),
    "empty-file": (lambda f, r: [], {}, ["is empty"]),
    "header-only": (lambda f, r: ["path,label,group"], {}, ["no rows"]),
    "missing-column": (lambda f, r: [line.rsplit(",", 1)[0] for line in _lines(r)], {}, ["line 1", "no group column"]),
    "unknown-split": (
        lambda f, r: [(lines := _with_split(r, lambda i, row: "training" if i == 3 else "train"))[0], "", *lines[1:]],
        {}, ["line 6", "split 'training'", "train, val, test"],  # the blank line 2 counts
    ),
    "missing-image": (lambda f, r: [*_lines(r)[:2], "0/nowhere.png,0,0", *_lines(r)[2:]], {}, ["line 3", "no file", "nowhere.png"]),
    "not-an-image": (lambda f, r: [*_lines(r)[:3], _not_an_image(f), *_lines(r)[3:]], {}, ["line 4", "cannot read image", "notes.png"]),
    "truncated-image": (lambda f, r: (_truncated(f, r[4]), _lines(r))[1], {}, ["line 6", "cannot decode image", "0/0_004.png"]),
    # With --image-size no header is read: the decoder meets the file first, and still names its line.
    "truncated-image-size-given": (lambda f, r: (_truncated(f, r[4]), _lines(r))[1], {"image_size": 32}, ["line 6", "cannot decode image"]),
    "mixed-labels": (lambda f, r: [*_lines(r)[:4], f"{r[3].path},cat,{r[3].group}", *_lines(r)[5:]], {}, ["line 5", "label 'cat' is a name", "all integers"]),
    "label-gap": (lambda f, r: [line.replace(",2,", ",3,") for line in _lines(r)], {}, ["line 27", "label 3", "no row has label 2"]),
    "negative-group": (lambda f, r: [*_lines(r)[:7], f"{r[6].path},{r[6].label},-1", *_lines(r)[8:]], {}, ["line 8", "group -1 is negative"]),
    "empty-label": (lambda f, r: [*_lines(r)[:3], f"{r[2].path},,{r[2].group}", *_lines(r)[4:]], {}, ["line 4", "empty label"]),
    "extra-field": (lambda f, r: [*_lines(r)[:5], "", _lines(r)[5] + ",surplus", *_lines(r)[6:]], {}, ["line 7", "4 fields", "header has 3"]),
    "listed-twice": (lambda f, r: [*_lines(r), _lines(r)[3]], {}, ["line 30", "listed again (first on line 4)"]),
    "cell-without-test": (
        lambda f, r: _with_split(r, lambda i, row: "train" if (row.label, row.group) == ("1", "0") else "test" if i % 2 else "val"),
        {}, ["no test samples in cell (class '1', group '0')", "none of its 5 rows has split test"],
    ),
}


@pytest.mark.parametrize("case", BAD_CSVS)
def test_bad_csvs_are_one_line_errors_naming_the_row(int_folder, case) -> None:
    folder, rows = int_folder
    make, extra, fragments = BAD_CSVS[case]
    lines = make(folder, rows)
    if lines is None:
        (folder / "labels.csv").unlink()
    else:
        (folder / "labels.csv").write_text("".join(line + "\n" for line in lines))
    with pytest.raises(UserError) as caught:
        load_dataset(options(extra=extra), folder)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_fractions_that_would_change_nothing_are_refused(int_folder, tmp_path) -> None:
    folder, _ = int_folder
    with pytest.raises(UserError, match=r"--test-fraction 0.7 and --val-fraction 0.3 leave nothing to train on"):
        load_dataset(options(extra={"test_fraction": 0.7, "val_fraction": 0.3}), folder)
    with pytest.raises(UserError, match=r"--val-fraction holds out nothing under --select-on test"):
        load_dataset(options(select_on="test", extra={"val_fraction": 0.2}), folder)
    split_folder = tmp_path / "split"
    write_imagefolder(split_folder, {(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 1}, splits={c: ["test"] for c in [(0, 0), (0, 1), (1, 0), (1, 1)]})
    with pytest.raises(UserError, match=r"has a split column, so --test-fraction would change nothing"):
        load_dataset(options(extra={"test_fraction": 0.3}), split_folder)


# ---------------------------------------------------------------- dataset options as data


@pytest.mark.parametrize(
    "data, message",
    [
        (DataOptions("cifar10s", extra={"image_size": 32}), "--image-size applies to imagefolder only, not cifar10s; drop --image-size"),
        (DataOptions("utkface", extra={"test_fraction": 0.3}), "--test-fraction applies to imagefolder only, not utkface"),
        (DataOptions("imagefolder", skew=0.5), "--skew applies to cifar10s, fmnist-s only, not imagefolder; drop --skew"),
        (DataOptions("imagefolder", target="Smiling"), "--target applies to celeba only, not imagefolder"),
        (DataOptions("imagefolder", extra={"colour": 1}), "colour is an option of no dataset"),
    ],
)
def test_an_option_the_dataset_does_not_declare_is_refused(tmp_path, data, message) -> None:
    with pytest.raises(UserError) as caught:
        load_dataset(data, tmp_path)
    assert message in str(caught.value)
    with pytest.raises(UserError):
        dataset_info(data, tmp_path)


@pytest.mark.parametrize(
    "data, expected",
    [
        (DataOptions("cifar10s", seed=2, skew=0.5, train_size=100, eval_size=50),
         {"dataset": "cifar10s", "seed": 2, "skew": 0.5, "train_size": 100, "eval_size": 50, "target": None, "select_on": "val"}),
        (DataOptions("fmnist-s", select_on="test"),
         {"dataset": "fmnist-s", "seed": 0, "skew": None, "train_size": None, "eval_size": None, "target": None, "select_on": "test"}),
        (DataOptions("utkface", seed=3, eval_size=400),
         {"dataset": "utkface", "seed": 3, "skew": None, "train_size": None, "eval_size": 400, "target": None, "select_on": "val"}),
        (DataOptions("celeba", target="Smiling", train_size=10),
         {"dataset": "celeba", "seed": 0, "skew": None, "train_size": 10, "eval_size": None, "target": "Smiling", "select_on": "val"}),
    ],
)
def test_fingerprints_of_the_built_in_datasets_are_unchanged(data, expected) -> None:
    # Byte for byte, key order included: teacher identities and run digests hash this dict.
    assert json.dumps(data.fingerprint()) == json.dumps(expected)


def test_extra_is_sorted_and_in_the_fingerprint_as_a_dict() -> None:
    a = options(extra={"val_fraction": 0.3, "image_size": 64})
    b = options(extra=(("image_size", 64), ("val_fraction", 0.3)))
    assert a == b and hash(a) == hash(b) and a.extra == (("image_size", 64), ("val_fraction", 0.3))
    assert a.fingerprint()["extra"] == {"image_size": 64, "val_fraction": 0.3}
    assert list(a.fingerprint())[-1] == "extra"
    assert a.option("image_size") == 64 and a.option("model", "cnn") == "cnn"
    assert DataOptions("cifar10s", skew=0.3).option("skew", 0.8) == 0.3


# ---------------------------------------------------------------- the command line


def test_train_on_an_image_folder_records_its_names_and_options(tmp_path, capsys) -> None:
    folder = tmp_path / "pets"
    write_imagefolder(folder, {("dog", "indoor"): 9, ("cat", "indoor"): 10, ("cat", "outdoor"): 8, ("dog", "outdoor"): 7})
    results = tmp_path / "results"
    argv = ["train", "--method", "scratch", "--dataset", "imagefolder", "--data-dir", folder, "--results-dir", results,
            "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--image-size", "16", "--test-fraction", "0.25"]
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    (record_path,) = (results / "imagefolder" / "train" / "scratch").glob("*/seed0.json")
    record = json.loads(record_path.read_text())
    assert "acc[indoor]" in out and "acc[outdoor]" in out and re.search(r"\n +cat +dog\n", out)  # sorted names label the matrix
    assert record["data"]["extra"] == {"image_size": 16, "test_fraction": 0.25}
    # --test-fraction 0.25: cells of 10, 8, 9, 7 give 3, 2, 2, 2 test images (halves up)
    assert np.array(record["test"]["cell_counts"]).sum() == 9
    assert "train 21, val 4, test 9 samples" in out  # 34 images, 1 val per cell


def test_a_bad_csv_is_exit_2_and_one_line(tmp_path, capsys) -> None:
    rows = write_imagefolder(tmp_path / "d", {(0, 0): 3, (0, 1): 3, (1, 0): 3, (1, 1): 3})
    (tmp_path / "d" / "labels.csv").write_text("path,label,group,split\n" + "".join(f"{r.path},{r.label},{r.group},tset\n" for r in rows))
    code = main(["train", "--method", "scratch", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "d"),
                 "--results-dir", str(tmp_path / "results"), "--epochs", "1"])
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, "labels.csv, line 2", "split 'tset' is not one of train, val, test")
    code = main(["train", "--method", "scratch", "--dataset", "cifar10s", "--image-size", "32", "--results-dir", str(tmp_path / "results")])
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, "--image-size applies to imagefolder only, not cifar10s")


def test_list_shows_imagefolder_without_and_with_its_folder(int_folder, capsys) -> None:
    folder, _ = int_folder
    assert main(["list", "--data-dir", str(folder.parent)]) == 0
    out = capsys.readouterr().out
    line = out[out.index("  imagefolder") :].splitlines()
    assert "classes, groups and model read from its files" in line[0] and "MISSING" in line[1] and "labels.csv" in line[1]
    assert main(["list", "--data-dir", str(folder)]) == 0
    out = capsys.readouterr().out
    line = out[out.index("  imagefolder") :].splitlines()
    assert "3 classes x 2 groups, cnn @ 32px" in line[0] and f"found at {folder}" in line[1]


def _best(results: Path, method: str, hyper: dict, extra: dict | None) -> None:
    data = {"dataset": "imagefolder", "seed": 0, "skew": None, "train_size": None, "eval_size": None, "target": None, "select_on": "val"}
    io.write_json(results / "imagefolder" / "search" / method / "best.json", {
        "method": method, "hyperparameters": hyper, "val": {"accuracy": 50.0, "deo_a": 5.0},
        "settings": {"train": {"method": method, "epochs": 2, "batch_size": 8}, "data": {**data, **({"extra": extra} if extra else {})}},
    })


def test_final_takes_the_searches_dataset_options_and_a_flag_replaces_only_its_own(tmp_path) -> None:
    from fairtune.cli import _final_settings, build_parser
    from fairtune.tune.final import FinalSettings, plan_final

    def plan(**overrides):
        settings = FinalSettings("imagefolder", tmp_path, tmp_path, methods=("mfd", "hkd"), seeds=(0,), data_overrides=overrides)
        return plan_final(settings).data

    _best(tmp_path, "mfd", {"lam": 1.0}, {"image_size": 48, "test_fraction": 0.3})
    _best(tmp_path, "hkd", {"T": 4.0}, {"test_fraction": 0.3, "image_size": 48})
    assert plan().extra == (("image_size", 48), ("test_fraction", 0.3))
    assert plan(extra={"image_size": 24}).extra == (("image_size", 24), ("test_fraction", 0.3))
    _best(tmp_path, "hkd", {"T": 4.0}, {"test_fraction": 0.3, "image_size": 64})
    with pytest.raises(UserError, match="used different dataset options"):
        plan()
    assert plan(extra={"image_size": 24}).extra == (("image_size", 24), ("test_fraction", 0.3))
    _best(tmp_path, "hkd", {"T": 4.0}, None)  # a search given no dataset options had none
    with pytest.raises(UserError, match="used different dataset options"):
        plan()
    args = build_parser().parse_args(["final", "--dataset", "imagefolder", "--image-size", "24", "--eval-size", "50"])
    assert _final_settings(args, "imagefolder", ()).data_overrides == {"eval_size": 50, "extra": {"image_size": 24}}


def test_a_registered_dataset_brings_its_own_flag(monkeypatch) -> None:
    """A new dataset's option needs no edit to DataOptions or the CLI: its OPTIONS make the flag."""
    from types import SimpleNamespace

    from fairtune import cli
    from fairtune.data import DATASETS, DatasetOption, check_options

    toy = SimpleNamespace(
        EXPECTED="toy/", OPTIONS=(DatasetOption("levels", "--levels", int, "quantisation levels", default=3),),
        info=None, locate=lambda data_dir: None, load=None,
    )
    monkeypatch.setitem(DATASETS, "toy", toy)
    args = cli.build_parser().parse_args(["train", "--method", "scratch", "--dataset", "toy", "--levels", "5", "--skew", "0.5"])
    data = cli._data_options(args, 0)
    assert data.extra == (("levels", 5),) and data.skew == 0.5 and data.option("levels") == 5
    with pytest.raises(UserError, match="--skew applies to cifar10s, fmnist-s only, not toy"):
        check_options(data)
    check_options(DataOptions("toy", extra={"levels": 5}))
    with pytest.raises(UserError, match="--levels applies to toy only, not imagefolder"):
        check_options(DataOptions("imagefolder", extra={"levels": 5}))
