"""Tables and plots from results on disk: values recomputed from the per-seed files, paper columns
from the reference CSV, LaTeX structure, identical rebuilds, valid PNGs."""

import csv
import json
import re
import shutil
import subprocess
import statistics
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fairtune import io
from fairtune.cli import main
from fairtune.errors import UserError
from fairtune.report import load_final_runs, pareto_front, summarize, write_report

METHODS = {"mfd": {"lam": 3.0}, "scratch": {}, "mmd": {"lam": 0.05}, "hkd": {"T": 4.0}, "ad+hkd": {"lam": 0.01, "T": 4.0}}


def seed_record(method: str, seed: int, rng: np.random.Generator) -> dict:
    acc = rng.uniform(60, 90, size=(2, 10)).round(2)
    gaps = np.abs(acc[0] - acc[1])
    return {
        "method": method,
        "dataset": "cifar10s",
        "seed": seed,
        "hyperparameters": METHODS[method],
        "test": {"accuracy": float(acc.mean()), "deo_a": float(gaps.mean()), "deo_m": float(gaps.max()), "acc_matrix": acc.tolist()},
    }


@pytest.fixture
def results(tmp_path):
    rng = np.random.default_rng(0)
    for method in METHODS:
        for seed in range(3 if method != "mmd" else 1):
            io.write_json(tmp_path / "cifar10s" / "final" / method / f"seed{seed}.json", seed_record(method, seed, rng))
    return tmp_path


