"""Capture of query/key vectors inside attention layers.

Two paths feed one :class:`Sniffer`:

* the generic path: a capture attention function registered with transformers'
  ``AttentionInterface`` sees post-RoPE queries and keys of every layer, hands them to the
  active sniffer and then calls the real implementation (sdpa, eager, flash, ...). Its mask
  function is registered under the same name, or transformers would pass no mask at all;
* pre-RoPE capture: forward hooks on the q/k projections (or on q_norm/k_norm where the model
  has them), reshaped per head.

Hand-instrumented modeling files (``models/<name>/modeling_<name>.py``) call
``get_active_sniffer().capture(layer_idx, query_states, key_states, positions, sliding_window)``.

The selection (which tokens of which example) is computed for the whole batch before the
forward pass (:mod:`qk_sniffer.sampling`); inside the hook there is only an index gather on
the device. Gathered tensors are copied to the host once per batch, after the forward.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .sampling import KIND_CODE, SHARED_HEAD, BatchTokens, SamplerSpec

CAPTURE_PREFIX = "qk_sniffer_"

_GLOBAL: dict[str, Sniffer | None] = {"active": None}


class StopForward(Exception):
    """Raised after the last captured layer so the rest of the model does not run."""


class UnsupportedModelError(RuntimeError):
    pass


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

    def heads_for(self, kind: str) -> list[int]:
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
        self.seq_len = 0

    # -- activation ---------------------------------------------------------------------------
    def activate(self) -> Sniffer:
        set_active_sniffer(self)
        return self

    def deactivate(self) -> None:
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

    # -- model attachment ---------------------------------------------------------------------
    def attach(self, attention_modules: dict[int, torch.nn.Module], *, early_exit: bool = True) -> None:
        """Register the backbone's attention modules (layer index -> module) and the hooks."""
        self._module_layers = {id(m): idx for idx, m in attention_modules.items()}
        if self.spec.pre_rope:
            for idx in self.spec.layers:
                self._hooks.extend(_pre_rope_hooks(self, idx, attention_modules[idx]))
        if early_exit and self.last_layer >= 0:
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
        self._token_ids = token_ids
        tokens = BatchTokens(example_ids, lengths, offsets, self.spec.sampler)
        self.seq_len = int((tokens.offsets + tokens.lengths).max()) if len(tokens.lengths) else 0
        plans = {}
        for layer in self.spec.layers:
            for kind in self.spec.kinds:
                heads = self.spec.heads_for(kind)
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
    def capture(self, layer_idx, query_states=None, key_states=None, positions=None, sliding_window=None) -> None:
        """Gather the selected rows of ``[batch, heads, seq, head_dim]`` query/key states."""
        if layer_idx not in self.captured_layers:
            return
        if self._deferred_ids is not None:
            ref = query_states if query_states is not None else key_states
            b, s = ref.shape[0], ref.shape[2]
            self.begin_batch(self._deferred_ids, np.full(b, s), np.zeros(b, dtype=np.int64))
        if query_states is not None:
            self._gather(layer_idx, "q", query_states, sliding_window)
        if key_states is not None:
            self._gather(layer_idx, "k", key_states, sliding_window)

    def _gather(self, layer: int, kind: str, states: torch.Tensor, sliding_window) -> None:
        plan = self._plans.get((layer, kind))
        if plan is None:
            return
        plan = plan.on(states.device)
        if plan.size == 0:
            out = states.new_empty((0, len(plan.heads), states.shape[-1]) if not plan.per_head else (0, states.shape[-1]))
        elif plan.per_head:
            out = states[plan.rows, plan.head_index, plan.cols]
        else:
            out = states[plan.rows[:, None], plan.head_index[None, :], plan.cols[:, None]]
        out = out.to(self.spec.vector_dtype)
        if sliding_window is not None:
            sliding_window = int(sliding_window)
        self._pending.append((layer, kind, plan, out, sliding_window))
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
    sniffer = get_active_sniffer()
    if sniffer is not None:
        raise StopForward()


# -- pre-RoPE hooks ----------------------------------------------------------------------------

