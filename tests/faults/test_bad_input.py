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
    return {"root": root, "fmnist": fmnist_dir, "cifar": root / "cifar_truncated", "utk": root / "utk_corrupt",
            "celeba": root / "celeba_corrupt", "spaces_bad": spaces, "results": results, "cwd": root / "cwd",
            "nowhere": root / "nowhere"}


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
    argv = [a.format(port=port, **places) for a in argv]
    if argv[0] != "list":
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

