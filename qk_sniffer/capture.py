"""Capture of query/key vectors inside attention layers.

The capture attention function (:mod:`qk_sniffer.capture_attention`) hands the queries and keys
every layer gives to attention (post-RoPE, and after anything the model does after the rotation)
to the active sniffer defined here, before it calls the real implementation. Pre-RoPE capture
takes the inputs of the model's own rotary function instead (:mod:`qk_sniffer.rope`); which
layers exist, their head counts and sizes, and where the rotation's inputs sit come from a probe
forward (:mod:`qk_sniffer.probe`).

Hand-instrumented modeling files (``models/<name>/modeling_<name>.py``) call
``get_active_sniffer().capture(layer_idx, query_states, key_states, positions, sliding_window)``.

The selection (which tokens of which example) is computed for the whole batch before the
forward pass (:mod:`qk_sniffer.sampling`); inside the hook there is only an index gather on
the device. Gathered tensors are copied to the host once per batch, after the forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import UnsupportedModelError
from .rope import RotaryTap, check_recipe, gather_pre_rope
from .sampling import KIND_CODE, SHARED_HEAD, BatchTokens, SamplerSpec

_GLOBAL: dict[str, Sniffer | None] = {"active": None}


class StopForward(Exception):
    """Raised after the last captured layer so the rest of the model does not run."""


__all__ = ["UnsupportedModelError"]  # re-exported: raised here for models that cannot be captured


def get_active_sniffer() -> Sniffer | None:
    """The sniffer that attention code should hand its states to, or None when not capturing."""
    return _GLOBAL["active"]


def set_active_sniffer(sniffer: Sniffer | None) -> None:
    _GLOBAL["active"] = sniffer


def set_active_example_ids(example_ids, lengths=None, padding_side: str = "right") -> None:
    """Tell the active sniffer which examples the next forward pass holds (seed API).

    ``lengths`` are the unpadded lengths; when omitted every row is taken to be unpadded and
    the plan is built from the sequence length seen at the first capture.
    """
    sniffer = get_active_sniffer()
    if sniffer is None:
        raise RuntimeError("no active sniffer: create a Sniffer and call sniffer.activate() first")
    sniffer.set_example_ids(example_ids, lengths, padding_side)


def compute_positions(batch_size: int, seq_len: int, device=None, cache_position=None) -> torch.Tensor:
    """Token positions ``[batch, seq]`` for hand-instrumented attention code (seed API)."""
    if cache_position is None:
        pos = torch.arange(seq_len, device=device)
    else:
        pos = cache_position.to(device) if device is not None else cache_position
        pos = pos.reshape(-1)[-seq_len:]
    return pos.unsqueeze(0).expand(batch_size, -1)


@dataclass
class CaptureSpec:
    """What to capture: resolved against the model (indices checked, windows known)."""

    layers: list[int]
    query_heads: list[int]
    key_heads: list[int]
    kinds: tuple[str, ...]
    sampler: SamplerSpec
    vector_dtype: torch.dtype = torch.float32
    pre_rope: bool = False
    head_dim: int = 0
    layer_windows: dict[int, int | None] = field(default_factory=dict)
    geometry: object = None  # qk_sniffer.probe.ModelGeometry: what attention receives, per layer
    n_layers: int = 0
    n_heads: int = 0  # query heads (names of the configs)
    n_kv_heads: int = 0
    layer_attention: dict[int, str] = field(default_factory=dict)  # full / sliding / chunked
    skipped_layers: dict[int, str] = field(default_factory=dict)  # layers not captured, and why
    # capture.head_sampling: {layer: {"q": heads, "k": heads}} (else every layer has the lists above), and its record
    layer_heads: dict[int, dict[str, list[int]]] | None = None
    head_sampling: dict | None = None

    def heads_for(self, kind: str, layer: int | None = None) -> list[int]:
        if self.layer_heads is not None and layer is not None:
            return self.layer_heads.get(layer, {}).get(kind, [])
        return self.query_heads if kind == "q" else self.key_heads


@dataclass
class LayerPlan:
    """Indices of the tokens to gather for one (layer, kind) in the current batch."""

    heads: list[int]
    per_head: bool
    rows: torch.Tensor  # [N] batch row per gathered row
    cols: torch.Tensor  # [N] sequence index
    head_index: torch.Tensor  # shared: [H_sel]; per head: [N] head of each row
    example_id: np.ndarray
    position: np.ndarray
    bucket: np.ndarray
    host_rows: np.ndarray
    host_cols: np.ndarray
    row_head: np.ndarray | None = None  # per head: head of each row
    size: int = 0
    _moved: dict = field(default_factory=dict)

    def on(self, device: torch.device) -> LayerPlan:
        """This plan with its index tensors on ``device`` (models spread over several GPUs)."""
        if self.rows.device == device:
            return self
        moved = self._moved.get(device)
        if moved is None:
            moved = LayerPlan(**{**self.__dict__, "rows": self.rows.to(device), "cols": self.cols.to(device),
                                 "head_index": self.head_index.to(device), "_moved": {}})
            self._moved[device] = moved
        return moved


@dataclass
class CapturedBatch:
    """What one forward pass produced, ready for the writer (host tensors once ``ready``)."""

    items: list  # (layer, kind, plan, tensor, sliding_window)
    token_ids: np.ndarray | None
    event: object = None
    missing_layers: list[int] = field(default_factory=list)  # captured layers the forward never reached

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class Sniffer:
    """Collects sampled q/k vectors of one forward pass at a time."""

    def __init__(self, spec: CaptureSpec, *, device: torch.device | str = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.captured_layers = set(spec.layers)
        self.last_layer = max(spec.layers) if spec.layers else -1
        self._module_layers: dict[int, int] = {}
        self._plans: dict[tuple[int, str], LayerPlan] = {}
        self._pending: list = []
        self._token_ids: np.ndarray | None = None
        self._deferred_ids: np.ndarray | None = None
        self._hooks: list = []
        self._seen_layers: set[int] = set()
        self._calls: dict[int, int] = {}
        self._proven = False  # pre-RoPE recipes re-derived on real tensors (first batch)
        self.tap: RotaryTap | None = None
        self.seq_len = 0

    # -- activation ---------------------------------------------------------------------------
    def activate(self) -> Sniffer:
        set_active_sniffer(self)
        if self.tap is not None:
            self.tap.recording = True
        return self

    def deactivate(self) -> None:
        if self.tap is not None:
            self.tap.recording = False
            self.tap.pending.clear()
        if get_active_sniffer() is self:
            set_active_sniffer(None)

    def __enter__(self) -> Sniffer:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.tap is not None:
            self.tap.remove()
            self.tap = None

    # -- model attachment ---------------------------------------------------------------------
    def attach(self, attention_modules: dict[int, torch.nn.Module], *, early_exit: bool = True) -> None:
        """Register the backbone's attention modules (layer index -> module), the rotary tap and the early exit."""
        self._module_layers = {id(m): idx for idx, m in attention_modules.items() if m is not None}
        if self.spec.pre_rope:
            self.tap = RotaryTap()
            self.tap.install([m for m in attention_modules.values() if m is not None])
        if early_exit and self.last_layer >= 0 and attention_modules.get(self.last_layer) is not None:
            last = attention_modules[self.last_layer]
            self._hooks.append(last.register_forward_hook(_raise_stop))

    def layer_of(self, module) -> int | None:
        return self._module_layers.get(id(module))

    # -- batch planning -----------------------------------------------------------------------
    def set_example_ids(self, example_ids, lengths=None, padding_side: str = "right") -> None:
        ids = np.asarray(example_ids, dtype=np.int64)
        if lengths is None:
            self._deferred_ids = ids
            self._plans = {}
            return
        lengths = np.asarray(lengths, dtype=np.int64)
        width = int(lengths.max()) if len(lengths) else 0
        offsets = width - lengths if padding_side == "left" else np.zeros_like(lengths)
        self.begin_batch(ids, lengths, offsets)

    def begin_batch(self, example_ids, lengths, offsets, token_ids: np.ndarray | None = None) -> None:
        """Compute the selection of every captured (layer, kind) for this batch."""
        self._deferred_ids = None
        self._pending = []
        self._seen_layers = set()
        self._calls = {}
        self._token_ids = token_ids
        tokens = BatchTokens(example_ids, lengths, offsets, self.spec.sampler)
        self.seq_len = int((tokens.offsets + tokens.lengths).max()) if len(tokens.lengths) else 0
        plans = {}
        for layer in self.spec.layers:
            for kind in self.spec.kinds:
                heads = self.spec.heads_for(kind, layer)
                if heads:
                    plans[(layer, kind)] = _plan(tokens, layer, kind, heads, self.spec.sampler.per_head)
        host = []
        for plan in plans.values():
            host += [plan.host_rows, plan.host_cols, plan.row_head if plan.per_head else np.asarray(plan.heads)]
        dev = to_device(host, self.device)
        for i, plan in enumerate(plans.values()):
            plan.rows, plan.cols, plan.head_index = dev[3 * i: 3 * i + 3]
        self._plans = plans

    # -- capture (hot path) -------------------------------------------------------------------
    def on_attention(self, module, query, key, window=None) -> None:
        """The capture attention function's call: what attention receives in one layer."""
        layer = self._module_layers.get(id(module))
        calls = self.tap.take() if self.tap is not None else []
        if layer is not None:
            self._states(layer, query, key, window, calls)

    def capture(self, layer_idx, query_states=None, key_states=None, positions=None, sliding_window=None) -> None:
        """Gather the selected rows of ``[batch, heads, seq, head_dim]`` query/key states (hand-instrumented models)."""
        calls = self.tap.take() if self.tap is not None else []
        self._states(int(layer_idx), query_states, key_states, sliding_window, calls)

    def _states(self, layer: int, query, key, window, calls) -> None:
        if layer not in self.captured_layers:
            return
        n = self._calls[layer] = self._calls.get(layer, 0) + 1
        if n > 1:
            raise UnsupportedModelError(
                f"layer {layer}: the attention function ran {n} times in one forward (differential or looped attention); "
                "its calls cannot be stored as one head's vectors"
            )
        if self._deferred_ids is not None:
            ref = query if query is not None else key
            b, s = ref.shape[0], ref.shape[2]
            self.begin_batch(self._deferred_ids, np.full(b, s), np.zeros(b, dtype=np.int64))
        geo = self.spec.geometry.layers.get(layer) if self.spec.geometry is not None else None
        if window is not None:
            window = int(window)
        for kind, states in (("q", query), ("k", key)):
            if states is None or (layer, kind) not in self._plans:
                continue
            if geo is not None:
                self._check_shape(layer, kind, states, geo)
            if self.spec.pre_rope and geo is not None:
                recipe = geo.recipes[kind]
                if not self._proven:
                    check_recipe(recipe, calls, states, kind=kind, owner=self.spec.geometry.owner, layer=layer)
                self._gather(layer, kind, None, window, gather=lambda t, p=self._plans[(layer, kind)]: self._select(p, t),
                             rebuild=lambda g, r=recipe, st=states: gather_pre_rope(r, calls, st, g))
            else:
                self._gather(layer, kind, states, window)
        if layer == self.last_layer:
            self._proven = True

    def _check_shape(self, layer: int, kind: str, states: torch.Tensor, geo) -> None:
        heads, dim = (geo.n_q, geo.q_dim) if kind == "q" else (geo.n_kv, geo.k_dim)
        if states.dim() != 4 or states.shape[1] != heads or states.shape[-1] != dim:
            raise UnsupportedModelError(
                f"layer {layer}: attention received {kind} of shape {tuple(states.shape)}, but the probe measured "
                f"{heads} heads of size {dim}; the model's attention changes shape between calls"
            )

    def _select(self, plan: LayerPlan, states: torch.Tensor) -> torch.Tensor:
        plan = plan.on(states.device)
        if plan.size == 0:
            return states.new_empty((0, len(plan.heads), states.shape[-1]) if not plan.per_head else (0, states.shape[-1]))
        if plan.per_head:
            return states[plan.rows, plan.head_index, plan.cols]
        return states[plan.rows[:, None], plan.head_index[None, :], plan.cols[:, None]]

    def _gather(self, layer: int, kind: str, states, sliding_window, *, gather=None, rebuild=None) -> None:
        plan = self._plans.get((layer, kind))
        if plan is None:
            return
        out = rebuild(gather) if rebuild is not None else self._select(plan, states)
        out = out.to(self.spec.vector_dtype)
        if sliding_window is not None:
            sliding_window = int(sliding_window)
        self._pending.append((layer, kind, plan.on(out.device), out, sliding_window))
        self._seen_layers.add(layer)

    def end_batch(self) -> CapturedBatch:
        """Start the device-to-host copies of this batch's gathers; one sync point per batch."""
        items = []
        event = None
        on_cuda = False
        for layer, kind, plan, out, window in self._pending:
            if out.is_cuda:
                on_cuda = True
                host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                host.copy_(out, non_blocking=True)
                out = host
            items.append((layer, kind, plan, out, window))
        if on_cuda:
            event = torch.cuda.Event()
            event.record()
        missing = sorted(self.captured_layers - self._seen_layers)
        self._pending = []
        return CapturedBatch(items=items, token_ids=self._token_ids, event=event, missing_layers=missing)


