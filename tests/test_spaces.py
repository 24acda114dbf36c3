import csv
from pathlib import Path

import pytest

from fairtune.errors import UserError
from fairtune.methods import PAPER_ORDER, all_method_names, get_method
from fairtune.hyperparameters import HYPERPARAMETERS
from fairtune.spaces import SPACES_DIR, load_space

REFERENCE = Path(__file__).resolve().parents[1] / "fairtune" / "reference" / "paper_hyperparameters.csv"


def test_every_method_has_a_valid_space_matching_its_registry_entry():
    for name in all_method_names():
        space = load_space(name)
        method = get_method(name)
        assert space.parameter == method.searched
        assert space.fixed == dict(method.fixed_from)
        if space.parameter is not None:  # the standard space of its row of the hyperparameter table
            row = HYPERPARAMETERS[space.parameter]
            assert space.distribution == row.distribution
            assert space.values == tuple(map(float, row.values)) and (space.low, space.high) == (row.low, row.high)
    assert {p.stem for p in SPACES_DIR.glob("*.yaml")} >= set(PAPER_ORDER)


def test_paper_values_are_the_starting_points():
    for row in csv.DictReader(REFERENCE.open()):
        space = load_space(row["method"])
        value = row["temperature"] if space.parameter == "T" else row["lambda"]
        assert space.start(row["dataset"]) == pytest.approx(float(value)), row


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("method: mfd\nparameter: lam\ndistribution: loguniform\nlow: 1.0e-4\nhigh: 100.0\ndefault: 3.0\nsteps: 4\n", "key 'steps' is not known"),
        ("method: mfd\nparameter: T\ndistribution: choice\nvalues: [1, 2]\ndefault: 1\n", "key 'parameter'"),
        ("method: mfd\nparameter: lam\ndistribution: loguniform\nlow: 10.0\nhigh: 1.0\ndefault: 3.0\n", "key 'low' must be below high"),
        ("method: mfd\nparameter: lam\ndistribution: loguniform\nlow: -1.0\nhigh: 1.0\ndefault: 0.5\n", "key 'low' must be a positive"),
        ("method: mfd\nparameter: lam\ndistribution: loguniform\nlow: 1e-4\nhigh: 1.0\ndefault: 0.5\n", "write 1.0e+5"),
        ("method: mfd\nparameter: lam\ndistribution: loguniform\nlow: 1.0e-4\nhigh: 1.0\ndefault: 3.0\n", "key 'default' value 3.0 lies outside"),
        ("method: mfd\nparameter: lam\ndistribution: gaussian\ndefault: 3.0\n", "key 'distribution'"),
        ("method: mfd\nparameter: lam\ndistribution: loguniform\nlow: 1.0e-4\nhigh: 100.0\ndefault: 3.0\npaper: {mnist: 3}\n", "key 'paper.mnist' names no dataset"),
        ("method: hkd\nparameter: T\n", "key 'method' is 'hkd'"),
        ("method: mfd\nparameter: [lam\n", "not valid YAML at line"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_malformed_space_files_name_file_and_key(tmp_path, text, fragment):
    (tmp_path / "mfd.yaml").write_text(text)
    with pytest.raises(UserError) as info:
        load_space("mfd", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "mfd.yaml") in message and fragment in message, message
    assert "\n" not in message


def test_a_method_name_never_becomes_a_path_outside_the_folder(tmp_path):
    with pytest.raises(UserError, match="unknown method"):
        load_space("../../etc/passwd", tmp_path)


def test_a_folder_without_the_method_file_gives_the_shipped_space(tmp_path):
    """The CLI's note says such a method "uses the standard search space": that is the repo's file,
    paper values included, not a bare default."""
    (tmp_path / "mfd.yaml").write_text((SPACES_DIR / "mfd.yaml").read_text())
    assert load_space("hkd", tmp_path) == load_space("hkd")
    assert load_space("hkd", tmp_path).start("cifar10s") == 1
    assert load_space("ad+hkd", tmp_path) == load_space("ad+hkd")


def test_the_wheel_ships_the_search_spaces_and_an_installed_copy_reads_them(tmp_path):
    """search_spaces/ stays at the top of the repository; pyproject maps it into the package."""
    import subprocess
    import sys
    import zipfile

    import shutil

    repo, source = SPACES_DIR.parent, tmp_path / "source"  # a copy: building writes build/ beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "fairtune", "search_spaces"):
        (shutil.copytree if (repo / name).is_dir() else shutil.copy)(repo / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, source],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("fairtune-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("fairtune/search_spaces/")}
    assert shipped == {f"fairtune/search_spaces/{p.name}" for p in SPACES_DIR.glob("*.yaml")}
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = "import fairtune.spaces as s; print(s.SPACES_DIR); print(s.load_space('mfd').paper['cifar10s'])"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out == [str(tmp_path / "site" / "fairtune" / "search_spaces"), "3.0"]


def test_a_space_is_described_as_searched_not_as_the_tables_standard(tmp_path):
    (tmp_path / "mfd.yaml").write_text("method: mfd\nparameter: lam\ndistribution: loguniform\nlow: 0.01\nhigh: 10\ndefault: 1\n")
    assert load_space("mfd", tmp_path).text() == "λ log-uniform [0.01, 10]"
    assert load_space("mfd").text() == "λ log-uniform [1e-4, 1e2]"  # the standard range, in the table's words
    (tmp_path / "hkd.yaml").write_text("method: hkd\nparameter: T\ndistribution: choice\nvalues: [2, 4]\ndefault: 4\n")
    assert load_space("hkd", tmp_path).text() == "T in {2,4}" and load_space("scratch").text() == "nothing to search"
