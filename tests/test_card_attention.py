"""The card says what attention saw: chunked layers, RoPE layers, transforms after RoPE, layers left out."""

from __future__ import annotations

import json

from .support.tiny_data import build_final


def _card_and_manifest(root):
    card = (root / "final" / "README.md").read_text(encoding="utf-8")
    manifest = json.loads((root / "staging" / "chunk-0" / "manifest.json").read_text(encoding="utf-8"))
    return card, manifest["model"]


def test_llama4_card_records_chunked_nope_and_post_rotation_layers(tiny_models, tmp_path):
    from transformers import AutoConfig

    model_dir = tiny_models("llama4")
    config = AutoConfig.from_pretrained(model_dir)
    chunked = [i for i, t in enumerate(config.layer_types) if t == "chunked_attention"]
    rope = [i for i, flag in enumerate(config.no_rope_layers) if flag]
    assert chunked and rope and len(rope) < config.num_hidden_layers  # the recipe has NoPE and chunked layers
    root = tmp_path / "root"
    build_final(root, model={"name": str(model_dir)}, dataset={"max_samples": 6})
    card, model = _card_and_manifest(root)
    assert [i for i, a in enumerate(model["layer_attention"]) if a.startswith("chunked")] == chunked
    assert model["layer_attention"][chunked[0]] == f"chunked:{config.attention_chunk_size}"
    assert model["rope_layers"] == rope and model["rope_unknown_layers"] == []
    # Llama 4 normalises q and k after the rotation (qk_norm) in its RoPE layers
    assert model["post_rotation_transform"] == {"q": rope, "k": rope}
    assert f"layer {chunked[0]}: chunks of {config.attention_chunk_size}" in card
    assert "| Layers with RoPE |" in card and "| Transform after the rotation | q: layers" in card


def test_mllama_card_lists_the_cross_attention_layers_left_out(tiny_models, tmp_path):
    from transformers import AutoConfig

    model_dir = tiny_models("mllama")
    cross = AutoConfig.from_pretrained(model_dir).text_config.cross_attention_layers
    root = tmp_path / "root"
    build_final(root, model={"name": str(model_dir)}, dataset={"max_samples": 4})
    card, model = _card_and_manifest(root)
    assert sorted(int(i) for i in model["skipped_layers"]) == sorted(cross)
    assert "cross-attention" in model["skipped_layers"][str(cross[0])]
    assert f"| Layers not captured | layer {cross[0]}: its attention module did not run" in card
    configs = sorted(p.name for p in (root / "final" / "data" / "tiny").iterdir())
    assert configs and not [c for c in configs if c.startswith(f"l{cross[0]:02d}h")]
