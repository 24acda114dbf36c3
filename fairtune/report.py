"""The paper's tables and two plots, built from what is on disk under ``results/<dataset>/``.

Reads ``final/<method>/seed*.json`` (test metrics per seed) and ``search/<method>/{trials.csv,
best.json}``; writes ``table.{md,csv,tex}``, ``pareto.png`` and ``table.png``. Nothing here trains.
Standard deviations are sample standard deviations over seeds (ddof = 1), as the paper's ± are
taken to be; with one seed there is none and only the mean is shown.
"""

from __future__ import annotations

import io as text_io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from fairtune import io
from fairtune.engine import training_protocol
from fairtune.errors import UserError
from fairtune.methods import get_method, in_paper_order
from fairtune.records import BEST_CONFIG_VAL, FINAL_RUN, read_record
from fairtune.selection import final_dir

METRICS = ("accuracy", "deo_a", "deo_m")
METRIC_LABELS = {"accuracy": "Accuracy", "deo_a": "DEO_A", "deo_m": "DEO_M"}
BETTER = {"accuracy": "max", "deo_a": "min", "deo_m": "min"}
PARAM_SYMBOLS = {"T": "T", "lam": "λ", "distill_lam": "λ_distill"}
# The paper names the scratch model trained per seed "Teacher".
PAPER_NAMES = {"teacher": "scratch"}


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    csv: Path
    latex: Path
    pareto: Path
    bars: Path


def report_files(results_dir: Path, dataset: str) -> ReportFiles:
    folder = Path(results_dir) / dataset
    return ReportFiles(folder / "table.md", folder / "table.csv", folder / "table.tex", folder / "pareto.png", folder / "table.png")


def load_final_runs(results_dir: Path, dataset: str) -> pd.DataFrame:
    """One row per (method, seed) from ``final/<method>/seed<k>.json``, with the run's protocol:
    the training settings that change what it learns and its data settings but the seed (JSON)."""
    rows = []
    for path in sorted(final_dir(results_dir, dataset).glob("*/seed*.json")):
        redo = f"rerun it with `fairtune final --dataset {dataset} --method {path.parent.name} --seeds {path.stem[4:]} --force`, or delete the file"
        record = read_record(path, FINAL_RUN, redo)
        data = {k: v for k, v in (record.get("data") or {}).items() if k != "seed"}
        rows.append(
            {
                "method": path.parent.name,
                "seed": int(record["seed"]),
                "hyperparameters": json.dumps(record.get("hyperparameters", {}), sort_keys=True),
                "protocol": json.dumps({**training_protocol(record.get("config") or {}), **data}, sort_keys=True),
                **{m: float(record["test"][m]) for m in METRICS},
            }
        )
    return pd.DataFrame(rows, columns=["method", "seed", "hyperparameters", "protocol", *METRICS])


def check_one_protocol(runs: pd.DataFrame, dataset: str) -> None:
    """Refuse a table that would average or compare runs of different protocols (epochs, lr, data
    sizes, skew, ...): every setting must agree across all seed files that record it. Settings a file
    predates are not held against it."""
    seen: dict[str, dict[str, dict[str, list[int]]]] = {}  # setting -> value -> method -> seeds
    for run in runs.itertuples():
        for key, value in json.loads(run.protocol or "{}").items():
            seen.setdefault(key, {}).setdefault(json.dumps(value), {}).setdefault(run.method, []).append(run.seed)
    for key, values in seen.items():
        if len(values) > 1:
            shown = "; ".join(
                f"{key} {value} in " + ", ".join(f"{m} seed{'s' * (len(s) > 1)} {' '.join(map(str, sorted(s)))}" for m, s in who.items())
                for value, who in values.items()
            )
            raise UserError(
                f"the final runs of {dataset} mix protocols ({shown}); rerun the odd ones alike with "
                f"`fairtune final --dataset {dataset} --method M --force`, then report again"
            )


def paper_results(dataset: str) -> pd.DataFrame:
    """The paper's mean ± std for ``dataset`` (empty when the paper has no such table)."""
    with resources.files("fairtune.reference").joinpath("paper_results.csv").open() as handle:
        paper = pd.read_csv(handle)
    paper = paper[paper["dataset"] == dataset].copy()
    paper["method"] = paper["method"].replace(PAPER_NAMES)
    return paper.set_index("method")


def hyperparameter_text(method: str, hyperparameters: dict) -> str:
    """The searched value first, e.g. ``λ=0.186`` or ``λ=0.01, T=3``."""
    searched = get_method(method).searched
    names = sorted(hyperparameters, key=lambda name: name != searched)
    return ", ".join(f"{PARAM_SYMBOLS.get(n, n)}={hyperparameters[n]:.3g}" for n in names)


