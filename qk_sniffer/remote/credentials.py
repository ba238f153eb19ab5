"""The Hugging Face token: where it comes from, and keeping it out of messages.

``HF_TOKEN`` is read from the environment first, then from a ``.env`` file in the working
directory (parsed with python-dotenv's ``dotenv_values``; ``os.environ`` is left untouched).
Without it, :func:`hub_token` falls back to the token ``huggingface_hub`` finds on its own (a
login stored by ``hf auth login``). The token is passed explicitly to ``huggingface_hub`` and
never written to logs, manifests, snapshots or the dataset; :func:`redact` scrubs it from any
text that leaves the package.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dotenv import dotenv_values

from ..errors import QkSnifferError

TOKEN_VAR = "HF_TOKEN"
MASK = "***"
TOKENS_URL = "https://huggingface.co/settings/tokens"
# Shape of Hugging Face access tokens ("hf_" + 30 or more letters/digits). Scrubbed even when
# the value is not the configured token, e.g. one that a server echoed back in an error.
_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")


class MissingTokenError(QkSnifferError, RuntimeError):
    """A write to the Hub was requested but no token is configured."""


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def get_token(env_file: str | Path | None = None) -> str | None:
    """``HF_TOKEN`` from the environment, else from ``env_file`` (default ``./.env``); None if unset."""
    token = _clean(os.environ.get(TOKEN_VAR))
    if token:
        return token
    path = Path(env_file) if env_file is not None else Path.cwd() / ".env"
    if path.is_file():
        return _clean(dotenv_values(path).get(TOKEN_VAR))
    return None


def require_token(repo_id: str, env_file: str | Path | None = None) -> str:
    """The token for a push to ``repo_id``; raises :class:`MissingTokenError` saying how to provide one."""
    token = get_token(env_file)
    if token is None:
        raise MissingTokenError(
            f"push to {repo_id} needs HF_TOKEN in the environment or .env "
            "(a write token from https://huggingface.co/settings/tokens; e.g. a line HF_TOKEN=hf_... in ./.env)"
        )
    return token


def hub_token() -> str | None:
    """``HF_TOKEN`` (environment, then ``./.env``), else the token ``huggingface_hub`` finds (a stored login)."""
    from huggingface_hub import get_token as client_token  # on first use, like every huggingface_hub import here

    return get_token() or client_token()


def require_hub_token(repo_id: str) -> str:
    """The token for a push to ``repo_id``; raises :class:`MissingTokenError` saying how to provide one."""
    token = hub_token()
    if not token:
        raise MissingTokenError(
            f"push to {repo_id} needs HF_TOKEN in the environment or .env (a write token from {TOKENS_URL}; "
            "e.g. a line HF_TOKEN=hf_... in ./.env), or a login stored by `hf auth login`"
        )
    return token


def redact(text: str, token: str | None = None) -> str:
    """``text`` with the token (``token``, else the configured one) and anything shaped like a token masked."""
    text = str(text)
    for secret in {token, get_token()}:
        if secret:
            text = text.replace(secret, MASK)
    return _TOKEN_SHAPE.sub(MASK, text)
