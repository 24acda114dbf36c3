"""`fairtune protocol` end to end: one command for teachers, every search, the finals and the tables,
interrupted with Ctrl-C and continued by rerunning it; a failing method fails alone; the files are
those `search` and `final` write; bad input costs one line and starts nothing."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from fairtune.cli import main, status_lines
from fairtune.tune.protocol import MethodProgress, Status
from tests.helpers import Driver, assert_one_line_error, assert_search_consistent, experiment, ledger, read_trials

REPO = Path(__file__).resolve().parent.parent
EPOCHS, SAMPLES = 2, 2
SIZES = ["--train-size", "300", "--eval-size", "100", "--batch-size", "40", "--cpus-per-trial", "1", "--gpus-per-trial", "0",
         "--epochs", str(EPOCHS)]
SEARCH = ["--num-samples", str(SAMPLES), "--grace-period", "1"]


@pytest.fixture(scope="module")
def overflowing_spaces(tmp_path_factory):
    """A search space whose only λ overflows float32: every mmd trial fails (non-finite loss)."""
    spaces = tmp_path_factory.mktemp("spaces")
    (spaces / "mmd.yaml").write_text("method: mmd\nparameter: lam\ndistribution: choice\nvalues: [1.0e+39]\ndefault: 1.0e+39\n")
    return spaces


def protocol_argv(data_dir: Path, results: Path, *extra) -> list[str]:
    return ["--dataset", "fmnist-s", "--data-dir", str(data_dir), "--results-dir", str(results), *SIZES, *SEARCH,
            "--seeds", "0", "1", *map(str, extra)]


@pytest.fixture(scope="module")
def protocol_run(ray_session, data_dir, overflowing_spaces, tmp_path_factory):
    """The protocol of scratch, hkd, ad+hkd (T from hkd's best) and an mmd whose every trial fails:
    Ctrl-C once hkd's search has run an epoch, then the same command again to the end."""
    results = tmp_path_factory.mktemp("results")
    argv = protocol_argv(data_dir, results, "--method", "scratch", "hkd", "ad+hkd", "mmd", "--search-spaces", overflowing_spaces)
    driver = Driver(argv, results / "first.log", REPO, command="protocol")
    hkd = experiment(results, "hkd")
    first = driver.interrupt_when(lambda: (hkd / "ledger.json").exists() and any(t["epochs"] for t in ledger(hkd)["trials"]), "hkd epoch")
    interrupted = {"code": driver.proc.returncode, "output": first, "best_hkd_existed": (hkd / "best.json").exists()}
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["protocol", *argv])
    return {"results": results, "argv": argv, "interrupted": interrupted, "code": code, "out": out.getvalue(), "err": err.getvalue()}


@pytest.mark.slow
def test_ctrl_c_stops_the_protocol_and_the_same_command_continues_it(protocol_run):
    interrupted = protocol_run["interrupted"]
    assert interrupted["code"] == 130, interrupted["output"]
    assert "Traceback" not in interrupted["output"], interrupted["output"]
    assert "rerun the same command" in interrupted["output"].strip().splitlines()[-1]
    assert not interrupted["best_hkd_existed"]
    results = protocol_run["results"]
    # Interrupted mid-search, resumed exactly: the planned trials, none extra or re-run beyond the kill.
    assert_search_consistent(experiment(results, "hkd"), SAMPLES, EPOCHS, max_recomputed=1)
    assert ledger(experiment(results, "hkd"))["sessions"] == 2
    assert_search_consistent(experiment(results, "ad+hkd"), SAMPLES, EPOCHS, max_recomputed=1)


@pytest.mark.slow
def test_a_failing_search_fails_its_method_only(protocol_run):
    assert protocol_run["code"] == 1, protocol_run["err"]
    err = protocol_run["err"].strip().splitlines()
    assert "1 part(s) of the protocol failed" in err[0] and len(err) == 2, err
    assert err[1].lstrip().startswith("mmd search:") and "every trial of the mmd search failed" in err[1], err
    results = protocol_run["results"]
    table = pd.read_csv(results / "fmnist-s" / "table.csv")
    assert table["method"].tolist() == ["scratch", "hkd", "ad+hkd"]
    assert (table["seeds"] == 2).all()
    assert not (results / "fmnist-s" / "final" / "mmd").exists()


@pytest.mark.slow
def test_dependent_search_reads_its_source_best_config(protocol_run):
    results = protocol_run["results"]
    hkd = json.loads((experiment(results, "hkd") / "best.json").read_text())
    ad_hkd = json.loads((experiment(results, "ad+hkd") / "best.json").read_text())
    assert ad_hkd["hyperparameters"]["T"] == hkd["hyperparameters"]["T"]
    for seed in (0, 1):
        record = json.loads((results / "fmnist-s" / "final" / "ad+hkd" / f"seed{seed}.json").read_text())
        assert record["hyperparameters"] == ad_hkd["hyperparameters"]


