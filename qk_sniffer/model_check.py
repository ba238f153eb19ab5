"""Preflight of ``model.*``, ``tokenizer.*`` and ``capture.*``: checked locally, without loading any weight.

:func:`check_model` reads the model's config and the tokenizer as :mod:`qk_sniffer.modeling` does, builds the
model class on the meta device (no memory, no weights) with the configured attention implementation, and resolves
``capture.layers`` / ``capture.heads`` / ``capture.head_sampling`` with :func:`qk_sniffer.modeling.resolve_capture`
against a geometry taken from the config. The probe forward on load stays the final word on what attention
receives (MLA head sizes, layers that bypass the attention interface, models that call it twice per layer); this
catches, in seconds and before a GPU job is queued, what the config alone already decides.
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from .config import ConfigError, tokenizer_name
from .errors import UnsupportedModelError
from .modeling import (
    DTYPES,
    _causal_lm_auto,
    _check_local_path,
    _device_map,
    _safe,
    attention_choices,
    attention_modules,
    backbone_of,
    choose_attention,
    has_adapter,
    load_tokenizer,
    model_class,
    patch_modeling_modules,
    resolve_capture,
    text_config,
)
from .probe import LayerGeometry, ModelGeometry

log = logging.getLogger("qk_sniffer")


@dataclass
class ModelInfo:
    model_type: str
    model_class: str  # the class the checkpoint loads as (an image-text class for Mistral 3)
    decoder_class: str  # the class the run captures from: the causal LM, or an image-text checkpoint's language model
    n_layers: int | None
    n_heads: int | None  # query heads, from the config
    n_kv_heads: int | None
    head_dim: int | None  # q/k head size from the config (MLA: nope + rope)
    max_positions: int | None  # max_position_embeddings / n_positions (of the text config)
    learned_positions: str | None  # the learned absolute position embedding's module name (GPT-2: "wpe"), else None
    attn_implementation: str  # what the capture wraps
    attn_choices: list[str] = field(default_factory=list)
    vocab_rows: int | None = None  # rows of the token embedding
    tokenizer_class: str = ""
    tokenizer_len: int = 0
    pad_token_id: int = 0  # the id padding uses: the pad token, else eos, else 0 (as qk_sniffer.chunk does)
    pad_source: str = ""  # "pad token '<pad>'", "eos token '</s>'" or "token 0"
    layers: list[int] = field(default_factory=list)  # layers to capture
    query_heads: list[int] = field(default_factory=list)
    key_heads: list[int] = field(default_factory=list)
    skipped_layers: dict[int, str] = field(default_factory=dict)
    head_sampling: dict | None = None  # the selection record, as the card will hold it


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (whitespace collapsed, at most ``limit`` characters)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _int(obj, name: str) -> int | None:
    value = _safe(lambda: getattr(obj, name, None))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _load_config(cfg: dict):
    from transformers import AutoConfig

    mcfg = cfg["model"]
    name = mcfg["name"]
    _check_local_path(name, "model.name")
    try:
        config = AutoConfig.from_pretrained(name, revision=mcfg.get("revision"), trust_remote_code=mcfg["trust_remote_code"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"model.name: could not read the config of {name!r}: {_one_line(exc)}") from exc
    tcfg = text_config(config)
    for key, value in (mcfg.get("config_overrides") or {}).items():  # as modeling.load_model sets them
        if not hasattr(config, key) and not hasattr(tcfg, key):
            log.warning("model.config_overrides: %r is not a field of the %s config; it is set but probably read by "
                        "nothing (check the spelling)", key, getattr(config, "model_type", "?"))
        target = config if hasattr(config, key) or not hasattr(tcfg, key) else tcfg
        setattr(target, key, value)
    return config


def _build(cls, auto, config, attn: str, cfg: dict):
    """The model on the meta device: no memory, no weights, transformers' own attention checks."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = nullcontext
    dtype = cfg["model"]["dtype"]
    kwargs = {"attn_implementation": attn, **({} if dtype == "auto" else {"dtype": DTYPES[dtype]})}
    with torch.device("meta"), no_init_weights():
        if cls is None:  # remote code
            return auto.from_config(copy.deepcopy(config), trust_remote_code=cfg["model"]["trust_remote_code"], **kwargs)
        return cls._from_config(copy.deepcopy(config), **kwargs)


