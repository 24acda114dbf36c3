"""Teachers: `scratch` models trained per seed, stored under ``results/<dataset>/teachers/``.

A teacher file records the data settings it was trained on; a student asking for another setting
(skew, sizes, split, architecture) is refused rather than silently given a mismatched teacher.
``TeacherProvider`` is the one place that decides between loading a stored teacher and training one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from fairtune import __version__, io
from fairtune.data import DataOptions, DatasetInfo, DatasetSplits
from fairtune.engine import TrainConfig
from fairtune.errors import UserError
from fairtune.layout import Layout, TeacherRecord
from fairtune.models import build_model

# Trains the teacher of ``options`` with the protocol ``base``; returns (CPU state dict, run record).
# Here (`fairtune.runs.train_teacher`) or as a Ray task on any node (`fairtune.tune.tasks`).
TeacherTraining = Callable[[TrainConfig, DataOptions], tuple[dict, dict]]


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


@dataclass(frozen=True)
class TeacherProvider:
    """Where every command gets a seed's teacher from: the stored weights, when they are there and fit
    the settings; trained with ``base`` and stored, when they are missing (or all of them, under
    ``force``); refused in one line when the stored ones were trained with other settings.

    ``get`` does it all; a caller that trains elsewhere and later (`final`'s Ray tasks, several seeds
    at once) asks ``stored`` and, for each ``None``, trains and hands the result to ``store``."""

    results_dir: Path
    dataset: str
    base: TrainConfig | None = None  # the protocol a missing teacher is trained with (None: load only)
    force: bool = False  # retrain (and overwrite) stored teachers too

    def files(self, seed: int) -> TeacherRecord:
        return teacher_paths(self.results_dir, self.dataset, seed)

    def to_train(self, seed: int) -> bool:
        """Whether the teacher of ``seed`` will be trained (missing, or ``force``) rather than loaded."""
        return self.force or not self.files(seed).weights.exists()

    def stored(self, options: DataOptions, info: DatasetInfo) -> dict | None:
        """The stored weights, checked against these settings; None when the teacher is to be trained."""
        if self.to_train(options.seed):
            return None
        return read_teacher_state(self.files(options.seed), options, info)

    def store(self, options: DataOptions, info: DatasetInfo, state: dict, record: dict) -> TeacherRecord:
        """Write a teacher trained with ``base`` for ``options``; returns its files."""
        if self.base is None:
            raise ValueError("a TeacherProvider without a base protocol stores no teacher")
        files = self.files(options.seed)
        save_teacher(files, state, teacher_identity(options, info), self.base.epochs, record)
        return files

    def get(self, options: DataOptions, info: DatasetInfo, train: TeacherTraining | None = None) -> tuple[dict, bool]:
        """(weights, trained now): the stored teacher, else trained with ``train`` and stored. Without
        ``train`` a missing teacher is a UserError naming the command that trains it."""
        state = self.stored(options, info)
        if state is not None:
            return state, False
        if train is None or self.base is None:
            return read_teacher_state(self.files(options.seed), options, info), False
        state, record = train(self.base, options)
        self.store(options, info, state, record)
        return state, True
