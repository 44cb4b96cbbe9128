"""The ``towerrec`` command line.

Each subcommand is a builder registered with :func:`command`: it adds its own parser (and any
nested subcommands) and sets ``handler``, a function of the parsed arguments returning the exit
code. Heavy imports (torch, torchx, pyarrow) happen inside the handlers so ``--help`` is fast.
A new subcommand (``plan``, ``export``, ``predict``) is one more ``@command`` builder.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Callable, Dict, List, Optional, Sequence, TextIO

Handler = Callable[[argparse.Namespace], int]
Builder = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

# exit codes
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_COMMANDS: Dict[str, Builder] = {}


def command(name: str) -> Callable[[Builder], Builder]:
    """Registers a top-level subcommand builder under ``name`` (in registration order)."""

    def register(builder: Builder) -> Builder:
        if name in _COMMANDS:
            raise ValueError(f"towerrec subcommand {name!r} registered twice")
        _COMMANDS[name] = builder
        return builder

    return register


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples in descriptions as written and shows defaults."""


def _add_parser(subparsers, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=help, description=description, formatter_class=_Formatter)


def _require_subcommand(parser: argparse.ArgumentParser) -> Handler:
    """Handler for a command group run without a subcommand: print its help, usage error."""

    def handler(_: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    return handler


# ------------------------------------------------------------------------------------------- data


@command("data")
def _build_data(subparsers) -> None:
    parser = _add_parser(
        subparsers,
        "data",
        help="make or inspect training data",
        description="Make or inspect training data. See `towerrec data COMMAND --help`.",
    )
    parser.set_defaults(handler=_require_subcommand(parser))
    data_sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    synth = _add_parser(
        data_sub,
        "synth",
        help="write a synthetic Parquet data set and a config that trains on it",
        description=(
            "Write a synthetic multi-task data set (Parquet files) and OUT/config.yaml, a\n"
            "config that trains on it.\n\n"
            "example:\n"
            "  towerrec data synth --out runs/demo-data --rows 200000 --seed 0\n"
            "  towerrec train --config runs/demo-data/config.yaml --nproc_per_node 2"
        ),
    )
    synth.add_argument("--out", required=True, metavar="DIR", help="output directory")
    synth.add_argument("--rows", required=True, type=_positive_int, metavar="N", help="rows to write")
    synth.add_argument("--files", type=_positive_int, default=4, metavar="M", help="Parquet files")
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="random seed")
    synth.set_defaults(handler=_data_synth)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not > 0")
    return value


