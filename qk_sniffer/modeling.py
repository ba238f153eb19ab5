"""Loading models and tokenizers, resolving what to capture, and the models/ extension path."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from .capture import CaptureSpec
from .capture_attention import CAPTURE_PREFIX, register_capture_attention
from .config import REPO_ROOT, ConfigError, tokenizer_name
from .errors import UnsupportedModelError
from .heads import heads_by_layer, sample_heads, selection_record
from .sampling import SamplerSpec

MODELS_DIR = REPO_ROOT / "models"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def patch_modeling_modules(models_dir: str | Path | None = None) -> list[str]:
    """Alias ``models/<name>/modeling_<name>.py`` into ``transformers.models.<name>``.

    Returns the names patched. Call before loading the model so the patched classes are used.
    """
    import transformers.models as tm

    root = Path(models_dir) if models_dir else MODELS_DIR
    patched = []
    if not root.is_dir():
        return patched
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        name = sub.name
        file = sub / f"modeling_{name}.py"
        if not file.is_file():
            continue
        modname = f"transformers.models.{name}.modeling_{name}"
        spec = importlib.util.spec_from_file_location(modname, file)
        module = importlib.util.module_from_spec(spec)
        # make sure the package exists so relative imports inside the file resolve
        importlib.import_module(f"transformers.models.{name}")
        sys.modules[modname] = module
        spec.loader.exec_module(module)
        setattr(getattr(tm, name), f"modeling_{name}", module)
        pkg = sys.modules[f"transformers.models.{name}"]
        for attr in dir(module):
            if attr.endswith(("Model", "ForCausalLM", "PreTrainedModel", "ForConditionalGeneration")):
                try:
                    setattr(pkg, attr, getattr(module, attr))
                except Exception:  # noqa: BLE001 - lazy module proxies may refuse
                    pass
        _register_auto_classes(module)
        patched.append(name)
    return patched


def _register_auto_classes(module) -> None:
    from transformers import AutoModel, AutoModelForCausalLM

    for attr in dir(module):
        obj = getattr(module, attr)
        if not isinstance(obj, type) or not hasattr(obj, "config_class") or obj.__module__ != module.__name__:
            continue
        for auto, suffix in ((AutoModelForCausalLM, "ForCausalLM"), (AutoModel, "Model")):
            if attr.endswith(suffix) and not attr.endswith("PreTrainedModel") and obj.config_class is not None:
                try:
                    auto.register(obj.config_class, obj, exist_ok=True)
                except Exception:  # noqa: BLE001 - already registered with a different class
                    pass


def has_adapter(model_type: str) -> bool:
    return (MODELS_DIR / model_type / f"modeling_{model_type}.py").is_file()


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def load_tokenizer(cfg: dict):
    from transformers import AutoTokenizer

    name = tokenizer_name(cfg)
    _check_local_path(name, "tokenizer.name" if cfg["tokenizer"].get("name") else "model.name")
    own = name == cfg["model"]["name"]  # the model's own tokenizer: model.trust_remote_code covers it too
    tok = AutoTokenizer.from_pretrained(
        name, revision=cfg["tokenizer"].get("revision"),
        trust_remote_code=cfg["tokenizer"]["trust_remote_code"] or (own and cfg["model"]["trust_remote_code"]),
    )
    return tok


def _check_local_path(name: str, key: str) -> None:
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or Path(name).exists()
    if looks_local and not Path(name).expanduser().exists():
        raise ConfigError(
            f"{key}: {name!r} looks like a local path but does not exist "
            f"(relative paths are resolved from {Path.cwd()}); fix the path or use a Hub id like org/model"
        )


def _causal_lm_auto():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


ATTENTION_FLAGS = {"sdpa": "_supports_sdpa", "flash": "_supports_flash_attn", "flex": "_supports_flex_attn"}


def model_class(config):
    """(class, auto class) a checkpoint loads as: its causal LM, or its image-text model whose language
    model is then run text-only (Mistral 3). ``(None, AutoModelForCausalLM)`` for remote code."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        try:
            return auto._model_mapping[type(config)], auto
        except KeyError:
            continue
    return None, AutoModelForCausalLM


