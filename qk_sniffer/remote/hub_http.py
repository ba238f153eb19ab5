"""Bounded network time for the Hub: the per-request timeout, the retry policy and the retry loop.

- Every request of ``huggingface_hub``'s shared HTTP client (ours and, in this process, any other
  user of ``huggingface_hub``) times out after ``QK_SNIFFER_HTTP_TIMEOUT_S`` seconds (default 60;
  connecting: at most 10), also where the client asks for a longer timeout or none. It is set
  through the client's own hook, ``huggingface_hub.set_client_factory`` (:func:`bound_http`).
  Xet transfers (``hf_xet``) run outside that client and keep their own.
- Network failures (connection errors, timeouts, HTTP 408/429/5xx) are retried with exponential
  backoff under a :class:`RetryPolicy` (``QK_SNIFFER_HTTP_RETRIES`` attempts in all, default 5,
  and a bound on the total time) by :func:`call_with_retries`, which then raises one
  :class:`HubError` with the token masked. ``huggingface_hub`` retries some calls on its own as
  well (file downloads, LFS uploads).

The retry loop wraps whole client calls (a listing, a commit with its uploads, a snapshot
download), not single requests, which is why ``huggingface_hub.utils.http_backoff`` (one request,
no bound on the total time, no way to name the failed step) does not replace it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ..config import ConfigError
from .base import RemoteError, RemoteMovedError
from .credentials import redact

log = logging.getLogger("qk_sniffer")

T = TypeVar("T")
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TIMEOUT_VAR = "QK_SNIFFER_HTTP_TIMEOUT_S"
RETRIES_VAR = "QK_SNIFFER_HTTP_RETRIES"
DEFAULT_TIMEOUT_S = 60.0
MAX_CONNECT_S = 10.0


class HubError(RemoteError):
    """A Hub call failed for good; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a Hub call that failed on the network.

    ``attempts`` tries in all, waiting ``base_delay * 2**k`` (at most ``max_delay``) in between,
    and no new attempt once ``max_total`` seconds have passed since the first.
    """

    attempts: int = 5
    base_delay: float = 2.0
    max_delay: float = 30.0
    max_total: float = 300.0


DEFAULT_RETRY = RetryPolicy()


def _env_number(name: str, cast: Callable[[str], float], default: float, what: str) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        raise ConfigError(f"{name}={raw!r} is not {what}; unset it (default {default:g}) or set e.g. {name}={default:g}")
    return value


def http_timeout() -> float:
    """Seconds a request may wait for the Hub (``QK_SNIFFER_HTTP_TIMEOUT_S``, default 60)."""
    return _env_number(TIMEOUT_VAR, float, DEFAULT_TIMEOUT_S, "a positive number of seconds")


def retry_policy() -> RetryPolicy:
    """:data:`DEFAULT_RETRY` with ``QK_SNIFFER_HTTP_RETRIES`` attempts in all when that is set."""
    return RetryPolicy(attempts=int(_env_number(RETRIES_VAR, int, DEFAULT_RETRY.attempts, "a positive whole number")))


_BOUND_LOCK = threading.Lock()
_bound: list[float | None] = [None]  # the timeout of the client factory installed by bound_http, if any


def bound_http(seconds: float | None) -> None:
    """Make ``huggingface_hub``'s shared HTTP client time out every request after ``seconds``.

    The client's default factory has no timeout, and several calls pass ``timeout=None`` or 60 s
    explicitly; a request hook caps each phase (connect at most :data:`MAX_CONNECT_S`) at
    ``seconds`` whatever the call asked for. Installed through ``set_client_factory``, which closes
    the current client, hence only when the value changes. ``None`` restores the default factory.
    """
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    with _BOUND_LOCK:
        if _bound[0] == seconds:
            return
        if seconds is None:
            set_client_factory(default_client_factory)
            _bound[0] = None
            return
        caps = {"connect": min(seconds, MAX_CONNECT_S), "read": seconds, "write": seconds, "pool": seconds}

        def cap(request: Any) -> None:
            asked = request.extensions.get("timeout") or {}
            capped = {k: limit if asked.get(k) is None else min(asked[k], limit) for k, limit in caps.items()}
            request.extensions = {**request.extensions, "timeout": capped}

        def factory():
            client = default_client_factory()
            client.timeout = tuple(caps.values())
            client.event_hooks = {**client.event_hooks, "request": [*client.event_hooks["request"], cap]}
            return client

        set_client_factory(factory)
        _bound[0] = seconds


# -- what kind of failure ---------------------------------------------------------------------


def _httpx_errors(name: str) -> tuple[type[BaseException], ...]:
    found = []
    for module in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2, 1.x httpx
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


@functools.cache
def transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions of a request that never got an answer (looked up on first use)."""
    return (TimeoutError, ConnectionError, *_httpx_errors("TransportError"))


@functools.cache
def timeout_errors() -> tuple[type[BaseException], ...]:
    """Exceptions of a request that timed out (looked up on first use)."""
    return (TimeoutError, *_httpx_errors("TimeoutException"))


def error_chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err`` and its causes and contexts, each once."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def http_status(err: BaseException) -> int | None:
    """The HTTP status of the first error in the chain that carries a response."""
    for e in error_chain(err):
        response = getattr(e, "response", None)
        code = getattr(response, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` is a network failure worth retrying (no answer, or HTTP 408/429/5xx)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    for e in error_chain(err):
        if isinstance(e, OfflineModeIsEnabled):
            return False
        code = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(code, int):
            return code in TRANSIENT_STATUS
        if isinstance(e, transport_errors()):
            return True
    return False


def public_endpoint(url: str) -> str:
    """``url`` without credentials, query or fragment."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


# -- the retry loop ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """A call that failed for good, as :func:`call_with_retries` hands it to the caller's message."""

    what: str  # the step, e.g. "commit to"
    error: BaseException
    detail: str  # "<ExceptionType>: <message>" on one line, token masked
    attempts: int
    elapsed: float
    transient: bool


def call_with_retries(what: str, fn: Callable[[], T], *, policy: RetryPolicy, where: str, token: str | None,
                      sleep: Callable[[float], None], message: Callable[[Failure], str]) -> T:
    """Run ``fn``, retrying network failures under ``policy``; errors leave as :class:`HubError`, token masked.

    :class:`RemoteError` and :class:`RemoteMovedError` pass through untouched. Each retry logs one
    warning naming ``where`` and ``what``; the final error's text is ``message(failure)``.
    """
    start = time.monotonic()
    delay = policy.base_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except (RemoteMovedError, RemoteError):
            raise
        except Exception as err:
            elapsed = time.monotonic() - start
            transient = is_transient(err)
            # one line: the server's own message when it sent one, not the client's multi-line text
            text = getattr(err, "server_message", None) or str(err)
            detail = " ".join(f"{type(err).__name__}: {redact(text, token)}".split())
            if transient and attempt < policy.attempts and elapsed + delay <= policy.max_total:
                log.warning(
                    "%s: %s failed (%s); retrying in %.1fs (attempt %d of %d)",
                    where,
                    what,
                    detail.splitlines()[0],
                    delay,
                    attempt + 1,
                    policy.attempts,
                )
                sleep(delay)
                delay = min(delay * 2, policy.max_delay)
                continue
            failure = HubError(
                redact(message(Failure(what, err, detail, attempt, elapsed, transient)), token), http_status(err)
            )
            # keep the original exception as the cause unless a message in its chain holds the token
            cause = err if all(redact(str(e), token) == str(e) for e in error_chain(err)) else None
        # raised outside the handler, so a suppressed cause is not kept as the implicit context either
        raise failure from cause