def _plan(tokens: BatchTokens, layer: int, kind: str, heads: list[int], per_head: bool) -> LayerPlan:
    """Host-side selection of one (layer, kind); device index tensors are attached by the caller."""
    code = KIND_CODE[kind]
    if not per_head:
        sel = tokens.select(layer, SHARED_HEAD, code)
        return LayerPlan(
            heads=heads, per_head=False, rows=None, cols=None, head_index=None,
            example_id=sel.example_id, position=sel.position, bucket=sel.bucket,
            host_rows=sel.rows, host_cols=sel.cols, size=len(sel),
        )
    sels = [tokens.select(layer, h, code) for h in heads]
    cat = np.concatenate
    rows = cat([s.rows for s in sels])
    row_head = cat([np.full(len(s), h, dtype=np.int64) for s, h in zip(sels, heads)])
    return LayerPlan(
        heads=heads, per_head=True, rows=None, cols=None, head_index=None,
        example_id=cat([s.example_id for s in sels]), position=cat([s.position for s in sels]),
        bucket=cat([s.bucket for s in sels]), host_rows=rows, host_cols=cat([s.cols for s in sels]),
        row_head=row_head, size=int(rows.shape[0]),
    )


def to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Many int64 arrays in one host-to-device transfer.

    On CUDA the host buffer is pinned and the copy is asynchronous, so planning the next batch
    never waits for the GPU to finish the current one.
    """
    sizes = [len(a) for a in arrays]
    flat = torch.from_numpy(np.concatenate(arrays).astype(np.int64, copy=False) if arrays else np.zeros(0, np.int64))
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        flat = flat.to(device)
    return list(torch.split(flat, sizes))


def _raise_stop(module, args, output):
    if isinstance(get_active_sniffer(), Sniffer):
        raise StopForward()
