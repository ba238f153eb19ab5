"""Pre-RoPE capture defined by the rotation itself.

Pre-RoPE queries and keys are exactly the tensors a model's rotary function receives, whatever
norms come before or after it and whatever its modules are called. qk-sniffer wraps the
rotary functions of the attention module's own modeling module (module-level functions named
``apply_rotary*`` or ``apply_*rope*``, looked up in the globals the attention forward resolves
names in), records what each call received and returned, and hands those records to the next
call of the attention function.

How a layer's pre-RoPE vector is assembled from those records is a :class:`PreRopeRecipe`,
found on a short probe forward by exact comparison of the rotation's output with what the
attention function received:

* ``attention``: no rotation ran in the layer (no RoPE, or a NoPE layer): the pre-RoPE vector
  is what attention receives;
* ``whole``: the rotation received whole heads; the pre-RoPE vector is its input;
* ``head`` / ``tail``: the rotation received the first / last ``width`` dims of each head
  (partial rotary, MLA): the pre-RoPE vector is what attention receives with that slice put back
  to the rotation's input.

Where the rotation's output is not found in the attention input (a norm or scaling after the
rotation) the input must be whole heads of the attention's shape (``whole``), or the layer is
refused. The first batch of every run re-derives each recipe on its real tensors and puts the
reconstructed inputs through the model's own rotary function again, which must reproduce the
recorded output bit for bit (:func:`check_recipe`).
"""

from __future__ import annotations

import inspect
import re
import sys
import types
from dataclasses import dataclass

import torch

from .errors import UnsupportedModelError

_ROTARY_NAME = re.compile(r"^apply_(rotary|.*rope)", re.IGNORECASE)


@dataclass
class RotationCall:
    fn: object  # the original function
    args: tuple
    kwargs: dict
    inputs: tuple  # the rotated tensors it received (q, k) or (x,)
    outputs: tuple  # what it returned for each


@dataclass(frozen=True)
class PreRopeRecipe:
    """Where a layer's pre-RoPE vector of one kind comes from (see the module docstring)."""

    source: str  # "attention" | "whole" | "head" | "tail"
    call: int = 0  # index of the rotation call within the layer
    slot: int = 0  # which rotated tensor of that call (0: first argument, 1: second)
    layout: str = "bhsd"  # layout of the rotated tensor: [B, H, S, D] or [B, S, H, D]
    width: int = 0  # rotated dims per head (head/tail)
    post_transform: bool = False  # attention received something else than the rotation's output

    def describe(self) -> str:
        if self.source == "attention":
            return "no rotation in this layer: what attention receives"
        where = {"whole": "whole heads", "head": f"first {self.width} dims", "tail": f"last {self.width} dims"}[self.source]
        extra = "; a transform after the rotation changes what attention receives" if self.post_transform else ""
        return f"the rotary function's input ({where}){extra}"


class RotaryTap:
    """Wraps the rotary functions a set of attention classes call; restores them on :meth:`remove`."""

    def __init__(self):
        self._patched: list[tuple[dict, str, object]] = []
        self.pending: list[RotationCall] = []
        self.recording = False

    def install(self, attention_modules) -> int:
        """Wrap the rotary functions visible to each module's forward; return how many were wrapped."""
        seen_globals: set[int] = set()
        for glb in (g for module in attention_modules for g in _namespaces(type(module))):
            if id(glb) in seen_globals:
                continue
            seen_globals.add(id(glb))
            for name, fn in list(glb.items()):
                if isinstance(fn, types.FunctionType) and _ROTARY_NAME.match(name) and "vision" not in name.lower():
                    if getattr(fn, "__qk_sniffer_wrapped__", None) is not None:
                        continue
                    glb[name] = self._wrap(fn)
                    self._patched.append((glb, name, fn))
        return len(self._patched)

    def remove(self) -> None:
        for glb, name, fn in reversed(self._patched):
            if getattr(glb.get(name), "__qk_sniffer_wrapped__", None) is fn:
                glb[name] = fn
        self._patched.clear()
        self.pending.clear()

    def take(self) -> list[RotationCall]:
        calls, self.pending = self.pending, []
        return calls

    def _wrap(self, fn):
        tap = self

        def rotary(*args, **kwargs):
            out = fn(*args, **kwargs)
            if tap.recording:
                outs = out if isinstance(out, tuple) else (out,)
                n = sum(isinstance(o, torch.Tensor) for o in outs)
                ins = tuple(a for a in args[:n] if isinstance(a, torch.Tensor))
                if len(ins) == n:
                    tap.pending.append(RotationCall(fn, args, kwargs, ins, tuple(outs[:n])))
            return out

        rotary.__qk_sniffer_wrapped__ = fn
        rotary.__name__ = fn.__name__
        rotary.__doc__ = fn.__doc__
        return rotary


