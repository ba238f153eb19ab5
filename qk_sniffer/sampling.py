"""The frozen sampling function (config/README.md, capture: the sampler's formulas) and per-batch selection plans.

Do not change ``mix``, ``token_u``, ``bucket_of`` or ``keep_probability``: they decide which
tokens a rerun adds to a published dataset. ``tests/test_sampling.py`` pins golden values.

Whether a token is kept is a pure function of (seed, example_id, layer, head, kind, position),
so it is computed for a whole batch before the forward pass; the attention hook only gathers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MASK64 = (1 << 64) - 1
SHARED_HEAD = MASK64  # head value hashed when sampler.per_head is false
KIND_CODE = {"q": 0, "k": 1}

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_INV_2_53 = 2.0**-53
CAP_SALT = 0x6D61785F726F7773  # "max_rows": the cap's ranking hash, mixed apart from the keep decision


def mix_int(z: int) -> int:
    """Scalar reference of the mixer (pure Python integers, mod 2^64)."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def mix(z: np.ndarray) -> np.ndarray:
    """Vectorised mixer on uint64 arrays (numpy wraps uint64 arithmetic mod 2^64)."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        return z ^ (z >> _S31)


def prefix_hash(seed: int, example_id: int, layer: int, head: int, kind: int) -> int:
    """Hash state after mixing in everything but the position (scalar)."""
    h = mix_int(seed & MASK64)
    for v in (example_id, layer, head, kind):
        h = mix_int(h ^ (v & MASK64))
    return h


def token_u(seed: int, example_id: int, layer: int, head: int, kind: int, position: int) -> float:
    """The uniform number in [0, 1) for one token (scalar reference)."""
    h = mix_int(prefix_hash(seed, example_id, layer, head, kind) ^ (position & MASK64))
    return (h >> 11) * _INV_2_53


def u_array(prefixes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``u`` for tokens whose prefix hash (per token) and position are given."""
    h = mix(prefixes.astype(np.uint64) ^ positions.astype(np.uint64))
    return (h >> _S11).astype(np.float64) * _INV_2_53


def log_uniform_floor(min_bucket_size: int) -> int:
    """``p0 = log2 m`` with ``m = 2^ceil(log2 s)``."""
    s = int(min_bucket_size)
    return 0 if s <= 1 else (s - 1).bit_length()


def bucket_of(positions: np.ndarray, sampler_type: str, min_bucket_size: int) -> np.ndarray:
    pos = np.asarray(positions, dtype=np.int64)
    if sampler_type == "log_uniform":
        p0 = log_uniform_floor(min_bucket_size)
        # floor(log2(position + 1)), exact for integers below 2^53: frexp gives x = m * 2^e, m in [0.5, 1)
        _, exp = np.frexp((pos + 1).astype(np.float64))
        lg = exp.astype(np.int64) - 1
        return np.maximum(p0, lg)
    if sampler_type in ("uniform", "all"):
        return pos // int(min_bucket_size)
    raise ValueError(f"unknown sampler type {sampler_type!r}")


def keep_probability(buckets: np.ndarray, sampler_type: str, base_rate: float, min_bucket_size: int) -> np.ndarray:
    b = np.asarray(buckets, dtype=np.int64)
    if sampler_type == "log_uniform":
        return np.minimum(1.0, float(base_rate) / np.exp2(b.astype(np.float64)))
    if sampler_type == "uniform":
        return np.full(b.shape, min(1.0, float(base_rate) / int(min_bucket_size)))
    if sampler_type == "all":
        return np.ones(b.shape)
    raise ValueError(f"unknown sampler type {sampler_type!r}")


