"""CUDA checks (skipped without a GPU): CPU/GPU agreement and no synchronisation in the hot path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qk_sniffer.capture import Sniffer
from qk_sniffer.chunk.run import Capturer
from qk_sniffer.modeling import load_model, resolve_capture

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SEQS = [np.arange(5, 5 + n) % 300 + 5 for n in (70, 33, 9, 64)]


def _capture(cfg, device, padding_side="right"):
    model = load_model(cfg, torch.device(device))
    capturer = Capturer(model, resolve_capture(cfg, model), pad_id=0, padding_side=padding_side)
    batch = capturer.run_batch(SEQS, np.arange(len(SEQS)))
    batch.wait()
    capturer.close()
    return {(layer, kind): (plan, t.float().cpu()) for layer, kind, plan, t, _ in batch.items}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gpu_capture_matches_cpu(tiny_models, make_config, arch):
    cfg = make_config(model={"name": str(tiny_models(arch))}, capture={"min_bucket_size": 4})
    cpu = _capture(cfg, "cpu")
    gpu = _capture(cfg, "cuda", padding_side="left")
    assert cpu.keys() == gpu.keys()
    for key in cpu:
        (pc, tc), (pg, tg) = cpu[key], gpu[key]
        order_c = np.lexsort((pc.position, pc.example_id))
        order_g = np.lexsort((pg.position, pg.example_id))
        assert np.array_equal(pc.example_id[order_c], pg.example_id[order_g])
        assert np.array_equal(pc.position[order_c], pg.position[order_g])
        assert (tc[order_c] - tg[order_g]).abs().max().item() < 1e-4, key


def test_no_device_sync_in_capture_path(tiny_models, make_config, monkeypatch):
    """Planning uploads and the per-layer gathers never synchronise with the GPU."""
    cfg = make_config(model={"name": str(tiny_models("gemma3"))}, capture={"min_bucket_size": 4})
    model = load_model(cfg, torch.device("cuda"))
    capturer = Capturer(model, resolve_capture(cfg, model), pad_id=0)
    calls = []
    orig_gather, orig_begin, orig_end = Sniffer._gather, Sniffer.begin_batch, Sniffer.end_batch

    def strict(fn):
        def wrapper(*a, **k):
            torch.cuda.set_sync_debug_mode("error")
            try:
                calls.append(fn.__name__)
                return fn(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return wrapper

    monkeypatch.setattr(Sniffer, "_gather", strict(orig_gather))
    monkeypatch.setattr(Sniffer, "begin_batch", strict(orig_begin))
    monkeypatch.setattr(Sniffer, "end_batch", strict(orig_end))
    batch = capturer.run_batch(SEQS, np.arange(len(SEQS)))
    batch.wait()
    capturer.close()
    assert calls.count("_gather") == 8 and "begin_batch" in calls and "end_batch" in calls
    assert all(t.is_pinned() for *_, t, _ in batch.items)


def test_bf16_capture_runs(tiny_models, make_config):
    cfg = make_config(model={"name": str(tiny_models("qwen3")), "dtype": "bfloat16"},
                      capture={"vector_dtype": "float16", "sampler": {"type": "all"}})
    got = _capture(cfg, "cuda")
    plan, t = got[(0, "q")]
    assert plan.size == sum(len(s) for s in SEQS) and torch.isfinite(t).all()