def _namespaces(cls) -> list[dict]:
    """The globals a class's forward resolves names in (through decorators) and its module's namespace."""
    out = []
    fwd = getattr(cls, "forward", None)
    if fwd is not None:
        glb = getattr(inspect.unwrap(fwd), "__globals__", None)
        if glb is not None:
            out.append(glb)
    module = sys.modules.get(cls.__module__)
    if module is not None:
        out.append(vars(module))
    return out


def _as_bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bhsd" else t.transpose(1, 2)


def _slot_view(states: torch.Tensor, source: str, width: int) -> torch.Tensor:
    if source == "head":
        return states[..., :width]
    if source == "tail":
        return states[..., states.shape[-1] - width:]
    return states


def _fits(rot: torch.Tensor, target: torch.Tensor) -> bool:
    """``rot`` [B, H', S, D'] broadcasts onto ``target`` [B, H, S, D'] (H' is H or 1)."""
    return (rot.dim() == 4 and rot.shape[0] == target.shape[0] and rot.shape[2] == target.shape[2]
            and rot.shape[3] == target.shape[3] and rot.shape[1] in (1, target.shape[1]))


def _layouts(t: torch.Tensor, seq: int) -> list[str]:
    if t.dim() != 4:
        return []
    out = []
    if t.shape[2] == seq:
        out.append("bhsd")
    if t.shape[1] == seq:
        out.append("bshd")
    return out


def find_recipe(calls: list[RotationCall], states: torch.Tensor, *, kind: str, owner: str, layer: int) -> PreRopeRecipe:
    """The recipe that rebuilds the pre-RoPE ``states`` ([B, H, S, D] attention input) from ``calls``."""
    if not calls:
        return PreRopeRecipe("attention")
    seq, dim = states.shape[2], states.shape[-1]
    matches = []
    for ci, call in enumerate(calls):
        for si, out in enumerate(call.outputs):
            for layout in _layouts(out, seq):
                rot = _as_bhsd(out, layout)
                width = rot.shape[-1]
                sources = ["whole"] if width == dim else (["head", "tail"] if width < dim else [])
                for source in sources:
                    slot = _slot_view(states, source, width)
                    if _fits(rot, slot) and torch.equal(slot, rot.expand_as(slot)):
                        matches.append(PreRopeRecipe(source, ci, si, layout, width))
    if len(matches) > 1 and len({(m.source, m.width) for m in matches}) == 1 and len({m.slot for m in matches}) > 1:
        # q and k rotated to identical values (e.g. the same tensor): the argument order decides
        want = 0 if kind == "q" else 1
        matches = [m for m in matches if m.slot == want] or matches
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UnsupportedModelError(
            f"{owner} layer {layer}: the {kind} rotation's output appears {len(matches)} times in what attention receives; "
            "qk-sniffer cannot tell which is the pre-RoPE tensor (use capture_pre_rope: false, or add an adapter under models/)"
        )
    # a transform after the rotation: only a single call rotating (q, k) as whole heads is unambiguous
    want = 0 if kind == "q" else 1
    if len(calls) == 1 and len(calls[0].inputs) == 2:
        t = calls[0].inputs[want]
        for layout in _layouts(t, seq):
            if _as_bhsd(t, layout).shape == states.shape:
                return PreRopeRecipe("whole", 0, want, layout, dim, post_transform=True)
    raise UnsupportedModelError(
        f"{owner} layer {layer}: qk-sniffer cannot identify the tensors its rotary function receives as {kind} "
        f"({len(calls)} rotation call(s), none matching the attention input of shape {tuple(states.shape)}); "
        "use capture_pre_rope: false, or add an adapter under models/<model_type>/ (see models/README.md)"
    )