def attention_choices(cls) -> list[str]:
    """The attention implementations transformers lets ``cls`` run (eager always)."""
    if cls is None:
        return ["eager", "sdpa"]
    out = ["eager"]
    for name, flag in (("sdpa", "_supports_sdpa"), ("flash_attention_2", "_supports_flash_attn"),
                       ("flex_attention", "_supports_flex_attn")):
        if getattr(cls, flag, False):
            out.append(name)
    return out


def choose_attention(cls, requested: str | None) -> str:
    """What transformers would pick by itself (sdpa where the class supports it, else eager), or the
    explicit choice after checking the class can run it."""
    default = "sdpa" if cls is None or getattr(cls, "_supports_sdpa", False) else "eager"
    if requested is None:
        return default
    inner = requested[len(CAPTURE_PREFIX):] if requested.startswith(CAPTURE_PREFIX) else requested
    flag = next((f for key, f in ATTENTION_FLAGS.items() if key in inner), None)
    if cls is not None and flag is not None and not getattr(cls, flag, False):
        raise ConfigError(
            f"model.attn_implementation: {inner!r} is not supported by {cls.__name__} (transformers refuses it, e.g. it "
            f"would drop softcapping or attention sinks); use one of {', '.join(attention_choices(cls))}, or leave it "
            f"unset (qk-sniffer then uses {default})"
        )
    return inner


def load_model(cfg: dict, device: torch.device):
    """Load the causal LM (the language model of an image-text checkpoint) with the capture attention
    wrapped around the chosen implementation; a load that leaves weights missing stops here."""
    from transformers import AutoConfig

    mcfg = cfg["model"]
    name = mcfg["name"]
    _check_local_path(name, "model.name")
    config = AutoConfig.from_pretrained(name, revision=mcfg.get("revision"), trust_remote_code=mcfg["trust_remote_code"])
    tcfg = text_config(config)
    for key, value in (mcfg.get("config_overrides") or {}).items():
        target = config if hasattr(config, key) or not hasattr(tcfg, key) else tcfg
        setattr(target, key, value)
    model_type = getattr(config, "model_type", "?")
    adapter = has_adapter(model_type)
    if adapter:
        patch_modeling_modules()
    cls, auto = model_class(config)
    inner = choose_attention(cls, mcfg.get("attn_implementation"))
    attn = inner if adapter else register_capture_attention(inner)
    dtype = mcfg["dtype"]
    kwargs = dict(
        config=config, revision=mcfg.get("revision"), trust_remote_code=mcfg["trust_remote_code"],
        dtype=("auto" if dtype == "auto" else DTYPES[dtype]), attn_implementation=attn, output_loading_info=True,
    )
    device_map = _device_map(mcfg.get("device_map"), device)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model, info = auto.from_pretrained(name, **kwargs)
    except KeyError as exc:  # models that pick an attention class by name from a table of their own
        if CAPTURE_PREFIX not in str(exc):
            raise
        owner = cls.__name__ if cls is not None else model_type
        raise UnsupportedModelError(
            f"{owner} does not use transformers' attention interface (it looks its attention up in a table of its own); "
            f"add an adapter: copy its modeling file to models/{model_type}/modeling_{model_type}.py and call "
            "get_active_sniffer().capture(layer_idx, query_states, key_states, positions, sliding_window) in its "
            "attention forward (see models/README.md)"
        ) from exc
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":  # the config and tokenizer read, the weights do not
            raise
        raise ConfigError(
            f"model.name: the weights of {name!r} cannot be read ({type(exc).__name__}: {exc}); the checkpoint is "
            "damaged or incomplete: download it again (or point model.name at a complete copy)"
        ) from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UnsupportedModelError(
            f"model.name: loading {name!r} as {type(model).__name__} left {len(missing)} weight(s) missing "
            f"(e.g. {', '.join(missing[:3])}); refusing to run random weights: check the checkpoint and model.revision"
        )
    if auto is not _causal_lm_auto():
        # an image-text checkpoint run text-only: keep its language model, free the vision tower
        model = model.get_decoder()
    model.qk_sniffer_attention = inner
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def _device_map(value, device: torch.device):
    """``model.device_map`` as given to from_pretrained: ``auto`` with one device (the CPU, or one visible GPU) is
    that device, which needs no accelerate; any other map needs the accelerate package."""
    if value is None or (value == "auto" and (device.type == "cpu" or torch.cuda.device_count() <= 1)):
        return None
    if importlib.util.find_spec("accelerate") is None:
        raise ConfigError(f"model.device_map: {value!r} needs the accelerate package (pip install accelerate); "
                          "or set model.device_map: null to load the model on one device")
    return value


