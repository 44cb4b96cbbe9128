"""Typed hyperparameters of the dense multi-task models, selected by ``model.type``.

Example::

    model:
      type: ple
      num_levels: 2
      experts_per_task: 1
      shared_experts: 1
      expert_hidden: [64]
      tower_hidden: [64, 32]
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


# Further model types (DTN, MMoE, Shared-Bottom, single-task) join this union.
ModelConfig = Annotated[Union[PLEConfig], Field(discriminator="type")]
