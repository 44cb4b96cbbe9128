"""Fixed, vectorised 64-bit hashing of ids: the same output on every machine and numpy version.

Example::

    rows = hash_ids(np.array([7, -3, 2**62]), num_embeddings=1000)  # int64 in [0, 1000)
"""

from __future__ import annotations

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of each element: ``x + golden gamma`` through the splitmix64 finaliser.

    A bijection on 64-bit words (int64 inputs are read as their two's-complement bits), so
    distinct ids only collide after a modulo. Returns a new uint64 array.
    """
    z = np.asarray(x)
    z = z.view(np.uint64) if z.dtype == np.int64 else z.astype(np.uint64)
    with np.errstate(over="ignore"):  # wrapping arithmetic is the point
        z = z + _GAMMA
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return z


def hash_ids(ids: np.ndarray, num_embeddings: int) -> np.ndarray:
    """Map any int64 ids into ``[0, num_embeddings)`` (collisions accepted); returns int64."""
    return (mix64(ids) % np.uint64(num_embeddings)).astype(np.int64)


def hash_pairs(first: np.ndarray, second: np.ndarray, num_buckets: int, function: int) -> np.ndarray:
    """Bucket in ``[0, num_buckets)`` of each id pair ``(first[i], second[i])`` under hash function
    number ``function`` (different numbers give independent functions); returns int64.

    Order matters: ``(a, b)`` and ``(b, a)`` are different pairs.

    Example::

        hash_pairs(np.array([3, 3]), np.array([5, 6]), 100_000, function=0)  # two buckets
    """
    if np.shape(first) != np.shape(second):
        raise ValueError(f"hash_pairs: id arrays of shapes {np.shape(first)} and {np.shape(second)}")
    salt = mix64(np.array([function], np.int64))[0]
    with np.errstate(over="ignore"):
        inner = mix64(np.asarray(first, np.int64)) ^ salt
        mixed = mix64(inner ^ np.asarray(second, np.int64).view(np.uint64))
    return (mixed % np.uint64(num_buckets)).astype(np.int64)


def unit_uniform(x: np.ndarray) -> np.ndarray:
    """The top 53 bits of ``mix64(x)`` as float64 in ``[0, 1)``."""
    return (mix64(x) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
