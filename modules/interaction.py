"""Feature-interaction (FI) modules for DTN: each maps ``x [B, in_features] -> [B, out_features]``.

Methods (docs/MODELS.md, DTN section), registered by name in :data:`INTERACTIONS`:

- ``gdcn``: gated cross network, ``c_{l+1} = c_0 ⊙ (W_l c_l + b_l) ⊙ sigmoid(U_l c_l) + c_l``, then Linear.
- ``masknet``: parallel MaskNet, b blocks of instance-guided masks, concatenated, then an MLP.
- ``dcnv2``: DCN-v2 cross layers (``torchrec.modules.crossnet.CrossNet``),
  ``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l``, then Linear.
- ``mlp``: a plain MLP, then Linear.
- ``memonet``: MemoNet-style hashed cross codebook; reads the codebook's pooled codewords besides x
  (``forward(x, cross)``, marked by ``reads_cross = True``).
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Sequence

import torch
import torch.nn as nn
from torchrec.modules.crossnet import CrossNet
from towerrec.modules.mlp import MLP


def _to_width(in_features: int, out_features: int) -> nn.Module:
    """Linear to ``out_features``, or the identity when the widths already match."""
    return nn.Identity() if in_features == out_features else nn.Linear(in_features, out_features)


class GDCN(nn.Module):
    """Gated cross network (GDCN). The gate ``U_l`` has no bias, as in the formula.

    Example::

        gdcn = GDCN(16, 32, num_layers=2)
        y = gdcn(torch.randn(4, 16))  # [4, 32]
    """

    def __init__(self, in_features: int, out_features: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.out_features = out_features
        self.cross = nn.ModuleList(nn.Linear(in_features, in_features) for _ in range(num_layers))
        self.gates = nn.ModuleList(nn.Linear(in_features, in_features, bias=False) for _ in range(num_layers))
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

    The mask's hidden layer (W1) has the width of x.
    """

    def __init__(self, in_features: int, block_width: int = 128) -> None:
        super().__init__()
        self.mask = nn.Sequential(
            nn.Linear(in_features, in_features), nn.ReLU(), nn.Linear(in_features, in_features)
        )
        self.hidden = nn.Linear(in_features, block_width, bias=False)  # LayerNorm carries the bias
        self.norm = nn.LayerNorm(block_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.hidden(x * self.mask(x))))


class MaskNet(nn.Module):
    """Parallel MaskNet: ``num_blocks`` :class:`MaskBlock` on x, concatenated, ``MLP(hidden)``, then
    Linear(-> out_features) unless the MLP already ends at that width.

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
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.out_features = out_features
        self.blocks = nn.ModuleList(MaskBlock(in_features, block_width) for _ in range(num_blocks))
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
