"""Configuration: load YAML, validate against the workflow schema, fill in defaults.

The schema in ``workflow/schemas/config.schema.yaml`` is the single source of truth; the
Snakefile validates with the same file. Errors name the key path, the offending value and
what is allowed, and suggest the closest key for typos.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"


def load_schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _resolve(schema: dict, root: dict) -> dict:
    ref = schema.get("$ref")
    if ref:
        node: Any = root
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        merged = dict(node)
        merged.update({k: v for k, v in schema.items() if k != "$ref"})
        return merged
    return schema


def _branch(schema: dict, instance: Any) -> dict:
    """The schema with the ``anyOf`` branch a mapping value is checked against merged in (nullable objects)."""
    for option in schema.get("anyOf", ()):
        if option.get("type") == "object" and isinstance(instance, dict):
            return {**schema, **option}
    return schema


def _fill_defaults(instance: Any, schema: dict, root: dict) -> None:
    schema = _branch(_resolve(schema, root), instance)
    if not isinstance(instance, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        sub = _resolve(sub, root)
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub, root)


def _same_value(a: Any, b: Any) -> bool:
    """Equal values of the same type (YAML's true is not 1, null is not "null")."""
    return type(a) is type(b) and a == b


def _normalize(instance: Any, schema: dict, root: dict, where: str = "") -> None:
    """Apply the schema's ``x-values-of`` and ``x-aliases`` in place (before defaults, so explicit keys are known)."""
    schema = _branch(_resolve(schema, root), instance)
    if not isinstance(instance, dict):
        return
    props = schema.get("properties", {})
    for key in list(instance):
        sub = _resolve(props.get(key, {}), root)
        for other, values in (sub.get("x-values-of") or {}).items():
            if any(_same_value(instance[key], v) for v in values):
                if other in instance and not _same_value(instance[other], instance[key]):
                    raise ConfigError(
                        f"{where}{key}: {instance[key]!r} is a value of {where}{other}, which the config sets to "
                        f"{instance[other]!r}; remove one of the two keys"
                    )
                instance[other] = instance.pop(key)
                break
        if key not in instance:
            continue
        for spelling, canonical in (sub.get("x-aliases") or {}).items():
            if _same_value(instance[key], spelling):
                instance[key] = copy.deepcopy(canonical)
                break
        _normalize(instance[key], sub, root, f"{where}{key}.")


def ignored_keys(schema: dict | None = None) -> list[str]:
    """Dotted paths of the keys the schema marks ``x-ignored`` (accepted from the original tool's configs)."""
    schema = schema or load_schema()
    out = []

    def walk(node: dict, prefix: str) -> None:
        for key, sub in (_resolve(node, schema).get("properties") or {}).items():
            sub = _resolve(sub, schema)
            if sub.get("x-ignored"):
                out.append(prefix + key)
            walk(sub, f"{prefix}{key}.")

    walk(schema, "")
    return out


def _path(err: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in err.absolute_path]
    return ".".join(parts) if parts else "<top level>"


def _leaves(err: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    """An ``anyOf`` error explained by the branch of the value's own type (so a mapping's typo gets its did-you-mean)."""
    if err.validator == "anyOf" and err.context:
        own = [e for e in err.context if e.validator != "type"]
        if own:
            return [leaf for e in own for leaf in _leaves(e)]
    return [err]


def _describe(err: jsonschema.ValidationError, schema_root: dict) -> str:
    where = _path(err)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        lines = []
        for key in extra:
            full = f"{where}.{key}" if where != "<top level>" else key
            guess = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean '{guess[0]}'?" if guess else ""
            lines.append(f"unknown key '{full}'.{hint} Allowed keys here: {', '.join(allowed)}.")
        return " ".join(lines)
    if err.validator == "enum":
        return f"{where}: {err.instance!r} is not allowed; choose one of {err.validator_value}."
    if err.validator == "type":
        want = err.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        return f"{where}: {err.instance!r} has the wrong type; expected {want}."
    if err.validator in ("minimum", "exclusiveMinimum"):
        op = ">=" if err.validator == "minimum" else ">"
        return f"{where}: {err.instance!r} is too small; it must be {op} {err.validator_value}."
    if err.validator == "required":
        return f"{where}: {err.message}; add it to the config."
    if err.validator == "anyOf":
        kinds = " or ".join(str(o.get("type")).replace("object", "a mapping") for o in err.validator_value)
        return f"{where}: {err.instance!r} has the wrong type; expected {kinds}."
    return f"{where}: {err.message}"


def validate_config(raw: dict | None, *, source: str = "config") -> dict:
    """Validate ``raw`` against the schema and return a copy with every default filled in."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}.")
    schema = load_schema()
    cfg = copy.deepcopy(raw)
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema)
    errors = [leaf for e in validator.iter_errors(cfg) for leaf in _leaves(e)]
    errors.sort(key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        msgs = [_describe(e, schema) for e in errors]
        raise ConfigError(f"invalid {source}:\n  - " + "\n  - ".join(dict.fromkeys(msgs)))
    _normalize(cfg, schema, schema)
    _fill_defaults(cfg, schema, schema)
    return cfg


def load_config(path: str | Path) -> dict:
    """Read a YAML (or JSON) config file and validate it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass the path of a YAML config (see config/README.md).")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    return validate_config(raw, source=f"config file {p}")


def sanitize_split(name: str) -> str:
    """The split name for a model name: every non-word character becomes ``_``."""
    return re.sub(r"\W", "_", name)


def split_name(cfg: dict) -> str:
    name = cfg["output"].get("split_name") or sanitize_split(cfg["model"]["name"])
    if not re.fullmatch(r"\w+(\.\w+)*", name):
        raise ConfigError(
            f"output.split_name: {name!r} is not a valid split name for datasets "
            "(letters, digits, _ and inner dots only); set output.split_name."
        )
    return name


def data_root(cfg: dict) -> Path:
    root = cfg["output"].get("data_root")
    if root:
        return Path(root)
    repo = cfg["output"].get("hf_repo_id")
    name = repo.split("/")[-1] if repo else split_name(cfg)
    return Path("data") / name


def tokenizer_name(cfg: dict) -> str:
    return cfg["tokenizer"].get("name") or cfg["model"]["name"]


def sampling_settings(cfg: dict) -> dict:
    """The settings that decide which tokens are captured and how they are bucketed.

    They are recorded per split; appending with different values is refused unless forced.
    """
    cap = cfg["capture"]
    return {
        "type": cap["sampler"]["type"],
        "base_rate": float(cap["sampler"]["base_rate"]),
        "seed": int(cap["sampler"]["seed"]),
        "per_head": bool(cap["sampler"]["per_head"]),
        "min_bucket_size": int(cap["min_bucket_size"]),
        "capture_pre_rope": bool(cap["capture_pre_rope"]),
        "max_length": int(cfg["tokenizer"]["max_length"]),
        "max_rows_per_batch": cap["max_rows_per_batch"],
    }


_ADDED_LATER = {"dataset.streaming": False, "capture.head_sampling": None, "capture.max_rows_per_batch": None}


def fingerprint_inputs(cfg: dict) -> dict:
    """Every setting that changes the rows a chunk produces for its range of examples.

    Not batch size or padding side, and not ``dataset.max_samples`` or the chunking (``workflow.num_chunks``,
    ``workflow.chunk_size``): those decide which examples a chunk holds, which its manifest records apart
    (``qk_sniffer.chunk.plan``). Ignored keys are left out, and so are keys added later while at their default,
    so that configs which do not use them keep the fingerprint they had.
    """
    ignored = set(ignored_keys())

    def section(name: str, leave_out=()) -> dict:
        return {k: v for k, v in cfg[name].items() if f"{name}.{k}" not in ignored and k not in leave_out
                and not (f"{name}.{k}" in _ADDED_LATER and v == _ADDED_LATER[f"{name}.{k}"])}

    return {
        "dataset": section("dataset", leave_out=("max_samples",)),
        "model": cfg["model"],
        "tokenizer": {k: cfg["tokenizer"][k] for k in ("name", "revision", "max_length")},
        "capture": section("capture"),
        "split": split_name(cfg),
    }


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def chunk_fingerprint(cfg: dict) -> str:
    """Hash of :func:`fingerprint_inputs`: two chunks over one range of examples with one fingerprint hold the
    same rows."""
    return _hash(fingerprint_inputs(cfg))


def legacy_chunk_fingerprint(cfg: dict, max_samples, num_chunks) -> str:
    """The fingerprint manifests recorded before chunk ranges stopped depending on ``max_samples`` (it hashed
    ``max_samples`` and ``num_chunks`` too), for ``cfg`` run with those two values."""
    relevant = fingerprint_inputs(cfg)
    relevant["dataset"] = {**relevant["dataset"], "max_samples": max_samples}
    relevant["num_chunks"] = num_chunks
    return _hash(relevant)
