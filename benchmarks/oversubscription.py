"""Two 1-rank `towerrec train` jobs at once on the same cores: each should get about half of what
one gets alone, with the default threads, and not collapse.

    python -m benchmarks.oversubscription             # auto threads, and the old default for comparison
    python -m benchmarks.oversubscription --quick     # auto only, fewer steps; docs untouched

Each setting runs one job alone, then two (A and B) started together, on the same synthetic data
(the demo model); samples/s are each job's ``metrics.jsonl`` windows less the first, median.
``training.threads: auto`` gives a 1-rank job ``cores - num_workers`` torch threads and gives
them back while another process busies the cores (``trainer.cpu_share``); torch's own default,
every core whatever else runs, is ``training.threads: <cores>``.
Before threads were sized, such a job fell from 20,000+ to ~500 samples/s while another process
was busy: its spinning OpenMP threads and its worker take turns on the cores with the other job's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from towerrec.data.synth import write_synthetic
from towerrec.trainer.distributed import available_cores

from benchmarks.ceiling import TrainRun, finish_train, run_overrides, start_train, threads_cell
from benchmarks.report import markdown_table, write_section


def alone_and_together(
    config: Path, setting: list[str], out: Path, steps: int, log_interval: int
) -> tuple[TrainRun, TrainRun, TrainRun]:
    """One job alone, then two jobs started together; ``(alone, A, B)``."""

    def overrides(name: str) -> list[str]:
        return run_overrides(out / name, steps, log_interval, tuple(setting))

    alone = finish_train(start_train(config, overrides("alone"), out / "alone"), out / "alone")
    a = start_train(config, overrides("a"), out / "a")
    b = start_train(config, overrides("b"), out / "b")
    return alone, finish_train(a, out / "a"), finish_train(b, out / "b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=700_000, help="synthetic rows (2 %% of them eval)")
    parser.add_argument("--steps", type=int, default=400, help="steps of each job (an epoch at most)")
    parser.add_argument("--out", default="runs/bench-oversubscription")
    parser.add_argument("--quick", action="store_true", help="auto threads only, few steps; no docs")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.steps = min(args.rows, 60_000), min(args.steps, 40)

    out = Path(args.out).resolve()
    data = out / "data"
    if not (data / "config.yaml").exists():
        write_synthetic(str(data), rows=args.rows, files=2, seed=0, eval_fraction=0.02)
    config = data / "config.yaml"
    cores = available_cores()
    log_interval = max(5, args.steps // 8)
    settings = {"auto (training.threads default)": []}
    if not args.quick:
        settings[f"{cores} threads (torch's default before)"] = [f"training.threads={cores}"]
    rows = []
    for i, (name, setting) in enumerate(settings.items()):
        alone, a, b = alone_and_together(config, setting, out / f"setting{i}", args.steps, log_interval)
        threads = threads_cell(alone.threads)
        rows.append([
            name, threads, f"{alone.median:,.0f}", f"{a.median:,.0f}", f"{b.median:,.0f}",
            f"{a.median / alone.median:.2f}", f"{b.median / alone.median:.2f}",
        ])  # fmt: skip
        print(rows[-1])
    table = markdown_table(
        ["threads", "per job", "alone samples/s", "together: A", "together: B", "A / alone", "B / alone"],
        rows,
    )
    if args.quick:
        print(table)
        return
    body = (
        f"Demo model on {args.rows:,} synthetic rows, 1 rank per job, the config's loader worker, "
        f"{args.steps} steps per job, {cores} cores; median window samples/s less the first. Two jobs "
        "sharing the cores should each get about half (ratio ~0.5) of one alone.\n\n" + table
    )
    write_section("oversubscription", "Two 1-rank jobs on the same cores", body)


if __name__ == "__main__":
    main()
