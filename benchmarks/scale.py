"""The whole lifecycle at the largest size this machine holds, measured stage by stage.

    python -m benchmarks.scale            # 20M training rows, a 100M-row fp16 table: docs/SCALE.md
    python -m benchmarks.scale --quick    # the same code path on tiny sizes (a test runs it)

Every stage is the real command line in a process of its own, as a user would run it:

1. ``towerrec data synth`` of ``--small_rows`` rows, then of ``--train_rows`` + ``--eval_rows``
   rows with ``--visitors TABLE_ROWS`` (a ``visitor_id`` column of 64-bit ids over the whole int64
   range, read with ``id_mode: hash`` into a ``visitor`` table of ``--table_rows`` rows), both
   one row group at a time: the peak RSS of the two shows whether memory grows with the rows.
2. A loader-only pass (``ParquetDataset`` through ``make_dataloader`` to the end, no training) over
   the small set and over the large set's training split: the loader's peak at both sizes.
3. ``towerrec plan --compare`` of the training config for this job's 2-rank and 1-rank topology
   (the trainer's own ``job_topology``): the planner's per-rank memory estimate.
4. ``towerrec train --nproc_per_node 2`` (TorchX ``local_cwd``, torchrun, 2 gloo ranks), one epoch,
   the ``visitor`` table (``--dim`` x ``--data_type``, placed by the fast planner) beside the 5
   demo tables, evaluated and checkpointed at the end.
5. ``towerrec train --nproc_per_node 1 --resume required``: the 2-rank checkpoint resharded onto
   1 rank, ``--resume_steps`` more steps, checkpointed.
6. ``towerrec export --quantize int8`` of that checkpoint (with its self-check).
7. ``towerrec predict --nproc 2`` over the eval split (``--eval_rows`` rows).

Per stage: wall time, bytes written (files under its outputs modified during the stage), and the
peak RSS of every process of its tree (the stage's process and all descendants: torchrun, ranks,
DataLoader workers, spawned predictors), polled every 0.2 s with psutil; the peak is the kernel's
high-water mark (VmHWM) at the last poll, so only growth in a process's last 0.2 s can be missed.
A DataLoader worker is forked from its rank after the tables exist: its RSS counts the pages it
shares with the rank until either writes them, so the worker's own memory is its USS (shown too).
Beside each peak: what it should be, and the ratio. Ranks: the planner's per-rank estimate
(``report.json`` ``ranks[r].ddr_used``: embedding shards with optimizer state + TorchRec's
reservation for dense parameters and inputs); export: the artifact plus the largest table's
weights; predict: the artifact (one copy per predicting process). The difference is the fixed
overhead of a process (Python, torch, fbgemm, buffers).

The work folder (``--work``, default ``runs/scale``; ``runs/scale-quick`` with ``--quick``) is
emptied first (only if it holds this benchmark's marker file) and kept afterwards, with every
stage's log under ``logs/`` and the numbers in ``scale.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from benchmarks.report import markdown_table, write_section

ROOT = Path(__file__).resolve().parents[1]
SCALE_MD = ROOT / "docs" / "SCALE.md"
MARKER = ".towerrec-scale-benchmark"
GB = 1024**3
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2}
# The export's self-check tolerance of a probability change. int8 rows of an fp16 table moved one
# of 20,000 probabilities by 0.012 at 2M rows / a 10M-row table (AUC change 2e-5), over the
# default 0.01: the benchmark measures memory and time, so it allows 0.05 and keeps the AUC check.
EXPORT_MAX_DP = 0.05


@dataclass(frozen=True)
class Sizes:
    """What one run of the benchmark trains on."""

    train_rows: int
    eval_rows: int
    small_rows: int
    table_rows: int
    dim: int
    data_type: str
    batch_size: int  # per rank
    resume_steps: int


FULL = Sizes(20_000_000, 1_000_000, 1_000_000, 100_000_000, 16, "fp16", 2048, 200)
# --quick (the test suite runs it): every stage, small enough that process start-up dominates.
# The visitor table stays the largest in bytes (400k x 16 fp16, 12.8 MB, above the 100k x 16 fp32
# user table's 6.4 MB): export's estimate is the artifact plus that table.
QUICK = Sizes(40_000, 5_000, 5_000, 400_000, 16, "fp16", 1024, 4)


# ------------------------------------------------------------------------------- process trees


@dataclass
class ProcessPeak:
    """One process of a stage's tree: what it is and the most memory it held."""

    pid: int
    label: str
    command: list[str] = field(default_factory=list, repr=False)
    rss: int = 0  # peak resident set (VmHWM), bytes
    uss: int | None = None  # peak memory of its own (forked children only)


