"""Export a trained run to one self-contained TorchScript inference artifact, checked on eval data.

Example::

    report = export_model("runs/demo", "model.pt", quantize="int8")   # best, else latest
    artifact = torch.jit.load("model.pt")        # after `import fbgemm_gpu`; no towerrec needed
    artifact(values, lengths, dense)             # {"click": [B], "conversion": [B]} probabilities

Format: TorchScript, built the way TorchRec packages inference models: the tables go through
``torchrec.inference.modules.quantize_inference_model`` (fbgemm's inference TBE, int8 rows with
a per-row scale and bias by default), the model is traced with ``torchrec.fx.symbolic_trace``
and compiled with ``torch.jit.script`` (as ``torchrec.inference.dlrm_predict`` does). A
TorchScript file loads in Python with ``torch.jit.load`` and in C++ with ``torch::jit::load``
(libtorch plus the fbgemm_gpu operator library): what TorchRec's C++ inference server, TorchServe
and Triton's libtorch backend load. torch.export is not an option for this model today:
``torch.export.export`` of the quantized tables fails in torch 2.13 / fbgemm-gpu 1.8 because
fbgemm's inference kernel holds a ``fbgemm.AtomicCounter`` script object without a fake class,
and an ExportedProgram runs outside Python only after AOTInductor compilation. torch 2.13 marks
torch.jit deprecated (a DeprecationWarning, silenced here); revisit when TorchRec's quantized
modules export.

Forward: ``forward(values, lengths, dense) -> Dict[str, Tensor]``

* ``lengths`` int32 (or int64) ``[F * B]``: feature-major, the F sparse features in
  ``schema["data"]["sparse_features"]`` order, B rows each (1 per row for single-hot features),
  then, with ``schema["data"]["cross"]`` (DTN's codebook), one id per row for each cross feature
  (``CrossConfig.feature_names`` order: ``data.hashing.hash_pairs`` of the raw ids).
* ``values`` int64 ``[sum(lengths)]``: table rows, i.e. values after the feature's ``id_mode``
  (``data.transforms``): ``check`` ids as they are (in ``[0, num_embeddings)``), ``hash``
  integers through ``data.hashing.hash_ids`` and strings through ``hash_strings`` (mod
  num_embeddings), ``vocab`` through the fitted vocabulary (0 out of vocabulary), ``bucketize``
  through the boundaries; nulls as ``on_null`` says. Out-of-range rows read row 0.
* ``dense`` float32 ``[B, D]`` in ``schema["data"]["dense_features"]`` order, after each dense
  feature's ``transforms`` (``log1p``, ``clip``, ``standardize``) and ``on_null``.
* returns per-task probabilities ``[B]`` (sigmoid of the towers' logits), keyed by task name.

Raw rows to these inputs: ``towerrec predict`` (``trainer.predict``) runs Parquet files through
the training loader; a serving client holding a pyarrow Table or a dict of Python lists calls
``trainer.serving.transform_rows(schema, rows)``, the loader's transforms on those rows.

The schema travels inside the file as the TorchScript extra file ``towerrec_schema.json``: the
data section of the training config without paths (tables with sizes, sparse features with
``multi_hot`` and ``id_mode``, dense features, tasks), the quantization, the checkpoint it came
from, the check tolerance and the towerrec / torch / torchrec / fbgemm_gpu versions. With
features that use fitted statistics (``vocab``, ``bucketize: quantiles``, ``standardize``),
``schema["features"]`` holds the run's ``features.json`` (``data.features``: vocabularies,
boundaries, means and stds, by feature name; else null), so the artifact needs nothing else to
turn raw values into its inputs.

Memory: table by table, never the float model. The dense network is read from the checkpoint;
the quantized tables (the artifact) are allocated empty, then filled block by block from the
checkpoint's row chunks (``trainer.checkpoint.chunks.SavedRows``), each block quantized row-wise
as ``quantize_inference_model`` does (``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``, bit for
bit the same artifact) and dropped; scripting and saving share the tables' memory. Peak: the
artifact plus one block being read (about two chunks per column shard the table was saved in) and
the self-check's sample (docs/MEMORY.md).

Self-check: the artifact is written to a temporary file, loaded back from it (the in-memory model
dropped first) and compared with the trained float model on up to ``check_rows`` evaluation rows:
per task the largest absolute probability difference (all rows) and the AUC change, both AUCs by
the trainer's ``TaskMetrics`` (the same AUC and sample-space weights as training's evaluation).
The float reference holds only the table rows those check rows read (``CheckSample``: gathered
while the tables stream by, ids remapped onto them), so it computes exactly what the whole float
model would, at the cost of a few thousand rows. Above the tolerance the export fails and the
target file is left as it was.
"""

