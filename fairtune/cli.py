"""The ``fairtune`` command line: parse, validate, run, print. User mistakes exit 2 with one line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fairtune.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag costs one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    from fairtune.data import DATASETS
    from fairtune.metrics import OBJECTIVES

    p.add_argument("--dataset", required=True, choices=list(DATASETS), metavar="D", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-dir", type=Path, default=None, help="where datasets live (default ./data, env FAIRTUNE_DATA)")
    p.add_argument("--results-dir", type=Path, default=Path("results"), help="where results go (default ./results)")
    p.add_argument("--epochs", type=_positive_int, default=50, help="training epochs E (FitNet runs 1.5 E)")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--skew", type=_fraction, default=None, help="cifar10s/fmnist-s gray fraction (default 0.8 / 0.95)")
    p.add_argument("--train-size", type=_positive_int, default=None, help="stratified subsample of train, for quick runs")
    p.add_argument("--eval-size", type=_positive_int, default=None, help="stratified subsample of val and test")
    p.add_argument("--target", default=None, help="celeba target attribute (default Attractive)")
    p.add_argument("--select-on", choices=["val", "test"], default="val", help="split for model selection (test = the official procedure)")
    p.add_argument("--objective", choices=list(OBJECTIVES), default="acc-deo_a")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:k]")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: all cores)")


def build_parser() -> Parser:
    parser = Parser(prog="fairtune", description="Hyperparameter search for fair feature distillation and its baselines.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    commands.add_parser("list", help="methods, datasets, searched hyperparameters and data status").add_argument(
        "--data-dir", type=Path, default=None
    )

    train = commands.add_parser("train", help="one plain run of a method (no search)")
    train.add_argument("--method", required=True, help="e.g. scratch, hkd, mfd, ad+fitnet (see `fairtune list`)")
    _add_common(train)
    train.add_argument("--seed", type=_non_negative_int, default=0)
    train.add_argument("--T", type=float, default=None, help="KD temperature")
    train.add_argument("--lam", type=float, default=None, help="the method's strength λ")
    train.add_argument("--distill-lam", type=float, default=None, help="λ of the distillation term in ad+at / ad+nst")
    train.add_argument("--adv-lr", type=_positive_float, default=3e-3, help="adversaries' Adam lr (AD methods)")

    teacher = commands.add_parser("teacher", help="train and cache teachers (scratch models) per seed")
    _add_common(teacher)
    teacher.add_argument("--seeds", type=_non_negative_int, nargs="+", default=[0, 1, 2, 3])
    teacher.add_argument("--force", action="store_true", help="retrain even when a teacher file exists")
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
        searched = {"T": "T in {1,2,3,4,5,10,20}", "lam": "λ log-uniform [1e-4, 1e2]", None: "nothing to search"}[method.searched]
        fixed = ", ".join(f"{p} from {src}" for p, src in method.fixed_from)
        teacher = "teacher" if method.needs_teacher else "no teacher"
        start = ", ".join(f"{d}={v:g}" for d, v in space.paper.items())
        extra = f"; fixed {fixed}" if fixed else ""
        paper = f"; paper: {start}" if start else ""
        print(f"  {name:<11} {method.label:<10} {searched}{extra} ({teacher}, {method.sampler} sampler{paper})")
    print(f"\nDatasets (data dir: {data_dir}):")
    for name, module in DATASETS.items():
        info = dataset_info(DataOptions(name))
        found = module.locate(data_dir)
        status = f"found at {found}" if found else f"MISSING — {module.EXPECTED}"
        shape = f"{info.num_classes} classes x {info.num_groups} groups, {info.model} @ {info.image_size}px"
        print(f"  {name:<9} {shape}\n            {status}")
    return 0


def _data_options(args: argparse.Namespace, seed: int):
    from fairtune.data import DataOptions

    return DataOptions(
        dataset=args.dataset, seed=seed, skew=args.skew, train_size=args.train_size,
        eval_size=args.eval_size, target=args.target, select_on=args.select_on,
    )


def _setup(args: argparse.Namespace):
    import torch

    from fairtune.engine import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UserError(f"--device {args.device} is not usable here ({str(exc).splitlines()[0]}); use auto or cpu") from None
    return device


def _print_epoch(total_epochs: int, label: str = ""):
    last = [time.perf_counter()]

    def show(m: dict) -> None:
        now = time.perf_counter()
        terms = " ".join(f"{k[6:]} {v:.4g}" for k, v in m.items() if k.startswith("train/") and k != "train/loss")
        print(
            f"{label}epoch {m['epoch']:>3}/{total_epochs} {m['stage']:<4} loss {m['train/loss']:.4f} ({terms}) | "
            f"val acc {m['accuracy']:6.2f} DEO_A {m['deo_a']:6.2f} DEO_M {m['deo_m']:6.2f} obj {m['objective']:7.2f} "
            f"| lr {m['lr']:.1e} {now - last[0]:5.1f}s",
            flush=True,
        )
        last[0] = now

    return show


def _print_test(test: dict) -> None:
    print(f"test: accuracy {test['accuracy']:.2f}  DEO_A {test['deo_a']:.2f}  DEO_M {test['deo_m']:.2f}")
    for g, row in enumerate(test["acc_matrix"]):
        cells = " ".join("   -  " if v is None else f"{v:6.2f}" for v in row)
        print(f"  acc[g={g}] {cells}")
    if test["empty_cells"]:
        print(f"  empty (group, class) cells left out of DEO: {test['empty_cells']}")


def _train_config(args: argparse.Namespace, method: str, hyper: dict[str, float]):
    from fairtune.engine import TrainConfig

    return TrainConfig(
        method=method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        adv_lr=getattr(args, "adv_lr", 3e-3), objective=args.objective, **hyper,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from fairtune.data import load_dataset
    from fairtune.methods import get_method
    from fairtune.runs import resolve_hyperparameters, run_method, write_run
    from fairtune.teachers import load_teacher, teacher_paths

    method = get_method(args.method)
    given = {"T": args.T, "lam": args.lam, "distill_lam": args.distill_lam}
    hyper = resolve_hyperparameters(method.name, args.dataset, given, args.results_dir)
    device = _setup(args)
    data = load_dataset(_data_options(args, args.seed), args.data_dir)
    teacher = None
    if method.needs_teacher:
        teacher = load_teacher(teacher_paths(args.results_dir, args.dataset, args.seed), data)
    config = _train_config(args, method.name, hyper)
    shown = ", ".join(f"{k}={v:g}" for k, v in hyper.items()) or "no hyperparameters"
    print(
        f"{method.name} on {args.dataset} seed {args.seed} ({shown}); train {len(data.train)}, "
        f"{data.options.select_on} {len(data.selection)}, test {len(data.test)} samples; device {device}",
        flush=True,
    )
    trainer_epochs = args.epochs + (args.epochs // 2 if method.hint_stage else 0)
    result = run_method(config, data, teacher, device, _print_epoch(trainer_epochs))
    out = args.results_dir / args.dataset / "train" / method.name / f"seed{args.seed}.json"
    write_run(out, config, data, result, device)
    _print_test(result.test)
    print(f"{result.seconds_per_epoch:.1f} s/epoch; wrote {out}")
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    import json

    from fairtune.data import load_dataset
    from fairtune.runs import ensure_teacher
    from fairtune.teachers import load_teacher, teacher_paths

    device = _setup(args)
    base = _train_config(args, "scratch", {})
    for seed in args.seeds:
        record = teacher_paths(args.results_dir, args.dataset, seed)
        data = load_dataset(_data_options(args, seed), args.data_dir)
        if record.weights.exists() and not args.force:
            load_teacher(record, data)  # refuses a mismatched file with the fix to apply
            print(f"seed {seed}: teacher already at {record.weights} (--force retrains)")
            continue
        print(f"seed {seed}: training teacher on {args.dataset} ({len(data.train)} train samples, device {device})", flush=True)
        ensure_teacher(data, args.results_dir, base, device, force=True, on_epoch=_print_epoch(args.epochs, f"seed {seed} "))
        test = json.loads(record.metrics.read_text())["test"]
        _print_test(test)
        print(f"seed {seed}: wrote {record.weights}")
    return 0


COMMANDS = {"list": cmd_list, "train": cmd_train, "teacher": cmd_teacher}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
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


if __name__ == "__main__":
    sys.exit(main())
