"""Multi-layer perceptron used by experts and towers."""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
import torch.nn as nn

_ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}
_NORMS: Dict[str, Callable[[int], nn.Module]] = {
    "batch": nn.BatchNorm1d,
    "layer": nn.LayerNorm,
}


def activation_layer(name: str) -> nn.Module:
    """Build an activation module by name (``relu``, ``gelu``, ``silu``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class MLP(nn.Module):
    """Stack of ``Linear -> activation -> [norm] -> [dropout]`` blocks, one per hidden width.

    Norm comes after the activation, as docs/MODELS.md specifies. With ``hidden=[]`` the MLP is
    the identity and ``out_features == in_features``.

    Args:
        in_features (int): width of the input.
        hidden (Sequence[int]): width of each hidden layer; the last one is the output width.
        activation (str): ``relu`` | ``gelu`` | ``silu``.
        norm (str): ``none`` | ``batch`` (BatchNorm1d) | ``layer`` (LayerNorm).
        dropout (float): dropout probability after each block; 0 disables it.

    Example::

        mlp = MLP(16, [32, 8], norm="layer", dropout=0.1)
        y = mlp(torch.randn(4, 16))  # [4, 8]; mlp.out_features == 8
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if norm != "none" and norm not in _NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose from {['none', *sorted(_NORMS)]}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = in_features
        for out in hidden:
            layers += [nn.Linear(width, out), activation_layer(activation)]
            if norm != "none":
                layers.append(_NORMS[norm](out))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = out
        self.in_features = in_features
        self.out_features = width
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_features] -> [B, out_features]``."""
        return self.layers(x)
