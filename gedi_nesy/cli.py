"""Command line: ``gedi-nesy gedi|train|bench CONFIG [--set key=value ...]``, ``audit TASK`` and
``curves LOG ... --out PNG``.

The CLI only parses arguments and calls the library. Errors a user can fix are printed as one line
(``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gedi_nesy.errors import GediNesyError


def get_parser() -> argparse.ArgumentParser:
    """The ``gedi-nesy`` argument parser: sub-commands train, gedi, audit, bench, curves."""
    parser = argparse.ArgumentParser(
        prog="gedi-nesy", description="GEDI networks as DeepProbLog neural predicates."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a task's networks with the logic + GEDI losses")
    _add_run_args(train)
    gedi = sub.add_parser("gedi", help="train a GEDI network unsupervised on MNIST, evaluate it")
    _add_run_args(gedi)
    audit = sub.add_parser(
        "audit", help="count the deterministic concept maps a task's data allows"
    )
    audit.add_argument("task", help="task name, e.g. mnist_evenodd")
    audit.add_argument("--limit", type=int, default=50, help="how many maps to list")
    audit.add_argument("--json", action="store_true", help="print the result as JSON")
    bench = sub.add_parser(
        "bench", help="compare methods over seeds (and data sizes); rerun to resume"
    )
    bench.add_argument("config", help="bench YAML file, e.g. configs/bench_half.yaml")
    bench.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a bench value, e.g. --set seeds=[0,1] --set base.optim.epochs=2",
    )  # fmt: skip
    bench.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="at most N trials at once (default: 1 locally, a cluster's resources)",
    )
    bench.add_argument(
        "--address",
        default=None,
        help="join the Ray cluster at HOST:PORT (default: RAY_ADDRESS, else local)",
    )
    bench.add_argument(
        "--gpus-per-trial",
        type=float,
        default=1.0,
        help="share of a GPU each CUDA trial reserves, e.g. 0.5 packs two",
    )
    bench.add_argument(
        "--retries",
        type=int,
        default=3,
        help="reruns of a trial whose worker or node died (it resumes)",
    )
    bench.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    curves = sub.add_parser(
        "curves", help="draw runs' step logs (log.jsonl) as training curves, one line per run"
    )
    curves.add_argument("logs", nargs="+", help="run folders or their log.jsonl files")
    curves.add_argument("--out", required=True, help="the PNG to write, e.g. curves.png")
    curves.add_argument(
        "--keys", nargs="+", default=None,
        help="logged values to draw, e.g. logic total (default: every loss and score logged)",
    )  # fmt: skip
    curves.add_argument("--log-y", action="store_true", help="log-scale y axes (losses)")
    return parser


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file, e.g. configs/gedi_mnist.yaml")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.max_steps=100 (repeatable)",
    )  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _print_table(metrics: dict[str, Any]) -> None:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, int | float | str)]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {text}")


def _run_gedi(args: argparse.Namespace) -> dict[str, Any]:
    from gedi_nesy.config import GediRunConfig
    from gedi_nesy.schema import load_config
    from gedi_nesy.train.standalone import train_gedi

    cfg = load_config(args.config, GediRunConfig, args.overrides)
    metrics = train_gedi(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"run folder: {cfg.out_dir}/{cfg.name}")
    return metrics


def _task_module(name: Any) -> Any:
    """The module of task ``name`` from the ``tasks`` registry, imported lazily."""
    import importlib

    from gedi_nesy.errors import ConfigError

    try:
        from tasks import TASKS
    except ImportError:
        raise ConfigError(
            "the tasks package is not importable; install the checkout with pip install -e ."
        ) from None
    if name not in TASKS:
        raise ConfigError(
            f"task.name = {name!r} is unknown; known tasks: {', '.join(sorted(TASKS))}"
        )
    return importlib.import_module(TASKS[name].split(":")[0])


def _run_audit(args: argparse.Namespace) -> dict[str, Any]:
    import json

    from gedi_nesy.errors import ConfigError
    from gedi_nesy.shortcuts.audit import audit, audit_to_dict, format_audit

    module = _task_module(args.task)
    if not hasattr(module, "audit_spec"):
        raise ConfigError(
            f"task {args.task!r} has no audit_spec; audit mnist_evenodd or mnist_half"
        )
    result = audit(*module.audit_spec({"name": args.task}), limit=args.limit)
    print(json.dumps(audit_to_dict(result)) if args.json else format_audit(result))
    return {}


def _run_train(args: argparse.Namespace) -> dict[str, Any]:
    from gedi_nesy.config import NesyRunConfig
    from gedi_nesy.schema import load_config
    from gedi_nesy.train.run import run_training

    cfg = load_config(args.config, NesyRunConfig, args.overrides)
    module = _task_module(cfg.task.get("name"))
    summary = _task_audit(module, cfg.task)
    if summary is not None:
        print(f"shortcut audit: {summary.n_maps} concept maps fit the training data, "
              f"{summary.n_bijections} of them bijections")  # fmt: skip
    task = module.build(cfg.task, cfg.data.root)
    metrics = run_training(cfg, task, resume=args.resume, progress=not args.no_progress)
    print(f"run folder: {cfg.out_dir}/{cfg.name}")
    return metrics


def _task_audit(module: Any, params: dict[str, Any]) -> Any:
    """The shortcut audit of a task module's training data (limit 0: counts only), or None."""
    if not hasattr(module, "audit_spec"):
        return None
    from gedi_nesy.shortcuts.audit import audit

    return audit(*module.audit_spec(params), limit=0)


def _run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from gedi_nesy.bench.run import BenchConfig, run_bench
    from gedi_nesy.errors import TrainingError
    from gedi_nesy.schema import load_config
    from gedi_nesy.shortcuts.audit import audit_to_dict

    cfg = load_config(args.config, BenchConfig, args.overrides)
    task = cfg.base.get("task", {})
    result = _task_audit(_task_module(task.get("name", "mnist_addition")), task)
    summary = None if result is None else audit_to_dict(result)
    out = run_bench(
        cfg,
        jobs=args.jobs,
        address=args.address,
        gpus_per_trial=args.gpus_per_trial,
        retries=args.retries,
        audit=summary,
        progress=not args.no_progress,
    )
    print((Path(out["folder"]) / "summary.md").read_text())
    if out["elsewhere"]:
        print(f"still running in another process, so left to it: {', '.join(out['elsewhere'])}; "
              "rerun this command when it ends to report them", file=sys.stderr)  # fmt: skip
    if out["failed"]:
        for message in out["failed"]:
            print(message, file=sys.stderr)
        raise TrainingError(
            f"{len(out['failed'])} of {out['trials']} trials failed (messages above); fix the "
            "cause and rerun the same command: finished trials are skipped"
        )
    return {}


def _run_curves(args: argparse.Namespace) -> dict[str, Any]:
    from gedi_nesy.train.steplog import save_log_curves

    print(f"wrote {save_log_curves(args.logs, args.out, args.keys, log_y=args.log_y)}")
    return {}


COMMANDS = {
    "gedi": _run_gedi,
    "train": _run_train,
    "audit": _run_audit,
    "bench": _run_bench,
    "curves": _run_curves,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gedi-nesy`` console script."""
    args = get_parser().parse_args(argv)
    try:
        metrics = COMMANDS[args.command](args)
    except GediNesyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if metrics:
        _print_table(metrics)
    return 0
