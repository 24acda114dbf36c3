"""JSON records fairtune reads back from ``--results-dir``, validated before use.

Anything on disk may have been truncated by a crash, hand-edited or copied from elsewhere: a record
that is not JSON, or lacks what its reader needs, becomes one UserError naming the file and the fix,
never a KeyError deep inside a command. The schemas list only what the readers use; records may hold
more.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema

from fairtune.errors import UserError
from fairtune.layout import Layout

_NUMBER = {"type": "number"}
_METRICS = {"type": "object", "required": ["accuracy", "deo_a"], "properties": {"accuracy": _NUMBER, "deo_a": _NUMBER, "deo_m": _NUMBER}}
_HYPERPARAMETERS = {"type": "object", "additionalProperties": _NUMBER}

# search/<method>/best.json as `final` and `train` read it (the chosen values, the search's settings).
BEST_CONFIG = {
    "type": "object",
    "required": ["hyperparameters"],
    "properties": {
        "hyperparameters": _HYPERPARAMETERS,
        "val": _METRICS,
        "settings": {"type": "object", "properties": {"train": {"type": "object"}, "data": {"type": "object"}}},
    },
}
# ... and as `report` reads it: only the chosen config's validation metrics, for the Pareto plot.
BEST_CONFIG_VAL = {**BEST_CONFIG, "required": ["val"]}
# Any record: `final` compares an existing seed file's settings key by key (_same_run), tolerantly.
ANY_RECORD = {"type": "object"}
# final/<method>/seed<k>.json: one final run's test metrics, as `report` reads them.
FINAL_RUN = {
    "type": "object",
    "required": ["seed", "test"],
    "properties": {
        "seed": {"type": "integer", "minimum": 0},
        "hyperparameters": _HYPERPARAMETERS,
        "test": {**_METRICS, "required": ["accuracy", "deo_a", "deo_m"]},
        # the rule that chose the run's config (`final --select`); older files lack it
        "selection": {"type": "object", "required": ["rule"], "properties": {"rule": {"type": "string"}}},
    },
}


def problem(path: Path, schema: dict) -> tuple[dict | None, str | None]:
    """(the record, None) when ``path`` holds a valid record, else (None, what is wrong with it)."""
    try:
        record = json.loads(Path(path).read_text())
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or type(exc).__name__})"
    except ValueError as exc:  # not JSON, or not UTF-8
        return None, f"is not JSON ({str(exc)[:80]})"
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(record))
    if error is None:
        return record, None
    where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    message = error.message if len(error.message) <= 100 else error.message[:97] + "..."
    return None, f"is not a valid record ({f'{where}: ' if where else ''}{message})"


def read_record(path: Path, schema: dict, fix: str) -> dict:
    """The validated record at ``path``; UserError naming the file, what is wrong and ``fix``."""
    record, why = problem(path, schema)
    if why is not None:
        raise UserError(f"{path} {why}; {fix}")
    return record


# -- search/<method>/best.json ----------------------------------------------------------------------


def _present(pairs) -> dict:
    """The (key, value) pairs whose value is set: a record leaves out what it does not know."""
    return {key: value for key, value in pairs if value is not None}


@dataclass(frozen=True)
class ValMetrics:
    """The chosen trial's metrics on the selection split at its last epoch."""

    accuracy: float
    deo_a: float
    deo_m: float | None = None
    acc_matrix: list | None = None  # acc[g][c]; written even when null
    epoch: int | None = None

    @classmethod
    def from_json(cls, record: dict) -> "ValMetrics":
        return cls(record["accuracy"], record["deo_a"], record.get("deo_m"), record.get("acc_matrix"), record.get("epoch"))

    def to_json(self) -> dict:
        return {
            **_present([("accuracy", self.accuracy), ("deo_a", self.deo_a), ("deo_m", self.deo_m)]),
            "acc_matrix": self.acc_matrix,
            **_present([("epoch", self.epoch)]),
        }