# No `from __future__ import annotations`: fx copies InferenceModel.forward's annotations into the
# generated code, which TorchScript must resolve as real types, not strings.
import copy
import gc
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import fbgemm_gpu
import torch
import torch.nn as nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import DataType, dtype_to_data_type
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from towerrec.data.batch import Batch
from towerrec.data.config import resolve_paths
from towerrec.data.features import FittedFeatures
from towerrec.data.files import atomic_output
from towerrec.data.parquet import ParquetDataset
from towerrec.trainer.checkpoint import CheckpointMeta, choose_checkpoint, load_model_state, read_meta
from towerrec.trainer.checkpoint.chunks import SavedRows, row_ranges
from towerrec.trainer.config import ExperimentConfig
from towerrec.trainer.evaluate import single_process_env
from towerrec.trainer.features import load_run_features
from towerrec.trainer.metrics import TaskMetrics
from towerrec.trainer.model import TrainModule, build_train_module
from towerrec.trainer.predict import SCHEMA_FILE, Artifact, load_artifact

QUANTIZATIONS = {"int8": torch.int8, "fp16": torch.float16, "none": torch.float32}
# A table's float rows, block by block: table name -> (first row, rows [n, dim]).
TableRows = Callable[[str], Iterable[Tuple[int, torch.Tensor]]]


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted ``max |Δp|`` (any row, any task) and ``|ΔAUC|`` (any task)."""

    max_dp: float
    max_dauc: float

    def accepts(self, task: "TaskCheck") -> bool:
        return task.max_dp <= self.max_dp and abs(task.dauc) <= self.max_dauc  # False for NaN


# Measured on the demo model (configs/demo.yaml, 782 steps, AUC 0.776 / 0.784) over all 200k eval
# rows: int8 max|dp| 0.0030, |dAUC| 6e-6; fp16 1.7e-4, 2e-7; none 0, 0. Set with 3-6x margin.
TOLERANCES = {
    "int8": Tolerance(max_dp=0.01, max_dauc=1e-3),
    "fp16": Tolerance(max_dp=1e-3, max_dauc=1e-4),
    "none": Tolerance(max_dp=1e-5, max_dauc=1e-5),
}


class ExportCheckError(RuntimeError):
    """The artifact disagrees with the trained model beyond the tolerance; carries the report."""

    def __init__(self, report: "CheckReport") -> None:
        super().__init__(f"export check failed:\n{report.format()}")
        self.report = report


@dataclass
class TaskCheck:
    max_dp: float
    auc_trained: float
    auc_artifact: float
    examples: int  # examples in the task's sample space, counted with their row weights (TaskMetrics)

    @property
    def dauc(self) -> float:
        d = self.auc_artifact - self.auc_trained
        return 0.0 if math.isnan(d) else d  # an undefined AUC (a sample of one class)


@dataclass
class CheckReport:
    quantize: str
    rows: int
    tolerance: Tolerance
    tasks: dict[str, TaskCheck] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(self.tolerance.accepts(t) for t in self.tasks.values())

    def format(self) -> str:
        tol = self.tolerance
        lines = [
            f"export check on {self.rows} eval rows, {self.quantize} tables "
            f"(tolerance: max|dp| {tol.max_dp:g}, |dAUC| {tol.max_dauc:g}):"
        ]
        for name, t in self.tasks.items():
            flag = "ok" if tol.accepts(t) else "FAIL"
            lines.append(
                f"  {name:<12} max|dp| {t.max_dp:.3g}  AUC {t.auc_trained:.5f} -> {t.auc_artifact:.5f} "
                f"(dAUC {t.dauc:+.2g}, {t.examples} examples)  {flag}"
            )
        return "\n".join(lines)


class InferenceModel(nn.Module):
    """``forward(values, lengths, dense) -> {task: probability [B]}`` (module docstring).

    The pooled embeddings are taken by feature name, so the column order is the float model's
    even where the quantized collection groups tables differently (it batches by pooling type).
    """

    def __init__(
        self,
        ebc: nn.Module,
        network: nn.Module,
        feature_names: List[str],
        pooled_order: List[str],
        tasks: List[str],
        cross_order: List[str],
    ) -> None:
        super().__init__()
        self.ebc = ebc
        self.network = network
        self.feature_names = feature_names  # the KJT keys, in input order
        self.pooled_order = pooled_order  # the training model's embedding column order
        self.tasks = tasks
        self.cross_order = cross_order  # the codebook features, the network's second input

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        sparse = KeyedJaggedTensor(keys=self.feature_names, values=values, lengths=lengths)
        pooled = self.ebc(sparse).to_dict()
        x = torch.cat([pooled[f] for f in self.pooled_order] + [dense], dim=1)
        if len(self.cross_order) > 0:
            logits = self.network(x, torch.cat([pooled[f] for f in self.cross_order], dim=1))
        else:
            logits = self.network(x)
        return {t: torch.sigmoid(logits[t]) for t in self.tasks}


def quantized_collection(
    tables: List[EmbeddingBagConfig], is_weighted: bool, quantize: str
) -> QuantEmbeddingBagCollection:
    """The quantized tables ``quantize_inference_model`` makes of an EmbeddingBagCollection of
    ``tables``, allocated (zeros) but not filled: fill them with :func:`write_rows`."""
    configs = copy.deepcopy(tables)
    for table in configs:
        table.data_type = dtype_to_data_type(QUANTIZATIONS[quantize])
    return QuantEmbeddingBagCollection(
        configs,
        is_weighted,
        device=torch.device("cpu"),
        output_dtype=torch.float,
        register_tbes=True,  # as quantize_inference_model's preparation sets them
        cache_features_order=True,
    )


class TableSlot(NamedTuple):
    """One table's rows in fbgemm's inference kernel: ``weights`` ``[rows, bytes]`` (uint8
    view), ``scale_bias`` ``[rows, 4]`` (int8 only, else None), ``dtype`` the rows' type."""

    weights: torch.Tensor
    scale_bias: Optional[torch.Tensor]
    dtype: DataType


