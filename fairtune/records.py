"""JSON records fairtune reads back from ``--results-dir``, validated before use.

Anything on disk may have been truncated by a crash, hand-edited or copied from elsewhere: a record
that is not JSON, or lacks what its reader needs, becomes one UserError naming the file and the fix,
never a KeyError deep inside a command. The schemas list only what the readers use; records may hold
more.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from fairtune.errors import UserError

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


__all__ = ["ANY_RECORD", "BEST_CONFIG", "BEST_CONFIG_VAL", "FINAL_RUN", "problem", "read_record"]
