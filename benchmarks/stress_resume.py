"""Stress check of exact resume (not in `make test`; run `python benchmarks/stress_resume.py`).

One `fairtune search` is SIGKILLed K times at random moments and resumed after each, then resumed to
the end. Moments are drawn from five kinds, each read from disk, never guessed: start-up (a random
delay after the driver starts), mid-epoch (a random part of an epoch after one was recorded),
state writing (the instant a trial's new state file appears), an ASHA decision (the instant the ledger
records a stop) and the end (once every trial exists and most have finished). After the search ends,
it counts what the resume must never do: trials beyond --num-samples (extra) or missing (lost), trial
errors that were not real failures, ASHA stops decided before a kill and later forgotten, completed
trials that ran again, epochs recomputed beyond one per running trial per kill, and a best.json or
trials.csv that disagrees with the record. Appends the counts to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _timing import append_results, device  # noqa: E402
from tests.helpers import Driver, assert_search_consistent, epoch_runs, experiment, ledger_trials, read_trials  # noqa: E402

EPOCHS, TRIALS = 6, 16
KINDS = ("start-up", "mid-epoch", "state write", "ASHA decision", "the end")


def search_argv(results: Path, data_dir: Path | None) -> list[str]:
    argv = ["--dataset", "fmnist-s", "--method", "ad", "--epochs", str(EPOCHS), "--num-samples", str(TRIALS),
            "--grace-period", "2", "--reduction-factor", "3", "--max-concurrent", "2", "--train-size", "300",
            "--eval-size", "200", "--batch-size", "20", "--cpus-per-trial", "1", "--gpus-per-trial", "0",
            "--results-dir", str(results)]  # fmt: skip
    return argv + (["--data-dir", str(data_dir)] if data_dir else [])


def trials_now(folder: Path) -> dict[str, dict]:
    try:
        return ledger_trials(folder)
    except (OSError, ValueError):
        return {}


def state_count(folder: Path) -> int:
    return len(list((folder / "trials").glob("*/state-*.pt")))


def wait_moment(kind: str, driver: Driver, folder: Path, rng: random.Random) -> bool:
    """Block until a moment of ``kind``; False when the search ended first."""
    if kind == "start-up":
        deadline = time.monotonic() + rng.uniform(0.5, 6.0)
        return driver.wait_for(lambda: time.monotonic() > deadline, kind)
    if kind == "mid-epoch":
        epochs = sum(len(t["epochs"]) for t in trials_now(folder).values())
        if not driver.wait_for(lambda: sum(len(t["epochs"]) for t in trials_now(folder).values()) > epochs, kind):
            return False
        deadline = time.monotonic() + rng.uniform(0.0, 1.5)
        return driver.wait_for(lambda: time.monotonic() > deadline, kind)
    if kind == "state write":
        states = state_count(folder)
        return driver.wait_for(lambda: state_count(folder) > states, kind, poll=0.005)
    if kind == "ASHA decision":
        stops = sum(t["status"] == "STOPPED" for t in trials_now(folder).values())
        return driver.wait_for(lambda: sum(t["status"] == "STOPPED" for t in trials_now(folder).values()) > stops, kind, poll=0.01)

    def near_end() -> bool:
        trials = trials_now(folder)
        return len(trials) >= TRIALS and sum(t["status"] != "RUNNING" for t in trials.values()) >= TRIALS - 2

    return driver.wait_for(near_end, kind)


def one_run(kills: int, seed: int, data_dir: Path | None, work: Path) -> dict:
    rng = random.Random(seed)
    results = work / f"results{seed}"
    folder = experiment(results, "ad")
    argv = search_argv(results, data_dir)
    snapshots: list[tuple[dict, dict]] = []  # (ledger trials, epoch logs) at each kill
    kinds_done: list[str] = []
    started = time.monotonic()
    # Every kind of moment in each round, in a random order; "the end" once, as the last kill.
    during = KINDS[:-1]
    kinds = [kind for _ in range(-(-kills // len(during))) for kind in rng.sample(during, len(during))][: kills - 1] + [KINDS[-1]]
    for k in range(kills):
        driver = Driver([*argv, *(["--resume"] if k else [])], work / f"driver{seed}-{k}.log", REPO)
        kind = kinds[k]
        try:
            hit = wait_moment(kind, driver, folder, rng)
        finally:
            if driver.proc.poll() is None:
                driver.kill()
            driver.reap()
        if not hit:
            if driver.proc.returncode != 0:
                raise SystemExit(f"a search session failed:\n{driver.output()[-3000:]}")
            break  # finished before this kill
        kinds_done.append(kind)
        trials = trials_now(folder)
        snapshots.append((trials, {t: len(epoch_runs(folder, t)) for t in trials}))
    final = Driver([*argv, "--resume"], work / f"driver{seed}-final.log", REPO)
    final.proc.wait()
    final.handle.close()
    if final.proc.returncode != 0:
        raise SystemExit(f"the last resume failed:\n{final.output()[-3000:]}")
    seconds = time.monotonic() - started

    trials = read_trials(folder / "trials.csv")
    record = ledger_trials(folder)
    forgotten = rerun = 0
    for snapshot, logged in snapshots:
        for trial_id, trial in snapshot.items():
            if trial["status"] == "STOPPED" and record[trial_id]["status"] != "STOPPED":
                forgotten += 1
            if trial["status"] == "COMPLETED" and len(epoch_runs(folder, trial_id)) != logged[trial_id]:
                rerun += 1
    recomputed = over = 0
    for trial_id in record:
        logged = [run["epoch"] for run in epoch_runs(folder, trial_id)]
        extra_runs = len(logged) - len(set(logged))
        running_at = sum(snap.get(trial_id, {}).get("status") == "RUNNING" for snap, _ in snapshots)
        recomputed += extra_runs
        over += max(0, extra_runs - running_at)
    try:
        assert_search_consistent(folder, TRIALS, EPOCHS, max_recomputed=len(snapshots))
        consistent = True
    except AssertionError:
        consistent = False
    return {
        "kills": len(snapshots), "kinds": kinds_done, "trials": len(trials), "extra": max(0, len(trials) - TRIALS),
        "lost": max(0, TRIALS - len(trials)), "errors": int((trials["status"] == "ERROR").sum()),
        "stopped": int((trials["status"] == "STOPPED").sum()), "forgotten_stops": forgotten, "completed_rerun": rerun,
        "epochs_recomputed": recomputed, "recomputed_beyond_one_per_kill": over, "consistent": consistent,
        "epochs_run": int(trials["epochs_run"].sum()), "seconds": round(seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST (default: fairtune's lookup)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fairtune-stress-"))
    rows = []
    try:
        for run in range(args.runs):
            row = one_run(args.kills, args.seed + run, args.data_dir, work)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"ad on fmnist-s: {TRIALS} trials × {EPOCHS} epochs, ASHA grace 2, reduction factor 3, 2 concurrent; "
        f"the driver SIGKILLed up to {args.kills} times per search at moments drawn from: {', '.join(KINDS)}; "
        "resumed after each, then to the end.",
        "",
        "| run | kills | trials | extra | lost | errors | forgotten stops | completed re-run | epochs recomputed "
        "| beyond one per kill | consistent | epochs run | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"| {i} | {r['kills']} | {r['trials']} | {r['extra']} | {r['lost']} | {r['errors']} | {r['forgotten_stops']} | "
            f"{r['completed_rerun']} | {r['epochs_recomputed']} | {r['recomputed_beyond_one_per_kill']} | "
            f"{'yes' if r['consistent'] else 'NO'} | {r['epochs_run']} | {r['seconds']} s |"
        )
    kinds = [k for r in rows for k in r["kinds"]]
    lines += ["", "Kills by moment: " + ", ".join(f"{kind} {kinds.count(kind)}" for kind in KINDS) + "."]
    append_results("stress_resume: SIGKILLed search drivers, resumed", device(), lines)
    bad = [r for r in rows if r["extra"] or r["lost"] or r["errors"] or r["forgotten_stops"] or r["completed_rerun"]
           or r["recomputed_beyond_one_per_kill"] or not r["consistent"]]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
