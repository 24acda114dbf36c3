"""Untrusted files and names: pickles that smuggle code are refused, YAML is read safely, and a method or
dataset name never becomes a path outside the results folder. (That a local Ray listens on loopback
only is tested in tests/test_ray_local.py.)"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import fairtune
from fairtune.cli import main
from fairtune.data import DataOptions, fmnist
from fairtune.engine import TrainConfig
from fairtune.layout import SearchDir
from fairtune.teachers import teacher_paths
from fairtune.tune import trainable
from tests.helpers import assert_one_line_error, snapshot

PACKAGE = Path(fairtune.__file__).resolve().parent
SMALL = ["--train-size", "200", "--eval-size", "200", "--epochs", "1", "--batch-size", "40"]


class Payload:
    """Unpickling this opens (so creates) ``marker``: any code an unrestricted unpickler would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_malicious(path: Path, marker: Path, wrap) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wrap(Payload(marker)), path)
    # The payload is live: an unrestricted load runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("command", ["teacher", "train"])
def test_a_malicious_teacher_file_is_refused_and_runs_nothing(command, fmnist_dir, tmp_path, capsys):
    results, marker = tmp_path / "results", tmp_path / "pwned"
    weights = teacher_paths(results, "fmnist-s", 0).weights
    write_malicious(weights, marker, lambda evil: {"state_dict": {"head.weight": evil}, "identity": {}})
    argv = {"teacher": ["teacher", "--seeds", "0"], "train": ["train", "--method", "hkd", "--T", "2"]}[command]
    before = snapshot(results)
    code = main([*argv, "--dataset", "fmnist-s", "--data-dir", str(fmnist_dir), "--results-dir", str(results), *SMALL])
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, "cannot load teacher", "UnpicklingError", "--force")
    assert not marker.exists()
    assert snapshot(results) == before


def test_a_malicious_trial_state_is_refused_and_runs_nothing(fmnist_dir, tmp_path, monkeypatch):
    """The trainable's restore path (a retried or resumed trial), driven without Ray: Tune's session is faked."""
    marker = tmp_path / "pwned"
    write_malicious(SearchDir(tmp_path).state_file("t000", 1), marker, lambda evil: {"epoch": 1, "student": evil})
    session = SimpleNamespace(report=lambda *args, **kwargs: pytest.fail("the trial ran an epoch from a refused state"))
    monkeypatch.setattr(trainable, "tune", session)
    spec = trainable.TrialSpec(
        base=TrainConfig("ss", epochs=1, batch_size=40), data=DataOptions("fmnist-s", train_size=200, eval_size=200),
        data_dir=str(fmnist_dir), experiment_dir=str(tmp_path), cpus=1, device="cpu",
    )
    threads = torch.get_num_threads()
    try:
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            trainable.run_trial({"fairtune_trial": "t000"}, spec)
    finally:
        torch.set_num_threads(threads)  # run_trial sets the trial's thread count on this process
    assert not marker.exists()


def test_a_search_space_with_a_python_tag_is_refused_and_runs_nothing(fmnist_dir, tmp_path, capsys):
    marker, spaces = tmp_path / "pwned", tmp_path / "spaces"
    spaces.mkdir()
    payload = f"!!python/object/apply:os.system ['touch {marker}']"
    (spaces / "mfd.yaml").write_text(f"method: mfd\nparameter: lam\ndefault: {payload}\n")
    yaml.unsafe_load(payload)  # the payload is live
    assert marker.exists()
    marker.unlink()
    code = main(["train", "--method", "mfd", "--dataset", "fmnist-s", "--data-dir", str(fmnist_dir),
                 "--results-dir", str(tmp_path / "results"), "--search-spaces", str(spaces), *SMALL])
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, "mfd.yaml: not valid YAML at line 3")
    assert not marker.exists()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--method", "../../x", "--dataset", "fmnist-s"], "unknown method '../../x'"),
        (["search", "--method", "../../../x", "--dataset", "fmnist-s", "--gpus-per-trial", "0"], "unknown method"),
        (["search", "--method", "ss+../../hkd", "--dataset", "fmnist-s", "--gpus-per-trial", "0"], "unknown method"),
        (["search", "--method", "/tmp/x", "--dataset", "fmnist-s", "--gpus-per-trial", "0"], "unknown method '/tmp/x'"),
        (["train", "--method", "ss", "--dataset", "../x"], "invalid choice: '../x'"),
        (["teacher", "--dataset", "../../fmnist-s"], "invalid choice"),
        (["search", "--method", "mfd", "--dataset", "fmnist-s/../../x", "--gpus-per-trial", "0"], "invalid choice"),
    ],
)
def test_names_never_become_paths_outside_the_results_folder(argv, fragment, fmnist_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fmnist, "SYSTEM_DIRS", ())
    work = tmp_path / "a" / "b" / "work"  # ../../x from here or from results/ stays inside tmp_path
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code = main([*argv, "--data-dir", str(fmnist_dir), "--results-dir", str(work / "results"), *SMALL])
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, fragment)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # not even an empty folder


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            yield node, f"{node.func.value.id}.{node.func.attr}"


def test_every_load_in_the_package_is_a_safe_one():
    """Static check of fairtune/: torch.load always with weights_only=True, YAML only through safe_load,
    no unrestricted unpickling (the CIFAR reader's Unpickler subclass must restrict find_class)."""
    torch_loads, problems = 0, []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [(getattr(node, "module", None) or "", alias.name, alias.asname) for alias in node.names]
                for module, name, alias in names:
                    if (module, name) in {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("yaml", "load"), ("yaml", "unsafe_load")}:
                        problems.append(f"{where}:{node.lineno} imports {module}.{name} directly")
                    if name in ("torch", "pickle", "yaml") and alias:
                        problems.append(f"{where}:{node.lineno} renames {name} (the check below looks for it by name)")
                    if name in ("cloudpickle", "dill", "joblib", "marshal", "shelve"):
                        problems.append(f"{where}:{node.lineno} imports {name}")
            if isinstance(node, ast.ClassDef) and any(ast.unparse(base) == "pickle.Unpickler" for base in node.bases):
                if not any(isinstance(item, ast.FunctionDef) and item.name == "find_class" for item in node.body):
                    problems.append(f"{where}:{node.lineno} subclasses pickle.Unpickler without restricting find_class")
        for node, name in _calls(tree):
            if name == "torch.load":
                torch_loads += 1
                safe = [k for k in node.keywords if k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True]
                if not safe:
                    problems.append(f"{where}:{node.lineno} calls torch.load without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
                problems.append(f"{where}:{node.lineno} calls {name}")
            elif name in ("np.load", "numpy.load") and any(k.arg == "allow_pickle" for k in node.keywords):
                problems.append(f"{where}:{node.lineno} calls {name} with allow_pickle")
    assert not problems, problems
    assert torch_loads >= 1  # the check sees fairtune.io.load_torch
