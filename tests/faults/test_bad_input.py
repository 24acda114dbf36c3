"""Bad input, tried systematically: every mistake costs exit code 2 and one line saying what and how to
fix it, never a traceback, and leaves every file on disk as it was.

One table covers the issue's whole list in-process (some rows repeat a check that lives elsewhere in
tests/, here with the disk snapshot added); hypothesis then throws random argument lists at the CLI and
random documents at the search-space reader.
"""

from __future__ import annotations

import math
import socket
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fairtune.cli import build_parser, main
from fairtune.data import DATASETS, DataOptions, dataset_info, fmnist
from fairtune.errors import UserError
from fairtune.methods import all_method_names
from fairtune.models import build_model
from fairtune.spaces import KEYS, SPACES_DIR, SearchSpace, load_space, parse_space
from fairtune.teachers import save_teacher, teacher_identity, teacher_paths
from fairtune.tune.ledger import Ledger
from tests.fixtures.cifar import write_cifar10
from tests.fixtures.faces import write_celeba, write_utkface
from tests.fixtures.results import write_best_config, write_final_run
from tests.helpers import assert_one_line_error, snapshot

CLI_EXAMPLES = 600
SPACE_EXAMPLES = 600
TINY = ["--train-size", "200", "--eval-size", "200", "--epochs", "1", "--batch-size", "40"]


def write_teacher(results: Path, seed: int, *, dataset: str = "fmnist-s", model: str | None = None,
                  num_classes: int | None = None, state: dict | None = None) -> None:
    """A teacher file in fmnist-s's folder for ``seed``, its identity claiming ``dataset`` (and ``model``)."""
    options = DataOptions(dataset=dataset, seed=seed, train_size=200, eval_size=200)
    identity = teacher_identity(options, dataset_info(options))
    identity.update({k: v for k, v in (("model", model), ("num_classes", num_classes)) if v is not None})
    if state is None:
        state = build_model("cnn", 10, 32).state_dict()
    save_teacher(teacher_paths(results, "fmnist-s", seed), state, identity, 1, {"test": {}})