def table_slots(collection: QuantEmbeddingBagCollection) -> Dict[str, TableSlot]:
    """``{table: TableSlot}`` of every table of ``collection``."""
    types = {t.name: t.data_type for t in collection.embedding_bag_configs()}
    slots = {}
    for tbe in collection.tbes:
        for spec, (weights, scale_bias) in zip(
            tbe.embedding_specs, tbe.split_embedding_weights(), strict=True
        ):
            slots[spec[0]] = TableSlot(weights, scale_bias, types[spec[0]])
    return slots


def write_rows(slot: TableSlot, first: int, rows: torch.Tensor) -> None:
    """Quantize float rows ``rows`` into table rows ``[first, first + len(rows))`` of ``slot``
    as TorchRec's ``quantize_state_dict`` does (row-wise: block by block gives the same bytes)."""
    where = slice(first, first + rows.shape[0])
    if slot.dtype == DataType.INT8:
        packed = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(rows, 8)
        slot.weights[where].copy_(packed[:, :-4])
        slot.scale_bias[where].copy_(packed[:, -4:])  # type: ignore[index]
        return
    dtype = torch.float16 if slot.dtype == DataType.FP16 else torch.float32
    slot.weights[where].copy_(rows.to(dtype).view(torch.uint8))


def _own_rows(module: TrainModule) -> TableRows:
    tables = module.model.ebc.embedding_bags

    def rows(name: str) -> Iterable[Tuple[int, torch.Tensor]]:
        weight = tables[name].weight.detach()
        for a, b in row_ranges(weight.shape[0], weight[0].nbytes):
            yield a, weight[a:b]

    return rows


