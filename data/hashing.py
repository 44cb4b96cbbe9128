"""Fixed, vectorised 64-bit hashing of ids: the same output on every machine and numpy version.

Example::

    rows = hash_ids(np.array([7, -3, 2**62]), num_embeddings=1000)  # int64 in [0, 1000)
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

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
    return _bucket_of_pair(mix64(np.asarray(first, np.int64)), second, num_buckets, function)


def cross_ids(
    raw: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]], num_hashes: int, num_buckets: int
) -> list[np.ndarray]:
    """The codebook ids of ``data.cross``: for each pair ``(a, b)``, then each hash function k,
    ``hash_pairs(raw[a], raw[b], num_buckets, k)`` (``CrossConfig.feature_names`` order). Each
    field is mixed once, however many pairs it starts.

    Example::

        ids = cross_ids({"u": np.array([1, 2]), "c": np.array([7, 7])}, [("u", "c")], 2, 1000)
        # [hash_pairs(u, c, 1000, 0), hash_pairs(u, c, 1000, 1)]
    """
    mixed = {a: mix64(np.asarray(raw[a], np.int64)) for a, _ in pairs}
    return [_bucket_of_pair(mixed[a], raw[b], num_buckets, k) for a, b in pairs for k in range(num_hashes)]


@functools.lru_cache(maxsize=None)
def _salt(function: int) -> np.uint64:
    return mix64(np.array([function], np.int64))[0]


def _bucket_of_pair(
    mixed_first: np.ndarray, second: np.ndarray, num_buckets: int, function: int
) -> np.ndarray:
    """``hash_pairs`` with ``mix64(first)`` given."""
    with np.errstate(over="ignore"):
        mixed = mix64(mixed_first ^ _salt(function) ^ np.asarray(second, np.int64).view(np.uint64))
    return (mixed % np.uint64(num_buckets)).astype(np.int64)


def unit_uniform(x: np.ndarray) -> np.ndarray:
    """The top 53 bits of ``mix64(x)`` as float64 in ``[0, 1)``."""
    return (mix64(x) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# Salt of the string hash, so that a string's hash is unrelated to hash_ids of any integer.
_STRING_SALT = np.uint64(0x5F3759DF2C1B3C6D)
# _LOW_BYTES[k]: the mask of the low k bytes of a 64-bit word.
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [2**64 - 1], np.uint64)


def hash_strings(offsets: np.ndarray, data: np.ndarray | bytes) -> np.ndarray:
    """A fixed 64-bit hash of each byte string ``data[offsets[i]:offsets[i+1]]`` (Arrow's
    string/binary layout; ``offsets`` int32 or int64, absolute in ``data``); returns uint64.

    Definition (byte order fixed, so the same on every machine): with ``n`` the string's length
    and ``w_0 .. w_{m-1}`` its bytes read as little-endian 64-bit words (the last one padded with
    zero bytes), ``h = mix64(n ^ SALT)``, then ``h = mix64(h ^ w_k)`` for each word in turn.
    Vectorised over all strings at once: one pass per 8-byte word of the longest string, over
    the strings that are that long.

    Example::

        a = pa.array(["Private", "Self-emp"])
        offsets = np.frombuffer(a.buffers()[1], np.int32)[: len(a) + 1]
        hash_strings(offsets, np.frombuffer(a.buffers()[2], np.uint8))  # two uint64
    """
    offsets = np.asarray(offsets, np.int64)
    if len(offsets) < 2:
        return np.zeros(0, np.uint64)
    raw = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data, np.uint8)
    begin, end = int(offsets[0]), int(offsets[-1])  # a slice of an array uses part of the buffer
    starts, lengths = offsets[:-1] - begin, np.diff(offsets)
    # 8 zero bytes after the last string make every 8-byte read in bounds.
    padded = np.zeros(end - begin + 8, np.uint8)
    padded[: end - begin] = raw[begin:end]
    end -= begin
    # Every byte position as the start of a (possibly unaligned) little-endian 64-bit word.
    words = np.ndarray((end + 1,), np.dtype("<u8"), padded, 0, (1,))
    h = mix64(lengths.view(np.uint64) ^ _STRING_SALT)
    if len(lengths) and lengths.min() > 0:  # the usual first word: every row, no gather
        h = mix64(h ^ (words[starts] & _LOW_BYTES[np.minimum(lengths, 8)]))
        k, rows = 1, np.flatnonzero(lengths > 8)
    else:
        k, rows = 0, np.flatnonzero(lengths > 0)
    while len(rows):
        remaining = lengths[rows] - 8 * k
        word = words[starts[rows] + 8 * k] & _LOW_BYTES[np.minimum(remaining, 8)]
        h[rows] = mix64(h[rows] ^ word)
        rows = rows[remaining > 8]
        k += 1
    return h
