"""Typed hyperparameters of the dense multi-task models, selected by ``model.type``.

Types: ``ple``, ``cgc`` (PLE with one level), ``mmoe``, ``shared_bottom``, ``single_task``, ``dtn``.

Example::

    model:
      type: ple
      num_levels: 2
      experts_per_task: 1
      shared_experts: 1
      expert_hidden: [64]
      tower_hidden: [64, 32]

    model: {type: mmoe, num_experts: 4, expert_hidden: [64], tower_hidden: [64, 32]}
    model: {type: shared_bottom, bottom_hidden: [128, 64], tower_hidden: [64, 32]}
    model: {type: single_task, hidden: [128, 64], tower_hidden: [64, 32]}
    model: {type: cgc, experts_per_task: 1, shared_experts: 1}

    model:
      type: dtn
      methods: [gdcn, masknet, memonet]   # memonet needs data.cross
      module_width: 256
      gate_selector: input          # or self (the authors' code)
      dependencies: {conversion: click}
      combine: concat               # or sum
      tower_hidden: [128, 64]
"""

from __future__ import annotations

from typing import Annotated, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveInt = Annotated[int, Field(gt=0)]


class _ModelSection(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class MLPConfig(_ModelSection):
    """Shared knobs of every MLP in a model (experts and towers)."""

    activation: Literal["relu", "gelu", "silu"] = "relu"
    norm: Literal["none", "batch", "layer"] = "none"
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0


class PLEConfig(_ModelSection):
    """Progressive Layered Extraction (Tang et al., RecSys 2020); ``num_levels: 1`` is CGC.

    ``experts_per_task`` is one count for every task or a list with one count per task.
    """

    type: Literal["ple"]
    num_levels: PositiveInt = 2
    experts_per_task: PositiveInt | list[PositiveInt] = 1
    shared_experts: PositiveInt = 1
    expert_hidden: Annotated[list[PositiveInt], Field(min_length=1)] = [64]
    tower_hidden: list[PositiveInt] = [256, 128, 64]
    mlp: MLPConfig = MLPConfig()


class CGCConfig(_ModelSection):
    """Customized Gate Control: :class:`PLEConfig` with exactly one level (no ``num_levels``)."""

    type: Literal["cgc"]
    experts_per_task: PositiveInt | list[PositiveInt] = 1
    shared_experts: PositiveInt = 1
    expert_hidden: Annotated[list[PositiveInt], Field(min_length=1)] = [64]
    tower_hidden: list[PositiveInt] = [256, 128, 64]
    mlp: MLPConfig = MLPConfig()


class MMoEConfig(_ModelSection):
    """Multi-gate Mixture-of-Experts: ``num_experts`` shared experts, one gate per task over all.

    ``num_experts: 1`` makes every gate weight 1 (Shared-Bottom with an idle gate); use >= 2.
    """

    type: Literal["mmoe"]
    num_experts: PositiveInt = 4
    expert_hidden: Annotated[list[PositiveInt], Field(min_length=1)] = [64]
    tower_hidden: list[PositiveInt] = [256, 128, 64]
    mlp: MLPConfig = MLPConfig()


class SharedBottomConfig(_ModelSection):
    """Shared-Bottom: one shared MLP (``bottom_hidden``) then one tower per task."""

    type: Literal["shared_bottom"]
    bottom_hidden: Annotated[list[PositiveInt], Field(min_length=1)] = [128, 64]
    tower_hidden: list[PositiveInt] = [256, 128, 64]
    mlp: MLPConfig = MLPConfig()


class SingleTaskConfig(_ModelSection):
    """Independent ``MLP(hidden)`` + tower per task, nothing shared in the dense part.

    The papers' single-task baseline is one run per task: list a single task in ``data.tasks``.
    """

    type: Literal["single_task"]
    hidden: list[PositiveInt] = [128, 64]
    tower_hidden: list[PositiveInt] = [256, 128, 64]
    mlp: MLPConfig = MLPConfig()


def find_dependency_cycle(dependencies: Mapping[str, str]) -> Optional[list[str]]:
    """A cycle of the task -> parent map as ``[a, b, ..., a]`` (``[a, a]`` for a self-dependency), or None.

    Example::

        find_dependency_cycle({"a": "b", "b": "a"})  # ["a", "b", "a"]
    """
    for start in dependencies:
        path = [start]
        while path[-1] in dependencies:
            nxt = dependencies[path[-1]]
            if nxt in path:
                return path[path.index(nxt) :] + [nxt]
            path.append(nxt)
    return None


class DTNConfig(_ModelSection):
    """DTN (Bi et al. 2024): task-specific + shared groups of feature-interaction modules, TSN.

    ``methods``: FI methods in every group (``gdcn``, ``masknet``, ``memonet``, ``dcnv2``, ``mlp``),
    each ``instances_per_method`` times. ``memonet`` (the hashed cross codebook) needs ``data.cross``:
    the codebook is a table of the sharded collection and the loader computes its ids.
    ``dependencies``: task -> parent task (TSN); cycles are rejected here, unknown task names by the
    experiment config (which knows the tasks) and by the module.
    ``gdcn_rank``: low-rank GDCN cross and gate matrices (None: full, ``[in, in]``);
    ``masknet_mask_width``: width of each MaskNet mask's hidden layer (None: the input's width).
    Both cut the cost of the two methods that dominate DTN's step when the input is wide.
    ``gate_selector``: ``input`` (gate on x) or ``self`` (each module scored from its own output).
    ``combine``: tower input ``concat(S_pool, S_self)`` (width 2d) or ``S_pool + S_self`` (width d).
    """

    type: Literal["dtn"]
    methods: Annotated[list[Literal["gdcn", "masknet", "memonet", "dcnv2", "mlp"]], Field(min_length=1)] = [
        "gdcn",
        "masknet",
    ]
    module_width: PositiveInt = 256
    instances_per_method: PositiveInt = 1
    gdcn_layers: PositiveInt = 2
    gdcn_rank: Optional[PositiveInt] = None
    masknet_blocks: PositiveInt = 2
    masknet_block_width: PositiveInt = 128
    masknet_mask_width: Optional[PositiveInt] = None
    masknet_hidden: list[PositiveInt] = [256, 256]
    dcn_layers: PositiveInt = 2
    interaction_mlp_hidden: list[PositiveInt] = [256, 256]
    gate_selector: Literal["input", "self"] = "input"
    dependencies: dict[str, str] = {}
    tsn_detach: bool = True
    combine: Literal["concat", "sum"] = "concat"
    tower_hidden: list[PositiveInt] = [128, 64]
    mlp: MLPConfig = MLPConfig()

    @model_validator(mode="after")
    def _check(self) -> "DTNConfig":
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: {self.methods} repeats a method; use instances_per_method")
        cycle = find_dependency_cycle(self.dependencies)
        if cycle is not None:
            raise ValueError(f"dependencies: cycle {' -> '.join(cycle)}")
        return self


def reads_cross(config: BaseModel) -> bool:
    """Whether the network takes the cross codebook's vectors (DTN with the ``memonet`` method)."""
    return isinstance(config, DTNConfig) and "memonet" in config.methods


# PLEConfig first: error messages list the allowed types in this order.
ModelConfig = Annotated[
    Union[PLEConfig, CGCConfig, MMoEConfig, SharedBottomConfig, SingleTaskConfig, DTNConfig],
    Field(discriminator="type"),
]