@pytest.mark.slow
def test_status_block_log_and_summary(protocol_run):
    results = protocol_run["results"] / "fmnist-s"
    blocks = [line for line in protocol_run["out"].splitlines() if "slots" in line and "busy" in line]
    assert blocks, protocol_run["out"]
    last = protocol_run["out"][protocol_run["out"].rindex(blocks[-1]):].splitlines()[:5]
    assert "epochs" in last[0] and "ETA" in last[0]
    rows = {line.split()[0]: line for line in last[1:]}
    assert set(rows) == {"scratch", "hkd", "ad+hkd", "mmd"}
    assert f"{SAMPLES}/{SAMPLES} trials done" in rows["hkd"] and "final 2/2 seeds" in rows["hkd"]
    assert "failed" in rows["mmd"]
    log = (results / "protocol.log").read_text()
    # The full per-epoch lines of every search go to the log, not the screen.
    assert "[search hkd]   t000 T=" in log and "epoch   1/2" in log
    assert "epoch   1/2" not in protocol_run["out"]
    summary = json.loads((results / "protocol.json").read_text())
    assert summary["failures"] and 0 < summary["slot_use"] <= 1 and summary["seconds"] > 0


@pytest.mark.slow
def test_protocol_files_equal_those_of_search_and_final(protocol_run, data_dir, tmp_path, capsys):
    """`search` then `final` for one method write what the protocol wrote (teachers copied: same seeds,
    same bytes, so only the method's own work is compared)."""
    results = protocol_run["results"]
    shutil.copytree(results / "fmnist-s" / "teachers", tmp_path / "fmnist-s" / "teachers")
    common = ["--dataset", "fmnist-s", "--data-dir", str(data_dir), "--results-dir", str(tmp_path), *SIZES]
    assert main(["search", *common, *SEARCH, "--method", "hkd"]) == 0, capsys.readouterr().err
    assert main(["final", *common, "--method", "hkd", "--seeds", "0", "1"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    ours, theirs = read_trials(experiment(results, "hkd") / "trials.csv"), read_trials(experiment(tmp_path, "hkd") / "trials.csv")
    where = ["node", "hostname"]  # which Ray session's node ran it: another session, another id
    pd.testing.assert_frame_equal(ours.drop(columns=where), theirs.drop(columns=where))
    best = [json.loads((experiment(r, "hkd") / "best.json").read_text()) for r in (results, tmp_path)]
    for record in best:
        record["budget"].pop("seconds")
    assert best[0] == best[1]
    for seed in (0, 1):
        runs = [json.loads((r / "fmnist-s" / "final" / "hkd" / f"seed{seed}.json").read_text()) for r in (results, tmp_path)]
        for key in ("test", "history", "hyperparameters", "config", "data"):
            assert runs[0][key] == runs[1][key], key


def test_bad_input_is_one_line_and_starts_nothing(data_dir, tmp_path, capsys):
    cases = [
        (["--method", "hkd", "hkd"], "names hkd more than once"),
        (["--method", "hkd", "nope"], "unknown method 'nope'"),
        (["--method", "scratch", "ad+hkd"], "add hkd to --method, or pass --T"),
        (["--method", "hkd", "--seeds", "0", "0"], "--seeds names 0 more than once"),
        (["--method", "hkd", "--address", "127.0.0.1:9"], "cannot reach the Ray cluster"),
        (["--method", "mfd", "--T", "4"], "--T is read by none of mfd"),
    ]
    for extra, fragment in cases:
        argv = ["protocol", "--dataset", "fmnist-s", "--data-dir", str(data_dir), "--results-dir", str(tmp_path), *SIZES]
        code = main([*argv, *extra] if "--seeds" in extra else [*argv, "--seeds", "0", *extra])
        out, err = capsys.readouterr()
        assert_one_line_error(code, err, fragment)
        assert not (tmp_path / "fmnist-s" / "search").exists() and not (tmp_path / "fmnist-s" / "teachers").exists()


def test_status_lines_show_each_method_and_the_whole_run():
    rows = [
        MethodProgress("hkd", search="running", trials_done=3, trials_running=2, trials_stopped=1, trials_planned=7,
                       epochs_done=20, epochs_budget=50, best=61.25, seeds_done=0, seeds_planned=4),
        MethodProgress("ad+hkd", waiting_for="hkd's best config", seeds_planned=4),
    ]
    lines = status_lines(Status(rows, elapsed=3725, slots_busy=2, slots_total=2, epochs_done=20, epochs_budget=250,
                                seconds_per_epoch=6.04, eta=3 * 3600 + 60))
    assert lines[0] == "[1h02m] slots 2/2 busy · epochs 20 of at most 250 · 6.0 s per epoch per slot · ETA ≤ 3h01m"
    assert "3/7 trials done, 2 running, 1 stopped · 20/50 epochs" in lines[1] and "best   61.25" in lines[1]
    assert "final 0/4 seeds" in lines[1]
    assert "waiting for hkd's best config" in lines[2] and "best    –" in lines[2]
