"""The teacher provider (stored and fitting: loaded; missing or forced: trained and stored; stored with
other settings: refused in one line) and the per-epoch progress line every command prints."""

import json
from dataclasses import replace

import pytest
import torch

from fairtune import io
from fairtune.data import DataOptions, dataset_info
from fairtune.engine import TrainConfig
from fairtune.errors import UserError
from fairtune.models import build_model
from fairtune.progress import epoch_line
from fairtune.teachers import TeacherProvider

OPTIONS = DataOptions(dataset="fmnist-s", seed=0, train_size=200, eval_size=200)
BASE = TrainConfig(method="hkd", epochs=3, batch_size=40, hyperparameters={"T": 4.0})


class Training:
    """A stand-in for training: counts its calls and returns fresh weights and a run record."""

    def __init__(self):
        self.calls = []

    def __call__(self, base, options):
        self.calls.append((base, options))
        torch.manual_seed(len(self.calls))
        return build_model("cnn", 10, 32).state_dict(), {"test": {"accuracy": 50.0}, "calls": len(self.calls)}


def test_missing_teacher_is_trained_with_the_base_then_loaded(tmp_path):
    info, train = dataset_info(OPTIONS), Training()
    provider = TeacherProvider(tmp_path, "fmnist-s", BASE)
    assert provider.to_train(0) and provider.stored(OPTIONS, info) is None
    state, trained = provider.get(OPTIONS, info, train)
    assert trained and train.calls == [(BASE, OPTIONS)]
    files = provider.files(0)
    assert files.weights == tmp_path / "fmnist-s" / "teachers" / "seed0.pt"
    stored = io.load_torch(files.weights)
    assert stored["epochs"] == 3 and stored["identity"]["data"] == OPTIONS.fingerprint()
    assert json.loads(files.metrics.read_text())["calls"] == 1

    again, trained = provider.get(OPTIONS, info, train)  # stored: loaded, not retrained
    assert not trained and len(train.calls) == 1 and all(torch.equal(again[k], state[k]) for k in state)
    _, trained = replace(provider, force=True).get(OPTIONS, info, train)
    assert trained and len(train.calls) == 2 and json.loads(files.metrics.read_text())["calls"] == 2


def test_load_only_provider_names_the_command_and_refuses_other_settings(tmp_path):
    info = dataset_info(OPTIONS)
    with pytest.raises(UserError, match="no teacher at .*fairtune teacher --dataset fmnist-s --seeds 0"):
        TeacherProvider(tmp_path, "fmnist-s").get(OPTIONS, info)
    TeacherProvider(tmp_path, "fmnist-s", BASE).get(OPTIONS, info, Training())
    other = replace(OPTIONS, train_size=100)
    train = Training()
    with pytest.raises(UserError, match=r"other settings \(train_size 200 \(teacher\) vs 100 \(now\)\).*--force"):
        TeacherProvider(tmp_path, "fmnist-s", BASE).get(other, info, train)
    assert train.calls == []  # refused, never retrained behind the user's back


def test_epoch_line_shows_what_the_record_holds():
    full = {"epoch": 2, "stage": "main", "lr": 1e-3, "train/loss": 1.25, "train/ce": 1.0, "train/hkd": 0.25,
            "accuracy": 61.5, "deo_a": 4.25, "deo_m": 9.0, "objective": 57.25}  # fmt: skip
    assert epoch_line(full, 10, "seed 0", "val", 3.21) == (
        "seed 0 epoch   2/10  val acc  61.50  DEO_A   4.25  DEO_M   9.00  obj   57.25  "
        "| main loss 1.2500 (ce 1 hkd 0.25)  lr 1.0e-03  3.2 s"
    )
    part = {"epoch": 3, "accuracy": 53.0, "deo_a": 7.0}  # a final's queue line without the whole epoch
    assert epoch_line(part, 9, "hkd seed 0", "test") == "hkd seed 0 epoch   3/9  test acc  53.00  DEO_A   7.00"
