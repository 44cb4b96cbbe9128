"""Multi-layer perceptron used by experts and towers, and its stacked form (n experts in one)."""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
import torch.nn as nn
from towerrec.modules.stacked import (
    Parts,
    Stacked,
    StackedBatchNorm,
    StackedLayerNorm,
    StackedLinear,
    build_single,
    count_members,
)

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


def check_options(norm: str, dropout: float) -> None:
    """The norm and dropout an MLP (stacked or not) accepts."""
    if norm != "none" and norm not in _NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {['none', *sorted(_NORMS)]}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


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
        check_options(norm, dropout)
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


_STACKED_NORMS: Dict[str, Callable[[Parts, int], Stacked]] = {
    "batch": StackedBatchNorm,
    "layer": StackedLayerNorm,
}


class StackedMLP(Stacked):
    """``n`` independent :class:`MLP` of one shape, each layer one GEMM / ``bmm`` for all of them.

    Same math per member as ``MLP(in_features, hidden, activation, norm, dropout)``: ``Linear ->
    activation -> [norm] -> [dropout]`` per hidden width, a norm with its own statistics and affine
    per member, dropout masks drawn independently per member and row (see ``modules.stacked`` for
    the layout and ``parts``).

    State-dict keys, per hidden layer l: ``linears.l.weight [n, width_l, width_{l-1}]``,
    ``linears.l.bias [n, width_l]`` (``.<part>`` appended with named parts) and, with a norm,
    ``norms.l.weight`` / ``norms.l.bias [n, width_l]`` (BatchNorm also ``norms.l.running_mean``,
    ``running_var``, ``num_batches_tracked``).

    Args:
        parts (int | Mapping[str, int]): the member count, or named member ranges.
        in_features, hidden, activation, norm, dropout: as :class:`MLP`.

    Example::

        experts = StackedMLP(4, 16, [32, 8])
        y = experts(torch.randn(5, 16), shared_input=True)   # [4, 5, 8]: every expert reads x
        z = experts(torch.randn(4, 5, 16))                   # [4, 5, 8]: expert i reads x[i]
        experts.member(2)                                    # MLP(16, [32, 8]) with expert 2's weights
    """

    def __init__(
        self,
        parts: Parts,
        in_features: int,
        hidden: Sequence[int],
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_options(norm, dropout)
        self.num_members = count_members(parts)
        self.in_features = in_features
        self.hidden = list(hidden)
        self.activation_name, self.norm_name, self.dropout_p = activation, norm, dropout
        widths = [in_features, *self.hidden]
        # Built without drawing (Stacked's reset_parameters would draw layer-major); initialised
        # below member-major, as n separate MLPs would be.
        with torch.random.fork_rng(devices=[]):
            self.linears = nn.ModuleList(
                StackedLinear(parts, a, b) for a, b in zip(widths, widths[1:], strict=False)
            )
        self.norms = (
            nn.ModuleList(_STACKED_NORMS[norm](parts, w) for w in self.hidden) if norm != "none" else None
        )
        self.activation = activation_layer(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.out_features = widths[-1]
        self.reset_parameters()

    def reset_member(self, index: int) -> None:
        for linear in self.linears:
            linear.reset_member(index)
        for norm in self.norms or []:
            norm.reset_member(index)

    def forward(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        """``[B, in_features]`` (``shared_input``: every member reads it) or ``[n, B, in_features]``
        ``-> [n, B, out_features]``."""
        if not self.hidden:  # the identity, as MLP(in, [])
            return x.expand(self.num_members, -1, -1) if shared_input else x
        h = x
        for i, linear in enumerate(self.linears):
            h = self.activation(linear(h, shared_input=shared_input and i == 0))
            if self.norms is not None:
                h = self.norms[i](h)
            if self.dropout is not None:
                h = self.dropout(h)
        return h

    def member(self, index: int) -> MLP:
        kw = dict(activation=self.activation_name, norm=self.norm_name, dropout=self.dropout_p)
        single = build_single(self, MLP, self.in_features, self.hidden, **kw)
        linears = [m for m in single.layers if isinstance(m, nn.Linear)]
        norms = [m for m in single.layers if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d))]
        for target, source in zip(linears, self.linears, strict=True):
            target.load_state_dict(source.member(index).state_dict())
        for target, source in zip(norms, self.norms or [], strict=True):
            target.load_state_dict(source.member(index).state_dict())
        return single