def backbone_of(model) -> torch.nn.Module:
    """The decoder stack without the LM head."""
    try:
        dec = model.get_decoder()
    except Exception:  # noqa: BLE001
        dec = None
    if isinstance(dec, torch.nn.Module) and hasattr(dec, "get_input_embeddings"):
        return dec
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def attention_modules(backbone) -> dict[int, torch.nn.Module]:
    """layer index -> attention module of the decoder stack."""
    found: dict[int, torch.nn.Module] = {}
    for _, module in backbone.named_modules():
        idx = getattr(module, "layer_idx", None)
        if idx is None or not isinstance(idx, int):
            continue
        if any(hasattr(module, a) for a in ("q_proj", "qkv_proj", "query_key_value", "c_attn")) and idx not in found:
            found[idx] = module
    return found


def _safe(read, default=None):
    """A config field, or ``default`` where the config cannot answer (per-layer attributes raise)."""
    try:
        return read()
    except Exception:  # noqa: BLE001 - configs with per-layer attributes raise their own error types
        return default


def layer_attention(config, n_layers: int) -> list[tuple[str, int | None]]:
    """(kind, size) per layer: ("full", None), ("sliding", window) or ("chunked", chunk size)."""
    tc = text_config(config)
    window = _safe(lambda: tc.sliding_window)
    chunk = _safe(lambda: tc.attention_chunk_size)
    types = _safe(lambda: tc.layer_types)
    if types:
        kinds = {"sliding_attention": ("sliding", window), "chunked_attention": ("chunked", chunk)}
        return [kinds.get(types[i], ("full", None)) if i < len(types) else ("full", None) for i in range(n_layers)]
    if window and _safe(lambda: tc.use_sliding_window, True) is not False:
        return [("sliding", window)] * n_layers
    return [("full", None)] * n_layers


def layer_windows(config, n_layers: int | None = None) -> list[int | None]:
    """The sliding window of each layer (None for full or chunked attention), from the config."""
    n = n_layers if n_layers is not None else _safe(lambda: text_config(config).num_hidden_layers, 0)
    return [size if kind == "sliding" else None for kind, size in layer_attention(config, n)]


def model_geometry(model, *, pre_rope: bool):
    """The probe's geometry of ``model`` (cached on the model)."""
    from .probe import probe_geometry

    cache = model.__dict__.setdefault("_qk_sniffer_geometry", {})
    if pre_rope not in cache:
        n_layers = _safe(lambda: text_config(model.config).num_hidden_layers)
        cache[pre_rope] = probe_geometry(model, backbone_of(model), pre_rope=pre_rope, n_layers=n_layers)
    return cache[pre_rope]


def _select_layers(cap: dict, geometry, attention: list) -> tuple[list[int], dict[int, str]]:
    n_layers = geometry.n_layers
    skipped = dict(geometry.skipped)
    for i, g in geometry.layers.items():
        if g.calls > 1:
            skipped[i] = (f"the attention function runs {g.calls} times in one forward of this layer (differential or "
                          "looped attention); its calls cannot be told apart")
    if cap["layers"] is None:
        layers = [i for i in range(n_layers) if i not in skipped]
        if not layers:
            reasons = sorted(set(skipped.values()))
            raise UnsupportedModelError(f"{geometry.owner}: no layer can be captured: {'; '.join(reasons)}")
    else:
        layers = []
        for v in cap["layers"]:
            if not -n_layers <= v < n_layers:
                raise ConfigError(
                    f"capture.layers: layer {v} is out of range; the model has {n_layers} layers "
                    f"(use 0..{n_layers - 1}, or negative indices from the end)"
                )
            if v % n_layers in skipped:
                raise ConfigError(f"capture.layers: layer {v % n_layers} cannot be captured: {skipped[v % n_layers]}; "
                                  "remove it from capture.layers")
            layers.append(v % n_layers)
        layers = sorted(set(layers))
    if cap["full_attention_only"]:
        layers = [layer for layer in layers if attention[layer][0] == "full"]
        if not layers:
            raise ConfigError("capture.full_attention_only: none of the selected layers uses full attention")
    return layers, skipped


