"""fairtune's own record of a search: what has really happened to every trial, written atomically.

Ray Tune's saved experiment state is copied into the results folder in a background thread, file by
file, and lags its driver (docs/ray.md): a killed driver can leave it torn, stale by a step, or naming
a checkpoint that is gone. fairtune therefore never restores Tune's state. The driver writes this
ledger (``ledger.json``, temporary file + rename) on every trial event — created, epoch recorded,
stopped by ASHA, completed, failed — and a resumed search launches a fresh Tuner from it: finished
trials stay as they are, interrupted ones continue from their own newest state file, and only the
trials still missing are created. The searcher's memory is Optuna's own storage beside it.

Pure Python: the Ray- and Optuna-facing pieces live in ``fairtune.tune.search``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fairtune import io
from fairtune.errors import UserError
from fairtune.layout import SearchDir
from fairtune.metrics import objective_mode

# The config key that carries fairtune's trial id (t000 ...) into the trial; not a hyperparameter.
TRIAL_KEY = "fairtune_trial"
FORMAT = 1
RUNNING, COMPLETED, STOPPED, ERROR = "RUNNING", "COMPLETED", "STOPPED", "ERROR"
FINISHED = (COMPLETED, STOPPED, ERROR)
# What the ledger keeps of each epoch: enough for trials.csv, best.json, ASHA's rungs and the plots,
# and the node that computed it ({"id": Ray's node id, "hostname": ...}).
EPOCH_KEYS = ("epoch", "stage2_epoch", "accuracy", "deo_a", "deo_m", "objective", "loss", "acc_matrix", "node")


@dataclass
class TrialRecord:
    id: str  # fairtune's trial id (t000, t001 ...): stable across driver sessions, unlike Tune's
    config: dict  # the sampled hyperparameters
    optuna_number: int | None = None
    status: str = RUNNING
    epochs: list[dict] = field(default_factory=list)
    error: str = ""

    def value_at(self, clock: str, time: float, key: str = "objective") -> float | None:
        """``key`` of the first epoch whose ``clock`` (e.g. ASHA's time attribute) reached ``time``:
        the result ASHA records at that rung."""
        for record in self.epochs:
            if record.get(clock, -1) >= time:
                return record[key]
        return None

    @property
    def epochs_run(self) -> int:
        return self.epochs[-1]["epoch"] if self.epochs else 0


@dataclass
class Ledger:
    path: Path
    settings: dict  # what defines the search: a resume with other values is refused
    trials: list[TrialRecord] = field(default_factory=list)
    seconds_before: float = 0.0  # driver time of earlier sessions
    sessions: int = 0
    # Proposals the sampler repeated: never trained, told to Optuna with the earlier trial's result.
    repeats: list[dict] = field(default_factory=list)  # {"optuna_number": n, "same_as": trial id}
    _started: float = field(default_factory=time.monotonic, repr=False)

    # -- persistence ----------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, settings: dict) -> "Ledger":
        ledger = cls(SearchDir(folder).ledger, settings, sessions=1)
        ledger.save()
        return ledger

    @classmethod
    def load(cls, folder: Path) -> "Ledger":
        path = SearchDir(folder).ledger
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                raise ValueError(f"not a format-{FORMAT} ledger")
            trials = [TrialRecord(**t) for t in raw["trials"]]
            ledger = cls(path, raw["settings"], trials, float(raw["seconds"]), int(raw["sessions"]), list(raw["repeats"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(
                f"cannot read the search record {path} ({exc}); it is written only by fairtune — restore it, "
                "or delete the folder to start the search over"
            ) from None
        return ledger

    def begin_session(self) -> None:
        """Count this driver session; its time runs from now."""
        self.sessions += 1
        self._started = time.monotonic()
        self.save()

    @property
    def seconds(self) -> float:
        """Driver time over every session, this one up to now."""
        return self.seconds_before + time.monotonic() - self._started

    def save(self) -> None:
        io.write_json(self.path, {
            "format": FORMAT,
            "settings": self.settings,
            "seconds": round(self.seconds, 3),
            "sessions": self.sessions,
            "trials": [vars(t) for t in self.trials],
            "repeats": self.repeats,
        })

    # -- events ---------------------------------------------------------------------------------
    def add(self, config: dict, optuna_number: int | None) -> TrialRecord:
        trial = TrialRecord(f"t{len(self.trials):03d}", dict(config), optuna_number)
        self.trials.append(trial)
        self.save()
        return trial

    def add_repeat(self, optuna_number: int, same_as: str) -> None:
        self.repeats.append({"optuna_number": optuna_number, "same_as": same_as})
        self.save()

    def find(self, config: dict) -> TrialRecord | None:
        """The trial that already ran (or runs) this config."""
        return next((t for t in self.trials if t.config == config), None)

    def get(self, trial_id: str) -> TrialRecord:
        return next(t for t in self.trials if t.id == trial_id)

    def record_epoch(self, trial_id: str, metrics: dict, stopped: bool = False) -> bool:
        """Keep one epoch's result (a re-reported epoch replaces its record); ``stopped``: ASHA's
        decision on it. Returns whether the epoch was new."""
        trial = self.get(trial_id)
        record = {k: metrics[k] for k in EPOCH_KEYS if k in metrics}
        known = [i for i, e in enumerate(trial.epochs) if e["epoch"] == record["epoch"]]
        if known:
            trial.epochs[known[0]] = record
        else:
            trial.epochs.append(record)
            trial.epochs.sort(key=lambda e: e["epoch"])
        if stopped and trial.status == RUNNING:
            trial.status = STOPPED
        self.save()
        return not known

    def finish(self, trial_id: str, status: str, error: str = "") -> None:
        trial = self.get(trial_id)
        if trial.status in FINISHED:
            return
        trial.status, trial.error = status, error
        self.save()

    # -- questions ------------------------------------------------------------------------------
    def unfinished(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.status == RUNNING]

    def complete(self, num_samples: int) -> bool:
        return len(self.trials) >= num_samples and not self.unfinished()


def differences(recorded: dict, wanted: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, recorded, wanted) for every setting that differs, nested dicts walked."""
    found = []
    for key in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append((f"{prefix}{key}", old, new))
    return found


def trials_table(ledger: Ledger, parameter: str | None, objective: str) -> pd.DataFrame:
    """One row per trial: its hyperparameter, final and best metrics, epochs run, status, failure reason,
    and the nodes (Ray node ids, hostnames) its epochs ran on."""
    mode = objective_mode(objective)
    rows = []
    for trial in ledger.trials:
        row = {
            "trial_id": trial.id,
            parameter or "parameter": trial.config.get(parameter) if parameter else None,
            "epochs_run": trial.epochs_run,
            "status": trial.status,
            "error": trial.error,
        }
        if trial.epochs:
            last = trial.epochs[-1]
            pick = max if mode == "max" else min
            best = pick(trial.epochs, key=lambda e: e["objective"])
            for key in ("accuracy", "deo_a", "deo_m", "objective"):
                row[f"final_{key}"] = float(last[key])
                row[f"best_{key}"] = float(best[key])
            row["best_epoch"] = int(best["epoch"])
            row["final_acc_matrix"] = last.get("acc_matrix", "")
            # Where its epochs ran, in order; several when a retry or a resume continued it elsewhere.
            nodes = [e["node"] for e in trial.epochs if e.get("node")]
            row["node"] = " ".join(dict.fromkeys(n["id"] for n in nodes))
            row["hostname"] = " ".join(dict.fromkeys(n["hostname"] for n in nodes))
        rows.append(row)
    return pd.DataFrame(rows)
