"""Softmax gate that mixes a set of same-width candidate vectors (MMoE / CGC / PLE / DTN)."""

from __future__ import annotations

from typing import List, Literal, Tuple, Union, overload

import torch
import torch.nn as nn


def mix_candidates(weights: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``out[b] = Σ_i weights[b, i] · candidates[i, b]`` for ``weights [B, n]``, ``candidates [n, B, d]``.

    A multiply and a sum over the candidate axis: on ``[n, B, d]`` (the layout stacked experts
    produce) this is several times faster than a ``bmm`` of B ``[1, n] @ [n, d]`` products. The
    candidate count is checked, as broadcasting would silently spread a size-1 candidate axis over n
    weights.

    Example::

        mixed = mix_candidates(torch.softmax(torch.randn(4, 3), -1), torch.randn(3, 4, 8))  # [4, 8]
    """
    torch._assert(candidates.shape[0] == weights.shape[1], "gate: candidate count differs from weight count")
    return (weights.t().unsqueeze(-1) * candidates).sum(0)


class Gate(nn.Module):
    """``out = Σ_i softmax(W · selector + b)_i · candidate_i`` over ``num_candidates`` candidates.

    The softmax runs over the candidate axis of a ``[B, n]`` score tensor, so with n >= 2 the
    weights are a proper distribution; with n == 1 the single weight is exactly 1 (the gate is
    then a pass-through whose Linear receives zero gradient).

    Candidates are a list of n ``[B, d]`` tensors or one candidate-major ``[n, B, d]`` tensor (the
    output layout of the stacked experts, ``modules.stacked``).

    Args:
        selector_features (int): width of the selector input that scores the candidates.
        num_candidates (int): number of candidate vectors n.

    Example::

        gate = Gate(selector_features=8, num_candidates=3)
        sel, cands = torch.randn(4, 8), [torch.randn(4, 16) for _ in range(3)]
        out = gate(sel, cands)                                   # [4, 16]
        out, w = gate(sel, cands, return_weights=True)           # w: [4, 3], rows sum to 1
        out = gate(sel, torch.stack(cands))                      # candidates as one [3, 4, 16]
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
        """Mix ``candidates`` (``[n, B, d]`` or a list of n ``[B, d]``) into ``[B, d]``.

        Returns ``(mixture, weights [B, n])`` when ``return_weights`` is set.
        """
        if isinstance(candidates, (list, tuple)):
            if len(candidates) != self.num_candidates:
                raise ValueError(f"gate expects {self.num_candidates} candidates, got {len(candidates)}")
            candidates = torch.stack(list(candidates))
        weights = self.weights(selector)
        mixed = mix_candidates(weights, candidates)
        if return_weights:
            return mixed, weights
        return mixed
