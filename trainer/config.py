"""The experiment config: one YAML file, parsed into typed sections and validated at start.

Example::

    cfg = load_config("configs/demo.yaml", overrides=["training.batch_size=4096"])
    cfg.training.batch_size  # 4096

Each package owns its section (``data.config``, ``modules.config``); this module composes them,
adds the training and sharding sections, and applies dotted command-line overrides.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator
from towerrec.data.config import DataConfig, StrictModel, resolve_paths
from towerrec.modules.config import ModelConfig, reads_cross

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
StepWindow = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]  # [start, end]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what is allowed."""


class SparseOptimizerConfig(StrictModel):
    """Fused optimizer applied to embedding tables inside the backward pass."""

    type: Literal["rowwise_adagrad", "adagrad", "sgd"] = "rowwise_adagrad"
    lr: PositiveFloat = 0.05
    eps: PositiveFloat = 1e-8


class DenseOptimizerConfig(StrictModel):
    type: Literal["adam", "adamw", "adagrad", "sgd"] = "adam"
    lr: PositiveFloat = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0


EARLY_STOPPING_METRICS = {"auc": "max", "logloss": "min", "ne": "min"}  # metric -> better direction


class EarlyStoppingConfig(StrictModel):
    """Stop when ``metric`` (``<task>.auc``, ``<task>.logloss`` or ``<task>.ne`` on ``data.eval``)
    has not improved by more than ``min_delta`` for ``patience`` evaluations in a row
    (``trainer.early_stopping``). ``mode``: ``max`` or ``min``; default and only allowed value: the
    metric's direction (auc max, logloss and ne min)."""

    metric: str
    mode: Literal["max", "min"] | None = None
    patience: PositiveInt = 3
    min_delta: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _known_metric(self) -> "EarlyStoppingConfig":
        task, _, name = self.metric.rpartition(".")
        if not task or name not in EARLY_STOPPING_METRICS:
            raise ValueError(
                f"metric: {self.metric!r} is not <task>.<metric>, metric one of "
                f"{sorted(EARLY_STOPPING_METRICS)}"
            )
        better = EARLY_STOPPING_METRICS[name]
        if self.mode is not None and self.mode != better:
            raise ValueError(f"mode: {self.mode}, but {name} is better when {better}imised (mode {better})")
        return self

    @property
    def resolved_mode(self) -> str:
        return self.mode or EARLY_STOPPING_METRICS[self.metric.rpartition(".")[2]]


class LRScheduleConfig(StrictModel):
    """The learning-rate schedule of the dense and the table optimizers (``trainer.schedules``).

    Every optimizer's lr is its configured ``lr`` times one multiplier: a linear warmup over the
    first ``warmup_steps`` training steps (``(step + 1) / warmup_steps``), times the ``decay``
    counted ``by`` training steps after the warmup or by epochs:

    * ``constant``: 1.
    * ``step``: ``gamma ** (t // step_size)``.
    * ``exponential``: ``gamma ** t``.
    * ``cosine``: from 1 down to ``min_lr_ratio`` over ``decay_length`` units (default: the run
      planned by ``training.epochs``, less the warmup; ``max_steps`` only stops it), then flat.

    Example::

        training.lr_schedule: {warmup_steps: 100, decay: cosine, min_lr_ratio: 0.1}
    """

    warmup_steps: Annotated[int, Field(ge=0)] = 0
    decay: Literal["constant", "step", "exponential", "cosine"] = "constant"
    by: Literal["step", "epoch"] = "step"
    step_size: PositiveInt | None = None
    gamma: Annotated[float, Field(gt=0, le=1)] | None = None
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    decay_length: PositiveInt | None = None

    @model_validator(mode="after")
    def _keys_of_the_decay(self) -> "LRScheduleConfig":
        reads = _DECAY_KEYS[self.decay]
        for key in ("step_size", "gamma"):
            if key in reads and getattr(self, key) is None:
                raise ValueError(f"{key} is required by decay: {self.decay}")
        for key in _DECAY_KEYS["step"] + _DECAY_KEYS["cosine"]:
            unread = key not in reads and getattr(self, key) != type(self).model_fields[key].default
            if unread:
                raise ValueError(f"{key} is not read by decay: {self.decay}")
        return self


