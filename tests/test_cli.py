"""The command line as a user meets it: exit codes, one-line errors, files written."""

import json
import subprocess
import sys

import pytest
import torch

from fairtune.cli import main
from fairtune.data import skewed
from fairtune.methods import all_method_names
from tests.fixtures.cifar import write_cifar10
from tests.fixtures.idx import write_fashion_mnist
from tests.helpers import assert_one_line_error

SMALL = ["--epochs", "1", "--batch-size", "40", "--eval-size", "40"]


@pytest.fixture()
def fmnist_dir(tmp_path, monkeypatch):
    write_fashion_mnist(tmp_path / "data", n_train_per_class=30, n_test_per_class=4)
    monkeypatch.setattr(skewed, "VAL_PER_CLASS", 4)
    return tmp_path / "data"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_every_method_and_the_data_status(tmp_path, capsys):
    write_cifar10(tmp_path, n_train_per_class=2, n_test_per_class=1)
    code, out, _ = run(capsys, "list", "--data-dir", tmp_path)
    assert code == 0
    for name in all_method_names():
        assert f"  {name} " in out
    datasets = out[out.index("Datasets") :]
    cifar_line = datasets[datasets.index("  cifar10s") :].splitlines()[1]
    assert "found at" in cifar_line and "cifar-10-batches-py" in cifar_line
    utk_line = datasets[datasets.index("  utkface") :].splitlines()[1]
    assert "MISSING" in utk_line and "UTKFace" in utk_line
    assert "hkd" in out and "T in {1,2,3,4,5,10,20}" in out


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["train", "--method", "mfdd", "--dataset", "fmnist-s"], ["unknown method 'mfdd'", "valid:"]),
        (["train", "--method", "ss+", "--dataset", "fmnist-s"], ["unknown method 'ss+'"]),
        (["train", "--method", "ad+ad", "--dataset", "fmnist-s"], ["unknown method 'ad+ad'"]),
        (["train", "--method", "mfd+hkd+x", "--dataset", "fmnist-s"], ["unknown method"]),
        (["train", "--method", "hkd", "--dataset", "cifar100"], ["--dataset", "cifar100"]),
        (["train", "--method", "hkd", "--dataset", "fmnist-s", "--lam", "1"], ["hkd does not use --lam", "--T"]),
        (["train", "--method", "mfd", "--dataset", "fmnist-s", "--lam", "-1"], ["--lam -1.0 is out of range"]),
        (["train", "--method", "hkd", "--dataset", "fmnist-s", "--T", "0"], ["--T 0.0 is out of range"]),
        (["train", "--method", "scratch", "--dataset", "fmnist-s", "--epochs", "0"], ["--epochs", "positive"]),
        (["train", "--method", "scratch", "--dataset", "fmnist-s", "--skew", "1.5"], ["--skew"]),
        (["train", "--method", "ad+hkd", "--dataset", "fmnist-s"], ["best hkd config", "--T"]),
        (["teacher", "--dataset", "fmnist-s", "--bogus"], ["unrecognized arguments: --bogus"]),
        (["frobnicate"], ["invalid choice"]),
        (["search", "--method", "mfd", "--dataset", "fmnist-s", "--objective", "acc,f1"], ["--objective", "unknown metric 'f1'", "acc, deo_a, deo_m"]),
        (["search", "--method", "mfd", "--dataset", "fmnist-s", "--objective", "deo_a,deo_a"], ["--objective", "names deo_a twice"]),
        (["search", "--method", "mfd", "--dataset", "fmnist-s", "--objective", "acc,deo_a,deo_m"], ["--objective", "names 3 metrics", "exactly two"]),
        (["search", "--method", "mfd", "--dataset", "fmnist-s", "--objective", "f1"], ["--objective", "invalid choice: 'f1'", "acc,deo_a"]),
        (["train", "--method", "scratch", "--dataset", "fmnist-s", "--objective", "acc,"], ["--objective", "unknown metric ''"]),
        (["final", "--dataset", "fmnist-s", "--select", "pareto"], ["--select 'pareto': unknown rule", "utopia"]),
        (["final", "--dataset", "fmnist-s", "--select", "constrained:acc<=3"], ["cannot bound 'acc'"]),
        (["final", "--dataset", "fmnist-s", "--select", "constrained:deo_a<=-1"], ["the bound must be a number"]),
    ],
)
def test_user_mistakes_exit_2_with_one_line(argv, fragments, tmp_path, capsys):
    code, _, err = run(capsys, *argv, "--results-dir", tmp_path) if argv[0] != "frobnicate" else run(capsys, *argv)
    assert_one_line_error(code, err, *fragments)


