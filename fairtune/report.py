"""The paper's tables and the plots, built from what is on disk under ``results/<dataset>/``.

Reads ``final*/<method>/seed*.json`` (test metrics per seed), ``search/<method>/{trials.csv,
best.json, pareto.csv}``; writes, per selection rule, ``table[-<rule>].{md,csv,tex}``,
``pareto[-<rule>].png`` and ``table[-<rule>].png``; ``sensitivity.{png,md}`` from the searches; and
with two rules or more ``selection.{md,csv}`` side by side. Nothing here trains.

Cells are mean ± 95 % t-interval half-width over seeds, with Welch tests against the Teacher and the
column's best other method (``fairtune.stats``): with 4 seeds a bare std says little about whether
two methods differ. The CSV keeps every number (std, n, half-width, p-values) in its own column.
"""

from __future__ import annotations

import io as text_io
import json
import math
import shlex
from dataclasses import astuple, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from fairtune import io
from fairtune.hyperparameters import symbol as hyperparameter_symbol
from fairtune.engine import training_protocol
from fairtune.errors import UserError
from fairtune.layout import Layout
from fairtune.methods import get_method, in_paper_order
from fairtune.records import FINAL_RUN, read_best, read_record
from fairtune.selection import BEST, Rule, pareto_mask, parse_rule
from fairtune.spaces import load_space
from fairtune.stats import ALPHA, ci_half_width, welch_p

METRICS = ("accuracy", "deo_a", "deo_m")
METRIC_LABELS = {"accuracy": "Accuracy", "deo_a": "DEO_A", "deo_m": "DEO_M"}
BETTER = {"accuracy": "max", "deo_a": "min", "deo_m": "min"}
# The paper names the scratch model trained per seed "Teacher".
PAPER_NAMES = {"teacher": "scratch"}
TEACHER = "scratch"
# ‡ rather than * for the second test: a lone * in a markdown cell may open an emphasis.
VS_TEACHER, VS_BEST_OTHER = "†", "‡"
LATEX_MARKS = {VS_TEACHER: r"\dagger", VS_BEST_OTHER: r"\ddagger"}
CELLS = "mean ± 95 % CI half-width (Student t, n − 1 df) over n seeds; with one seed, the mean only"
LEGEND = (
    f"{VS_TEACHER} p < 0.05 against the Teacher, {VS_BEST_OTHER} p < 0.05 against the column's best other method "
    "(highest accuracy, lowest DEO among the other rows; named in the CSV): two-sided Welch t-test over seeds, "
    "α = 0.05, not corrected for multiple comparisons; no mark when either side has fewer than 2 seeds."
)
PAPER_LEGEND = "Paper columns: mean ± std, as the paper reports std."
LATEX_TEXT = str.maketrans({"_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "≤": r"$\le$", "±": r"$\pm$", "−": "$-$", "<": "$<$",
                            "α": r"$\alpha$", "†": r"$^{\dagger}$", "‡": r"$^{\ddagger}$", "λ": r"$\lambda$"})


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    csv: Path
    latex: Path
    pareto: Path
    bars: Path


@dataclass(frozen=True)
class SensitivityFiles:
    plot: Path
    table: Path


@dataclass(frozen=True)
class SelectionFiles:
    markdown: Path
    csv: Path


@dataclass
class Report:
    """What ``write_reports`` wrote: per rule its table and files, then the dataset-wide files
    (None where there was nothing to show)."""

    tables: dict[Rule, pd.DataFrame]
    files: dict[Rule, ReportFiles]
    sensitivity: SensitivityFiles | None = None
    selection: SelectionFiles | None = None

    def paths(self) -> list[Path]:
        paths = [p for files in self.files.values() for p in (files.markdown, files.csv, files.latex, files.pareto, files.bars)]
        for extra in (self.sensitivity, self.selection):
            paths += list(astuple(extra)) if extra else []
        return paths