@dataclass(frozen=True)
class BestSettings:
    """What the search ran with: epochs, trials asked for, data fingerprint and training record."""

    epochs: int | None = None
    num_samples: int | None = None
    data: dict | None = None  # DataOptions.fingerprint()
    train: dict | None = None  # TrainConfig.record()

    @classmethod
    def from_json(cls, record: dict) -> "BestSettings":
        return cls(record.get("epochs"), record.get("num_samples"), record.get("data"), record.get("train"))

    def to_json(self) -> dict:
        return _present([("epochs", self.epochs), ("num_samples", self.num_samples), ("data", self.data), ("train", self.train)])


@dataclass(frozen=True)
class BestConfig:
    """A search's chosen config, ``search/<method>/best.json``: written by the search
    (``fairtune.tune.search.best_record``), read by `train`, `final`, `report` and `protocol` through
    ``read_best`` only. A record written by an older fairtune (or by hand) may lack any field but
    ``hyperparameters``: a missing field is None, and ``to_json`` leaves out the fields that are
    None but ``searched`` (null: the method searches nothing)."""

    method: str | None = None
    dataset: str | None = None
    hyperparameters: dict[str, float] = field(default_factory=dict)
    searched: str | None = None
    objective: str | None = None  # the --objective the search optimised (e.g. acc-deo_a, acc,deo_a)
    mode: str | None = None  # max or min: the direction of objective_value
    objective_value: float | None = None
    objectives: dict[str, str] | None = None  # a multi-objective search: metric -> direction
    scalarised: str | None = None  # ... the scalar objective_value, ASHA's rungs and this pick compare
    pareto_trials: list[str] | None = None  # ... the trial ids of its validation Pareto set
    val: ValMetrics | None = None
    trial_id: str | None = None
    selection_split: str | None = None
    budget: dict | None = None  # trials, epochs run and computed, failures, seconds
    settings: BestSettings | None = None

    @classmethod
    def from_json(cls, record: dict) -> "BestConfig":
        """From a record ``read_best`` validated."""
        val, settings = record.get("val"), record.get("settings")
        return cls(
            method=record.get("method"), dataset=record.get("dataset"), hyperparameters=dict(record.get("hyperparameters") or {}),
            searched=record.get("searched"), objective=record.get("objective"), mode=record.get("mode"),
            objective_value=record.get("objective_value"), objectives=record.get("objectives"), scalarised=record.get("scalarised"),
            pareto_trials=record.get("pareto_trials"), val=ValMetrics.from_json(val) if val is not None else None,
            trial_id=record.get("trial_id"), selection_split=record.get("selection_split"), budget=record.get("budget"),
            settings=BestSettings.from_json(settings) if settings is not None else None,
        )

    def to_json(self) -> dict:
        """The record as best.json holds it, keys in the order the search has always written them."""
        return {
            **_present([("method", self.method), ("dataset", self.dataset)]),
            "hyperparameters": self.hyperparameters,
            "searched": self.searched,
            **_present([
                ("objective", self.objective), ("mode", self.mode), ("objective_value", self.objective_value),
                ("objectives", self.objectives), ("scalarised", self.scalarised), ("pareto_trials", self.pareto_trials),
                ("val", self.val.to_json() if self.val is not None else None), ("trial_id", self.trial_id),
                ("selection_split", self.selection_split), ("budget", self.budget),
                ("settings", self.settings.to_json() if self.settings is not None else None),
            ]),
        }


def read_best(layout: Layout, method: str, fix: str | None = None, need_val: bool = False) -> BestConfig:
    """The best config of ``method``'s search, validated once; UserError (one line: the file, what is
    wrong, ``fix``, by default: rerun the search or delete the file) for a record that is not JSON or
    lacks what the readers use. ``need_val``: only the validation metrics are needed, and must be there
    (the report's Pareto plot). The file must exist: each caller says what a missing one means."""
    path = layout.search(method).best
    fix = fix or f"rerun `fairtune search --method {method} --dataset {layout.dataset}`, or delete the file"
    return BestConfig.from_json(read_record(path, BEST_CONFIG_VAL if need_val else BEST_CONFIG, fix))


__all__ = [
    "ANY_RECORD", "BEST_CONFIG", "BEST_CONFIG_VAL", "FINAL_RUN", "BestConfig", "BestSettings", "ValMetrics", "problem", "read_best",
    "read_record",
]