def _meta_model(cfg: dict, cls, auto, config):
    """(meta model or None, attention implementation); an implementation the class cannot run is refused."""
    requested = cfg["model"]["attn_implementation"]
    inner = choose_attention(cls, requested)  # the class's support flags: refused in one line there
    default = choose_attention(cls, None)
    owner = cls.__name__ if cls is not None else getattr(config, "model_type", "the model")
    model = None
    try:  # the default first, so a failure with the requested implementation is the implementation's
        model = _build(cls, auto, config, default, cfg)
    except Exception as exc:  # noqa: BLE001 - code that cannot run on the meta device: the config still answers
        log.warning("model.name: %s could not be built on the meta device (%s: %s); layers, heads and positions are "
                    "checked from the config only", owner, type(exc).__name__, _one_line(exc))
    if inner == default or model is None:
        return model, inner
    try:
        return _build(cls, auto, config, inner, cfg), inner
    except ImportError as exc:  # flash-attn / kernels: not usable here
        if torch.cuda.is_available():
            raise ConfigError(f"model.attn_implementation: {inner!r} cannot be used: {_one_line(exc)}; install what it "
                              f"needs, or use one of {', '.join(attention_choices(cls))}") from exc
        log.warning("model.attn_implementation: %r cannot be checked on this machine without a GPU (%s); the chunk job "
                    "checks it when it loads the model", inner, _one_line(exc))
        return model, inner
    except Exception as exc:  # noqa: BLE001 - transformers refuses the implementation for this class
        raise ConfigError(
            f"model.attn_implementation: {inner!r} is not an attention implementation {owner} can run; use one of "
            f"{', '.join(attention_choices(cls))}, or leave it unset (qk-sniffer then uses {default})"
        ) from exc


