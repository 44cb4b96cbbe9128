"""benchmarks.scale: its process-tree memory probe, and the whole lifecycle in --quick mode."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the benchmarks live beside the installed packages, not in them

from benchmarks.scale import QUICK, TreeMonitor  # noqa: E402

MB = 1024**2


def test_tree_monitor_sees_every_process_and_a_forked_childs_own_memory():
    code = textwrap.dedent(
        """
        import os, time
        held = b"x" * (300 << 20)          # 300 MB, every page touched
        child = os.fork()
        if child == 0:
            time.sleep(1.5)                 # shares the parent's pages, writes none
            os._exit(0)
        os.waitpid(child, 0)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    with TreeMonitor(proc.pid) as monitor:
        assert proc.wait(timeout=60) == 0
    parent, child = monitor.peaks()
    assert (parent.label, child.label) == ("python -c", "python -c / worker 1")
    assert parent.rss > 300 * MB and parent.uss is None
    # The child's RSS counts the shared pages; its own memory (USS) does not.
    assert child.rss > 250 * MB and child.uss is not None and child.uss < 50 * MB


def test_tree_monitor_numbers_workers_after_a_forked_child_execs_a_forkserver():
    # multiprocessing's forkserver is forked, then exec's: seen before its exec it still runs its
    # starter's program, and must not take the starter's first worker number.
    server = textwrap.dedent(
        """
        import os, time
        worker = os.fork()
        if worker == 0:
            time.sleep(1.5)
            os._exit(0)
        os.waitpid(worker, 0)
        """
    )
    code = textwrap.dedent(
        f"""
        import os, sys, time
        child = os.fork()
        if child == 0:
            time.sleep(0.5)                 # polled meanwhile with the parent's command line
            marker = "multi" + "processing.forkserver"  # names the exec'd program only
            os.execv(sys.executable, [sys.executable, "-c", {server!r}, marker])
        os.waitpid(child, 0)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    with TreeMonitor(proc.pid, interval=0.05) as monitor:
        assert proc.wait(timeout=60) == 0
    labels = [p.label for p in monitor.peaks()]
    assert labels == ["python -c", "python -c / forkserver", "python -c / worker 1"]


def test_quick_lifecycle_measures_every_stage_and_writes_the_report(tmp_path):
    doc, work = tmp_path / "SCALE.md", tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--quick", "--work", str(work), "--doc", str(doc)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    record = json.loads((work / "scale.json").read_text())
    stages = {s["name"]: s for s in record["stages"]}
    total = QUICK.train_rows + QUICK.eval_rows
    assert list(stages) == [
        f"synth {QUICK.small_rows:,} rows",
        f"synth {total:,} rows",
        f"loader {QUICK.small_rows:,} rows",
        f"loader {QUICK.train_rows:,} rows",
        "plan 2 and 1 ranks",
        "train 2 ranks",
        "resume on 1 rank",
        "export int8",
        "predict 2 processes",
    ]
    for stage in stages.values():
        assert stage["seconds"] > 0 and all(p["rss"] > 10 * MB for p in stage["processes"]), stage
    labels = {name: {p["label"] for p in s["processes"]} for name, s in stages.items()}
    assert {"towerrec train", "torchrun", "rank 0", "rank 1", "rank 0 / worker 1"} <= labels["train 2 ranks"]
    assert "rank 0" in labels["resume on 1 rank"] and "rank 1" not in labels["resume on 1 rank"]
    assert {"towerrec predict / worker 1", "towerrec predict / worker 2"} <= labels["predict 2 processes"]
    # Estimates: the planner's per rank, the artifact's for export and each predicting process.
    assert set(stages["train 2 ranks"]["estimates"]) == {"rank 0", "rank 1"}
    assert set(stages["resume on 1 rank"]["estimates"]) == {"rank 0"}
    assert set(stages["export int8"]["estimates"]) == {"towerrec export"}
    artifact = (work / "model.pt").stat().st_size
    assert stages["predict 2 processes"]["estimates"]["towerrec predict / worker 1"]["bytes"] == artifact
    visitor_weights = QUICK.table_rows * QUICK.dim * 2  # fp16
    assert stages["export int8"]["estimates"]["towerrec export"]["bytes"] == artifact + visitor_weights
    # Planned: the visitor table with its optimizer state on one of 2 ranks, then on the 1 rank.
    planned_2 = [stages["train 2 ranks"]["estimates"][f"rank {r}"]["bytes"] for r in (0, 1)]
    planned_1 = stages["resume on 1 rank"]["estimates"]["rank 0"]["bytes"]
    assert max(planned_2) > visitor_weights and planned_1 > max(planned_2)
    assert record["facts"]["placement"]["1"] == "table_wise on ranks [0]"
    assert record["facts"]["trained_steps"] == -(-QUICK.train_rows // 2 // QUICK.batch_size)
    assert record["facts"]["resumed_steps"] == QUICK.resume_steps
    for name in ("train 2 ranks", "resume on 1 rank", "export int8", "predict 2 processes"):
        assert stages[name]["written"] > 0, name

    text = doc.read_text()
    assert "python -m benchmarks.scale --quick" in text
    assert "| stage | wall s | written | process | peak RSS | estimate | peak / estimate |" in text
    assert f"{QUICK.eval_rows:,} rows predicted" in text