def report_files(results_dir: Path, dataset: str, rule: Rule = BEST) -> ReportFiles:
    """``table.md`` ... for ``best`` (where they have always been), ``table-<slug>.md`` ... otherwise."""
    layout = Layout(results_dir, dataset)
    return ReportFiles(
        layout.table("md", rule), layout.table("csv", rule), layout.table("tex", rule), layout.pareto_plot(rule), layout.table("png", rule),
    )


def final_command(dataset: str, rule: Rule = BEST) -> str:
    """The command that writes ``rule``'s final runs."""
    return f"fairtune final --dataset {dataset}" + ("" if rule == BEST else f" --select {shlex.quote(rule.text)}")


def _check_selection(path: Path, record: dict, rule: Rule, dataset: str) -> None:
    """A seed file that says another rule chose it must not be averaged into ``rule``'s table."""
    written = (record.get("selection") or {}).get("rule")
    if written is None:
        return  # written before rules were recorded: its folder is all there is to go by
    try:
        chosen_by = parse_rule(written)
    except UserError:
        chosen_by = None
    if chosen_by != rule:
        raise UserError(
            f"{path} was chosen by rule {written!r}, but {path.parent.parent.name}/ holds the finals of rule "
            f"{rule.text}; move it to the folder of its rule, or rerun it with `{final_command(dataset, rule)} "
            f"--method {path.parent.name} --seeds {path.stem[4:]} --force`"
        )


def load_final_runs(results_dir: Path, dataset: str, rule: Rule = BEST) -> pd.DataFrame:
    """One row per (method, seed) from ``rule``'s ``final*/<method>/seed<k>.json``, with the run's
    protocol: the training settings that change what it learns and its data settings but the seed
    (JSON). The Teacher has nothing to select, so a rule whose folder holds no ``scratch`` runs
    shares those of ``final/``."""
    layout = Layout(results_dir, dataset)
    paths = layout.final_runs(rule)
    owner = dict.fromkeys(paths, rule)
    if rule != BEST and paths and not any(p.parent.name == TEACHER for p in paths):
        owner |= dict.fromkeys(layout.final_runs(BEST, TEACHER), BEST)
    rows = []
    for path, folder_rule in owner.items():
        redo = (
            f"rerun it with `{final_command(dataset, folder_rule)} --method {path.parent.name} --seeds {path.stem[4:]} --force`, "
            "or delete the file"
        )
        record = read_record(path, FINAL_RUN, redo)
        _check_selection(path, record, folder_rule, dataset)
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


def check_one_protocol(runs: pd.DataFrame, dataset: str, rule: Rule = BEST) -> None:
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
                f"`{final_command(dataset, rule)} --method M --force`, then report again"
            )


def paper_results(dataset: str) -> pd.DataFrame:
    """The paper's mean ± std for ``dataset`` (empty when the paper has no such table)."""
    with resources.files("fairtune.reference").joinpath("paper_results.csv").open() as handle:
        paper = pd.read_csv(handle)
    paper = paper[paper["dataset"] == dataset].copy()
    paper["method"] = paper["method"].replace(PAPER_NAMES)
    return paper.set_index("method")


def hyperparameter_text(method: str, values: dict) -> str:
    """The searched value first, e.g. ``λ=0.186`` or ``λ=0.01, T=3``."""
    searched = get_method(method).searched
    names = sorted(values, key=lambda name: name != searched)
    return ", ".join(f"{hyperparameter_symbol(n)}={values[n]:.3g}" for n in names)


def best_other(means: pd.Series, method: str, better: str) -> str | None:
    """The method with the best mean of the column among all but ``method`` (ties: paper order)."""
    others = means.drop(method).dropna()
    if others.empty:
        return None
    return str(others.idxmax() if better == "max" else others.idxmin())