def _counts(tc) -> tuple[int | None, int | None, int | None]:
    """(query heads, key/value heads, q/k head size) from the text config."""
    n_q = _int(tc, "num_attention_heads")
    n_kv = next((v for v in (_int(tc, a) for a in ("num_key_value_heads", "num_kv_heads", "n_head_kv")) if v), None)
    if n_kv is None:
        n_kv = 1 if getattr(tc, "multi_query", False) is True else n_q
    nope, rope = _int(tc, "qk_nope_head_dim"), _int(tc, "qk_rope_head_dim")
    hidden = _int(tc, "hidden_size")
    head_dim = nope + rope if nope and rope else _int(tc, "head_dim") or (hidden // n_q if hidden and n_q else None)
    return n_q, n_kv, head_dim


def _position_limit(config) -> tuple[int | None, str]:
    for c in (text_config(config), config):
        for name in ("n_positions", "max_position_embeddings"):
            value = _int(c, name)
            if value:
                return value, name
    return None, ""


def _learned_positions(backbone, limit: int | None) -> str | None:
    """The name of a learned absolute position table (an embedding other than the tokens' with ``limit`` rows)."""
    if backbone is None or not limit:
        return None
    tokens = backbone.get_input_embeddings()
    for name, module in backbone.named_modules():
        if isinstance(module, torch.nn.Embedding) and module is not tokens and (
                module.num_embeddings == limit or ("pos" in name.lower() and limit <= module.num_embeddings <= limit + 2)):
            return name
    return None


def _resolve(cfg: dict, config, owner: str, modules: dict, n_layers: int, counts: tuple):
    """modeling.resolve_capture against a geometry from the config (what the probe would measure)."""
    n_q, n_kv, head_dim = counts
    skipped = {i: f"{type(m).__name__} is cross-attention to image inputs, which does not run in a text-only forward"
               for i, m in modules.items() if "cross" in type(m).__name__.lower()}
    for i in _safe(lambda: text_config(config).cross_attention_layers) or []:
        skipped.setdefault(int(i), "a cross-attention layer, which does not run in a text-only forward")
    layers = {i: LayerGeometry(layer=i, module=modules.get(i), calls=1, n_q=n_q, n_kv=n_kv, q_dim=head_dim,
                               k_dim=head_dim) for i in range(n_layers) if i not in skipped}
    geometry = ModelGeometry(owner=owner, n_layers=n_layers, layers=layers, skipped=skipped)
    stub = SimpleNamespace(config=config, _qk_sniffer_geometry={True: geometry, False: geometry})
    try:
        return resolve_capture(cfg, stub)
    except UnsupportedModelError as exc:
        raise ConfigError(str(exc)) from exc


def _pad(cfg: dict, tok, vocab_rows: int | None) -> tuple[int, str]:
    if tok.pad_token_id is not None:
        pad, source = tok.pad_token_id, f"pad token {tok.pad_token!r}"
    else:  # what qk_sniffer.chunk pads with
        pad = tok.eos_token_id or 0
        source = f"eos token {tok.eos_token!r}" if tok.eos_token_id is not None else "token 0"
    batch = cfg["inference"]["batch_size"]
    if batch > 1 and tok.pad_token_id is None:
        log.info("tokenizer: %s has no pad token; batches of up to inference.batch_size=%d rows are padded on the right "
                 "with id %d (its %s) and run without a padding mask, where padding never changes a vector",
                 tokenizer_name(cfg), batch, pad, source)
    if batch > 1 and vocab_rows is not None and not 0 <= pad < vocab_rows:
        raise ConfigError(
            f"tokenizer.name: the padding id {pad} ({source}) of {tokenizer_name(cfg)!r} is outside the model's "
            f"{vocab_rows} token embeddings, so padded batches would fail; use the model's own tokenizer, or "
            "inference.batch_size: 1 (no padding)"
        )
    return pad, source


def check_model(cfg: dict) -> ModelInfo:
    """Check ``cfg``'s model, tokenizer and capture selection without loading weights; see the module doc."""
    _device_map(cfg["model"]["device_map"], torch.device("cpu"))  # a map other than auto needs accelerate
    config = _load_config(cfg)
    model_type = getattr(config, "model_type", "?")
    if has_adapter(model_type):
        patch_modeling_modules()
    cls, auto = model_class(config)
    key = "tokenizer.name" if cfg["tokenizer"].get("name") else "model.name"
    try:
        tok = load_tokenizer(cfg)
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{key}: could not load the tokenizer {tokenizer_name(cfg)!r}: {_one_line(exc)}") from exc
    model, inner = _meta_model(cfg, cls, auto, config)
    if model is not None and auto is not _causal_lm_auto():
        model = model.get_decoder()  # an image-text checkpoint runs its language model only
    backbone = backbone_of(model) if model is not None else None
    owner = type(model).__name__ if model is not None else (cls.__name__ if cls is not None else model_type)
    tc = text_config(config)
    modules = attention_modules(backbone) if backbone is not None else {}
    n_layers = _int(tc, "num_hidden_layers") or (max(modules) + 1 if modules else None)
    counts = _counts(tc)
    vocab_rows = backbone.get_input_embeddings().num_embeddings if backbone is not None else _int(tc, "vocab_size")
    spec = None
    if n_layers and all(counts):
        spec = _resolve(cfg, config, owner, modules, n_layers, counts)
        record = spec.head_sampling
        if record and record["requested"] > record["candidates"]:
            log.warning("capture.head_sampling.count: %d is more than the %d (layer, query head) pairs capture.layers, "
                        "capture.heads and capture.full_attention_only leave; all %d are captured",
                        record["requested"], record["candidates"], record["candidates"])
    else:
        log.warning("capture: the layer and head counts of %s cannot be read from its config; capture.layers and "
                    "capture.heads are checked when the chunk job loads the model", owner)
    limit, limit_key = _position_limit(config)
    learned = _learned_positions(backbone, limit)
    max_length = cfg["tokenizer"]["max_length"]
    if limit and max_length > limit:
        if learned:
            raise ConfigError(
                f"tokenizer.max_length: {max_length} is above the {limit} positions {owner} has learned embeddings for "
                f"({limit_key}: {limit}, {learned}); longer texts would index past that table: set "
                f"tokenizer.max_length <= {limit}"
            )
        log.warning("tokenizer.max_length: %d is above the model's position limit (%s: %d); texts longer than %d tokens "
                    "get rotary positions the model was not trained on: set tokenizer.max_length <= %d unless that is "
                    "intended", max_length, limit_key, limit, limit, limit)
    if vocab_rows is not None and len(tok) > vocab_rows:
        log.warning("tokenizer.name: %r has %d tokens but the model %d token embeddings; a text holding a token id "
                    ">= %d would fail in the forward", tokenizer_name(cfg), len(tok), vocab_rows, vocab_rows)
    pad, source = _pad(cfg, tok, vocab_rows)
    return ModelInfo(
        model_type=model_type, model_class=cls.__name__ if cls is not None else "remote code", decoder_class=owner,
        n_layers=n_layers, n_heads=counts[0], n_kv_heads=counts[1], head_dim=counts[2], max_positions=limit,
        learned_positions=learned, attn_implementation=inner, attn_choices=attention_choices(cls),
        vocab_rows=vocab_rows, tokenizer_class=type(tok).__name__, tokenizer_len=len(tok), pad_token_id=pad,
        pad_source=source, layers=list(spec.layers) if spec else [], query_heads=list(spec.query_heads) if spec else [],
        key_heads=list(spec.key_heads) if spec else [], skipped_layers=dict(spec.skipped_layers) if spec else {},
        head_sampling=spec.head_sampling if spec else None,
    )
