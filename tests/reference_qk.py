"""An independent reference for the queries and keys attention consumes, family by family.

It never goes through transformers' attention interface: an uninstrumented copy of the model runs
the padded batch, a forward pre-hook (with kwargs) records every self-attention module's input
hidden states and position embeddings (cos/sin, or Llama 4's complex frequencies), and q/k are
recomputed here from the projection weights, the norms and the family's own rotary function (taken
from its modeling module when this file is imported).

``reference_qk`` returns per layer:

* ``q`` ``[B, H, S, D]`` / ``k`` ``[B, KV, S, D]``: what the attention computation receives, including
  any transform after the rotation (NanoChat's norm, Llama 4's L2 norm and NoPE temperature,
  Ministral 3's query scaling);
* ``q_pre`` / ``k_pre``: what the rotary function receives, as whole head vectors (partial rotary: the
  rotated slice as it was before rotation; MLA: ``cat(nope, rope-part before rotation)``, the key
  expanded to the heads attention sees); for layers without RoPE, what attention receives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import transformers
from transformers.models.cohere import modeling_cohere
from transformers.models.deepseek_v3 import modeling_deepseek_v3
from transformers.models.diffllama import modeling_diffllama
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.glm4 import modeling_glm4
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.gpt_oss import modeling_gpt_oss
from transformers.models.llama import modeling_llama
from transformers.models.llama4 import modeling_llama4
from transformers.models.ministral3 import modeling_ministral3
from transformers.models.mistral import modeling_mistral
from transformers.models.mllama import modeling_mllama
from transformers.models.nanochat import modeling_nanochat
from transformers.models.olmo2 import modeling_olmo2
from transformers.models.phi import modeling_phi
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3
from transformers.models.smollm3 import modeling_smollm3
from transformers.models.stablelm import modeling_stablelm


@dataclass
class RefQK:
    q: torch.Tensor  # [B, H, S, D] as attention receives it
    k: torch.Tensor  # [B, KV, S, D]
    q_pre: torch.Tensor  # before the rotary embedding
    k_pre: torch.Tensor

    def get(self, kind: str, pre_rope: bool) -> torch.Tensor:
        if kind == "q":
            return self.q_pre if pre_rope else self.q
        return self.k_pre if pre_rope else self.k


# -- helpers ----------------------------------------------------------------------------------

def _bhsd(t: torch.Tensor, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, S, H*D]`` -> ``[B, H, S, D]``."""
    return t.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


def _rotate_prefix(rope, q, k, cos, sin, n_rot: int):
    """Rotate the first ``n_rot`` dims of every head with ``rope``, keep the rest (Phi, StableLM)."""
    q_rot, k_rot = rope(q[..., :n_rot], k[..., :n_rot], cos, sin)
    return torch.cat((q_rot, q[..., n_rot:]), dim=-1), torch.cat((k_rot, k[..., n_rot:]), dim=-1)


# -- one function per family shape: (module, inputs) -> (q_pre, k_pre, q, k) ---------------------

def _plain(rope):
    """Llama-shaped: per-head view of q_proj/k_proj, then the family's rotary function."""

    def run(m, x, pe, pos):
        q, k = _bhsd(m.q_proj(x), x, m.head_dim), _bhsd(m.k_proj(x), x, m.head_dim)
        if not getattr(m, "use_rope", True):  # SmolLM3's NoPE layers
            return q, k, q, k
        return (q, k, *rope(q, k, *pe))

    return run


def _qk_norm_per_head(rope):
    """Qwen 3 / Gemma 3: RMS norm over head_dim before the rotation."""

    def run(m, x, pe, pos):
        q = m.q_norm(_bhsd(m.q_proj(x), x, m.head_dim))
        k = m.k_norm(_bhsd(m.k_proj(x), x, m.head_dim))
        return (q, k, *rope(q, k, *pe))

    return run


def _olmo2(m, x, pe, pos):
    """Olmo 2: RMS norm over the whole projection, then the per-head view."""
    d = m.head_dim
    q, k = _bhsd(m.q_norm(m.q_proj(x)), x, d), _bhsd(m.k_norm(m.k_proj(x)), x, d)
    return (q, k, *modeling_olmo2.apply_rotary_pos_emb(q, k, *pe))


def _nanochat(m, x, pe, pos):
    """NanoChat: rotation (rotate_half is (x2, -x1)) first, weightless RMS norm AFTER it."""
    q, k = _bhsd(m.q_proj(x), x, m.head_dim), _bhsd(m.k_proj(x), x, m.head_dim)
    q_rot, k_rot = modeling_nanochat.apply_rotary_pos_emb(q, k, *pe)
    return q, k, m.q_norm(q_rot), m.k_norm(k_rot)


