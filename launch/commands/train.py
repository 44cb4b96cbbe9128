"""``towerrec train``: validate the config, then train on this machine through TorchX.

Example::

    towerrec train --config configs/demo.yaml --nproc_per_node 2 --set training.epochs=2
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import TextIO

from towerrec.launch.commands.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Subparsers,
    add_parser_to,
    positive_int,
)
from towerrec.trainer.config import add_config_arguments


def add_parser(subparsers: Subparsers) -> None:
    parser = add_parser_to(
        subparsers,
        "train",
        help="train on this machine (torchrun under the TorchX local_cwd scheduler)",
        description=(
            "Validate the config, then train on this machine: NPROC_PER_NODE ranks of\n"
            "towerrec.trainer.main under torchrun, launched with TorchX's local_cwd scheduler (the\n"
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
    add_config_arguments(parser)
    parser.add_argument(
        "--nproc_per_node", type=positive_int, default=1, metavar="N", help="trainer processes"
    )
    parser.add_argument(
        "--resume",
        choices=["auto", "never", "required"],
        default=None,
        help="checkpoint.resume: continue from RUN_DIR/checkpoints/latest if there is one (auto), "
        "fail without one (required), or refuse a run directory with checkpoints (never)",
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
    parser.set_defaults(handler=train)


def train(args: argparse.Namespace) -> int:
    """``towerrec train``: 2 for an invalid config, 1 if the job fails, 130 when interrupted."""
    from towerrec.trainer.config import ConfigError, load_config, validate_data

    if args.resume:
        args.overrides = [*args.overrides, f"checkpoint.resume={args.resume}"]
    if sys.stderr.isatty():  # the ranks write to log files: ask rank 0 for its progress lines
        args.overrides = ["training.progress_bar=true", *args.overrides]  # the user's --set wins
    try:
        config = load_config(args.config, args.overrides)
        if not args.dryrun:  # a dry run only prints the request; the data may live elsewhere
            validate_data(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

    from torchx.runner import get_runner
    from torchx.specs import AppState
    from towerrec.launch.components import train as train_component

    # Ranks run `python`: put this interpreter's directory first so they get the same
    # environment (the venv) even when it is not activated.
    bin_dir = os.path.dirname(sys.executable)
    app = train_component(
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
        log_thread = stream_logs(runner, app_handle)
        try:
            status = runner.wait(app_handle, wait_interval=1)
        except KeyboardInterrupt:
            print(f"towerrec train: interrupted, cancelling {app_handle}", file=sys.stderr)
            runner.cancel(app_handle)
            return 130
        log_thread.join(timeout=10)

    state = status.state if status else AppState.UNKNOWN
    print(f"towerrec train: {app_handle} {state.name}", file=sys.stderr, flush=True)
    if state != AppState.SUCCEEDED:
        if args.log_dir:
            print(f"towerrec train: replica logs kept under {cfg['log_dir']}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def stream_logs(runner, app_handle: str, out: TextIO | None = None) -> threading.Thread:
    """Every replica's combined stdout/stderr on ``out`` as ``role/replica line`` until the job
    ends: torchx's own log printer (what ``torchx run`` and ``torchx log --tail`` use), in a
    daemon thread so a stuck tail never holds up the exit."""
    from torchx.cli.cmd_log import get_logs

    out = out or sys.stdout

    def pump() -> None:
        try:
            get_logs(out, app_handle, regex=None, should_tail=True, runner=runner)
        except Exception as e:  # a failed log tail must not hide the job's own result
            print(f"towerrec train: log tail stopped: {e}", file=sys.stderr)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread
