"""Building blocks of benchmarks/census.py: tiny checkpoints of any causal-LM type (the independent
reference is benchmarks/census_reference.py).

Tiny checkpoints: the default config of a type is shrunk generically (every (sub-)config's common size
fields set small by name, per-layer lists resized to the new layer count keeping each distinct value,
heterogeneous per-layer configs kept heterogeneous), with a short table of per-type overrides for the
families with unusual constraints. The weights are perturbed (N(0, 0.2) for matrices, 1 + N(0, 0.2) for
norm weights) so that every projection and norm changes the vectors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REF = "census_ref"  # the reference attention functions: census_ref_sdpa, census_ref_eager
VOCAB = 512
LAYERS = 3  # text stacks; other sub-configs (vision, audio) get 2
SIDE_LAYERS = 2

# field name -> value, applied wherever the default is an int
SIZES: dict[str, int] = {}
for _names, _value in (
    ("hidden_size d_model n_embd n_embed embed_dim emb_dim dim word_embed_proj_dim embedding_size attention_hidden_size "
     "hidden_size_global adapter_in_dim adapter_input_size lru_width input_embedding_size output_embedding_size "
     "backbone_hidden_size out_hidden_size", 64),
    ("num_attention_heads n_head num_heads n_heads decoder_attention_heads encoder_attention_heads attention_heads "
     "num_decoder_attention_heads num_encoder_attention_heads swa_num_attention_heads", 4),
    ("head_dim attention_head_dim d_head dim_head attention_head_size kv_channels swa_head_dim qk_head_dim "
     "index_head_dim linear_key_head_dim linear_value_head_dim linear_head_dim global_head_dim", 16),
    ("intermediate_size ffn_dim ffn_hidden_size decoder_ffn_dim encoder_ffn_dim moe_intermediate_size "
     "shared_expert_intermediate_size shared_intermediate_size dense_intermediate_size expert_ffn_hidden_size "
     "moe_shared_expert_intermediate_size intermediate_size_mlp d_inner dim_ff feed_forward_size dff "
     "shared_experts_intermediate_size", 128),
    ("vocab_size unpadded_vocab_size vocab_size_per_layer_input encoder_hash_byte_group_vocab", VOCAB),
    ("hidden_size_per_layer_input", 16),
    ("mamba_d_ssm", 128),
    ("num_experts n_routed_experts num_local_experts moe_num_experts", 4),
    ("num_experts_per_tok moe_topk num_experts_per_token moe_k", 2),
    ("n_shared_experts num_shared_experts moe_num_shared_experts", 1),
    ("n_group topk_group num_expert_group first_k_dense_replace num_dense_layers", 1),
    ("q_lora_rank", 32),
    ("kv_lora_rank o_lora_rank", 16),
    ("qk_rope_head_dim qk_nope_head_dim rotary_dim", 8),
    ("v_head_dim", 16),
    ("index_n_heads linear_num_key_heads mamba_n_groups n_groups mamba_ngroups", 2),
    ("linear_num_value_heads linear_num_heads", 4),
    ("sliding_window sliding_window_size attention_window_size local_attention_window_len", 8),
    ("mamba_d_state state_size ssm_state_size", 16),
    ("mamba_n_heads mamba_num_heads n_mamba_heads", 4),
    ("mamba_d_head mamba_headdim mamba_head_dim", 32),
    ("time_step_rank mamba_dt_rank", 8),
    ("num_nextn_predict_layers", 0),
    ("pad_token_id", 0),
    ("bos_token_id", 1),
    ("eos_token_id", 2),
):
    SIZES.update(dict.fromkeys(_names.split(), _value))

LAYER_FIELDS = ("num_hidden_layers n_layer num_layers n_layers decoder_layers encoder_layers num_decoder_layers "
                "num_encoder_layers depth").split()
# fields whose default None the models do not all accept: set them too
MOE_FIELDS = "n_routed_experts num_experts_per_tok n_shared_experts num_local_experts head_dim".split()
SUB_NAMES = ("text_config", "vision_config", "audio_config", "attn_config", "ffn_config")
MAX_PARAMS = 20_000_000
KV_FIELDS = "num_key_value_heads num_kv_heads n_kv_heads multi_query_group_num num_query_groups swa_num_key_value_heads".split()
POSITION_FIELDS = "max_position_embeddings n_positions n_ctx max_seq_len context_length original_max_position_embeddings".split()

# per-type overrides (applied to the text config) for families the generic rules cannot shrink
OVERRIDES: dict[str, dict] = {
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    "dots3_note": {"text_config": {"head_dim": 24}},  # SWA head_dim = qk_nope_head_dim + qk_rope_head_dim of its layers
    "dots3_note_text": {"head_dim": 24},
    "gemma3n_text": {"num_hidden_layers": 4, "num_kv_shared_layers": 2,
                     "layer_types": ["sliding_attention", "full_attention"] * 2},
    "jamba": {"attn_layer_offset": 1, "attn_layer_period": 2, "expert_layer_offset": 1, "expert_layer_period": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv"]},
    "mamba2": {"num_heads": 8},
    "reformer": {"is_decoder": True, "attn_layers": ["local", "lsh", "local"], "axial_pos_shape": [16, 32],
                 "axial_pos_embds_dim": [32, 32], "max_position_embeddings": 512, "local_attn_chunk_length": 8,
                 "lsh_attn_chunk_length": 8},
    "xmod": {"default_language": "en_XX"},
    "zamba": {"num_hidden_layers": 4, "attn_layer_period": 2, "attn_layer_offset": 1, "attention_hidden_size": 128,
              "attention_head_dim": 32},
    "zamba2": {"attention_hidden_size": 128, "attention_head_dim": 32},
    "zaya": {"num_experts_per_tok": 1},
}

# arguments that the default config itself needs before it can be built
DEFAULT_OVERRIDES: dict[str, dict] = {}

# model types the census does not build, with the reason (encoder-decoder ones are found from their config)
NOT_TEXT: dict[str, str] = dict.fromkeys(
    ("gemma4_assistant", "gemma4_unified_assistant"),
    "draft model for speculative decoding: its forward needs the target model's shared_kv_states",
)


class BuildError(Exception):
    """The census could not build a tiny instance of this type."""


def causal_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def skip_reason(model_type: str) -> str | None:
    """Why the census does not build this type (encoder-decoder or not a text model), or None."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type in NOT_TEXT:
        return NOT_TEXT[model_type]
    cls = CONFIG_MAPPING[model_type]
    try:
        enc_dec = bool(getattr(cls(), "is_encoder_decoder", False))
    except Exception:  # noqa: BLE001 - a default that does not build is reported by the build step
        enc_dec = False
    if enc_dec:
        return "encoder-decoder family: its causal-LM class is the decoder half (config defaults to is_encoder_decoder)"
    return None