def read_seed_files(results: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for path in (results / "cifar10s" / "final").glob("*/seed*.json"):
        runs.setdefault(path.parent.name, []).append(json.loads(path.read_text())["test"])
    return runs


def test_table_values_are_the_seed_means_and_sample_stds(results):
    table, files = write_report(results, "cifar10s")
    written = pd.read_csv(files.csv).set_index("method")
    assert list(written.index) == ["scratch", "hkd", "ad+hkd", "mfd", "mmd"]  # paper order, extras last
    for method, tests in read_seed_files(results).items():
        row = written.loc[method]
        assert row["seeds"] == len(tests)
        for metric in ("accuracy", "deo_a", "deo_m"):
            values = [t[metric] for t in tests]
            assert row[f"{metric}_mean"] == pytest.approx(statistics.mean(values), abs=1e-4)
            if len(values) > 1:
                assert row[f"{metric}_std"] == pytest.approx(statistics.stdev(values), abs=1e-4)
            else:
                assert pd.isna(row[f"{metric}_std"])
    assert written.loc["ad+hkd", "hyperparameters"] == "λ=0.01, T=4"  # the searched value first
    markdown = files.markdown.read_text()
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["Teacher", "HKD", "AD+HKD", "MFD", "MMD"]
    mfd = statistics.mean(t["accuracy"] for t in read_seed_files(results)["mfd"])
    assert f"{mfd:.2f} ± " in markdown


def test_cifar10s_table_carries_the_papers_numbers(results):
    table, files = write_report(results, "cifar10s")
    with resources.files("fairtune.reference").joinpath("paper_results.csv").open() as handle:
        paper = {(r["dataset"], r["method"]): r for r in csv.DictReader(handle)}
    written = pd.read_csv(files.csv).set_index("method")
    for method, paper_name in (("scratch", "teacher"), ("hkd", "hkd"), ("ad+hkd", "ad+hkd"), ("mfd", "mfd")):
        ref = paper[("cifar10s", paper_name)]
        for metric in ("accuracy", "deo_a", "deo_m"):
            assert written.loc[method, f"paper_{metric}_mean"] == pytest.approx(float(ref[metric]))
            assert written.loc[method, f"paper_{metric}_std"] == pytest.approx(float(ref[f"{metric}_std"]))
    assert pd.isna(written.loc["mmd", "paper_accuracy_mean"])  # not in the paper
    ref = paper[("cifar10s", "mfd")]
    assert f"{float(ref['accuracy']):.2f} ± {float(ref['accuracy_std']):.2f}" in files.markdown.read_text()


def test_fmnist_table_has_no_paper_columns(tmp_path):
    rng = np.random.default_rng(1)
    record = seed_record("mfd", 0, rng) | {"dataset": "fmnist-s"}
    io.write_json(tmp_path / "fmnist-s" / "final" / "mfd" / "seed0.json", record)
    table, files = write_report(tmp_path, "fmnist-s")
    assert not any(c.startswith("paper_") for c in table.columns)
    assert "Paper" not in files.markdown.read_text()


def test_latex_is_a_booktabs_body_with_the_best_in_bold(results):
    table, files = write_report(results, "cifar10s")
    tex = files.latex.read_text()
    assert tex.startswith("\\begin{tabular}") and tex.rstrip().endswith("\\end{tabular}")
    for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
        assert tex.count(rule) == 1
    assert tex.count("{") == tex.count("}")
    body = tex.split("\\midrule")[1].split("\\bottomrule")[0].strip().splitlines()
    header = tex.split("\\toprule")[1].split("\\midrule")[0].strip()
    columns = header.count("&") + 1
    assert len(body) == len(table)
    for line in body:
        assert line.rstrip().endswith("\\\\") and line.count("&") == columns - 1
        assert line.count("$") % 2 == 0
    # Bold: the best mean of each metric (max accuracy, min DEO), and nothing else.
    bold = re.findall(r"\\mathbf\{([0-9.]+)", tex)
    expected = [
        f"{table['accuracy_mean'].max():.2f}", f"{table['deo_a_mean'].min():.2f}", f"{table['deo_m_mean'].min():.2f}"
    ]
    assert sorted(bold) == sorted(expected)
    assert "AD{+}HKD" in tex and "$\\lambda$=0.01" in tex


def test_report_rebuilds_identical_tables_and_valid_pngs(results, capsys):
    _, files = write_report(results, "cifar10s")
    first = {p: p.read_bytes() for p in (files.markdown, files.csv, files.latex)}
    assert main(["report", "--dataset", "cifar10s", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert {p: p.read_bytes() for p in first} == first
    assert first[files.markdown].decode().strip() in out  # the table is printed too
    import matplotlib.image

    for png in (files.pareto, files.bars):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(png).shape
        assert height > 200 and width > 300


def test_pareto_plot_uses_search_trials(results):
    trials = pd.DataFrame({"trial_id": ["a", "b"], "final_accuracy": [80.0, 70.0], "final_deo_a": [10.0, 5.0], "status": "COMPLETED"})
    (results / "cifar10s" / "search" / "mfd").mkdir(parents=True)
    trials.to_csv(results / "cifar10s" / "search" / "mfd" / "trials.csv", index=False)
    io.write_json(results / "cifar10s" / "search" / "mfd" / "best.json", {"val": {"accuracy": 80.0, "deo_a": 10.0}})
    _, files = write_report(results, "cifar10s")
    assert files.pareto.stat().st_size > 10_000


def test_report_without_final_results_is_one_line(tmp_path, capsys):
    assert main(["report", "--dataset", "fmnist-s", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fairtune final --dataset fmnist-s" in err


def test_mixed_hyperparameters_across_seeds_are_refused(results):
    path = results / "cifar10s" / "final" / "mfd" / "seed1.json"
    record = json.loads(path.read_text())
    io.write_json(path, record | {"hyperparameters": {"lam": 9.0}})
    with pytest.raises(UserError, match="mfd"):
        summarize(load_final_runs(results, "cifar10s"), "cifar10s")


def brute_force_front(accuracy, deo):
    n = len(accuracy)
    return np.array([
        not any((accuracy[j] >= accuracy[i] and deo[j] <= deo[i]) and (accuracy[j] > accuracy[i] or deo[j] < deo[i]) for j in range(n))
        for i in range(n)
    ])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=30, unique=True))
def test_pareto_front_matches_pairwise_dominance(points):
    accuracy = np.array([p[0] for p in points], dtype=float)
    deo = np.array([p[1] for p in points], dtype=float)
    assert (pareto_front(accuracy, deo) == brute_force_front(accuracy, deo)).all()


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed (Debian: texlive-latex-recommended)")
def test_latex_compiles_inside_a_table(results, tmp_path):
    write_report(results, "cifar10s")
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\\usepackage{booktabs}\\usepackage[utf8]{inputenc}\\begin{document}"
        f"\\begin{{table}}\\input{{{results / 'cifar10s' / 'table.tex'}}}\\end{{table}}\\end{{document}}\n"
    )
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def with_protocol(results: Path, method: str, seed: int, epochs: int = 50, train_size: int | None = None, **config) -> None:
    """Give a seed file the config and data settings `final` records."""
    path = results / "cifar10s" / "final" / method / f"seed{seed}.json"
    record = json.loads(path.read_text())
    record["config"] = {"method": method, "epochs": epochs, "batch_size": 128, "lr": 0.001, "adv_lr": 0.003,
                        "plateau_factor": 0.1, "plateau_patience": 10, "objective": "acc-deo_a", "eval_batch_size": 500} | config
    record["data"] = {"dataset": "cifar10s", "seed": seed, "skew": None, "train_size": train_size, "eval_size": None,
                      "target": None, "select_on": "val"}
    io.write_json(path, record)


def test_seed_files_of_different_protocols_are_refused(results, capsys):
    done = [(m, s) for m in METHODS for s in range(3 if m != "mmd" else 1)]
    for method, seed in done:
        with_protocol(results, method, seed)
    write_report(results, "cifar10s")  # one protocol: fine
    with_protocol(results, "mfd", 1, epochs=4)
    with pytest.raises(UserError, match=r"mix protocols \(epochs 50 in .*mfd seeds 0 2.*; epochs 4 in mfd seed 1\).*--method M --force"):
        summarize(load_final_runs(results, "cifar10s"), "cifar10s")
    with_protocol(results, "mfd", 1)
    with_protocol(results, "hkd", 2, train_size=3000)  # another method's data settings count too
    assert main(["report", "--dataset", "cifar10s", "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "train_size" in err and "hkd seed 2" in err and "--force" in err
    with_protocol(results, "hkd", 2)
    # what does not change what a run learns is not held against it: the teacher never reads adv_lr
    with_protocol(results, "scratch", 0, adv_lr=0.5, eval_batch_size=64, objective="acc")
    write_report(results, "cifar10s")
    with_protocol(results, "ad+hkd", 0, adv_lr=0.5)
    with pytest.raises(UserError, match="adv_lr"):
        summarize(load_final_runs(results, "cifar10s"), "cifar10s")
