"""Where everything lives under ``--results-dir``: the one module that names its files and folders.

Every command asks here for a path rather than joining names itself, so the layout below (the
README's "Results layout") is written down once::

    <results-dir>/<dataset>/
      teachers/seed{k}.pt, seed{k}.json       Layout.teacher(k)
      search/<method>/                        Layout.search(method) -> SearchDir
        best.json, trials.csv, pareto.csv, ledger.json, optuna.db
        trials/<id>/state-{epoch:04d}.pt, epochs.jsonl, nonfinite.txt
        trials/hint-stage/state.pt
        tune/                                 Ray Tune's experiment (TUNE_FOLDER)
        tb/<id> <param>=<value>/              TensorBoard run of each trial
      final[-<rule>]/<method>/seed{k}.json    Layout.final_run(method, k, rule)
      final[-<rule>]/<method>/tb/seed{k}/     Layout.final_tb(method, k, rule)
      train/<method>/<run>/seed{k}.json       Layout.train_run(method, run, k)
      table[-<rule>].{md,csv,tex,png}, pareto[-<rule>].png, sensitivity.{png,md}, selection.{md,csv}
      protocol.log, protocol.json

A ``rule`` is a ``fairtune.selection.Rule`` (None or ``best``: the search's own pick, in ``final/``
and ``table.*`` where they have always been). Plain paths only: nothing here reads, writes or imports
more than ``pathlib``, so any process (a Ray worker, a test, a benchmark) can use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fairtune.selection import Rule

TUNE_FOLDER = "tune"  # Ray Tune's own files (a fresh experiment per driver session: trial folders, progress)
TB_FOLDER = "tb"
HINT_STAGE = "hint-stage"  # the trial folder of FitNet's stage 1, shared by every trial of a search
_STATE = re.compile(r"state-(\d+)\.pt")


def _best(rule: Rule | None) -> bool:
    return rule is None or rule.name == "best"


@dataclass(frozen=True)
class TeacherRecord:
    """A teacher's two files: its weights and its run record."""

    weights: Path
    metrics: Path