def build_inference_model(
    module: TrainModule, config: ExperimentConfig, quantize: str, table_rows: Optional[TableRows] = None
) -> nn.Module:
    """The eager inference model: the tables quantized as TorchRec's ``quantize_inference_model``
    does, filled block by block from ``table_rows`` (default: ``module``'s own tables; its
    tables may then be on the meta device), and a copy of the dense network, in eval mode,
    without gradients."""
    ebc: EmbeddingBagCollection = module.model.ebc
    collection = quantized_collection(ebc.embedding_bag_configs(), ebc.is_weighted(), quantize)
    table_rows = table_rows or _own_rows(module)
    for name, slot in table_slots(collection).items():
        for first, rows in table_rows(name):
            write_rows(slot, first, rows)
    return inference_model(collection, module, config)


def inference_model(ebc: nn.Module, module: TrainModule, config: ExperimentConfig) -> InferenceModel:
    """:class:`InferenceModel` of the tables ``ebc`` and a copy of ``module``'s dense network, in
    eval mode, without gradients."""
    model = InferenceModel(
        ebc,
        copy.deepcopy(module.model.network),
        config.data.feature_names,
        module.model.pooled_order,
        [t.name for t in config.data.tasks],
        module.model.cross_order,
    ).eval()
    model.requires_grad_(False)
    return model


def script(model: nn.Module) -> torch.jit.ScriptModule:
    """TorchRec's recipe: ``torchrec.fx.symbolic_trace`` (the inference TBE stays a leaf), then
    ``torch.jit.script``."""
    from torchrec.fx import symbolic_trace

    with warnings.catch_warnings():  # tracing and scripting notices nobody can act on
        warnings.simplefilter("ignore")  # (also torch.jit's deprecation: see the module docstring)
        graph = symbolic_trace(model, leaf_modules=["IntNBitTableBatchedEmbeddingBagsCodegen"])
        return torch.jit.script(graph)


def make_schema(
    config: ExperimentConfig,
    quantize: str,
    source: dict,
    tolerance: Tolerance,
    features: Optional[FittedFeatures] = None,
) -> dict:
    """The artifact's schema (module docstring); ``features``: the run's fitted statistics."""
    data = config.data.model_dump(mode="json", exclude={"train", "eval"})
    return {
        "format": "towerrec-inference",
        "format_version": 1,
        "forward": "forward(values: int64 [sum(lengths)], lengths: int32 [F*B] feature-major, "
        "dense: float32 [B, D]) -> Dict[str, Tensor] task -> probability [B]",
        "data": data,
        "features": features.to_json() if features is not None else None,
        "quantization": quantize,
        "source": source,
        "tolerance": asdict(tolerance),
        "versions": {
            "towerrec": _towerrec_version(),
            "torch": torch.__version__,
            "torchrec": metadata.version("torchrec"),
            "fbgemm_gpu": fbgemm_gpu.__version__,  # the CPU or the CUDA build
        },
    }


def _towerrec_version() -> str | None:
    try:
        return metadata.version("towerrec")
    except metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return None


