"""Feature-interaction (FI) modules for DTN: each maps ``x [B, in_features] -> [B, out_features]``.

Methods (docs/MODELS.md, DTN section), registered by name in :data:`INTERACTIONS`:

- ``gdcn``: gated cross network, ``c_{l+1} = c_0 ⊙ (W_l c_l + b_l) ⊙ sigmoid(U_l c_l) + c_l``, then Linear;
  optionally low-rank (``rank``: ``W_l`` and ``U_l`` each a product of two thin matrices, as DCN-v2's
  low-rank cross).
- ``masknet``: parallel MaskNet, b blocks of instance-guided masks, concatenated, then an MLP;
  ``mask_width`` sets the width of each mask's hidden layer (default: x's).
- ``dcnv2``: DCN-v2 cross layers (``torchrec.modules.crossnet.CrossNet``),
  ``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l``, then Linear.
- ``mlp``: a plain MLP, then Linear.
- ``memonet``: MemoNet-style hashed cross codebook; reads the codebook's pooled codewords besides x
  (``forward(x, cross)``, marked by ``reads_cross = True``).

Each method also has a stacked form (:data:`STACKED_INTERACTIONS`, ``modules.stacked``): ``n``
instances of one method, every instance reading the same x, run as one GEMM / ``bmm`` per layer
(``x [B, in] -> [n, B, out]``). DTN keeps each method's instances of every group in one stack; the
single classes here are the definition each stacked member is tested against (``member(i)``).
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
from torchrec.modules.crossnet import CrossNet
from towerrec.modules.mlp import MLP, StackedMLP
from towerrec.modules.stacked import (
    Parts,
    Stacked,
    StackedLayerNorm,
    StackedLinear,
    StackedLowRankLinear,
    build_single,
    copy_into,
    count_members,
    joined,
    member_slice,
    scale_parts,
    stacked_parameter,
)


def _to_width(in_features: int, out_features: int) -> nn.Module:
    """Linear to ``out_features``, or the identity when the widths already match."""
    return nn.Identity() if in_features == out_features else nn.Linear(in_features, out_features)


def _square(width: int, rank: Optional[int], bias: bool = True) -> nn.Module:
    """``Linear(width -> width)``, or with ``rank`` its low-rank form ``V (U^T c) + b``:
    ``Linear(width -> rank, bias=False)`` then ``Linear(rank -> width)``."""
    if rank is None:
        return nn.Linear(width, width, bias=bias)
    return nn.Sequential(nn.Linear(width, rank, bias=False), nn.Linear(rank, width, bias=bias))


def _stacked_square(parts: Parts, width: int, rank: Optional[int], bias: bool = True) -> Stacked:
    """:func:`_square` stacked."""
    if rank is None:
        return StackedLinear(parts, width, width, bias=bias)
    return StackedLowRankLinear(parts, width, rank, width, bias=bias)


def _check_rank(rank: Optional[int], name: str = "rank") -> None:
    if rank is not None and rank < 1:
        raise ValueError(f"{name} must be >= 1 or None (full width), got {rank}")


class GDCN(nn.Module):
    """Gated cross network (GDCN). The gate ``U_l`` has no bias, as in the formula.

    ``rank`` (None: full) makes ``W_l`` and ``U_l`` low-rank, ``V_l U'_l^T`` with thin factors
    ``[in, rank]``, as DCN-v2's low-rank cross layer: a layer costs ``4 * in * rank`` multiply-adds
    per example instead of ``2 * in^2``.

    Example::

        gdcn = GDCN(16, 32, num_layers=2)
        y = gdcn(torch.randn(4, 16))  # [4, 32]
        y = GDCN(16, 32, rank=4)(torch.randn(4, 16))  # low-rank cross and gate
    """

    def __init__(
        self, in_features: int, out_features: int = 256, num_layers: int = 2, rank: Optional[int] = None
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        _check_rank(rank)
        self.out_features = out_features
        self.cross = nn.ModuleList(_square(in_features, rank) for _ in range(num_layers))
        self.gates = nn.ModuleList(_square(in_features, rank, bias=False) for _ in range(num_layers))
        self.out = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x
        for w, u in zip(self.cross, self.gates, strict=True):
            c = x * w(c) * torch.sigmoid(u(c)) + c
        return self.out(c)


class DCNv2(nn.Module):
    """DCN-v2 cross layers (full-rank W_l: TorchRec's ``CrossNet``) then Linear(-> out_features).

    ``CrossNet`` initialises ``W_l`` Xavier-normal and ``b_l`` to zero.

    Example::

        y = DCNv2(16, 32, num_layers=2)(torch.randn(4, 16))  # [4, 32]
    """

    def __init__(self, in_features: int, out_features: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.out_features = out_features
        self.cross = CrossNet(in_features, num_layers)
        self.out = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.cross(x))


class MaskBlock(nn.Module):
    """One MaskNet block: ``mask = W2 ReLU(W1 x + c1) + c2``; ``h = ReLU(LayerNorm(W3 (x ⊙ mask)))``.

    The mask's hidden layer (W1's output) has the width of x, or ``mask_width``.
    """

    def __init__(self, in_features: int, block_width: int = 128, mask_width: Optional[int] = None) -> None:
        super().__init__()
        _check_rank(mask_width, "mask_width")
        hidden = mask_width or in_features
        self.mask = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, in_features))
        self.hidden = nn.Linear(in_features, block_width, bias=False)  # LayerNorm carries the bias
        self.norm = nn.LayerNorm(block_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.hidden(x * self.mask(x))))


class MaskNet(nn.Module):
    """Parallel MaskNet: ``num_blocks`` :class:`MaskBlock` on x, concatenated, ``MLP(hidden)``, then
    Linear(-> out_features) unless the MLP already ends at that width. ``mask_width`` (None: x's
    width) narrows each mask's hidden layer: a block's mask costs ``2 * in * mask_width``
    multiply-adds per example instead of ``2 * in^2``.

    Example::

        net = MaskNet(16, 32, num_blocks=2, block_width=8, hidden=[32, 32])
        y = net(torch.randn(4, 16))  # [4, 32]
    """

    def __init__(
        self,
        in_features: int,
        out_features: int = 256,
        num_blocks: int = 2,
        block_width: int = 128,
        hidden: Sequence[int] = (256, 256),
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
        mask_width: Optional[int] = None,
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.out_features = out_features
        blocks = (MaskBlock(in_features, block_width, mask_width) for _ in range(num_blocks))
        self.blocks = nn.ModuleList(blocks)
        self.mlp = MLP(num_blocks * block_width, hidden, activation=activation, norm=norm, dropout=dropout)
        self.out = _to_width(self.mlp.out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(torch.cat([b(x) for b in self.blocks], dim=-1)))


class MLPInteraction(nn.Module):
    """``MLP(hidden)`` then Linear(-> out_features) unless the MLP already ends at that width.

    Example::

        y = MLPInteraction(16, 32, hidden=[64])(torch.randn(4, 16))  # [4, 32]
    """

    def __init__(
        self,
        in_features: int,
        out_features: int = 256,
        hidden: Sequence[int] = (256, 256),
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.out_features = out_features
        self.mlp = MLP(in_features, hidden, activation=activation, norm=norm, dropout=dropout)
        self.out = _to_width(self.mlp.out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(x))


class CrossShape(NamedTuple):
    """Layout of the codebook vectors: ``[B, num_pairs * num_hashes * dim]``, pair-major, hash-minor
    (``data.config.CrossConfig.feature_names``)."""

    num_pairs: int
    num_hashes: int
    dim: int

    @property
    def width(self) -> int:
        return self.num_pairs * self.num_hashes * self.dim


class HashedCrossCodebook(nn.Module):
    """MemoNet-style cross module over codewords looked up in a shared, sharded codebook table.

    Per field pair p: ``v_p = W_p concat(codeword_p,0, ..., codeword_p,H-1) + b_p`` (``H*E -> E``,
    one projection per pair), then ``Linear(concat(x, v_1..v_P) -> out_features)``. The codebook itself
    is an embedding table of the model's collection (the loader computes the hashed pair ids), so
    the planner places it and every group's modules share it; each module has its own projections.

    Example::

        shape = CrossShape(num_pairs=3, num_hashes=2, dim=8)
        module = HashedCrossCodebook(16, 32, cross=shape)
        y = module(torch.randn(4, 16), torch.randn(4, shape.width))  # [4, 32]
    """

    reads_cross = True

    def __init__(self, in_features: int, out_features: int = 256, cross: CrossShape | None = None) -> None:
        super().__init__()
        if cross is None:
            raise ValueError("memonet needs the cross codebook: set data.cross (fields and codebook table)")
        self.out_features = out_features
        self.shape = cross
        fan_in = cross.num_hashes * cross.dim
        self.pair_weight = nn.Parameter(torch.empty(cross.num_pairs, fan_in, cross.dim))
        self.pair_bias = nn.Parameter(torch.zeros(cross.num_pairs, cross.dim))
        bound = fan_in**-0.5  # nn.Linear's default uniform range, per pair
        nn.init.uniform_(self.pair_weight, -bound, bound)
        self.out = nn.Linear(in_features + cross.num_pairs * cross.dim, out_features)

    def forward(self, x: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        shape = self.shape
        # x.shape[0], not -1: a cross input of the wrong width fails here, not as a batch mix-up.
        codewords = cross.view(x.shape[0], shape.num_pairs, shape.num_hashes * shape.dim)
        pairs = torch.einsum("bpi,pio->bpo", codewords, self.pair_weight) + self.pair_bias
        return self.out(torch.cat([x, pairs.flatten(1)], dim=-1))


def _stacked_to_width(parts: Parts, in_features: int, out_features: int) -> Optional[StackedLinear]:
    """:func:`_to_width` stacked: None stands for the identity."""
    return None if in_features == out_features else StackedLinear(parts, in_features, out_features)


def _load_member(single: nn.Module, stacked: Optional[Stacked], index: int) -> None:
    """Fill ``single`` (a built counterpart) with member ``index`` of ``stacked``."""
    if stacked is not None:
        single.load_state_dict(stacked.member(index).state_dict())


class StackedGDCN(Stacked):
    """``n`` :class:`GDCN` on one x: per layer the cross and the gate matmuls of every instance are
    one kernel each.

    State-dict keys: ``cross.l.weight [n, in, in]``, ``cross.l.bias [n, in]``, ``gates.l.weight``,
    ``out.weight [n, out, in]``, ``out.bias`` (``.<part>`` appended with named parts); with ``rank``,
    ``cross.l.down.weight [n, rank, in]``, ``cross.l.up.weight [n, in, rank]``, ``cross.l.up.bias``
    and the same for ``gates.l`` (no bias).

    Example::

        gdcn = StackedGDCN(3, 16, 32, num_layers=2)
        y = gdcn(torch.randn(4, 16))  # [3, 4, 32]; y[i] == gdcn.member(i)(x)
    """

    def __init__(
        self,
        parts: Parts,
        in_features: int,
        out_features: int = 256,
        num_layers: int = 2,
        rank: Optional[int] = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        _check_rank(rank)
        self.num_members = count_members(parts)
        self.in_features, self.out_features, self.num_layers = in_features, out_features, num_layers
        self.rank = rank
        with torch.random.fork_rng(devices=[]):  # drawn below, member by member
            self.cross = nn.ModuleList(_stacked_square(parts, in_features, rank) for _ in range(num_layers))
            self.gates = nn.ModuleList(
                _stacked_square(parts, in_features, rank, bias=False) for _ in range(num_layers)
            )
            self.out = StackedLinear(parts, in_features, out_features)
        self.reset_parameters()

    def reset_member(self, index: int) -> None:
        for layer in [*self.cross, *self.gates, self.out]:  # GDCN's construction order
            layer.reset_member(index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, in] -> [n, B, out]``."""
        c = x
        for i, (w, u) in enumerate(zip(self.cross, self.gates, strict=True)):
            first = i == 0  # c is still x, the input of every instance
            c = x * w(c, shared_input=first) * torch.sigmoid(u(c, shared_input=first)) + c
        return self.out(c)

    def member(self, index: int) -> GDCN:
        single = build_single(self, GDCN, self.in_features, self.out_features, self.num_layers, self.rank)
        for target, source in zip(
            [*single.cross, *single.gates, single.out], [*self.cross, *self.gates, self.out], strict=True
        ):
            _load_member(target, source, index)
        return single


