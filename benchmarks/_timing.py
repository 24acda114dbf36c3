"""Shared by the benchmarks: paired timing, a one-line machine description, RESULTS.md entries.

Reference and fairtune run interleaved (ref, fairtune, ref, fairtune, ...) so that load from other
processes hits both alike; each repeat gives one paired ratio, and figures are medians with the
min–max spread over repeats.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
RESULTS_NOTE = """# Benchmark results

Appended by `make bench`: each `benchmarks/bench_*.py` adds one dated entry with the machine it ran
on; nothing here is typed by hand. `bench_mfd_loss`, `bench_ad_loss` and `bench_epoch` time a
reference written like the official MFD code (Python loops over cells or adversaries; PIL +
DataLoader input) and fairtune in the same process, interleaved (the loss benchmarks first check
that both give the same values and gradients); figures are medians over the repeats with the min–max
spread, and a ratio is reference time ÷ fairtune time per paired repeat (higher is better).
`bench_search` runs the same search twice, with and without ASHA's early stopping, and compares
epochs spent and the result. On shared CPU machines other jobs add noise: compare the ratios, not
the absolute times, across entries.
"""


@dataclass(frozen=True)
class Spread:
    """Median and range of repeated measurements."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def text(self, fmt: str = ".3g", unit: str = "") -> str:
        lo, hi = min(self.values), max(self.values)
        return f"{self.median:{fmt}}{unit} ({lo:{fmt}}–{hi:{fmt}})"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(dev: torch.device) -> str:
    where = f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda})" if dev.type == "cuda" else "CPU"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}; device: {where}"
    )


def time_call(fn: Callable[[], object], number: int) -> float:
    """Seconds per call of ``fn`` averaged over ``number`` calls (torch.utils.benchmark: CUDA-synced)."""
    from torch.utils.benchmark import Timer

    # Timer defaults to one thread; time at the thread count fairtune itself trains with.
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(number).mean


def interleaved(measures: dict[str, Callable[[], float]], repeats: int) -> dict[str, Spread]:
    """Run the measurements in turn, ``repeats`` rounds; each callable returns seconds (smaller is better)."""
    values: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            values[name].append(measure())
    return {name: Spread(tuple(v)) for name, v in values.items()}


def ratio(slow: Spread, fast: Spread) -> Spread:
    """Per-round ratios of two interleaved measurements."""
    return Spread(tuple(a / b for a, b in zip(slow.values, fast.values)))


def paired(reference: Callable[[], float], fairtune: Callable[[], float], repeats: int) -> tuple[Spread, Spread, Spread]:
    """(reference, fairtune, reference ÷ fairtune) over ``repeats`` interleaved rounds."""
    spreads = interleaved({"reference": reference, "fairtune": fairtune}, repeats)
    return spreads["reference"], spreads["fairtune"], ratio(spreads["reference"], spreads["fairtune"])


def wall(fn: Callable[[], object], dev: torch.device) -> float:
    """Wall-clock seconds of one call, device work included."""
    synchronize(dev)
    start = time.perf_counter()
    fn()
    synchronize(dev)
    return time.perf_counter() - start


def cpu_time() -> float:
    """CPU seconds used so far by this process (all threads) and its finished children (DataLoader
    workers). Unlike wall time it barely moves when other jobs share the cores."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def verdict(ratio: Spread, target: float) -> str:
    met = "met" if ratio.median >= target else "NOT met"
    return f"{ratio.text('.1f', '×')}; target ≥ {target:g}×: {met}"


def append_results(title: str, dev: torch.device, lines: list[str]) -> None:
    """Print the entry and append it, dated, to RESULTS.md (created with its note on first use)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entry = [f"## {title} — {stamp}", "", f"Machine: {machine_info(dev)}.", "", *lines, ""]
    text = "\n".join(entry)
    print(text)
    if not RESULTS.exists():
        RESULTS.write_text(RESULTS_NOTE)
    with RESULTS.open("a") as file:
        file.write("\n" + text)
