"""Softmax gate that mixes a set of same-width candidate vectors (MMoE / CGC / PLE)."""

from __future__ import annotations

from typing import List, Literal, Tuple, Union, overload

import torch
import torch.nn as nn


class Gate(nn.Module):
    """``out = Σ_i softmax(W · selector + b)_i · candidate_i`` over ``num_candidates`` candidates.

    The softmax runs over the candidate axis of a ``[B, n]`` score tensor, so with n >= 2 the
    weights are a proper distribution; with n == 1 the single weight is exactly 1 (the gate is
    then a pass-through whose Linear receives zero gradient).

    Args:
        selector_features (int): width of the selector input that scores the candidates.
        num_candidates (int): number of candidate vectors n.

    Example::

        gate = Gate(selector_features=8, num_candidates=3)
        sel, cands = torch.randn(4, 8), [torch.randn(4, 16) for _ in range(3)]
        out = gate(sel, cands)                                   # [4, 16]
        out, w = gate(sel, cands, return_weights=True)           # w: [4, 3], rows sum to 1
    """

    def __init__(self, selector_features: int, num_candidates: int) -> None:
        super().__init__()
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        self.num_candidates = num_candidates
        self.scores = nn.Linear(selector_features, num_candidates)

    def weights(self, selector: torch.Tensor) -> torch.Tensor:
        """``[B, S] -> [B, n]`` mixing weights (softmax over the candidate axis)."""
        return torch.softmax(self.scores(selector), dim=-1)

    @overload
    def forward(
        self,
        selector: torch.Tensor,
        candidates: Union[torch.Tensor, List[torch.Tensor]],
        return_weights: Literal[False] = ...,
    ) -> torch.Tensor: ...

    @overload
    def forward(
        self,
        selector: torch.Tensor,
        candidates: Union[torch.Tensor, List[torch.Tensor]],
        return_weights: Literal[True],
    ) -> Tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self,
        selector: torch.Tensor,
        candidates: Union[torch.Tensor, List[torch.Tensor]],
        return_weights: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Mix ``candidates`` (``[B, n, d]`` or a list of n ``[B, d]``) into ``[B, d]``.

        Returns ``(mixture, weights [B, n])`` when ``return_weights`` is set.
        """
        if isinstance(candidates, (list, tuple)):
            if len(candidates) != self.num_candidates:
                raise ValueError(f"gate expects {self.num_candidates} candidates, got {len(candidates)}")
            candidates = torch.stack(list(candidates), dim=1)
        weights = self.weights(selector)
        # bmm (unlike broadcasting `w[..., None] * c`) fails loudly if n differs from the
        # candidate count, instead of silently broadcasting a size-1 axis.
        mixed = torch.bmm(weights.unsqueeze(1), candidates).squeeze(1)
        if return_weights:
            return mixed, weights
        return mixed