def _cohere(m, x, pe, pos):
    """Cohere: LayerNorm with a [heads, head_dim] weight on [B, S, H, D], pairwise (interleaved) rotation."""
    shape = (*x.shape[:-1], -1, m.head_dim)
    q = m.q_norm(m.q_proj(x).view(shape)).transpose(1, 2)
    k = m.k_norm(m.k_proj(x).view(shape)).transpose(1, 2)
    return (q, k, *modeling_cohere.apply_rotary_pos_emb(q, k, *pe))


def _partial_layernorm(rope):
    """Phi (qk_layernorm) / StableLM (one LayerNorm per head): norm, then rotate the first rotary_ndims."""

    def run(m, x, pe, pos):
        q, k = _bhsd(m.q_proj(x), x, m.head_dim), _bhsd(m.k_proj(x), x, m.head_dim)
        if m.qk_layernorm:
            q, k = m.q_layernorm(q), m.k_layernorm(k)
        return (q, k, *_rotate_prefix(rope, q, k, *pe, m.rotary_ndims))

    return run


def _ministral3(m, x, pe, pos):
    """Ministral 3: Llama rotation, then queries scaled by 1 + beta * ln(1 + floor(pos / original_max))."""
    q, k = _bhsd(m.q_proj(x), x, m.head_dim), _bhsd(m.k_proj(x), x, m.head_dim)
    q_rot, k_rot = modeling_ministral3.apply_rotary_pos_emb(q, k, *pe)
    rp = m.config.rope_parameters
    beta, orig = rp.get("llama_4_scaling_beta"), rp.get("original_max_position_embeddings")
    if beta:
        scale = 1 + beta * torch.log(1 + torch.floor(pos.to(q_rot.dtype) / orig))
        q_rot = q_rot * scale[:, None, :, None].to(q_rot.dtype)
    return q, k, q_rot, k_rot


def _llama4(m, x, freqs, pos):
    """Llama 4: complex rotation on [B, S, H, D], L2 norm after it; NoPE layers get the temperature.

    The temperature uses the padded column index (``arange(seq_len)``), exactly as the model does.
    """
    shape = (*x.shape[:-1], -1, m.head_dim)
    q, k = m.q_proj(x).view(shape), m.k_proj(x).view(shape)
    pre = (q.transpose(1, 2), k.transpose(1, 2))
    if m.use_rope:
        q, k = modeling_llama4.apply_rotary_emb(q, k, freqs)
        if hasattr(m, "qk_norm"):
            q, k = m.qk_norm(q), m.qk_norm(k)
    elif m.attn_temperature_tuning:
        cols = torch.arange(x.shape[1], dtype=torch.float32)
        scale = torch.log1p(torch.floor((cols + 1.0) / m.floor_scale)) * m.attn_scale + 1.0
        q = q * scale.view(1, -1, 1, 1).to(q.dtype)
    post = (q.transpose(1, 2), k.transpose(1, 2))
    return (*post, *post) if not m.use_rope else (*pre, *post)


def _deepseek_v3(m, x, pe, pos):
    """DeepSeek V3 MLA: q = cat(nope, rope part); one shared rotary key head expanded to every head."""
    b, s = x.shape[:2]
    nope, rope_d = m.qk_nope_head_dim, m.qk_rope_head_dim
    q = m.q_proj(x) if m.q_lora_rank is None else m.q_b_proj(m.q_a_layernorm(m.q_a_proj(x)))
    q = q.view(b, s, -1, nope + rope_d).transpose(1, 2)
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    latent, k_pe = torch.split(m.kv_a_proj_with_mqa(x), [m.kv_lora_rank, rope_d], dim=-1)
    kv = m.kv_b_proj(m.kv_a_layernorm(latent)).view(b, s, -1, nope + m.v_head_dim).transpose(1, 2)
    k_nope = kv[..., :nope]
    k_pe = k_pe.view(b, 1, s, rope_d)
    rotate = (modeling_deepseek_v3.apply_rotary_pos_emb_interleave if m.config.rope_interleave
              else modeling_deepseek_v3.apply_rotary_pos_emb)
    q_rot, k_rot = rotate(q_pe, k_pe, *pe)
    heads = k_nope.shape[1]

    def cat(a, r):
        return torch.cat((a, r.expand(-1, heads, -1, -1) if r.shape[1] == 1 else r), dim=-1)

    return cat(q_nope, q_pe), cat(k_nope, k_pe), cat(q_nope, q_rot), cat(k_nope, k_rot)


def _gpt2(m, x, pe, pos):
    """GPT-2: fused Conv1D c_attn split in q/k/v, no rotary embedding."""
    q, k, _ = m.c_attn(x).split(m.split_size, dim=2)
    q, k = _bhsd(q, x, m.head_dim), _bhsd(k, x, m.head_dim)
    return q, k, q, k


