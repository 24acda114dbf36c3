"""benchmarks/gpu_check.sh: its CPU smoke path end to end (so the GPU run cannot rot between the rare
GPU sessions), and the arithmetic of its extrapolation and ASHA model."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_smoke_run_passes_every_check(tmp_path):
    """The whole script on CPU at tiny sizes: bf16-vs-fp32 steps of every method family, 1 and 2
    packed worker processes, a Ray Tune search + final through the CLI, the extrapolation."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] is True and summary["ok"] is True
    assert set(summary["sections"]) == {"correctness", "throughput", "ray", "extrapolation"}
    assert all(s["ok"] for s in summary["sections"].values()), summary["sections"]

    correctness = summary["correctness"]
    rows = {r["method"]: r for r in correctness["rows"]}
    assert set(rows) == set(gpu_check.FAMILIES)
    assert rows["fitnet"]["stage"] == "hint" and rows["mfd"]["stage"] == "main"
    tol = correctness["tolerance"]["bf16_vs_fp32"]["rtol"]
    for method, row in rows.items():
        assert row["ok"] and row["steps"] >= 2, row
        assert row["bf16"]["finite"] and row["bf16"]["close"], row
        assert 0 <= row["bf16"]["max_rel_dev"] <= tol, row
        assert _finite_positive(row["fp32_first_loss"]), row
        # The bf16 run really ran in bf16: the losses differ from float32 (not the same run twice).
        assert row["bf16"]["max_rel_dev"] > 0, row
    for precision, learn in correctness["learning"].items():
        assert learn["falls"] and learn["epoch_losses"][-1] < learn["epoch_losses"][0], (precision, learn)

    throughput = summary["throughput"]
    measured = {(r["method"], r["n"]) for r in throughput["rows"]}
    assert measured == {(m, n) for m in ("mfd", "scratch") for n in (1, 2)}
    assert _finite_positive(throughput["flops_per_training_image"])
    for row in throughput["rows"]:
        for key in ("per_trial_images_s", "total_images_s", "tflops", "setup_s"):
            assert _finite_positive(row[key]), (key, row)
        assert row["total_images_s"] >= row["per_trial_images_s"] * 0.999 * row["n"] - 1e-9 or row["n"] == 1

    ray = summary["ray"]
    search = ray["search"]
    assert search["trials"] == 2 and search["failed_trials"] == 0 and search["epochs_run"] >= 2
    assert 0 <= search["asha_saving"] < 1
    assert {"cifar10s/final/mfd/seed0.json", "cifar10s/final/scratch/seed0.json"} <= set(ray["final"]["records"])
    assert ray["final"]["table"] and _finite_positive(ray["search_wall_s"]) and _finite_positive(ray["final_wall_s"])
    assert all(v["code"] == 0 for v in ray["driver"].values())

    extrapolation = summary["extrapolation"]
    assert _finite_positive(extrapolation["packed_hours"])
    assert extrapolation["sequential_hours"] >= extrapolation["packed_hours"] * 0.999
    assert 0 < extrapolation["asha_fraction"] < 1
    assert extrapolation["measured"]["model_fraction_same_setting"] == pytest.approx(1 - search["asha_saving"])

    text = (out / "summary.md").read_text()
    for heading in ("## Correctness", "## Throughput", "## Ray Tune", "## Extrapolation", "**Overall: PASS**"):
        assert heading in text
    assert (out / "logs.tar.gz").stat().st_size > 0
    assert "Overall: PASS" in proc.stdout  # the table is printed last, for the device tool's output tail


def test_compare_flags_nan_and_large_deviations():
    ok = gpu_check.compare([1.0, 2.01], [1.0, 2.0], rtol=1e-2, atol=0)
    assert ok["close"] and ok["finite"] and ok["max_rel_dev"] == pytest.approx(0.005)
    assert not gpu_check.compare([1.0, 2.1], [1.0, 2.0], rtol=1e-2, atol=0)["close"]
    nan = gpu_check.compare([1.0, float("nan")], [1.0, 2.0], rtol=1, atol=1)
    assert not nan["close"] and not nan["finite"]
    assert not gpu_check.compare([1.0], [1.0, 2.0], rtol=1, atol=1)["close"]  # a step went missing


