"""The cluster to plan for: a typed topology spec, its compact command-line form and presets.

Three ways to write one (``towerrec plan --topology SPEC``)::

    2x8xA100-80GB                                   # preset: nodes x devices per node x device
    2x8xA100-80GB,batch_size=8192,inter_node_bw=50  # preset with overrides
    nodes=2,devices_per_node=8,device=cuda,hbm_gb=80,ddr_gb=256,intra_node_bw=600,inter_node_bw=25
    topologies/prod.yaml                            # a YAML/JSON file: one mapping, a list of them,
                                                    # or {topologies: [...]}

Units: memory in GB (2**30 bytes, as TorchRec counts), bandwidths in GB/s. Memory is per device
(per rank): ``hbm_gb`` the device memory, ``ddr_gb`` the host memory that rank may use (on a CPU
topology the tables live there). ``batch_size``, ``storage_reserve`` and ``sparse_optimizer``
default to the experiment config's ``training.batch_size``, ``sharding.storage_reserve`` and
``training.sparse_optimizer.type``.

Example::

    spec = parse_topologies("2x8xA100-80GB")[0]
    spec.world_size          # 16
    topology = spec.to_torchrec()
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator
from towerrec.data.config import StrictModel

GB = 1024**3
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]

# TorchRec's defaults (torchrec.distributed.planner.constants), in GB and GB/s.
TORCHREC_HBM_BW = 897.0
TORCHREC_DDR_BW = 51.0

# Device presets: per-device memory and bandwidths (NVLink per GPU, one NIC per GPU across nodes,
# host memory of a DGX-class node divided by its 8 GPUs).
GPU_PRESETS: dict[str, dict[str, float]] = {
    "V100-32GB": {"hbm_gb": 32, "hbm_bw": 900, "ddr_gb": 64, "intra_node_bw": 300, "inter_node_bw": 12.5},
    "A100-40GB": {"hbm_gb": 40, "hbm_bw": 1555, "ddr_gb": 128, "intra_node_bw": 600, "inter_node_bw": 25},
    "A100-80GB": {"hbm_gb": 80, "hbm_bw": 2039, "ddr_gb": 256, "intra_node_bw": 600, "inter_node_bw": 25},
    "H100-80GB": {"hbm_gb": 80, "hbm_bw": 3350, "ddr_gb": 256, "intra_node_bw": 900, "inter_node_bw": 50},
    "H200-141GB": {"hbm_gb": 141, "hbm_bw": 4800, "ddr_gb": 256, "intra_node_bw": 900, "inter_node_bw": 50},
    "L4-24GB": {"hbm_gb": 24, "hbm_bw": 300, "ddr_gb": 64, "intra_node_bw": 32, "inter_node_bw": 12.5},
}
CPU_PRESET_DDR_GB = 64.0
_PRESET = re.compile(r"^(\d+)x(\d+)x([A-Za-z0-9.-]+)$")
_CPU_PRESET = re.compile(r"^CPU(?:-(\d+(?:\.\d+)?)GB)?$", re.IGNORECASE)
# Short names accepted in the compact form.
_ALIASES = {"devices": "devices_per_node"}


class TopologyError(ValueError):
    """A malformed or impossible topology; the message names the spec and the field."""


class TopologySpec(StrictModel):
    """One cluster. See the module docstring for units and defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str | None = None
    nodes: PositiveInt = 1
    devices_per_node: PositiveInt = 8
    device: Literal["cuda", "cpu"] = "cuda"
    hbm_gb: PositiveFloat | None = None  # cuda: device memory per device (default 80)
    ddr_gb: PositiveFloat = 128.0  # host memory per device (rank)
    hbm_bw: PositiveFloat | None = None  # cuda: device memory bandwidth, GB/s
    ddr_bw: PositiveFloat = TORCHREC_DDR_BW  # host memory bandwidth, GB/s
    intra_node_bw: PositiveFloat = 600.0  # GB/s between devices of a node (NVLink)
    inter_node_bw: PositiveFloat = 12.5  # GB/s per device across nodes (network)
    batch_size: PositiveInt | None = None  # per rank; default: training.batch_size
    storage_reserve: Annotated[float, Field(ge=0, lt=1)] | None = None  # default: sharding.storage_reserve
    sparse_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd"] | None = None  # default: the config's

    @model_validator(mode="after")
    def _possible(self) -> "TopologySpec":
        if self.device == "cpu":
            for field in ("hbm_gb", "hbm_bw"):
                if getattr(self, field) is not None:
                    raise ValueError(
                        f"{field}: a cpu topology has no device memory; its tables live in host "
                        "memory (ddr_gb, ddr_bw)"
                    )
        if self.nodes * self.devices_per_node > 65536:
            raise ValueError(
                f"nodes x devices_per_node: {self.nodes} x {self.devices_per_node} ranks is beyond "
                "what this planner handles (65536)"
            )
        return self

    # ---------------------------------------------------------------------------------- derived

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def device_memory_gb(self) -> float:
        """What holds the tables: HBM on cuda (default 80 GB), host memory on cpu."""
        if self.device == "cpu":
            return self.ddr_gb
        return self.hbm_gb if self.hbm_gb is not None else 80.0

    @property
    def label(self) -> str:
        """Short human name, e.g. ``2x8 cuda 80GB``."""
        if self.name:
            return self.name
        memory = f"{_num(self.device_memory_gb)}GB"
        return f"{self.nodes}x{self.devices_per_node} {self.device} {memory}"

    @property
    def slug(self) -> str:
        """File-name form of :attr:`label`."""
        return re.sub(r"[^A-Za-z0-9.]+", "-", self.label).strip("-")

    def resolved(self, batch_size: int, storage_reserve: float, sparse_optimizer: str) -> "TopologySpec":
        """The spec with the config's defaults filled in (and cuda's default HBM)."""
        update: dict[str, Any] = {
            "batch_size": self.batch_size or batch_size,
            "storage_reserve": self.storage_reserve if self.storage_reserve is not None else storage_reserve,
            "sparse_optimizer": self.sparse_optimizer or sparse_optimizer,
        }
        if self.device == "cuda":
            update["hbm_gb"] = self.device_memory_gb
            update["hbm_bw"] = self.hbm_bw if self.hbm_bw is not None else TORCHREC_HBM_BW
        return self.model_copy(update=update)

    def describe(self) -> str:
        """One sentence for reports."""
        if self.device == "cpu":
            memory = f"{_num(self.ddr_gb)} GB host memory per rank"
        else:
            memory = f"{_num(self.device_memory_gb)} GB HBM + {_num(self.ddr_gb)} GB host memory per device"
        return (
            f"{self.nodes} node(s) x {self.devices_per_node} {self.device} "
            f"{'devices' if self.device == 'cuda' else 'ranks'} ({self.world_size} ranks), {memory}, "
            f"{_num(self.intra_node_bw)} GB/s within a node, {_num(self.inter_node_bw)} GB/s across nodes"
        )

    def to_torchrec(self):  # -> torchrec Topology (imported lazily: torch is heavy)
        """TorchRec's ``Topology`` through its ``TopologyFactory`` (capacities in bytes,
        bandwidths in bytes/ms as TorchRec's constants)."""
        from torchrec.distributed.planner.types import (
            HardwareConfig,
            KernelConfig,
            TopologyFactory,
            TrainerConfig,
        )

        per_ms = GB / 1000
        hbm = int(self.device_memory_gb * GB) if self.device == "cuda" else None
        return TopologyFactory.create_topology(
            trainer_config=TrainerConfig(
                world_size=self.world_size,
                local_world_size=self.devices_per_node,
                hbm_cap_bytes=hbm,
                ddr_cap_bytes=int(self.ddr_gb * GB),
                ssd_cap_bytes=0,
            ),
            hardware_config=HardwareConfig(
                intra_host_bw=self.intra_node_bw * per_ms,
                inter_host_bw=self.inter_node_bw * per_ms,
                hbm_mem_bw=(self.hbm_bw or TORCHREC_HBM_BW) * per_ms,
                ddr_mem_bw=self.ddr_bw * per_ms,
            ),
            kernel_config=KernelConfig(compute_device=self.device, use_hardware_based_bandwidth=True),
        )


