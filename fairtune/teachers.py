"""Teachers: `scratch` models trained per seed, stored under ``results/<dataset>/teachers/``.

A teacher file records the data settings it was trained on; a student asking for another setting
(skew, sizes, split, architecture) is refused rather than silently given a mismatched teacher.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fairtune import __version__, io
from fairtune.data import DataOptions, DatasetInfo, DatasetSplits
from fairtune.errors import UserError
from fairtune.layout import Layout, TeacherRecord
from fairtune.models import build_model


def teacher_paths(results_dir: Path, dataset: str, seed: int) -> TeacherRecord:
    return Layout(results_dir, dataset).teacher(seed)


def teacher_identity(options: DataOptions, info: DatasetInfo) -> dict:
    """What a teacher must share with its student: data settings and architecture."""
    return {"data": options.fingerprint(), "model": info.model, "num_classes": info.num_classes}


def save_teacher(record: TeacherRecord, state_dict: dict, identity: dict, epochs: int, metrics: dict) -> None:
    """Weights first, metrics second: a metrics file never describes weights that are not on disk."""
    io.save_torch(record.weights, {"state_dict": state_dict, "identity": identity, "epochs": epochs, "version": __version__})
    io.write_json(record.metrics, {"identity": identity, "epochs": epochs, **metrics})


def describe_mismatch(stored: dict, wanted: dict) -> str:
    diffs = []
    for key in sorted(set(stored["data"]) | set(wanted["data"])):
        a, b = stored["data"].get(key), wanted["data"].get(key)
        if a != b:
            diffs.append(f"{key} {a!r} (teacher) vs {b!r} (now)")
    if stored["model"] != wanted["model"]:
        diffs.append(f"model {stored['model']} vs {wanted['model']}")
    return "; ".join(diffs) or "class count differs"


def read_teacher_state(record: TeacherRecord, options: DataOptions, info: DatasetInfo) -> dict:
    """The stored weights of the teacher for these settings; UserError when missing or mismatched."""
    make = f"fairtune teacher --dataset {options.dataset} --seeds {options.seed}"
    if not record.weights.exists():
        raise UserError(f"no teacher at {record.weights}; train it first: {make} (with the same data options)")
    try:
        stored = io.load_torch(record.weights)
        identity = stored["identity"]
        state = stored["state_dict"]
    except Exception as exc:  # a pickle with code, a truncated file, a foreign checkpoint
        raise UserError(f"cannot load teacher {record.weights} ({type(exc).__name__}); retrain it: {make} --force") from None
    wanted = teacher_identity(options, info)
    if identity != wanted:
        raise UserError(
            f"teacher {record.weights} was trained with other settings ({describe_mismatch(identity, wanted)}); "
            f"retrain it with {make} --force and the same options, or use another --results-dir"
        )
    _check_weights(state, info, f"teacher {record.weights}", make)
    return state


def _check_weights(state: dict, info: DatasetInfo, what: str, make: str) -> None:
    """Weights that fit the architecture and are all finite, refused here rather than by every trial."""
    try:
        build_model(info.model, info.num_classes, info.image_size).load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, ValueError) as exc:  # a foreign file under a right identity
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(":")
        raise UserError(f"{what} does not fit the {info.model} model ({first}); retrain it: {make} --force") from None
    broken = [name for name, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if broken:
        raise UserError(f"{what} holds non-finite weights ({broken[0]}); retrain it: {make} --force")


def teacher_model(state_dict: dict, info: DatasetInfo) -> nn.Module:
    """A frozen model (eval mode, no gradient) from teacher weights."""
    model = build_model(info.model, info.num_classes, info.image_size)
    model.load_state_dict(state_dict)
    return model.eval().requires_grad_(False)


def load_teacher(record: TeacherRecord, data: DatasetSplits) -> nn.Module:
    return teacher_model(read_teacher_state(record, data.options, data.info), data.info)