def test_asha_rungs_are_rays():
    assert gpu_check.asha_rungs(50, 5, 3) == [5, 15, 45]
    assert gpu_check.asha_rungs(3, 1, 3) == [1, 3]
    assert gpu_check.asha_rungs(1, 1, 3) == [1]
    async_hyperband = pytest.importorskip("ray.tune.schedulers.async_hyperband")
    for max_t, grace in ((50, 5), (3, 1), (75, 30), (10, 1)):
        bracket = async_hyperband._Bracket(grace, max_t, 3, 0)
        assert sorted(m for m, _ in bracket._rungs) == gpu_check.asha_rungs(max_t, grace, 3)


def test_asha_model_matches_rays_rule():
    """The model's expected epoch share equals a simulation that asks Ray's own bracket."""
    async_hyperband = pytest.importorskip("ray.tune.schedulers.async_hyperband")
    from ray.tune.schedulers import TrialScheduler

    class Trial:
        def __init__(self, trial_id):
            self.trial_id = trial_id

    trials, max_t, grace, rf, reps = 16, 50, 5, 3, 300
    rng = random.Random(1)
    total = 0
    for _ in range(reps):
        bracket = async_hyperband._Bracket(grace, max_t, rf, 0)
        quality = [rng.random() for _ in range(trials)]
        alive, previous, epochs = list(range(trials)), 0, 0
        for rung in [r for r in gpu_check.asha_rungs(max_t, grace, rf) if r < max_t]:
            epochs += len(alive) * (rung - previous)
            previous = rung
            rng.shuffle(alive)
            alive = [t for t in alive if bracket.on_result(Trial(str(t)), rung, quality[t]) == TrialScheduler.CONTINUE]
        total += epochs + len(alive) * (max_t - previous)
    ray_fraction = total / reps / (trials * max_t)
    model = gpu_check.asha_epoch_fraction(trials, max_t, grace, rf, reps=reps)
    assert model == pytest.approx(ray_fraction, abs=0.03)
    assert 0.2 < model < 0.5
    assert gpu_check.asha_epoch_fraction(1, 50, 5, 3, reps=10) == 1.0  # one trial is never stopped
    assert gpu_check.asha_epoch_fraction(16, 1, 1, 3, reps=10) == 1.0  # no rung below the last epoch


def test_extrapolation_adds_up_the_protocol():
    """With one rate R everywhere and no early stopping, the packed time is all images / R."""
    rate = 10_000.0
    rates = {m: {1: rate, 2: rate, 16: rate} for m in ("mfd", "scratch")}
    result = gpu_check.extrapolate(rates, asha_fraction=1.0)
    images = gpu_check.cifar10s_epoch_images()
    assert images["random"] == 45_000 // 128 * 128
    assert images["balanced"] == 3600 // 6 * 6 * 20  # largest cell 3,600 images, 6 per cell per batch
    epochs = {"hkd": 50, "fitnet": 75, "at": 50, "nst": 50, "ss": 50, "ad": 50, "ss+hkd": 50, "ss+fitnet": 75,
              "ad+hkd": 50, "ad+fitnet": 50, "mfd": 50}
    balanced = {"ss", "ss+hkd", "ss+fitnet", "mfd"}
    per_epoch = {m: images["balanced" if m in balanced else "random"] for m in epochs}
    search = sum((1 if m == "ss" else 16) * epochs[m] * per_epoch[m] for m in epochs)
    teachers = 4 * 50 * images["random"]
    finals = sum(4 * epochs[m] * per_epoch[m] for m in epochs)
    assert result["packed_hours"] == pytest.approx((search + teachers + finals) / rate / 3600)
    assert result["sequential_hours"] >= result["packed_hours"]
    # ASHA's share scales the searches only.
    half = gpu_check.extrapolate(rates, asha_fraction=0.5)
    ss = 50 * per_epoch["ss"]
    assert half["packed_hours"] == pytest.approx(((search - ss) / 2 + ss + teachers + finals) / rate / 3600)
    # Packing that doubles the total rate halves the packed estimate.
    faster = gpu_check.extrapolate({m: {1: rate, 16: 2 * rate} for m in ("mfd", "scratch")}, asha_fraction=1.0)
    assert faster["packed_hours"] == pytest.approx(result["packed_hours"] / 2)
