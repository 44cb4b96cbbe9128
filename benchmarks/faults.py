"""Fault injection: real TorchX jobs whose ranks are killed or stopped at chosen moments.

    python -m benchmarks.faults                      # every case; a table, and docs/FAULTS.md
    python -m benchmarks.faults --cases checkpoint_write,two_nodes --no_docs

Every case trains the same small model (synthetic data, 2 ranks x 16 steps of 512 rows, a
checkpoint every 4 steps, an evaluation every 8) with
``torchx run -s local_cwd launch/components.py:train --max_restarts 1``. One rank pauses at a fault
point (``benchmarks/fault_points/sitecustomize.py`` writes a marker file with its pid; no sleep
decides the moment) and the harness sends it SIGKILL, or SIGSTOP for a stuck rank. A case passes
when the job recovers: exit 0, rank 0 resumed from the newest complete checkpoint, and
``eval_metrics.json`` equal to an uninterrupted run's; or, for a case that must fail, when it
fails with the expected message within its bound. In both, no process of the job may be left.

``tests/launch/test_faults.py`` runs a fast subset of these cases with the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from towerrec.launch import processes

REPO = Path(__file__).resolve().parents[1]
FAULT_POINTS = Path(__file__).with_name("fault_points")
COMPONENT = "launch/components.py:train"
FAULTS_MD = REPO / "docs" / "FAULTS.md"
# The schedule every case trains: 16 steps, saves at 4, 8, 12, 16, evaluations at 8 and 16.
SCHEDULE = (
    "training.batch_size=512",
    "training.log_interval=4",
    "training.eval_interval=8",
    "checkpoint.interval=4",
    "checkpoint.keep_last=5",
    "training.collective_timeout_s=60",  # a hang the harness did not expect ends within a minute
    "training.progress_bar=false",
)
_RESUMED = re.compile(r"resumed from \S*?(step-\d+)")
_OUTLIVED_SIGTERM = "Unable to shutdown process"  # torchrun, when a rank outlives its SIGTERM


@dataclass(frozen=True)
class Fault:
    """``point`` (``NAME@N``, see fault_points/sitecustomize.py) on ``rank``; ``sig`` sent there."""

    point: str
    rank: int = 1
    sig: signal.Signals = signal.SIGKILL


@dataclass(frozen=True)
class Case:
    """One job. ``resumes``: the checkpoint step the restarted ranks must resume from (None: none
    exists yet, they start over). ``fails_with``: a case that must fail, with this text (regex)
    in the job's output within ``fail_within_s`` seconds of the fault."""

    name: str
    what: str
    fault: Fault | None
    resumes: int | None = None
    nnodes: int = 1
    max_restarts: int = 1
    overrides: tuple[str, ...] = ()
    fails_with: str | None = None
    fail_within_s: float | None = None


CASES = [
    Case("first_steps", "kill -9 rank 1 after its 2nd step (no checkpoint yet)", Fault("train_step@2")),
    Case("first_steps_rank0", "kill -9 rank 0 (the store's host) after its 6th step",
         Fault("train_step@6", rank=0), resumes=4),
    Case("first_save", "kill -9 rank 1 inside the very first save (step-00000004.tmp)",
         Fault("checkpoint_write@4")),
    Case("checkpoint_write", "kill -9 rank 1 inside the save of step 8, its shard written",
         Fault("checkpoint_write@8"), resumes=4),
    Case("checkpoint_finish", "kill -9 rank 0 inside the save of step 8, after DCP's .metadata",
         Fault("checkpoint_finish@8", rank=0), resumes=4),
    Case("evaluation", "kill -9 rank 1 during the evaluation at step 8", Fault("eval_batch@2"),
         resumes=4),
    Case("final_save", "kill -9 rank 1 inside the final save (step 16)", Fault("checkpoint_write@16"),
         resumes=12),
    Case("two_nodes", "2 nodes x 1 rank: kill -9 node 1's rank after its 6th step",
         Fault("train_step@6"), resumes=4, nnodes=2),
    Case("two_nodes_save", "2 nodes x 1 rank: kill -9 node 1's rank inside the save of step 8",
         Fault("checkpoint_write@8"), resumes=4, nnodes=2),
    Case("stuck_rank", "SIGSTOP rank 1 after its 6th step, no restarts, collective timeout 20 s",
         Fault("train_step@6", sig=signal.SIGSTOP), max_restarts=0,
         overrides=("training.collective_timeout_s=20",),
         fails_with=r"\[rank 0\] error: a collective timed out .*rank 1 is not responding",
         fail_within_s=20 + 10),
    Case("stuck_rank0", "SIGSTOP rank 0 (the store's host) after its 6th step, no restarts, timeout 20 s",
         Fault("train_step@6", rank=0, sig=signal.SIGSTOP), max_restarts=0,
         overrides=("training.collective_timeout_s=20",),
         fails_with=r"\[rank 1\] error: a collective timed out .*store .* does not answer.*rank 0",
         fail_within_s=20 + 10 + 10),
    Case("stuck_rank_restart", "SIGSTOP rank 1 after its 6th step, collective timeout 20 s",
         Fault("train_step@6", sig=signal.SIGSTOP), resumes=4,
         overrides=("training.collective_timeout_s=20",)),
]  # fmt: skip
BY_NAME = {c.name: c for c in CASES}