def _resize(values: list, n: int) -> list:
    """``n`` entries that keep every distinct value of ``values`` (first-appearance order, then cycled)."""
    distinct = []
    for v in values:
        if v not in distinct:
            distinct.append(v)
    if len(distinct) >= n:
        return distinct[:n]
    return [distinct[i % len(distinct)] for i in range(n)]


def _layers_for(values: dict, n_default: int) -> int:
    """The tiny layer count: LAYERS, or more when the layer_types list has more kinds of layer."""
    kinds = {repr(v) for v in values.get("layer_types") or []}
    return max(n_default, len(kinds))


def shrink(config, *, text: bool, lists: bool = True, mha: bool = False, layers: int | None = None,
           width: int | None = None) -> dict:
    """Keyword arguments that rebuild ``config`` (an instance at its defaults) tiny, sub-configs included.

    ``lists``: resize per-layer lists (else the config derives them); ``mha``: key/value heads = heads.
    ``width``: the text model's default hidden size; other int fields equal to it are widths too.
    """
    values = config.to_dict()
    text_sub = config.get_text_config() if hasattr(config, "get_text_config") else config
    width = width or getattr(text_sub, "hidden_size", None)
    out: dict = {}
    layer_field = next((f for f in LAYER_FIELDS if isinstance(values.get(f), int) and values[f] > 0), None)
    old_layers = values[layer_field] if layer_field else None
    n_layers = layers or (LAYERS if text else SIDE_LAYERS)
    n_layers = _layers_for(values, n_layers) if lists else n_layers
    for f in LAYER_FIELDS:
        if isinstance(values.get(f), int) and values[f] > 0:
            out[f] = n_layers if values[f] == old_layers else min(values[f], n_layers)
    for key, value in values.items():
        if key in out or isinstance(value, bool):
            continue
        if key in SIZES and ((isinstance(value, int) and value != 0) or (value is None and key in MOE_FIELDS)):
            out[key] = SIZES[key]
        elif (isinstance(value, int) or (value is None and key == "num_key_value_heads")) and key in KV_FIELDS:
            out[key] = SIZES["num_attention_heads"] if mha else (1 if value == 1 else 2)
        elif isinstance(value, int) and width and width >= 256 and value == width and not _is_count(key):
            out[key] = SIZES["hidden_size"]
        elif isinstance(value, int) and key in POSITION_FIELDS:
            out[key] = min(max(value, 512), 4096)
        elif lists and isinstance(value, list) and old_layers and len(value) == old_layers and not key.endswith("token_id"):
            out[key] = [SIZES[key]] * n_layers if key in SIZES else _resize(value, n_layers)
    if isinstance(values.get("head_dim"), int) and values["head_dim"] == values.get("qk_rope_head_dim"):
        out["head_dim"] = out["qk_rope_head_dim"]  # MLA: the rotary tables follow head_dim
    if isinstance(values.get("per_layer_config"), dict):
        out["per_layer_config"] = _per_layer(values, out, n_layers, mha)
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if isinstance(values.get(key), list):
            out[key] = [SIZES[key]]
    for name in getattr(type(config), "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if sub is None or not hasattr(sub, "to_dict"):
            continue
        is_text = sub is text_sub or any(w in name for w in ("text", "decoder", "global"))
        out[name] = {**_set_by_parent(sub), **shrink(sub, text=is_text, lists=lists, mha=mha, width=width)}
    return out


def _per_layer(values: dict, out: dict, n_layers: int, mha: bool) -> dict:
    """Heterogeneous layers (``per_layer_config``) kept heterogeneous: a layer of the tiny model takes the
    overrides of an original layer of the same type, each size made larger or smaller than the tiny
    global value as the original was than its global value."""
    old = {int(k): v for k, v in values["per_layer_config"].items()}
    old_types, new_types = values.get("layer_types"), out.get("layer_types")
    result = {}
    for j in range(n_layers):
        if old_types and new_types:
            src = next((i for i in range(len(old_types)) if old_types[i] == new_types[j] and i in old), None)
        else:
            src = j if j in old else None
        if src is None:
            continue
        entry = {}
        for key, v in old[src].items():
            base, tiny = values.get(key), out.get(key)
            if isinstance(v, int) and isinstance(base, int) and isinstance(tiny, int) and v != base:
                entry[key] = tiny * 2 if v > base else max(tiny // 2, 1)
            elif key not in out:
                entry[key] = v
        if mha and "num_attention_heads" in entry and "num_key_value_heads" in entry:
            entry["num_key_value_heads"] = entry["num_attention_heads"]
        result[j] = entry
    return result


def _is_count(key: str) -> bool:
    return any(w in key for w in ("token", "position", "vocab", "seq", "len", "window", "layers"))


def _set_by_parent(sub) -> dict:
    """The model type of a sub-config and the fields its parent set away from the sub-config's own defaults."""
    values = sub.to_dict()
    try:
        own = type(sub)().to_dict()
    except Exception:  # noqa: BLE001
        own = {}
    keep = {k: v for k, v in values.items() if k in own and own[k] != v and not isinstance(v, (dict, list))}
    if sub.model_type:
        keep["model_type"] = sub.model_type
    return keep


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) and key in SUB_NAMES else value
    return out


def tiny_configs(model_type: str) -> list:
    """Candidate tiny configs of ``model_type``, best first: (config, None) or (None, why it is invalid).

    Candidates: per-layer lists resized or left to the config to derive, grouped-query or multi-head.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    extra = OVERRIDES.get(model_type, {})
    try:
        default = cls(**DEFAULT_OVERRIDES.get(model_type, {}))
    except Exception as exc:  # noqa: BLE001 - any failure here means: not built
        raise BuildError(f"default {cls.__name__}() fails: {one_line(exc)}") from exc
    out = []
    for lists, mha in ((True, False), (False, False), (True, True), (False, True)):
        kwargs = shrink(default, text=True, lists=lists, mha=mha, layers=extra.get("num_hidden_layers"))
        try:
            out.append((cls(**_merge(kwargs, extra)), None))
        except Exception as exc:  # noqa: BLE001
            out.append((None, f"shrunk {cls.__name__} is invalid: {one_line(exc)}"))
    return out


def perturb(model, std: float = 0.2) -> None:
    """N(0, std) for every matrix, 1 + N(0, std) for norm weights; other vectors stay as initialised."""
    import torch

    with torch.no_grad():
        for mod_name, module in model.named_modules():
            is_norm = "norm" in type(module).__name__.lower() or "norm" in mod_name.rsplit(".", 1)[-1].lower()
            for name, p in module.named_parameters(recurse=False):
                if not p.is_floating_point():
                    continue
                if p.dim() >= 2:
                    p.normal_(0.0, std)
                elif is_norm and name == "weight":
                    p.normal_(1.0, std)


def build_tiny(model_type: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> str:
    """Save a tiny perturbed ``model_type`` checkpoint plus the shared tokenizer; return the model class name.

    The first candidate config whose model builds and runs a short forward is kept.
    """
    import torch
    from transformers import AutoModelForCausalLM

    candidates = tiny_configs(model_type)
    first_error = None
    model = None
    for config, _ in candidates:
        if config is None:
            continue
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            n_params = sum(p.numel() for p in model.parameters())
            if n_params > MAX_PARAMS:
                raise BuildError(f"still {n_params / 1e6:.0f}M parameters after shrinking; needs an override")
            perturb(model)
            model.eval()
            with torch.no_grad():
                mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])  # padded, as the census runs it
                model(input_ids=torch.arange(3, 19).view(2, 8), attention_mask=mask, use_cache=False)
            break
        except Exception as exc:  # noqa: BLE001
            if first_error is None:
                first_error = exc if isinstance(exc, BuildError) else BuildError(f"tiny model fails: {one_line(exc, where=True)}")
                first_error.__cause__ = exc
            model = None
    if model is None:
        raise first_error or BuildError(candidates[0][1])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(str(out_dir))
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"save_pretrained fails: {one_line(exc)}") from exc
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out_dir / f.name)
    return type(model).__name__


def one_line(exc: BaseException, limit: int = 160, where: bool = False) -> str:
    """``Type: first line of the message`` (``[file:line]`` of the innermost frame with ``where``), truncated."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    first = " ".join(text[:2]) if len(text) > 1 and text[0].endswith(":") else (text[0] if text else "")
    msg = f"{type(exc).__name__}: {first}".rstrip(": ")
    tb = exc.__traceback__
    if where and tb is not None:
        while tb.tb_next is not None:
            tb = tb.tb_next
        suffix = f" [{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}]"
        msg = (msg if len(msg) + len(suffix) <= limit else msg[: limit - len(suffix) - 3] + "...") + suffix
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
