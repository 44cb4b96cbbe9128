"""Where a training step's time goes, at 1 and 2 ranks: `towerrec train` under torch.profiler.

    python -m benchmarks.step_profile                    # the demo config (runs/demo-data)
    python -m benchmarks.step_profile --config runs/census/config.yaml
    python -m benchmarks.step_profile --quick            # small synthetic data; docs untouched

Each run is the real trainer (`towerrec train`, TorchX, torchrun) with ``training.profile_steps``
(``trainer.profiling``): the window's pipeline steps run under ``torch.profiler`` and every rank
writes ``key_averages()`` to ``RUN_DIR/profile/rank{r}.json``. The step is split by TorchRec's
own ``record_function`` labels of ``TrainPipelineSparseDist.progress`` and of its collectives:

* input: ``copy_batch_to_gpu`` (holds ``next_batch``: the loader's next batch and lockstep's
  agreement) and ``wait_for_batch``;
* sparse all-to-all: the input dist (``start_sparse_data_dist``, ``wait_sparse_data_dist``, the
  ``KJTListAwaitable`` wait in the forward) and the output dist (``All2All_Pooled_Req``, the
  ``EmbeddingBagCollectionAwaitable`` wait, and their backward); waiting for a slower rank counts here;
* forward/backward: ``forward`` and ``backward`` less the all-to-alls in them: the dense network,
  the fbgemm lookups and their fused update, DDP's gradient all-reduce;
* optimizer: ``optimizer`` and ``zero_grad``;
* other: the step's wall time less all of the above (the pipeline's own Python, the profiler).

Times are per step, mean over ranks; the profiler adds its own cost to every op, so the shares
are the result, not the absolute ms. The counts of host reads (``aten::_local_scalar_dense``: a
``float(tensor)``, ``.item()``, ``.tolist()``) and of collectives per step show what still runs
every step.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
from pathlib import Path

from towerrec.data.synth import write_synthetic

from benchmarks.ceiling import ROOT, child_env, run_overrides, train_command
from benchmarks.report import markdown_table, write_section

TOP = ("zero_grad", "wait_for_batch", "start_sparse_data_dist", "copy_batch_to_gpu", "forward",
       "wait_sparse_data_dist", "backward", "optimizer")  # fmt: skip
# The all-to-alls inside the forward and the backward (not nested in one another).
INNER_A2A = ("KJTListAwaitable wait()", "All2All_Pooled_Req", "EmbeddingBagCollectionAwaitable wait()",
             "All2All_Pooled_ReqBackward", "All2All_Pooled_WaitBackward")  # fmt: skip
GROUPS = ("input", "sparse all-to-all", "forward/backward", "optimizer", "other")
COUNTED = {
    "host reads": ("aten::_local_scalar_dense",),
    "all_reduce": ("c10d::allreduce_",),
    "all_to_all": ("c10d::alltoall_base_", "c10d::alltoall_"),
}


def label(name: str) -> str:
    """``## forward 12 ##`` -> ``forward``; other names unchanged."""
    match = re.fullmatch(r"## (.*?)(?: \d+)? ##", name)
    return match.group(1) if match else name


def rank_groups(profile: dict) -> dict[str, float]:
    """ms per step of each group of :data:`GROUPS`, and the counts of :data:`COUNTED` per step."""
    steps = profile["steps"]
    total_ms: dict[str, float] = {}
    count: dict[str, int] = {}
    for event in profile["events"]:
        key = label(event["name"])
        total_ms[key] = total_ms.get(key, 0.0) + event["cpu_time_total_us"] / 1e3 / steps
        count[key] = count.get(key, 0) + event["count"]
    ms = lambda *keys: sum(total_ms.get(k, 0.0) for k in keys)  # noqa: E731
    a2a_inside = ms(*INNER_A2A)
    groups = {
        "input": ms("copy_batch_to_gpu", "wait_for_batch"),
        "sparse all-to-all": ms("start_sparse_data_dist", "wait_sparse_data_dist") + a2a_inside,
        "forward/backward": ms("forward", "backward") - a2a_inside,
        "optimizer": ms("optimizer", "zero_grad"),
    }
    wall = profile["wall_ms"] / steps
    groups["other"] = max(0.0, wall - ms(*TOP))
    groups["step"] = wall
    for name, keys in COUNTED.items():
        groups[name] = sum(count.get(k, 0) for k in keys) / steps
    return groups


def profile_run(
    config: Path, nproc: int, out: Path, window: tuple[int, int], extra: list[str]
) -> dict[str, float]:
    """Train ``nproc`` ranks with the profile window; the groups, mean over ranks."""
    run_dir = out / f"ranks{nproc}"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    overrides = run_overrides(run_dir, window[1], max(5, window[1] // 4), tuple(extra))
    overrides.append(f"training.profile_steps=[{window[0]}, {window[1]}]")
    cmd = train_command(config, overrides) + ["--nproc_per_node", str(nproc)]
    log = run_dir.with_suffix(".log")
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        if subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=child_env()).returncode:
            raise RuntimeError(f"towerrec train failed:\n{log.read_text()[-4000:]}")
    ranks = [
        rank_groups(json.loads((run_dir / "profile" / f"rank{r}.json").read_text())) for r in range(nproc)
    ]
    return {key: statistics.mean(r[key] for r in ranks) for key in ranks[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--start", type=int, default=30, help="steps before the window (warm-up)")
    parser.add_argument("--steps", type=int, default=50, help="steps profiled")
    parser.add_argument("--out", default="runs/bench-step-profile")
    parser.add_argument("--quick", action="store_true", help="small synthetic data, few steps; no docs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    out = Path(args.out).resolve()
    config = Path(args.config)
    if args.quick:
        data = out / "quick-data"
        if not (data / "config.yaml").exists():
            write_synthetic(str(data), rows=24_000, files=2, seed=0, eval_fraction=0.1)
        config, args.start, args.steps = data / "config.yaml", 5, 10
        args.overrides = ["training.batch_size=512", *args.overrides]
    elif (
        config == ROOT / "configs" / "demo.yaml"
        and not (ROOT / "runs" / "demo-data" / "config.yaml").exists()
    ):
        write_synthetic(str(ROOT / "runs" / "demo-data"), rows=1_000_000, seed=0)
    window = (args.start, args.start + args.steps)
    results = {n: profile_run(config, n, out, window, args.overrides) for n in (1, 2)}

    rows = []
    for group in (*GROUPS, "step"):
        row: list[object] = [group]
        for r in results.values():
            row += [f"{r[group]:.2f}", f"{r[group] / r['step']:.0%}"]
        rows.append(row)
    for name in COUNTED:
        rows.append([f"{name} per step", *(c for r in results.values() for c in (f"{r[name]:.1f}", ""))])
    table = markdown_table(
        ["part of the step", "1 rank: ms/step", "share", "2 ranks: ms/step", "share"], rows
    )
    if args.quick:
        print(table)
        return
    body = (
        f"`towerrec train` on `{_relative(Path(args.config))}`"
        f" (its default threads and workers), steps {window[0] + 1}..{window[1]} under torch.profiler "
        "(`training.profile_steps`), mean over ranks. Groups: TorchRec's record_function labels "
        "(see benchmarks/step_profile.py); the profiler's overhead is in every row.\n\n" + table
    )
    write_section("step_profile", "Where a training step's time goes (torch.profiler)", body)


def _relative(path: Path) -> str:
    """``path`` as written from the repository root (docs carry no path of this machine)."""
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


if __name__ == "__main__":
    main()