def pre_rope_tensor(recipe: PreRopeRecipe, calls: list[RotationCall], states: torch.Tensor):
    """(base [B, H, S, D], rotated-input [B, H|1, S, w] or None): gather from base, then overwrite the slice."""
    if recipe.source == "attention":
        return states, None
    if recipe.call >= len(calls):
        raise UnsupportedModelError(
            f"the rotary function ran {len(calls)} time(s) in this layer, but the probe saw at least {recipe.call + 1}"
        )
    rot_in = _as_bhsd(calls[recipe.call].inputs[recipe.slot], recipe.layout)
    if recipe.source == "whole":
        if rot_in.shape[1] != states.shape[1]:
            rot_in = rot_in.expand(-1, states.shape[1], -1, -1)
        return rot_in, None
    return states, rot_in


def gather_pre_rope(recipe, calls, states, gather) -> torch.Tensor:
    """``gather`` ([B, H, S, D] -> [N, ..., D]) applied to the pre-RoPE tensor of a layer."""
    base, rot_in = pre_rope_tensor(recipe, calls, states)
    out = gather(base)
    if rot_in is None:
        return out
    part = gather(rot_in if rot_in.shape[1] == states.shape[1] else rot_in.expand(-1, states.shape[1], -1, -1))
    out = out.clone()
    if recipe.source == "head":
        out[..., :recipe.width] = part
    else:
        out[..., out.shape[-1] - recipe.width:] = part
    return out


def check_recipe(recipe: PreRopeRecipe, calls: list[RotationCall], states: torch.Tensor, *, kind: str, owner: str,
                 layer: int) -> None:
    """Prove a recipe on real tensors: it is found again, and the model's own rotation of the rebuilt
    input reproduces the recorded output bit for bit."""
    again = find_recipe(calls, states, kind=kind, owner=owner, layer=layer)
    if again != recipe:
        raise UnsupportedModelError(
            f"{owner} layer {layer}: the pre-RoPE {kind} of this batch comes from {again.describe()}, but the probe found "
            f"{recipe.describe()}; refusing to capture pre-RoPE vectors that cannot be proven (use capture_pre_rope: false)"
        )
    if recipe.source == "attention":
        return
    call = calls[recipe.call]
    base, rot_in = pre_rope_tensor(recipe, calls, states)
    rebuilt = _slot_view(base, recipe.source, recipe.width) if rot_in is None else rot_in
    rebuilt = rebuilt[:, :1] if call.inputs[recipe.slot].shape[1 if recipe.layout == "bhsd" else 2] == 1 else rebuilt
    rebuilt = rebuilt if recipe.layout == "bhsd" else rebuilt.transpose(1, 2)
    args = list(call.args)
    args[recipe.slot] = rebuilt.contiguous() if call.inputs[recipe.slot].is_contiguous() else rebuilt
    out = call.fn(*args, **call.kwargs)
    out = out if isinstance(out, tuple) else (out,)
    if not torch.equal(out[recipe.slot], call.outputs[recipe.slot]):
        diff = (out[recipe.slot].float() - call.outputs[recipe.slot].float()).abs().max().item()
        raise UnsupportedModelError(
            f"{owner} layer {layer}: the rebuilt pre-RoPE {kind} does not reproduce the rotation's output through the "
            f"model's own rotary function (max abs diff {diff:.3g}); refusing (use capture_pre_rope: false)"
        )