def export_model(
    run_dir: str | Path,
    out: str | Path,
    step: int | None = None,
    quantize: str = "int8",
    check_data: list[str] | None = None,
    check_rows: int = 20_000,
    tolerance: Tolerance | None = None,
) -> CheckReport | None:
    """Export checkpoint ``step`` of ``run_dir`` to ``out`` (None: the best checkpoint of early
    stopping when the run has one, else the latest; ``choose_checkpoint``), table by table.

    ``check_data``: Parquet patterns with labels for the self-check (default: the run's
    ``data.eval``); ``check_rows=0`` skips the check and returns None.

    Raises:
        CheckpointError: no such checkpoint, or one that does not load; ``FeaturesFileError``:
            RUN_DIR/features.json missing (the config needs it) or fitted for another config.
        ExportCheckError: the artifact is off by more than ``tolerance`` (default
            ``TOLERANCES[quantize]``); ``out`` is then left as it was.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {sorted(QUANTIZATIONS)}, got {quantize!r}")
    tolerance = tolerance or TOLERANCES[quantize]
    config, module, meta = _load_trained(Path(run_dir), step)
    features = load_run_features(run_dir, config.data)  # what the checkpoint was trained through
    source = {"run_dir": str(run_dir), "step": meta.step, "epoch": meta.epoch}  # the path as given
    sample = None
    if check_rows > 0:
        files = resolve_paths(check_data or list(config.data.eval), "check data")
        sample = CheckSample.read(files, config, module, check_rows, features)
    saved = SavedRows(meta.path)

    def table_rows(name: str) -> Iterable[Tuple[int, torch.Tensor]]:
        for first, rows in saved.iter_rows(f"model.model.ebc.embedding_bags.{name}.weight"):
            if sample is not None:
                sample.gather(name, first, rows)
            yield first, rows

    scripted = script(build_inference_model(module, config, quantize, table_rows))
    schema = make_schema(config, quantize, source, tolerance, features)
    with atomic_output(out) as tmp:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.jit.save(scripted, str(tmp), _extra_files={SCHEMA_FILE: json.dumps(schema, indent=1)})
        del scripted  # one copy of the artifact at a time: the check loads it from the file
        gc.collect()
        if sample is None:
            return None
        sample.attach(module)
        report = check_artifact(load_artifact(tmp), module, config, sample, quantize, tolerance)
        if not report.passed:
            raise ExportCheckError(report)
    return report


class CheckSample:
    """The first ``rows`` rows of the check data in batches, and the float rows of the tables
    they read: ``ids[table]`` (sorted, unique) and ``rows[table]`` (``[len(ids), dim]`` fp32,
    filled by :meth:`gather` as the tables stream by). :meth:`attach` gives a module tables of
    just these rows and :meth:`compact` maps a batch's ids onto them, so the module computes
    what the whole float model would."""

    def __init__(self, batches: List[Batch], configs: List[EmbeddingBagConfig], limit: int) -> None:
        self.batches = batches
        self.limit = limit
        self.configs = configs
        self.table_of = {f: t.name for t in configs for f in t.feature_names}
        per_table: Dict[str, List[torch.Tensor]] = {t.name: [] for t in configs}
        for batch in batches:
            for key, values in batch.sparse.to_dict().items():
                per_table[self.table_of[key]].append(values.values())
        self.ids = {
            t: torch.cat(v).unique() if v else torch.zeros(0, dtype=torch.int64) for t, v in per_table.items()
        }
        self.rows = {t.name: torch.zeros(len(self.ids[t.name]), t.embedding_dim) for t in configs}

    @classmethod
    def read(
        cls,
        files: List[str],
        config: ExperimentConfig,
        module: TrainModule,
        rows: int,
        features: Optional[FittedFeatures] = None,
    ) -> "CheckSample":
        """The first ``rows`` rows of ``files`` (batches of at most 2048), read through the run's
        fitted ``features``."""
        dataset = ParquetDataset(files, config.data, batch_size=min(rows, 2048), features=features)
        batches, seen = [], 0
        for batch in dataset:
            batches.append(batch)
            seen += min(batch.real_rows, rows - seen)  # padding rows come last
            if seen >= rows or batch.real_rows < batch.num_rows:
                break
        return cls(batches, module.model.ebc.embedding_bag_configs(), rows)

    def gather(self, table: str, first: int, rows: torch.Tensor) -> None:
        """Keep the sampled ids' rows of the block ``rows`` (table rows from ``first`` on)."""
        ids = self.ids[table]
        inside = (ids >= first) & (ids < first + rows.shape[0])
        self.rows[table][inside] = rows[ids[inside] - first].float()

    def attach(self, module: TrainModule) -> None:
        """Give ``module`` float tables of the gathered rows (one row for a table not read)."""
        tables = [
            EmbeddingBagConfig(
                name=t.name,
                num_embeddings=max(len(self.ids[t.name]), 1),
                embedding_dim=t.embedding_dim,
                feature_names=t.feature_names,
                pooling=t.pooling,
            )
            for t in self.configs
        ]
        ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
        with torch.no_grad():
            for name, rows in self.rows.items():
                ebc.embedding_bags[name].weight[: len(rows)] = rows
        module.model.ebc = ebc

    def compact(self, sparse: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``sparse`` with every id replaced by its position in its table's ``ids``."""
        parts = torch.split(sparse.values(), sparse.length_per_key())
        values = [
            torch.searchsorted(self.ids[self.table_of[k]], v)
            for k, v in zip(sparse.keys(), parts, strict=True)
        ]
        return KeyedJaggedTensor(keys=sparse.keys(), values=torch.cat(values), lengths=sparse.lengths())


def check_artifact(
    artifact: Artifact,
    module: TrainModule,
    config: ExperimentConfig,
    sample: CheckSample,
    quantize: str,
    tolerance: Tolerance,
) -> CheckReport:
    """Compare ``artifact`` with the trained float ``module`` (its tables attached by
    ``sample``) on the sample's rows."""
    rows = sample.limit
    batch_size = min(rows, 2048)
    tasks = [t.name for t in config.data.tasks]
    # The trainer's own metrics (torchrec's AUC, the sample-space weights), in a group of one.
    env = single_process_env()
    metrics = {what: TaskMetrics(tasks, env, batch_size, rows) for what in ("trained", "artifact")}
    max_dp = dict.fromkeys(tasks, 0.0)
    seen = 0
    module.eval()
    with torch.inference_mode():
        for batch in sample.batches:
            n = min(batch.real_rows, rows - seen)  # padding rows come last
            labels = {t: batch.labels[t][:n] for t in tasks}
            weights = {t: w[:n] for t, w in module.loss.example_weights(batch.labels, batch.weights).items()}
            logits = module.model(sample.compact(batch.sparse), batch.dense)
            trained = {t: torch.sigmoid(v[:n]) for t, v in logits.items()}
            served = {t: v[:n] for t, v in artifact(batch).items()}
            metrics["trained"].update_probabilities(trained, labels, weights)
            metrics["artifact"].update_probabilities(served, labels, weights)
            for t in tasks:
                if n:
                    dp = (trained[t].double() - served[t].double()).abs().max().item()
                    max_dp[t] = max(max_dp[t], dp)
            seen += n
    report = CheckReport(quantize, seen, tolerance)
    trained_metrics, artifact_metrics = metrics["trained"].compute(), metrics["artifact"].compute()
    for t in tasks:
        report.tasks[t] = TaskCheck(
            max_dp=max_dp[t],
            auc_trained=trained_metrics[t]["auc"],
            auc_artifact=artifact_metrics[t]["auc"],
            examples=round(trained_metrics[t]["examples"]),
        )
    return report


def _load_trained(run_dir: Path, step: int | None) -> tuple[ExperimentConfig, TrainModule, CheckpointMeta]:
    """The run's config, its module with checkpoint ``step``'s dense network on CPU and its
    tables on the meta device (checked against the checkpoint, not read), its meta.json.

    Raises:
        CheckpointError: no such checkpoint, damaged files, or weights that do not fit the config.
    """
    meta = read_meta(choose_checkpoint(run_dir, step)[0])
    config = ExperimentConfig.model_validate(meta.config)
    module = build_train_module(config, torch.device("meta"))
    load_model_state(run_dir, meta.step, module)  # by step: `latest` may move meanwhile
    module.model.autocast_dtype = None  # the artifact serves float32, whatever training.precision was
    return config, module.eval(), meta