@dataclass(frozen=True)
class SearchDir:
    """``search/<method>/``: one search's experiment folder (the Ray workers get it as a string)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def method(self) -> str:
        return self.path.name

    @property
    def best(self) -> Path:
        return self.path / "best.json"

    @property
    def trials_csv(self) -> Path:
        return self.path / "trials.csv"

    @property
    def pareto_csv(self) -> Path:
        return self.path / "pareto.csv"

    @property
    def ledger(self) -> Path:
        return self.path / "ledger.json"

    @property
    def study(self) -> Path:
        """The searcher's Optuna study (SQLite)."""
        return self.path / "optuna.db"

    def trial(self, trial_id: str) -> Path:
        """A trial's own folder: its state files and its log of epochs run."""
        return self.path / "trials" / trial_id

    def state_file(self, trial_id: str, epoch: int) -> Path:
        return self.trial(trial_id) / f"state-{epoch:04d}.pt"

    def state_files(self, trial_id: str) -> list[Path]:
        """The trial's saved states, oldest epoch first."""
        found = [(int(m.group(1)), p) for p in self.trial(trial_id).glob("state-*.pt") if (m := _STATE.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    def epoch_log(self, trial_id: str) -> Path:
        """One JSON line per epoch actually run, recomputed ones included: proof of what ran."""
        return self.trial(trial_id) / "epochs.jsonl"

    def failure_marker(self, trial_id: str) -> Path:
        """Why the trial failed for good (a non-finite loss): any retry raises it again at once."""
        return self.trial(trial_id) / "nonfinite.txt"

    @property
    def hint_stage_state(self) -> Path:
        """FitNet's stage 1, trained once per search (see search._shared_hint_stage)."""
        return self.trial(HINT_STAGE) / "state.pt"

    def tb_run(self, trial_id: str, parameter: str | None = None, value: float | None = None) -> Path:
        """``tb/t000 lam=3``: short enough for TensorBoard's sidebar, and says which trial it is."""
        name = f"{trial_id} {parameter}={value:.4g}" if parameter and value is not None else trial_id
        return self.path / TB_FOLDER / name


@dataclass(frozen=True)
class Layout:
    """The files of one dataset under ``results_dir``."""

    results_dir: Path
    dataset: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "results_dir", Path(self.results_dir))

    @property
    def root(self) -> Path:
        """``<results-dir>/<dataset>``: every file of the dataset is under it (TensorBoard's --logdir)."""
        return self.results_dir / self.dataset

    # -- teachers, searches, final and plain runs ----------------------------------------------------
    def teacher(self, seed: int) -> TeacherRecord:
        folder = self.root / "teachers"
        return TeacherRecord(folder / f"seed{seed}.pt", folder / f"seed{seed}.json")

    @property
    def search_root(self) -> Path:
        return self.root / "search"

    def search(self, method: str) -> SearchDir:
        return SearchDir(self.search_root / method)

    def searches(self) -> list[SearchDir]:
        """Every folder under ``search/``, by method name (whatever it holds: ask it for its files)."""
        return [SearchDir(p) for p in sorted(self.search_root.glob("*")) if p.is_dir()]

    def final_dir(self, rule: Rule | None = None) -> Path:
        """Where the final reruns of the configs ``rule`` picks live: ``final/`` for best, else
        ``final-<slug>/``, so a rule's reruns never overwrite another's."""
        return self.root / ("final" if _best(rule) else f"final-{rule.slug}")

    def final_run(self, method: str, seed: int, rule: Rule | None = None) -> Path:
        return self.final_dir(rule) / method / f"seed{seed}.json"

    def final_runs(self, rule: Rule | None = None, method: str = "*") -> list[Path]:
        """The seed files ``rule``'s final holds (of every method, or of ``method``), sorted."""
        return sorted(self.final_dir(rule).glob(f"{method}/seed*.json"))

    def final_tb(self, method: str, seed: int, rule: Rule | None = None) -> Path:
        """A final rerun's TensorBoard run, beside its record."""
        return self.final_dir(rule) / method / TB_FOLDER / f"seed{seed}"

    def train_run(self, method: str, run: str, seed: int) -> Path:
        """A plain `fairtune train` run; ``run`` names its setting (see ``runs.train_run_path``)."""
        return self.root / "train" / method / run / f"seed{seed}.json"

    # -- what `report` and `protocol` write -----------------------------------------------------------
    def table(self, suffix: str, rule: Rule | None = None) -> Path:
        """``table.<suffix>`` (md, csv, tex, png: the bars) for best, ``table-<slug>.<suffix>`` otherwise."""
        return self.root / f"table{self._rule_suffix(rule)}.{suffix}"

    def pareto_plot(self, rule: Rule | None = None) -> Path:
        return self.root / f"pareto{self._rule_suffix(rule)}.png"

    @property
    def sensitivity_plot(self) -> Path:
        return self.root / "sensitivity.png"

    @property
    def sensitivity_table(self) -> Path:
        return self.root / "sensitivity.md"

    @property
    def selection_table(self) -> Path:
        return self.root / "selection.md"

    @property
    def selection_csv(self) -> Path:
        return self.root / "selection.csv"

    @property
    def protocol_log(self) -> Path:
        """Every line `fairtune protocol`'s searches and finals print."""
        return self.root / "protocol.log"

    @property
    def protocol_summary(self) -> Path:
        """The last protocol run's timings and slot use."""
        return self.root / "protocol.json"

    @staticmethod
    def _rule_suffix(rule: Rule | None) -> str:
        return "" if _best(rule) else f"-{rule.slug}"


__all__ = ["HINT_STAGE", "TB_FOLDER", "TUNE_FOLDER", "Layout", "SearchDir", "TeacherRecord"]
