"""Typed hyperparameters of the dense multi-task models, selected by ``model.type``.

Types: ``ple``, ``cgc`` (PLE with one level), ``mmoe``, ``shared_bottom``, ``single_task``.

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
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

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


# PLEConfig first: error messages list the allowed types in this order. DTN joins this union.
ModelConfig = Annotated[
    Union[PLEConfig, CGCConfig, MMoEConfig, SharedBottomConfig, SingleTaskConfig],
    Field(discriminator="type"),
]
