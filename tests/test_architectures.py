"""Capture across architectures, checked against an independent recomputation of q/k.

Every family is a tiny random-weight checkpoint of the real transformers class
(models/tiny/recipes.py). tests/reference_qk.py recomputes, from each attention module's input
hidden states and position embeddings, the queries and keys attention consumes (post-RoPE) and the
ones the rotary function receives (pre-RoPE), without transformers' attention interface.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AutoTokenizer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from qk_sniffer.capture import UnsupportedModelError
from qk_sniffer.chunk.run import Capturer
from qk_sniffer.config import ConfigError
from qk_sniffer.modeling import load_model, resolve_capture

from .reference_qk import load_reference, padded_batch, reference_qk, run_decoder, self_attention_modules, text_decoder

# every family here must be captured exactly (DiffLlama and Bloom have tests of their own)
FAMILIES = ["nanochat", "phi", "deepseek_v3", "llama4", "stablelm", "gemma2", "gpt_oss", "gpt2", "gpt_neox",
            "smollm3", "cohere", "glm4", "mllama", "mistral3"]

# all longer than every sliding window (4, 6) and Llama 4's attention chunk (8); lengths differ
TEXTS = [
    "The quick brown fox jumps over the lazy dog, again and again, until the dog wakes up.",
    "Return a new list containing all items from the iterable, in ascending order.",
    "Short text, but longer than any window.",
    "A longer text about attention: queries and keys meet in a dot product, scaled, masked and summed.",
    "Keys and values are cached; queries are not.",
]
EXAMPLE_IDS = np.arange(100, 100 + len(TEXTS))
TOL = 1e-5  # float32: |captured - reference| <= TOL * (1 + |reference|)


@functools.cache
def _reference_model(model_dir: str):
    """An uninstrumented copy of the checkpoint (its own class, default attention), loaded once."""
    return load_reference(model_dir)


def _config(make_config, model_dir, pre_rope=False, **capture):
    return make_config(model={"name": str(model_dir)},
                       capture={"capture_pre_rope": pre_rope, "sampler": {"type": "all"}, "min_bucket_size": 4, **capture})


def _capture(cfg, runs, padding_side="right"):
    """Load through qk_sniffer, run each (seqs, example_ids) batch; returns (model, spec, [CapturedBatch])."""
    tok = AutoTokenizer.from_pretrained(cfg["model"]["name"])
    model = load_model(cfg, torch.device("cpu"))
    spec = resolve_capture(cfg, model)
    capturer = Capturer(model, spec, pad_id=tok.pad_token_id, padding_side=padding_side)
    try:
        batches = [capturer.run_batch(seqs, ids) for seqs, ids in runs]
    finally:
        capturer.close()
    return model, spec, batches


def _groups(batch) -> dict:
    """(layer, kind, head) -> (example_id, position, vectors [N, D]); each group once."""
    out = {}
    for layer, kind, plan, tensor, _window in batch.items:
        t = tensor.float()
        if t.dim() == 2:  # per-head sampling: [N, D], one head per row
            heads = np.asarray(plan.row_head)
            parts = {h: (heads == h, t[torch.from_numpy(heads == h)]) for h in plan.heads}
        else:
            parts = {h: (np.ones(t.shape[0], bool), t[:, j]) for j, h in enumerate(plan.heads)}
        for h, (sel, vec) in parts.items():
            key = (int(layer), kind, int(h))
            assert key not in out, f"{key} captured more than once in one batch"
            out[key] = (plan.example_id[sel], plan.position[sel], vec)
    return out


def _keyed(batches) -> dict:
    """(layer, kind, head, example_id, position) -> vector over several batches; each key once."""
    out = {}
    for batch in batches:
        for (layer, kind, head), (eid, pos, vec) in _groups(batch).items():
            for e, p, v in zip(eid.tolist(), pos.tolist(), vec):
                key = (layer, kind, head, e, p)
                assert key not in out, f"{key} stored twice"
                out[key] = v
    return out


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got - want).abs() / (1 + want.abs())).max()) if want.numel() else 0.0


def _check_against_reference(batch, spec, ref, lengths, pre_rope, what):
    groups = _groups(batch)
    expected_keys = sorted((int(e), p) for e, n in zip(EXAMPLE_IDS, lengths) for p in range(n))
    want_groups = {(layer, kind, h) for layer in spec.layers for kind in ("q", "k")
                   for h in range(ref[layer].get(kind, pre_rope).shape[1])}
    assert set(groups) == want_groups, f"{what}: captured groups differ from every layer/kind/head"
    row_of = {int(e): i for i, e in enumerate(EXAMPLE_IDS)}
    for (layer, kind, head), (eid, pos, vec) in groups.items():
        states = ref[layer].get(kind, pre_rope)  # of the right-padded batch: column == position
        assert vec.shape[-1] == states.shape[-1], f"{what}: {layer}{kind}{head} vector length"
        assert sorted(zip(eid.tolist(), pos.tolist())) == expected_keys, f"{what}: keys of {layer}{kind}{head}"
        rows = torch.as_tensor([row_of[int(e)] for e in eid], dtype=torch.long)
        err = _rel_err(vec, states[rows, head, torch.as_tensor(pos, dtype=torch.long)])
        assert err <= TOL, f"{what}: layer {layer} {kind} head {head} differs from the reference ({err:.2e})"


# -- the reference itself -----------------------------------------------------------------------

_RECORDED: list = []


def _recording_attention(inner: str):
    def attend(module, query, key, value, attention_mask, **kwargs):
        _RECORDED.append((module, query.detach().clone(), key.detach().clone()))
        if inner == "eager":
            fn = sys.modules[type(module).__module__].eager_attention_forward
        else:
            fn = ALL_ATTENTION_FUNCTIONS[inner]
        return fn(module, query, key, value, attention_mask, **kwargs)

    return attend


@pytest.mark.parametrize("arch", [*FAMILIES, "diffllama"])
def test_reference_is_what_attention_receives(tiny_models, arch):
    """The reference's post-RoPE q/k equal, bit for bit, what the model hands its attention function."""
    model_dir = tiny_models(arch)
    tok = AutoTokenizer.from_pretrained(model_dir)
    *_, ids, mask, pos = padded_batch(tok, TEXTS, "left")
    ref = reference_qk(_reference_model(str(model_dir)), ids, mask, pos)
    inner = text_decoder(_reference_model(str(model_dir))).config._attn_implementation
    name = f"qk_reference_recorder_{inner}"
    AttentionInterface.register(name, _recording_attention(inner))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    recorded = load_reference(model_dir, attn_implementation=name)
    layer_of = {id(m): i for i, m in self_attention_modules(text_decoder(recorded)).items()}
    _RECORDED.clear()
    run_decoder(recorded, ids, mask, pos)
    calls: dict[int, int] = {}
    for module, q, k in _RECORDED:
        layer = layer_of[id(module)]
        calls[layer] = calls.get(layer, 0) + 1
        assert torch.equal(q, ref[layer].q) and torch.equal(k, ref[layer].k), (arch, layer)
    _RECORDED.clear()
    assert sorted(calls) == sorted(ref)
    # DiffLlama calls the attention function twice per layer (same q/k, two halves of v)
    assert set(calls.values()) == {2 if arch == "diffllama" else 1}
    # and the pre-RoPE reference is not the post-RoPE one where the layer rotates
    rotated = [layer for layer, r in ref.items() if not torch.equal(r.q_pre, r.q)]
    assert rotated if arch != "gpt2" else not rotated