def reference(nnodes: int) -> Case:
    """The uninterrupted run a case's final metrics must equal: same topology, so the same plan
    (2 nodes x 1 rank places the small tables data-parallel, 1 node x 2 ranks table-wise)."""
    suffix = "" if nnodes == 1 else f"_{nnodes}_nodes"
    return Case(f"uninterrupted{suffix}", f"no fault, {nnodes} node(s)", None, nnodes=nnodes)


@dataclass
class Outcome:
    case: Case
    returncode: int | None  # None: still running at the deadline (the harness killed it)
    wall_s: float
    fault_at_s: float | None = None  # since the launch
    exit_after_fault_s: float | None = None
    error_after_fault_s: float | None = None  # when ``fails_with`` appeared in the output
    resumed: list[str] = field(default_factory=list)  # checkpoints rank 0 resumed from
    metrics: dict | None = None
    leftovers: list[str] = field(default_factory=list)  # processes of the job still alive after it
    log: str = ""

    def problems(self, baseline: dict | None) -> list[str]:
        """What makes this case fail; empty when it passed."""
        case, found = self.case, []
        if self.returncode is None:
            found.append(f"hung: still running after {self.wall_s:.0f} s")
        elif case.fails_with is not None:
            if self.returncode == 0:
                found.append("succeeded, expected a failure")
            if self.error_after_fault_s is None:
                found.append(f"no line matching {case.fails_with!r} in the output")
            elif self.error_after_fault_s > (case.fail_within_s or 0):
                found.append(
                    f"the error came {self.error_after_fault_s:.0f} s after the fault"
                    f" (> {case.fail_within_s} s)"
                )
        else:
            if self.returncode != 0:
                found.append(f"exit status {self.returncode}")
            expected = [f"step-{case.resumes:08d}"] if case.resumes is not None else []
            if case.fault is not None and self.resumed != expected:
                found.append(f"resumed from {self.resumed or 'nothing'}, expected {expected or 'nothing'}")
            if baseline is not None and self.metrics != baseline:
                found.append("final metrics differ from the uninterrupted run's")
        if case.fault is not None and case.fault.sig == signal.SIGKILL and _OUTLIVED_SIGTERM in self.log:
            found.append("a rank ignored torchrun's SIGTERM until its SIGKILL 30 s later")
        if case.fault is not None and self.fault_at_s is None:
            found.append(f"fault point {case.fault.point} never reached")
        if self.leftovers:
            found.append(f"processes left: {self.leftovers}")
        return found


def job_command(config: Path, run_dir: Path, case: Case) -> list[str]:
    """The torchx command line of ``case`` (``nproc_per_node`` so that 2 ranks in all)."""
    from towerrec.trainer.distributed import free_port

    topology = ["--nnodes", str(case.nnodes), "--nproc_per_node", str(2 // case.nnodes)]
    if case.nnodes > 1:
        topology += ["--rdzv_port", str(free_port())]
    return [
        str(Path(sys.executable).with_name("torchx")), "run", "-s", "local_cwd", COMPONENT,
        "--config", str(config), *topology, "--max_restarts", str(case.max_restarts),
        "--", f"run_dir={run_dir}", *SCHEDULE, *case.overrides,
    ]  # fmt: skip


def job_env(marks: Path, fault: Fault | None) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if fault is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULT_POINTS), os.environ.get("PYTHONPATH")]))
        env.update(
            TOWERREC_FAULT=fault.point, TOWERREC_FAULT_RANK=str(fault.rank), TOWERREC_FAULT_DIR=str(marks)
        )
    return env


def run_case(case: Case, config: Path, work: Path, timeout_s: float = 300.0) -> Outcome:
    """Run ``case``'s job in ``work/<name>``; inject its fault when the marker appears."""
    run_dir, marks = work / case.name, work / f"{case.name}-marks"
    marks.mkdir(parents=True, exist_ok=True)
    log_path = work / f"{case.name}.log"
    with open(log_path, "wb") as log:
        job = subprocess.Popen(
            job_command(config, run_dir, case),
            cwd=REPO,
            env=job_env(marks, case.fault),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the harness can end the whole job whatever happens
        )
        outcome = watch(job, case, marks, log_path, timeout_s)
    outcome.log = log_path.read_text(errors="replace")
    outcome.resumed = _RESUMED.findall(outcome.log)
    metrics = run_dir / "eval_metrics.json"
    outcome.metrics = json.loads(metrics.read_text()) if metrics.is_file() else None
    return outcome