# The keys each decay reads; another one set (not to its default) is an error: it would do nothing.
_DECAY_KEYS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "step": ("step_size", "gamma"),
    "exponential": ("gamma",),
    "cosine": ("min_lr_ratio", "decay_length"),
}


class GradClipConfig(StrictModel):
    """Gradient clipping by global L2 norm before the optimizer step (``trainer.optimizers``).

    ``max_norm``: clips the dense network's gradients (one norm over them all) and, separately,
    the data-parallel tables' gradients; null: no clipping. Sharded tables are not clipped:
    fbgemm fuses their update into the backward pass, so their gradients never exist whole.
    """

    max_norm: PositiveFloat | None = None


class TrainingConfig(StrictModel):
    """``batch_size`` is per rank. Training stops after ``epochs`` or ``max_steps``, first reached,
    or earlier by ``early_stopping`` (:class:`EarlyStoppingConfig`; null: off), which is checked at
    every evaluation and makes each new best step's checkpoint ``checkpoints/best``.

    ``eval_interval``: evaluate every that many training steps; 0 evaluates at each epoch's end
    only. The last partial batch of every rank is padded with zero-weight rows (see
    ``data.parquet``), so every row is used exactly once and every rank takes the same steps.
    ``progress_bar``: rank 0's bar with samples/s and ETA (``trainer.progress``); ``auto`` shows
    it when stderr is a terminal, ``true``/``false`` (or ``on``/``off``) force it.
    ``lr_schedule``: warmup and decay of both optimizers' lrs (:class:`LRScheduleConfig`);
    ``grad_clip``: clipping by norm (:class:`GradClipConfig`; not the sharded tables).
    ``num_workers``: DataLoader worker processes per rank; 0 (the default, the fastest setting in
    ``python -m benchmarks.loader``) reads in the rank, threads decoding the next chunk meanwhile.
    ``nonfinite``: what a non-finite loss or dense gradient does (``trainer.nonfinite``): ``stop``
    every rank with a message naming the step, the tasks and the batch's rows, or ``skip`` the
    step (no update) and go on; more than ``nonfinite_max_skips`` skipped steps in the run stop it.
    ``threads``: torch intra-op threads per rank; ``auto`` fits each rank and its loader workers
    to the cores it may use: ``max(1, cores // local ranks - num_workers)``, logged at start
    (``trainer.distributed.size_threads``); an integer is used as given, with a warning when
    ``local ranks x (threads + num_workers)`` exceeds the cores. It replaces ``OMP_NUM_THREADS``.
    ``profile_steps``: ``[start, end]`` runs the global steps ``start+1 .. end`` under
    ``torch.profiler`` and writes ``RUN_DIR/profile/rank{r}.json`` (``trainer.profiling``); off
    by default.
    ``precision``: ``bf16`` runs the dense network (not the embedding tables) under
    ``torch.autocast(bfloat16)`` in training and evaluation alike: faster matmuls on GPUs and on
    CPUs with AMX (``benchmarks.experts --precision`` measures it); parameters, gradients,
    optimizer states, logits, loss and metrics stay float32 (``modules.multitask.autocast_forward``).
    ``fp32``: no autocast.
    """

    batch_size: PositiveInt = 512
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None
    seed: int = 0
    sparse_optimizer: SparseOptimizerConfig = SparseOptimizerConfig()
    dense_optimizer: DenseOptimizerConfig = DenseOptimizerConfig()
    eval_interval: Annotated[int, Field(ge=0)] = 0
    log_interval: PositiveInt = 50
    num_workers: Annotated[int, Field(ge=0)] = 0
    shuffle_buffer: Annotated[int, Field(ge=0)] = 0
    collective_timeout_s: PositiveInt = 600
    progress_bar: Literal["auto"] | bool = "auto"
    lr_schedule: LRScheduleConfig = LRScheduleConfig()
    grad_clip: GradClipConfig = GradClipConfig()
    early_stopping: EarlyStoppingConfig | None = None
    nonfinite: Literal["stop", "skip"] = "stop"
    nonfinite_max_skips: Annotated[int, Field(ge=0)] = 10
    threads: Literal["auto"] | PositiveInt = "auto"
    profile_steps: StepWindow | None = None
    precision: Literal["fp32", "bf16"] = "fp32"

    @model_validator(mode="after")
    def _profile_window(self) -> "TrainingConfig":
        if self.profile_steps is not None and self.profile_steps[0] >= self.profile_steps[1]:
            start, end = self.profile_steps
            raise ValueError(f"profile_steps: [{start}, {end}]; expected [start, end] with start < end")
        return self


