"""`fairtune final` under faults: a killed driver, a failing disk write, a run that goes NaN."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fairtune import io
from fairtune.cli import main
from fairtune.tune.final import final_path

REPO = Path(__file__).resolve().parents[2]
SIZES = ["--train-size", "300", "--eval-size", "100", "--batch-size", "40", "--epochs", "1"]


def final_files(results: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (results / "fmnist-s" / "final").glob("*/seed*.json")}


def assert_whole_json(results: Path) -> None:
    """Every result file parses; no temporary file of an atomic write is left where it was headed."""
    for path in (results / "fmnist-s").rglob("*"):
        if path.suffix == ".json":
            json.loads(path.read_text())
    leftovers = [p for p in (results / "fmnist-s").rglob(".*.tmp")]
    assert not leftovers, leftovers


@pytest.mark.slow
def test_killed_final_reruns_only_the_missing_seeds(fmnist_dir, tmp_path):
    argv = [
        sys.executable, "-m", "fairtune", "final", "--method", "ss", "--dataset", "fmnist-s", "--data-dir", str(fmnist_dir),
        "--results-dir", str(tmp_path), *SIZES, "--seeds", "0", "1", "2", "3", "--gpus-per-trial", "0",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while not final_files(tmp_path) and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.2)
    assert final_files(tmp_path), driver.communicate()[0].decode()[-2000:]
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-way
    driver.wait()
    subprocess.run(["pkill", "-9", "-f", f"{tmp_path}"], check=False)

    done = final_files(tmp_path)
    assert 1 <= len(done) < 4
    assert_whole_json(tmp_path)
    rerun = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"ss ({4 - len(done)} to run)" in rerun.stdout
    after = final_files(tmp_path)
    assert sorted(p.name for p in after) == [f"seed{s}.json" for s in range(4)]
    assert {p: after[p] for p in done} == done  # seeds done before the kill are not rerun
    assert_whole_json(tmp_path)
    assert (tmp_path / "fmnist-s" / "table.md").exists()


def test_a_failing_disk_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "seed0.json"
    io.write_json(path, {"accuracy": 1.0})

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full_disk)
    with pytest.raises(OSError):
        io.write_json(path, {"accuracy": 2.0})
    assert json.loads(path.read_text()) == {"accuracy": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed0.json"]


@pytest.mark.slow
def test_final_contains_disk_and_nan_failures_to_their_runs(ray_session, fmnist_dir, tmp_path, capsys, monkeypatch):
    """One seed's record cannot be written (disk full), one method goes NaN: the other runs are written,
    the table is built from them, the exit code is 1 and each failure is named on one line."""
    io.write_json(
        tmp_path / "fmnist-s" / "search" / "mmd" / "best.json",
        {"method": "mmd", "hyperparameters": {"lam": 1e39}, "val": {"accuracy": 0.0, "deo_a": 0.0}},
    )
    real_write = io.write_json

    def failing_write(path, data):
        if Path(path).name == "seed1.json" and Path(path).parent.name == "ss":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr("fairtune.tune.final.io.write_json", failing_write)
    common = ["--dataset", "fmnist-s", "--data-dir", str(fmnist_dir), "--results-dir", str(tmp_path), *SIZES]
    code = main(["final", *common, "--method", "ss", "mmd", "--seeds", "0", "1", "--gpus-per-trial", "0"])
    out, err = capsys.readouterr()
    assert code == 1, err
    assert final_path(tmp_path, "fmnist-s", "ss", 0).exists()
    assert not final_path(tmp_path, "fmnist-s", "ss", 1).exists()
    assert not list((tmp_path / "fmnist-s" / "final").glob("mmd/*.json"))
    failures = [line for line in err.splitlines() if line.startswith("  ")]
    assert len(failures) == 3, err
    assert any("ss seed 1" in line and "No space left" in line for line in failures)
    assert sum("mmd seed" in line and "non-finite" in line.lower() for line in failures) == 2
    assert "Traceback" not in err + out
    assert_whole_json(tmp_path)
    table = pd.read_csv(tmp_path / "fmnist-s" / "table.csv").set_index("method")
    assert list(table.index) == ["ss"] and table.loc["ss", "seeds"] == 1  # the one seed written
    record = json.loads(final_path(tmp_path, "fmnist-s", "ss", 0).read_text())
    assert table.loc["ss", "accuracy_mean"] == pytest.approx(record["test"]["accuracy"])
    assert f"{record['test']['accuracy']:.2f}" in (tmp_path / "fmnist-s" / "table.md").read_text()


def test_a_report_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    io.write_json(
        final_path(tmp_path, "fmnist-s", "ss", 0),
        {"seed": 0, "hyperparameters": {}, "test": {"accuracy": 50.0, "deo_a": 5.0, "deo_m": 9.0}},
    )
    real = io._atomic

    def full_disk(path, write):
        if Path(path).suffix == ".png":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, write)

    monkeypatch.setattr(io, "_atomic", full_disk)
    assert main(["report", "--dataset", "fmnist-s", "--results-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "pareto.png" in err
    assert "Seeds" in (tmp_path / "fmnist-s" / "table.md").read_text()  # written before the failing plot