def summarize(runs: pd.DataFrame, dataset: str, rule: Rule = BEST) -> pd.DataFrame:
    """One row per method in paper order: per metric mean, std, 95 % CI half-width, Welch p-values
    against the Teacher and the column's best other method (and which that is); seeds,
    hyperparameters, paper values."""
    if runs.empty:
        where = Layout(".", dataset).final_dir(rule).name
        raise UserError(
            f"no final results for {dataset} under rule {rule.text} ({where}/ holds no seed files); run `{final_command(dataset, rule)}` first"
        )
    check_one_protocol(runs, dataset, rule)
    grouped = runs.groupby("method")
    table = pd.DataFrame(index=pd.Index(in_paper_order(runs["method"]), name="method"))
    table["label"] = [get_method(m).label for m in table.index]
    configs = grouped["hyperparameters"].agg(lambda values: sorted(set(values)))
    mixed = [m for m, v in configs.items() if len(v) > 1]
    if mixed:
        raise UserError(
            f"final runs of {', '.join(mixed)} used different hyperparameters across seeds; rerun them with "
            f"`{final_command(dataset, rule)} --method {' '.join(mixed)} --force`"
        )
    table["hyperparameters"] = [hyperparameter_text(m, json.loads(configs[m][0])) for m in table.index]
    table["seeds"] = grouped["seed"].count()
    for metric in METRICS:
        seeds = {m: values.to_numpy() for m, values in grouped[metric]}
        means = grouped[metric].mean().reindex(table.index)
        table[f"{metric}_mean"] = means
        table[f"{metric}_std"] = grouped[metric].std(ddof=1)
        table[f"{metric}_ci95"] = [ci_half_width(seeds[m]) for m in table.index]
        table[f"{metric}_p_teacher"] = [
            welch_p(seeds[m], seeds[TEACHER]) if m != TEACHER and TEACHER in seeds else math.nan for m in table.index
        ]
        others = [best_other(means, m, BETTER[metric]) for m in table.index]
        table[f"{metric}_best_other"] = others
        table[f"{metric}_p_best_other"] = [welch_p(seeds[m], seeds[o]) if o else math.nan for m, o in zip(table.index, others)]
    paper = paper_results(dataset)
    if len(paper):
        for metric in METRICS:
            table[f"paper_{metric}_mean"] = paper[metric].reindex(table.index)
            table[f"paper_{metric}_std"] = paper[f"{metric}_std"].reindex(table.index)
    return table.reset_index()


def _number(mean: float, spread: float, latex: bool) -> str:
    if pd.isna(mean):
        return "–"
    if pd.isna(spread):
        return f"{mean:.2f}"
    return f"{mean:.2f} \\pm {spread:.2f}" if latex else f"{mean:.2f} ± {spread:.2f}"


def significance_marks(row: pd.Series, metric: str) -> str:
    """† and/or ‡ where the Welch test rejects at α; a NaN p-value (too few seeds) marks nothing."""
    marks = VS_TEACHER if row[f"{metric}_p_teacher"] < ALPHA else ""
    return marks + (VS_BEST_OTHER if row[f"{metric}_p_best_other"] < ALPHA else "")


def best_rows(table: pd.DataFrame) -> dict[str, set[int]]:
    """Row positions holding the best mean of each metric (ties all count)."""
    best = {}
    for metric in METRICS:
        values = table[f"{metric}_mean"].to_numpy()
        target = np.nanmax(values) if BETTER[metric] == "max" else np.nanmin(values)
        best[metric] = {i for i, v in enumerate(values) if np.isclose(v, target, rtol=0, atol=1e-9)}
    return best


def _metric_cell(row: pd.Series, metric: str, latex: bool = False, bold: bool = False) -> str:
    number = _number(row[f"{metric}_mean"], row[f"{metric}_ci95"], latex)
    marks = significance_marks(row, metric) if f"{metric}_p_teacher" in row else ""
    if not latex:
        return f"{number} {marks}".rstrip()
    number = f"\\mathbf{{{number}}}" if bold else number
    return f"${number}^{{{''.join(LATEX_MARKS[m] for m in marks)}}}$" if marks else f"${number}$"