def _num(x: float) -> str:
    return f"{x:g}"


# ------------------------------------------------------------------------------------- parsing


def parse_topologies(spec: str) -> list[TopologySpec]:
    """One ``--topology`` value: a file (one or several topologies), a preset, ``key=value``
    pairs, or a preset followed by ``key=value`` overrides.

    Raises:
        TopologyError: naming the spec and the field that is malformed or impossible.
    """
    text = spec.strip()
    if not text:
        raise TopologyError("topology: empty spec; e.g. 2x8xA100-80GB or nodes=2,devices_per_node=8")
    path = Path(text)
    if path.suffix.lower() in {".yaml", ".yml", ".json"} or path.is_file():
        return _from_file(path)
    return [_validate(_compact(text), text)]


def _compact(text: str) -> dict[str, Any]:
    from towerrec.trainer.config import parse_yaml

    raw: dict[str, Any] = {}
    for i, token in enumerate(t.strip() for t in text.split(",")):
        if not token:
            continue
        key, sep, value = token.partition("=")
        if not sep:
            if i != 0:
                raise TopologyError(
                    f"topology {text!r}: {token!r} is not KEY=VALUE (a preset may only come first)"
                )
            raw.update(preset(token, text))
            continue
        key = _ALIASES.get(key.strip(), key.strip())
        if key in ("name", "device", "sparse_optimizer"):
            raw[key] = value.strip()
        else:
            parsed = parse_yaml(value.strip()) if value.strip() else None
            raw[key] = parsed
    return raw