@pytest.fixture(scope="module")
def world(tmp_path_factory, fmnist_dir) -> dict[str, Path]:
    """Data folders with one defect each, and a results folder with work in it that must survive."""
    root = tmp_path_factory.mktemp("world")
    cifar = write_cifar10(root / "cifar_truncated", n_train_per_class=2, n_test_per_class=1)
    batch = cifar / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])

    utk = write_utkface(root / "utk_corrupt", {(0, 1): 2, (3, 2): 1}, malformed=0, others=0)
    victim = sorted(utk.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated download

    celeba = write_celeba(root / "celeba_corrupt", {p: {(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 1} for p in (0, 1, 2)})
    (celeba / "img_align_celeba" / "000005.jpg").write_bytes(b"<html>404 Not Found</html>")

    spaces = root / "spaces_bad"
    spaces.mkdir()
    (spaces / "mfd.yaml").write_text("method: mfd\nparameter: lam\ndistribution: loguniform\nlow: 1.0e-4\nhigh: [100\n")

    results = root / "results"
    write_teacher(results, 1, dataset="cifar10s")  # copied over from another dataset
    write_teacher(results, 2, dataset="utkface")  # another dataset and architecture (resnet18)
    write_teacher(results, 3, state=build_model("cnn", 3, 32).state_dict())  # identity fits, weights do not
    nan_state = build_model("cnn", 10, 32).state_dict()
    nan_state["head.weight"][0, 0] = float("nan")
    write_teacher(results, 4, state=nan_state)  # corrupted: NaN weights
    existing = results / "fmnist-s" / "search" / "at"
    Ledger.create(existing, {"num_samples": 1})  # a search's record, as the driver writes it first
    (existing / "best.json").write_text('{"hyperparameters": {"lam": 1.0}}')
    (root / "cwd").mkdir()
    places = {"root": root, "fmnist": fmnist_dir, "cifar": root / "cifar_truncated", "utk": root / "utk_corrupt",
              "celeba": root / "celeba_corrupt", "spaces_bad": spaces, "results": results, "cwd": root / "cwd",
              "nowhere": root / "nowhere"}
    return {**places, **files_on_disk(root, fmnist_dir)}


def files_on_disk(root: Path, fmnist_dir: Path) -> dict[str, Path]:
    """Folders and files with one defect each for the issue-16 rows: results folders holding corrupt
    records, a file where a folder belongs, partial data, search-space folders a user got wrong."""
    places = {"a_file": root / "a_file.txt"}
    places["a_file"].write_text("not a folder\n")

    corrupt_best = root / "results_corrupt_best"  # report: a final table to build, a best.json cut short
    write_final_run(corrupt_best, "mfd", 0, {"lam": 1.0})
    best = write_best_config(corrupt_best, "mfd", {"lam": 1.0})
    best.write_text(best.read_text()[:40])
    places["results_corrupt_best"] = corrupt_best

    seed_missing_keys = root / "results_seed_missing_keys"
    write_final_run(seed_missing_keys, "mfd", 0, {"lam": 1.0})
    write_final_run(seed_missing_keys, "mfd", 1, {"lam": 1.0}).write_text('{"seed": 1, "test": {"accuracy": 70.0}}')
    places["results_seed_missing_keys"] = seed_missing_keys

    seed_garbage = root / "results_seed_garbage"
    write_final_run(seed_garbage, "ss", 0).write_bytes(b"\x00\x9c garbage, not JSON")
    places["results_seed_garbage"] = seed_garbage

    best_without_hyper = root / "results_best_without_hyperparameters"
    path = write_best_config(best_without_hyper, "mfd", {"lam": 1.0})
    path.write_text('{"method": "mfd", "val": {"accuracy": 70.0, "deo_a": 5.0}}')
    write_best_config(best_without_hyper, "hkd", {})  # ad+hkd's T: the searched value is not there
    places["results_best_without_hyperparameters"] = best_without_hyper

    partial = root / "fmnist_partial"  # two of the four IDX files: a download that stopped
    (partial / "fashion-mnist").mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (partial / "fashion-mnist" / name).write_bytes((fmnist_dir / "fashion-mnist" / name).read_bytes())
    places["fmnist_partial"] = partial

    for name, files in (("spaces_empty", {}), ("spaces_typo", {"mdf.yaml": (SPACES_DIR / "mfd.yaml").read_text()}),
                        ("spaces_missing_key", {"mfd.yaml": "method: mfd\nparameter: lam\nlow: 1.0e-4\nhigh: 100.0\ndefault: 1.0\n"})):
        folder = root / name
        folder.mkdir()
        for file_name, text in files.items():
            (folder / file_name).write_text(text)
        places[name] = folder
    return places


def unwritable_folder(root: Path) -> Path:
    """A folder nobody may write in: a read-only one, or (root ignores permissions) sysfs's top."""
    import os

    if os.geteuid() != 0:
        folder = root / "read_only"
        folder.mkdir(exist_ok=True)
        folder.chmod(0o555)
        return folder
    if not Path("/sys").is_dir():
        pytest.skip("running as root without /sys: no folder here refuses writes")
    return Path("/sys")


@pytest.fixture()
def closed_port() -> int:
    with socket.socket() as probe:  # free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


FM = ["--dataset", "fmnist-s", "--data-dir", "{fmnist}"]
# (id, argv, fragments of the one line: what went wrong, then how to fix it)
TABLE = [
    ("unknown-method", ["search", "--method", "mfdd", *FM], ["unknown method 'mfdd'", "valid: scratch"]),
    ("unknown-dataset", ["search", "--method", "mfd", "--dataset", "cifar100"], ["--dataset", "invalid choice: 'cifar100'", "--help"]),
    ("unknown-objective", ["search", "--method", "mfd", *FM, "--objective", "accuracy"], ["--objective", "invalid choice", "acc-deo_a"]),
    ("composed-ss+", ["search", "--method", "ss+", *FM], ["unknown method 'ss+'", "ss+X / ad+X"]),
    ("composed-ad+ad", ["search", "--method", "ad+ad", *FM], ["unknown method 'ad+ad'", "valid:"]),
    ("composed-mfd+hkd+x", ["train", "--method", "mfd+hkd+x", *FM], ["unknown method 'mfd+hkd+x'", "valid:"]),
    ("num-samples-0", ["search", "--method", "mfd", *FM, "--num-samples", "0"], ["--num-samples", "positive integer, got '0'"]),
    ("num-samples-negative", ["search", "--method", "mfd", *FM, "--num-samples", "-3"], ["--num-samples", "positive integer"]),
    ("num-samples-huge-float", ["search", "--method", "mfd", *FM, "--num-samples", "1e400"], ["--num-samples", "positive integer"]),
    ("epochs-0", ["train", "--method", "ss", *FM, "--epochs", "0"], ["--epochs", "positive integer"]),
    ("batch-size-0", ["train", "--method", "ss", *FM, "--batch-size", "0"], ["--batch-size", "positive integer"]),
    ("lr-inf", ["train", "--method", "ss", *FM, "--lr", "inf"], ["--lr", "positive finite number"]),
    ("skew-1", ["train", "--method", "ss", *FM, "--skew", "1"], ["--skew", "strictly between 0 and 1"]),
    ("reduction-factor-1", ["search", "--method", "mfd", *FM, "--reduction-factor", "1"], ["--reduction-factor", ">= 2"]),
    ("lam-negative", ["train", "--method", "mfd", *FM, "--lam", "-1"], ["--lam -1.0 is out of range", "finite value >= 0"]),
    ("distill-lam-negative", ["search", "--method", "ad+at", *FM, "--distill-lam", "-0.5"], ["--distill-lam -0.5 is out of range"]),
    ("T-nan", ["train", "--method", "hkd", *FM, "--T", "nan"], ["--T nan is out of range", "> 0"]),
    ("T-on-a-T-search", ["search", "--method", "hkd", *FM, "--T", "3"], ["hkd searches T", "drop --T"]),
    ("gpus-negative", ["search", "--method", "mfd", *FM, "--gpus-per-trial", "-1"], ["--gpus-per-trial", ">= 0"]),
    ("eval-size-below-cells", ["train", "--method", "ss", *FM, "--eval-size", "5"], ["--eval-size 5 is below the 20", "use at least 20"]),
    ("missing-data-cifar10s", ["train", "--method", "ss", "--dataset", "cifar10s", "--data-dir", "{nowhere}"], ["no CIFAR-10 at", "cifar-10-batches-py", "download"]),
    ("missing-data-fmnist-s", ["search", "--method", "mfd", "--dataset", "fmnist-s", "--data-dir", "{nowhere}"], ["no Fashion-MNIST in", "apt install dataset-fashion-mnist"]),
    ("missing-data-utkface", ["teacher", "--dataset", "utkface", "--data-dir", "{nowhere}"], ["no UTKFace images in", "--data-dir"]),
    ("missing-data-celeba", ["train", "--method", "ss", "--dataset", "celeba", "--data-dir", "{nowhere}"], ["no CelebA in", "--data-dir"]),
    ("truncated-cifar-pickle", ["teacher", "--dataset", "cifar10s", "--data-dir", "{cifar}"], ["data_batch_3 is truncated or corrupt", "download"]),
    ("corrupt-jpeg-utkface", ["train", "--method", "ss", "--dataset", "utkface", "--data-dir", "{utk}"], ["cannot decode image", "replace it"]),
    ("corrupt-jpeg-celeba", ["search", "--method", "ss", "--dataset", "celeba", "--data-dir", "{celeba}"], ["cannot decode image", "000005.jpg", "replace it"]),
    ("celeba-unknown-attribute", ["train", "--method", "ss", "--dataset", "celeba", "--data-dir", "{celeba}", "--target", "Handsome"], ["unknown CelebA attribute 'Handsome'", "--target", "Attractive"]),
    ("celeba-sensitive-as-target", ["train", "--method", "ss", "--dataset", "celeba", "--data-dir", "{celeba}", "--target", "Male"], ["sensitive attribute", "choose another"]),
    ("malformed-space-yaml", ["train", "--method", "mfd", *FM, "--search-spaces", "{spaces_bad}"], ["mfd.yaml: not valid YAML at line", "fix the file"]),
    ("missing-space-folder", ["search", "--method", "mfd", *FM, "--search-spaces", "{nowhere}"], ["is not a folder", "<method>.yaml"]),
    ("teacher-of-another-dataset", ["train", "--method", "hkd", "--T", "2", *FM, *TINY, "--seed", "1"], ["other settings", "dataset 'cifar10s' (teacher) vs 'fmnist-s'", "--force"]),
    ("teacher-of-another-architecture", ["train", "--method", "mfd", "--lam", "1", *FM, *TINY, "--seed", "2"], ["other settings", "model resnet18 vs cnn", "--force"]),
    ("teacher-weights-misfit", ["train", "--method", "at", "--lam", "1", *FM, *TINY, "--seed", "3"], ["does not fit", "--force"]),
    ("teacher-with-nan-weights", ["teacher", *FM, *TINY, "--seeds", "4"], ["non-finite", "head.weight", "--force"]),
    ("existing-search-without-resume", ["search", "--method", "at", *FM, *TINY, "--gpus-per-trial", "0"], ["already exists", "--resume"]),
    ("unreachable-address", ["search", "--method", "ss", *FM, *TINY, "--address", "127.0.0.1:{port}"], ["cannot reach the Ray cluster", "ray start --head"]),
    ("unreachable-ray-client-address", ["search", "--method", "ss", *FM, *TINY, "--gpus-per-trial", "0", "--address", "ray://127.0.0.1:{port}"], ["cannot reach", "omit --address"]),
    ("malformed-address", ["search", "--method", "ss", *FM, *TINY, "--address", "nonsense"], ["is not auto, host:port or ray://host:port"]),
    ("device-unsupported", ["train", "--method", "ss", *FM, "--device", "meta"], ["--device", "auto, cpu or cuda"]),
    ("device-unknown-backend", ["teacher", *FM, "--device", "hpu"], ["--device", "auto, cpu or cuda"]),
    ("threads-overflow", ["train", "--method", "ss", *FM, "--threads", "9" * 30], ["--threads", "at most"]),
    # Issue 16. 1: batches the training split cannot fill, refused before anything trains.
    ("train-size-below-batch", ["train", "--method", "scratch", *FM, "--train-size", "100", "--eval-size", "200"],
     ["--batch-size 128 is more than the 100 training samples", "use a --batch-size of at most 100"]),
    ("batch-size-above-train", ["train", "--method", "scratch", *FM, "--batch-size", "100000", "--eval-size", "200"],
     ["--batch-size 100000 is more than the 200 training samples", "at most 200"]),
    ("balanced-batch-above-cells", ["train", "--method", "ss", *FM, "--batch-size", "100000", "--eval-size", "200"],
     ["--batch-size 100000 does not fit ss's balanced batches", "use a --batch-size from 20 to"]),
    ("balanced-batch-below-cells", ["train", "--method", "ss", *FM, *TINY, "--batch-size", "10"],
     ["--batch-size 10 does not fit ss's balanced batches", "from 20 to"]),
    ("search-train-size-below-batch", ["search", "--method", "ad", *FM, "--train-size", "100", "--eval-size", "200", "--epochs", "1",
     "--gpus-per-trial", "0"], ["--batch-size 128 is more than the 100 training samples", "ad has no full batch"]),
    ("search-teacher-batch-above-train", ["search", "--method", "mfd", *FM, *TINY, "--batch-size", "300", "--seed", "5",
     "--gpus-per-trial", "0"], ["--batch-size 300 is more than the 200 training samples", "scratch has no full batch"]),
    # 2: results folders that cannot take the result, found before training.
    ("train-results-dir-is-a-file", ["train", "--method", "ss", *FM, *TINY, "--results-dir", "{a_file}"],
     ["--results-dir", "a_file.txt is a file, not a folder"]),
    ("train-results-dir-under-a-file", ["train", "--method", "ss", *FM, *TINY, "--results-dir", "{a_file}/results"],
     ["a_file.txt is a file, not a folder"]),
    ("train-results-dir-unwritable", ["train", "--method", "ss", *FM, *TINY, "--results-dir", "{unwritable}/results"],
     ["--results-dir", "cannot write in", "fix its permissions or pass another --results-dir"]),
    ("teacher-results-dir-is-a-file", ["teacher", *FM, *TINY, "--seeds", "0", "--results-dir", "{a_file}"], ["is a file, not a folder"]),
    ("search-results-dir-is-a-file", ["search", "--method", "ss", *FM, *TINY, "--results-dir", "{a_file}", "--gpus-per-trial", "0"],
     ["is a file, not a folder"]),
    ("final-results-dir-unwritable", ["final", "--dataset", "fmnist-s", "--method", "ss", "--results-dir", "{unwritable}/results"],
     ["cannot write in"]),
    # 3: records on disk, validated where they are read.
    ("report-corrupt-best", ["report", "--dataset", "fmnist-s", "--results-dir", "{results_corrupt_best}"],
     ["search/mfd/best.json is not JSON", "rerun `fairtune search --method mfd --dataset fmnist-s`, or delete the file"]),
    ("report-seed-missing-keys", ["report", "--dataset", "fmnist-s", "--results-dir", "{results_seed_missing_keys}"],
     ["final/mfd/seed1.json is not a valid record (test: 'deo_a' is a required property)", "--seeds 1 --force"]),
    ("report-seed-garbage", ["report", "--dataset", "fmnist-s", "--results-dir", "{results_seed_garbage}"],
     ["final/ss/seed0.json is not JSON", "--force`, or delete the file"]),
    ("final-best-without-hyperparameters", ["final", "--dataset", "fmnist-s", "--method", "mfd", "--results-dir",
     "{results_best_without_hyperparameters}"], ["mfd/best.json is not a valid record ('hyperparameters' is a required property)",
     "rerun `fairtune search --method mfd"]),
    ("train-fixed-T-missing-from-best", ["train", "--method", "ad+hkd", *FM, "--results-dir", "{results_best_without_hyperparameters}"],
     ["hkd/best.json has no hyperparameters.T", "pass --T"]),
    # 6: options that were silently ignored or substituted.
    ("target-on-fmnist-s", ["train", "--method", "ss", *FM, *TINY, "--target", "Smiling"], ["--target applies to celeba only, not fmnist-s", "drop --target"]),
    ("skew-on-celeba", ["train", "--method", "ss", "--dataset", "celeba", "--data-dir", "{celeba}", "--skew", "0.5"],
     ["--skew applies to cifar10s, fmnist-s only, not celeba"]),
    ("grace-period-above-epochs", ["search", "--method", "ss", *FM, *TINY, "--grace-period", "5", "--gpus-per-trial", "0"],
     ["--grace-period 5 is more than the 1 epochs", "use at most 1"]),
    ("data-dir-is-a-file", ["train", "--method", "ss", "--dataset", "fmnist-s", "--data-dir", "{a_file}", *TINY], ["is a file, not a folder", "--data-dir"]),
    ("fmnist-partial-idx", ["train", "--method", "ss", "--dataset", "fmnist-s", "--data-dir", "{fmnist_partial}", *TINY],
     ["lacks t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte", "add them"]),
    ("search-spaces-empty", ["train", "--method", "ss", *FM, *TINY, "--search-spaces", "{spaces_empty}"], ["holds no <method>.yaml file"]),
    ("search-spaces-mistyped-name", ["train", "--method", "ss", *FM, *TINY, "--search-spaces", "{spaces_typo}"],
     ["mdf.yaml names no method", "rename it to <method>.yaml"]),
    ("resume-without-a-search", ["search", "--method", "ss", *FM, *TINY, "--resume", "--gpus-per-trial", "0"],
     ["--resume: there is no search of ss", "drop --resume"]),
    # 8: wording.
    ("space-missing-key", ["train", "--method", "mfd", *FM, "--search-spaces", "{spaces_missing_key}"],
     ["mfd.yaml: key 'distribution' is missing; add it: choice or loguniform"]),
    ("final-corrupt-seed-file", ["final", "--dataset", "fmnist-s", "--method", "ss", "--seeds", "0", "--results-dir", "{results_seed_garbage}"],
     ["final/ss/seed0.json is not JSON", "pass --force"]),
]
# Rows that need a cluster to compare against: the session's local Ray (2 CPUs, 1 logical GPU).
RAY_TABLE = [
    ("gpus-above-cluster", ["search", "--method", "mfd", *FM, *TINY, "--gpus-per-trial", "2"], ["exceeds the cluster's 1 GPUs", "use at most 1"]),
    ("cpus-above-cluster", ["search", "--method", "mfd", *FM, *TINY, "--cpus-per-trial", "64", "--gpus-per-trial", "0"], ["exceeds the cluster's 2 CPUs", "lower it"]),
    ("search-teacher-weights-misfit", ["search", "--method", "hkd", *FM, *TINY, "--seed", "3", "--gpus-per-trial", "0"], ["does not fit", "--force"]),
    ("search-teacher-with-nan-weights", ["search", "--method", "mfd", *FM, *TINY, "--seed", "4", "--gpus-per-trial", "0"], ["non-finite", "--force"]),
]


def run_row(world, argv, port, capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(fmnist, "SYSTEM_DIRS", ())  # "missing" must not find the system's copy
    monkeypatch.chdir(world["cwd"])
    places = {k: str(v) for k, v in world.items()}
    if any("{unwritable}" in a for a in argv):
        places["unwritable"] = str(unwritable_folder(world["root"]))
    argv = [a.format(port=port, **places) for a in argv]
    if argv[0] != "list" and "--results-dir" not in argv:
        argv += ["--results-dir", places["results"]]
    before = snapshot(world["root"], world["fmnist"])
    code = main(argv)
    out, err = capsys.readouterr()
    assert snapshot(world["root"], world["fmnist"]) == before, "a failed command changed files on disk"
    return code, out, err


@pytest.mark.parametrize("argv, fragments", [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_bad_input_is_one_line_exit_2_and_damages_nothing(world, argv, fragments, closed_port, capsys, monkeypatch):
    code, _, err = run_row(world, argv, closed_port, capsys, monkeypatch)
    assert_one_line_error(code, err, *fragments)


@pytest.mark.slow
@pytest.mark.parametrize("argv, fragments", [row[1:] for row in RAY_TABLE], ids=[row[0] for row in RAY_TABLE])
def test_bad_input_against_a_cluster(ray_session, world, argv, fragments, closed_port, capsys, monkeypatch):
    code, _, err = run_row(world, argv, closed_port, capsys, monkeypatch)
    assert_one_line_error(code, err, *fragments)


# ---------------------------------------------------------------- fuzzing the command line


def _options() -> dict[str, list[str]]:
    """Every flag of each command fuzzed here (final/report run Ray work; their faults come later)."""
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    return {name: sorted({flag for action in commands[name]._actions for flag in action.option_strings}) for name in FUZZED_COMMANDS}


FUZZED_COMMANDS = ("list", "train", "teacher", "search")
NAMES = [*all_method_names(), *DATASETS, "ss+", "ad+ad", "mfd+hkd+x", "../../x", "../x", "x/../../y", "MFD", " hkd", ""]
NUMBERS = ["0", "-1", "1", "3", "0.5", "1e-4", "1e309", "-1e309", "nan", "NaN", "inf", "-inf", "9" * 40, "-0", "0x10",
           "1_000", "٣", "½", "1e5", "2.5e-3"]  # fmt: skip
PATHS = ["..", "../", "../../..", "/", "/etc", "nowhere/../../x", "~", "results", "./x/../..", "dätä"]
JUNK = ["-h", "--help", "--", "-", "--resum", "--data", "--method", "--dataset", "--T", "--lam"]


@st.composite
def cli_argv(draw) -> list[str]:
    """Mostly well-formed commands with random flag values (so the checks after parsing run), some junk."""
    command = draw(st.sampled_from(["train"] * 3 + ["search"] * 3 + ["teacher"] * 2 + ["list", "junk"]))
    if command == "junk":
        command = draw(st.text(max_size=8))
    plausible = st.sampled_from(["1", "2", "0.5", "3", "auto", "cpu", "val", "acc"])  # passes many flags' checks
    value = st.one_of(
        plausible, plausible, plausible, st.sampled_from(NAMES), st.sampled_from(NUMBERS), st.sampled_from(PATHS),
        st.integers(min_value=-(10**30), max_value=10**30).map(str), st.floats().map(repr), st.text(max_size=12),
    )
    argv = [command]
    if command != "list" and draw(st.integers(0, 9)):
        argv += ["--method", draw(st.sampled_from(all_method_names()) if draw(st.integers(0, 2)) else st.sampled_from(NAMES) | st.text(max_size=8))]
    if command != "list" and draw(st.integers(0, 9)):
        argv += ["--dataset", draw(st.sampled_from(list(DATASETS)) if draw(st.integers(0, 2)) else st.sampled_from(NAMES) | st.text(max_size=8))]
    flags = st.sampled_from(OPTIONS.get(command, OPTIONS["search"]))
    for flag, flag_value in draw(st.lists(st.tuples(flags, value), max_size=4)):
        argv += [flag, flag_value]
    if not draw(st.integers(0, 2)):
        argv.insert(draw(st.integers(1, len(argv))), draw(st.sampled_from(JUNK) | value))
    return argv


OPTIONS = _options()


def test_fuzzed_cli_arguments_only_exit_0_or_2(tmp_path, capsys, monkeypatch):
    """Random argument lists never escape as an exception. Data is always missing, so nothing trains."""
    monkeypatch.setattr(fmnist, "SYSTEM_DIRS", ())
    monkeypatch.setenv("FAIRTUNE_DATA", str(tmp_path / "no-data"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    results = tmp_path / "results"
    tried: Counter[str] = Counter()

    @settings(max_examples=CLI_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(cli_argv())
    def run(argv):
        command = argv[0]
        if command in ("train", "teacher", "search"):
            argv += ["--data-dir", str(tmp_path / "no-data"), "--results-dir", str(results)]
        elif command == "list":
            argv += ["--data-dir", str(tmp_path / "no-data")]
        try:
            code = main(argv)
        except SystemExit as exc:  # -h / --help: argparse prints the help and exits 0
            code = exc.code
        out, err = capsys.readouterr()
        assert code in (0, 2), (argv, code, err)
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("fairtune: error: "), (argv, err)
            reached = "after parsing" if "(see `fairtune" not in err else "refused by the parser"
            tried[f"exit 2, {'missing data' if 'no-data' in err else reached}"] += 1
        else:
            tried["exit 0"] += 1
        assert not results.exists() and not any(cwd.iterdir()), argv  # nothing written anywhere

    run()
    total = sum(tried.values())
    print(f"\nhypothesis tried {total} CLI argument lists: {dict(tried)}")
    assert total >= CLI_EXAMPLES // 2 and tried["exit 2, missing data"] > 0 and tried["exit 2, after parsing"] > 0


# ---------------------------------------------------------------- fuzzing search-space files

NUMBERS_ISH = st.one_of(
    st.integers(), st.integers(min_value=10**300, max_value=10**400), st.floats(), st.sampled_from([0, -1, 1e-4, 100.0, 1e39, "1e5", "3"]),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), NUMBERS_ISH, st.text(max_size=10),
    st.sampled_from([*DATASETS, *all_method_names(), "lam", "T", "distill_lam", "choice", "loguniform"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(sorted(KEYS)) | st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
# What a hand-edited number field holds: a number of any size, a list of them, a dataset -> number map.
NUMBER_FIELDS = st.one_of(
    NUMBERS_ISH, st.lists(NUMBERS_ISH, max_size=4), st.dictionaries(st.sampled_from([*DATASETS, "mnist"]), NUMBERS_ISH, max_size=3),
)


@st.composite
def space_documents(draw):
    """A YAML value: anything at all, a mapping of the real keys, or a real space file with a few mutations."""
    method = draw(st.sampled_from(all_method_names()))
    kind = draw(st.sampled_from(["anything", "keys", "mutated", "one number"]))
    if kind == "anything":
        return method, draw(VALUES)
    if kind == "keys":
        return method, draw(st.dictionaries(st.sampled_from(sorted(KEYS)) | st.text(max_size=8), VALUES, max_size=9))
    path = SPACES_DIR / f"{method}.yaml"
    doc = yaml.safe_load(path.read_text()) if path.exists() else {"method": method, "parameter": None}
    if kind == "one number":
        doc[draw(st.sampled_from(["values", "low", "high", "paper", "default"]))] = draw(NUMBER_FIELDS)
        return method, doc
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(KEYS | set(doc))) | st.text(max_size=6))
        if draw(st.booleans()) and key in doc:
            del doc[key]
        else:
            doc[key] = draw(NUMBER_FIELDS if key in ("values", "low", "high", "paper", "default") else VALUES)
    return method, doc


def check_space(space: SearchSpace, method: str) -> None:
    assert space.method == method
    for dataset in DATASETS:
        start = space.start(dataset)
        if space.distribution == "choice":
            assert start in space.values
        elif space.distribution == "loguniform":
            assert math.isfinite(start) and space.low <= start <= space.high


# Scalars and tags YAML parses but may fail to build, or builds into something odd.
TRICKY_YAML = ["!!float x", "!!int x", "2001-02-30", "2001-13-01", "9" * 5000, "-" + "9" * 400, "!!binary ???", "*nope",
               "&a [1, *a]", "{a: 1", "!!set {a, b}", "!!timestamp x", ".nan", "-.inf", "0x1F", "1e5", "1.0e+5", "~",
               "[.nan, .inf]", "!!str 3", '"\\x85"', "!!python/object/apply:os.system ['true']", "? [1]"]  # fmt: skip


def test_fuzzed_search_spaces_are_valid_or_one_user_error(tmp_path):
    tried: Counter[str] = Counter()
    tricky_lines = st.lists(st.tuples(st.sampled_from(sorted(KEYS)), st.sampled_from(TRICKY_YAML)), max_size=2)

    @settings(max_examples=SPACE_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(space_documents(), st.one_of(st.none(), st.integers(min_value=0, max_value=400)), st.text(max_size=40),
           tricky_lines, st.one_of(st.none(), st.binary(max_size=40)))
    def run(document, cut, noise, lines, raw_bytes):
        method, doc = document
        text = yaml.safe_dump(doc, allow_unicode=True)
        if cut is not None:  # a truncated or hand-mangled file
            text = text[:cut] + noise
        text += "".join(f"\n{key}: {value}" for key, value in lines)
        path = tmp_path / f"{method}.yaml"
        path.write_bytes(raw_bytes + text.encode() if raw_bytes is not None else text.encode())
        for source, read in (("object", lambda: parse_space(doc, method, "doc.yaml")), ("file", lambda: load_space(method, tmp_path))):
            try:
                space = read()
            except UserError as exc:
                message = str(exc)
                assert message and "\n" not in message, (source, text, message)
                tried[f"{source} refused"] += 1
            else:
                assert isinstance(space, SearchSpace)
                check_space(space, method)
                tried[f"{source} valid"] += 1

    run()
    print(f"\nhypothesis tried {tried['object valid'] + tried['object refused']} search-space documents: {dict(tried)}")
    assert tried["object valid"] > 0 and tried["object refused"] > 0 and tried["file refused"] > 0



# ---------------------------------------------------------------- accepted, but said: one line naming what was used

# (id, argv after the common ones, the one note line that must be printed). Each run trains one tiny epoch.
NOTE_TABLE = [
    ("train-size-above-the-split", ["--train-size", "99999999"],
     "note: --train-size 99999999 exceeds the 200 training samples of fmnist-s: all 200 are used"),
    ("eval-size-above-the-test-split", ["--eval-size", "5000"],
     "note: --eval-size 5000 exceeds the 400 test samples of fmnist-s: all 400 are used"),
    ("fmnist-system-copy-for-an-empty-data-dir", ["--data-dir", "{empty}"],
     "note: no Fashion-MNIST under data dir {empty}: using the system copy in {fmnist}/fashion-mnist"),
    ("fmnist-system-copy-for-a-missing-data-dir", ["--data-dir", "{empty}/nothing"],
     "note: no Fashion-MNIST under data dir {empty}/nothing: using the system copy in {fmnist}/fashion-mnist"),
    ("method-without-a-file-in-search-spaces", ["--search-spaces", "{spaces}"],
     "note: no ad.yaml in {spaces}: ad uses the standard search space"),
]


@pytest.mark.parametrize("extra, note", [row[1:] for row in NOTE_TABLE], ids=[row[0] for row in NOTE_TABLE])
def test_substitutions_are_said_in_one_line(fmnist_dir, tmp_path, extra, note, capsys, monkeypatch):
    """Accepted instead of refused: the run goes on with what exists, and says what it used."""
    monkeypatch.setattr(fmnist, "SYSTEM_DIRS", (fmnist_dir / "fashion-mnist",))  # "the system copy"
    (tmp_path / "empty").mkdir()
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "mfd.yaml").write_text((SPACES_DIR / "mfd.yaml").read_text())
    places = {"empty": tmp_path / "empty", "spaces": tmp_path / "spaces", "fmnist": fmnist_dir}
    argv = ["train", "--method", "ad", "--lam", "1", "--dataset", "fmnist-s", "--data-dir", str(fmnist_dir), *TINY,
            "--results-dir", str(tmp_path / "results"), *[a.format(**places) for a in extra]]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert note.format(**places) in out.splitlines(), out
    assert f"data from {fmnist_dir / 'fashion-mnist'}" in out  # train names the data it used


# ---------------------------------------------------------------- what fairtune writes, and where


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    """On a shared results folder, others read best.json, tables and teachers as the umask allows."""
    import os

    from fairtune import io

    previous = os.umask(umask)
    try:
        io.write_json(tmp_path / "best.json", {"a": 1})
        io.write_text(tmp_path / "table.md", "| a |\n")
        io.save_torch(tmp_path / "seed0.pt", {"w": 1})
    finally:
        os.umask(previous)
    for name in ("best.json", "table.md", "seed0.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_train_keeps_runs_with_other_settings_apart(fmnist_dir, tmp_path, capsys, monkeypatch):
    """train/<method>/<hyperparameters>-<digest of the other settings>/seed<k>.json; the same run again
    is refused without --force, so no run overwrites another."""
    monkeypatch.setattr(fmnist, "SYSTEM_DIRS", ())
    results = tmp_path / "results"

    def train(*extra):
        code = main(["train", "--method", "ad", "--dataset", "fmnist-s", "--data-dir", str(fmnist_dir), *TINY,
                     "--results-dir", str(results), *extra])
        return code, *capsys.readouterr()

    assert train("--lam", "1")[0] == 0
    assert train("--lam", "2")[0] == 0
    assert train("--lam", "1", "--train-size", "100", "--batch-size", "20")[0] == 0
    runs = sorted(p.relative_to(results / "fmnist-s" / "train" / "ad") for p in results.rglob("seed0.json"))
    assert [p.parts[0].split("-")[0] for p in runs] == ["lam1", "lam1", "lam2"] and len({p.parent for p in runs}) == 3, runs
    before = snapshot(results)
    code, _, err = train("--lam", "2")
    assert_one_line_error(code, err, "already holds this run", "pass --force")
    assert snapshot(results) == before
    code, out, err = train("--lam", "2", "--force")
    assert code == 0, err
    assert len(list(results.rglob("seed0.json"))) == 3


def test_printed_tensorboard_command_quotes_paths_with_spaces(tmp_path, capsys):
    import shlex

    results = tmp_path / "my results"
    for seed in (0, 1):
        write_final_run(results, "ss", seed)
    assert main(["report", "--dataset", "fmnist-s", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if "tensorboard --logdir" in line]
    assert shlex.split(line.split(": ", 1)[1]) == ["tensorboard", "--logdir", str(results / "fmnist-s")]


# ---------------------------------------------------------------- standard output closed or full


def _list_with_stdout(stdout, tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "fairtune", "list", "--data-dir", str(tmp_path)], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, timeout=120)


def test_list_into_a_closed_pipe_ends_quietly(tmp_path):
    """`fairtune list | head -3`: the reader left; no traceback, the exit status of a tool killed by SIGPIPE."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = _list_with_stdout(write_end, tmp_path)
    finally:
        os.close(write_end)
    assert done.stderr == "" and done.returncode == 141, (done.returncode, done.stderr)


def test_list_into_a_full_device_is_one_line(tmp_path):
    """`fairtune list > /dev/full`: one line saying the write failed, exit 1 (the machine's fault, as a full disk)."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        done = _list_with_stdout(full, tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("fairtune: error: a write failed (No space left on device); free space"), lines