class TableConstraint(StrictModel):
    """Planner constraints for one table (TorchRec ``ParameterConstraints``)."""

    sharding_types: (
        list[
            Literal[
                "data_parallel",
                "table_wise",
                "column_wise",
                "table_column_wise",
                "row_wise",
                "table_row_wise",
            ]
        ]
        | None
    ) = None
    # fused_uvm / fused_uvm_caching: the table in host memory (with an HBM cache); CUDA only
    compute_kernels: list[Literal["dense", "fused", "fused_uvm", "fused_uvm_caching"]] | None = None
    min_partition: PositiveInt | None = None
    # average ids per sample of each feature reading the table (planner estimates; 1 = single-hot)
    pooling_factor: PositiveFloat | None = None


class ShardingConfig(StrictModel):
    """``planner``: which planner rank 0 runs for the job's topology before anything is
    allocated (``trainer.sharding``): ``fast`` (the one of ``towerrec plan``) or ``torchrec``
    (TorchRec's ``EmbeddingShardingPlanner``). ``plan_file``: a ``towerrec plan`` plan.json; the
    run then uses exactly its placement instead of running a planner (checked against the tables
    and the world size)."""

    planner: Literal["fast", "torchrec"] = "fast"
    storage_reserve: Annotated[float, Field(ge=0, lt=1)] = 0.15
    constraints: dict[str, TableConstraint] = {}
    plan_file: str | None = None


class CheckpointConfig(StrictModel):
    """Sharded checkpoints in ``RUN_DIR/checkpoints/`` (``trainer.checkpoint``).

    ``interval``: save every that many global steps, and always at the end (0: only at the end).
    ``keep_last``: complete checkpoints kept. ``resume``: ``auto`` continues from
    ``checkpoints/latest`` when there is one, ``required`` fails without one, ``never`` starts at
    step 0 and fails if the run directory already holds checkpoints (none is overwritten).
    ``enabled: false`` neither saves nor resumes (``resume`` must then not be ``required``).
    ``resume_fallback``: when ``latest`` is damaged (a file missing, truncated or not matching its
    checksum), resume from the newest older complete checkpoint instead, with a warning; false:
    stop with the error. ``checksums``: record each file's CRC32 in meta.json when saving (one
    read of the files just written) and check them before loading; sizes are always checked.
    ``on_save_error``: a failed save during training (no space, no permission, a size limit)
    stops the run (``stop``), or (``continue``) logs a warning and trains on, ``latest`` still the
    previous complete checkpoint; the final and the preemption save always stop the run.
    ``preemption_grace_s``: SIGTERM makes every rank stop at the next step and save
    (``trainer.preemption``); the time allowed from the signal to the complete checkpoint, below
    the scheduler's own grace (torchrun, Kubernetes and Slurm: 30 s by default). A save that
    takes longer is still completed and reported.
    ``chunk_mb``: tables (and their optimizer state) are saved in row chunks of at most this size,
    the memory a save or a load needs beyond the tables (``trainer.checkpoint.chunks``).
    """

    enabled: bool = True
    interval: Annotated[int, Field(ge=0)] = 1000
    keep_last: PositiveInt = 2
    resume: Literal["auto", "never", "required"] = "auto"
    resume_fallback: bool = True
    checksums: bool = True
    on_save_error: Literal["stop", "continue"] = "stop"
    preemption_grace_s: PositiveFloat = 25.0
    chunk_mb: PositiveFloat = 8.0

    @model_validator(mode="after")
    def _resume_needs_checkpoints(self) -> "CheckpointConfig":
        if not self.enabled and self.resume == "required":
            raise ValueError("resume: required needs checkpoints; enabled is false")
        return self