def display_frame(table: pd.DataFrame, latex: bool = False) -> pd.DataFrame:
    """The human table: mean ± CI cells with significance marks, the paper's mean ± std beside them."""
    best = best_rows(table) if latex else {}
    shown = pd.DataFrame(
        {"Method": table["label"], "Hyperparameter": table["hyperparameters"].replace("", "–"), "Seeds": table["seeds"]}
    )
    for metric in METRICS:
        shown[METRIC_LABELS[metric]] = [
            _metric_cell(row, metric, latex, bold=i in best.get(metric, ())) for i, (_, row) in enumerate(table.iterrows())
        ]
    if "paper_accuracy_mean" in table:
        for metric in METRICS:
            cells = [_number(m, s, latex) for m, s in zip(table[f"paper_{metric}_mean"], table[f"paper_{metric}_std"])]
            shown[f"Paper {METRIC_LABELS[metric]}"] = [c if c == "–" or not latex else f"${c}$" for c in cells]
    return shown


def caption(rule: Rule = BEST) -> str:
    """The line above a table: what the cells are and how the configs were chosen."""
    return f"Test metrics (%): {CELLS}. Configs chosen by rule `{rule.text}`: {rule.caption}."


def legend(table: pd.DataFrame) -> str:
    """The line under a table: how to read the marks (and the paper's columns, when present)."""
    return LEGEND + (f" {PAPER_LEGEND}" if "paper_accuracy_mean" in table else "")


def _markdown_grid(shown: pd.DataFrame, left: int = 2) -> str:
    """Text columns (the first ``left``) flush left, numbers flush right."""
    # disable_numparse: a one-seed cell such as "20.00" stays as written instead of becoming "20".
    return shown.to_markdown(index=False, disable_numparse=True, colalign=["left"] * left + ["right"] * (len(shown.columns) - left))


def to_markdown(table: pd.DataFrame, rule: Rule = BEST) -> str:
    """Caption line, the table, legend line."""
    return f"{caption(rule)}\n\n{_markdown_grid(display_frame(table))}\n\n{legend(table)}"


def _latex_text(text: str) -> str:
    return text.replace("`", "").translate(LATEX_TEXT)


def to_latex(table: pd.DataFrame, rule: Rule = BEST) -> str:
    """A ``tabular`` with booktabs rules, then the caption and legend as a footnote-size paragraph,
    ready for ``\\input`` inside a ``table``; best mean per metric in bold. Needs
    ``\\usepackage{booktabs}``."""
    shown = display_frame(table, latex=True)
    shown["Method"] = shown["Method"].str.replace("+", "{+}", regex=False)
    shown["Hyperparameter"] = (
        shown["Hyperparameter"].str.replace("λ_distill", r"$\lambda_{d}$", regex=False).str.replace("λ", r"$\lambda$", regex=False)
        .str.replace("–", "--", regex=False)
    )
    shown = shown.replace("–", "--")
    shown.columns = [c.replace("DEO_A", r"DEO\textsubscript{A}").replace("DEO_M", r"DEO\textsubscript{M}") for c in shown.columns]
    tabular = shown.style.hide(axis="index").to_latex(hrules=True, column_format="ll" + "r" * (len(shown.columns) - 2))
    note = _latex_text(f"{caption(rule)} Bold: the best mean of the column. {legend(table)}")
    return f"{tabular}\\par\\smallskip{{\\footnotesize {note}}}\n"


def to_csv(table: pd.DataFrame) -> str:
    buffer = text_io.StringIO()
    # six significant digits: p-values far below 1e-4 keep their size, means keep 4 decimals.
    table.to_csv(buffer, index=False, float_format="%.6g")
    return buffer.getvalue()


# -- selection rules side by side -------------------------------------------------------------