# -- capture == reference -----------------------------------------------------------------------

@pytest.mark.parametrize("pre_rope", [False, True])
@pytest.mark.parametrize("arch", FAMILIES)
def test_captured_vectors_equal_reference(tiny_models, make_config, arch, pre_rope):
    model_dir = tiny_models(arch)
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs, lengths, _offs, ids, mask, pos = padded_batch(tok, TEXTS, "right")
    ref = reference_qk(_reference_model(str(model_dir)), ids, mask, pos)
    model, spec, (batch,) = _capture(_config(make_config, model_dir, pre_rope), [(seqs, EXAMPLE_IDS)])
    # every self-attention layer, and only those (Mllama's cross-attention layers have no q/k of the text)
    assert spec.layers == sorted(ref)
    _check_against_reference(batch, spec, ref, lengths, pre_rope, f"{arch} pre_rope={pre_rope}")


def test_deepseek_v3_dataset_vectors_have_the_mla_head_size(tiny_models, tmp_path):
    """MLA through sniff-chunk: stored q/k are qk_nope_head_dim + qk_rope_head_dim long, one key config per head.

    The config's head_dim is the rope part only; the one shared rotary key head is expanded to every head.
    """
    import pyarrow.parquet as pq
    from transformers import AutoConfig

    from .support.tiny_data import stage_chunks

    model_dir = tiny_models("deepseek_v3")
    c = AutoConfig.from_pretrained(model_dir)
    size = c.qk_nope_head_dim + c.qk_rope_head_dim
    assert c.head_dim != size  # the trap this test is about
    stage_chunks(tmp_path, model={"name": str(model_dir)}, dataset={"max_samples": 4},
                 capture={"layers": [0], "sampler": {"type": "all"}, "min_bucket_size": 4})
    files = sorted(tmp_path.glob("staging/chunk-0/data/tiny/*/data.parquet"))
    names = {f.parent.name for f in files}
    assert names == {f"l00h{h:02d}{kind}" for h in range(c.num_attention_heads) for kind in "qk"}
    for f in files:
        vectors = pq.read_table(f)["vector"]
        assert len(vectors) > 0 and {len(v) for v in vectors.to_pylist()} == {size}, f.parent.name