class ImportanceConfig(StrictModel):
    """Permutation feature importance (``trainer.importance``).

    ``enabled``: after the final evaluation, evaluate once more per sparse field with that field
    permuted and write ``RUN_DIR/importance/`` (every rank takes part; the eval set's batches).
    ``batch_size``: rows per batch of ``towerrec importance`` on a saved run (default: the
    training batch size).
    """

    enabled: bool = False
    batch_size: PositiveInt | None = None


def replica_update_fails(data_type: str, sparse_optimizer: str) -> bool:
    """Whether a data-parallel replica of a ``data_type`` table cannot learn with the sparse
    optimizer: replicas are updated by torch's (RowWise)Adagrad in the table's precision, whose
    eps (1e-8) is 0 in fp16, so every row without a gradient becomes 0/0 = NaN. Sharded placements
    (fbgemm's fused kernels) train fp16 tables with every sparse optimizer.

    Example::

        replica_update_fails("fp16", "rowwise_adagrad")   # True: plan it sharded
    """
    return data_type == "fp16" and sparse_optimizer in ("adagrad", "rowwise_adagrad")


class LossConfig(StrictModel):
    """How the tasks' losses are weighted (``modules.loss.MultiTaskLoss``).

    ``weighting``: ``fixed`` (each task's ``loss_weight`` with its per-epoch
    ``loss_weight_decay``, the PLE paper's), ``uncertainty`` (Kendall et al. 2018: a learned
    ``s_k = log σ_k²`` per task, loss ``Σ exp(-s_k) L_k + s_k``) or ``gradnorm`` (Chen et al.
    2018: learned weights, summing to the number of tasks, that balance the tasks' gradient norms
    at the network's last shared layer; not for ``single_task``, which shares none).
    ``gradnorm_alpha``: GradNorm's asymmetry α. The learned weights are trained by the dense
    optimizer, saved in checkpoints and written to metrics.jsonl (``task_weights``).

    Example::

        loss: {weighting: gradnorm, gradnorm_alpha: 1.5}
    """

    weighting: Literal["fixed", "uncertainty", "gradnorm"] = "fixed"
    gradnorm_alpha: Annotated[float, Field(ge=0)] = 1.5