def _uniform(values: dict, what: str, owner: str) -> int:
    found = sorted(set(values.values()))
    if len(found) != 1:
        detail = ", ".join(f"layer {i}: {v}" for i, v in sorted(values.items()))
        raise UnsupportedModelError(f"{owner}: {what} differs between the captured layers ({detail}); "
                                    "capture the layers of one size at a time with capture.layers")
    return found[0]


def resolve_capture(cfg: dict, model) -> CaptureSpec:
    """Check layer/head indices against what the model's attention receives and build the capture spec."""
    cap = cfg["capture"]
    pre_rope = bool(cap["capture_pre_rope"])
    geometry = model_geometry(model, pre_rope=pre_rope)
    n_layers = geometry.n_layers
    attention = layer_attention(model.config, n_layers)
    layers, skipped = _select_layers(cap, geometry, attention)
    if not layers:
        raise ConfigError("capture.layers: the list is empty, so nothing would be captured; list layer indices, "
                          "or use null for every layer")
    kinds = tuple(k for k, on in (("q", cap["capture_queries"]), ("k", cap["capture_keys"])) if on)
    if not kinds:
        raise ConfigError("capture: capture_queries and capture_keys are both false; nothing would be captured")
    geo = {i: geometry.layers[i] for i in layers}
    n_q = _uniform({i: g.n_q for i, g in geo.items()}, "the number of query heads", geometry.owner)
    n_kv = _uniform({i: g.n_kv for i, g in geo.items()}, "the number of key heads", geometry.owner)
    dims = {**({(i, "q"): g.q_dim for i, g in geo.items()} if "q" in kinds else {}),
            **({(i, "k"): g.k_dim for i, g in geo.items()} if "k" in kinds else {})}
    head_dim = _uniform(dims, "the query/key head size", geometry.owner)
    if cap["heads"] is None:
        q_heads = list(range(n_q))
        kv_heads = list(range(n_kv))
    else:
        for h in cap["heads"]:
            if not 0 <= h < n_q:
                raise ConfigError(
                    f"capture.heads: head {h} is out of range; the model has {n_q} query heads "
                    f"(use 0..{n_q - 1}); key heads follow from the query heads ({n_kv} key/value heads)"
                )
        q_heads = sorted(set(cap["heads"]))
        group = max(n_q // n_kv, 1)
        kv_heads = sorted({h // group for h in q_heads})
    layer_heads = record = None
    if cap["head_sampling"]:
        picked = sample_heads(layers, q_heads, cap["head_sampling"]["count"], cap["head_sampling"]["seed"])
        layer_heads = heads_by_layer(picked, n_q, n_kv)
        record = selection_record(cap["head_sampling"], picked, len(layers) * len(q_heads), layer_heads)
        layers = sorted(layer_heads)
        q_heads = sorted({h for e in layer_heads.values() for h in e["q"]})
        kv_heads = sorted({h for e in layer_heads.values() for h in e["k"]})
    return CaptureSpec(
        layers=layers, query_heads=q_heads, key_heads=kv_heads, kinds=kinds,
        sampler=SamplerSpec.from_config(cfg), vector_dtype=DTYPES[cap["vector_dtype"]],
        pre_rope=pre_rope, head_dim=head_dim,
        layer_windows={i: (size if kind == "sliding" else None) for i, (kind, size) in enumerate(attention)},
        geometry=geometry, n_layers=n_layers, n_heads=n_q, n_kv_heads=n_kv,
        layer_attention={i: kind if size is None else f"{kind}:{size}" for i, (kind, size) in enumerate(attention)},
        skipped_layers=skipped, layer_heads=layer_heads, head_sampling=record,
    )


def pick_device(cfg: dict) -> torch.device:
    want = cfg["inference"]["device"]
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("inference.device: cuda was asked for but no GPU is visible; use auto or cpu")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", 0)
