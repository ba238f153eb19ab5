"""The real clients pointed at a fake Hub: ``point_clients_at`` and the pytest fixture ``fake_hub``."""

from __future__ import annotations

import secrets
from pathlib import Path

from .hub import FakeHub


def point_clients_at(monkeypatch, hub: FakeHub, home: Path) -> None:
    """Point ``huggingface_hub`` and ``datasets`` at ``hub``, with caches under ``home``.

    Both libraries read several settings once, at import: the environment variables alone are not
    enough, so the module-level constants are patched too (``monkeypatch`` restores everything).
    """
    import datasets.config as dconfig
    from huggingface_hub import HfFileSystem, constants

    home.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if hub.token:
        monkeypatch.setenv("HF_TOKEN", hub.token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)

    for name, value in {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_XET_CACHE": str(home / "xet"),
    }.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)

    for name, value in {
        "HF_ENDPOINT": hub.url,
        "HUB_DATASETS_URL": hub.url + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_UPDATE_DOWNLOAD_COUNTS": False,
        "USE_PARQUET_EXPORT": False,  # no dataset-viewer server to ask
        "HF_CACHE_HOME": str(home),
        "HF_DATASETS_CACHE": home / "datasets",
        "HF_MODULES_CACHE": home / "modules",
        "DOWNLOADED_DATASETS_PATH": home / "datasets" / "downloads",
        "EXTRACTED_DATASETS_PATH": home / "datasets" / "downloads" / "extracted",
    }.items():
        if hasattr(dconfig, name):
            monkeypatch.setattr(dconfig, name, value)
    HfFileSystem.clear_instance_cache()


def _close_client_connections() -> None:
    from huggingface_hub import HfFileSystem
    from huggingface_hub.utils._http import close_session

    close_session()
    HfFileSystem.clear_instance_cache()


try:
    import pytest
except ImportError:  # the fake itself needs only the standard library
    pytest = None

if pytest is not None:

    @pytest.fixture(name="fake_hub")
    def fake_hub_fixture(tmp_path_factory, monkeypatch):
        """A running :class:`FakeHub` (token-protected; ``HF_TOKEN`` set to its token) the clients point at."""
        hub = FakeHub(token="hf_fake" + secrets.token_hex(16)).start()
        hub.home = tmp_path_factory.mktemp("hf-home")  # HF_HOME of the clients, for tests to inspect
        try:
            point_clients_at(monkeypatch, hub, hub.home)
            yield hub
        finally:
            hub.stop()
            _close_client_connections()