# -- padding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,pre_rope", [(a, False) for a in FAMILIES] + [("llama4", True)])
def test_padding_never_changes_stored_vectors(tiny_models, make_config, arch, pre_rope):
    """A batch of 5, left- or right-padded, stores the vectors each example gets alone."""
    model_dir = tiny_models(arch)
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs, *_ = padded_batch(tok, TEXTS, "right")
    cfg = _config(make_config, model_dir, pre_rope)
    *_, alone = _capture(cfg, [([s], [e]) for s, e in zip(seqs, EXAMPLE_IDS)])
    alone = _keyed(alone)
    for side in ("left", "right"):
        *_, (batch,) = _capture(cfg, [(seqs, EXAMPLE_IDS)], padding_side=side)
        together = _keyed([batch])
        assert together.keys() == alone.keys(), (arch, side)
        err = _rel_err(torch.stack([together[k] for k in alone]), torch.stack(list(alone.values())))
        assert err <= TOL, f"{arch} {side}-padded batch differs from single runs ({err:.2e})"


def test_llama4_left_padding_changes_transformers_own_queries(tiny_models):
    """Why Llama 4 is in the padding test: its NoPE-layer temperature uses the padded column, not the position.

    So the queries transformers itself computes for a left-padded row differ from the same example alone,
    and a capture that stored them as they are would fail test_padding_never_changes_stored_vectors.
    """
    model_dir = tiny_models("llama4")
    model = _reference_model(str(model_dir))
    nope = [i for i, m in self_attention_modules(text_decoder(model)).items() if not m.use_rope]
    assert nope and model.config.attn_temperature_tuning
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs, lengths, offs, ids, mask, pos = padded_batch(tok, TEXTS, "left")
    batched = reference_qk(model, ids, mask, pos)
    for row, (s, off) in enumerate(zip(seqs, offs)):
        one = reference_qk(model, s[None], np.ones((1, len(s)), int), np.arange(len(s))[None])
        for layer in sorted(batched):
            got, want = batched[layer].q[row, :, off:], one[layer].q[0]
            err = _rel_err(got, want)
            if layer < nope[0] or off == 0:
                assert err <= TOL, (layer, row, err)  # same inputs, same queries
            elif layer == nope[0]:
                assert err > 1e-3, (layer, row, err)  # the temperature of a shifted column


# -- vision-language checkpoints ------------------------------------------------------------------

def test_mllama_cross_attention_layers_are_not_captured(tiny_models, make_config):
    model_dir = tiny_models("mllama")
    cross = _reference_model(str(model_dir)).config.text_config.cross_attention_layers
    n_layers = _reference_model(str(model_dir)).config.text_config.num_hidden_layers
    assert cross
    cfg = _config(make_config, model_dir)
    model = load_model(cfg, torch.device("cpu"))
    assert resolve_capture(cfg, model).layers == [i for i in range(n_layers) if i not in cross]

    # asking for a cross-attention layer is a config error, raised before the forward of any real batch
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs, *_ = padded_batch(tok, TEXTS[:2], "right")
    for layers in ([cross[0]], [0, cross[0]]):
        cfg = _config(make_config, model_dir, layers=layers)
        model = load_model(cfg, torch.device("cpu"))
        batches = []
        with pytest.raises(ConfigError):
            spec = resolve_capture(cfg, model)
            capturer = Capturer(model, spec, pad_id=tok.pad_token_id)
            try:
                batches.append(capturer.run_batch(seqs, [0, 1]))
            finally:
                capturer.close()
        assert batches == []


def test_mistral3_loads_text_only(tiny_models, make_config):
    model_dir = tiny_models("mistral3")
    assert _reference_model(str(model_dir)).config.architectures == ["Mistral3ForConditionalGeneration"]
    model = load_model(_config(make_config, model_dir), torch.device("cpu"))
    names = [n for n, _ in model.named_parameters()]
    assert names and not [n for n in names if "vision" in n or "projector" in n]


# -- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("pre_rope", [False, True])
def test_diffllama_is_refused_or_captured_once(tiny_models, make_config, pre_rope):
    """DiffLlama calls the attention function twice per layer: refuse it, or store every key once."""
    model_dir = tiny_models("diffllama")
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs, lengths, _offs, ids, mask, pos = padded_batch(tok, TEXTS, "right")
    try:
        _model, spec, (batch,) = _capture(_config(make_config, model_dir, pre_rope), [(seqs, EXAMPLE_IDS)])
    except UnsupportedModelError as exc:
        assert "DiffLlama" in str(exc)
        return
    ref = reference_qk(_reference_model(str(model_dir)), ids, mask, pos)
    _keyed([batch])  # no key twice
    _check_against_reference(batch, spec, ref, lengths, pre_rope, f"diffllama pre_rope={pre_rope}")


def test_model_bypassing_attention_interface_is_refused(tiny_models, make_config, tmp_path):
    import transformers

    tok = AutoTokenizer.from_pretrained(tiny_models("gpt2"))
    bloom = transformers.AutoModelForCausalLM.from_config(
        transformers.BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4)
    )
    bloom.save_pretrained(tmp_path / "bloom")
    tok.save_pretrained(tmp_path / "bloom")
    cfg = _config(make_config, tmp_path / "bloom")
    seqs, *_ = padded_batch(tok, TEXTS[:2], "right")
    with pytest.raises(UnsupportedModelError, match="Bloom"):
        _capture(cfg, [(seqs, [0, 1])])