def selection_frame(tables: dict[Rule, pd.DataFrame]) -> pd.DataFrame:
    """Every rule's table stacked, a ``rule`` column added, rows by method (paper order) then rule."""
    stacked = pd.concat([t.assign(rule=r.text) for r, t in tables.items()], ignore_index=True)
    order = {m: i for i, m in enumerate(in_paper_order(stacked["method"]))}
    rules = {r.text: i for i, r in enumerate(tables)}
    stacked = stacked.iloc[np.lexsort((stacked["rule"].map(rules), stacked["method"].map(order)))]
    return stacked[["method", "label", "rule", *[c for c in stacked.columns if c not in ("method", "label", "rule")]]]


def selection_markdown(tables: dict[Rule, pd.DataFrame], dataset: str) -> str:
    """Per method one row per rule: the config it chose and the test metrics its finals reached
    ("–" where a rule has no finals of that method)."""
    stacked = selection_frame(tables).set_index(["method", "rule"])
    rows = []
    for method in in_paper_order(stacked.index.get_level_values("method")):
        for rule in tables:
            row = stacked.loc[(method, rule.text)] if (method, rule.text) in stacked.index else None
            rows.append({
                "Method": _label(method), "Rule": rule.text,
                "Hyperparameter": "–" if row is None else row["hyperparameters"] or "–",
                "Seeds": 0 if row is None else row["seeds"],
                **{METRIC_LABELS[m]: "–" if row is None else _number(row[f"{m}_mean"], row[f"{m}_ci95"], latex=False) for m in METRICS},
            })
    rules = "; ".join(f"`{r.text}`: {r.caption}" for r in tables)
    files = ", ".join(report_files(Path("."), dataset, r).markdown.name for r in tables)
    return (
        f"Test metrics (%) of the final runs each selection rule chose: {CELLS}. Rules: {rules}.\n\n"
        f"{_markdown_grid(pd.DataFrame(rows), left=3)}\n\nWelch tests per rule: {files}."
    )


# -- plots ------------------------------------------------------------------------------------


def _read_table(path: Path, required: Sequence[str], fix: str) -> pd.DataFrame:
    """A CSV fairtune wrote, with ``required`` columns; UserError naming the file and ``fix`` otherwise."""
    try:
        frame = pd.read_csv(path, dtype={"trial_id": str, "error": str})
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' parser and empty-file errors are ValueErrors
        raise UserError(f"{path} is not a readable CSV ({str(exc).splitlines()[0][:80]}); {fix}") from None
    missing = [c for c in required if c not in frame]
    if missing:
        raise UserError(f"{path} lacks the column{'s' * (len(missing) > 1)} {', '.join(missing)}; {fix}")
    return frame


def _label(method: str) -> str:
    try:
        return get_method(method).label
    except UserError:  # a folder some other tool left under search/: shown under its own name
        return method


