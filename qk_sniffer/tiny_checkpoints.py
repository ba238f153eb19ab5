"""Tiny random-weight checkpoints of real architectures (tests, the demo, benchmarks), built offline and reproducibly.

Each checkpoint is saved with ``save_pretrained`` next to a byte-level BPE tokenizer trained
locally with ``tokenizers``, so the normal ``from_pretrained`` loading path is exercised.

    python -m qk_sniffer.tiny_checkpoints llama models/tiny/llama

A recipe is the keyword arguments of a transformers config class (``cls``) plus, optionally:

* ``model_cls``: the class saved (default: ``AutoModelForCausalLM.from_config``), e.g. the full
  vision-language class so the checkpoint is laid out like the real one;
* ``text_config`` / ``vision_config``: nested recipes (their own ``cls``) of a composite config;
  the tokenizer's vocabulary and special ids go to the text config;
* ``perturb_1d``: whether 1-d weights (norms, biases, gates, sinks) and norm weights of any shape are
  perturbed too (default True). Only ``llama`` keeps the old init (matrices only), so
  ``models/tiny/llama`` stays what its recipe builds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import REPO_ROOT

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]

_SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, max_position_embeddings=4096)

# Small but real shapes: several layers, GQA where the family uses it, head_dim 16.
ARCHS = {
    "llama": dict(
        cls="LlamaConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        perturb_1d=False,
    ),
    "qwen3": dict(
        cls="Qwen3Config", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
    ),
    "gemma3": dict(
        cls="Gemma3TextConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    ),
    "mistral": dict(
        cls="MistralConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        sliding_window=6,
    ),
    "qwen2": dict(
        cls="Qwen2Config", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    ),
    "olmo2": dict(
        cls="Olmo2Config", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
    ),
    # q/k RMS norm (no weight) AFTER the rotation; rotate_half is (x2, -x1)
    "nanochat": dict(cls="NanoChatConfig", **_SMALL, num_hidden_layers=3, num_key_value_heads=2),
    # per-head LayerNorm on q/k before a rotation of the first half of each head
    "phi": dict(cls="PhiConfig", **_SMALL, num_hidden_layers=3, num_key_value_heads=2, qk_layernorm=True,
                partial_rotary_factor=0.5),
    # multi-head latent attention: low-rank q, shared rotary key, nope 16 + rope 8 (interleaved), v 12
    "deepseek_v3": dict(
        cls="DeepseekV3Config", **_SMALL, num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=32,
        kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=2,
        moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
        n_shared_experts=1,
    ),
    # complex (pairwise) RoPE on [B,S,H,D], L2 qk-norm after it, NoPE layers 1 and 3 with the attention
    # temperature (floor_scale small so it varies within a short text), chunked attention on RoPE layers
    "llama4": dict(
        cls="Llama4TextConfig", **_SMALL, intermediate_size_mlp=128, num_hidden_layers=4, num_key_value_heads=2,
        head_dim=16, no_rope_layers=[1, 0, 1, 0], attention_chunk_size=8, attn_temperature_tuning=True,
        floor_scale=4, attn_scale=0.5, use_qk_norm=True, moe_layers=[1], num_local_experts=2,
        num_experts_per_tok=1,
    ),
    # per-head LayerNorm (one per head) and a rotation of the first quarter of each head
    "stablelm": dict(cls="StableLmConfig", **_SMALL, num_hidden_layers=3, num_key_value_heads=2,
                     qk_layernorm=True, use_qkv_bias=True),
    "gemma2": dict(
        cls="Gemma2Config", **_SMALL, num_hidden_layers=4, num_key_value_heads=2, head_dim=16,
        query_pre_attn_scalar=16, sliding_window=4, attn_logit_softcapping=5.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    ),
    # attention sinks, sliding and full layers, a tiny MoE
    "gpt_oss": dict(
        cls="GptOssConfig", hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=4096, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"],
    ),
    # learned absolute positions, fused Conv1D c_attn, no RoPE
    "gpt2": dict(cls="GPT2Config", n_embd=64, n_layer=3, n_head=4, n_positions=4096),
    # fused query_key_value interleaved per head, rotation of the first quarter of each head
    "gpt_neox": dict(cls="GPTNeoXConfig", **_SMALL, num_hidden_layers=3, partial_rotary_factor=0.25),
    # NoPE on every other layer
    "smollm3": dict(cls="SmolLM3Config", **_SMALL, num_hidden_layers=4, num_key_value_heads=2,
                    no_rope_layer_interval=2),
    # interleaved (pairwise) rotate_half, LayerNorm q/k-norm with a [heads, head_dim] weight
    "cohere": dict(cls="CohereConfig", **_SMALL, num_hidden_layers=3, num_key_value_heads=2, use_qk_norm=True),
    # interleaved rotation of the first half of each head
    "glm4": dict(cls="Glm4Config", **_SMALL, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                 partial_rotary_factor=0.5),
    # calls the attention function twice per layer with the same q/k
    "diffllama": dict(cls="DiffLlamaConfig", **_SMALL, num_hidden_layers=2, num_key_value_heads=2),
    # Llama 3.2 Vision: self-attention layers 0, 2, 3 and a cross-attention layer 1, saved as the full model
    "mllama": dict(
        cls="MllamaConfig", model_cls="MllamaForConditionalGeneration",
        text_config=dict(cls="MllamaTextConfig", **_SMALL, num_hidden_layers=4, num_key_value_heads=2,
                         cross_attention_layers=[1], tie_word_embeddings=False),
        vision_config=dict(cls="MllamaVisionConfig", hidden_size=32, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=2, intermediate_size=64, vision_output_dim=64, image_size=32,
                           patch_size=16, max_num_tiles=2, intermediate_layers_indices=[0],
                           supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
    ),
    # Mistral 3 (Ministral 3 text + Pixtral vision), saved as the full model; YaRN RoPE and the
    # Llama 4 query scaling 1 + beta*ln(1 + floor(pos / 8))
    "mistral3": dict(
        cls="Mistral3Config", model_cls="Mistral3ForConditionalGeneration", image_token_index=10,
        text_config=dict(
            cls="Ministral3Config", **_SMALL, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=512.0, original_max_position_embeddings=8,
                                 max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                                 mscale_all_dim=1.0, llama_4_scaling_beta=0.1),
        ),
        vision_config=dict(cls="PixtralVisionConfig", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=16, image_size=32, patch_size=8),
    ),
}


def default_corpus() -> list[str]:
    here = REPO_ROOT / "config" / "demo" / "corpus.jsonl"
    return [json.loads(line)["text"] for line in here.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_tokenizer(out_dir: str | Path, texts: list[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``texts`` and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts if texts is not None else default_corpus()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    fast.save_pretrained(str(out_dir))
    return fast


def make_config(spec: dict, tok, *, text: bool = True):
    """The transformers config of a recipe; nested ``text_config``/``vision_config`` recipes are built first."""
    import transformers

    spec = dict(spec)
    cls = getattr(transformers, spec.pop("cls"))
    for key in ("text_config", "vision_config"):
        if isinstance(spec.get(key), dict):
            spec[key] = make_config(spec[key], tok, text=key == "text_config")
    if text and "text_config" not in spec:
        spec = {**dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=True), **spec}
    return cls(**spec)


def _is_norm(name: str) -> bool:
    return any("norm" in part.lower() for part in name.split(".")[:-1])


def perturb(model, init_std: float = 0.2, perturb_1d: bool = True) -> None:
    """Replace every matrix by N(0, init_std) and shift every other weight by N(0, init_std).

    The default init is tiny-scale and leaves norms at 1 and biases at 0: widened, attention patterns are
    not uniform, and norms and biases are not identities (a capture that skipped one would be caught).
    """
    import torch

    params = list(model.named_parameters())
    with torch.no_grad():
        # matrices first, in the order the old recipes drew them, so their weights are unchanged
        for name, p in params:
            if p.dim() >= 2 and not _is_norm(name):
                p.normal_(0.0, init_std)
        if perturb_1d:
            for name, p in params:
                if p.dim() < 2 or _is_norm(name):
                    p.add_(torch.randn_like(p) * init_std)


def build_model(arch: str, out_dir: str | Path, *, seed: int = 0, tokenizer=None, init_std: float = 0.2,
                dtype: str = "float32", **overrides) -> Path:
    """Save a random-weight ``arch`` checkpoint (and a tokenizer) to ``out_dir``."""
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else build_tokenizer(out)
    if tokenizer is not None:
        tok.save_pretrained(str(out))
    spec = dict(ARCHS[arch])
    spec.update(overrides)
    model_cls = spec.pop("model_cls", None)
    perturb_1d = spec.pop("perturb_1d", True)
    cfg = make_config(spec, tok)
    torch.manual_seed(seed)
    if model_cls is None:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    else:
        model = getattr(transformers, model_cls)(cfg)
    perturb(model, init_std, perturb_1d)
    model.to(getattr(torch, dtype)).save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", choices=sorted(ARCHS))
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build_model(args.arch, args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