def _to_bhsd(t: torch.Tensor, head_dim: int, seq: int) -> torch.Tensor:
    """Bring a projection/norm output to ``[batch, heads, seq, head_dim]``."""
    if t.dim() == 3:  # [B, S, H*D]
        return t.view(t.shape[0], t.shape[1], -1, head_dim).transpose(1, 2)
    if t.dim() == 4:
        if t.shape[1] == seq and t.shape[2] != seq:
            return t.transpose(1, 2)  # [B, S, H, D]
        if t.shape[2] == seq and t.shape[1] != seq:
            return t  # [B, H, S, D]
        # heads == seq: decide by memory layout (BSHD views are contiguous, BHSD ones are transposed)
        return t.transpose(1, 2) if t.is_contiguous() else t
    raise UnsupportedModelError(f"cannot interpret a pre-RoPE tensor of shape {tuple(t.shape)}")


def _pre_rope_hooks(sniffer: Sniffer, layer: int, attn: torch.nn.Module) -> list:
    head_dim = sniffer.spec.head_dim
    window = sniffer.spec.layer_windows.get(layer)
    hooks = []

    def make(kind: str):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if fused_split is not None:
                q_size, k_size = fused_split
                out = out[..., :q_size] if kind == "q" else out[..., q_size:q_size + k_size]
            sniffer._gather(layer, kind, _to_bhsd(out, head_dim, sniffer.seq_len), window)
        return hook

    fused_split = None
    for kind, norm_name, proj_name in (("q", "q_norm", "q_proj"), ("k", "k_norm", "k_proj")):
        if kind not in sniffer.spec.kinds:
            continue
        norm = getattr(attn, norm_name, None)
        if isinstance(norm, torch.nn.Module) and not isinstance(norm, torch.nn.Identity):
            target = norm
        elif isinstance(getattr(attn, proj_name, None), torch.nn.Module):
            target = getattr(attn, proj_name)
        elif isinstance(getattr(attn, "qkv_proj", None), torch.nn.Module):
            target = attn.qkv_proj
            n_q = getattr(attn, "num_heads", None) or attn.config.num_attention_heads
            n_kv = getattr(attn, "num_key_value_heads", None) or attn.config.num_key_value_heads
            fused_split = (n_q * head_dim, n_kv * head_dim)
        else:
            raise UnsupportedModelError(
                f"{type(attn).__name__} has no q_proj/k_proj/q_norm/k_norm/qkv_proj: pre-RoPE capture needs an "
                "adapter; add a hand-instrumented modeling file under models/<model_type>/ (see models/README.md)"
            )
        hooks.append(target.register_forward_hook(make(kind)))
    return hooks


# -- attention interface ----------------------------------------------------------------------

_EAGER_CACHE: dict[type, Callable] = {}


def _eager_for(module) -> Callable:
    fn = _EAGER_CACHE.get(type(module))
    if fn is None:
        mod = sys.modules[type(module).__module__]
        fn = getattr(mod, "eager_attention_forward", None)
        if fn is None:
            raise UnsupportedModelError(
                f"{type(module).__name__}: its modeling module has no eager_attention_forward; "
                "use model.attn_implementation: sdpa"
            )
        _EAGER_CACHE[type(module)] = fn
    return fn


def _make_capture_attention(inner: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def capture_attention(module, query, key, value, attention_mask, **kwargs):
        sniffer = get_active_sniffer()
        if sniffer is not None and not sniffer.spec.pre_rope:
            layer = sniffer.layer_of(module)
            if layer is not None:
                window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
                sniffer.capture(layer, query, key, None, window)
        fn = _eager_for(module) if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]
        return fn(module, query, key, value, attention_mask, **kwargs)

    capture_attention.__name__ = f"{CAPTURE_PREFIX}{inner}"
    return capture_attention


def register_capture_attention(inner: str = "sdpa") -> str:
    """Register ``qk_sniffer_<inner>`` (attention and mask function); return the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if inner.startswith(CAPTURE_PREFIX):
        inner = inner[len(CAPTURE_PREFIX):]
    if inner != "eager" and inner not in ALL_ATTENTION_FUNCTIONS:
        known = ", ".join(["eager", *ALL_ATTENTION_FUNCTIONS.keys()])
        raise UnsupportedModelError(
            f"model.attn_implementation: {inner!r} is not available here (known: {known}); "
            "install its package (e.g. flash-attn) or choose sdpa"
        )
    if inner not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise UnsupportedModelError(f"model.attn_implementation: {inner!r} has no mask function in transformers")
    name = f"{CAPTURE_PREFIX}{inner}"
    AttentionInterface.register(name, _make_capture_attention(inner))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name
