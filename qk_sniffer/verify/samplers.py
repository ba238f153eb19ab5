"""The samplers a split's rows are checked against, and the frozen sampler's decision for many rows at once.

The sampler of a split is the one recorded in ``final/README.md`` (``qk_sniffer.splits.<split>.sampling``,
plus ``previous_sampling`` when rows were appended with other settings), else ``final/.merged.json``,
else the config passed in (for its own split). A record that is unusable is a problem.
"""

from __future__ import annotations

import numpy as np

from ..config import sampling_settings, split_name
from ..legacy import is_original_sampling
from ..sampling import KIND_CODE, MASK64, SHARED_HEAD, SamplerSpec, mix, mix_int, u_array
from .context import VerifyContext

ORIGINAL_ROWS = "it holds rows migrated from the original qk-sniffer tool, whose sampler was not recorded"


def sampler_u(spec: SamplerSpec, example_id: np.ndarray, layer: int, head: int, kind: str,
              position: np.ndarray) -> np.ndarray:
    """``token_u`` (sampling.py) for many rows of one config at once, composed from the frozen mixer."""
    ex = np.ascontiguousarray(example_id, dtype=np.int64).view(np.uint64)
    h = mix(np.full(ex.shape, mix_int(int(spec.seed) & MASK64), dtype=np.uint64) ^ ex)
    hv = head if spec.per_head else SHARED_HEAD
    for v in (layer, hv, KIND_CODE[kind]):
        h = mix(h ^ np.uint64(int(v) & MASK64))
    return u_array(h, np.ascontiguousarray(position, dtype=np.int64).view(np.uint64))


def spec_of_record(rec: dict) -> SamplerSpec:
    """The sampler a recorded ``sampling`` mapping describes; ValueError says what makes it unusable."""
    missing = [k for k in ("type", "base_rate", "seed", "min_bucket_size") if k not in rec]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    spec = SamplerSpec(type=str(rec["type"]), base_rate=float(rec["base_rate"]), seed=int(rec["seed"]),
                       per_head=bool(rec.get("per_head", False)), min_bucket_size=int(rec["min_bucket_size"]))
    if spec.type not in ("log_uniform", "uniform", "all") or spec.min_bucket_size < 1:
        raise ValueError(f"has type {spec.type!r} and min_bucket_size {spec.min_bucket_size}")
    return spec


def describe_spec(spec: SamplerSpec) -> str:
    """A sampler's settings as a problem line quotes them."""
    return (f"{spec.type}, base_rate {spec.base_rate:g}, seed {spec.seed}, per_head {spec.per_head}, "
            f"min_bucket_size {spec.min_bucket_size}")


def _add_specs(ctx, specs: list, recs: list, split: str, where, fix: str) -> None:
    """The sampler of each record in ``recs`` appended to ``specs``; a record that names none is a problem of
    ``where``, fixed by ``fix``."""
    for rec in recs:
        try:
            specs.append(spec_of_record(rec if isinstance(rec, dict) else {}))
        except (ValueError, TypeError) as exc:
            ctx.problem(where, f"the sampling recorded for split {split!r} ({rec!r}) {exc}; {fix}")


def split_samplers(ctx: VerifyContext, split: str) -> tuple[list[SamplerSpec] | None, str]:
    """Every sampler recorded for ``split`` (rows must fit one of them), and where they came from."""
    specs: list[SamplerSpec] = []
    sources: list[str] = []
    readme = ctx.final / "README.md"
    meta = ctx.split_meta(split)
    if isinstance(meta, dict) and meta.get("sampling"):
        recs = [meta["sampling"], *(meta.get("previous_sampling") or [])]
        if any(is_original_sampling(rec) for rec in recs):
            return None, ORIGINAL_ROWS
        _add_specs(ctx, specs, recs, split, readme, "render the README again")
        sources.append("final/README.md")
    merged = ctx.merged if ctx.merged is not None and ctx.merged.split == split else None
    if merged is not None and merged.sampling:
        mixed = merged.mixed_sampling
        if mixed and not specs:
            return None, (".merged.json records that rows were appended with other sampling settings but "
                          "final/README.md records no history of them")
        recs = [merged.sampling] + ([mixed.get("recorded")] if mixed else [])
        if any(is_original_sampling(rec) for rec in recs):
            return None, ORIGINAL_ROWS
        _add_specs(ctx, specs, recs, split, ctx.final / ".merged.json", "rerun merge")
        sources.append("final/.merged.json")
    if not sources and ctx.cfg is not None:
        if split_name(ctx.cfg) == split:
            specs.append(spec_of_record(sampling_settings(ctx.cfg)))
            sources.append("the config")
    if not sources:
        return None, "neither final/README.md nor final/.merged.json records its sampler (and no config for it " \
                     "was given)"
    return list(dict.fromkeys(specs)), " and ".join(sources)
