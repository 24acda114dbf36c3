"""The ``fairtune`` command line: parse, validate, run, print. User mistakes exit 2 with one line."""

from __future__ import annotations

import argparse
import errno
import os
import re
import shlex
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from fairtune.errors import UserError, checked
from fairtune.layout import Layout, SearchDir


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag costs one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see `{self.prog} --help`)")


_checked = checked


_positive_int = _checked(int, lambda v: v > 0, "a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_reduction = _checked(int, lambda v: v >= 2, "an integer >= 2")
_positive_float = _checked(float, lambda v: 0.0 < v < float("inf"), "a positive finite number")
_non_negative_float = _checked(float, lambda v: 0.0 <= v < float("inf"), "a finite number >= 0")
_gpus = _checked(lambda t: t if t == "auto" else float(t), lambda v: v == "auto" or 0.0 <= v < float("inf"), "auto or a finite number >= 0")
# torch also names devices that cannot train (meta, mps, hpu ...): accept only what fairtune runs on.
_device_name = _checked(str, lambda v: re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", v) is not None, "auto, cpu or cuda[:k]")
# More threads than cores never helps, and torch crashes on a huge count.
_thread_count = _checked(int, lambda v: 0 < v <= (os.cpu_count() or 1), f"a positive integer at most {os.cpu_count() or 1} (the CPUs here)")


def _objective(text: str) -> str:
    """--objective in canonical form (``deo_a,acc`` -> ``acc,deo_a``); a bad one is one line."""
    from fairtune.metrics import parse_objective

    try:
        return parse_objective(text).text
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_hyperparameters(p: argparse.ArgumentParser, fixed: bool) -> None:
    """One flag per row of the hyperparameter table (``fixed``: for a search, where a method's
    searched one is refused and the others are fixed values)."""
    from fairtune.hyperparameters import HYPERPARAMETERS

    for row in HYPERPARAMETERS.values():
        p.add_argument(row.flag, dest=row.name, type=float, default=None, metavar=row.name.upper(),
                       help=f"{row.help}{' (fixed; default: the best found for its source method)' if fixed else ''}")


def _given(args: argparse.Namespace) -> dict[str, float | None]:
    from fairtune.hyperparameters import HYPERPARAMETERS

    return {name: getattr(args, name, None) for name in HYPERPARAMETERS}


def _add_plugin(p: argparse.ArgumentParser) -> None:
    # Read by main() before the parser is built (a plugin adds methods, datasets and flags); declared
    # here so that --help lists it and the parser accepts it.
    p.add_argument("--plugin", action="append", default=[], metavar="PATH_OR_MODULE",
                   help="import a plugin (a .py file or a module) that registers methods, terms, datasets ...; repeatable")


def _plugin_specs(argv: list[str]) -> list[str]:
    specs = []
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv):
            specs.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            specs.append(arg.split("=", 1)[1])
    return specs


def _add_common(p: argparse.ArgumentParser, dataset_required: bool = True) -> None:
    from fairtune.data import DATASETS, add_dataset_options
    from fairtune.metrics import DEFAULT_OBJECTIVE, OBJECTIVE_HELP

    p.add_argument(
        "--dataset", required=dataset_required, choices=list(DATASETS), metavar="D", help=f"one of {', '.join(DATASETS)}"
    )
    p.add_argument("--data-dir", type=Path, default=None, help="where datasets live (default ./data, env FAIRTUNE_DATA)")
    p.add_argument("--results-dir", type=Path, default=Path("results"), help="where results go (default ./results)")
    p.add_argument("--epochs", "--max-epochs", dest="epochs", type=_positive_int, default=50, help="training epochs E (FitNet runs 1.5 E)")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--train-size", type=_positive_int, default=None, help="stratified subsample of train, for quick runs")
    p.add_argument("--eval-size", type=_positive_int, default=None, help="stratified subsample of val and test")
    add_dataset_options(p)  # --skew, --target, ...: each dataset's OPTIONS
    p.add_argument("--select-on", choices=["val", "test"], default="val", help="split for model selection (test = the official procedure)")
    p.add_argument(
        "--objective", type=_objective, default=DEFAULT_OBJECTIVE, metavar="OBJ",
        help=f"what the search optimises on the selection split: {OBJECTIVE_HELP} for a multi-objective search (default {DEFAULT_OBJECTIVE})",
    )
    p.add_argument("--search-spaces", type=Path, default=None, help="folder of <method>.yaml search spaces (default: the repo's search_spaces/)")
    p.add_argument("--device", type=_device_name, default="auto", help="auto (CUDA when present), cpu or cuda[:k]")
    p.add_argument("--threads", type=_thread_count, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student (falls back to eager, with a warning, if it fails)")


def _add_cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray cluster to join: host:port, auto or ray://host:port; a token in ~/.ray/auth_token or RAY_AUTH_TOKEN is used (default: start a local Ray)")
    p.add_argument("--cpus-per-trial", type=_positive_int, default=1, help="CPUs (and torch threads) per run")
    p.add_argument(
        "--gpus-per-trial", type=_gpus, default=None,
        help="fractions share a GPU; auto packs the small CNN 8 per GPU, larger models 2 (default 1 if the cluster has GPUs, else 0)",
    )


def _add_search(p: argparse.ArgumentParser) -> None:
    """The options of a search (`search`, and every search of `protocol`)."""
    p.add_argument("--seed", type=_non_negative_int, default=0, help="data, teacher and TPE seed of the search")
    _add_hyperparameters(p, fixed=True)
    p.add_argument("--adv-lr", type=_positive_float, default=3e-3)
    p.add_argument("--num-samples", type=_positive_int, default=16, help="trials (default 16)")
    p.add_argument("--grace-period", type=_positive_int, default=None, help="ASHA's first rung in epochs of the main stage (default E/10; FitNet: after its hint stage)")
    p.add_argument("--reduction-factor", type=_reduction, default=3, help="ASHA's reduction factor (default 3)")
    p.add_argument("--max-concurrent", type=_positive_int, default=None, help="trials of one search started together and running at once (default: as resources allow, started one at a time)")
    _add_cluster(p)
    p.add_argument("--max-failures", type=_non_negative_int, default=2, help="retries of a crashed trial from its last checkpoint")


# Flags of `final` that default to what the searches used (best.json) instead of fixed values.
TRAIN_PROTOCOL_FLAGS = ("epochs", "batch_size", "lr", "adv_lr", "objective", "compile")
# The dataset options (--skew, --target, ...) join them through given_options.
DATA_PROTOCOL_FLAGS = ("train_size", "eval_size", "select_on")


def build_parser() -> Parser:
    from fairtune.data import DATASETS

    parser = Parser(prog="fairtune", description="Hyperparameter search for fair feature distillation and its baselines.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    commands.add_parser("list", help="methods, datasets, searched hyperparameters and data status").add_argument(
        "--data-dir", type=Path, default=None
    )

    train = commands.add_parser("train", help="one plain run of a method (no search)")
    train.add_argument("--method", required=True, help="e.g. scratch, hkd, mfd, ad+fitnet (see `fairtune list`)")
    _add_common(train)
    train.add_argument("--seed", type=_non_negative_int, default=0)
    _add_hyperparameters(train, fixed=False)
    train.add_argument("--adv-lr", type=_positive_float, default=3e-3, help="adversaries' Adam lr (AD methods)")
    train.add_argument("--force", action="store_true", help="rerun a run whose result is already on disk")

    search = commands.add_parser("search", help="Ray Tune search of a method's hyperparameter (Optuna TPE + ASHA)")
    search.add_argument("--method", required=True, help="e.g. hkd, mfd, ad+fitnet (see `fairtune list`)")
    _add_common(search)
    _add_search(search)
    search.add_argument("--resume", action="store_true", help="continue an interrupted search from its checkpoints")

    teacher = commands.add_parser("teacher", help="train and cache teachers (scratch models) per seed")
    _add_common(teacher)
    teacher.add_argument("--seeds", type=_non_negative_int, nargs="+", default=[0, 1, 2, 3])
    teacher.add_argument("--force", action="store_true", help="retrain even when a teacher file exists")
    final = commands.add_parser(
        "final", help="rerun each best config on seeds 0..3, evaluate on test, write tables and plots",
        description="Rerun each method's best config on every seed (as Ray tasks), training on the train split and "
        "evaluating on test, then write table.{md,csv,tex}, pareto.png and table.png. Training and data flags "
        "default to what the searches used (their best.json); pass one to override it for every run.",
    )
    final.add_argument("--method", nargs="+", default=None, help="methods to run (default: every method with a best config, plus the teachers)")
    _add_common(final, dataset_required=False)
    final.add_argument("--seeds", type=_non_negative_int, nargs="+", default=[0, 1, 2, 3])
    final.add_argument("--adv-lr", type=_positive_float, help="adversaries' Adam lr (AD methods)")
    _add_cluster(final)
    final.add_argument("--force", action="store_true", help="rerun seeds that are done (with scratch named: retrain the teachers)")
    final.add_argument(
        "--select", default="best", metavar="RULE",
        help="which trial of each search to rerun, on validation metrics: best (default: best.json), constrained:deo_a<=X, "
        "constrained:deo_m<=X, utopia or knee; a rule's finals go to final-<rule>/",
    )
    final.set_defaults(**dict.fromkeys(TRAIN_PROTOCOL_FLAGS + DATA_PROTOCOL_FLAGS))

    protocol = commands.add_parser(
        "protocol", help="the whole protocol in one command: teachers, every search, the final reruns, the tables",
        description="Train the teachers, run every method's search concurrently on one Ray session (a method whose "
        "fixed hyperparameter comes from another's best config starts when that exists), rerun each best config on "
        "every seed as soon as its search is done, then write the tables and plots. Rerun the same command to "
        "continue after an interruption.",
    )
    protocol.add_argument("--method", nargs="+", default=None, help="methods (default: the paper's twelve, see `fairtune list`)")
    _add_common(protocol)
    protocol.add_argument("--seeds", type=_non_negative_int, nargs="+", default=[0, 1, 2, 3], help="seeds of the final reruns")
    _add_search(protocol)
    protocol.add_argument("--refresh", type=_positive_float, default=None, help="seconds between status blocks (default 2 on a terminal, else 30)")

    report = commands.add_parser("report", help="rebuild tables and plots from results on disk (no training)")
    report.add_argument("--dataset", required=True, choices=list(DATASETS), metavar="D", help=f"one of {', '.join(DATASETS)}")
    report.add_argument("--results-dir", type=Path, default=Path("results"))
    report.add_argument(
        "--select", nargs="+", default=["best"], metavar="RULE",
        help="selection rules whose final runs to tabulate (best, constrained:deo_a<=X, constrained:deo_m<=X, utopia, knee); "
        "two or more also write selection.md, the rules side by side",
    )
    for command in commands.choices.values():
        _add_plugin(command)
    return parser


# -- commands ---------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    from fairtune.data import DATASETS, DataOptions, dataset_info, default_data_dir
    from fairtune.methods import all_method_names, get_method
    from fairtune.spaces import load_space

    data_dir = args.data_dir or default_data_dir()
    print("Methods (searched hyperparameter; fixed ones come from another method's best config):")
    for name in all_method_names():
        method = get_method(name)
        space = load_space(name)
        searched = space.text()
        fixed = ", ".join(f"{p} from {src}" for p, src in method.fixed_from)
        teacher = "teacher" if method.needs_teacher else "no teacher"
        start = ", ".join(f"{d}={v:g}" for d, v in space.paper.items())
        extra = f"; fixed {fixed}" if fixed else ""
        paper = f"; paper: {start}" if start else ""
        print(f"  {name:<11} {method.label:<10} {searched}{extra} ({teacher}, {method.sampler} sampler{paper})")
    print(f"\nDatasets (data dir: {data_dir}):")
    width = max(map(len, DATASETS))
    for name, module in DATASETS.items():
        found = module.locate(data_dir)
        status = f"found at {found}" if found else f"MISSING — {module.EXPECTED}"
        try:
            info = dataset_info(DataOptions(name), data_dir)
            shape = f"{info.num_classes} classes x {info.num_groups} groups, {info.model} @ {info.image_size}px"
        except UserError as exc:  # a dataset whose classes come from its files, not found or unreadable here
            shape = "classes, groups and model read from its files"
            status += f"; unreadable: {exc}" if found else ""
        print(f"  {name:<{width}} {shape}\n   {'':<{width}}{status}")
    return 0


def _spaces_dir(args: argparse.Namespace, method: str | None = None) -> Path:
    """The search-space folder; a folder of the user's must hold <method>.yaml files only, and a method
    it has no file for is said to use the standard space (a typo must not pass unnoticed)."""
    from fairtune.methods import get_method
    from fairtune.spaces import SPACES_DIR

    folder = args.search_spaces or SPACES_DIR
    if not folder.is_dir():
        raise UserError(f"--search-spaces {folder} is not a folder; point it at a folder of <method>.yaml files")
    if args.search_spaces is None:
        return folder
    names = sorted(path.stem for path in folder.glob("*.yaml"))
    if not names:
        raise UserError(f"--search-spaces {folder} holds no <method>.yaml file; add one (e.g. a copy of {SPACES_DIR / 'mfd.yaml'}) or omit the flag")
    for name in names:
        try:
            get_method(name)
        except UserError as exc:
            raise UserError(f"--search-spaces {folder}: {name}.yaml names no method ({exc}); rename it to <method>.yaml") from None
    if method is not None and method not in names and get_method(method).searched:
        print(f"note: no {method}.yaml in {folder}: {method} uses the standard search space", flush=True)
    return folder


def _load_data(args: argparse.Namespace, seed: int, notes: bool = True):
    """The dataset for ``seed``; prints what was used instead of what was asked (clamped sizes, the
    system's Fashion-MNIST) so nothing is substituted silently."""
    from fairtune.data import load_dataset

    data = load_dataset(_data_options(args, seed), args.data_dir)
    if notes:
        for note in [*data.notes.get("clamped", []), data.notes.get("fallback")]:
            if note:
                print(f"note: {note}", flush=True)
    return data


def _check_results_dir(args: argparse.Namespace, dataset: str) -> None:
    from fairtune.io import check_writable

    check_writable(Layout(args.results_dir, dataset).root)


def _data_options(args: argparse.Namespace, seed: int):
    from fairtune.data import DataOptions, given_options

    return DataOptions(
        dataset=args.dataset, seed=seed, train_size=args.train_size,
        eval_size=args.eval_size, select_on=args.select_on, **given_options(args),
    )


def _setup_threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def _setup(args: argparse.Namespace):
    import torch

    from fairtune.engine import resolve_device

    _setup_threads(args)
    try:
        device = resolve_device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UserError(f"--device {args.device} is not usable here ({str(exc).splitlines()[0]}); use auto or cpu") from None
    return device


def _print_epoch(total_epochs: int, split: str, label: str = ""):
    from fairtune.progress import epoch_line

    last = [time.perf_counter()]

    def show(m: dict) -> None:
        now = time.perf_counter()
        print(epoch_line(m, total_epochs, label, split, now - last[0]), flush=True)
        last[0] = now

    return show


def _print_test(test: dict, info) -> None:
    """Test metrics and the per-(group, class) accuracy, rows and columns named by the dataset."""
    print(f"test: accuracy {test['accuracy']:.2f}  DEO_A {test['deo_a']:.2f}  DEO_M {test['deo_m']:.2f}")
    width = max(6, *(len(name) for name in info.class_names))
    label = max(len(name) for name in info.group_names) + 7
    print(" " * (label + 1) + " ".join(f"{name:>{width}}" for name in info.class_names))
    for name, row in zip(info.group_names, test["acc_matrix"]):
        cells = " ".join(f"{'-':>{width}}" if v is None else f"{v:{width}.2f}" for v in row)
        print(f"  {f'acc[{name}]':<{label - 2}} {cells}")
    if test["empty_cells"]:
        print(f"  empty (group, class) cells left out of DEO: {test['empty_cells']}")


def _train_config(args: argparse.Namespace, method: str, hyper: dict[str, float]):
    from fairtune.engine import TrainConfig

    return TrainConfig(
        method=method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        adv_lr=getattr(args, "adv_lr", 3e-3), objective=args.objective, compile=getattr(args, "compile", False), hyperparameters=hyper,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from fairtune.methods import get_method
    from fairtune.runs import check_batches, resolve_hyperparameters, run_method, train_run_path, write_run
    from fairtune.teachers import TeacherProvider, teacher_model

    method = get_method(args.method)
    given = _given(args)
    hyper = resolve_hyperparameters(method.name, args.dataset, given, args.results_dir, _spaces_dir(args, method.name))
    _check_results_dir(args, args.dataset)
    config = _train_config(args, method.name, hyper)
    options = _data_options(args, args.seed)
    out = train_run_path(args.results_dir, config, options)
    if out.exists() and not args.force:
        raise UserError(f"{out} already holds this run (same method, hyperparameters, data and protocol); pass --force to rerun it")
    device = _setup(args)
    data = _load_data(args, args.seed)
    check_batches([method.name], args.batch_size, data)
    teacher = None
    if method.needs_teacher:
        state, _ = TeacherProvider(args.results_dir, args.dataset).get(data.options, data.info)  # load only
        teacher = teacher_model(state, data.info)
    shown = ", ".join(f"{k}={v:g}" for k, v in hyper.items()) or "no hyperparameters"
    source = f"; data from {data.notes['source_dir']}" if data.notes.get("source_dir") else ""
    print(
        f"{method.name} on {args.dataset} seed {args.seed} ({shown}); train {len(data.train)}, "
        f"{data.options.select_on} {len(data.selection)}, test {len(data.test)} samples{source}; device {device}",
        flush=True,
    )
    result = run_method(config, data, teacher, device, _print_epoch(config.total_epochs, data.options.select_on))
    write_run(out, config, data, result, device)
    _print_test(result.test, data.info)
    print(f"{result.seconds_per_epoch:.1f} s/epoch; wrote {out}")
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    import json

    from fairtune.runs import check_batches, train_teacher
    from fairtune.teachers import TeacherProvider

    _check_results_dir(args, args.dataset)
    device = _setup(args)
    teachers = TeacherProvider(args.results_dir, args.dataset, _train_config(args, "scratch", {}), force=args.force)
    for i, seed in enumerate(args.seeds):
        record = teachers.files(seed)
        data = _load_data(args, seed, notes=i == 0)

        def train(base, options, data=data, seed=seed):
            check_batches(["scratch"], args.batch_size, data)
            print(f"seed {seed}: training teacher on {args.dataset} ({len(data.train)} train samples, device {device})", flush=True)
            return train_teacher(data, base, device, _print_epoch(args.epochs, options.select_on, f"seed {seed}"))

        # A stored teacher is read (a mismatched file refused with the fix to apply), a missing one trained.
        _, trained = teachers.get(data.options, data.info, train)
        if not trained:
            print(f"seed {seed}: teacher already at {record.weights} (--force retrains)")
            continue
        test = json.loads(record.metrics.read_text())["test"]
        _print_test(test, data.info)
        print(f"seed {seed}: wrote {record.weights}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from fairtune import hyperparameters
    from fairtune.methods import get_method
    from fairtune.runs import resolve_hyperparameters
    from fairtune.tune.cluster import prepare_environment

    prepare_environment(args.address)  # before anything imports ray
    method = get_method(args.method)
    given = _given(args)
    if method.searched and given[method.searched] is not None:
        flag = hyperparameters.get(method.searched).flag
        raise UserError(f"{method.name} searches {method.searched}; drop {flag} (the search space is search_spaces/{method.name}.yaml)")
    if args.grace_period is not None and args.grace_period > args.epochs:
        raise UserError(f"--grace-period {args.grace_period} is more than the {args.epochs} epochs; use at most {args.epochs}, or omit it for E/10")
    spaces_dir = _spaces_dir(args, method.name)
    hyper = resolve_hyperparameters(method.name, args.dataset, given, args.results_dir, spaces_dir)
    if method.searched:
        hyper.pop(method.searched)
    _check_results_dir(args, args.dataset)
    folder = Layout(args.results_dir, args.dataset).search(method.name).path.resolve()
    if args.resume and not folder.exists():
        raise UserError(f"--resume: there is no search of {method.name} in {folder} to resume; drop --resume to start one")
    _setup_threads(args)

    from fairtune.data import default_data_dir
    from fairtune.runs import check_batches
    from fairtune.teachers import TeacherProvider
    from fairtune.tune.search import run_search

    data = _load_data(args, args.seed)  # fail fast, with the one-line message, on missing data
    untrained_teacher = method.needs_teacher and TeacherProvider(args.results_dir, args.dataset).to_train(args.seed)
    check_batches([method.name] + ["scratch"] * untrained_teacher, args.batch_size, data)
    settings = _search_settings(args, method.name, hyper, spaces_dir, _gpus_per_trial(args))
    fixed = ", ".join(f"{k}={v:g}" for k, v in hyper.items())
    print(
        f"search {method.name} on {args.dataset}: {method.searched or 'nothing'} searched"
        f"{f' ({fixed} fixed)' if fixed else ''}, {args.num_samples if method.searched else 1} trials x "
        f"up to {settings.base.total_epochs} epochs, objective {args.objective}; data from "
        f"{data.notes.get('source_dir', args.data_dir or default_data_dir())}; experiment in {settings.experiment_dir}",
        flush=True,
    )
    from fairtune.tune.search import SearchInterrupted

    try:
        best = run_search(settings, lambda line: print(line, flush=True))
    except (SearchInterrupted, KeyboardInterrupt) as exc:
        # Every finished epoch is in the search's ledger and its trials' state files: nothing is lost.
        why = str(exc) if isinstance(exc, SearchInterrupted) else (
            f"interrupted; what ran is kept in {settings.experiment_dir}: rerun the same command with --resume to continue"
        )
        print(f"fairtune: search {why}", file=sys.stderr)
        return 130
    _print_search_summary(best, settings)
    return 0


def _search_settings(args: argparse.Namespace, method: str, hyper: dict, spaces_dir: Path, gpus: float):
    from fairtune.data import default_data_dir
    from fairtune.tune.search import SearchSettings

    return SearchSettings(
        base=_train_config(args, method, hyper), data=_data_options(args, args.seed),
        data_dir=args.data_dir or default_data_dir(), results_dir=args.results_dir,
        num_samples=args.num_samples, grace_period=args.grace_period, reduction_factor=args.reduction_factor,
        max_concurrent=args.max_concurrent, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=gpus,
        max_failures=args.max_failures, resume=getattr(args, "resume", False), address=args.address, device=args.device,
        spaces_dir=spaces_dir,
    )


def _print_search_summary(best, settings) -> None:
    """``best``: the search's BestConfig."""
    import pandas as pd

    folder = SearchDir(settings.experiment_dir)
    trials = pd.read_csv(folder.trials_csv, dtype={"trial_id": str, "error": str}).fillna({"error": ""})
    shown = [c for c in ("trial_id", best.searched, "status", "epochs_run", "final_accuracy", "final_deo_a", "final_deo_m", "final_objective", "error") if c and c in trials]
    print()
    print(trials[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    budget = best.budget
    hyper = ", ".join(f"{k}={v:g}" for k, v in best.hyperparameters.items()) or "no hyperparameters"
    objective = f"{best.objective} scalarised as {best.scalarised}" if best.scalarised is not None else best.objective
    print(
        f"\nbest: {hyper}  ({objective} {best.objective_value:.2f}: accuracy {best.val.accuracy:.2f}, "
        f"DEO_A {best.val.deo_a:.2f}, DEO_M {best.val.deo_m:.2f} on {best.selection_split}; trial {best.trial_id})"
    )
    if best.pareto_trials is not None:
        print(f"Pareto set on {' and '.join(best.objectives)} ({best.selection_split}, completed trials): {', '.join(best.pareto_trials) or 'none'}")
    print(
        f"budget: {budget['epochs_run']} epochs run of {budget['epochs_if_no_early_stopping']} without early stopping, "
        f"{budget['failed_trials']} failed trial(s), {budget['seconds']:.0f} s"
    )
    if best.pareto_trials is not None:
        print(f"wrote {folder.best}, {folder.trials_csv} and {folder.pareto_csv}")
    else:
        print(f"wrote {folder.best} and {folder.trials_csv}")
    print(f"curves: tensorboard --logdir {shlex.quote(str(Layout(settings.results_dir, settings.data.dataset).root))}")


# GPU share per run under `--gpus-per-trial auto`: one 6-conv CNN at batch 128 cannot fill an H100/H200,
# so eight runs share one (the GPU check measures packed throughput at 1-16 per GPU); larger models two.
AUTO_GPU_SHARE = {"cnn": 0.125}
AUTO_GPU_SHARE_OTHER = 0.5


def _gpus_per_trial(args: argparse.Namespace, dataset: str | None = None, options=None) -> float:
    """The flag's number; else, on a cluster with GPUs, one GPU per run (``auto``: a packed share for
    the model of ``options``, by default the data flags')."""
    if args.gpus_per_trial not in (None, "auto"):
        return args.gpus_per_trial
    from fairtune.tune.cluster import connect

    if not connect(args.address).get("GPU", 0):
        return 0.0
    if args.gpus_per_trial is None:
        return 1.0
    from fairtune.data import DataOptions, dataset_info, given_options

    options = options or DataOptions(dataset or args.dataset, **given_options(args))
    return AUTO_GPU_SHARE.get(dataset_info(options, args.data_dir).model, AUTO_GPU_SHARE_OTHER)


def _final_datasets(args: argparse.Namespace) -> list[str]:
    if args.dataset:
        return [args.dataset]
    from fairtune.data import DATASETS

    found = [d for d in DATASETS if any(search.best.exists() for search in Layout(args.results_dir, d).searches())]
    if not found:
        raise UserError(
            f"no best configs under {args.results_dir}; run `fairtune search --method M --dataset D` first, or pass --dataset"
        )
    return found


def cmd_final(args: argparse.Namespace) -> int:
    from fairtune.selection import parse_rule
    from fairtune.tune.cluster import prepare_environment

    rule = parse_rule(args.select)
    prepare_environment(args.address)  # before anything imports ray
    _setup_threads(args)

    from fairtune.tune.final import plan_final, run_final

    failed = []
    for dataset in _final_datasets(args):
        _check_results_dir(args, dataset)
        settings = _final_settings(args, dataset, args.method or (), rule)
        plan = plan_final(settings)  # every config checked before a cluster is touched
        if plan.runs_todo:
            settings = replace(settings, gpus_per_trial=_gpus_per_trial(args, dataset, options=plan.data))
        failures = run_final(settings, plan, lambda line: print(line, flush=True))
        failed += [f"{dataset}: {line}" for line in failures]
        _print_report(args.results_dir, dataset, [rule])
    return _failures(failed, "final run(s) failed; the others are written and in the table")


def _final_settings(args: argparse.Namespace, dataset: str, methods, rule=None):
    """``final``'s settings from the flags (``rule``: the selection rule, default best)."""
    from fairtune.data import default_data_dir, given_options
    from fairtune.selection import BEST
    from fairtune.tune.final import FinalSettings

    return FinalSettings(
        dataset=dataset, results_dir=args.results_dir, data_dir=args.data_dir or default_data_dir(),
        methods=tuple(methods), seeds=tuple(dict.fromkeys(args.seeds)),
        train_overrides={k: getattr(args, k) for k in TRAIN_PROTOCOL_FLAGS if getattr(args, k, None) is not None},
        data_overrides={**{k: getattr(args, k) for k in DATA_PROTOCOL_FLAGS if getattr(args, k, None) is not None}, **given_options(args)},
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=0.0, address=args.address, device=args.device,
        force=getattr(args, "force", False), rule=rule or BEST,
    )


def cmd_protocol(args: argparse.Namespace) -> int:
    from fairtune.tune.cluster import prepare_environment

    prepare_environment(args.address)  # before anything imports ray
    from fairtune import hyperparameters
    from fairtune.methods import PAPER_ORDER, get_method

    if len(set(args.seeds)) < len(args.seeds):
        twice = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
        raise UserError(f"--seeds names {', '.join(map(str, twice))} more than once; name each seed once")
    if args.grace_period is not None and args.grace_period > args.epochs:
        raise UserError(f"--grace-period {args.grace_period} is more than the {args.epochs} epochs; use at most {args.epochs}, or omit it for E/10")
    _check_results_dir(args, args.dataset)
    from fairtune.runs import check_batches
    from fairtune.tune.protocol import ProtocolSettings, check_methods, run_protocol, search_settings
    from fairtune.tune.search import search_status

    given = _given(args)
    methods = check_methods(list(args.method or PAPER_ORDER), args.dataset, given, args.results_dir)
    for name, value in given.items():  # a flag no method reads would be ignored silently
        if value is not None and not any(name in get_method(m).params and name != get_method(m).searched for m in methods):
            raise UserError(f"{hyperparameters.get(name).flag} is read by none of {', '.join(methods)} as a fixed value; drop it")
    spaces_dir = _spaces_dir(args)
    _setup_threads(args)
    data = _load_data(args, args.seed)
    check_batches([*methods, "scratch"], args.batch_size, data)
    settings = ProtocolSettings(
        search=_search_settings(args, "scratch", {}, spaces_dir, 0.0), final=_final_settings(args, args.dataset, ()),
        methods=methods, given={k: v for k, v in given.items() if v is not None},
    )
    # A search recorded with other settings is refused now, not when its turn comes (those whose
    # fixed value comes from a search still to run are checked when they start).
    for method in methods:
        if all(source not in methods for _, source in get_method(method).fixed_from):
            search_status(search_settings(settings, method))
    gpus = _gpus_per_trial(args)
    settings = replace(settings, search=replace(settings.search, gpus_per_trial=gpus), final=replace(settings.final, gpus_per_trial=gpus))
    block = _StatusBlock(sys.stdout.isatty())
    refresh = args.refresh or (2.0 if block.tty else 30.0)
    print(
        f"protocol on {args.dataset}: {', '.join(methods)}; searches of {args.num_samples} trials x up to {args.epochs} epochs "
        f"(seed {args.seed}), finals on seeds {' '.join(map(str, args.seeds))}; {args.cpus_per_trial} CPU"
        f"{f' + {gpus:g} GPU' if gpus else ''} per run; every line goes to {settings.layout.protocol_log}",
        flush=True,
    )
    # Ctrl-C stops the protocol cleanly even where its shell started it with SIGINT ignored (a
    # background job of a script), as Tune's own handler does for `search`.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        failed = run_protocol(settings, block.say, block.show, refresh)
    except KeyboardInterrupt:
        block.say("fairtune: protocol interrupted; finished searches and seeds are kept, interrupted searches resume: rerun the same command")
        return 130
    try:
        _print_report(args.results_dir, args.dataset)
    except UserError as exc:  # e.g. every final failed: nothing to tabulate
        print(f"fairtune: no table: {exc}", file=sys.stderr)
    return _failures(failed, "part(s) of the protocol failed; the rest finished and is in the table")


def _failures(failed: list[str], what: str) -> int:
    """Exit code 1 and one line per failed part when some failed (the rest was kept), else 0."""
    if not failed:
        return 0
    print(f"fairtune: {len(failed)} {what}:", file=sys.stderr)
    for line in failed:
        print(f"  {line}", file=sys.stderr)
    return 1


class _StatusBlock:
    """The protocol's one status block: redrawn in place on a terminal, printed whole otherwise; event
    lines go above it."""

    def __init__(self, tty: bool):
        self.tty, self.drawn = tty, 0

    def _clear(self) -> None:
        if self.tty and self.drawn:
            sys.stdout.write(f"\x1b[{self.drawn}F\x1b[J")
        self.drawn = 0

    def say(self, line: str) -> None:
        self._clear()
        print(line, flush=True)

    def show(self, status) -> None:
        lines = status_lines(status)
        self._clear()
        print("\n".join(lines), flush=True)
        self.drawn = len(lines) if self.tty else 0


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def status_lines(status) -> list[str]:
    """The status block: one line for the whole run, one per method."""
    pace = f"{status.seconds_per_epoch:.1f} s per epoch per slot" if status.seconds_per_epoch else "pace not measured yet"
    head = (
        f"[{_duration(status.elapsed)}] slots {status.slots_busy:g}/{status.slots_total:g} busy · epochs {status.epochs_done} "
        f"of at most {status.epochs_budget} · {pace} · ETA {'≤ ' + _duration(status.eta) if status.eta is not None else '?'}"
    )
    lines = [head]
    for row in status.methods:
        if row.search == "waiting":
            search = f"waiting for {row.waiting_for}" if row.waiting_for else "waiting"
        elif row.search == "failed" and not row.trials_planned:
            search = f"failed: {row.error}"
        else:
            search = (
                f"{row.search:<7} {row.trials_done}/{row.trials_planned} trials done, {row.trials_running} running, "
                f"{row.trials_stopped} stopped · {row.epochs_done}/{row.epochs_budget} epochs"
            )
        best = f"best {row.best:7.2f}" if row.best is not None else "best    –  "
        final = f"final {row.seeds_done}/{row.seeds_planned} seeds" + (" (running)" if row.final == "running" else "")
        if row.final == "failed":
            final = "final failed"
        lines.append(f"  {row.method:<10} {search:<62} {best}  {final}")
    return lines


def _print_report(results_dir: Path, dataset: str, rules: list | None = None) -> None:
    from fairtune.report import write_reports
    from fairtune.selection import BEST

    report = write_reports(results_dir, dataset, rules or [BEST])
    for rule, files in report.files.items():
        print(f"\n{dataset}, configs chosen by rule {rule.text}:\n")
        print(files.markdown.read_text().rstrip())
    if report.selection:
        print(f"\n{dataset}, the rules side by side:\n")
        print(report.selection.markdown.read_text().rstrip())
    folder = Layout(results_dir, dataset).root
    print(f"\nwrote {', '.join(p.name for p in report.paths())} in {folder}")
    print(f"curves of the searches and final runs: tensorboard --logdir {shlex.quote(str(folder))}")


def cmd_report(args: argparse.Namespace) -> int:
    from fairtune.selection import parse_rule

    _check_results_dir(args, args.dataset)
    _print_report(args.results_dir, args.dataset, [parse_rule(text) for text in args.select])
    return 0


COMMANDS = {
    "list": cmd_list, "train": cmd_train, "teacher": cmd_teacher, "search": cmd_search,
    "final": cmd_final, "protocol": cmd_protocol, "report": cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        from fairtune.plugin import load

        load(_plugin_specs(argv))  # before the parser: plugins add methods, datasets and flags
        args = build_parser().parse_args(argv)
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed or full stdout fails here, inside the handlers below, not at exit
        return code
    except BrokenPipeError:
        # `fairtune list | head`: the reader took what it wanted. End quietly, as a tool killed by SIGPIPE.
        _discard_stdout()
        return 128 + 13
    except UserError as exc:
        print(f"fairtune: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from fairtune.engine import NonFiniteLoss

        if not isinstance(exc, NonFiniteLoss):
            raise
        print(f"fairtune: run failed: {exc}; try a smaller --lam / --lr", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fairtune: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.filename is None and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            # A write through an open stream (standard output, or a file being saved) failed: the same
            # fault of the machine as above, without a name to give.
            _discard_stdout()
            print(f"fairtune: error: a write failed ({exc.strerror}); free space where the output or --results-dir goes, and rerun", file=sys.stderr)
            return 1
        if exc.filename is None:
            raise
        # The machine, not the user: a full disk, a read-only or vanished folder. Writes are atomic,
        # so what was written before stays whole.
        print(f"fairtune: error: cannot access {exc.filename} ({exc.strerror}); free space or fix permissions and rerun", file=sys.stderr)
        return 1


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no usable stdout at all: nothing left to flush
        pass


if __name__ == "__main__":
    sys.exit(main())
