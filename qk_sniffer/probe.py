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
    causal: bool = True  # appending tokens never changes earlier tokens' q/k (right padding needs no mask)

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


def decoder_positions(backbone) -> dict[int, set[int]]:
    """id(module) -> the indices of the decoder layers (the backbone's longest ModuleList) that contain it."""
    stacks = [m for m in backbone.children() if isinstance(m, torch.nn.ModuleList)]
    if not stacks:
        return {}
    out: dict[int, set[int]] = {}
    for i, layer in enumerate(max(stacks, key=len)):
        for m in layer.modules():
            out.setdefault(id(m), set()).add(i)
    return out


def _has_rotary_module(backbone) -> bool:
    return any("rotary" in type(m).__name__.lower() for m in backbone.modules())


class Probe:
    """The active object during a probe forward (same entry points as :class:`qk_sniffer.capture.Sniffer`)."""

    def __init__(self, tap: RotaryTap | None, positions: dict[int, set[int]] | None = None):
        self.tap = tap
        self.positions = positions or {}  # id(module) -> decoder layers containing it
        self.order: list[int] = []  # id(module) in first-call order, for modules without a layer_idx
        self.modules: dict[int, torch.nn.Module | None] = {}  # layer -> module (None: hand-instrumented)
        self.records: dict[int, list] = {}  # layer -> [(query, key, rotation calls)] per attention call

    def on_attention(self, module, query, key, window=None) -> None:
        idx = getattr(module, "layer_idx", None)
        if not isinstance(idx, int):
            where = self.positions.get(id(module), set())
            if len(where) > 1:
                raise UnsupportedModelError(
                    f"{type(module).__name__} is one attention module shared by decoder layers {sorted(where)} and has no "
                    "layer_idx; qk-sniffer cannot name its calls by layer (add an adapter under models/)"
                )
            if where:
                idx = next(iter(where))
            else:  # no decoder stack to place it in: layers are numbered in the order attention runs
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


def _probe_ids(length: int, vocab: int, device) -> torch.Tensor:
    return (torch.arange(length, device=device) * 7 + 3).remainder(max(vocab, 1)).unsqueeze(0)


def _forward(backbone, probe: Probe, length: int, vocab: int, owner: str = "the model") -> None:
    from .capture import StopForward, get_active_sniffer, set_active_sniffer

    device = backbone.get_input_embeddings().weight.device
    ids = _probe_ids(length, vocab, device)
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
            except UnsupportedModelError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of the model itself: one clear line
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                raise UnsupportedModelError(
                    f"{owner}: a plain forward of {length} tokens with position_ids failed ({type(exc).__name__}: {first}); "
                    "qk-sniffer cannot capture this model (text-only, batch of token ids)"
                ) from exc
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
    positions = decoder_positions(backbone)
    ran: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: ran.add(i)) for i, m in candidates.items()]
    inputs: dict[int, tuple] = {}  # id(attention module) -> (args, kwargs) of its last forward

    def keep_inputs(module, args, kwargs):
        inputs[id(module)] = (args, dict(kwargs))
    try:
        for length in PROBE_LENGTHS:
            first = Probe(None, positions)
            _forward(backbone, first, length, vocab, owner)
            probe = first
            tap = None
            if first.modules:
                tap = RotaryTap()
                tap.install([m for m in first.modules.values() if m is not None] + list(candidates.values()))
                probe = Probe(tap, positions)
                hooks += [m.register_forward_pre_hook(keep_inputs, with_kwargs=True)
                          for m in first.modules.values() if m is not None]
                try:
                    _forward(backbone, probe, length, vocab, owner)
                finally:
                    tap.remove()
            if not any(length in (_heads(r[0][0]), _heads(r[0][1])) for r in probe.records.values()):
                break  # no head count equals the sequence length: layouts are unambiguous
    finally:
        for h in hooks:
            h.remove()
    causal = _is_causal(backbone, first, length, vocab, owner)
    rotary_model = _has_rotary_module(backbone)
    layers: dict[int, LayerGeometry] = {}
    for idx in sorted(probe.records):
        module, records = probe.modules[idx] or candidates.get(idx), probe.records[idx]
        q, k, calls = records[0]
        g = LayerGeometry(idx, module, calls=len(records), n_q=_heads(q), n_kv=_heads(k), q_dim=_dim(q), k_dim=_dim(k),
                          rope=bool(calls))
        nope = getattr(module, "use_rope", None) is not None and not module.use_rope  # Llama 4 / SmolLM3 NoPE layers
        if not calls and rotary_model and not nope:
            nope = _ignores_positions(module, inputs.get(id(module)), q, k)
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
    return ModelGeometry(owner=owner, n_layers=total, layers=layers, skipped=skipped, causal=causal)


def _ignores_positions(module, recorded, q, k) -> bool:
    """Proof that a layer which ran no visible rotation is a NoPE layer (Cohere 2's and EXAONE 4's full
    layers): its attention module, run again on the same hidden states with other position embeddings,
    hands attention exactly the same q/k. False where that cannot be shown."""
    from .capture import get_active_sniffer, set_active_sniffer

    if recorded is None or q is None or k is None:
        return False
    args, kwargs = recorded
    pe = kwargs.get("position_embeddings")
    if not (isinstance(pe, tuple) and pe and all(isinstance(t, torch.Tensor) for t in pe)):
        return False
    shifted = tuple(t.flip(-2) + 0.5 for t in pe)  # other values at every position
    again = Probe(None)
    previous = get_active_sniffer()
    set_active_sniffer(again)
    try:
        with torch.inference_mode():
            module(*args, **{**kwargs, "position_embeddings": shifted})
    except Exception:  # noqa: BLE001 - the module cannot be rerun alone: no proof
        return False
    finally:
        set_active_sniffer(previous)
    got = [r for records in again.records.values() for r in records]
    return len(got) == 1 and torch.equal(got[0][0], q) and torch.equal(got[0][1], k)


def _is_causal(backbone, probe: Probe, length: int, vocab: int, owner: str) -> bool:
    """Proof that right padding needs no mask: the same tokens followed by a few more give the same
    q/k for the first ``length`` positions in every layer. Bidirectional models (BERT-style decoders
    without ``is_decoder``) fail it and are run with a padding mask instead."""
    longer = Probe(None, probe.positions)
    _forward(backbone, longer, length + 5, vocab, owner)
    for idx, records in probe.records.items():
        other = longer.records.get(idx)
        if not other:
            return False
        for a, b in zip(records[0][:2], other[0][:2]):
            if a is None or b is None:
                continue
            if a.dim() != 4 or b.dim() != 4 or b.shape[2] != a.shape[2] + 5:
                return False
            a32, b32 = a.float(), b[:, :, :length].float()
            scale = a32.abs().max().clamp_min(1e-30)
            tol = 1e-4 if a.dtype in (torch.float32, torch.float64) else 3e-2
            if ((a32 - b32).abs().max() / scale).item() > tol:
                return False
    return True


def _heads(t) -> int:
    return int(t.shape[1]) if t is not None else 0


def _dim(t) -> int:
    return int(t.shape[-1]) if t is not None else 0