def cap_rank(prefixes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The rank of tokens under ``capture.max_rows_per_batch`` (smallest first): ``mix(h ^ CAP_SALT)`` where ``h`` is
    the token's sampling hash ``mix(prefix_hash(...) ^ position)``; applied after the frozen keep decision."""
    return mix(mix(prefixes.astype(np.uint64) ^ positions.astype(np.uint64)) ^ np.uint64(CAP_SALT))


def cap_per_row(kept: np.ndarray, rows: np.ndarray, rank: np.ndarray, max_rows: int) -> np.ndarray:
    """Of the kept token indices ``kept``, those among the ``max_rows`` smallest ranks of their batch row (an
    example: its tokens are always in one batch, so the cap is a pure function of the rows' keys); sorted."""
    order = kept[np.lexsort((rank[kept], rows[kept]))]  # by example, then rank (stable: ties keep position order)
    r = rows[order]
    within = np.arange(len(order)) - np.searchsorted(r, r, side="left")
    return np.sort(order[within < max_rows])


@dataclass(frozen=True)
class SamplerSpec:
    type: str = "log_uniform"
    base_rate: float = 1.0
    seed: int = 0
    per_head: bool = False
    min_bucket_size: int = 128
    max_rows: int | None = None  # capture.max_rows_per_batch: rows kept per (example, layer, head, kind)

    @classmethod
    def from_config(cls, cfg: dict) -> SamplerSpec:
        s = cfg["capture"]["sampler"]
        return cls(
            type=s["type"],
            base_rate=float(s["base_rate"]),
            seed=int(s["seed"]),
            per_head=bool(s["per_head"]),
            min_bucket_size=int(cfg["capture"]["min_bucket_size"]),
            max_rows=cfg["capture"].get("max_rows_per_batch"),
        )

    def expected_rate(self, position: int) -> float:
        b = bucket_of(np.array([position]), self.type, self.min_bucket_size)
        return float(keep_probability(b, self.type, self.base_rate, self.min_bucket_size)[0])


@dataclass
class Selection:
    """Tokens kept for one (layer, kind, head group) in one batch.

    ``rows``/``cols`` index the batch tensor (batch row, sequence index); ``example_id``,
    ``position`` and ``bucket`` are the per-row metadata written to Parquet.
    """

    rows: np.ndarray
    cols: np.ndarray
    example_id: np.ndarray
    position: np.ndarray
    bucket: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.shape[0])


class BatchTokens:
    """Flattened (unpadded) token coordinates of one batch, reused by every selection."""

    def __init__(self, example_ids: np.ndarray, lengths: np.ndarray, offsets: np.ndarray, spec: SamplerSpec):
        self.example_ids = np.asarray(example_ids, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        total = int(self.lengths.sum())
        self.row = np.repeat(np.arange(len(self.lengths), dtype=np.int64), self.lengths)
        starts = np.cumsum(self.lengths) - self.lengths
        self.position = np.arange(total, dtype=np.int64) - np.repeat(starts, self.lengths)
        self.col = self.position + np.repeat(self.offsets, self.lengths)
        self.bucket = bucket_of(self.position, spec.type, spec.min_bucket_size)
        self.p = keep_probability(self.bucket, spec.type, spec.base_rate, spec.min_bucket_size)
        self.all_kept = bool(np.all(self.p >= 1.0))
        self.spec = spec

    def select(self, layer: int, head: int, kind: int) -> Selection:
        spec = self.spec
        if self.all_kept and not spec.max_rows:
            keep = slice(None)
        else:
            prefixes = np.repeat(np.fromiter(
                (prefix_hash(spec.seed, int(e), layer, head, kind) for e in self.example_ids),
                dtype=np.uint64,
                count=len(self.example_ids),
            ), self.lengths)
            keep = np.ones(len(self.position), bool) if self.all_kept else u_array(prefixes, self.position) < self.p
            if spec.max_rows:
                keep = cap_per_row(np.flatnonzero(keep), self.row, cap_rank(prefixes, self.position), spec.max_rows)
        return Selection(
            rows=self.row[keep],
            cols=self.col[keep],
            example_id=self.example_ids[self.row[keep]],
            position=self.position[keep],
            bucket=self.bucket[keep],
        )


def expected_kept(length: int, spec: SamplerSpec) -> float:
    """Expected number of kept tokens for one sequence of ``length`` tokens."""
    buckets = bucket_of(np.arange(length), spec.type, spec.min_bucket_size)
    return float(keep_probability(buckets, spec.type, spec.base_rate, spec.min_bucket_size).sum())
