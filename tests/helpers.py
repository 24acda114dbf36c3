"""Helpers shared by the end-to-end tests: a search's outputs on disk, one-line errors, folder snapshots."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pandas as pd
import pytest

# What `--resume` says when a driver was killed while Ray Tune copied its state into the search folder
# and no older whole state exists (Tune copies file by file, not atomically: a known Ray 2.60 race).
ALL_STATE_TORN = "no older whole state is left to resume from"
# A trial's error when a kill left Tune's saved state naming a checkpoint its rotation had deleted.
UNRESTORABLE = "Could not recover from checkpoint as it does not exist on storage anymore"


def experiment(results: Path, method: str, dataset: str = "fmnist-s") -> Path:
    """The Ray Tune experiment folder of a search (``results/<D>/search/<M>``)."""
    return Path(results) / dataset / "search" / method


def read_trials(path: Path) -> pd.DataFrame:
    # Tune's hex trial ids can look like numbers ("12345678", "1e5a..."): keep them text.
    return pd.read_csv(path, dtype={"trial_id": str, "error": str}).fillna({"error": ""})


# Tune names trial folders `run_trial_<id>_<n>_<params>_<time>`; <id> is 8 hex digits under a searcher,
# `<5 hex>_<5 digits>` without one (a method with nothing to search).
_TRIAL_FOLDER = re.compile(r"run_trial_([0-9a-f]{5}_[0-9]{5}|[0-9a-f]{8})_")


def trial_dirs(folder: Path) -> dict[str, Path]:
    """Tune's trial folders by trial id."""
    found = {}
    for path in Path(folder).glob("run_trial_*"):
        match = _TRIAL_FOLDER.match(path.name)
        if match and path.is_dir():
            found[match.group(1)] = path
    return found


def epoch_runs(folder: Path, trial_id: str) -> list[dict]:
    """The trainable's side log: one {"epoch", "pid"} per epoch actually run, recomputed ones included."""
    log = Path(folder) / "trial_logs" / f"{trial_id}.epochs.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fairtune: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` (path -> sha256 of its bytes), to prove a command changed nothing."""
    files = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def assert_search_consistent(
    folder: Path, num_samples: int, epochs: int, max_runs_per_epoch: int = 1, torn_state_dropped: bool = False,
    driver_killed: bool = False, allowed_errors: tuple[str, ...] = ("non-finite",),
) -> pd.DataFrame:
    """What a finished search must look like, however it was interrupted and resumed.

    Exactly ``num_samples`` trials with distinct ids and one folder each (no lost or orphaned trial);
    a trial ends in error only for a non-finite loss (``allowed_errors``), never because an interruption
    broke its restore;
    every trial's recorded epochs are 1..n with no gap or repeat (see ``driver_killed``), and trials.csv
    holds the last record of its last epoch; the side log shows every recorded
    epoch ran, each worker ran consecutive epochs, and no epoch ran more than ``max_runs_per_epoch``
    times; best.json is the best finished trial of trials.csv and its budget adds up.

    ``torn_state_dropped``: a resume fell back to an older saved state (the newest was torn by a kill),
    so trials of the dropped session may have re-run from an earlier point under the same id (a
    repeated progress row) or under a new id (an extra folder left behind).

    ``driver_killed``: Tune's saved state can lag its driver by one step (RAY-NOTES), so a trial whose
    epoch was logged just before the kill restarts from the checkpoint before it; Ray's progress.csv
    then appends the re-run epoch again. Recorded epochs stay in order and each repeat is a re-run.
    """
    trials = read_trials(folder / "trials.csv")
    assert len(trials) == num_samples and trials["trial_id"].is_unique, trials
    assert set(trials["status"]) <= {"COMPLETED", "STOPPED", "ERROR"}, trials
    dirs = trial_dirs(folder)
    if torn_state_dropped:
        assert set(dirs) >= set(trials["trial_id"]), (sorted(dirs), trials["trial_id"].tolist())
    else:
        assert set(dirs) == set(trials["trial_id"]), (sorted(dirs), trials["trial_id"].tolist())
    for row in trials.itertuples():
        runs = epoch_runs(folder, row.trial_id)
        if row.status == "ERROR":
            assert any(reason in row.error for reason in allowed_errors), (row.trial_id, row.error)
            continue
        assert 1 <= row.epochs_run <= epochs, row
        progress = pd.read_csv(dirs[row.trial_id] / "progress.csv")
        recorded = progress["training_iteration"].tolist()
        if driver_killed and not torn_state_dropped:
            assert recorded == sorted(recorded), (row.trial_id, recorded)
        if driver_killed or torn_state_dropped:
            assert max(recorded.count(e) for e in recorded) <= max_runs_per_epoch, (row.trial_id, recorded)
            progress = progress.drop_duplicates("training_iteration", keep="last")
        assert progress["training_iteration"].tolist() == list(range(1, row.epochs_run + 1)), (row.trial_id, recorded)
        assert row.final_accuracy == pytest.approx(progress["accuracy"].iloc[-1]), (row.trial_id, progress)
        assert row.final_objective == pytest.approx(progress["objective"].iloc[-1]), (row.trial_id, progress)
        logged = [run["epoch"] for run in runs]
        assert set(logged) == set(range(1, row.epochs_run + 1)), (row.trial_id, runs)
        assert max(logged.count(e) for e in logged) <= max_runs_per_epoch, (row.trial_id, runs)
        for pid in {run["pid"] for run in runs}:
            mine = [run["epoch"] for run in runs if run["pid"] == pid]
            assert mine == list(range(mine[0], mine[0] + len(mine))), (row.trial_id, pid, runs)
    best = json.loads((folder / "best.json").read_text())
    assert best["trial_id"] in set(trials["trial_id"])
    chosen = trials[trials["trial_id"] == best["trial_id"]].iloc[0]
    searched = best["searched"]
    if searched:
        assert best["hyperparameters"][searched] == pytest.approx(chosen[searched])
    assert best["objective_value"] == pytest.approx(chosen["final_objective"])
    pool = trials[trials["status"] == "COMPLETED"]
    if not len(pool):
        pool = trials[trials["final_objective"].notna()]
    target = pool["final_objective"].max() if best["mode"] == "max" else pool["final_objective"].min()
    assert best["objective_value"] == pytest.approx(target)
    budget = best["budget"]
    assert budget["trials"] == num_samples
    assert budget["epochs_run"] == trials["epochs_run"].sum()
    assert budget["epochs_if_no_early_stopping"] == num_samples * epochs
    assert budget["failed_trials"] == (trials["status"] == "ERROR").sum()
    return trials