def summarize(runs: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """One row per method in paper order: mean and std per metric, seeds, hyperparameters, paper values."""
    if runs.empty:
        raise UserError(f"no final results for {dataset}; run `fairtune final --dataset {dataset}` first")
    check_one_protocol(runs, dataset)
    grouped = runs.groupby("method")
    table = pd.DataFrame(index=pd.Index(in_paper_order(runs["method"]), name="method"))
    table["label"] = [get_method(m).label for m in table.index]
    configs = grouped["hyperparameters"].agg(lambda values: sorted(set(values)))
    mixed = [m for m, v in configs.items() if len(v) > 1]
    if mixed:
        raise UserError(f"final runs of {', '.join(mixed)} used different hyperparameters across seeds; rerun them with --force")
    table["hyperparameters"] = [hyperparameter_text(m, json.loads(configs[m][0])) for m in table.index]
    table["seeds"] = grouped["seed"].count()
    for metric in METRICS:
        table[f"{metric}_mean"] = grouped[metric].mean()
        table[f"{metric}_std"] = grouped[metric].std(ddof=1)
    paper = paper_results(dataset)
    if len(paper):
        for metric in METRICS:
            table[f"paper_{metric}_mean"] = paper[metric].reindex(table.index)
            table[f"paper_{metric}_std"] = paper[f"{metric}_std"].reindex(table.index)
    return table.reset_index()


def _mean_std(mean: float, std: float, latex: bool = False) -> str:
    if pd.isna(mean):
        return "–"
    if pd.isna(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} \\pm {std:.2f}" if latex else f"{mean:.2f} ± {std:.2f}"


def best_rows(table: pd.DataFrame) -> dict[str, set[int]]:
    """Row positions holding the best mean of each metric (ties all count)."""
    best = {}
    for metric in METRICS:
        values = table[f"{metric}_mean"].to_numpy()
        target = np.nanmax(values) if BETTER[metric] == "max" else np.nanmin(values)
        best[metric] = {i for i, v in enumerate(values) if np.isclose(v, target, rtol=0, atol=1e-9)}
    return best


def display_frame(table: pd.DataFrame, latex: bool = False) -> pd.DataFrame:
    """The human table: mean ± std cells, the paper's beside them when present."""
    best = best_rows(table) if latex else {}
    shown = pd.DataFrame(
        {"Method": table["label"], "Hyperparameter": table["hyperparameters"].replace("", "–"), "Seeds": table["seeds"]}
    )
    for metric in METRICS:
        cells = [_mean_std(m, s, latex) for m, s in zip(table[f"{metric}_mean"], table[f"{metric}_std"])]
        if latex:
            cells = [f"$\\mathbf{{{c}}}$" if i in best[metric] else f"${c}$" for i, c in enumerate(cells)]
        shown[METRIC_LABELS[metric]] = cells
    if "paper_accuracy_mean" in table:
        for metric in METRICS:
            cells = [_mean_std(m, s, latex) for m, s in zip(table[f"paper_{metric}_mean"], table[f"paper_{metric}_std"])]
            shown[f"Paper {METRIC_LABELS[metric]}"] = [c if c == "–" or not latex else f"${c}$" for c in cells]
    return shown


def to_markdown(table: pd.DataFrame) -> str:
    shown = display_frame(table)
    # disable_numparse: a one-seed cell such as "20.00" stays as written instead of becoming "20".
    return shown.to_markdown(index=False, disable_numparse=True, colalign=["left", "left", *["right"] * (len(shown.columns) - 2)])


def to_latex(table: pd.DataFrame) -> str:
    """A ``tabular`` with booktabs rules, ready for ``\\input`` inside a ``table``; best mean per
    metric in bold. Needs ``\\usepackage{booktabs}``."""
    shown = display_frame(table, latex=True)
    shown["Method"] = shown["Method"].str.replace("+", "{+}", regex=False)
    shown["Hyperparameter"] = (
        shown["Hyperparameter"].str.replace("λ_distill", r"$\lambda_{d}$", regex=False).str.replace("λ", r"$\lambda$", regex=False)
        .str.replace("–", "--", regex=False)
    )
    shown = shown.replace("–", "--")
    shown.columns = [c.replace("DEO_A", r"DEO\textsubscript{A}").replace("DEO_M", r"DEO\textsubscript{M}") for c in shown.columns]
    return shown.style.hide(axis="index").to_latex(hrules=True, column_format="ll" + "r" * (len(shown.columns) - 2))


def to_csv(table: pd.DataFrame) -> str:
    buffer = text_io.StringIO()
    table.to_csv(buffer, index=False, float_format="%.4f")
    return buffer.getvalue()


# -- plots ------------------------------------------------------------------------------------


def pareto_front(accuracy: np.ndarray, deo: np.ndarray) -> np.ndarray:
    """Mask of points no other point beats on both axes (higher accuracy, lower DEO_A)."""
    order = np.lexsort((deo, -accuracy))  # by accuracy descending, then DEO ascending
    mask = np.zeros(len(accuracy), dtype=bool)
    lowest = np.inf
    for i in order:
        if deo[i] < lowest:
            mask[i] = True
            lowest = deo[i]
    return mask


def load_trials(results_dir: Path, dataset: str) -> pd.DataFrame:
    """Every search trial's final-epoch validation metrics, with its method."""
    frames = []
    for path in sorted((Path(results_dir) / dataset / "search").glob("*/trials.csv")):
        trials = pd.read_csv(path, dtype={"trial_id": str, "error": str})
        if "final_accuracy" not in trials:
            continue
        trials = trials[trials["final_accuracy"].notna()]
        frames.append(pd.DataFrame({"method": path.parent.name, "accuracy": trials["final_accuracy"], "deo_a": trials["final_deo_a"]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["method", "accuracy", "deo_a"])


def _figure_bytes(figure) -> bytes:
    buffer = text_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    return buffer.getvalue()


def plot_pareto(results_dir: Path, dataset: str, table: pd.DataFrame) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = load_trials(results_dir, dataset)
    figure, axis = plt.subplots(figsize=(7.5, 5.5))
    names = in_paper_order([*table["method"], *trials["method"]])
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    colours = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    for method, rows in trials.groupby("method"):
        axis.scatter(rows["deo_a"], rows["accuracy"], s=18, alpha=0.45, color=colours[method])
    if len(trials):
        front = trials[pareto_front(trials["accuracy"].to_numpy(), trials["deo_a"].to_numpy())].sort_values("deo_a")
        axis.step(front["deo_a"], front["accuracy"], where="post", color="black", lw=1, ls="--", label="Pareto front of all trials (val)")
    for _, row in table.iterrows():
        colour = colours[row["method"]]
        best_path = Path(results_dir) / dataset / "search" / row["method"] / "best.json"
        if best_path.exists():
            redo = f"rerun `fairtune search --method {row['method']} --dataset {dataset}`, or delete the file"
            val = read_record(best_path, BEST_CONFIG_VAL, redo)["val"]
            axis.scatter(val["deo_a"], val["accuracy"], marker="*", s=170, color=colour, edgecolor="black", lw=0.6, zorder=3)
        axis.errorbar(
            row["deo_a_mean"], row["accuracy_mean"], xerr=np.nan_to_num(row["deo_a_std"]), yerr=np.nan_to_num(row["accuracy_std"]),
            fmt="D", ms=7, color=colour, mec="black", capsize=3, zorder=4, label=row["label"],
        )
    axis.set_xlabel("DEO_A (%)  — lower is fairer")
    axis.set_ylabel("accuracy (%)")
    axis.set_title(f"{dataset}: dots = search trials (val), ★ = chosen config (val), ◆ = final mean ± std (test)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best", ncol=2)
    data = _figure_bytes(figure)
    plt.close(figure)
    return data


def plot_bars(table: pd.DataFrame, dataset: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(max(8.0, 0.9 * len(table) * 1.5), 4.2))
    x = np.arange(len(table))
    for axis, metric in zip(axes, METRICS):
        axis.bar(x, table[f"{metric}_mean"], yerr=np.nan_to_num(table[f"{metric}_std"]), capsize=3, color="#4c72b0", label="fairtune")
        if f"paper_{metric}_mean" in table:
            axis.scatter(x, table[f"paper_{metric}_mean"], marker="_", s=220, color="#c44e52", zorder=3, label="paper")
        axis.set_xticks(x, table["label"], rotation=60, ha="right", fontsize=8)
        axis.set_title(f"{METRIC_LABELS[metric]} ({'higher' if BETTER[metric] == 'max' else 'lower'} is better)", fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    if "paper_accuracy_mean" in table:
        axes[0].legend(fontsize=7)
    figure.suptitle(f"{dataset}: test metrics, mean ± std over seeds", fontsize=10)
    data = _figure_bytes(figure)
    plt.close(figure)
    return data


def write_report(results_dir: Path, dataset: str) -> tuple[pd.DataFrame, ReportFiles]:
    """Tables and plots from disk; every file written atomically."""
    table = summarize(load_final_runs(results_dir, dataset), dataset)
    files = report_files(results_dir, dataset)
    pareto = plot_pareto(results_dir, dataset, table)  # reads best.json files: a bad one stops it before any write
    io.write_text(files.markdown, to_markdown(table) + "\n")
    io.write_text(files.csv, to_csv(table))
    io.write_text(files.latex, to_latex(table))
    io.write_bytes(files.pareto, pareto)
    io.write_bytes(files.bars, plot_bars(table, dataset))
    return table, files
