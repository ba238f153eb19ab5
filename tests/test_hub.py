"""The Hub remote (qk_sniffer/remote/hub.py) and the token handling (qk_sniffer/remote/credentials.py).

Everything runs the real ``huggingface_hub`` client over HTTP against the fake Hub of
tests/support/fakehub/; the end-to-end tests push and pull real staged chunks of the tiny Llama
through ``qk_sniffer.remote`` and read them back with ``datasets.load_dataset``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import traceback
from pathlib import Path

import polars as pl
import pytest

from qk_sniffer.remote.base import RemoteError, RemoteMovedError
from qk_sniffer.remote.credentials import MissingTokenError, get_token, redact, require_token
from qk_sniffer.remote.hub import HubRemote, file_hashes
from qk_sniffer.remote.hub_http import HubError, RetryPolicy

from .support.fakehub import fake_hub_fixture, git_blob_sha1  # noqa: F401  (the fixture fake_hub)

REPO = "tester/qk"
FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, max_total=30)


def hub_cfg(repo: str = REPO, branch: str = "main", private: bool = False) -> dict:
    return {"output": {"hf_repo_id": repo, "hf_branch": branch, "private": private}}


def make_remote(cfg: dict | None = None, sleeps: list | None = None, **kw) -> HubRemote:
    sleeps = [] if sleeps is None else sleeps
    return HubRemote(cfg or hub_cfg(), retry=kw.pop("retry", FAST), sleep=kw.pop("sleep", sleeps.append), **kw)


def write_files(base: Path, files: dict[str, bytes]) -> dict[str, Path]:
    out = {}
    for rel, data in files.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out[rel] = p
    return out


def tree_bytes(base: Path) -> dict[str, bytes]:
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


FILES = {
    "README.md": b"---\nlicense: mit\n---\n# card\n",
    "data/tiny/l00h00q/data.parquet": b"PAR1" + bytes(range(256)) * 8 + b"PAR1",
    "data/tiny/l00h01q/data.parquet": b"PAR1" + b"\x01\x02" * 700 + b"PAR1",
}


def commits_sent(hub) -> list:
    return hub.requests_matching("POST", rf"/api/datasets/{REPO}/commit/")


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ------------------------------------------------------------------------------- HubRemote


def test_head_is_none_before_the_repo_exists(fake_hub):
    remote = make_remote()
    assert remote.head() is None
    assert fake_hub.requests_matching("GET", rf"/api/datasets/{REPO}/refs$")[0].status == 404


@pytest.mark.parametrize("private", [True, False])
def test_first_commit_creates_the_repo(fake_hub, tmp_path, private):
    remote = make_remote(hub_cfg(private=private))
    sha = remote.commit(write_files(tmp_path, FILES), None, "first push")
    repo = fake_hub.repos[("dataset", REPO)]
    assert repo.private is private
    assert fake_hub.head(REPO) == sha == remote.head()
    assert {k: v for k, v in fake_hub.files(REPO).items() if k != ".gitattributes"} == FILES
    assert [c.title for c in fake_hub.history(REPO)] == ["first push", "initial commit"]
    assert fake_hub.blobs(REPO)["data/tiny/l00h00q/data.parquet"].lfs  # Parquet went through git-lfs


def test_download_reproduces_every_revision(fake_hub, tmp_path):
    remote = make_remote()
    first = remote.commit(write_files(tmp_path / "v1", FILES), None, "v1")
    changed = {**FILES, "README.md": b"# second card\n", "extra/notes.txt": b"notes\n"}
    second = remote.commit(write_files(tmp_path / "v2", changed), first, "v2")
    gitattributes = fake_hub.files(REPO)[".gitattributes"]
    for sha, want in ((first, FILES), (second, changed)):
        dest = tmp_path / f"dl-{sha[:7]}"
        dest.mkdir()
        remote.download(dest, sha)
        assert tree_bytes(dest) == {**want, ".gitattributes": gitattributes}
        assert not (dest / ".cache").exists()
    # a revision that vanished (history rewritten) means: pull the head again
    with pytest.raises(RemoteMovedError):
        remote.download(tmp_path / "gone", "0" * 40)
    with pytest.raises(RemoteMovedError):
        remote.list_files("0" * 40)


def test_list_files_hashes(fake_hub, tmp_path):
    remote = make_remote()
    sha = remote.commit(write_files(tmp_path, FILES), None, "first")
    listed = remote.list_files(sha)
    pq_path = "data/tiny/l00h00q/data.parquet"
    assert listed[pq_path] == hashlib.sha256(FILES[pq_path]).hexdigest()  # LFS: sha256
    assert listed["README.md"] == git_blob_sha1(FILES["README.md"])  # regular: git blob sha1
    assert file_hashes(tmp_path / "README.md") == (
        git_blob_sha1(FILES["README.md"]),
        hashlib.sha256(FILES["README.md"]).hexdigest(),
    )


def test_stale_parent_raises_remote_moved(fake_hub, tmp_path):
    remote = make_remote()
    base = remote.commit(write_files(tmp_path / "a", FILES), None, "base")
    other = fake_hub.commit(REPO, {"data/tiny/l00h02q/data.parquet": b"PAR1 from someone else PAR1"})
    mine = write_files(tmp_path / "b", {"data/tiny/l00h00q/data.parquet": b"PAR1 mine PAR1"})
    with pytest.raises(RemoteMovedError, match=REPO):
        remote.commit(mine, base, "late")
    assert fake_hub.head(REPO) == other
    assert fake_hub.files(REPO)["data/tiny/l00h00q/data.parquet"] == FILES["data/tiny/l00h00q/data.parquet"]
    assert [r.status for r in commits_sent(fake_hub)] == [200, 412]
    assert remote.commit(mine, other, "on time") == fake_hub.head(REPO) != other


def test_nothing_changed_returns_the_head_without_a_commit(fake_hub, tmp_path):
    remote = make_remote()
    files = write_files(tmp_path, FILES)
    sha = remote.commit(files, None, "first")
    sent = len(commits_sent(fake_hub))
    assert remote.commit(files, sha, "again") == sha
    assert len(commits_sent(fake_hub)) == sent and len(fake_hub.history(REPO)) == 2
    # only the changed file travels
    files["README.md"].write_bytes(b"# new card\n")
    new = remote.commit(files, sha, "card only")
    assert new != sha
    assert len(fake_hub.requests_matching("PUT", r"^/lfs-upload/")) == 2  # the two Parquet files, once
    # unchanged files, but the remote moved meanwhile: the caller must pull first
    fake_hub.commit(REPO, {"other.txt": b"x"})
    with pytest.raises(RemoteMovedError):
        remote.commit(files, new, "stale no-op")


def test_first_push_when_the_repo_appeared_meanwhile(fake_hub, tmp_path):
    fake_hub.create_repo(REPO)
    theirs = fake_hub.commit(REPO, {"README.md": b"# theirs\n"})
    with pytest.raises(RemoteMovedError, match="exists now"):
        make_remote().commit(write_files(tmp_path, FILES), None, "first")
    assert fake_hub.head(REPO) == theirs and fake_hub.files(REPO)["README.md"] == b"# theirs\n"


def test_first_push_to_a_new_branch(fake_hub, tmp_path):
    fake_hub.create_repo(REPO)
    main = fake_hub.commit(REPO, {"README.md": b"# main\n"})
    remote = make_remote(hub_cfg(branch="qk-dev"))
    assert remote.head() is None
    sha = remote.commit(write_files(tmp_path, FILES), None, "to the branch")
    assert fake_hub.head(REPO, "qk-dev") == sha and fake_hub.head(REPO) == main
    assert fake_hub.history(REPO, "qk-dev")[1].sha == main
    assert "data/tiny/l00h00q/data.parquet" not in fake_hub.files(REPO, "main")


def test_dropped_connection_mid_upload_is_retried_without_half_commits(fake_hub, tmp_path):
    remote0 = make_remote()
    base = remote0.commit(write_files(tmp_path / "a", {"README.md": b"# v0\n"}), None, "base")
    seen = []

    def sleep(_s):  # between attempts the remote still holds the base commit and nothing else
        seen.append((fake_hub.head(REPO), sorted(fake_hub.files(REPO))))

    fake_hub.fail_next("POST", rf"/api/datasets/{REPO}/commit/main$", mode="drop")
    fake_hub.fail_next("PUT", r"^/lfs-upload/", mode="drop")  # the client retries its own PUTs
    sha = make_remote(sleep=sleep).commit(write_files(tmp_path / "b", FILES), base, "with a dropped connection")
    assert seen == [(base, [".gitattributes", "README.md"])]
    assert [c.sha for c in fake_hub.history(REPO)][:2] == [sha, base]
    assert {k: v for k, v in fake_hub.files(REPO).items() if k != ".gitattributes"} == FILES
    assert [r.status for r in commits_sent(fake_hub)][-2:] == ["dropped", 200]
    assert "dropped" in [r.status for r in fake_hub.requests_matching("PUT", r"^/lfs-upload/")]


def test_lost_commit_answer_is_reported_as_moved_and_never_duplicated(fake_hub, tmp_path):
    remote = make_remote()
    base = remote.commit(write_files(tmp_path / "a", {"README.md": b"# v0\n"}), None, "base")
    fake_hub.fail_next("POST", rf"/api/datasets/{REPO}/commit/main$", mode="drop_after")
    files = write_files(tmp_path / "b", FILES)
    with pytest.raises(RemoteMovedError):
        remote.commit(files, base, "answer lost")
    history = fake_hub.history(REPO)
    assert [c.title for c in history] == ["answer lost", "base", "initial commit"]
    # after pulling the new head, the same push finds nothing to send
    assert remote.commit(files, history[0].sha, "answer lost") == history[0].sha
    assert len(fake_hub.history(REPO)) == 3


def test_server_errors_are_retried_with_backoff(fake_hub):
    fake_hub.create_repo(REPO)
    fake_hub.fail_next("GET", r"/refs$", mode="status", status=503, times=2)
    sleeps: list[float] = []
    assert make_remote(sleeps=sleeps).head() == fake_hub.head(REPO)
    assert sleeps == [0.01, 0.02]


def test_network_down_fails_clearly_after_bounded_retries(fake_hub, monkeypatch, tmp_path):
    token = fake_hub.token
    url = closed_port_url()
    sleeps: list[float] = []
    remote = make_remote(endpoint=url, sleeps=sleeps)
    with pytest.raises(HubError) as err:
        remote.head()
    text = "".join(traceback.format_exception(err.value))
    assert REPO in str(err.value) and url in str(err.value) and "3 attempt(s)" in str(err.value)
    assert token not in text and len(sleeps) == 2
    with pytest.raises(HubError, match="cannot read the branches of"):  # a first push looks before it creates
        remote.commit(write_files(tmp_path, FILES), None, "offline")
    # the total time bounds the attempts, whatever their number
    patient = HubRemote(hub_cfg(), endpoint=url, retry=RetryPolicy(attempts=1000, base_delay=0.02, max_total=0.3))
    with pytest.raises(HubError, match=r"attempt\(s\)") as err:
        patient.head()
    attempts = int(str(err.value).split(" attempt(s)")[0].rsplit(" ", 1)[1])
    assert 2 <= attempts < 20


def test_the_token_is_masked_in_every_error(fake_hub, tmp_path):
    token = fake_hub.token
    fake_hub.create_repo(REPO)
    fake_hub.fail_next("GET", r"/refs$", mode="status", status=400, message=f"token {token} was rejected")
    with pytest.raises(HubError) as err:
        make_remote().head()
    text = "".join(traceback.format_exception(err.value))
    assert "was rejected" in str(err.value) and "***" in str(err.value)
    assert token not in text and err.value.__cause__ is None and err.value.status == 400
    # a wrong token: a clear access error naming the variable, without the value
    wrong = "hf_" + "w" * 34
    with pytest.raises(HubError, match=r"token is invalid or expired \(HTTP 401\).*HF_TOKEN") as err:
        make_remote(token=wrong).commit(write_files(tmp_path, FILES), fake_hub.head(REPO), "bad token")
    assert wrong not in "".join(traceback.format_exception(err.value))


def test_http_401_without_a_token_says_to_set_one(fake_hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.chdir(tmp_path)  # no .env here
    fake_hub.create_repo(REPO)
    fake_hub.fail_next("GET", r"/refs$", mode="status", status=401, message="Authentication required")
    with pytest.raises(HubError) as err:
        make_remote().head()
    assert str(err.value) == (
        f"output.hf_repo_id: the Hub wants a token to read the branches of hf dataset {REPO}@main at {fake_hub.url} "
        "(HTTP 401) and none is set; put a token with write access (https://huggingface.co/settings/tokens) in HF_TOKEN "
        "(environment or .env), or log in with `hf auth login`")


def test_offline_mode_is_reported_without_retries(fake_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sleeps: list[float] = []
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        make_remote(sleeps=sleeps).head()
    assert sleeps == []


def test_commit_needs_a_token_before_any_request(fake_hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.chdir(tmp_path)  # no .env here
    before = len(fake_hub.requests)
    with pytest.raises(MissingTokenError, match=f"push to {REPO} needs HF_TOKEN in the environment or .env"):
        make_remote().commit(write_files(tmp_path, FILES), None, "no token")
    assert len(fake_hub.requests) == before


def test_describe_and_repo_id_checks(fake_hub):
    from qk_sniffer.remote.base import Remote
    from qk_sniffer.remote.configured import remote_for

    assert isinstance(remote_for({"output": {**hub_cfg()["output"], "remote_dir": None}}), HubRemote)
    assert isinstance(make_remote(), Remote)
    remote = make_remote(endpoint="https://user:secret@hub.example.org/")
    assert remote.describe() == f"hf dataset {REPO}@main at https://hub.example.org"
    for bad in (None, "no-namespace", "a/b/c", "/x"):
        with pytest.raises(RemoteError, match="output.hf_repo_id"):
            HubRemote(hub_cfg(repo=bad))


# ------------------------------------------------------------------------------- secrets


def test_token_from_environment_then_dotenv(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    (tmp_path / ".env").write_text("# local secrets\nHF_TOKEN=hf_from_dotenv\nOTHER=1\n")
    assert get_token() == "hf_from_env"
    monkeypatch.delenv("HF_TOKEN")
    assert get_token() == "hf_from_dotenv"
    assert "HF_TOKEN" not in os.environ and "OTHER" not in os.environ  # read, not loaded
    monkeypatch.setenv("HF_TOKEN", "  ")  # blank counts as unset
    assert get_token() == "hf_from_dotenv"
    (tmp_path / ".env").unlink()
    assert get_token() is None
    assert get_token(tmp_path / "missing.env") is None


def test_redact():
    token = "hf_" + "A1b2" * 9
    text = f"Authorization: Bearer {token} for output.hf_repo_id tester/qk"
    assert redact(text, token) == "Authorization: Bearer *** for output.hf_repo_id tester/qk"
    other = "hf_" + "Z" * 34  # token-shaped strings are masked too
    assert redact(f"echo {other}.") == "echo ***."
    assert redact("short secret abc", "secret") == "short *** abc"


def test_require_token(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(MissingTokenError) as err:
        require_token("tester/qk")
    assert str(err.value).startswith("push to tester/qk needs HF_TOKEN in the environment or .env")
    (tmp_path / ".env").write_text("HF_TOKEN='hf_quoted'\n")
    assert require_token("tester/qk") == "hf_quoted"


# ------------------------------------------------------------------------------- end to end

SECTIONS = {
    "dataset": {"max_samples": 12},
    "capture": {"layers": [0], "heads": [0, 1]},
    "workflow": {"num_chunks": 3},
}


def e2e_config(root: Path) -> dict:
    from .support.tiny_data import base_config

    return base_config(root, output={"hf_repo_id": REPO}, **SECTIONS)


@pytest.fixture(scope="module")
def staged_chunks(tmp_path_factory):
    """Three real staged chunks of the tiny Llama (and their merge, as the expected union)."""
    from qk_sniffer.chunk.run import run_chunk
    from qk_sniffer.merge import merge_staging

    root = tmp_path_factory.mktemp("staged") / "all"
    cfg = e2e_config(root)
    cfg["workflow"]["num_chunks"] = 3
    for i in range(3):
        run_chunk(cfg, i)
    merge_staging(cfg, root)
    return root


def new_root(tmp_path: Path, name: str, staged: Path, chunks: list[int]) -> tuple[dict, Path]:
    from qk_sniffer.layout import chunk_dir

    root = tmp_path / name
    for i in chunks:
        shutil.copytree(chunk_dir(staged, i), chunk_dir(root, i))
    return e2e_config(root), root


def build(cfg: dict, root: Path) -> None:
    from qk_sniffer.card import render_readme
    from qk_sniffer.merge import merge_staging

    merge_staging(cfg, root)
    render_readme(cfg, root)


def published(final: Path) -> dict[str, bytes]:
    """What a push publishes: the files of final/ except dot-files."""
    return {k: v for k, v in tree_bytes(final).items() if not any(part.startswith(".") for part in k.split("/"))}


def rows(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path).sort(["example_id", "position"])


def assert_no_token(token: str, *bases: Path, texts: tuple[str, ...] = ()):
    needle = token.encode()
    for base in bases:
        for p in base.rglob("*"):
            if p.is_file():
                assert needle not in p.read_bytes(), f"the token leaked into {p}"
    for text in texts:
        assert token not in text


@pytest.mark.slow
def test_push_pull_load_rerun_and_remote_deletion(fake_hub, staged_chunks, tmp_path, caplog, capfd):
    import datasets

    from qk_sniffer.remote.sync import pull
    from qk_sniffer.sweep_stages import push_one as push

    caplog.set_level(logging.DEBUG)
    cfg_a, root_a = new_root(tmp_path, "a", staged_chunks, [0, 1, 2])
    assert pull(cfg_a, root_a)["revision"] is None  # no remote yet
    build(cfg_a, root_a)
    first = push(cfg_a, root_a)
    assert first["pushed"] and len(first["commits"]) == 1
    assert fake_hub.head(REPO) == first["revision"]
    assert fake_hub.repos[("dataset", REPO)].private is False
    sent = published(root_a / "final")
    assert "README.md" in sent and "data/tiny/l00h00q/data.parquet" in sent
    assert {k: v for k, v in fake_hub.files(REPO).items() if k != ".gitattributes"} == sent

    cfg_b, root_b = new_root(tmp_path, "b", staged_chunks, [])
    pulled = pull(cfg_b, root_b)
    assert pulled["revision"] == first["revision"]
    assert published(root_b / "final") == sent

    loaded = datasets.load_dataset(REPO, "l00h00q", split="tiny")
    want = rows(root_a / "final/data/tiny/l00h00q/data.parquet")
    got = pl.from_arrow(loaded.data.table).sort(["example_id", "position"])
    assert got.height == want.height > 0
    assert got.select(want.columns).equals(want)

    commits_before = len(commits_sent(fake_hub))
    again = push(cfg_a, root_a)
    assert again["pushed"] is False and again["reason"] == "nothing changed"
    assert len(commits_sent(fake_hub)) == commits_before and fake_hub.head(REPO) == first["revision"]

    gone = "data/tiny/l00h01q/data.parquet"
    fake_hub.commit(REPO, delete=[gone], message="someone removes a config")
    assert (root_b / "final" / gone).is_file()
    pull(cfg_b, root_b)
    assert not (root_b / "final" / gone).exists()
    assert published(root_b / "final") == {k: v for k, v in sent.items() if k != gone}

    logs = caplog.text + "".join(capfd.readouterr())
    assert_no_token(fake_hub.token, root_a, root_b, fake_hub.home, texts=(logs,))


@pytest.mark.slow
def test_concurrent_pushes_from_one_revision_end_in_the_union(fake_hub, staged_chunks, tmp_path, caplog):
    from qk_sniffer.remote.sync import pull
    from qk_sniffer.sweep_stages import push_one as push

    caplog.set_level(logging.INFO)
    cfg_a, root_a = new_root(tmp_path, "a", staged_chunks, [0])
    pull(cfg_a, root_a)
    build(cfg_a, root_a)
    base = push(cfg_a, root_a)["revision"]

    shutil.copytree(staged_chunks / "staging/chunk-1", root_a / "staging/chunk-1")
    cfg_b, root_b = new_root(tmp_path, "b", staged_chunks, [2])
    assert pull(cfg_a, root_a)["revision"] == pull(cfg_b, root_b)["revision"] == base
    build(cfg_a, root_a)
    build(cfg_b, root_b)

    a = push(cfg_a, root_a)
    assert a["pushed"] and a["retries"] == 0
    b = push(cfg_b, root_b)  # 412, pull, merge, render, push
    assert b["pushed"] and b["retries"] == 1
    assert [r.status for r in commits_sent(fake_hub)].count(412) == 1
    assert [c.sha for c in fake_hub.history(REPO)][:3] == [b["revision"], a["revision"], base]

    remote = fake_hub.files(REPO)
    expected = staged_chunks / "final/data/tiny"
    configs = sorted(p.name for p in expected.iterdir())
    assert configs == sorted({k.split("/")[2] for k in remote if k.startswith("data/tiny/")})
    for name in configs:
        path = tmp_path / "remote" / name / "data.parquet"
        path.parent.mkdir(parents=True)
        path.write_bytes(remote[f"data/tiny/{name}/data.parquet"])
        got, want = rows(path), rows(expected / name / "data.parquet")
        assert got.select(["example_id", "position"]).is_duplicated().sum() == 0
        assert got.equals(want), name
    assert published(root_b / "final") == {k: v for k, v in remote.items() if k != ".gitattributes"}
    assert_no_token(fake_hub.token, root_a, root_b, texts=(caplog.text,))