class StackedDCNv2(Stacked):
    """``n`` :class:`DCNv2` on one x. ``W_l`` per instance Xavier-normal, ``b_l`` zero (TorchRec's
    ``CrossNet``).

    State-dict keys: ``cross.l.weight [n, in, in]`` (``W_l``), ``cross.l.bias [n, in]``,
    ``out.weight``, ``out.bias``.

    Example::

        y = StackedDCNv2(3, 16, 32)(torch.randn(4, 16))  # [3, 4, 32]
    """

    def __init__(self, parts: Parts, in_features: int, out_features: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_members = count_members(parts)
        self.in_features, self.out_features, self.num_layers = in_features, out_features, num_layers
        with torch.random.fork_rng(devices=[]):
            self.cross = nn.ModuleList(
                StackedLinear(parts, in_features, in_features) for _ in range(num_layers)
            )
            self.out = StackedLinear(parts, in_features, out_features)
        self.reset_parameters()

    def reset_member(self, index: int) -> None:
        for layer in self.cross:  # CrossNet draws every kernel, then the biases are zero
            nn.init.xavier_normal_(member_slice(layer.weight, index))
            with torch.no_grad():
                member_slice(layer.bias, index).zero_()
        self.out.reset_member(index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, in] -> [n, B, out]``."""
        c = x
        for i, layer in enumerate(self.cross):
            c = x * layer(c, shared_input=i == 0) + c
        return self.out(c)

    def member(self, index: int) -> DCNv2:
        single = build_single(self, DCNv2, self.in_features, self.out_features, self.num_layers)
        for layer, source in enumerate(self.cross):
            copy_into(single.cross.kernels[layer], member_slice(source.weight, index))
            copy_into(single.cross.bias[layer], member_slice(source.bias, index).unsqueeze(1))
        _load_member(single.out, self.out, index)
        return single


class StackedMaskNet(Stacked):
    """``n`` :class:`MaskNet` on one x. The ``num_blocks`` blocks of every instance are stacked
    too: block b of instance i is sub-member ``i * num_blocks + b``, so each of the mask's two
    matmuls and the block projection is one kernel for all blocks of all instances.

    State-dict keys: ``mask_in.weight [n * blocks, mask_width, in]`` / ``.bias`` (W1, c1),
    ``mask_out.weight`` / ``.bias`` (W2, c2), ``hidden.weight [n * blocks, width, in]`` (W3),
    ``norm.weight`` / ``.bias [n * blocks, width]``, ``mlp.*`` (:class:`StackedMLP`), ``out.*``
    (absent when the MLP already ends at ``out_features``).

    Example::

        net = StackedMaskNet(3, 16, 32, num_blocks=2, block_width=8, hidden=[32])
        y = net(torch.randn(4, 16))  # [3, 4, 32]
    """

    def __init__(
        self,
        parts: Parts,
        in_features: int,
        out_features: int = 256,
        num_blocks: int = 2,
        block_width: int = 128,
        hidden: Sequence[int] = (256, 256),
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
        mask_width: Optional[int] = None,
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        _check_rank(mask_width, "mask_width")
        self.num_members = count_members(parts)
        self.in_features, self.out_features = in_features, out_features
        self.num_blocks, self.block_width = num_blocks, block_width
        self.options = dict(
            hidden=list(hidden), activation=activation, norm=norm, dropout=dropout, mask_width=mask_width
        )
        blocks = scale_parts(parts, num_blocks)
        hidden_width = mask_width or in_features
        with torch.random.fork_rng(devices=[]):
            self.mask_in = StackedLinear(blocks, in_features, hidden_width)
            self.mask_out = StackedLinear(blocks, hidden_width, in_features)
            self.hidden = StackedLinear(blocks, in_features, block_width, bias=False)  # the norm's bias
            self.norm = StackedLayerNorm(blocks, block_width)
            self.mlp = StackedMLP(parts, num_blocks * block_width, hidden, activation, norm, dropout)
            self.out = _stacked_to_width(parts, self.mlp.out_features, out_features)
        self.reset_parameters()

    def reset_member(self, index: int) -> None:
        for b in range(self.num_blocks):  # MaskNet's construction order: block by block, MLP, out
            block = index * self.num_blocks + b
            for layer in (self.mask_in, self.mask_out, self.hidden, self.norm):
                layer.reset_member(block)
        self.mlp.reset_member(index)
        if self.out is not None:
            self.out.reset_member(index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, in] -> [n, B, out]``."""
        mask = self.mask_out(torch.relu(self.mask_in(x, shared_input=True)))  # [n * blocks, B, in]
        blocks = torch.relu(self.norm(self.hidden(x * mask)))  # [n * blocks, B, width]
        # Per instance, its blocks side by side: [n, B, blocks * width], MaskNet's concatenation.
        width = self.num_blocks * self.block_width
        h = blocks.view(self.num_members, self.num_blocks, -1, self.block_width).transpose(1, 2)
        h = self.mlp(h.reshape(self.num_members, -1, width))
        return h if self.out is None else self.out(h)

    def member(self, index: int) -> MaskNet:
        single = build_single(
            self,
            MaskNet,
            self.in_features,
            self.out_features,
            self.num_blocks,
            self.block_width,
            **self.options,
        )
        for b, block in enumerate(single.blocks):
            sub = index * self.num_blocks + b
            _load_member(block.mask[0], self.mask_in, sub)
            _load_member(block.mask[2], self.mask_out, sub)
            _load_member(block.hidden, self.hidden, sub)
            _load_member(block.norm, self.norm, sub)
        _load_member(single.mlp, self.mlp, index)
        _load_member(single.out, self.out, index)
        return single


class StackedMLPInteraction(Stacked):
    """``n`` :class:`MLPInteraction` on one x.

    State-dict keys: ``mlp.*`` (:class:`StackedMLP`), ``out.*`` (absent when the MLP already ends
    at ``out_features``).

    Example::

        y = StackedMLPInteraction(3, 16, 32, hidden=[64])(torch.randn(4, 16))  # [3, 4, 32]
    """

    def __init__(
        self,
        parts: Parts,
        in_features: int,
        out_features: int = 256,
        hidden: Sequence[int] = (256, 256),
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_members = count_members(parts)
        self.in_features, self.out_features = in_features, out_features
        self.options = dict(hidden=list(hidden), activation=activation, norm=norm, dropout=dropout)
        with torch.random.fork_rng(devices=[]):
            self.mlp = StackedMLP(parts, in_features, hidden, activation, norm, dropout)
            self.out = _stacked_to_width(parts, self.mlp.out_features, out_features)
        self.reset_parameters()

    def reset_member(self, index: int) -> None:
        self.mlp.reset_member(index)
        if self.out is not None:
            self.out.reset_member(index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, in] -> [n, B, out]``."""
        h = self.mlp(x, shared_input=True)
        return h if self.out is None else self.out(h)

    def member(self, index: int) -> MLPInteraction:
        single = build_single(self, MLPInteraction, self.in_features, self.out_features, **self.options)
        _load_member(single.mlp, self.mlp, index)
        _load_member(single.out, self.out, index)
        return single


class StackedHashedCrossCodebook(Stacked):
    """``n`` :class:`HashedCrossCodebook` on one x and one set of codewords.

    Same function of the same parameters, evaluated in another order. An instance computes
    ``out(concat(x, v_1..v_P)) = W_x x + Σ_p W_p,p (C_p c_p + b_p) + b`` (``c_p`` pair p's
    codewords, ``C_p`` / ``b_p`` its projection, ``W_p,p`` the out layer's columns of ``v_p``).
    The products ``W_p,p C_p`` are composed first (weights only, ``[hashes * dim, out]`` per pair
    and instance, no batch axis), so the whole module is two GEMMs over the batch, ``x`` and the
    codewords against every instance's weights side by side: no per-pair activations
    ``[B, pairs, dim]`` are built, permuted or concatenated.

    State-dict keys: ``pair_weight [n, pairs, hashes * dim, dim]``, ``pair_bias [n, pairs, dim]``,
    ``out.weight [n, out, in + pairs * dim]`` (x's columns first), ``out.bias``.

    Example::

        shape = CrossShape(num_pairs=3, num_hashes=2, dim=8)
        stack = StackedHashedCrossCodebook(3, 16, 32, cross=shape)
        y = stack(torch.randn(4, 16), torch.randn(4, shape.width))  # [3, 4, 32]
    """

    reads_cross = True

    def __init__(
        self, parts: Parts, in_features: int, out_features: int = 256, cross: CrossShape | None = None
    ) -> None:
        super().__init__()
        if cross is None:
            raise ValueError("memonet needs the cross codebook: set data.cross (fields and codebook table)")
        self.num_members = count_members(parts)
        self.in_features, self.out_features, self.shape = in_features, out_features, cross
        fan_in = cross.num_hashes * cross.dim
        self.pair_weight = stacked_parameter(parts, (cross.num_pairs, fan_in, cross.dim))
        self.pair_bias = stacked_parameter(parts, (cross.num_pairs, cross.dim), fill=0.0)
        with torch.random.fork_rng(devices=[]):
            self.out = StackedLinear(parts, in_features + cross.num_pairs * cross.dim, out_features)
        self.reset_parameters()

    def reset_member(self, index: int) -> None:
        bound = (self.shape.num_hashes * self.shape.dim) ** -0.5  # as HashedCrossCodebook
        nn.init.uniform_(member_slice(self.pair_weight, index), -bound, bound)
        with torch.no_grad():
            member_slice(self.pair_bias, index).zero_()
        self.out.reset_member(index)

    def forward(self, x: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """``x [B, in]``, ``cross [B, CrossShape.width]`` ``-> [n, B, out]``."""
        n, out, shape = self.num_members, self.out_features, self.shape
        fan_in = shape.num_hashes * shape.dim
        weight = joined(self.out.weight)
        from_x = weight[:, :, : self.in_features]  # [n, out, in]
        from_pairs = weight[:, :, self.in_features :]  # [n, out, pairs * dim]
        # W_p,p C_p per pair: [n, pairs, hashes * dim, dim] @ [n, pairs, dim, out].
        per_pair = from_pairs.reshape(n, out, shape.num_pairs, shape.dim).permute(0, 2, 3, 1)
        composed = torch.matmul(joined(self.pair_weight), per_pair)  # [n, pairs, hashes * dim, out]
        # b + W_p b_p, the pair biases carried through the out layer.
        pair_bias = joined(self.pair_bias).reshape(n, 1, shape.num_pairs * shape.dim)
        bias = joined(self.out.bias) + torch.bmm(pair_bias, from_pairs.transpose(1, 2)).squeeze(1)
        # Rows of the codeword GEMM: pair-major, hash-minor, the layout of `cross` (CrossShape).
        codeword_weight = composed.permute(1, 2, 0, 3).reshape(shape.num_pairs * fan_in, n * out)
        # x.shape[0]: a cross input of the wrong width fails here, not as a batch mix-up.
        codewords = cross.view(x.shape[0], shape.num_pairs * fan_in)
        y = torch.addmm(bias.reshape(-1), x, from_x.reshape(n * out, self.in_features).t())
        y = torch.addmm(y, codewords, codeword_weight)
        return y.view(-1, n, out).transpose(0, 1).contiguous()  # see StackedLinear.forward

    def member(self, index: int) -> HashedCrossCodebook:
        single = build_single(
            self, HashedCrossCodebook, self.in_features, self.out_features, cross=self.shape
        )
        copy_into(single.pair_weight, member_slice(self.pair_weight, index))
        copy_into(single.pair_bias, member_slice(self.pair_bias, index))
        _load_member(single.out, self.out, index)
        return single


# name -> class(in_features, out_features, **method options); DTNConfig.methods lists the same names.
INTERACTIONS: Dict[str, Callable[..., nn.Module]] = {
    "gdcn": GDCN,
    "masknet": MaskNet,
    "dcnv2": DCNv2,
    "mlp": MLPInteraction,
    "memonet": HashedCrossCodebook,
}


def build_interaction(name: str, in_features: int, out_features: int, **options: object) -> nn.Module:
    """The FI module registered as ``name``; raises ``ValueError`` naming the known ones.

    Example::

        build_interaction("gdcn", 16, 32, num_layers=3)
    """
    if name not in INTERACTIONS:
        raise ValueError(f"unknown interaction method {name!r}; known: {sorted(INTERACTIONS)}")
    return INTERACTIONS[name](in_features, out_features, **options)


# name -> stacked class(parts, in_features, out_features, **method options); the same names and
# options as INTERACTIONS.
STACKED_INTERACTIONS: Dict[str, Callable[..., Stacked]] = {
    "gdcn": StackedGDCN,
    "masknet": StackedMaskNet,
    "dcnv2": StackedDCNv2,
    "mlp": StackedMLPInteraction,
    "memonet": StackedHashedCrossCodebook,
}


def build_stacked_interaction(
    name: str, parts: Parts, in_features: int, out_features: int, **options: object
) -> Stacked:
    """``parts`` instances of the FI method ``name`` as one stacked module; raises ``ValueError``
    naming the known methods.

    Example::

        build_stacked_interaction("gdcn", {"task": 2, "shared": 1}, 16, 32, num_layers=3)
    """
    if name not in STACKED_INTERACTIONS:
        raise ValueError(f"unknown interaction method {name!r}; known: {sorted(STACKED_INTERACTIONS)}")
    return STACKED_INTERACTIONS[name](parts, in_features, out_features, **options)