def _data_synth(args: argparse.Namespace) -> int:
    from data.synth import write_synthetic

    summary = write_synthetic(args.out, rows=args.rows, files=args.files, seed=args.seed)
    rows = getattr(summary, "rows", None)  # data.synth.SynthSummary: rows per split
    split_rows = ", ".join(f"{k} {v}" for k, v in rows.items()) if isinstance(rows, dict) else ""
    config = getattr(summary, "config_path", None) or os.path.join(args.out, "config.yaml")
    print(f"data:   {os.path.abspath(args.out)} ({split_rows or f'{args.rows} rows'})")
    print(f"config: {os.path.abspath(config)}")
    print(f"next:   towerrec train --config {config}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ train


@command("train")
def _build_train(subparsers) -> None:
    parser = _add_parser(
        subparsers,
        "train",
        help="train on this machine (torchrun under the TorchX local_cwd scheduler)",
        description=(
            "Validate the config, then train on this machine: NPROC_PER_NODE ranks of\n"
            "trainer.main under torchrun, launched with TorchX's local_cwd scheduler (the\n"
            "launch/components.py:train component). The ranks' logs stream to the terminal;\n"
            "exits non-zero if the job fails.\n\n"
            "example:\n"
            "  towerrec train --config configs/demo.yaml --nproc_per_node 2 \\\n"
            "      --set training.batch_size=4096 --set training.epochs=2\n\n"
            "The same job through the torchx CLI (and other schedulers):\n"
            "  torchx run -s local_cwd launch/components.py:train --config configs/demo.yaml \\\n"
            "      --nproc_per_node 2 -- training.batch_size=4096 training.epochs=2"
        ),
    )
    parser.add_argument("--config", required=True, metavar="PATH", help="experiment YAML file")
    parser.add_argument(
        "--nproc_per_node", type=_positive_int, default=1, metavar="N", help="trainer processes"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config override, e.g. training.batch_size=4096 (repeatable)",
    )
    parser.add_argument(
        "--log_dir",
        metavar="DIR",
        default=None,
        help="keep the replicas' log files here (default: a temporary directory, deleted at exit)",
    )
    parser.add_argument(
        "--dryrun",
        action="store_true",
        help="validate the config and print the job and the local scheduler request; run nothing",
    )
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from trainer.config import ConfigError, load_config, validate_data

    try:
        config = load_config(args.config, args.overrides)
        if not args.dryrun:  # a dry run only prints the request; the data may live elsewhere
            validate_data(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

    from torchx.runner import get_runner
    from torchx.specs import AppState

    from launch.components import train

    # Ranks run `python`: put this interpreter's directory first so they get the same
    # environment (the venv) even when it is not activated.
    bin_dir = os.path.dirname(sys.executable)
    app = train(
        *args.overrides,
        config=args.config,
        nproc_per_node=args.nproc_per_node,
        env={"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    cfg = {"log_dir": os.path.abspath(args.log_dir)} if args.log_dir else {}

    with get_runner() as runner:
        if args.dryrun:
            info = runner.dryrun(app, "local_cwd", cfg=cfg)
            print(f"=== APPLICATION ===\n{app}\n\n=== SCHEDULER REQUEST ===\n{info}")
            return EXIT_OK

        app_handle = runner.run(app, "local_cwd", cfg=cfg)
        print(f"towerrec train: launched {app_handle}", file=sys.stderr, flush=True)
        log_threads = _tail_logs(runner, app_handle, [(r.name, r.num_replicas) for r in app.roles])
        try:
            status = runner.wait(app_handle, wait_interval=1)
        except KeyboardInterrupt:
            print(f"towerrec train: interrupted, cancelling {app_handle}", file=sys.stderr)
            runner.cancel(app_handle)
            return 130
        for thread in log_threads:
            thread.join(timeout=10)

    state = status.state if status else AppState.UNKNOWN
    print(f"towerrec train: {app_handle} {state.name}", file=sys.stderr, flush=True)
    if state != AppState.SUCCEEDED:
        if args.log_dir:
            print(f"towerrec train: replica logs kept under {cfg['log_dir']}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _tail_logs(runner, app_handle: str, roles: List[tuple], out: Optional[TextIO] = None) -> list:
    """One thread per replica printing its combined stdout/stderr as ``role/replica line``."""
    out = out or sys.stdout
    lock = threading.Lock()

    def pump(role: str, replica: int) -> None:
        prefix = f"{role}/{replica} "
        try:
            for line in runner.log_lines(app_handle, role, replica, should_tail=True):
                with lock:
                    out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
                    out.flush()
        except Exception as e:  # a failed log tail must not hide the job's own result
            with lock:
                print(f"towerrec train: log tail {prefix}stopped: {e}", file=sys.stderr)

    threads = []
    for role, replicas in roles:
        for replica in range(replicas):
            thread = threading.Thread(target=pump, args=(role, replica), daemon=True)
            thread.start()
            threads.append(thread)
    return threads


# ------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="towerrec",
        description=(
            "towerrec: distributed multi-task recommendation training on TorchRec.\n\n"
            "quick start:\n"
            "  towerrec data synth --out runs/demo-data --rows 200000\n"
            "  towerrec train --config runs/demo-data/config.yaml --nproc_per_node 2\n\n"
            "multi-node and cluster jobs: launch/components.py:train with `torchx run`\n"
            "(see `torchx run -s local_cwd launch/components.py:train --help`)."
        ),
        formatter_class=_Formatter,
    )
    parser.set_defaults(handler=_require_subcommand(parser))
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for builder in _COMMANDS.values():
        builder(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