def preset(token: str, source: str | None = None) -> dict[str, Any]:
    """``NODESxDEVICESxKIND``: KIND is a GPU (``A100-80GB``, ``H100-80GB`` ...) or ``CPU[-NGB]``."""
    match = _PRESET.match(token)
    known = sorted(GPU_PRESETS) + ["CPU", "CPU-<N>GB"]
    if not match:
        raise TopologyError(
            f"topology {source or token!r}: {token!r} is neither KEY=VALUE nor a preset "
            f"NODESxDEVICESxKIND (e.g. 2x8xA100-80GB); kinds: {known}"
        )
    nodes, devices, kind = int(match[1]), int(match[2]), match[3]
    base: dict[str, Any] = {"nodes": nodes, "devices_per_node": devices}
    cpu = _CPU_PRESET.match(kind)
    if cpu:
        return {**base, "device": "cpu", "ddr_gb": float(cpu[1]) if cpu[1] else CPU_PRESET_DDR_GB}
    gpu = {k.upper(): v for k, v in GPU_PRESETS.items()}.get(kind.upper())
    if gpu is None:
        raise TopologyError(f"topology {source or token!r}: unknown device kind {kind!r}; kinds: {known}")
    return {**base, "device": "cuda", **gpu}


def _from_file(path: Path) -> list[TopologySpec]:
    if not path.is_file():
        raise TopologyError(f"topology file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            from towerrec.trainer.config import parse_yaml

            raw = parse_yaml(text)
    except Exception as e:  # noqa: BLE001 - any parse error is reported with the file name
        raise TopologyError(f"topology file {path}: cannot parse: {e}") from None
    if isinstance(raw, dict) and set(raw) == {"topologies"}:
        raw = raw["topologies"]
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise TopologyError(f"topology file {path}: no topology in it")
    specs = []
    for i, item in enumerate(items):
        where = f"{path}" if len(items) == 1 else f"{path} [{i}]"
        if not isinstance(item, dict):
            raise TopologyError(f"topology file {where}: expected a mapping of fields, got {item!r}")
        item = dict(item)
        if "preset" in item:  # {preset: 2x8xA100-80GB, batch_size: ...}
            item = {**preset(str(item.pop("preset")), where), **item}
        specs.append(_validate(item, where))
    return specs


def _validate(raw: dict[str, Any], source: str) -> TopologySpec:
    try:
        return TopologySpec.model_validate(raw)
    except ValidationError as e:
        lines = []
        for item in e.errors():
            field = ".".join(str(p) for p in item["loc"])
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = f"unknown field; fields: {list(TopologySpec.model_fields)}"
            lines.append(f"{field}: {message}" if field else message)
        raise TopologyError(f"topology {source!r}: " + "; ".join(lines)) from None