def test_missing_data_names_the_path(tmp_path, capsys):
    code, _, err = run(capsys, "teacher", "--dataset", "cifar10s", "--data-dir", tmp_path / "nowhere", "--results-dir", tmp_path)
    assert_one_line_error(code, err, str(tmp_path / "nowhere"), "cifar-10-batches-py")


def test_truncated_cifar_pickle_is_one_line(tmp_path, capsys):
    folder = write_cifar10(tmp_path / "data", n_train_per_class=2, n_test_per_class=1)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    code, _, err = run(capsys, "teacher", "--dataset", "cifar10s", "--data-dir", tmp_path / "data", "--results-dir", tmp_path)
    assert_one_line_error(code, err, "data_batch_3")


def test_missing_teacher_is_one_line_naming_the_command(fmnist_dir, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--method", "mfd", "--dataset", "fmnist-s", "--data-dir", fmnist_dir,
                       "--results-dir", tmp_path / "res", *SMALL)
    assert_one_line_error(code, err, "no teacher", "fairtune teacher --dataset fmnist-s --seeds 0")


def test_teacher_then_student_end_to_end(fmnist_dir, tmp_path, capsys):
    results = tmp_path / "res"
    common = ["--dataset", "fmnist-s", "--data-dir", fmnist_dir, "--results-dir", results, *SMALL]
    code, out, err = run(capsys, "teacher", *common, "--seeds", "0")
    assert code == 0, err
    weights = results / "fmnist-s" / "teachers" / "seed0.pt"
    stored = torch.load(weights, weights_only=True)
    assert stored["identity"]["data"]["dataset"] == "fmnist-s" and stored["epochs"] == 1
    assert "test: accuracy" in out

    code, out, err = run(capsys, "teacher", *common, "--seeds", "0")
    assert code == 0 and "already" in out  # cached, not retrained
    assert torch.load(weights, weights_only=True)["state_dict"].keys() == stored["state_dict"].keys()

    code, out, err = run(capsys, "train", "--method", "mfd", "--lam", "3", *common)
    assert code == 0, err
    assert "epoch   1/1" in out and "mfd" in out
    [run_file] = (results / "fmnist-s" / "train" / "mfd").glob("lam3-*/seed0.json")  # one folder per setting
    record = json.loads(run_file.read_text())
    assert record["hyperparameters"] == {"lam": 3.0}
    assert record["epochs_run"] == 1 and len(record["history"]) == 1
    test = record["test"]
    assert sum(map(sum, test["cell_counts"])) == 40
    gaps = [max(v for v in col if v is not None) - min(v for v in col if v is not None) for col in zip(*test["acc_matrix"])]
    assert test["deo_m"] == pytest.approx(max(gaps)) and test["deo_a"] == pytest.approx(sum(gaps) / len(gaps))

    # Another data setting must not reuse this teacher.
    code, _, err = run(capsys, "train", "--method", "hkd", "--T", "3", *common, "--train-size", "200")
    assert_one_line_error(code, err, "other settings", "train_size", "--force")


def test_malicious_teacher_file_is_refused(fmnist_dir, tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    weights = tmp_path / "res" / "fmnist-s" / "teachers" / "seed0.pt"
    weights.parent.mkdir(parents=True)
    torch.save({"state_dict": Evil(), "identity": {}}, weights)
    code, out, err = run(capsys, "train", "--method", "hkd", "--T", "2", "--dataset", "fmnist-s", "--data-dir", fmnist_dir,
                         "--results-dir", tmp_path / "res", *SMALL)
    assert "owned" not in out
    assert_one_line_error(code, err, "cannot load teacher", "--force")


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fairtune", "train", "--method", "nope", "--dataset", "fmnist-s"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
