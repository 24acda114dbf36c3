"""`fairtune protocol` against the sequential `search` loop + `final`, at the demo's sizes.

Both arms run the same protocol (scratch, hkd, ss, ad, mfd, ad+hkd on fmnist-s, 3000 training images,
4 epochs, 3 trials per search, seeds 0 1) as subprocesses, one after the other on this machine, each
from an empty results folder. Measured: wall time, and the machine's CPU use sampled every second while
the arm runs (psutil; the share of all cores busy — the same yardstick for both arms, whatever Ray
reserves). Checked: both arms choose the same configs and write the same table means.
Needs Ray and the Fashion-MNIST files (`make bench` installs both).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

from _timing import append_results, device

METHODS = ("scratch", "hkd", "ss", "ad", "mfd", "ad+hkd")
SEEDS = ("0", "1")
DATA = ["--dataset", "fmnist-s", "--train-size", "3000", "--eval-size", "1000"]
SEARCH = ["--max-epochs", "4", "--num-samples", "3", "--grace-period", "1"]
FAIRTUNE = [sys.executable, "-m", "fairtune"]


class CpuUse:
    """Mean share of all cores busy while the block runs, sampled once a second."""

    def __enter__(self):
        import psutil

        self.samples: list[float] = []
        self.done = threading.Event()
        psutil.cpu_percent()  # the first call only sets the baseline

        def sample() -> None:
            while not self.done.wait(1.0):
                self.samples.append(psutil.cpu_percent() / 100)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        self.done.set()
        self.thread.join()

    @property
    def mean(self) -> float:
        return sum(self.samples) / max(len(self.samples), 1)


def run(argv: list[str], log: Path) -> None:
    with log.open("ab") as handle:
        subprocess.run([*FAIRTUNE, *argv], check=True, stdout=handle, stderr=subprocess.STDOUT)


def sequential(results: Path, log: Path) -> None:
    for method in METHODS:
        run(["search", "--method", method, *DATA, *SEARCH, "--results-dir", str(results)], log)
    run(["final", *DATA, "--seeds", *SEEDS, "--results-dir", str(results)], log)


def protocol(results: Path, log: Path) -> None:
    run(["protocol", "--method", *METHODS, *DATA, *SEARCH, "--seeds", *SEEDS, "--results-dir", str(results)], log)


def outcome(results: Path) -> tuple[dict, pd.DataFrame]:
    from fairtune.layout import Layout
    from fairtune.records import read_best

    layout = Layout(results, "fmnist-s")
    best = {m: read_best(layout, m).hyperparameters for m in METHODS}
    table = pd.read_csv(layout.table("csv")).set_index("method")
    return best, table[[c for c in table.columns if c.endswith("_mean") and not c.startswith("paper_")]]


def main() -> None:
    from fairtune.data import default_data_dir, fmnist

    if fmnist.locate(default_data_dir()) is None:
        print(f"bench_protocol: skipped: no Fashion-MNIST found ({fmnist.EXPECTED})")
        return
    arms = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, arm in (("protocol", protocol), ("search loop + final", sequential)):
            results = Path(tmp) / name.split()[0]
            with CpuUse() as use:
                arm(results, Path(tmp) / f"{name.split()[0]}.log")
            arms[name] = (use, *outcome(results))
            print(f"{name}: {use.seconds:.0f} s, CPU use {100 * use.mean:.0f} %", flush=True)
        from fairtune.layout import Layout

        slots = json.loads(Layout(Path(tmp) / "protocol", "fmnist-s").protocol_summary.read_text())["slot_use"]
    (p_use, p_best, p_table), (s_use, s_best, s_table) = arms["protocol"], arms["search loop + final"]
    same_best = p_best == s_best
    same_table = p_table.round(6).equals(s_table.round(6))
    lines = [
        f"fmnist-s, {', '.join(METHODS)}: searches of 3 trials × 4 epochs (grace 1) on 3,000 training images, "
        f"finals on seeds {' '.join(SEEDS)}; 1 CPU per run; each arm from an empty results folder.",
        "",
        "| arm | wall time | CPU use (all cores, sampled each second) |",
        "|---|---|---|",
        f"| `fairtune protocol` | {p_use.seconds:.0f} s | {100 * p_use.mean:.0f} % |",
        f"| `fairtune search` × {len(METHODS)} + `fairtune final` | {s_use.seconds:.0f} s | {100 * s_use.mean:.0f} % |",
        "",
        f"Speed-up: {s_use.seconds / p_use.seconds:.2f}× (target ≥ 1.3×: {'met' if s_use.seconds / p_use.seconds >= 1.3 else 'NOT met'}). "
        f"Ray slots held by the protocol's runs, sampled each second: {100 * slots:.0f} %. "
        f"Same best configs: {'yes' if same_best else 'NO'}; same table means: {'yes' if same_table else 'NO'}.",
    ]
    append_results("bench_protocol: one command against the search loop", device(), lines)


if __name__ == "__main__":
    main()