def _high_water_mark(pid: int) -> int | None:
    """VmHWM of /proc/PID/status in bytes: the process's peak RSS so far (Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class TreeMonitor:
    """Polls a process and all its descendants every ``interval`` s in a thread; keeps each
    process's peak RSS under a label that says what it is (``rank 1``, ``rank 1 / worker 1``).

    Example::

        proc = subprocess.Popen(cmd)
        with TreeMonitor(proc.pid) as monitor:
            proc.wait()
        monitor.peaks()   # [ProcessPeak(pid, "towerrec train", rss), ...]
    """

    # A USS reading walks the process's page tables (smaps_rollup): for a worker mapping a rank's
    # tables that costs CPU the ranks need, so it is read every 5th poll only.
    USS_EVERY = 5
    # A child seen running its parent's program may yet exec one (a forkserver does, within
    # milliseconds): it is named and numbered once it has been seen that long. Its high-water
    # mark keeps the peak it reaches meanwhile.
    SETTLE_S = 1.0

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self._polls = 0
        self._peaks: dict[int, ProcessPeak] = {}
        self._forked: set[int] = set()
        self._children: dict[int, int] = {}  # parent pid -> children numbered so far
        self._owner: dict[int, ProcessPeak] = {}  # forkserver pid -> the process it serves
        self._first_seen: dict[int, float] = {}  # unnamed forked pid -> monotonic time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMonitor":
        self.poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peaks(self) -> list[ProcessPeak]:
        return sorted(self._peaks.values(), key=lambda p: p.pid)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        self._polls += 1
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in tree:
            try:
                peak = self._peaks.get(proc.pid)
                if peak is None or (proc.pid in self._forked and proc.cmdline() != peak.command):
                    if not proc.cmdline() or (peak is None and self._just_forked(proc)):
                        continue  # not readable yet, or may still exec: next poll
                    peak = self._add(proc)  # new, or a fork that has since exec'd a program
                rss = _high_water_mark(proc.pid) or proc.memory_info().rss
                peak.rss = max(peak.rss, rss)
                if proc.pid in self._forked and (peak.uss is None or self._polls % self.USS_EVERY == 0):
                    uss = proc.memory_full_info().uss
                    peak.uss = max(peak.uss or 0, uss)
            except psutil.Error:  # exited between the listing and the reading
                continue

    def _just_forked(self, proc: psutil.Process) -> bool:
        parent = self._peaks.get(proc.ppid())
        if parent is None or proc.cmdline() != parent.command:
            return False
        # psutil's create_time rests on a boot time rounded to the second: the monitor's own clock
        first_seen = self._first_seen.setdefault(proc.pid, time.monotonic())
        return time.monotonic() - first_seen < self.SETTLE_S

    def _add(self, proc: psutil.Process) -> ProcessPeak:
        parent = self._peaks.get(proc.ppid())
        if parent is None and proc.pid != self.root.pid:
            parent = self._add(psutil.Process(proc.ppid()))
        command = proc.cmdline()
        parent_command = parent.command if parent is not None else []
        label = _role(command, parent_command, proc)
        if label == "forkserver" and parent is not None:
            label = f"{parent.label} / forkserver"
        elif label is None:  # a forked or spawned child of a known process
            label = "?"
            # A forkserver's children are its starter's workers: numbered, and named, under it.
            owner = self._owner.get(parent.pid, parent) if parent is not None else None
            if owner is not None:
                n = self._children[owner.pid] = self._children.get(owner.pid, 0) + 1
                label = f"{owner.label} / worker {n}"
        if label.endswith(" / forkserver") and parent is not None:
            self._owner[proc.pid] = parent
        self._forked.discard(proc.pid)
        if command == parent_command:
            self._forked.add(proc.pid)
        peak = self._peaks[proc.pid] = ProcessPeak(proc.pid, label, command)
        return peak


def _role(command: list[str], parent_command: list[str], proc: psutil.Process) -> str | None:
    """What a process is, from its command line; None for a child running its parent's code
    (forked) or a multiprocessing child (spawned), which its parent names."""
    text = " ".join(command)
    if "multiprocessing.resource_tracker" in text:
        return "resource tracker"
    if "multiprocessing.forkserver" in text and command != parent_command:
        return "forkserver"
    if not command or command == parent_command or "multiprocessing" in text:
        return None
    if "torch.distributed.run" in command or any(Path(w).name == "torchrun" for w in command[:2]):
        return "torchrun"  # before the ranks: its command line names the ranks' module too
    if "towerrec.trainer.main" in command:
        try:
            return f"rank {proc.environ().get('RANK', '?')}"
        except psutil.Error:
            return "rank ?"
    if "benchmarks.scale" in command and "--loader_pass" in command:
        return "loader pass"
    cli = [
        i for i, word in enumerate(command) if word == "towerrec.launch.cli" or Path(word).name == "towerrec"
    ]
    if cli:
        words = []
        for word in command[cli[0] + 1 :]:
            if word.startswith("-"):
                break
            words.append(word)
        return " ".join(["towerrec", *words[:2]])
    return " ".join(Path(w).name for w in command[:2])


# ------------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Estimate:
    """What a process's peak should be, and where the number comes from."""

    bytes: int
    basis: str