def _gpt_neox(m, x, pe, pos):
    """GPT-NeoX: fused query_key_value laid out [q|k|v] per head; the rotary function rotates a prefix."""
    qkv = m.query_key_value(x).view(*x.shape[:-1], -1, 3 * m.head_size).transpose(1, 2)
    q, k, _ = qkv.chunk(3, dim=-1)
    return (q, k, *modeling_gpt_neox.apply_rotary_pos_emb(q, k, *pe))


# text model_type -> reference function
FAMILIES = {
    "llama": _plain(modeling_llama.apply_rotary_pos_emb),
    "mistral": _plain(modeling_mistral.apply_rotary_pos_emb),
    "qwen2": _plain(modeling_qwen2.apply_rotary_pos_emb),
    "qwen3": _qk_norm_per_head(modeling_qwen3.apply_rotary_pos_emb),
    "gemma3_text": _qk_norm_per_head(modeling_gemma3.apply_rotary_pos_emb),
    "olmo2": _olmo2,
    "nanochat": _nanochat,
    "phi": _partial_layernorm(modeling_phi.apply_rotary_pos_emb),
    "stablelm": _partial_layernorm(modeling_stablelm.apply_rotary_pos_emb),
    "deepseek_v3": _deepseek_v3,
    "llama4_text": _llama4,
    "gemma2": _plain(modeling_gemma2.apply_rotary_pos_emb),
    "gpt_oss": _plain(modeling_gpt_oss.apply_rotary_pos_emb),
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "smollm3": _plain(modeling_smollm3.apply_rotary_pos_emb),
    "cohere": _cohere,
    "glm4": _plain(modeling_glm4.apply_rotary_pos_emb),
    "diffllama": _plain(modeling_diffllama.apply_rotary_pos_emb),
    "mllama_text_model": _plain(modeling_mllama.apply_rotary_pos_emb),
    "ministral3": _ministral3,
}


# -- running the uninstrumented model ---------------------------------------------------------

def load_reference(model_dir, attn_implementation: str | None = None):
    """The checkpoint's own class (full vision-language class included), float32, default attention."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, config.architectures[0])
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return cls.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()


def text_decoder(model) -> torch.nn.Module:
    """The decoder stack that takes input_ids (a vision-language model's language model)."""
    inner = getattr(model, "model", None) or getattr(model, "transformer", None) or getattr(model, "gpt_neox", None)
    return getattr(inner, "language_model", inner)


def self_attention_modules(decoder) -> dict[int, torch.nn.Module]:
    """Layer index -> self-attention module (Mllama's cross-attention layers have none)."""
    layers = decoder.layers if hasattr(decoder, "layers") else decoder.h
    found = {}
    for i, layer in enumerate(layers):
        for name in ("self_attn", "attn", "attention"):
            if isinstance(getattr(layer, name, None), torch.nn.Module):
                found[i] = getattr(layer, name)
                break
    return found


def run_decoder(model, ids, mask, pos) -> None:
    as_t = torch.as_tensor
    with torch.no_grad():
        text_decoder(model)(input_ids=as_t(ids), attention_mask=as_t(mask), position_ids=as_t(pos), use_cache=False)


def reference_qk(model, ids, mask, pos) -> dict[int, RefQK]:
    """layer -> RefQK for the padded batch ``ids``/``mask``/``pos`` (numpy or tensors)."""
    decoder = text_decoder(model)
    family = FAMILIES[decoder.config.model_type]
    seen = {}

    def record(layer):
        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            seen[layer] = (module, x, kwargs.get("position_embeddings"), kwargs.get("position_ids"))

        return hook

    handles = [m.register_forward_pre_hook(record(i), with_kwargs=True)
               for i, m in self_attention_modules(decoder).items()]
    try:
        run_decoder(model, ids, mask, pos)
    finally:
        for h in handles:
            h.remove()
    out = {}
    with torch.no_grad():
        for layer, (m, x, pe, p) in sorted(seen.items()):
            p = torch.as_tensor(pos) if p is None else p
            q_pre, k_pre, q, k = (t.contiguous() for t in family(m, x, pe, p))
            out[layer] = RefQK(q=q, k=k, q_pre=q_pre, k_pre=k_pre)
    return out


def padded_batch(tokenizer, texts, padding_side):
    """(seqs, lengths, offsets, ids, mask, positions) of ``texts`` padded on ``padding_side`` as transformers pads."""
    seqs = [np.asarray(tokenizer(t)["input_ids"]) for t in texts]
    lengths = np.array([len(s) for s in seqs])
    width = lengths.max()
    ids = np.full((len(seqs), width), tokenizer.pad_token_id)
    mask = np.zeros_like(ids)
    offs = width - lengths if padding_side == "left" else np.zeros_like(lengths)
    for i, (s, o) in enumerate(zip(seqs, offs)):
        ids[i, o: o + len(s)] = s
        mask[i, o: o + len(s)] = 1
    return seqs, lengths, offs, ids, mask, np.clip(np.cumsum(mask, 1) - 1, 0, None)
