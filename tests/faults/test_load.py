"""Load: many more trials than CPUs. Every trial is accounted for and memory stays bounded."""

from __future__ import annotations

import contextlib
import threading

import psutil
import pytest

from fairtune.cli import main
from tests.helpers import assert_search_consistent, experiment

pytestmark = pytest.mark.slow
TRIALS = 24
# Generous: measured near 3 GiB here (RSS summed over the driver and every Ray process, so shared pages
# count more than once); a leak that grows per trial would pass it well before the 24th trial.
PEAK_RSS_LIMIT = 8 * 2**30


class PeakRSS:
    """Samples, in a thread, the summed RSS of this process (the driver) and all its descendants
    (the session's Ray: GCS, raylet, agents and every worker)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak, self.peak_processes = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total, processes = 0, 0
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    total += proc.memory_info().rss
                    processes += 1
            if total > self.peak:
                self.peak, self.peak_processes = total, processes
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_24_trials_on_2_cpus_lose_nothing_and_stay_bounded(ray_session, fmnist_dir, tmp_path, capsys):
    assert ray_session.cluster_resources()["CPU"] == 2
    results = tmp_path / "results"
    with PeakRSS() as memory:
        code = main(["search", "--dataset", "fmnist-s", "--method", "ad", "--max-epochs", "1", "--num-samples", str(TRIALS),
                     "--train-size", "100", "--eval-size", "100", "--batch-size", "20", "--cpus-per-trial", "1", "--max-concurrent", "2",
                     "--gpus-per-trial", "0", "--data-dir", str(fmnist_dir), "--results-dir", str(results)])
    out, err = capsys.readouterr()
    assert code == 0, err
    trials = assert_search_consistent(experiment(results, "ad"), TRIALS, 1)
    assert set(trials["status"]) <= {"COMPLETED", "STOPPED"} and len(trials) == TRIALS
    gib = memory.peak / 2**30
    print(f"\npeak RSS of the driver + Ray processes over {TRIALS} trials: {gib:.2f} GiB ({memory.peak_processes} processes)")
    assert memory.peak < PEAK_RSS_LIMIT, f"{gib:.2f} GiB"
