"""Test AUC of every model on a real data set, mean ± std over seeds, beside the papers' numbers.

    towerrec data census --out runs/census
    python -m benchmarks.quality --dataset census --data runs/census            # the full sweep
    python -m benchmarks.quality --dataset census --data runs/census --quick    # a check

Protocol (the PLE and MMoE papers'): every run trains through ``towerrec train`` (TorchX
``local_cwd``, ``--nproc`` ranks) for at most the preset's epochs and evaluates the validation
split after every epoch, with early stopping on the validation AUC of the selection task
(Census: income; ``training.early_stopping``, the preset's patience): the epoch of the best
validation AUC is saved as ``checkpoints/best``, training stops after ``patience`` epochs without
an improvement, and only the best checkpoint is evaluated on the test split (``towerrec evaluate``,
which reads ``best``), once. Single-task means one run per task, each stopped and chosen on its own
task. Hyperparameters below were set on validation only; they are the same for every seed.

Results go to ``docs/RESULTS.md`` (one section per data set; ``--quick`` writes a separate one)
and ``RUNS/<dataset>/summary.json``. Finished runs (with ``test_metrics.json``) are reused, so an
interrupted sweep continues where it stopped; ``--fresh`` retrains.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from towerrec.trainer.checkpoint import best_checkpoint, read_meta
from towerrec.trainer.config import ExperimentConfig, add_override_argument, apply_override

from benchmarks.ceiling import window_rates
from benchmarks.report import RESULTS_MD, markdown_table, write_section

MLP = {"tower_hidden": [64, 32]}
# model name -> model section. Widths chosen so every model has a comparable dense budget.
MODELS: dict[str, dict[str, Any]] = {
    "single_task": {"type": "single_task", "hidden": [128, 64], **MLP},
    "shared_bottom": {"type": "shared_bottom", "bottom_hidden": [128, 64], **MLP},
    "mmoe": {"type": "mmoe", "num_experts": 4, "expert_hidden": [64], **MLP},
    "cgc": {"type": "cgc", "experts_per_task": 1, "shared_experts": 1, "expert_hidden": [64], **MLP},
    "ple": {
        "type": "ple",
        "num_levels": 2,
        "experts_per_task": 1,
        "shared_experts": 1,
        "expert_hidden": [64],
        **MLP,
    },
    "dtn": {
        "type": "dtn",
        "methods": ["gdcn", "masknet", "memonet"],
        "module_width": 64,
        "masknet_block_width": 64,
        "masknet_hidden": [128],
        "gate_selector": "input",
        "combine": "concat",
        **MLP,
    },
    # DTN at about a quarter of the dense cost: low-rank GDCN, one MaskNet block with a narrow
    # mask (docs/RESULTS.md: quality; docs/BENCHMARKS.md: time per epoch against PLE).
    "dtn_lite": {
        "type": "dtn",
        "methods": ["gdcn", "masknet", "memonet"],
        "module_width": 64,
        "gdcn_rank": 16,
        "gdcn_layers": 1,
        "masknet_blocks": 1,
        "masknet_mask_width": 16,
        "masknet_block_width": 32,
        "masknet_hidden": [64],
        "gate_selector": "input",
        "combine": "concat",
        **MLP,
    },
}


@dataclass(frozen=True)
class Preset:
    """What differs between data sets: the selection task, crosses, DTN's TSN, the most epochs
    and the early-stopping patience (in epochs), and paper numbers."""

    select: str
    cross_fields: list[str]
    dependencies: dict[str, str]
    epochs: int
    patience: int
    paper: list[tuple[str, dict[str, float], str]]  # (model, {task: AUC}, source)


PRESETS = {
    "census": Preset(
        select="income",
        # Single-hot fields whose pairs the DTN codebook hashes: occupation, industry, household and
        # work-time fields, where pairwise effects on income are plausible.
        cross_fields=[
            "age_bucket",
            "det_occ_code",
            "det_ind_code",
            "class_worker",
            "sex",
            "det_hh_fam_stat",
            "tax_filer_stat",
            "weeks_worked_bucket",
            "full_or_part_emp",
        ],
        dependencies={},  # income and marital status are not a funnel: no TSN edge
        # At 10 epochs every model but DTN chose its last epoch: room to converge, early stopping
        # ends each run 3 epochs after its best.
        epochs=20,
        patience=3,
        paper=[
            ("single_task", {"income": 0.9445, "marital": 0.9923}, "PLE paper, table 5"),
            ("mmoe", {"income": 0.9393, "marital": 0.9928}, "PLE paper, table 5"),
            ("ple", {"income": 0.9522, "marital": 0.9945}, "PLE paper, table 5"),
            ("mmoe", {"income": 0.9359, "marital": 0.9927}, "MMoE paper, table 1 (mean of 400 runs)"),
            ("shared_bottom", {"income": 0.9295, "marital": 0.9921}, "MMoE paper, table 1 (mean of 400)"),
        ],
    ),
    "hillstrom": Preset(
        select="conversion",
        cross_fields=[  # every single-hot field but the bucketised dollar history (history_segment's twin)
            "recency_bucket",
            "history_segment",
            "mens",
            "womens",
            "zip_code",
            "newbie",
            "channel",
            "segment",
        ],
        dependencies={"conversion": "visit"},  # a conversion needs a visit: TSN visit -> conversion
        epochs=20,
        patience=3,
        paper=[],
    ),
}
CODEBOOK = {"name": "cross_codebook", "num_embeddings": 100_000, "embedding_dim": 16}


@dataclass
class Run:
    model: str
    tasks: list[str]  # the data set's tasks, or the one task of a single-task run
    seed: int
    run_dir: Path

    @property
    def label(self) -> str:
        return f"{self.model}" + (f"[{self.tasks[0]}]" if self.model == "single_task" else "")


def base_config(data_dir: Path) -> dict[str, Any]:
    path = data_dir / "config.yaml"
    if not path.is_file():
        sys.exit(f"error: {path} does not exist; write it with `towerrec data <dataset> --out {data_dir}`")
    return yaml.safe_load(path.read_text())


def selection_task(preset: Preset, run: Run) -> str:
    """The task whose validation AUC stops the run and chooses its checkpoint."""
    return preset.select if preset.select in run.tasks else run.tasks[0]


def run_config(
    base: dict[str, Any], preset: Preset, run: Run, epochs: int, overrides: list[str]
) -> dict[str, Any]:
    """The run's config: ``base`` with the run's tasks, model, seed, schedule and early stopping,
    then ``overrides`` (which may change the patience)."""
    config = json.loads(json.dumps(base))  # deep copy
    data, training = config["data"], config["training"]
    data["tasks"] = [t for t in data["tasks"] if t["name"] in run.tasks]
    for task in data["tasks"]:
        if task.get("sample_space") is not None and task["sample_space"] not in run.tasks:
            # A single-task run would count the task on other rows: the comparison would be unfair.
            sys.exit(
                f"error: task {task['name']!r} counts only rows where {task['sample_space']!r} is 1; a "
                "single-task run cannot; write the data with that task on all rows (Hillstrom: "
                "`towerrec data hillstrom --conversion_space all`)"
            )
    model = dict(MODELS[run.model])
    if "memonet" in model.get("methods", []):
        data["tables"] = data["tables"] + [CODEBOOK]
        data["cross"] = {"table": CODEBOOK["name"], "fields": preset.cross_fields}
    if model["type"] == "dtn":
        model["dependencies"] = preset.dependencies
    stopping = {"metric": f"{selection_task(preset, run)}.auc", "patience": preset.patience}
    training.update({"epochs": epochs, "seed": run.seed, "log_interval": 100, "early_stopping": stopping})
    config.update(run_dir=str(run.run_dir), model=model)
    for override in overrides:
        apply_override(config, override)
    # An evaluation at every epoch's end; the best one's checkpoint is saved as `best` (it reads
    # test) and the last one at the end: no other checkpoint is needed.
    config["training"]["eval_interval"] = 0
    config["checkpoint"] = {"enabled": True, "interval": 0, "keep_last": 1, "resume": "never"}
    return config


def towerrec(*args: str) -> None:
    cmd = [sys.executable, "-m", "towerrec.launch.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")


def chosen_eval(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None, int]:
    """The validation record of early stopping's best checkpoint (``checkpoints/best``), the
    ``stop`` record (None: the run used all its epochs) and the number of epochs trained."""
    best = best_checkpoint(run_dir)
    if best is None:
        raise RuntimeError(f"{run_dir} has no checkpoints/best (was early stopping off?)")
    step = read_meta(best).step
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    chosen = [r for r in records if r["phase"] == "eval" and r["step"] == step]
    if not chosen:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no evaluation at the best step {step}")
    stop = next((r for r in records if r["phase"] == "stop"), None)
    return chosen[-1], stop, max(r["epoch"] for r in records) + 1


def train_rate(metrics: Path) -> float | None:
    """Median train samples/s of a run's logging windows, less each epoch's first (start-up,
    evaluation); None when no window is left (``training.log_interval`` longer than an epoch).
    Per-epoch time is the rows of an epoch over it."""
    try:
        return round(statistics.median(window_rates(metrics)))
    except RuntimeError:
        return None


def execute(
    run: Run, config: dict[str, Any], data_dir: Path, nproc: int, read_test: bool = True
) -> dict[str, Any]:
    """Train with early stopping on validation, evaluate its best checkpoint on test once (unless
    tuning); returns the run's record. A finished run is reused only if it was trained with this
    very config."""
    result_path = run.run_dir / "test_metrics.json"
    if read_test and result_path.is_file():
        finished = json.loads(result_path.read_text())
        if finished.get("config") == config:
            return finished
    if run.run_dir.exists():
        subprocess.run(["rm", "-rf", str(run.run_dir)], check=True)
    run.run_dir.mkdir(parents=True)
    config_path = run.run_dir.parent / f"{run.run_dir.name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    towerrec("train", "--config", str(config_path), "--nproc_per_node", str(nproc))
    train_seconds = time.perf_counter() - start
    chosen, stop, epochs_run = chosen_eval(run.run_dir)
    test = {"metrics": {t: {"auc": float("nan")} for t in run.tasks}}
    if read_test:
        test_path = run.run_dir / "test_eval.json"
        # No --step: evaluate reads checkpoints/best.
        towerrec(
            "evaluate", "--run", str(run.run_dir), "--data", str(data_dir / "test"), "--out", str(test_path)
        )
        test = json.loads(test_path.read_text())
        if test["step"] != chosen["step"]:
            raise RuntimeError(f"{run.run_dir}: test read step {test['step']}, best is {chosen['step']}")
    record = {
        "model": run.model,
        "seed": run.seed,
        "tasks": run.tasks,
        "chosen_step": chosen["step"],
        "chosen_epoch": chosen["epoch"],
        "epochs_run": epochs_run,
        "stopped_early": stop is not None,
        "valid": {t: chosen[t]["auc"] for t in run.tasks},
        "test": {t: test["metrics"][t]["auc"] for t in run.tasks},
        "train_seconds": round(train_seconds, 1),
        "samples_per_s": train_rate(run.run_dir / "metrics.jsonl"),
        "config": config,
    }
    if read_test:  # a tuning run is not finished: the final sweep trains it again
        result_path.write_text(json.dumps(record, indent=2))
    return record


def importance_report(record: dict[str, Any], run_dir: Path, data_dir: Path, name: str) -> str:
    """Permutation importance of a finished run's chosen checkpoint on the validation split,
    written to docs/importance/NAME/ and returned as markdown for the report."""
    out = RESULTS_MD.parent / "importance" / name
    towerrec("importance", "--run", str(run_dir), "--step", str(record["chosen_step"]),
             "--data", str(data_dir / "valid"), "--out", str(out))  # fmt: skip
    command = (
        f"towerrec importance --run {run_dir} --step {record['chosen_step']} --data {data_dir / 'valid'} "
        f"--out {out.relative_to(RESULTS_MD.parents[1])}"
    )
    lines = (out / "importance.md").read_text().strip().splitlines()
    # Nested under the report's "###" heading: drop the file's title, demote its sections.
    body = "\n".join("####" + line[2:] if line.startswith("## ") else line for line in lines[1:]).strip()
    chart = (out / "importance.png").relative_to(RESULTS_MD.parent)
    return f"Command: `{command}`\n\n{body}\n\n![{name}]({chart})"


def plan_runs(models: list[str], tasks: list[str], seeds: list[int], root: Path) -> list[Run]:
    runs = []
    for model in models:
        for task_group in [[t] for t in tasks] if model == "single_task" else [tasks]:
            suffix = f"-{task_group[0]}" if model == "single_task" else ""
            runs += [Run(model, task_group, s, root / f"{model}{suffix}-seed{s}") for s in seeds]
    return runs


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def summarize(
    records: list[dict[str, Any]], tasks: list[str], models: list[str]
) -> dict[str, dict[str, list]]:
    """model -> task -> test AUCs over seeds (single-task runs merged into one row)."""
    table: dict[str, dict[str, list]] = {m: {t: [] for t in tasks} for m in models}
    for r in records:
        for task, auc in r["test"].items():
            table[r["model"]][task].append(auc)
    return table


def report(
    table: dict[str, dict[str, list]], records: list[dict[str, Any]], preset: Preset, tasks: list[str]
) -> str:
    rows = [
        [m, *(mean_std(v[t]) if v[t] else "-" for t in tasks), len(next(iter(v.values()))), "measured"]
        for m, v in table.items()
    ]
    rows += [[m, *(f"{p[t]:.4f}" for t in tasks), "", src] for m, p, src in preset.paper]
    header = ["model", *(f"{t} test AUC" for t in tasks), "seeds", "source"]
    lines = [markdown_table(header, rows), "", "Targets (measured means):", ""]
    mean = {m: {t: statistics.mean(v[t]) for t in tasks if v[t]} for m, v in table.items()}
    paper_ple = next((p for m, p, _ in preset.paper if m == "ple"), None)
    # (model, task, what it is compared with, that value), compared at full precision.
    checks: list[tuple[str, str, str, float]] = []
    for model in ("ple", "dtn"):
        if model not in mean:
            continue
        if paper_ple:
            checks += [(model, t, "the PLE paper's PLE", paper_ple[t]) for t in tasks]
        if "single_task" in mean:
            checks += [(model, t, "single-task (no seesaw)", mean["single_task"][t]) for t in tasks]
    if "dtn" in mean and "ple" in mean:
        checks += [("dtn", t, "ple", mean["ple"][t]) for t in tasks]
    for model, task, other, value in checks:
        ours = mean[model][task]
        verdict = "met" if ours >= value else "**missed**"
        lines.append(f"- {verdict}: {model} {task} {ours:.5f} ≥ {other} {value:.5f} ({ours - value:+.5f})")
    per_run = [
        [r["model"] + ("[" + r["tasks"][0] + "]" if r["model"] == "single_task" else ""), r["seed"],
         r["chosen_epoch"], f"{r['epochs_run']}{'*' if r['stopped_early'] else ''}",
         *(f"{r['valid'].get(t, float('nan')):.4f}" for t in tasks),
         *(f"{r['test'].get(t, float('nan')):.4f}" for t in tasks), r["train_seconds"]]
        for r in records
    ]  # fmt: skip
    per_run_header = [
        "run",
        "seed",
        "chosen epoch",
        "epochs run",
        *(f"{t} valid" for t in tasks),
        *(f"{t} test" for t in tasks),
    ]
    lines += [
        "",
        "Per run (chosen epoch: early stopping's best on validation; epochs run, `*` if stopped "
        "early; `-`/nan: task not in the run):",
        "",
    ]
    lines += [markdown_table(per_run_header + ["train s"], per_run)]
    return "\n".join(lines)


def hyperparameters(base: dict[str, Any], preset: Preset, epochs: int, nproc: int) -> str:
    training, dumps = base["training"], json.dumps
    models = "\n".join(f"- `{m}`: `{dumps(v)}`" for m, v in MODELS.items())
    return (
        f"Hyperparameters: batch {training['batch_size']} per rank x {nproc} ranks, at most {epochs} "
        f"epochs with early stopping (validation AUC of {preset.select} or a single-task run's task, "
        f"patience {preset.patience} epochs), "
        f"dense `{dumps(training['dense_optimizer'])}`, sparse `{dumps(training['sparse_optimizer'])}`, "
        f"embedding dim {base['data']['tables'][0]['embedding_dim']}; DTN codebook `{dumps(CODEBOOK)}` "
        f"over the pairs of `{preset.cross_fields}`, TSN `{preset.dependencies}`.\n\n{models}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--data", type=Path, required=True, help="directory written by `towerrec data`")
    parser.add_argument("--runs", type=Path, default=Path("runs/quality"), help="run directories go here")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="most epochs (early stopping ends most runs sooner); default: the preset",
    )
    parser.add_argument("--nproc", type=int, default=2, help="trainer ranks per run")
    parser.add_argument("--quick", action="store_true", help="one seed, one epoch: a check, not a result")
    parser.add_argument("--fresh", action="store_true", help="retrain finished runs")
    parser.add_argument(
        "--importance",
        nargs="*",
        choices=list(MODELS),
        default=["ple", "dtn"],
        help="models whose first-seed run gets a permutation-importance report (on validation)",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="validation only: never read the test split, print the validation AUCs, write no report",
    )
    add_override_argument(
        parser, "override every run's config (e.g. training.dense_optimizer.lr=0.002); in the report"
    )
    args = parser.parse_args()
    preset = PRESETS[args.dataset]
    seeds, epochs = ([args.seeds[0]], 1) if args.quick else (args.seeds, args.epochs or preset.epochs)
    base = base_config(args.data)
    tasks = [t["name"] for t in base["data"]["tasks"]]
    root = args.runs / (args.dataset + ("-quick" if args.quick else ""))
    if args.fresh:
        subprocess.run(["rm", "-rf", str(root)], check=True)
    records, start = [], time.perf_counter()
    runs = plan_runs(args.models, tasks, seeds, root)
    configs = [run_config(base, preset, run, epochs, args.overrides) for run in runs]
    for config in configs:  # all checked before the first run starts
        try:
            ExperimentConfig.model_validate(config)
        except ValidationError as e:
            sys.exit(f"error: the config of {config['run_dir']}: {e}")
    for run, config in zip(runs, configs, strict=True):
        record = execute(run, config, args.data, args.nproc, read_test=not args.tune)
        records.append(record)
        shown = "" if args.tune else f" test {record['test']}"
        if record.get("samples_per_s") is not None:
            shown += f"; train {record['samples_per_s']:,} samples/s"
        print(
            f"{run.label} seed {run.seed}: epoch {record['chosen_epoch']} of {record['epochs_run']} "
            f"valid {record['valid']}{shown}",
            flush=True,
        )
    elapsed = time.perf_counter() - start
    if args.tune:
        return
    (root / "summary.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "config"} for r in records], indent=2)
    )
    table = summarize(records, tasks, args.models)
    body = (
        f"{report(table, records, preset, tasks)}\n\n"
        f"{hyperparameters(base, preset, epochs, args.nproc)}\n"
        + "".join(f"Override for every run: `--set {o}`\n" for o in args.overrides)
        + "\n"
        f"Training time of these runs (`towerrec train`, launch to exit): "
        f"{sum(r['train_seconds'] for r in records) / 60:.1f} min; wall time of this invocation: "
        f"{elapsed / 60:.1f} min (finished runs with the same config are reused, not retrained)."
    )
    name = f"quality-{args.dataset}" + ("-quick" if args.quick else "")
    for model in args.importance if not args.quick else []:
        first = next((r for r in records if r["model"] == model), None)
        if first is not None:
            run_dir = plan_runs([model], tasks, [first["seed"]], root)[0].run_dir
            section = importance_report(first, run_dir, args.data, f"{args.dataset}-{model}")
            body += f"\n\n### Feature importance: {model}, seed {first['seed']}\n\n{section}"
    title = f"{args.dataset.capitalize()}: test AUC" + (
        " (quick check, 1 seed, 1 epoch)" if args.quick else ""
    )
    write_section(name, title, body, path=RESULTS_MD)


if __name__ == "__main__":
    main()
