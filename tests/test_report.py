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

from fairtune import io
from fairtune.cli import main
from fairtune.errors import UserError
from fairtune.report import load_final_runs, summarize, write_report

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
    tex, note = files.latex.read_text().split("\\end{tabular}")
    assert tex.startswith("\\begin{tabular}")
    assert note.startswith("\n\\par") and note.count("{") == note.count("}") and note.count("$") % 2 == 0
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


# -- confidence intervals, Welch tests, selection rules, sensitivity, Pareto sets ---------------
# Expected numbers are recomputed here with scipy from the seed files, never with fairtune.stats.

DATASET = "fmnist-s"  # not in the paper: no paper columns beside the cells
CONFIGS = {"scratch": {}, "hkd": {"T": 4.0}, "ad": {"lam": 0.1}, "mfd": {"lam": 3.0}, "mmd": {"lam": 0.05}}
SEEDS = {"scratch": 6, "hkd": 2, "ad": 6, "mfd": 5, "mmd": 1}  # n = 1, 2 and ≥ 5 side by side
CENTRES = {"scratch": (70, 10, 20), "hkd": (70.3, 9.5, 19), "ad": (70.4, 7, 15), "mfd": (74, 4, 9), "mmd": (71, 6, 12)}
METRIC_NAMES = ("accuracy", "deo_a", "deo_m")
HEADERS = {"accuracy": "Accuracy", "deo_a": "DEO_A", "deo_m": "DEO_M"}


def write_seeds(results: Path, rule: str = "best", seeds: dict = SEEDS, rng_seed: int = 0, selection: str | None = None) -> None:
    from tests.fixtures.results import write_final_run

    rng = np.random.default_rng(rng_seed)
    for method, n in seeds.items():
        for seed in range(n):
            test = dict(zip(METRIC_NAMES, (c + rng.normal(0, 0.8) for c in CENTRES[method])))
            write_final_run(results, method, seed, CONFIGS[method], DATASET, test=test, rule=rule, selection=selection)


