"""`towerrec train` on 1 rank: the rank sizes its threads to the cores (not torchrun's
OMP_NUM_THREADS), says so at start, and writes the profile window it was asked for, which
benchmarks.step_profile and benchmarks.ceiling read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launch_helpers import REPO, script
from towerrec.trainer.config import load_config
from towerrec.trainer.distributed import size_threads

sys.path.insert(0, str(REPO))  # the benchmarks live beside the installed packages, not in them

from benchmarks.ceiling import window_rates  # noqa: E402
from benchmarks.step_profile import GROUPS, rank_groups  # noqa: E402


# Serial: under another test's load the thread governor (trainer.cpu_share) gives threads back,
# and the profile's thread count is then not the plan's (make test runs this alone).
@pytest.mark.serial
def test_one_rank_logs_the_threads_it_chose_and_writes_its_profile(synth_data, tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [str(script("towerrec")), "train", "--config", str(synth_data / "config.yaml"),
         "--set", f"run_dir={run_dir}", "--set", "training.batch_size=512", "--set", "training.max_steps=6",
         "--set", "training.profile_steps=[2, 5]", "--set", "checkpoint.enabled=false",
         "--set", "training.log_interval=2"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    workers = load_config(synth_data / "config.yaml").training.num_workers
    plan = size_threads("auto", local_world_size=1, workers=workers)
    [line] = [x for x in output.splitlines() if "INFO towerrec.trainer.distributed: threads:" in x]
    assert line.endswith(plan.describe()), line
    expected = (
        f"each {plan.intra_op} intra-op + {plan.interop} inter-op torch threads, {workers} loader workers"
    )
    assert expected in line
    assert "WARNING" not in output, output[-4000:]

    profile = json.loads((run_dir / "profile" / "rank0.json").read_text())
    assert (profile["window"], profile["steps"], profile["threads"]) == ([2, 5], 3, plan.intra_op)
    names = {e["name"] for e in profile["events"]}
    for label in ("next_batch", "forward", "backward", "optimizer"):  # TorchRec's pipeline labels
        assert any(n.startswith(f"## {label}") for n in names), (label, sorted(names)[:50])
    assert "profile of steps 3..5" in output

    # What the benchmarks make of them: the step's parts add up to its wall time.
    groups = rank_groups(profile)
    assert all(groups[g] >= 0 for g in GROUPS)
    assert groups["forward/backward"] > 0 and groups["input"] > 0
    assert abs(sum(groups[g] for g in GROUPS) - groups["step"]) < 0.05 * groups["step"] + 0.5, groups
    assert len(window_rates(run_dir / "metrics.jsonl")) == 2  # windows at steps 4 and 6; 2 is warm-up