def watch(job: subprocess.Popen, case: Case, marks: Path, log: Path, timeout_s: float) -> Outcome:
    """Wait for the job; signal the paused rank once its marker exists; note when the expected
    error appears in the log; end a hung job."""
    started = time.monotonic()
    sessions = {job.pid}
    marker = marks / f"{case.fault.point}.pid" if case.fault is not None else None
    fault_at = error_at = None
    next_scan = 0.0
    while job.poll() is None and time.monotonic() - started < timeout_s:
        now = time.monotonic()
        if now >= next_scan:  # the ranks' sessions, while their agent still knows them
            sessions |= processes.job_sessions(job.pid)
            if fault_at is not None and error_at is None and case.fails_with:
                if re.search(case.fails_with, log.read_text(errors="replace")):
                    error_at = now - started
            next_scan = now + 0.25
        if marker is not None and fault_at is None and marker.is_file():
            sessions |= processes.job_sessions(job.pid)
            os.kill(int(marker.read_text()), case.fault.sig)
            fault_at = now - started
        time.sleep(0.05)
    hung = job.poll() is None
    if hung:
        processes.signal_all(processes.alive_in(sessions), signal.SIGKILL)
    job.wait()
    ended = time.monotonic() - started
    if fault_at is not None and error_at is None and case.fails_with:  # the job ended first
        if re.search(case.fails_with, log.read_text(errors="replace")):
            error_at = ended
    left = processes.wait_gone(sessions, timeout_s=10)
    processes.signal_all(left, signal.SIGKILL)  # reported, and never left behind by the harness
    return Outcome(
        case,
        returncode=None if hung else job.returncode,
        wall_s=ended,
        fault_at_s=fault_at,
        exit_after_fault_s=None if fault_at is None else ended - fault_at,
        error_after_fault_s=None if fault_at is None or error_at is None else error_at - fault_at,
        leftovers=[f"{p.pid} {p.command[:80]}" for p in left],
    )


def synthetic_config(out: Path) -> Path:
    """20,000 synthetic rows (16,000 train) and their config, written once."""
    from towerrec.data.synth import write_synthetic

    config = out / "data" / "config.yaml"
    if not config.is_file():
        write_synthetic(str(out / "data"), rows=20_000, files=3, seed=0, row_group_rows=2048)
    return config


def report(outcomes: list[Outcome], references: dict[int, Outcome]) -> str:
    """The table of docs/FAULTS.md: one row per case, against the reference run of its topology."""
    from benchmarks.report import markdown_table

    def seconds(value: float | None) -> str:
        return f"{value:.1f}" if value is not None else "-"

    rows = []
    for o in outcomes:
        baseline = references[o.case.nnodes]
        problems = o.problems(baseline.metrics)
        if problems:
            result = "NO: " + "; ".join(problems)
        else:
            result = "failed as expected, naming the rank" if o.case.fails_with else "yes"
        equal = "-" if o.case.fails_with else ("yes" if o.metrics == baseline.metrics else "no")
        rows.append([
            o.case.name, o.case.what, result, ", ".join(o.resumed) or "-", seconds(o.fault_at_s),
            seconds(o.error_after_fault_s), seconds(o.exit_after_fault_s), seconds(o.wall_s), equal,
        ])  # fmt: skip
    header = ["case", "fault", "as expected", "resumed from", "fault at s", "error after fault s",
              "job end after fault s", "wall s", "final metrics equal"]  # fmt: skip
    wall = ", ".join(f"{n} node(s) {r.wall_s:.1f} s" for n, r in sorted(references.items()))
    return (
        "Every job: 2 ranks x 16 steps, a checkpoint every 4 steps, an evaluation every 8, "
        "`--max_restarts 1` unless the fault says otherwise; final metrics are compared with the "
        f"uninterrupted run of the same topology ({wall}). Seconds are wall clock since the job's "
        "launch or the fault; most of a restart is process start-up (torch, TorchRec).\n\n"
        + markdown_table(header, rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="all", help=f"comma-separated, of: {', '.join(BY_NAME)}")
    parser.add_argument("--work", default=None, help="keep the runs and logs here (default: a temp dir)")
    parser.add_argument("--no_docs", action="store_true", help=f"do not write {FAULTS_MD.name}")
    args = parser.parse_args()
    cases = CASES if args.cases == "all" else [BY_NAME[n] for n in args.cases.split(",")]

    with tempfile.TemporaryDirectory(prefix="towerrec-faults-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        config = synthetic_config(work)
        references = {}
        for nnodes in sorted({c.nnodes for c in cases}):
            references[nnodes] = ref = run_case(reference(nnodes), config, work)
            if ref.returncode != 0 or ref.metrics is None:
                sys.exit(f"the uninterrupted run failed:\n{ref.log[-3000:]}")
        outcomes = []
        for case in cases:
            outcome = run_case(case, config, work)
            problems = outcome.problems(references[case.nnodes].metrics)
            print(f"{case.name}: {'; '.join(problems) or 'ok'} ({outcome.wall_s:.0f} s)", flush=True)
            outcomes.append(outcome)
        body = report(outcomes, references)
        if args.no_docs:
            print(body)
        else:
            from benchmarks.report import write_section

            title = "Fault injection: kill -9 and SIGSTOP of ranks of real TorchX jobs"
            write_section("faults", title, body, path=FAULTS_MD)
        if any(o.problems(references[o.case.nnodes].metrics) for o in outcomes):
            sys.exit(1)


if __name__ == "__main__":
    main()