def seed_values(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """metric values per method, read straight from the seed files under ``folder``."""
    values: dict[str, dict[str, list]] = {}
    for path in sorted(folder.glob("*/seed*.json")):
        test = json.loads(path.read_text())["test"]
        for metric in METRIC_NAMES:
            values.setdefault(path.parent.name, {}).setdefault(metric, []).append(test[metric])
    return {m: {k: np.array(v) for k, v in by.items()} for m, by in values.items()}


def expected_stats(values: dict[str, dict[str, np.ndarray]]) -> dict[tuple[str, str], dict]:
    """(method, metric) -> n, mean, std, ci95, p_teacher, best_other, p_best_other, marks."""
    from scipy import stats as st_

    def welch(a, b):
        return st_.ttest_ind(a, b, equal_var=False).pvalue if len(a) > 1 and len(b) > 1 else float("nan")

    out = {}
    for metric in METRIC_NAMES:
        means = {m: v[metric].mean() for m, v in values.items()}
        for method, by in values.items():
            v = by[metric]
            n = len(v)
            ci = st_.t.interval(0.95, n - 1, loc=v.mean(), scale=st_.sem(v))[1] - v.mean() if n > 1 else float("nan")
            others = {m: mean for m, mean in means.items() if m != method}
            best = (max if metric == "accuracy" else min)(others, key=others.get)
            p_teacher = welch(v, values["scratch"][metric]) if method != "scratch" else float("nan")
            p_best = welch(v, values[best][metric])
            out[method, metric] = {
                "n": n, "mean": v.mean(), "std": v.std(ddof=1) if n > 1 else float("nan"), "ci95": ci,
                "p_teacher": p_teacher, "best_other": best, "p_best_other": p_best,
                "marks": ("†" if p_teacher < 0.05 else "") + ("‡" if p_best < 0.05 else ""),
            }
    return out


def markdown_rows(text: str) -> list[dict[str, str]]:
    """The table of a markdown file as dicts (header -> cell)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_cells_are_means_with_t_intervals_and_welch_marks(tmp_path):
    write_seeds(tmp_path)
    table, files = write_report(tmp_path, DATASET)
    expected = expected_stats(seed_values(tmp_path / DATASET / "final"))
    labels = {"scratch": "Teacher", "hkd": "HKD", "ad": "AD", "mfd": "MFD", "mmd": "MMD"}

    written = pd.read_csv(files.csv).set_index("method")
    for (method, metric), want in expected.items():
        row = written.loc[method]
        assert row["seeds"] == want["n"]
        for key in ("mean", "std", "ci95", "p_teacher", "p_best_other"):
            got = row[f"{metric}_{key}"]
            assert (pd.isna(got) and np.isnan(want[key])) or got == pytest.approx(want[key], rel=1e-5, abs=1e-12), (method, metric, key)
        assert row[f"{metric}_best_other"] == want["best_other"]
    assert written.loc["scratch", "seeds"] == 6  # no cap at 4 seeds

    markdown = files.markdown.read_text().strip().split("\n\n")
    assert len(markdown) == 3  # caption, table, legend
    from fairtune.selection import parse_rule

    assert "mean ± 95 % CI half-width" in markdown[0] and parse_rule("best").caption in markdown[0]
    legend = markdown[2]
    for phrase in ("† p < 0.05 against the Teacher", "‡ p < 0.05 against the column's best other method",
                   "two-sided Welch t-test", "α = 0.05", "fewer than 2 seeds"):
        assert phrase in legend
    rows = {r["Method"]: r for r in markdown_rows(files.markdown.read_text())}
    seen_marks = set()
    for (method, metric), want in expected.items():
        cell = rows[labels[method]][HEADERS[metric]]
        if want["n"] == 1:
            assert cell == f"{want['mean']:.2f}"  # the mean alone: no interval, no test
        else:
            assert cell == f"{want['mean']:.2f} ± {want['ci95']:.2f} {want['marks']}".rstrip()
        seen_marks.add(want["marks"])
    assert seen_marks == {"", "†", "‡", "†‡"}  # the data exercise every mark

    tex, note = files.latex.read_text().split("\\end{tabular}")
    body = tex.split("\\midrule")[1].split("\\bottomrule")[0].strip().splitlines()
    bold = {metric: (max if metric == "accuracy" else min)(SEEDS, key=lambda m: expected[m, metric]["mean"]) for metric in METRIC_NAMES}
    for line, method in zip(body, table["method"]):
        cells = [c.strip() for c in line.rstrip("\\ ").split("&")]
        for metric, cell in zip(METRIC_NAMES, cells[3:6]):
            want = expected[method, metric]
            number = f"{want['mean']:.2f} \\pm {want['ci95']:.2f}" if want["n"] > 1 else f"{want['mean']:.2f}"
            number = f"\\mathbf{{{number}}}" if bold[metric] == method else number
            marks = "".join({"†": "\\dagger", "‡": "\\ddagger"}[m] for m in want["marks"])
            assert cell == (f"${number}^{{{marks}}}$" if marks else f"${number}$")
    for phrase in ("$^{\\dagger}$ p $<$ 0.05 against the Teacher", "$^{\\ddagger}$ p $<$ 0.05", "$\\alpha$ = 0.05", "Welch",
                   "95 \\% CI", "Configs chosen by rule best"):
        assert phrase in note


def test_two_seeds_without_spread_give_no_test(tmp_path):
    from tests.fixtures.results import write_final_run

    for seed in range(2):
        write_final_run(tmp_path, "scratch", seed, test={"accuracy": 70.0, "deo_a": 5.0, "deo_m": 9.0})
        write_final_run(tmp_path, "mfd", seed, {"lam": 1.0}, test={"accuracy": 75.0, "deo_a": 3.0, "deo_m": 6.0})
    table, files = write_report(tmp_path, DATASET)
    written = pd.read_csv(files.csv).set_index("method")
    assert written.loc["mfd", "accuracy_ci95"] == 0 and pd.isna(written.loc["mfd", "accuracy_p_teacher"])
    assert "†" not in files.markdown.read_text().split("\n\n")[1]


def test_sensitivity_table_and_plot_per_searched_method(tmp_path):
    from fairtune.spaces import load_space
    from tests.fixtures.results import write_best_config, write_search_csv

    write_seeds(tmp_path)
    mfd = [
        {"trial_id": "t000", "lam": 3.0, "status": "COMPLETED", "epochs_run": 10, "final_accuracy": 71.5, "final_deo_a": 4.25, "final_deo_m": 9.5},
        {"trial_id": "t001", "lam": 0.003, "status": "STOPPED", "epochs_run": 3, "final_accuracy": 60.125, "final_deo_a": 12.0, "final_deo_m": 20.0},
        {"trial_id": "t002", "lam": 50.0, "status": "ERROR", "epochs_run": 2},
        {"trial_id": "t003", "lam": 0.0001, "status": "COMPLETED", "epochs_run": 10, "final_accuracy": 70.0, "final_deo_a": 9.0, "final_deo_m": 18.0},
    ]
    hkd = [
        {"trial_id": "t000", "T": 20, "status": "COMPLETED", "epochs_run": 10, "final_accuracy": 69.0, "final_deo_a": 8.0, "final_deo_m": 15.0},
        {"trial_id": "t001", "T": 4, "status": "COMPLETED", "epochs_run": 10, "final_accuracy": 72.0, "final_deo_a": 7.5, "final_deo_m": 14.0},
    ]
    write_search_csv(tmp_path, "mfd", mfd, DATASET)
    write_search_csv(tmp_path, "hkd", hkd, DATASET)
    write_search_csv(tmp_path, "ss", [{"trial_id": "t000", "parameter": None, "status": "COMPLETED"}], DATASET)  # nothing searched
    write_best_config(tmp_path, "mfd", {"lam": 3.0}, DATASET, trial_id="t000")
    write_best_config(tmp_path, "hkd", {"T": 4.0}, DATASET)  # no trial id: the chosen value marks it

    write_report(tmp_path, DATASET)
    text = (tmp_path / DATASET / "sensitivity.md").read_text()
    sections = text.split("### ")
    assert "STOPPED" in sections[0] and "fewer epochs" in sections[0] and "✓" in sections[0]
    assert [s.splitlines()[0].split(":")[0] for s in sections[1:]] == ["HKD", "MFD"]  # paper order; ss has nothing searched
    for section, method, parameter, trials, chosen_id in ((sections[1], "hkd", "T", hkd, "t001"), (sections[2], "mfd", "λ", mfd, "t000")):
        log = load_space(method).distribution == "loguniform"
        assert section.splitlines()[0].endswith("(log axis)" if log else "(linear axis)")
        rows = markdown_rows(section)
        key = "T" if parameter == "T" else "lam"
        ordered = sorted(trials, key=lambda t: t[key])
        assert [r[parameter] for r in rows] == [f"{t[key]:.4g}" for t in ordered]
        for row, trial in zip(rows, ordered):
            assert (row["Trial"], row["Status"], row["Epochs"]) == (trial["trial_id"], trial["status"], str(trial["epochs_run"]))
            for metric in METRIC_NAMES:
                value = trial.get(f"final_{metric}")
                assert row[f"Val {HEADERS[metric]}"] == (f"{value:.2f}" if value is not None else "–")
            assert row["Chosen"] == ("✓" if trial["trial_id"] == chosen_id else "")
    assert_png(tmp_path / DATASET / "sensitivity.png", min_height=500)  # two rows of panels


def assert_png(path: Path, min_height: int = 200) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > min_height and width > 300


def test_pareto_plot_draws_the_searches_pareto_sets(tmp_path, capsys):
    from tests.fixtures.results import write_search_csv

    write_seeds(tmp_path)
    _, files = write_report(tmp_path, DATASET)
    without = files.pareto.read_bytes()
    front = [{"trial_id": f"t00{i}", "final_accuracy": 70.0 + i, "final_deo_a": 3.0 + 2 * i, "final_deo_m": 8.0 + i} for i in range(3)]
    path = write_search_csv(tmp_path, "mfd", front, DATASET, name="pareto.csv")
    write_report(tmp_path, DATASET)
    assert_png(files.pareto)
    assert files.pareto.read_bytes() != without
    write_search_csv(tmp_path, "mfd", [{k: v for k, v in row.items() if k != "final_deo_m"} for row in front], DATASET, name="pareto.csv")
    assert main(["report", "--dataset", DATASET, "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "final_deo_m" in err


def test_report_select_compares_rules_side_by_side(tmp_path, capsys):
    write_seeds(tmp_path)
    # the Teacher is shared (final/ holds it); the knee has no MMD runs
    knee_seeds = {m: n for m, n in SEEDS.items() if m not in ("scratch", "mmd")}
    write_seeds(tmp_path, "knee", knee_seeds, rng_seed=1, selection="knee")
    for method in ("mfd", "ad"):  # the knee chose other values
        for path in (tmp_path / DATASET / "final-knee" / method).glob("seed*.json"):
            record = json.loads(path.read_text())
            io.write_json(path, record | {"hyperparameters": {"lam": 0.5}})

    assert main(["report", "--dataset", DATASET, "--results-dir", str(tmp_path), "--select", "best", "knee"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / DATASET
    for name in ("table.md", "table.csv", "table.tex", "table-knee.md", "table-knee.csv", "table-knee.tex", "selection.md", "selection.csv"):
        assert (folder / name).read_text().strip() and (name[-3:] != ".md" or (folder / name).read_text().strip() in out)
    assert_png(folder / "pareto-knee.png")

    best_values = seed_values(folder / "final")
    knee_values = seed_values(folder / "final-knee") | {"scratch": best_values["scratch"]}
    knee = pd.read_csv(folder / "table-knee.csv").set_index("method")
    for (method, metric), want in expected_stats(knee_values).items():
        assert knee.loc[method, f"{metric}_p_teacher"] == pytest.approx(want["p_teacher"], rel=1e-5, nan_ok=True)
    assert "`knee`: " + "the knee of the validation Pareto front" in (folder / "table-knee.md").read_text()

    selection = (folder / "selection.md").read_text()
    from fairtune.selection import parse_rule

    assert parse_rule("best").caption in selection and parse_rule("knee").caption in selection
    rows = markdown_rows(selection)
    labels = {"scratch": "Teacher", "hkd": "HKD", "ad": "AD", "mfd": "MFD", "mmd": "MMD"}
    assert [(r["Method"], r["Rule"]) for r in rows] == [(labels[m], rule) for m in SEEDS for rule in ("best", "knee")]
    assert list(rows[-1].values()) == ["MMD", "knee", "–", "0", "–", "–", "–"]
    for row in rows[:-1]:
        method = {v: k for k, v in labels.items()}[row["Method"]]
        values = (best_values if row["Rule"] == "best" else knee_values)[method]
        assert row["Seeds"] == str(len(values["accuracy"]))
        lam = 0.5 if row["Rule"] == "knee" and method in ("mfd", "ad") else CONFIGS[method].get("lam")
        assert row["Hyperparameter"] == (f"λ={lam:.3g}" if lam else "T=4" if method == "hkd" else "–")
        for metric in METRIC_NAMES:
            v = values[metric]
            from scipy import stats as st_

            half = st_.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=st_.sem(v))[1] - v.mean() if len(v) > 1 else None
            assert row[HEADERS[metric]] == (f"{v.mean():.2f} ± {half:.2f}" if half is not None else f"{v.mean():.2f}")
    stacked = pd.read_csv(folder / "selection.csv")
    assert list(stacked.columns[:3]) == ["method", "label", "rule"] and len(stacked) == 2 * len(SEEDS) - 1
    assert stacked.set_index(["method", "rule"]).loc[("mfd", "knee"), "hyperparameters"] == "λ=0.5"


@pytest.mark.parametrize("rule", ["utopia", "constrained:deo_a<=2"])
def test_report_select_without_that_rules_finals_is_one_line(tmp_path, capsys, rule):
    write_seeds(tmp_path)
    assert main(["report", "--dataset", DATASET, "--results-dir", str(tmp_path), "--select", "best", rule]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    import shlex

    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"rule {rule}" in err and f"`fairtune final --dataset {DATASET} --select {shlex.quote(rule)}`" in err
    assert not (tmp_path / DATASET / "table.md").exists()  # every rule is checked before anything is written


def test_report_select_refuses_a_seed_file_of_another_rule(tmp_path, capsys):
    write_seeds(tmp_path)
    write_seeds(tmp_path, "knee", {"mfd": 2}, selection="knee")
    from tests.fixtures.results import write_final_run

    odd = write_final_run(tmp_path, "mfd", 2, {"lam": 3.0}, DATASET, rule="knee", selection="utopia")
    assert main(["report", "--dataset", DATASET, "--results-dir", str(tmp_path), "--select", "knee"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(odd) in err and "'utopia'" in err and "--select knee" in err
    assert main(["report", "--dataset", DATASET, "--results-dir", str(tmp_path), "--select", "kneee"]) == 2
    assert "unknown rule" in capsys.readouterr().err
