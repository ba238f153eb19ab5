"""The census's independent reference (benchmarks/census.py).

An attention function of the census's own (registered as census_ref_sdpa / census_ref_eager) records
the query and key of every attention call per layer, and wrappers around the modeling modules'
``apply_rotary*`` functions record each rotation's input and output, on a plain load of the checkpoint.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from .census_build import REF

# -- the independent reference ------------------------------------------------------------------

class Recorder:
    """Per layer: the query/key of every attention call, and (input, output) of every rotation call."""

    def __init__(self):
        self.attn: dict[int, list] = defaultdict(list)
        self.rot: dict[int, list] = defaultdict(list)
        self.stack: list[int] = []
        self.depth = 0

    def layer(self, module=None) -> int:
        idx = getattr(module, "layer_idx", None)
        return idx if isinstance(idx, int) else (self.stack[-1] if self.stack else -1)


def _register_reference(rec: Recorder) -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    def make(inner: str):
        def attention(module, query, key, value, attention_mask, **kwargs):
            rec.attn[rec.layer(module)].append((query.detach().clone(), key.detach().clone()))
            fn = sdpa_attention_forward
            if inner == "eager":
                fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", sdpa_attention_forward)
            return fn(module, query, key, value, attention_mask, **kwargs)
        return attention

    for inner in ("sdpa", "eager"):
        AttentionInterface.register(f"{REF}_{inner}", make(inner))
        ALL_MASK_ATTENTION_FUNCTIONS.register(f"{REF}_{inner}", ALL_MASK_ATTENTION_FUNCTIONS[inner])


def _wrap_rotary(model, rec: Recorder) -> list:
    """Wrap every module-level ``apply_rotary*`` function the model's modules call; return how to undo it."""
    import torch

    spaces = {}
    for m in model.modules():
        g = getattr(getattr(type(m), "forward", None), "__globals__", None)
        if g is not None and str(g.get("__name__", "")).startswith("transformers."):
            spaces[id(g)] = g

    def wrap(fn):
        def wrapper(*args, **kwargs):
            if rec.depth:
                return fn(*args, **kwargs)
            rec.depth += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                rec.depth -= 1
            ins = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            for o in out if isinstance(out, (tuple, list)) else (out,):
                i = next((t for t in ins if isinstance(o, torch.Tensor) and t.shape == o.shape), None)
                if i is not None:
                    ins.remove(i)
                    rec.rot[rec.layer()].append((i.detach().clone(), o.detach().clone()))
            return out
        return wrapper

    undo = []
    for g in spaces.values():
        for name, fn in list(g.items()):
            if name.startswith("apply_rotary") and callable(fn):
                g[name] = wrap(fn)
                undo.append((g, name, fn))
    return undo


def reference(ckpt: Path, ids, mask, pos) -> tuple[Recorder, str, bool]:
    """Run a fresh load of the checkpoint twice (the first is a warm-up); return what the second recorded,
    the attention implementation that ran, and whether the model has a rotary module no wrapped function used.

    The recording attention wraps sdpa, else the model's eager attention; a model that accepts neither runs
    plain (nothing recorded: whatever qk-sniffer captures from it stays unverified)."""
    import torch
    from transformers import AutoModelForCausalLM

    rec = Recorder()
    _register_reference(rec)
    first = None
    for impl in (f"{REF}_sdpa", f"{REF}_eager", "eager"):
        try:
            return _reference_run(AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation=impl, dtype=torch.float32),
                                  rec, ids, mask, pos) + (impl.rsplit("_", 1)[-1] if impl != "eager" else "plain eager",)
        except Exception as exc:  # noqa: BLE001 - try the next implementation, report the first failure
            first = first or exc
    raise first


def _reference_run(model, rec: Recorder, ids, mask, pos) -> tuple:
    import torch

    model.eval()

    def hooks_for(module, idx: int) -> list:
        def enter(mod, args):
            rec.stack.append(idx)

        def leave(mod, args, output):
            rec.stack.pop()
        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    # the current layer: the innermost module with an int layer_idx, else the position in the layer stack
    # (the longest ModuleList), for attention modules without one (shared blocks)
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    hooks = [h for i, m in enumerate(max(stacks, key=len) if stacks else []) for h in hooks_for(m, i)]
    for m in model.modules():
        if isinstance(getattr(m, "layer_idx", None), int):
            hooks += hooks_for(m, m.layer_idx)
    undo = _wrap_rotary(model, rec)
    has_rope = any("rotary" in type(m).__name__.lower() or "rope" in type(m).__name__.lower() for m in model.modules())
    try:
        with torch.no_grad():
            for _ in range(2):
                rec.attn.clear()
                rec.rot.clear()
                rec.stack.clear()
                rec.depth = 0
                model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        for g, name, fn in undo:
            g[name] = fn
        for h in hooks:
            h.remove()
    return (rec, has_rope and not undo)


def _as_bhsd(t, like):
    """``t`` ([B,h,S,r], [B,S,h,r] or [B,S,r]) as [B,H,S,r] next to ``like`` [B,H,S,D], or None."""
    b, h, s, _ = like.shape
    if t.dim() == 3 and t.shape[:2] == (b, s):
        t = t.unsqueeze(1)
    if t.dim() != 4 or t.shape[0] != b:
        return None
    if t.shape[2] != s and t.shape[1] == s:
        t = t.transpose(1, 2)
    if t.shape[2] != s or h % t.shape[1]:
        return None
    return t.repeat_interleave(h // t.shape[1], dim=1) if t.shape[1] != h else t


def pre_rope_reference(attn_in, pairs, kind: str):
    """The pre-RoPE states behind the attention input ``attn_in`` of one kind, and how they were found.

    "slice": a rotation's output found in ``attn_in`` (whole or a slice of it) and replaced by its input;
    "input": no output found (the model transforms q/k after the rotation, e.g. a norm): the rotation's
    own input, q from the layer's first rotation pair and k from its second, when it is full width;
    "none": no rotation ran in the layer, ``attn_in`` itself; None: rotations ran but none fits.
    """
    import torch

    for inp, out in pairs:
        o, i = _as_bhsd(out, attn_in), _as_bhsd(inp, attn_in)
        if o is None or i is None or o.shape != i.shape:
            continue
        r = o.shape[-1]
        for off in range(attn_in.shape[-1] - r + 1):
            if torch.allclose(attn_in[..., off:off + r], o, atol=1e-6, rtol=0):
                ref = attn_in.clone()
                ref[..., off:off + r] = i
                return ref, "slice"
    if not pairs:
        return attn_in, "none"
    index = 0 if kind == "q" else 1
    i = _as_bhsd(pairs[index][0], attn_in) if index < len(pairs) else None
    return (i, "input") if i is not None and i.shape == attn_in.shape else (attn_in, None)
