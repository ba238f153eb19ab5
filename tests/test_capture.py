"""Captured vectors equal the model's own queries/keys computed by an independent path.

The reference runs an uninstrumented copy of the model (plain sdpa), records each attention
layer's input hidden states and RoPE tables, and recomputes q/k from the projection weights
in the test: projection -> per-head view -> q_norm/k_norm -> rotate-half RoPE.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qk_sniffer.capture import Sniffer
from qk_sniffer.chunk.run import Capturer
from qk_sniffer.modeling import attention_modules, backbone_of, layer_windows, load_model, resolve_capture

from .reference_qk import padded_batch
from .support.tiny_data import TINY_LLAMA

TEXTS = [
    "The quick brown fox jumps over the lazy dog, again and again, until the dog wakes up.",
    "Short one.",
    "Return a new list containing all items from the iterable in ascending order, stably sorted.",
    "x",
    "A longer text about attention: queries and keys meet in a dot product, scaled and masked.",
]


# the windows the tiny recipes give each layer (models/tiny/recipes.py)
EXPECTED_WINDOWS = {"gemma3": [4, None, 4, None], "mistral": [6, 6, 6]}


def _rotate_half(x):
    a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-b, a), dim=-1)


def reference_qk(model_dir, ids, mask, pos, pre_rope):
    """layer -> (q [B,H,S,D], k [B,KV,S,D]) from an uninstrumented sdpa copy of the model."""
    ref = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    ref.eval()
    back = backbone_of(ref)
    mods = attention_modules(back)
    seen = {}

    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        seen[module.layer_idx] = (x, cos, sin, module)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in mods.values()]
    with torch.no_grad():
        back(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), position_ids=torch.as_tensor(pos))
    for h in handles:
        h.remove()
    out = {}
    with torch.no_grad():
        for layer, (x, cos, sin, m) in seen.items():
            d = m.head_dim
            q = m.q_proj(x)
            k = m.k_proj(x)
            if isinstance(getattr(m, "q_norm", None), torch.nn.Module) and m.q_norm.weight.numel() != d:
                q, k = m.q_norm(q), m.k_norm(k)  # Olmo 2 style: norm over the whole projection
            q = q.view(*x.shape[:-1], -1, d)
            k = k.view(*x.shape[:-1], -1, d)
            if isinstance(getattr(m, "q_norm", None), torch.nn.Module) and m.q_norm.weight.numel() == d:
                q, k = m.q_norm(q), m.k_norm(k)  # per-head norm over head_dim (layout independent)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            if not pre_rope:
                c, s = cos.unsqueeze(1), sin.unsqueeze(1)
                q = q * c + _rotate_half(q) * s
                k = k * c + _rotate_half(k) * s
            out[layer] = (q, k)
    return out, ref


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "mistral", "olmo2"])
@pytest.mark.parametrize("pre_rope", [False, True])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_captured_vectors_equal_independent_qk(tiny_models, make_config, arch, pre_rope, padding_side):
    model_dir = tiny_models(arch)
    cfg = make_config(
        model={"name": str(model_dir)},
        capture={"capture_pre_rope": pre_rope, "sampler": {"type": "all"}, "min_bucket_size": 4},
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs, lengths, offs, ids, mask, pos = padded_batch(tok, TEXTS, padding_side)
    model = load_model(cfg, torch.device("cpu"))
    spec = resolve_capture(cfg, model)
    capturer = Capturer(model, spec, pad_id=tok.pad_token_id, padding_side=padding_side)
    example_ids = np.arange(100, 100 + len(seqs))
    batch = capturer.run_batch(seqs, example_ids)
    capturer.close()
    ref, ref_model = reference_qk(model_dir, ids, mask, pos, pre_rope)
    windows = layer_windows(model.config)
    n_checked = 0
    for layer, kind, plan, tensor, window in batch.items:
        q_ref, k_ref = ref[layer]
        states = q_ref if kind == "q" else k_ref
        assert window == windows[layer] == EXPECTED_WINDOWS.get(arch, [None] * 4)[layer]
        # every token of every example, padding excluded
        assert plan.size == int(lengths.sum())
        assert sorted(zip(plan.example_id.tolist(), plan.position.tolist())) == sorted(
            (int(e), p) for e, n in zip(example_ids, lengths) for p in range(n)
        )
        # the reference ran the batch padded on ``padding_side``; rows are matched by their keys
        rows = plan.example_id - example_ids[0]
        cols = offs[rows] + plan.position
        expect = states[rows[:, None], np.asarray(plan.heads)[None, :], cols[:, None]]
        diff = (tensor - expect).abs().max().item()
        # 1e-5: the reference's padded batch (with a mask) and the capture's right-padded, unmasked batch take
        # different attention kernels, whose float32 rounding differs after the first layer (~2e-6 seen)
        assert diff <= 1e-5, (arch, layer, kind, diff)
        n_checked += 1
    n_layers = model.config.get_text_config().num_hidden_layers
    assert n_checked == 2 * n_layers
    assert len(spec.key_heads) == model.config.get_text_config().num_key_value_heads


def test_gemma3_window_shorter_than_sequence_changes_later_layers(tiny_models, make_config):
    """The mask function is registered: without it sliding windows would be silently ignored."""
    model_dir = tiny_models("gemma3")
    cfg = make_config(
        model={"name": str(model_dir)},
        capture={"layers": [3], "capture_queries": True, "capture_keys": False, "capture_pre_rope": True,
                 "sampler": {"type": "all"}},
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs, lengths, offs, ids, mask, pos = padded_batch(tok, TEXTS[:1], "right")
    assert lengths[0] > 4 * 3  # window of 4, sequence much longer
    model = load_model(cfg, torch.device("cpu"))
    capturer = Capturer(model, resolve_capture(cfg, model), pad_id=tok.pad_token_id)
    item = capturer.run_batch(seqs, [0]).items[0]
    plan, got = item[2], item[3]
    capturer.close()
    # a reference that ignores the window (full causal everywhere) must differ at layer 3
    cfg_full = copy.deepcopy(AutoModelForCausalLM.from_pretrained(model_dir).config)
    cfg_full.layer_types = ["full_attention"] * cfg_full.num_hidden_layers
    full = AutoModelForCausalLM.from_pretrained(model_dir, config=cfg_full, attn_implementation="sdpa")
    seen = {}
    m3 = attention_modules(backbone_of(full))[3]

    def grab(module, args, kwargs):
        seen["x"] = kwargs["hidden_states"]

    m3.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        backbone_of(full)(input_ids=torch.as_tensor(ids))
    with torch.no_grad():
        q_full = m3.q_norm(m3.q_proj(seen["x"]).view(1, ids.shape[1], -1, 16))[0]  # [S, H, D]
    expect_full = q_full[plan.host_cols]
    # the first token sees only itself either way (and RoPE is the identity there); later tokens
    # must differ because layers 0 and 2 lose their window of 4 in the reference
    early = plan.host_cols == 0
    assert torch.allclose(got[early], expect_full[early], atol=1e-5)
    late = plan.host_cols >= 8
    assert (got[late] - expect_full[late]).abs().amax(dim=(1, 2)).min() > 1e-3


def test_early_exit_runs_only_needed_layers(make_config):
    cfg = make_config(capture={"layers": [1]})
    model = load_model(cfg, torch.device("cpu"))
    spec = resolve_capture(cfg, model)
    calls = []
    mods = attention_modules(backbone_of(model))
    for i, m in mods.items():
        m.register_forward_pre_hook(lambda mod, args, i=i: calls.append(i))
    norm_calls = []
    backbone_of(model).norm.register_forward_hook(lambda *a: norm_calls.append(1))
    capturer = Capturer(model, spec, pad_id=0)
    batch = capturer.run_batch([np.arange(5, 30)], [0])
    capturer.close()
    assert calls == [0, 1]
    assert norm_calls == []
    assert {(layer, kind) for layer, kind, *_ in batch.items} == {(1, "q"), (1, "k")}


def test_hand_instrumented_api(make_config):
    """The seed's extension API: an attention forward that calls sniffer.capture itself."""
    from qk_sniffer import compute_positions, get_active_sniffer, set_active_example_ids

    cfg = make_config(capture={"sampler": {"type": "all"}, "layers": [0]})
    model = load_model(cfg, torch.device("cpu"))
    spec = resolve_capture(cfg, model)
    sniffer = Sniffer(spec)
    with sniffer:
        set_active_example_ids([7, 8])
        q = torch.randn(2, 4, 6, 16)
        k = torch.randn(2, 2, 6, 16)
        positions = compute_positions(2, 6, "cpu")
        assert positions.shape == (2, 6) and positions[1, 5] == 5
        get_active_sniffer().capture(0, q, k, positions, None)
        batch = sniffer.end_batch()
    assert get_active_sniffer() is None
    items = {kind: (plan, t) for _, kind, plan, t, _ in batch.items}
    plan, t = items["q"]
    assert plan.size == 12 and torch.equal(t, q[plan.rows[:, None], plan.head_index[None, :], plan.cols[:, None]])
    assert set(plan.example_id.tolist()) == {7, 8}
    assert items["k"][1].shape == (12, 2, 16)


