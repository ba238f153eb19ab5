"""Remotes: where the published dataset lives, and the stages that pull from and push to one.

One concern per module:

- :mod:`~qk_sniffer.remote.base`: the :class:`Remote` protocol and the errors every remote raises;
- :mod:`~qk_sniffer.remote.local_tree`: which files of a local tree are published, and their hashes;
- :mod:`~qk_sniffer.remote.directory`: :class:`DirRemote`, a directory on a shared filesystem;
- :mod:`~qk_sniffer.remote.credentials`: the Hugging Face token (``HF_TOKEN``, ``.env``) and its masking;
- :mod:`~qk_sniffer.remote.hub_http`: bounded network time for the Hub (timeout, retry policy, retry loop);
- :mod:`~qk_sniffer.remote.hub`: :class:`HubRemote`, a dataset repository on the Hub;
- :mod:`~qk_sniffer.remote.configured`: :func:`remote_for`, the remote a config names;
- :mod:`~qk_sniffer.remote.sync`: the ``pull`` and ``push`` stages;
- :mod:`~qk_sniffer.remote.check`: :func:`check_remote`, the preflight's look at the remote.

The names below are the package's API; code inside the package imports from the modules.
"""

from .base import PushError, Remote, RemoteError, RemoteMovedError
from .check import check_remote
from .configured import remote_for
from .credentials import TOKENS_URL, MissingTokenError, get_token, hub_token, redact, require_hub_token, require_token
from .directory import DirRemote
from .hub import HubRemote, RepoTypeError, file_hashes
from .hub_http import DEFAULT_RETRY, HubError, RetryPolicy, bound_http, http_timeout, retry_policy
from .local_tree import hash_files, local_files, sha256_file
from .sync import PUSH_NAME, SNAPSHOT_NAME, pull, push, read_snapshot

__all__ = [
    "DEFAULT_RETRY",
    "PUSH_NAME",
    "SNAPSHOT_NAME",
    "TOKENS_URL",
    "DirRemote",
    "HubError",
    "HubRemote",
    "MissingTokenError",
    "PushError",
    "Remote",
    "RemoteError",
    "RemoteMovedError",
    "RepoTypeError",
    "RetryPolicy",
    "bound_http",
    "check_remote",
    "file_hashes",
    "get_token",
    "hash_files",
    "http_timeout",
    "hub_token",
    "local_files",
    "pull",
    "push",
    "read_snapshot",
    "redact",
    "remote_for",
    "require_hub_token",
    "require_token",
    "retry_policy",
    "sha256_file",
]
