"""The frozen sampling function: golden values, bucket formulas, batch-plan equivalence, statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qk_sniffer.sampling import (
    MASK64,
    SHARED_HEAD,
    BatchTokens,
    SamplerSpec,
    bucket_of,
    keep_probability,
    mix,
    mix_int,
    token_u,
)

# (seed, example_id, layer, head, kind, position) -> u, computed once from the formulas in config/README.md (capture)
# with a from-scratch implementation of the spec. Never edit these: they pin published data.
GOLDEN_U = [
    ((0, 0, 0, MASK64, 0, 0), 0.3165392873336249),
    ((0, 0, 0, MASK64, 1, 0), 0.10937234583034905),
    ((0, 1, 0, MASK64, 0, 5), 0.5796266221615898),
    ((0, 123456789, 3, MASK64, 1, 4095), 0.5347344098730347),
    ((7, 42, 11, 2, 0, 100), 0.552040340639114),
    ((7, 42, 11, 3, 0, 100), 0.9330139381522663),
    ((2**63, -1, 0, 0, 1, 1), 0.9391566281024464),
    ((1, 2**62 + 17, 31, MASK64, 0, 131071), 0.3597243311110647),
    ((0, 0, 0, 0, 0, 0), 0.7961956752947816),
    ((99, 5, 1, MASK64, 1, 7), 0.7408695892764073),
]


@pytest.mark.parametrize("args,expected", GOLDEN_U)
def test_golden_u(args, expected):
    assert token_u(*args) == expected


def test_mixer_is_splitmix64():
    # SplitMix64 seeded with 0 yields these first two outputs (published reference sequence)
    assert mix_int(0) == 0xE220A8397B1DCDAF
    assert mix_int(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    z = np.array([0, 1, 2**63, MASK64], dtype=np.uint64)
    assert [int(x) for x in mix(z)] == [mix_int(int(x)) for x in z]


def test_log_uniform_buckets():
    pos = np.arange(0, 70)
    # s = 5 -> m = 8, p0 = 3: positions 0..14 share bucket 3, then 15..30 -> 4, 31..62 -> 5
    b = bucket_of(pos, "log_uniform", 5)
    assert b[0] == 3 and b[14] == 3 and b[15] == 4 and b[30] == 4 and b[31] == 5 and b[62] == 5 and b[63] == 6
    # s = 1 -> m = 1, p0 = 0: bucket = floor(log2(position + 1))
    b1 = bucket_of(np.array([0, 1, 2, 3, 6, 7, 2**20 - 2, 2**20 - 1]), "log_uniform", 1)
    assert b1.tolist() == [0, 1, 1, 2, 2, 3, 19, 20]
    p = keep_probability(b, "log_uniform", 2.0, 5)
    assert p[0] == 2.0 / 8 and p[40] == 2.0 / 32
    assert keep_probability(np.array([0, 1]), "log_uniform", 4.0, 1).tolist() == [1.0, 1.0]


def test_uniform_and_all_buckets():
    pos = np.arange(0, 10)
    assert bucket_of(pos, "uniform", 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert keep_probability(bucket_of(pos, "uniform", 4), "uniform", 1.0, 4).tolist() == [0.25] * 10
    assert keep_probability(bucket_of(pos, "all", 4), "all", 1.0, 4).tolist() == [1.0] * 10
    assert keep_probability(np.array([0]), "uniform", 10.0, 4).tolist() == [1.0]


def _spec_selection(spec, example_ids, lengths, layer, head, kind):
    """Token set from the scalar reference, one token at a time."""
    out = set()
    for e, n in zip(example_ids, lengths):
        for pos in range(n):
            b = bucket_of(np.array([pos]), spec.type, spec.min_bucket_size)
            p = keep_probability(b, spec.type, spec.base_rate, spec.min_bucket_size)[0]
            if token_u(spec.seed, int(e), layer, head, kind, pos) < p:
                out.add((int(e), pos))
    return out


@pytest.mark.parametrize("stype", ["log_uniform", "uniform", "all"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_batch_plan_matches_scalar_reference(stype, padding):
    spec = SamplerSpec(type=stype, base_rate=3.0, seed=5, per_head=False, min_bucket_size=4)
    ids = np.array([10, 3, 77, 2**40])
    lengths = np.array([50, 7, 1, 33])
    width = lengths.max()
    offsets = width - lengths if padding == "left" else np.zeros_like(lengths)
    tokens = BatchTokens(ids, lengths, offsets, spec)
    for layer, kind in [(0, 0), (2, 1)]:
        sel = tokens.select(layer, SHARED_HEAD, kind)
        got = set(zip(sel.example_id.tolist(), sel.position.tolist()))
        assert got == _spec_selection(spec, ids, lengths, layer, SHARED_HEAD, kind)
        # batch indices point at the right tokens of the padded batch
        row_of = {int(e): i for i, e in enumerate(ids)}
        for e, pos, r, c in zip(sel.example_id, sel.position, sel.rows, sel.cols):
            assert r == row_of[int(e)] and c == pos + offsets[r]
        assert np.array_equal(sel.bucket, bucket_of(sel.position, stype, 4))


def test_per_head_selections_differ_and_shared_is_head_independent():
    spec = SamplerSpec(type="uniform", base_rate=8.0, seed=0, per_head=True, min_bucket_size=64)
    tokens = BatchTokens(np.array([1]), np.array([512]), np.array([0]), spec)
    a = set(tokens.select(0, 0, 0).position.tolist())
    b = set(tokens.select(0, 1, 0).position.tolist())
    assert a != b
    assert a == {p for (_, p) in _spec_selection(spec, [1], [512], 0, 0, 0)}


def test_per_bucket_counts_match_base_rate():
    """Over many long examples every full log bucket holds base_rate samples on average."""
    spec = SamplerSpec(type="log_uniform", base_rate=4.0, seed=0, min_bucket_size=16)
    n_ex, length = 400, 4096
    tokens = BatchTokens(np.arange(n_ex), np.full(n_ex, length), np.zeros(n_ex, dtype=np.int64), spec)
    sel = tokens.select(0, SHARED_HEAD, 0)
    counts = np.bincount(sel.bucket, minlength=13)
    for b in range(4, 12):  # buckets 4..11 are full (bucket 4 spans positions 0..30)
        width = (2 ** (b + 1) - 1) if b == 4 else 2**b
        p = min(1.0, 4.0 / 2**b)
        mean, sd = n_ex * width * p, math.sqrt(n_ex * width * p * (1 - p))
        assert abs(counts[b] - mean) <= 5 * sd + 1e-9, (b, counts[b], mean)
        if b > 4:
            assert abs(counts[b] / n_ex - 4.0) < 0.5
    # first bucket: positions 0..30 with p = 4/16 = 0.25 -> 7.75 per example
    assert abs(counts[4] / n_ex - 7.75) < 0.5