@dataclass
class Stage:
    """One command of the lifecycle and what it cost."""

    name: str
    command: list[str]
    outputs: list[Path]
    seconds: float = 0.0
    written: int = 0
    processes: list[ProcessPeak] = field(default_factory=list)
    # process label -> what its peak should be; filled once the numbers exist (plan, artifact)
    estimates: dict[str, Estimate] = field(default_factory=dict)

    def peak(self, label: str) -> ProcessPeak:
        return next(p for p in self.processes if p.label == label)


def bytes_written(paths: list[Path], since: float) -> int:
    """Bytes of the files under ``paths`` modified at or after ``since`` (epoch seconds)."""
    total = 0
    for path in paths:
        files = [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file())
        for f in files:
            stat = f.stat()
            if stat.st_mtime >= since:
                total += stat.st_size
    return total


def run_stage(stage: Stage, log_dir: Path) -> Stage:
    """Run ``stage.command`` from the repository root, watching its process tree.

    Raises:
        RuntimeError: the command failed; names the stage and ends with its output's tail.
    """
    log = log_dir / f"{re.sub(r'[^a-z0-9]+', '-', stage.name.lower()).strip('-')}.log"
    print(f"[scale] {stage.name}: {' '.join(stage.command)}", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    since = time.time() - 1.0  # file times are coarser than time.time() on some file systems
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(stage.command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        with TreeMonitor(proc.pid) as monitor:
            code = proc.wait()
    stage.seconds = time.perf_counter() - start
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"stage {stage.name!r} failed (exit {code}); log {log}:\n{tail}")
    stage.written = bytes_written(stage.outputs, since)
    stage.processes = monitor.peaks()
    top = max(stage.processes, key=lambda p: p.rss)
    print(
        f"[scale] {stage.name}: {stage.seconds:.1f} s, wrote {_size(stage.written)}, "
        f"peak RSS {_size(top.rss)} ({top.label})",
        flush=True,
    )
    return stage


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", GB), ("MB", 1024**2), ("KB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


# ---------------------------------------------------------------------------------- lifecycle


def towerrec(*args: object) -> list[str]:
    """The command line of ``towerrec ARGS`` with this interpreter."""
    return [sys.executable, "-m", "towerrec.launch.cli", *(str(a) for a in args)]


def prepare_work(work: Path) -> None:
    """An empty work folder; refuses to empty a folder this benchmark did not make."""
    if work.exists():
        if not (work / MARKER).exists() and any(work.iterdir()):
            sys.exit(f"error: {work} exists and was not made by benchmarks.scale; choose another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by python -m benchmarks.scale; emptied by its next run\n")


def training_config(data_dir: Path, work: Path, sizes: Sizes) -> Path:
    """The synthetic data's config with the benchmark's table, batch and checkpoint settings."""
    config = yaml.safe_load((data_dir / "config.yaml").read_text())
    config["run_dir"] = str(work / "run")
    for table in config["data"]["tables"]:
        if table["name"] == "visitor":
            table.update(embedding_dim=sizes.dim, data_type=sizes.data_type)
    steps = math.ceil(sizes.train_rows / 2 / sizes.batch_size)
    config["training"].update(
        batch_size=sizes.batch_size,
        epochs=1,
        log_interval=max(1, min(100, steps // 10, sizes.resume_steps // 2)),
        progress_bar=False,
        num_workers=1,
    )
    config["checkpoint"] = {"interval": 0, "keep_last": 2}  # one checkpoint at the end of each run
    path = work / "scale.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def job_topologies() -> dict[int, str]:
    """``towerrec plan`` topology specs of this machine's 1- and 2-rank jobs, as the trainer
    plans them (``trainer.sharding.job_topology``: the host's memory shared by its ranks)."""
    from towerrec.trainer.sharding import job_topology

    specs = {}
    for nproc in (2, 1):
        spec = job_topology(nproc, nproc, "cpu")
        specs[nproc] = (
            f"nodes=1,devices_per_node={nproc},device=cpu,ddr_gb={spec.ddr_gb:g},name=this-host-{nproc}-ranks"
        )
    return specs


@dataclass(frozen=True)
class Planned:
    """What ``towerrec plan`` says of one world size: memory per rank, where the tables went."""

    memory: list[int]  # report.json ranks[r].ddr_used
    placement: dict[str, str]  # table -> "table_wise on ranks [1]"


def read_plans(plan_dir: Path) -> dict[int, Planned]:
    """The plans of ``towerrec plan --compare`` under ``plan_dir``, by world size."""
    planned = {}
    for report in sorted(plan_dir.glob("*/report.json")):
        figures = json.loads(report.read_text())
        if not figures["summary"]["fits"]:
            raise RuntimeError(f"{report}: the plan does not fit: {figures['summary']['error']}")
        planned[figures["summary"]["world_size"]] = Planned(
            [r["ddr_used"] for r in figures["ranks"]],
            {t["table"]: f"{t['sharding_type']} on ranks {t['ranks']}" for t in figures["tables"]},
        )
    return planned


def largest_table_bytes(config_path: Path) -> tuple[str, int]:
    """The largest table's weights (rows x dim x element size): name and bytes."""
    tables = yaml.safe_load(config_path.read_text())["data"]["tables"]
    sizes = {
        t["name"]: t["num_embeddings"] * t["embedding_dim"] * BYTES_PER_ELEMENT[t.get("data_type", "fp32")]
        for t in tables
    }
    name = max(sizes, key=sizes.__getitem__)
    return name, sizes[name]


def run_lifecycle(sizes: Sizes, work: Path) -> tuple[list[Stage], dict[str, Any]]:
    """Every stage in order; returns them with the run's facts for the report."""
    logs = work / "logs"
    logs.mkdir()
    small, data, plan_dir = work / "small-data", work / "data", work / "plan"
    run, model, predictions = work / "run", work / "model.pt", work / "predictions"
    total = sizes.train_rows + sizes.eval_rows
    stages: list[Stage] = []

    def stage(name: str, command: list[str], *outputs: Path) -> Stage:
        stages.append(run_stage(Stage(name, command, list(outputs)), logs))
        save_record(work, sizes, stages)  # what was measured survives a later stage's failure
        return stages[-1]

    synth = ["data", "synth", "--visitors", sizes.table_rows, "--files", 4, "--seed", 0]
    fraction = repr(sizes.eval_rows / total)
    small_synth = towerrec(*synth, "--out", small, "--rows", sizes.small_rows, "--eval_fraction", 0)
    stage(f"synth {sizes.small_rows:,} rows", small_synth, small)
    stage(
        f"synth {total:,} rows",
        towerrec(*synth, "--out", data, "--rows", total, "--eval_fraction", fraction),
        data,
    )
    written = (_split_rows(small / "train"), _split_rows(data / "train"), _split_rows(data / "eval"))
    if written != (sizes.small_rows, sizes.train_rows, sizes.eval_rows):
        raise RuntimeError(f"synth wrote {written} rows (small train, train, eval); asked {sizes}")
    config = training_config(data, work, sizes)

    loader = [
        sys.executable,
        "-m",
        "benchmarks.scale",
        "--loader_pass",
        "--batch_size",
        f"{sizes.batch_size}",
    ]
    stage(f"loader {sizes.small_rows:,} rows", [*loader, str(small / "config.yaml")])
    stage(f"loader {sizes.train_rows:,} rows", [*loader, str(data / "config.yaml")])

    topologies = job_topologies()
    stage("plan 2 and 1 ranks", towerrec("plan", "--config", config, "--topology", topologies[2],
          "--topology", topologies[1], "--compare", "--out", plan_dir), plan_dir)  # fmt: skip
    planned = read_plans(plan_dir)

    train = stage("train 2 ranks", towerrec("train", "--config", config, "--nproc_per_node", 2,
                  "--resume", "never"), run)  # fmt: skip
    trained_steps = _latest_step(run)
    resume = stage("resume on 1 rank", towerrec("train", "--config", config, "--nproc_per_node", 1,
                   "--resume", "required", "--set", "training.epochs=2",
                   "--set", f"training.max_steps={trained_steps + sizes.resume_steps}"), run)  # fmt: skip
    export = stage(
        "export int8",
        towerrec("export", "--run", run, "--out", model, "--quantize", "int8", "--max_dp", EXPORT_MAX_DP),
        model,
    )
    predict = stage("predict 2 processes", towerrec("predict", "--model", model, "--data", data / "eval",
                    "--out", predictions, "--nproc", 2), predictions)  # fmt: skip

    for r, planned_bytes in enumerate(planned[2].memory):
        train.estimates[f"rank {r}"] = Estimate(planned_bytes, f"plan for 2 ranks, rank {r}")
    resume.estimates["rank 0"] = Estimate(planned[1].memory[0], "plan for 1 rank")
    artifact = model.stat().st_size
    table, table_bytes = largest_table_bytes(config)
    export.estimates["towerrec export"] = Estimate(artifact + table_bytes, f"artifact + table {table}")
    for p in predict.processes:  # the pool's processes; each loads the artifact
        if re.fullmatch(r"towerrec predict / worker \d+", p.label):
            predict.estimates[p.label] = Estimate(artifact, "artifact")
    facts = {
        "config": config,
        "placement": {n: p.placement["visitor"] for n, p in planned.items()},
        "trained_steps": trained_steps,
        "resumed_steps": _latest_step(run) - trained_steps,
        "artifact": artifact,
        "metrics": _training_metrics(run, trained_steps),
        "predicted_rows": _split_rows(predictions),
    }
    return stages, facts


def _split_rows(folder: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(f).num_rows for f in sorted(folder.glob("*.parquet")))


def _latest_step(run: Path) -> int:
    from towerrec.trainer.checkpoint import latest_checkpoint, read_meta

    latest = latest_checkpoint(run)
    if latest is None:
        raise RuntimeError(f"{run}: no checkpoint after training")
    return read_meta(latest).step


def _training_metrics(run: Path, trained_steps: int) -> dict[str, Any]:
    """Median training samples/s of the 2-rank epoch and of the 1-rank resume (steps after
    ``trained_steps``), and the 2-rank run's evaluation."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["phase"] == "train"]

    def median_rate(windows: list[dict[str, Any]]) -> float | None:
        windows = windows[1:] or windows  # the first window holds the warm-up
        rates = sorted(r["samples_per_s"] for r in windows)
        return rates[len(rates) // 2] if rates else None

    evals = [r for r in records if r["phase"] == "eval" and r["step"] <= trained_steps]
    return {
        "samples_per_s_2_ranks": median_rate([r for r in train if r["step"] <= trained_steps]),
        "samples_per_s_1_rank": median_rate([r for r in train if r["step"] > trained_steps]),
        "eval": {k: v for k, v in evals[-1].items() if isinstance(v, dict)} if evals else {},
    }


def loader_pass(config_path: str, batch_size: int) -> None:
    """Iterate the training split through the loader as training does (1 DataLoader worker),
    nothing else; print the rows read."""
    from towerrec.data.config import DataConfig, resolve_paths
    from towerrec.data.parquet import ParquetDataset, make_dataloader

    data = DataConfig.model_validate(yaml.safe_load(Path(config_path).read_text())["data"])
    dataset = ParquetDataset(resolve_paths(data.train, "data.train"), data, batch_size)
    rows = sum(batch.real_rows for batch in make_dataloader(dataset, num_workers=1))
    print(json.dumps({"rows": rows, "batches": len(dataset)}))


# ------------------------------------------------------------------------------------- report


def stage_table(stages: list[Stage]) -> str:
    """One row per process of every stage; the stage's wall time and bytes on its first row."""
    header = [
        "stage",
        "wall s",
        "written",
        "process",
        "peak RSS",
        "estimate",
        "peak / estimate",
        "peak - estimate",
    ]
    rows: list[list[object]] = []
    for stage in stages:
        for i, p in enumerate(sorted(stage.processes, key=lambda p: p.label)):
            estimate = stage.estimates.get(p.label)
            own = f" (own {_size(p.uss)})" if p.uss is not None else ""
            rows.append(
                [
                    stage.name if i == 0 else "",
                    f"{stage.seconds:,.1f}" if i == 0 else "",
                    _size(stage.written) if i == 0 and stage.written else "",
                    p.label,
                    _size(p.rss) + own,
                    f"{_size(estimate.bytes)} ({estimate.basis})" if estimate else "",
                    f"{p.rss / estimate.bytes:.2f}" if estimate else "",
                    _size(p.rss - estimate.bytes) if estimate else "",
                ]
            )
    return markdown_table(header, rows)


def report(stages: list[Stage], facts: dict[str, Any], sizes: Sizes) -> str:
    """The section of docs/SCALE.md: what ran, the table, what it shows."""
    config = yaml.safe_load(Path(facts["config"]).read_text())
    demo = [t for t in config["data"]["tables"] if t["name"] != "visitor"]
    rates = facts["metrics"]
    evals = facts["metrics"]["eval"]
    auc = ", ".join(f"{task} {v['auc']:.4f}" for task, v in evals.items() if "auc" in v) or "-"
    synth_small, synth_large = (max(p.rss for p in s.processes) for s in _stages(stages, "synth"))
    loader_small, loader_large = (s.peak("loader pass").rss for s in _stages(stages, "loader"))
    placement = facts["placement"]
    minutes = sum(s.seconds for s in stages) / 60
    lines = [
        f"Data: {sizes.train_rows:,} training + {sizes.eval_rows:,} eval rows of `towerrec data synth` "
        "(13 columns, a multi-hot history among them).",
        f"Tables: **visitor, {sizes.table_rows:,} rows x {sizes.dim} {sizes.data_type}**, ids over the "
        f"whole int64 range (`id_mode: hash`), placed by the fast planner {placement[2]} of 2 and "
        f"{placement[1]} of 1; beside it the {len(demo)} demo tables "
        f"({sum(t['num_embeddings'] for t in demo):,} rows x 16 fp32). Rowwise Adagrad, batch "
        f"{sizes.batch_size:,} per rank.",
        f"Training: 2 ranks, 1 epoch of {facts['trained_steps']:,} steps at "
        f"{_rate(rates['samples_per_s_2_ranks'])} samples/s (median), eval AUC {auc}; then "
        f"{facts['resumed_steps']:,} steps on 1 rank at {_rate(rates['samples_per_s_1_rank'])} samples/s. "
        f"Artifact {_size(facts['artifact'])}; {facts['predicted_rows']:,} rows predicted. "
        f"All stages: {minutes:.1f} min.",
        "",
        stage_table(stages),
        "",
        f"- Streaming: `towerrec data synth` peaks at {_size(synth_small)} for {sizes.small_rows:,} rows "
        f"and {_size(synth_large)} for {sizes.train_rows + sizes.eval_rows:,} "
        f"(x{synth_large / synth_small:.2f}); the loader alone at {_size(loader_small)} for "
        f"{sizes.small_rows:,} rows and {_size(loader_large)} for {sizes.train_rows:,} "
        f"(x{loader_large / loader_small:.2f}).",
        "- Estimates: ranks, `ranks[r].ddr_used` of `towerrec plan` for this host's job topology "
        "(embedding shards with optimizer state + TorchRec's reservation for dense parameters and "
        "inputs); export, the artifact plus the largest table's weights; predict, the artifact per "
        "predicting process. `peak - estimate` is the process's fixed overhead.",
        "- `(own X)`: a forked DataLoader worker's USS, the memory it does not share with its rank.",
    ]
    if sizes != FULL:
        lines.append(f"- Smaller than the defaults of `python -m benchmarks.scale` ({_describe(FULL)}).")
    return "\n".join(lines)


def _stages(stages: list[Stage], prefix: str) -> list[Stage]:
    return [s for s in stages if s.name.startswith(prefix)]


def _rate(x: float | None) -> str:
    return f"{x:,.0f}" if x is not None else "-"


def _describe(sizes: Sizes) -> str:
    return (
        f"{sizes.train_rows:,} training rows, a {sizes.table_rows:,}-row table x {sizes.dim} "
        f"{sizes.data_type}, batch {sizes.batch_size:,}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes: {_describe(QUICK)}")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default runs/scale[-quick])")
    parser.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="markdown file of the report (default docs/SCALE.md; --quick: none)",
    )
    for name, value in vars(FULL).items():
        parser.add_argument(
            f"--{name}",
            type=type(value),
            default=None,
            help=f"default {value} ({QUICK.__dict__[name]} with --quick)",
        )
    parser.add_argument("--loader_pass", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("config", nargs="?", help=argparse.SUPPRESS)  # of --loader_pass
    args = parser.parse_args()
    if args.loader_pass:
        loader_pass(args.config, args.batch_size)
        return

    base = QUICK if args.quick else FULL
    sizes = Sizes(**{k: v if getattr(args, k) is None else getattr(args, k) for k, v in vars(base).items()})
    work = args.work or ROOT / ("runs/scale-quick" if args.quick else "runs/scale")
    doc = args.doc or (None if args.quick else SCALE_MD)
    prepare_work(work)
    stages, facts = run_lifecycle(sizes, work.resolve())
    save_record(work, sizes, stages, facts)
    body = report(stages, facts, sizes)
    if doc is None:
        print(body)
    else:
        write_section("scale", "The lifecycle at scale, measured", body, path=doc)


def save_record(work: Path, sizes: Sizes, stages: list[Stage], facts: dict[str, Any] | None = None) -> None:
    """``WORK/scale.json``: the sizes, every stage measured so far and (at the end) the facts."""
    record = {"sizes": vars(sizes), "facts": facts, "stages": [vars(s) for s in stages]}
    (work / "scale.json").write_text(json.dumps(record, default=_json, indent=1))


def _json(x: object) -> object:
    """Dataclasses as dicts, paths as strings."""
    return vars(x) if hasattr(x, "__dict__") else str(x)


if __name__ == "__main__":
    main()
