"""Loading models and tokenizers, resolving what to capture, and the models/ extension path."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from .capture import CaptureSpec, UnsupportedModelError, register_capture_attention
from .config import REPO_ROOT, ConfigError, tokenizer_name
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
    tok = AutoTokenizer.from_pretrained(
        name, revision=cfg["tokenizer"].get("revision"), trust_remote_code=cfg["model"]["trust_remote_code"],
    )
    return tok


def _check_local_path(name: str, key: str) -> None:
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or Path(name).exists()
    if looks_local and not Path(name).expanduser().exists():
        raise ConfigError(
            f"{key}: {name!r} looks like a local path but does not exist "
            f"(relative paths are resolved from {Path.cwd()}); fix the path or use a Hub id like org/model"
        )


def load_model(cfg: dict, device: torch.device):
    """Load the causal LM with the capture attention wrapped around the configured implementation."""
    from transformers import AutoConfig, AutoModelForCausalLM

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
    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        cls = None  # remote code or an unknown architecture: checked after loading
    if cls is not None and not adapter and not getattr(cls, "_supports_attention_backend", False):
        raise _unsupported(cls.__name__, model_type)
    if adapter:
        patch_modeling_modules()
        attn = mcfg["attn_implementation"]
    else:
        attn = register_capture_attention(mcfg["attn_implementation"])
    dtype = mcfg["dtype"]
    kwargs = dict(
        config=config, revision=mcfg.get("revision"), trust_remote_code=mcfg["trust_remote_code"],
        dtype=("auto" if dtype == "auto" else DTYPES[dtype]), attn_implementation=attn,
    )
    if mcfg.get("device_map") is not None:
        kwargs["device_map"] = mcfg["device_map"]
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if not adapter and not getattr(model, "_supports_attention_backend", False):
        raise _unsupported(type(model).__name__, model_type)
    if mcfg.get("device_map") is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def _unsupported(class_name: str, model_type: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{class_name} does not use transformers' attention interface, and there is no adapter for model_type "
        f"{model_type!r}. Add one: copy its modeling file to models/{model_type}/modeling_{model_type}.py and call "
        "get_active_sniffer().capture(layer_idx, query_states, key_states, positions, sliding_window) in its "
        "attention forward (see models/README.md)."
    )


def backbone_of(model) -> torch.nn.Module:
    """The decoder stack without the LM head."""
    try:
        dec = model.get_decoder()
    except Exception:  # noqa: BLE001
        dec = None
    return dec if dec is not None else getattr(model, "model", model)


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


def layer_windows(config) -> list[int | None]:
    """The sliding window of each layer (None for full causal attention), from the config."""
    tc = text_config(config)
    n = tc.num_hidden_layers
    window = getattr(tc, "sliding_window", None)
    types = getattr(tc, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    if window and getattr(tc, "use_sliding_window", True):
        return [window] * n
    return [None] * n


def head_counts(config) -> tuple[int, int, int]:
    tc = text_config(config)
    n_q = tc.num_attention_heads
    n_kv = getattr(tc, "num_key_value_heads", None) or n_q
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // n_q
    return n_q, n_kv, head_dim


def resolve_capture(cfg: dict, config) -> CaptureSpec:
    """Check layer/head indices against the model and build the capture spec."""
    cap = cfg["capture"]
    tc = text_config(config)
    n_layers = tc.num_hidden_layers
    n_q, n_kv, head_dim = head_counts(config)
    windows = layer_windows(config)

    if cap["layers"] is None:
        layers = list(range(n_layers))
    else:
        layers = []
        for v in cap["layers"]:
            if not -n_layers <= v < n_layers:
                raise ConfigError(
                    f"capture.layers: layer {v} is out of range; the model has {n_layers} layers "
                    f"(use 0..{n_layers - 1}, or negative indices from the end)"
                )
            layers.append(v % n_layers)
        layers = sorted(set(layers))
    if cap["full_attention_only"]:
        layers = [layer for layer in layers if windows[layer] is None]
        if not layers:
            raise ConfigError("capture.full_attention_only: none of the selected layers uses full attention")

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
        group = n_q // n_kv
        kv_heads = sorted({h // group for h in q_heads})
    kinds = tuple(k for k, on in (("q", cap["capture_queries"]), ("k", cap["capture_keys"])) if on)
    if not kinds:
        raise ConfigError("capture: capture_queries and capture_keys are both false; nothing would be captured")
    return CaptureSpec(
        layers=layers, query_heads=q_heads, key_heads=kv_heads, kinds=kinds,
        sampler=SamplerSpec.from_config(cfg), vector_dtype=DTYPES[cap["vector_dtype"]],
        pre_rope=bool(cap["capture_pre_rope"]), head_dim=head_dim,
        layer_windows={i: windows[i] for i in range(n_layers)},
    )


def pick_device(cfg: dict) -> torch.device:
    want = cfg["inference"]["device"]
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("inference.device: cuda was asked for but no GPU is visible; use auto or cpu")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", 0)