def test_model_without_attention_interface_gets_a_clear_error(tmp_path, make_config):
    import transformers

    from qk_sniffer.capture import UnsupportedModelError

    bloom = transformers.AutoModelForCausalLM.from_config(
        transformers.BloomConfig(vocab_size=600, hidden_size=32, n_layer=2, n_head=4)
    )
    bloom.save_pretrained(tmp_path / "bloom")
    cfg = make_config(model={"name": str(tmp_path / "bloom")})
    model = load_model(cfg, torch.device("cpu"))  # the probe forward, not a class flag, decides
    with pytest.raises(UnsupportedModelError, match=r"BloomForCausalLM does not use transformers' attention interface.*"
                       r"models/bloom/modeling_bloom.py"):
        resolve_capture(cfg, model)


def test_patched_modeling_module_is_used(tmp_path):
    """patch_modeling_modules aliases models/<name>/modeling_<name>.py into transformers."""
    import importlib
    import sys

    import transformers.models.llama.modeling_llama as upstream

    import qk_sniffer.modeling as modeling
    from qk_sniffer import patch_modeling_modules

    src = open(upstream.__file__, encoding="utf-8").read()
    src = src.replace("from ...", "from transformers.").replace("from ..", "from transformers.models.")
    src += "\nPATCHED_BY_TEST = True\n"
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "modeling_llama.py").write_text(src)
    import transformers.models.llama as llama_pkg

    saved = sys.modules["transformers.models.llama.modeling_llama"]
    saved_attrs = {a: getattr(llama_pkg, a) for a in ("modeling_llama", "LlamaModel", "LlamaForCausalLM", "LlamaPreTrainedModel")}
    try:
        assert patch_modeling_modules(tmp_path) == ["llama"]
        mod = importlib.import_module("transformers.models.llama.modeling_llama")
        assert getattr(mod, "PATCHED_BY_TEST", False)
        import transformers

        assert transformers.AutoModelForCausalLM._model_mapping[transformers.LlamaConfig].__module__ == mod.__name__
        assert modeling.has_adapter("no_such_family") is False
    finally:
        sys.modules["transformers.models.llama.modeling_llama"] = saved
        for a, v in saved_attrs.items():
            setattr(llama_pkg, a, v)
        import transformers

        transformers.AutoModelForCausalLM.register(transformers.LlamaConfig, upstream.LlamaForCausalLM, exist_ok=True)
        transformers.AutoModel.register(transformers.LlamaConfig, upstream.LlamaModel, exist_ok=True)