class ExperimentConfig(StrictModel):
    run_dir: str
    data: DataConfig
    model: ModelConfig
    training: TrainingConfig = TrainingConfig()
    sharding: ShardingConfig = ShardingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    importance: ImportanceConfig = ImportanceConfig()
    loss: LossConfig = LossConfig()

    @model_validator(mode="after")
    def _loss_weighting(self) -> "ExperimentConfig":
        weighting = self.loss.weighting
        if weighting == "gradnorm" and self.model.type == "single_task":
            raise ValueError(
                "loss.weighting: gradnorm balances gradients at a layer shared by every task; "
                "model.type single_task has none (use fixed or uncertainty)"
            )
        if weighting != "fixed":
            for i, task in enumerate(self.data.tasks):
                for key in ("loss_weight", "loss_weight_decay"):
                    if getattr(task, key) != 1.0:
                        raise ValueError(
                            f"data.tasks.{i}.{key}: read by loss.weighting fixed only; "
                            f"loss.weighting is {weighting} (its weights are learned)"
                        )
        return self

    @model_validator(mode="after")
    def _constraints_name_tables(self) -> "ExperimentConfig":
        tables = {t.name for t in self.data.tables}
        for name in self.sharding.constraints:
            if name not in tables:
                raise ValueError(f"sharding.constraints.{name}: unknown table; tables: {sorted(tables)}")
        optimizer = self.training.sparse_optimizer.type
        for table in self.data.tables:
            wanted = self.sharding.constraints.get(table.name)
            only_replicas = wanted is not None and set(wanted.sharding_types or ()) == {"data_parallel"}
            if only_replicas and replica_update_fails(table.data_type, optimizer):
                raise ValueError(
                    f"sharding.constraints.{table.name}.sharding_types: table {table.name!r} is fp16 and "
                    f"the sparse optimizer {optimizer} cannot update an fp16 data_parallel replica (its "
                    "eps rounds to 0 in fp16: NaN); allow a sharded type (table_wise, column_wise), or "
                    f"set data.tables[{table.name}].data_type: fp32, or training.sparse_optimizer.type: sgd"
                )
        per_task = getattr(self.model, "experts_per_task", None)
        if isinstance(per_task, list) and len(per_task) != len(self.data.tasks):
            raise ValueError(
                f"model.experts_per_task: {len(per_task)} counts given for {len(self.data.tasks)} tasks"
            )
        uses_codebook = reads_cross(self.model)
        if uses_codebook and self.data.cross is None:
            raise ValueError(
                "model.methods: memonet needs data.cross (the fields to cross and the codebook table)"
            )
        if self.data.cross is not None and not uses_codebook:
            raise ValueError(
                f"data.cross: the cross codebook is read only by model.type dtn with the memonet method; "
                f"model.type is {self.model.type!r}"
                + (" without memonet" if self.model.type == "dtn" else "")
            )
        names = [t.name for t in self.data.tasks]
        stopping = self.training.early_stopping
        if stopping is not None and stopping.metric.rpartition(".")[0] not in names:
            task = stopping.metric.rpartition(".")[0]
            raise ValueError(f"training.early_stopping.metric: unknown task {task!r}; tasks: {names}")
        for child, parent in (getattr(self.model, "dependencies", None) or {}).items():
            for name in (child, parent):
                if name not in names:
                    raise ValueError(f"model.dependencies.{child}: unknown task {name!r}; tasks: {names}")
        return self


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 needs a dot there)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\d+\.\d*$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config PATH`` and repeatable ``--set KEY=VALUE`` (into ``args.overrides``): the same two
    arguments on every command that reads an experiment config."""
    parser.add_argument("--config", required=True, metavar="PATH", help="experiment YAML file")
    add_override_argument(parser, "dotted config override, e.g. training.batch_size=4096 (repeatable)")


def add_override_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """Repeatable ``--set KEY=VALUE`` into ``args.overrides`` (see :func:`apply_override`)."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` to a raw config dict; the value is parsed as YAML."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. training.seed=1")
    node: Any = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[:depth])} is not a mapping")
        node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = parse_yaml(value)
    elif isinstance(node, dict):
        node[last] = parse_yaml(value)
    else:
        raise ConfigError(f"override {key}: {'.'.join(parts[:-1])} is not a mapping")


def _format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "union_tag_invalid":
            tag, allowed = item["input"].get("type"), item["ctx"].get("expected_tags")
            message = f"unknown type {tag!r}; allowed: {allowed}"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def load_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), base_dir: str | Path | None = None
) -> ExperimentConfig:
    """Read, override and validate a config.

    Relative data paths and ``run_dir`` are resolved against ``base_dir`` (default: the current
    directory), so a config runs the same from any launcher that keeps the working directory.

    Raises:
        ConfigError: naming the file, the key and what is allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = parse_yaml(path.read_text())
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    for override in overrides:
        apply_override(raw, override)
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(str(path), e)) from None
    if base_dir is not None:
        config = _rebase_paths(config, Path(base_dir))
    return config


def validate_data(config: ExperimentConfig) -> None:
    """Check before any process starts that the data matches the config, from Parquet footers only:
    every path matches files, and every feature and label column exists with a usable type.

    Raises:
        ConfigError: naming the key (``data.train``/``data.eval``), the file and the column.
    """
    from towerrec.data.parquet import DataError, inspect_files  # torch and pyarrow: only when checking data

    for key in ("train", "eval"):
        try:
            inspect_files(resolve_paths(getattr(config.data, key), f"data.{key}"), config.data)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        except DataError as e:
            raise ConfigError(f"data.{key}: {e}") from None


def _rebase_paths(config: ExperimentConfig, base: Path) -> ExperimentConfig:
    def rebase(p: str) -> str:
        return p if Path(p).is_absolute() else str(base / p)

    sparse = [
        f.model_copy(update={"vocab_file": rebase(f.vocab_file)}) if f.vocab_file else f
        for f in config.data.sparse_features
    ]
    paths = {"train": [rebase(p) for p in config.data.train], "eval": [rebase(p) for p in config.data.eval]}
    data = config.data.model_copy(update={**paths, "sparse_features": sparse})
    return config.model_copy(update={"data": data, "run_dir": rebase(config.run_dir)})


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML (written to the run directory)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
