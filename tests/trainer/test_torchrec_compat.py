"""The TorchRec internals behind towerrec.trainer.planning.torchrec_compat: each still exists with
the signature the wrapper calls, and still means what the planner assumes (checked on a tiny real
input). A TorchRec upgrade that changes one fails here naming the wrapper to update."""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Iterator

import pytest
import torch
import torchrec
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.constants import BIGINT_DTYPE, POOLING_FACTOR
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.planners import to_sharding_plan
from torchrec.distributed.planner.stats import NoopEmbeddingStats
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    Perf,
    Shard,
    ShardingOption,
    Storage,
)
from torchrec.distributed.types import CacheParams, DataType
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from towerrec.trainer.planning import torchrec_compat as compat
from towerrec.trainer.planning.topology import parse_topologies

PLANNER = "torchrec.distributed.planner"
# wrapper -> (module, the internal it calls, the parameters it passes)
SIGNATURES = {
    "param_constraints": (
        f"{PLANNER}.enumerators",
        "_extract_constraints_for_param",
        ["constraints", "name"],
    ),
    "allowed_sharding_types": (
        f"{PLANNER}.enumerators",
        "EmbeddingEnumerator._filter_sharding_types",
        ["self", "name", "allowed_sharding_types", "sharder_key"],
    ),
    "allowed_compute_kernels": (
        f"{PLANNER}.enumerators",
        "EmbeddingEnumerator._filter_compute_kernels",
        ["self", "name", "allowed_compute_kernels", "sharding_type"],
    ),
    "num_buckets": (
        f"{PLANNER}.enumerators",
        "EmbeddingEnumerator._get_num_buckets",
        ["self", "parameter", "module"],
    ),
    "optimizer_multiplier": (
        f"{PLANNER}.shard_estimators",
        "_get_optimizer_multipler",
        ["optimizer_class", "shape"],
    ),
    "shard_io_sizes": (
        f"{PLANNER}.shard_estimators",
        "_calculate_shard_io_sizes",
        [
            "sharding_type",
            "batch_sizes",
            "world_size",
            "local_world_size",
            "input_lengths",
            "emb_dim",
            "shard_sizes",
            "input_data_type_size",
            "output_data_type_size",
            "num_poolings",
            "is_pooled",
        ],
    ),
    "critical_path_ms": (f"{PLANNER}.stats", "_calculate_critical_path", ["best_plan"]),
}


pytestmark = pytest.mark.usefixtures("quiet_torchrec")


def changed(internal: str, wrapper: str) -> str:
    return (
        f"TorchRec {torchrec.__version__} changed {internal}: "
        f"towerrec.trainer.planning.torchrec_compat.{wrapper} needs updating"
    )