def test_attention_default_is_what_the_model_supports(tmp_path, make_config):
    """Unset, the implementation is what transformers would pick; a choice the model cannot run names the key."""
    import transformers

    from qk_sniffer.config import ConfigError

    gemma2 = transformers.AutoModelForCausalLM.from_config(transformers.Gemma2Config(
        vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4))
    gemma2.save_pretrained(tmp_path / "gemma2")
    model = load_model(make_config(model={"name": str(tmp_path / "gemma2")}), torch.device("cpu"))
    assert model.qk_sniffer_attention == "eager"  # sdpa would drop Gemma 2's softcapping
    assert model.config._attn_implementation == "qk_sniffer_eager"
    with pytest.raises(ConfigError, match=r"model.attn_implementation: 'sdpa' is not supported by Gemma2ForCausalLM.*eager"):
        load_model(make_config(model={"name": str(tmp_path / "gemma2"), "attn_implementation": "sdpa"}), torch.device("cpu"))
    llama = load_model(make_config(), torch.device("cpu"))
    assert llama.qk_sniffer_attention == "sdpa"


def test_load_with_missing_weights_stops(tmp_path, make_config):
    """A checkpoint that does not hold every weight of the class is never run with random weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qk_sniffer.capture import UnsupportedModelError

    shutil.copytree(TINY_LLAMA, tmp_path / "llama")
    weights = tmp_path / "llama" / "model.safetensors"
    state = load_file(weights)
    dropped = sorted(k for k in state if "layers.1.self_attn.k_proj" in k)
    save_file({k: v for k, v in state.items() if k not in dropped}, weights, metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match=r"left 1 weight\(s\) missing.*layers.1.self_attn.k_proj"):
        load_model(make_config(model={"name": str(tmp_path / "llama")}), torch.device("cpu"))


def test_pre_rope_recipe_is_proven_on_the_first_batch(make_config):
    """A recipe that does not hold on the real tensors stops the run instead of storing a guess."""
    import dataclasses

    from qk_sniffer.capture import UnsupportedModelError

    cfg = make_config(capture={"capture_pre_rope": True, "sampler": {"type": "all"}, "layers": [1]})
    model = load_model(cfg, torch.device("cpu"))
    spec = resolve_capture(cfg, model)
    geo = spec.geometry.layers[1]
    assert geo.rope and geo.recipes["q"].source == "whole" and not geo.recipes["q"].post_transform
    geo.recipes["q"] = dataclasses.replace(geo.recipes["q"], source="attention")  # as if no rotation ran
    capturer = Capturer(model, spec, pad_id=0)
    with pytest.raises(UnsupportedModelError, match=r"layer 1: the pre-RoPE q of this batch comes from the rotary"):
        capturer.run_batch([np.arange(5, 30)], [0])
    capturer.close()


def test_model_that_is_not_causal_gets_the_padding_mask(tmp_path, make_config):
    """A BERT-style decoder without is_decoder attends both ways: the probe's causality proof fails, so padded
    batches keep the padding mask and store what each example run alone stores."""
    import transformers

    bert = transformers.AutoModelForCausalLM.from_config(transformers.BertConfig(
        vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    assert not bert.config.is_decoder
    bert.save_pretrained(tmp_path / "bert")
    cfg = make_config(model={"name": str(tmp_path / "bert")}, capture={"sampler": {"type": "all"}, "min_bucket_size": 4})
    model = load_model(cfg, torch.device("cpu"))
    spec = resolve_capture(cfg, model)
    assert spec.geometry.causal is False
    assert resolve_capture(make_config(), load_model(make_config(), torch.device("cpu"))).geometry.causal is True
    capturer = Capturer(model, spec, pad_id=0)
    seqs = [np.arange(5, 40), np.arange(9, 21)]
    together = capturer.run_batch(seqs, [0, 1])
    alone = [capturer.run_batch([s], [i]) for i, s in enumerate(seqs)]
    capturer.close()
    for layer, kind, plan, tensor, _ in together.items:
        for i in range(2):
            mine = plan.example_id == i
            ref = next(t for la, k, _, t, _ in alone[i].items if (la, k) == (layer, kind))
            assert (tensor[torch.from_numpy(mine)] - ref).abs().max().item() <= 1e-5, (layer, kind, i)


def test_nope_layer_is_proven_by_rerunning_it_with_other_positions(tmp_path, make_config):
    """Cohere 2's full-attention layers skip the rotation without a use_rope flag: the probe reruns such a
    layer with other position embeddings, finds the same q/k, and captures what attention receives."""
    import transformers

    cfg_model = transformers.Cohere2Config(
        vocab_size=600, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4)
    full = [i for i, t in enumerate(cfg_model.layer_types) if t == "full_attention"]
    assert full and len(full) < 4
    transformers.AutoModelForCausalLM.from_config(cfg_model).save_pretrained(tmp_path / "cohere2")
    cfg = make_config(model={"name": str(tmp_path / "cohere2")}, capture={"capture_pre_rope": True})
    spec = resolve_capture(cfg, load_model(cfg, torch.device("cpu")))
    assert sorted(i for i, g in spec.geometry.layers.items() if not g.rope) == full
    assert {g.recipes["q"].source for i, g in spec.geometry.layers.items() if i in full} == {"attention"}
    assert {g.recipes["q"].source for i, g in spec.geometry.layers.items() if i not in full} == {"whole"}