def load_trials(results_dir: Path, dataset: str) -> pd.DataFrame:
    """Every search trial's final-epoch validation metrics, with its method."""
    frames = []
    for search in Layout(results_dir, dataset).searches():
        if not search.trials_csv.exists():
            continue
        trials = _read_table(search.trials_csv, (), f"rerun `fairtune search --dataset {dataset} --method {search.method}`, or delete the file")
        if "final_accuracy" not in trials:
            continue
        trials = trials[trials["final_accuracy"].notna()]
        frames.append(pd.DataFrame({"method": search.method, "accuracy": trials["final_accuracy"], "deo_a": trials["final_deo_a"]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["method", "accuracy", "deo_a"])


FRONT_COLUMNS = ("trial_id", "final_accuracy", "final_deo_a", "final_deo_m")


def load_search_fronts(results_dir: Path, dataset: str) -> dict[str, pd.DataFrame]:
    """The validation Pareto set each multi-objective search wrote (``search/<method>/pareto.csv``)."""
    fronts = {}
    for search in Layout(results_dir, dataset).searches():
        if not search.pareto_csv.exists():
            continue
        front = _read_table(search.pareto_csv, FRONT_COLUMNS, f"rerun the multi-objective search of {search.method}, or delete the file")
        for column in FRONT_COLUMNS[1:]:
            front[column] = pd.to_numeric(front[column], errors="coerce")
        fronts[search.method] = front.dropna(subset=["final_accuracy", "final_deo_a"]).sort_values("final_deo_a")
    return fronts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_bytes(figure) -> bytes:
    buffer = text_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    return buffer.getvalue()


def plot_pareto(results_dir: Path, dataset: str, table: pd.DataFrame, rule: Rule = BEST) -> bytes:
    """Accuracy against DEO_A: every search trial (val), each multi-objective search's Pareto set
    (val), the configs ``best.json`` holds (★, for rule best) and each method's final runs (test,
    mean with 95 % CI in both metrics)."""
    plt = _pyplot()
    trials = load_trials(results_dir, dataset)
    fronts = load_search_fronts(results_dir, dataset)
    figure, axis = plt.subplots(figsize=(7.5, 5.5))
    names = in_paper_order([*table["method"], *trials["method"], *fronts])
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    colours = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    for method, rows in trials.groupby("method"):
        axis.scatter(rows["deo_a"], rows["accuracy"], s=18, alpha=0.45, color=colours[method])
    if len(trials):
        front = trials[pareto_mask(np.column_stack([-trials["accuracy"], trials["deo_a"]]))].sort_values("deo_a")
        axis.step(front["deo_a"], front["accuracy"], where="post", color="black", lw=1, ls="--", label="Pareto front of all trials (val)")
    for method, front in fronts.items():
        # "post": at any DEO_A the line gives the best accuracy the set reaches at that DEO_A or lower.
        axis.step(front["final_deo_a"], front["final_accuracy"], where="post", color=colours[method], lw=1.4)
        axis.scatter(front["final_deo_a"], front["final_accuracy"], marker="s", s=28, facecolor="white", edgecolor=colours[method],
                     zorder=3, label=f"{_label(method)}: val Pareto set")
    layout = Layout(results_dir, dataset)
    for _, row in table.iterrows():
        colour = colours[row["method"]]
        if rule == BEST and layout.search(row["method"]).best.exists():
            val = read_best(layout, row["method"], need_val=True).val
            axis.scatter(val.deo_a, val.accuracy, marker="*", s=170, color=colour, edgecolor="black", lw=0.6, zorder=3)
        axis.errorbar(
            row["deo_a_mean"], row["accuracy_mean"], xerr=np.nan_to_num(row["deo_a_ci95"]), yerr=np.nan_to_num(row["accuracy_ci95"]),
            fmt="D", ms=7, color=colour, mec="black", capsize=3, zorder=4, label=row["label"],
        )
    axis.set_xlabel("DEO_A (%)  — lower is fairer")
    axis.set_ylabel("accuracy (%)")
    star = "★ = chosen config (val), " if rule == BEST else ""
    axis.set_title(
        f"{dataset}: dots = search trials (val), □ = multi-objective Pareto sets (val), {star}\n"
        f"◆ = final runs of rule {rule.text}, mean ± 95 % CI over seeds (test)", fontsize=9,
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best", ncol=2)
    data = _figure_bytes(figure)
    plt.close(figure)
    return data


def plot_bars(table: pd.DataFrame, dataset: str, rule: Rule = BEST) -> bytes:
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(max(8.0, 0.9 * len(table) * 1.5), 4.2))
    x = np.arange(len(table))
    for axis, metric in zip(axes, METRICS):
        axis.bar(x, table[f"{metric}_mean"], yerr=np.nan_to_num(table[f"{metric}_ci95"]), capsize=3, color="#4c72b0", label="fairtune")
        if f"paper_{metric}_mean" in table:
            axis.scatter(x, table[f"paper_{metric}_mean"], marker="_", s=220, color="#c44e52", zorder=3, label="paper")
        axis.set_xticks(x, table["label"], rotation=60, ha="right", fontsize=8)
        axis.set_title(f"{METRIC_LABELS[metric]} ({'higher' if BETTER[metric] == 'max' else 'lower'} is better)", fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    if "paper_accuracy_mean" in table:
        axes[0].legend(fontsize=7)
    figure.suptitle(f"{dataset}: test metrics, mean ± 95 % CI over seeds (rule {rule.text})", fontsize=10)
    data = _figure_bytes(figure)
    plt.close(figure)
    return data


# -- sensitivity to the searched hyperparameter -----------------------------------------------


@dataclass
class Sensitivity:
    """One searched method's trials against its hyperparameter, and the value its search chose."""

    method: str
    parameter: str
    distribution: str | None
    log_axis: bool
    chosen: float | None
    # value, trial_id, status, epochs and the final-epoch val accuracy, deo_a, deo_m; chosen (bool)
    trials: pd.DataFrame = field(repr=False)


def load_sensitivity(results_dir: Path, dataset: str) -> list[Sensitivity]:
    """Every search of a method with a searched hyperparameter, in paper order. The axis is
    logarithmic for a log-uniform space of positive values (λ spans six decades)."""
    found = []
    layout = Layout(results_dir, dataset)
    for method in in_paper_order(search.method for search in layout.searches() if search.trials_csv.exists()):
        files = layout.search(method)
        try:
            parameter = get_method(method).searched
        except UserError:
            continue  # not the folder of a fairtune method
        fix = f"rerun `fairtune search --dataset {dataset} --method {method}`, or delete the file"
        trials = _read_table(files.trials_csv, (), fix)
        if not parameter or parameter not in trials or trials[parameter].isna().all():
            continue
        values = pd.to_numeric(trials[parameter], errors="coerce")
        distribution = load_space(method).distribution
        chosen_value, chosen_id = None, None
        if files.best.exists():
            best = read_best(layout, method, fix)
            chosen_value, chosen_id = best.hyperparameters.get(parameter), best.trial_id
        ids = trials["trial_id"] if "trial_id" in trials else pd.Series([""] * len(trials), dtype=str)
        if chosen_id is not None and (ids == str(chosen_id)).any():
            chosen = ids == str(chosen_id)
        elif chosen_value is not None:  # a best.json that predates trial ids
            chosen = pd.Series(np.isclose(values, chosen_value, rtol=1e-9, atol=0), index=trials.index)
        else:
            chosen = pd.Series(False, index=trials.index)
        frame = pd.DataFrame({
            "value": values, "trial_id": ids, "status": trials.get("status", "?"),
            "epochs": trials.get("epochs_run", pd.Series(np.nan, index=trials.index)),
            **{m: trials.get(f"final_{m}", pd.Series(np.nan, index=trials.index)) for m in METRICS},
            "chosen": chosen,
        }).sort_values(["value", "trial_id"], ignore_index=True)
        if frame[list(METRICS)].isna().all().all():
            continue  # every trial failed before its first epoch: nothing to plot against the value
        log_axis = distribution == "loguniform" and bool((values.dropna() > 0).all())
        found.append(Sensitivity(method, parameter, distribution, log_axis, chosen_value, frame))
    return found


SENSITIVITY_CAPTION = (
    "Validation metrics (%) at each search trial's last epoch, against the searched hyperparameter. COMPLETED "
    "trials ran every epoch; STOPPED ones were ended early by ASHA (and ERROR ones failed), so their values "
    "come from fewer epochs. ✓ = the trial the search chose (search/<method>/best.json)."
)


def sensitivity_markdown(found: list[Sensitivity]) -> str:
    sections = [SENSITIVITY_CAPTION]
    for item in found:
        symbol = hyperparameter_symbol(item.parameter)
        rows = item.trials
        shown = pd.DataFrame({
            symbol: [f"{v:.4g}" if pd.notna(v) else "–" for v in rows["value"]],
            "Trial": rows["trial_id"].fillna("–"),
            "Status": rows["status"],
            "Epochs": [f"{int(e)}" if pd.notna(e) else "–" for e in rows["epochs"]],
            **{f"Val {METRIC_LABELS[m]}": [f"{v:.2f}" if pd.notna(v) else "–" for v in rows[m]] for m in METRICS},
            "Chosen": np.where(rows["chosen"], "✓", ""),
        })
        axis = "log axis" if item.log_axis else "linear axis"
        sections.append(f"### {_label(item.method)}: {symbol}, {item.distribution or 'unknown space'} ({axis})\n\n"
                        f"{_markdown_grid(shown, left=3)}")
    return "\n\n".join(sections)


def plot_sensitivity(found: list[Sensitivity], dataset: str) -> bytes:
    """One row per method, one panel per validation metric against the searched value."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    figure, axes = plt.subplots(len(found), 3, figsize=(11, 2.9 * len(found) + 0.5), squeeze=False)
    for row, item in zip(axes, found):
        symbol = hyperparameter_symbol(item.parameter)
        done = item.trials["status"] == "COMPLETED"
        for axis, metric in zip(row, METRICS):
            axis.scatter(item.trials["value"][done], item.trials[metric][done], s=24, color="#4c72b0", label="completed")
            axis.scatter(item.trials["value"][~done], item.trials[metric][~done], s=24, marker="x", color="#dd8452",
                         label="stopped early / failed (fewer epochs)")
            if item.chosen is not None:
                axis.axvline(item.chosen, color="black", ls="--", lw=1, label=f"chosen {symbol} = {item.chosen:.3g}")
            if item.log_axis:
                axis.set_xscale("log")
                # Values inside one decade get minor-tick labels that overprint each other: decades only.
                axis.xaxis.set_minor_formatter(NullFormatter())
            axis.set_xlabel(symbol)
            axis.set_title(f"{_label(item.method)}: val {METRIC_LABELS[metric]} (%)", fontsize=9)
            axis.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    figure.suptitle(f"{dataset}: validation metrics at each trial's last epoch against the searched value", fontsize=10)
    figure.tight_layout()
    data = _figure_bytes(figure)
    plt.close(figure)
    return data


# -- writing ----------------------------------------------------------------------------------


def write_reports(results_dir: Path, dataset: str, rules: Sequence[Rule] = (BEST,)) -> Report:
    """Per rule its tables and plots, the sensitivity of every search, and with two rules or more
    the rules side by side. Every input is read, and every bad one refused, before the first write;
    each file is written atomically."""
    rules = list(dict.fromkeys(rules))
    tables = {rule: summarize(load_final_runs(results_dir, dataset, rule), dataset, rule) for rule in rules}
    report = Report(tables, {rule: report_files(results_dir, dataset, rule) for rule in rules})
    paretos = {rule: plot_pareto(results_dir, dataset, tables[rule], rule) for rule in rules}
    sensitivity = load_sensitivity(results_dir, dataset)
    layout = Layout(results_dir, dataset)
    for rule, table in tables.items():
        files = report.files[rule]
        io.write_text(files.markdown, to_markdown(table, rule) + "\n")
        io.write_text(files.csv, to_csv(table))
        io.write_text(files.latex, to_latex(table, rule))
        io.write_bytes(files.pareto, paretos[rule])
        io.write_bytes(files.bars, plot_bars(table, dataset, rule))
    if sensitivity:
        report.sensitivity = SensitivityFiles(layout.sensitivity_plot, layout.sensitivity_table)
        io.write_bytes(report.sensitivity.plot, plot_sensitivity(sensitivity, dataset))
        io.write_text(report.sensitivity.table, sensitivity_markdown(sensitivity) + "\n")
    if len(rules) > 1:
        report.selection = SelectionFiles(layout.selection_table, layout.selection_csv)
        io.write_text(report.selection.markdown, selection_markdown(tables, dataset) + "\n")
        io.write_text(report.selection.csv, to_csv(selection_frame(tables)))
    return report


def write_report(results_dir: Path, dataset: str, rule: Rule = BEST) -> tuple[pd.DataFrame, ReportFiles]:
    """One rule's report (by default the searches' own picks): its table and where it went."""
    report = write_reports(results_dir, dataset, [rule])
    return report.tables[rule], report.files[rule]