@contextlib.contextmanager
def internal(name: str, wrapper: str) -> Iterator[None]:
    """Any failure inside (a missing attribute, a new tuple length, another result) fails with
    the message that names the wrapper."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - whatever broke, the wrapper is what to update
        pytest.fail(f"{changed(name, wrapper)} ({type(e).__name__}: {e})")


def tiny_ebc(device: str = "meta") -> EmbeddingBagCollection:
    tables = [
        EmbeddingBagConfig(name="user", embedding_dim=8, num_embeddings=64, feature_names=["user_id"]),
        EmbeddingBagConfig(
            name="bucketed",
            embedding_dim=8,
            num_embeddings=64,
            feature_names=["bucketed_id"],
            use_virtual_table=True,
            total_num_buckets=8,
        ),
    ]
    return EmbeddingBagCollection(tables, device=torch.device(device))


def cpu_topology(ranks: int = 2):
    return parse_topologies(f"1x{ranks}xCPU-4GB")[0].to_torchrec()


def test_every_private_internal_is_wrapped_here() -> None:
    """The table below covers every wrapper that calls a TorchRec function (the others read
    attributes; their behaviour tests check those)."""
    calls = {"reserved_storage", "planner_best_plan", "planner_counts", "optimizer_class"}
    public = {n for n, f in vars(compat).items() if inspect.isfunction(f) and f.__module__ == compat.__name__}
    assert public - calls == set(SIGNATURES)


@pytest.mark.parametrize("wrapper", sorted(SIGNATURES))
def test_internal_exists_with_the_signature_the_wrapper_calls(wrapper: str) -> None:
    module_name, qualname, params = SIGNATURES[wrapper]
    target: object = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part, None)
        if target is None:
            pytest.fail(f"{changed(qualname, wrapper)} (no {module_name}.{qualname})")
    found = list(inspect.signature(target).parameters)  # type: ignore[arg-type]
    if found != params:
        pytest.fail(f"{changed(qualname, wrapper)} (parameters {found}, expected {params})")


def test_param_constraints_names_every_field_and_the_defaults() -> None:
    name, wrapper = "_extract_constraints_for_param", "param_constraints"
    c = ParameterConstraints(
        pooling_factors=[3.0],
        min_partition=4,
        cache_params=CacheParams(load_factor=0.2),
        enforce_hbm=True,
        stochastic_rounding=False,
        feature_names=["user_id"],
        output_dtype=DataType.FP16,
        device_group="cpu",
    )
    with internal(name, wrapper):
        fields = compat.param_constraints({"user": c}, "user")
        assert fields.input_lengths == [3.0]
        assert fields.min_partition == 4
        assert fields.cache_params == c.cache_params and fields.cache_params is not c.cache_params
        assert (fields.enforce_hbm, fields.stochastic_rounding) == (True, False)
        assert fields.bounds_check_mode == c.bounds_check_mode
        assert fields.feature_names == ["user_id"]
        assert fields.output_dtype == DataType.FP16
        assert fields.device_group == "cpu"
        assert fields.key_value_params == c.key_value_params
        default = compat.param_constraints({"user": c}, "other")
        assert default == compat.ParamConstraintFields([POOLING_FACTOR], *[None] * 9)


def test_enumerator_filters_apply_the_constraints() -> None:
    constraints = {"user": ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"])}
    enumerator = EmbeddingEnumerator(cpu_topology(), batch_size=4, constraints=constraints)
    types = ["table_wise", "column_wise", "data_parallel", "grid_shard"]
    with internal("EmbeddingEnumerator._filter_sharding_types", "allowed_sharding_types"):
        assert compat.allowed_sharding_types(enumerator, "user", types, "EmbeddingBagCollection") == [
            "table_wise"
        ]
        # unconstrained: everything but grid sharding, which TorchRec offers only when asked
        assert compat.allowed_sharding_types(enumerator, "item", types, "EmbeddingBagCollection") == types[:3]
    with internal("EmbeddingEnumerator._filter_compute_kernels", "allowed_compute_kernels"):
        assert compat.allowed_compute_kernels(enumerator, "user", ["fused", "dense"], "table_wise") == [
            "fused"
        ]
        # unconstrained: dense only where fused is not offered (data-parallel)
        assert compat.allowed_compute_kernels(enumerator, "item", ["fused", "dense"], "table_wise") == [
            "fused"
        ]
        assert compat.allowed_compute_kernels(enumerator, "item", ["dense"], "data_parallel") == ["dense"]


def test_num_buckets_of_a_virtual_table() -> None:
    enumerator = EmbeddingEnumerator(cpu_topology(), batch_size=4)
    with internal("EmbeddingEnumerator._get_num_buckets", "num_buckets"):
        ebc = tiny_ebc()
        assert compat.num_buckets(enumerator, "bucketed", ebc) == 8
        assert compat.num_buckets(enumerator, "user", ebc) is None


def test_optimizer_class_and_multiplier_as_the_storage_estimator_counts() -> None:
    ebc = tiny_ebc("cpu")
    weights = dict(ebc.named_parameters())
    user, bucketed = weights["embedding_bags.user.weight"], weights["embedding_bags.bucketed.weight"]
    with internal("_optimizer_classes (set by apply_optimizer_in_backward)", "optimizer_class"):
        assert compat.optimizer_class(user) is None
        apply_optimizer_in_backward(RowWiseAdagrad, [user], {"lr": 0.1})
        apply_optimizer_in_backward(torch.optim.Adagrad, [bucketed], {"lr": 0.1})
        assert compat.optimizer_class(user) is RowWiseAdagrad
        assert compat.optimizer_class(bucketed) is torch.optim.Adagrad
    with internal("_get_optimizer_multipler", "optimizer_multiplier"):
        assert compat.optimizer_multiplier(user) == pytest.approx(1 / 8)  # one float per row
        assert compat.optimizer_multiplier(bucketed) == 1.0  # one float per weight
        assert compat.optimizer_multiplier(nn.Parameter(torch.zeros(4, 8))) == 0.0


def test_shard_io_sizes_of_a_table_wise_shard() -> None:
    with internal("_calculate_shard_io_sizes", "shard_io_sizes"):
        inputs, outputs = compat.shard_io_sizes(
            sharding_type="table_wise",
            batch_sizes=[4],
            world_size=2,
            local_world_size=2,
            input_lengths=[3.0],
            emb_dim=8,
            shard_sizes=[[64, 8]],
            input_data_type_size=BIGINT_DTYPE,
            output_data_type_size=4,
            num_poolings=[1.0],
            is_pooled=True,
        )
        # ids: 4 samples x 3 ids x 2 ranks x 8 bytes; pooled output: 4 x 2 ranks x dim 8 x 4 bytes
        assert (inputs, outputs) == ([4 * 3 * 2 * 8], [4 * 2 * 8 * 4])


def _option(name: str, rank: int, perf: Perf, module: nn.Module) -> ShardingOption:
    return ShardingOption(
        name=name,
        tensor=torch.empty(64, 8, device="meta"),
        module=("ebc", module),
        input_lengths=[1.0],
        batch_size=4,
        sharding_type="table_wise",
        partition_by="device",
        compute_kernel="fused",
        shards=[Shard(size=[64, 8], offset=[0, 0], perf=perf, storage=Storage(0, 0), rank=rank)],
    )


def test_critical_path_is_the_sum_of_the_slowest_rank_per_phase() -> None:
    module = nn.Module()
    plan = [
        _option("a", 0, Perf(fwd_compute=1, fwd_comms=2, bwd_compute=3, bwd_comms=4), module),
        _option("b", 1, Perf(fwd_compute=2, fwd_comms=1, bwd_compute=1, bwd_comms=6), module),
    ]
    with internal("_calculate_critical_path", "critical_path_ms"):
        # fwd comms 2 + bwd comms 6 + fwd compute 2 + bwd compute 3; either rank alone is 10
        assert compat.critical_path_ms(plan) == 13.0


def test_reserved_storage_is_what_the_reservation_took() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = tiny_ebc()
            self.dense = nn.Linear(64, 64, device="meta")

    topology = cpu_topology()
    reservation = HeuristicalStorageReservation(percentage=0.15)
    reserved = reservation.reserve(topology, 4, Model(), [EmbeddingBagCollectionSharder()])
    with internal("HeuristicalStorageReservation._dense_storage/_kjt_storage", "reserved_storage"):
        storage = compat.reserved_storage(reservation)
        assert set(storage) == {"dense", "kjt"}
        dense, kjt = storage["dense"], storage["kjt"]
        assert isinstance(dense, Storage) and isinstance(kjt, Storage)
        assert dense.ddr > 0 and kjt.ddr > 0
        # on CPU the reservation is exactly dense + inputs (the report draws it so)
        taken = topology.devices[0].storage.ddr - reserved.devices[0].storage.ddr
        assert taken == dense.ddr + kjt.ddr


def test_default_planner_best_plan_and_counts() -> None:
    topology = cpu_topology()
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=4, stats=NoopEmbeddingStats())
    plan = planner.plan(tiny_ebc(), [EmbeddingBagCollectionSharder()])
    with internal("EmbeddingShardingPlanner._best_plan", "planner_best_plan"):
        best = compat.planner_best_plan(planner)
        assert best is not None and {so.name for so in best} == {"user", "bucketed"}
        assert all(isinstance(s.rank, int) for so in best for s in so.shards)
        assert to_sharding_plan(best, topology).plan[""].keys() == plan.plan[""].keys()  # type: ignore[union-attr]
    with internal("EmbeddingShardingPlanner._num_proposals/_num_plans", "planner_counts"):
        counts = compat.planner_counts(planner)
        assert set(counts) == {"proposals", "plans"}
        assert counts["proposals"] >= counts["plans"] >= 1
