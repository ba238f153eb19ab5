"""What attention actually receives: a short probe forward that measures a model's geometry.

Head counts, head sizes and which layers can be captured come from the tensors the attention
function receives, never from config fields (MLA models, ``head_dim`` set to something else,
models whose q/k head size differs from the value head size, configs with per-layer attributes).
The probe runs the backbone once on a few tokens with the capture attention in place and records,
per layer: how often the attention function ran, the query/key shapes, whether a rotary function
ran and, for pre-RoPE capture, where the rotation's inputs sit (:mod:`qk_sniffer.rope`).

Layers whose attention never reached the capture code are listed with the reason (a
cross-attention layer does not run without an image; a layer that bypasses the attention
interface), so a default run skips them and an explicit request for one is refused before
the real forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import UnsupportedModelError
from .rope import PreRopeRecipe, RotaryTap, find_recipe

PROBE_LENGTHS = (17, 23)  # two lengths so that a sequence length equal to a head count cannot confuse layouts


@dataclass
class LayerGeometry:
    layer: int
    module: torch.nn.Module
    calls: int = 0
    n_q: int = 0
    n_kv: int = 0
    q_dim: int = 0
    k_dim: int = 0
    rope: bool | None = False  # a rotary function ran (None: the model has RoPE but its rotation is not visible)
    recipes: dict[str, PreRopeRecipe] = field(default_factory=dict)


@dataclass
class ModelGeometry:
    owner: str  # the model class, for messages
    n_layers: int
    layers: dict[int, LayerGeometry]  # layers whose attention reached the capture code
    skipped: dict[int, str]  # layer -> why it cannot be captured

    @property
    def modules(self) -> dict[int, torch.nn.Module]:
        return {i: g.module for i, g in self.layers.items()}


def candidate_attention_modules(backbone) -> dict[int, torch.nn.Module]:
    """layer index -> module, for modules that look like attention (used to explain unreached layers)."""
    found: dict[int, torch.nn.Module] = {}
    for name, module in backbone.named_modules():
        idx = getattr(module, "layer_idx", None)
        if not isinstance(idx, int) or idx in found:
            continue
        if "attn" in name.rsplit(".", 1)[-1].lower() or "attention" in type(module).__name__.lower():
            found[idx] = module
    return found


def _has_rotary_module(backbone) -> bool:
    return any("rotary" in type(m).__name__.lower() for m in backbone.modules())


class Probe:
    """The active object during a probe forward (same entry points as :class:`qk_sniffer.capture.Sniffer`)."""

    def __init__(self, tap: RotaryTap | None):
        self.tap = tap
        self.order: list[int] = []  # id(module) in first-call order, for modules without a layer_idx
        self.modules: dict[int, torch.nn.Module | None] = {}  # layer -> module (None: hand-instrumented)
        self.records: dict[int, list] = {}  # layer -> [(query, key, rotation calls)] per attention call

    def on_attention(self, module, query, key, window=None) -> None:
        idx = getattr(module, "layer_idx", None)
        if not isinstance(idx, int):
            if id(module) not in self.order:
                self.order.append(id(module))
            idx = self.order.index(id(module))
        self.modules.setdefault(idx, module)
        self._record(idx, query, key)

    def capture(self, layer_idx, query_states=None, key_states=None, positions=None, sliding_window=None) -> None:
        """Hand-instrumented modeling files call this; the probe treats it as an attention call."""
        self.modules.setdefault(int(layer_idx), None)
        self._record(int(layer_idx), query_states, key_states)

    def _record(self, idx: int, query, key) -> None:
        calls = self.tap.take() if self.tap is not None else []
        self.records.setdefault(idx, []).append((query, key, calls))


def _forward(backbone, probe: Probe, length: int, vocab: int) -> None:
    from .capture import StopForward, get_active_sniffer, set_active_sniffer

    device = backbone.get_input_embeddings().weight.device
    ids = (torch.arange(length, device=device) * 7 + 3).remainder(max(vocab, 1)).unsqueeze(0)
    pos = torch.arange(length, device=device).unsqueeze(0)
    previous = get_active_sniffer()
    set_active_sniffer(probe)
    if probe.tap is not None:
        probe.tap.recording = True
    try:
        with torch.inference_mode():
            try:
                backbone(input_ids=ids, position_ids=pos, use_cache=False)
            except StopForward:
                pass
    finally:
        if probe.tap is not None:
            probe.tap.recording = False
            probe.tap.pending.clear()
        set_active_sniffer(previous)


def probe_geometry(model, backbone, *, pre_rope: bool, n_layers: int | None = None) -> ModelGeometry:
    """Run the probe forward twice (once to find the attention modules, once with their rotary
    functions wrapped) and return the geometry. Without ``pre_rope`` a rotation that cannot be
    identified only leaves the layer's RoPE status unknown (None); with it, it is refused."""
    owner = type(model).__name__
    vocab = backbone.get_input_embeddings().weight.shape[0]
    candidates = candidate_attention_modules(backbone)
    ran: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: ran.add(i)) for i, m in candidates.items()]
    try:
        for length in PROBE_LENGTHS:
            first = Probe(None)
            _forward(backbone, first, length, vocab)
            probe = first
            tap = None
            if first.modules:
                tap = RotaryTap()
                tap.install([m for m in first.modules.values() if m is not None] + list(candidates.values()))
                probe = Probe(tap)
                try:
                    _forward(backbone, probe, length, vocab)
                finally:
                    tap.remove()
            if not any(length in (_heads(r[0][0]), _heads(r[0][1])) for r in probe.records.values()):
                break  # no head count equals the sequence length: layouts are unambiguous
    finally:
        for h in hooks:
            h.remove()
    rotary_model = _has_rotary_module(backbone)
    layers: dict[int, LayerGeometry] = {}
    for idx in sorted(probe.records):
        module, records = probe.modules[idx] or candidates.get(idx), probe.records[idx]
        q, k, calls = records[0]
        g = LayerGeometry(idx, module, calls=len(records), n_q=_heads(q), n_kv=_heads(k), q_dim=_dim(q), k_dim=_dim(k),
                          rope=bool(calls))
        nope = getattr(module, "use_rope", None) is not None and not module.use_rope  # Llama 4 / SmolLM3 NoPE layers
        if not calls and rotary_model and not nope:
            g.rope = None  # the model has a rotary embedding, but no rotation qk-sniffer can see ran here
            if pre_rope:
                raise UnsupportedModelError(
                    f"{owner}: layer {idx} ({type(module).__name__}) runs with rotary position embeddings, but no rotary "
                    "function qk-sniffer can see ran in it (it wraps module-level apply_rotary*/apply_*rope* functions); "
                    "pre-RoPE capture cannot be proven: use capture_pre_rope: false, or add an adapter under models/"
                )
        if len(records) == 1 and g.rope is not None:
            for kind, states in (("q", q), ("k", k)):
                if states is None:
                    continue
                try:
                    g.recipes[kind] = find_recipe(calls, states, kind=kind, owner=owner, layer=idx)
                except UnsupportedModelError:
                    if pre_rope:
                        raise
        layers[idx] = g
    total = max([n_layers or 0, *(i + 1 for i in layers), *(i + 1 for i in candidates)])
    skipped = {}
    for i in range(total):
        if i in layers:
            continue
        if i in candidates and i not in ran:
            skipped[i] = "its attention module did not run in a text-only forward (e.g. cross-attention to image inputs)"
        elif i in candidates:
            skipped[i] = (f"{type(candidates[i]).__name__} does not call transformers' attention interface "
                          "(add an adapter under models/ to capture it)")
        else:
            skipped[i] = "no attention module reached the capture code for this layer"
    if not layers:
        mt = getattr(model.config, "model_type", "<model_type>")
        raise UnsupportedModelError(
            f"{owner} does not use transformers' attention interface in any layer; add an adapter: copy its modeling "
            f"file to models/{mt}/modeling_{mt}.py and call get_active_sniffer().capture(layer_idx, "
            "query_states, key_states, positions, sliding_window) in its attention forward (see models/README.md)"
        )
    return ModelGeometry(owner=owner, n_layers=total, layers=layers, skipped=skipped)


def _heads(t) -> int:
    return int(t.shape[1]) if t is not None else 0


def _dim(t) -> int:
    return int(t.shape[-1]) if t is not None else 0
