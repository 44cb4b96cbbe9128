"""``towerrec train``: validate the config, then train on this machine through TorchX.

Example::

    towerrec train --config configs/demo.yaml --nproc_per_node 2 --set training.epochs=2
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from types import FrameType
from typing import Callable, TextIO

from towerrec.launch.commands.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Subparsers,
    add_parser_to,
    non_negative_int,
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
            "exits non-zero if the job fails. Ctrl-C or SIGTERM stops it the way a cluster does:\n"
            "SIGTERM to every rank (each saves a checkpoint at its next step, see\n"
            "checkpoint.preemption_grace_s), then SIGKILL to what is left after the grace; a second\n"
            "Ctrl-C kills at once. No rank process outlives the command.\n\n"
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
        "--max_restarts",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="restart every rank up to N times after one fails (killed, out of memory); each restart "
        "resumes from the newest complete checkpoint",
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
    """``towerrec train``: 2 for an invalid config, 1 if the job fails, 130 (SIGINT) or 143 (SIGTERM)
    when stopped."""
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
    shutdown_timeout = shutdown_timeout_for(config.checkpoint.preemption_grace_s)
    app = train_component(
        *args.overrides,
        config=args.config,
        nproc_per_node=args.nproc_per_node,
        max_restarts=args.max_restarts,
        shutdown_timeout=shutdown_timeout,
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
        with StopSignals() as signals:
            log_thread = stream_logs(runner, app_handle, stopped=lambda: bool(signals.received))
            try:
                status = runner.wait(app_handle, wait_interval=1)
            except Stopped as stopped:
                stop(runner, app_handle, stopped.signum, shutdown_timeout + STOP_MARGIN_S, signals)
                return 128 + stopped.signum
        log_thread.join(timeout=10)

    state = status.state if status else AppState.UNKNOWN
    print(f"towerrec train: {app_handle} {state.name}", file=sys.stderr, flush=True)
    if state != AppState.SUCCEEDED:
        if args.log_dir:
            print(f"towerrec train: replica logs kept under {cfg['log_dir']}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def stream_logs(
    runner, app_handle: str, out: TextIO | None = None, stopped: Callable[[], bool] = lambda: False
) -> threading.Thread:
    """Every replica's combined stdout/stderr on ``out`` as ``role/replica line`` until the job
    ends: torchx's own log printer (what ``torchx run`` and ``torchx log --tail`` use), in a
    daemon thread so a stuck tail never holds up the exit. ``stopped()``: the job was killed, so
    a tail that breaks is expected."""
    from torchx.cli.cmd_log import get_logs

    out = out or sys.stdout

    def pump() -> None:
        try:
            get_logs(out, app_handle, regex=None, should_tail=True, runner=runner)
        except Exception as e:  # a failed log tail must not hide the job's own result
            if not stopped():
                print(f"towerrec train: log tail stopped: {e}", file=sys.stderr)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


# torchrun waits --shutdown_timeout for the ranks it SIGTERMs; this command waits a little longer
# for torchrun itself before it SIGKILLs the job.
STOP_MARGIN_S = 10


def shutdown_timeout_for(preemption_grace_s: float) -> int:
    """torchrun's ``--shutdown_timeout``: its default 30 s, or the preemption grace plus 10 s so a
    rank's preemption checkpoint is never cut short by torchrun's SIGKILL."""
    return max(30, math.ceil(preemption_grace_s) + 10)


class Stopped(Exception):
    """SIGINT or SIGTERM reached ``towerrec train`` while its job ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While the job runs: the first SIGINT/SIGTERM raises :class:`Stopped` in the main thread,
    a second one makes :meth:`hurry` true (kill the job now). The previous handlers (torchx's
    local scheduler installs its own) come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: list[int] = []

    def __enter__(self) -> "StopSignals":
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if len(self.received) == 1:
            raise Stopped(signum)

    def hurry(self) -> bool:
        return len(self.received) > 1


def stop(runner, app_handle: str, signum: int, grace_s: float, signals: StopSignals) -> None:
    """Stop the job like a cluster would and leave no process of it behind (``launch.processes``)."""
    from towerrec.launch.processes import SUPPORTED, stop_job

    name = signal.Signals(signum).name
    print(
        f"towerrec train: {name}: stopping {app_handle}: SIGTERM to every rank (each saves a checkpoint "
        f"at its next step), SIGKILL to what is left after {grace_s:.0f} s; {name} again kills it now",
        file=sys.stderr,
        flush=True,
    )
    if SUPPORTED:
        killed = stop_job(os.getpid(), grace_s, signals.hurry)
        if killed:
            listed = ", ".join(f"{p.pid} ({p.command[:60]})" for p in killed)
            print(
                f"towerrec train: killed {len(killed)} process(es) still running: {listed}", file=sys.stderr
            )
    runner.cancel(app_handle)  # torchx's bookkeeping; on Linux nothing of the job is left to end
    print(f"towerrec train: {app_handle} stopped", file=sys.stderr, flush=True)
