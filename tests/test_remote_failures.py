"""What goes wrong with a remote, reported early and on one line: check_remote (qk_sniffer/remote/check.py),
HTTP 401/403 at push time, a model or space named as the dataset, and a Hub that never answers.

The Hub tests run the real ``huggingface_hub`` client over HTTP against the fake Hub of tests/support/fakehub/
(tokens of each role, organisations, repositories of each type); the hung remote is a real socket that
accepts connections and never answers.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import threading
import time
from pathlib import Path

import httpx2
import pytest
import yaml

from qk_sniffer.cli import main
from qk_sniffer.config import ConfigError
from qk_sniffer.legacy import OriginalDatasetError
from qk_sniffer.remote.base import RemoteError
from qk_sniffer.remote.check import check_remote
from qk_sniffer.remote.credentials import MissingTokenError, require_hub_token
from qk_sniffer.remote.directory import DirRemote
from qk_sniffer.remote.hub import RepoTypeError
from qk_sniffer.remote.hub_http import HubError, bound_http, http_timeout, retry_policy
from qk_sniffer.remote.sync import SNAPSHOT_NAME, pull
from qk_sniffer.sweep_stages import push_one as push

from .support.fakehub import fake_hub_fixture  # noqa: F401  (the fixture fake_hub)
from .support.tiny_data import base_config, build_final

REPO = "tester/qk"
TOKEN_401 = "output.hf_repo_id: the Hub token is invalid or expired (HTTP 401); "


@pytest.fixture(autouse=True)
def _no_stale_log_handler():
    """``main`` points logging at the stderr pytest captures for that test; drop it afterwards."""
    yield
    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)


@pytest.fixture(autouse=True)
def _default_http_bounds():
    """Tests that shorten the timeout leave the client as they found it."""
    yield
    bound_http(None)


@pytest.fixture
def short_net(monkeypatch):
    """1 s per request and 2 attempts (one wait of the policy's 2 s in between)."""
    monkeypatch.setenv("QK_SNIFFER_HTTP_TIMEOUT_S", "1")
    monkeypatch.setenv("QK_SNIFFER_HTTP_RETRIES", "2")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A real data root (staged chunks, merged final/, rendered card), copied by the tests that push it."""
    root = tmp_path_factory.mktemp("failures") / "root"
    build_final(root, dataset={"max_samples": 8}, capture={"layers": [0], "heads": [0]})
    return root


def hub_cfg(repo: str = REPO, **output) -> dict:
    return {"output": {"hf_repo_id": repo, "hf_branch": "main", "private": False, **output}}


def data_root(tmp_path: Path, built: Path, repo: str = REPO) -> tuple[dict, Path]:
    root = tmp_path / "root"
    shutil.copytree(built, root)
    cfg = base_config(root, dataset={"max_samples": 8}, capture={"layers": [0], "heads": [0]},
                      output={"hf_repo_id": repo})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cfg, path


def tree_bytes(base: Path) -> dict[str, bytes]:
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def one_error_line(capsys, argv: list[str], code: int = 1) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error")]
    assert len(errors) == 1 and not any("Traceback" in line for line in err), "\n".join(err)
    return errors[0]


def writes(hub, since: int = 0) -> list:
    """The requests that could change the Hub (validating the card's YAML does not)."""
    return [r for r in hub.requests[since:] if r.method in ("POST", "PUT", "DELETE") and r.path != "/api/validate-yaml"]


# ------------------------------------------------------------------------------ check_remote: the Hub


def test_no_remote_and_two_remotes(tmp_path):
    assert check_remote({"output": {"hf_repo_id": None, "remote_dir": None}}) == "no remote"
    with pytest.raises(ConfigError, match="remove one of them"):
        check_remote({"output": {"hf_repo_id": REPO, "remote_dir": str(tmp_path)}})


@pytest.mark.parametrize("private", [False, True])
def test_a_new_dataset_in_the_users_namespace(fake_hub, private):
    line = check_remote(hub_cfg(private=private))
    assert line == (f"hf dataset {REPO}@main at {fake_hub.url}: writable as user tester (token role write); "
                    f"does not exist yet; the first push creates it ({'private' if private else 'public'})")
    assert fake_hub.repos == {} and writes(fake_hub) == []  # a check changes nothing


def test_an_existing_dataset_and_a_new_branch(fake_hub):
    fake_hub.create_repo(REPO)
    head = fake_hub.commit(REPO, {"README.md": b"# card\n"})
    assert check_remote(hub_cfg()).endswith(f"writable as user tester (token role write); at revision {head[:12]}")
    assert check_remote(hub_cfg(hf_branch="dev")).endswith("branch dev does not exist yet, the first push creates it")
    assert fake_hub.requests_matching("GET", rf"/api/datasets/{REPO}/auth-check/write$")[-1].status == 200
    assert writes(fake_hub) == [] and fake_hub.head(REPO, "dev") is None


def test_no_token_at_all(fake_hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.chdir(tmp_path)  # no .env here, and no stored login in the fixture's HF_HOME
    with pytest.raises(MissingTokenError) as err:
        check_remote(hub_cfg())
    assert str(err.value) == (
        f"output.hf_repo_id: pushing to {REPO} needs a Hub token and none is set; put a write token "
        "(https://huggingface.co/settings/tokens) in HF_TOKEN (environment or .env), or log in with `hf auth login`")
    assert fake_hub.requests == []


def test_a_stored_login_counts_like_hf_token(fake_hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.chdir(tmp_path)
    Path(constants.HF_TOKEN_PATH).write_text(fake_hub.token)  # what `hf auth login` stores
    assert require_hub_token(REPO) == fake_hub.token  # push() accepts it too
    assert "writable as user tester" in check_remote(hub_cfg())
    assert all(r.auth == "valid" for r in fake_hub.requests)


@pytest.mark.parametrize("how", ["wrong", "revoked"])
def test_an_invalid_or_revoked_token(fake_hub, monkeypatch, how):
    token = "hf_" + "w" * 34
    if how == "revoked":
        token = fake_hub.add_token("write")
        fake_hub.revoke_token(token)
    monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(HubError) as err:
        check_remote(hub_cfg())
    assert str(err.value) == (
        f"{TOKEN_401}cannot check the token for hf dataset {REPO}@main at {fake_hub.url}. Put a valid token with write "
        "access (https://huggingface.co/settings/tokens) in HF_TOKEN (environment or .env) and rerun")
    assert err.value.status == 401 and token not in str(err.value)


@pytest.mark.parametrize("exists", [False, True])
def test_a_read_only_token(fake_hub, monkeypatch, exists):
    if exists:
        fake_hub.create_repo(REPO)
    monkeypatch.setenv("HF_TOKEN", fake_hub.add_token("read"))
    with pytest.raises(HubError) as err:
        check_remote(hub_cfg())
    assert str(err.value) == (
        f"output.hf_repo_id: the Hub token of tester is read-only (role read) and cannot push to {REPO}; put a token "
        f"with write access to {REPO} in HF_TOKEN (role write, or fine-grained with repo.write on tester; "
        "https://huggingface.co/settings/tokens), or set output.hf_repo_id to a dataset repository you can write")


def test_fine_grained_tokens(fake_hub, monkeypatch):
    def check(*scoped):
        monkeypatch.setenv("HF_TOKEN", fake_hub.add_token("fineGrained", scoped=scoped))
        return check_remote(hub_cfg())

    with pytest.raises(HubError, match=r"the fine-grained Hub token of tester has no repo.write permission on tester, "):
        check(("user", "tester", ("repo.content.read",)))
    assert "(token role fineGrained); does not exist yet" in check(("user", "tester", ("repo.content.read", "repo.write")))
    # write access to the one dataset: enough once it exists, not to create it
    only_it = ("dataset", REPO, ("repo.write",))
    with pytest.raises(HubError, match="no repo.write permission on tester, so"):
        check(only_it)
    fake_hub.create_repo(REPO)
    assert "(token role fineGrained); at revision" in check(only_it)
    with pytest.raises(HubError, match=f"no repo.write permission on tester or on dataset {REPO}, so"):
        check(("dataset", "tester/other", ("repo.write",)))


def test_namespaces(fake_hub):
    with pytest.raises(HubError) as err:
        check_remote(hub_cfg("acme/qk"))
    assert str(err.value) == (
        "output.hf_repo_id: acme/qk does not exist and the token's user tester cannot create it: acme is neither tester "
        "nor an organisation where it may create repositories (its organisations: none); set output.hf_repo_id to "
        "tester/<name> or to a namespace you can write, or use a token of a member of acme")
    fake_hub.orgs["acme"] = "read"
    with pytest.raises(HubError, match=r"\(its organisations: acme \(read\)\)"):
        check_remote(hub_cfg("acme/qk"))
    fake_hub.orgs["acme"] = "write"
    assert "does not exist yet" in check_remote(hub_cfg("acme/qk"))
    # an existing dataset the Hub says this token may not write: its own answer (auth-check) decides
    fake_hub.create_repo("other/qk")
    with pytest.raises(HubError) as err:
        check_remote(hub_cfg("other/qk"))
    assert str(err.value).startswith(
        f"output.hf_repo_id: the Hub token may not write to hf dataset other/qk@main at {fake_hub.url} "
        "(HTTP 403: You don't have the rights to write to other/qk")
    assert err.value.status == 403 and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["model", "space"])
def test_a_model_or_space_of_that_name(fake_hub, kind):
    fake_hub.create_repo(REPO, repo_type=kind)
    with pytest.raises(RepoTypeError) as err:
        check_remote(hub_cfg())
    assert str(err.value) == (
        f"output.hf_repo_id: {REPO} is a {kind} repository at {fake_hub.url}, not a dataset; set output.hf_repo_id to "
        "a dataset repository (a name no model or space uses; the first push creates it); nothing was pulled or pushed")
    # a dataset of that name beside it is what the run uses
    fake_hub.create_repo(REPO)
    assert "at revision" in check_remote(hub_cfg())


def test_a_dataset_of_the_original_tool_on_the_branch(fake_hub):
    fake_hub.create_repo(REPO)
    fake_hub.commit(REPO, {"l00h00q/data.parquet": b"PAR1 original PAR1"}, branch="main")
    with pytest.raises(OriginalDatasetError, match=rf"^hf dataset {REPO}@main at .* holds a dataset of the original "
                                                   r"qk-sniffer tool \(l00h00q/data.parquet: .*Nothing was pulled"):
        check_remote(hub_cfg())


# ------------------------------------------------------------------------------ check_remote: a directory


def test_a_remote_directory(tmp_path):
    target = tmp_path / "shared" / "remote"
    cfg = {"output": {"remote_dir": str(target), "hf_repo_id": None}}
    assert check_remote(cfg) == (f"remote directory {target}: does not exist yet; {tmp_path} is writable, the first "
                                 "push creates it")
    assert not (tmp_path / "shared").exists() and os.listdir(tmp_path) == []  # the probe file is gone
    target.mkdir(parents=True)
    assert check_remote(cfg) == f"remote directory {target}: writable; holds no dataset yet, the first push creates it"
    (tmp_path / "f.txt").write_text("x")
    rev = DirRemote(target).commit({"README.md": tmp_path / "f.txt"}, None, "first")
    assert check_remote(cfg) == f"remote directory {target}: writable; at revision {rev[:12]}"
    (target / DirRemote.RECORD).write_text("{not json")
    with pytest.raises(RemoteError, match=r"\.qk-remote\.json is not readable JSON .*point output\.remote_dir at a fresh"):
        check_remote(cfg)
    (target / DirRemote.RECORD).unlink()
    (target / "l00h00k").mkdir()
    (target / "l00h00k" / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(OriginalDatasetError, match="holds a dataset of the original qk-sniffer tool"):
        check_remote(cfg)


def test_a_remote_directory_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RemoteError) as err:
        check_remote({"output": {"remote_dir": str(tmp_path / "file" / "remote"), "hf_repo_id": None}})
    assert str(err.value) == (f"output.remote_dir: {tmp_path / 'file'} is not a directory, so {tmp_path / 'file' / 'remote'} "
                              "cannot be one; point output.remote_dir at a directory (or a path to create one at)")


@pytest.mark.parametrize("where", ["read-only mode", "sysfs"])
def test_an_unwritable_remote_directory(tmp_path, where):
    if where == "sysfs":  # creating a file there fails even for root
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no /sys here")
        parent = Path("/sys")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes whatever the mode bits say")
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
    target = parent / "qk-remote"
    with pytest.raises(RemoteError) as err:
        check_remote({"output": {"remote_dir": str(target), "hf_repo_id": None}})
    assert str(err.value) == (
        f"output.remote_dir: {parent} is not writable by this process (uid {os.geteuid()}), so nothing can be pushed "
        f"to {target}; make it writable (chmod/chown, a read-write mount) or point output.remote_dir at a directory "
        "this user can write")


# ------------------------------------------------------------------------------ 401/403 at push time


def pulled(fake_hub, tmp_path, built) -> tuple[dict, Path, Path, str]:
    """A dataset another run pushed, pulled into a data root whose final/ then has this run's rows."""
    fake_hub.create_repo(REPO)
    head = fake_hub.commit(REPO, {"notes.txt": b"from another run\n"})
    cfg, path = data_root(tmp_path, built)
    root = Path(cfg["output"]["data_root"])
    keep = tree_bytes(root / "final")
    pull(cfg, root)
    for rel, data in keep.items():  # this run's merged rows (the pull replaced final/; a merge would replay them)
        (root / "final" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "final" / rel).write_bytes(data)
    return cfg, path, root, head


@pytest.mark.parametrize("token", ["read-only", "wrong", "revoked"])
def test_push_with_a_token_that_cannot_write(fake_hub, tmp_path, built, monkeypatch, capsys, token):
    cfg, path, root, head = pulled(fake_hub, tmp_path, built)
    before = tree_bytes(root)
    if token == "read-only":
        monkeypatch.setenv("HF_TOKEN", fake_hub.add_token("read"))
    elif token == "wrong":
        monkeypatch.setenv("HF_TOKEN", "hf_" + "w" * 34)
    else:
        fake_hub.revoke_token(fake_hub.token)
    history = [c.sha for c in fake_hub.history(REPO)]
    sent = len(fake_hub.requests)
    with pytest.raises(HubError) as err:
        push(cfg, root)
    line = one_error_line(capsys, ["push", "--config", str(path)])
    assert line == f"error: {err.value}" and "\n" not in str(err.value)
    if token == "read-only":
        assert err.value.status == 403 and str(err.value).startswith(
            f"output.hf_repo_id: the Hub token may not commit to hf dataset {REPO}@main at {fake_hub.url} (HTTP 403: "
            "This token has the read role")
        assert "Put a token with write access to tester/qk in HF_TOKEN" in str(err.value)
    else:
        assert err.value.status == 401 and str(err.value).startswith(TOKEN_401)
    # nothing published, half-way or otherwise; the local dataset byte for byte as it was
    assert [c.sha for c in fake_hub.history(REPO)] == history and fake_hub.head(REPO) == head
    assert not any(r.status == 200 for r in writes(fake_hub, sent))
    assert tree_bytes(root) == before and not (root / "push.json").exists()


def test_first_push_with_a_read_only_token_creates_nothing(fake_hub, tmp_path, built, monkeypatch):
    cfg, _path = data_root(tmp_path, built)
    root = Path(cfg["output"]["data_root"])
    before = tree_bytes(root)
    monkeypatch.setenv("HF_TOKEN", fake_hub.add_token("read"))
    with pytest.raises(HubError, match=rf"^output\.hf_repo_id: the Hub token may not create hf dataset {REPO}@main .*403"):
        push(cfg, root)
    assert fake_hub.repos == {} and tree_bytes(root) == before


# ------------------------------------------------------------------------------ a model repo at pull and push


@pytest.mark.parametrize("kind", ["model", "space"])
def test_pull_and_push_refuse_a_model_or_space(fake_hub, tmp_path, built, capsys, kind):
    fake_hub.create_repo(REPO, repo_type=kind)
    model_head = fake_hub.head(REPO, repo_type=kind)
    cfg, path = data_root(tmp_path, built)
    root = Path(cfg["output"]["data_root"])
    before = tree_bytes(root)
    want = f"error: output.hf_repo_id: {REPO} is a {kind} repository at {fake_hub.url}, not a dataset; "
    for stage in ("pull", "push"):
        assert one_error_line(capsys, [stage, "--config", str(path)]).startswith(want)
        with pytest.raises(RepoTypeError):
            (pull if stage == "pull" else push)(cfg, root)
    assert tree_bytes(root) == before and not (root / "final" / SNAPSHOT_NAME).exists()
    assert list(fake_hub.repos) == [(kind, REPO)] and fake_hub.head(REPO, repo_type=kind) == model_head
    assert writes(fake_hub) == []


# ------------------------------------------------------------------------------ bounded network time


class SilentServer:
    """Accepts TCP connections and never answers (a remote behind a stuck proxy or a hung server).

    A connection is closed after ``give_up_s`` so that a client without a timeout fails the test's
    time bound instead of hanging the test run.
    """

    def __init__(self, give_up_s: float = 30.0):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.sock.settimeout(0.05)
        self.give_up_s = give_up_s
        self.held: list[tuple[socket.socket, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self):
        while not self._stop.is_set():
            for conn, since in self.held:
                if time.monotonic() - since > self.give_up_s:
                    conn.close()
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.held.append((conn, time.monotonic()))  # kept open, never read, never answered

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        for conn, _since in self.held:
            conn.close()
        self.sock.close()


@pytest.fixture
def silent(fake_hub, monkeypatch, short_net):
    """The clients pointed at a :class:`SilentServer` (with the fake Hub's token and settings otherwise)."""
    from huggingface_hub import constants

    with SilentServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        yield server


def timed(fn):
    start = time.monotonic()
    with pytest.raises(HubError) as err:
        fn()
    return err.value, time.monotonic() - start


def test_a_hung_hub_fails_pull_and_check_in_bounded_time(silent, tmp_path, capsys):
    root = tmp_path / "root"
    (root / "final").mkdir(parents=True)
    (root / "final" / "kept.txt").write_text("kept")
    cfg = base_config(root, output={"hf_repo_id": REPO})
    for fn in (lambda: pull(cfg, root), lambda: check_remote(cfg)):
        accepted = len(silent.held)
        err, took = timed(fn)
        # two attempts of 1 s with the policy's 2 s wait between them: ~4 s, against forever without the bound
        assert 3.5 <= took < 15, took
        assert len(silent.held) - accepted == 2  # the connections were made: it was the answer that never came
        assert "\n" not in str(err) and silent.url in str(err)
        assert ": no answer within 1s, 2 attempt(s) in " in str(err)
        assert "is up and reachable from here and rerun" in str(err) and "QK_SNIFFER_HTTP_TIMEOUT_S" in str(err)
    assert str(err).startswith(f"cannot check the token for hf dataset {REPO}@main at {silent.url}: no answer within 1s")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    line = one_error_line(capsys, ["pull", "--config", str(path)])
    assert line.startswith(f"error: cannot read the branches of hf dataset {REPO}@main at {silent.url}: no answer within 1s")
    assert tree_bytes(root) == {"final/kept.txt": b"kept"}


def test_the_bound_caps_calls_that_ask_for_no_timeout_or_a_long_one(silent):
    from huggingface_hub import HfApi, get_hf_file_metadata

    bound_http(0.5)
    api = HfApi(endpoint=silent.url, token=False)
    for fn in (lambda: api.repo_info(REPO, repo_type="dataset", timeout=None),  # the client's default: no timeout
               lambda: get_hf_file_metadata(f"{silent.url}/datasets/{REPO}/resolve/main/x", timeout=600)):
        start = time.monotonic()
        with pytest.raises(httpx2.ReadTimeout):
            fn()
        assert time.monotonic() - start < 5


def test_a_push_whose_commit_hangs_publishes_nothing(fake_hub, tmp_path, built, short_net):
    cfg, _path, root, head = pulled(fake_hub, tmp_path, built)
    before = tree_bytes(root)
    fake_hub.fail_next("POST", rf"/api/datasets/{REPO}/commit/main$", mode="hang", times=2)
    err, took = timed(lambda: push(cfg, root))
    assert 3.5 <= took < 20, took
    assert str(err).startswith(f"cannot commit to hf dataset {REPO}@main at {fake_hub.url}: no answer within 1s, "
                               "2 attempt(s)")
    assert fake_hub.head(REPO) == head and tree_bytes(root) == before
    assert [r.status for r in fake_hub.requests_matching("POST", r"/commit/main$")] == ["hung", "hung"]
    assert push(cfg, root)["pushed"]  # the Hub answers again: the same push goes through


def test_timeout_and_retry_settings(monkeypatch):
    monkeypatch.delenv("QK_SNIFFER_HTTP_TIMEOUT_S", raising=False)
    monkeypatch.delenv("QK_SNIFFER_HTTP_RETRIES", raising=False)
    assert http_timeout() == 60 and retry_policy().attempts == 5
    monkeypatch.setenv("QK_SNIFFER_HTTP_TIMEOUT_S", " 2.5 ")
    monkeypatch.setenv("QK_SNIFFER_HTTP_RETRIES", "1")
    assert http_timeout() == 2.5 and retry_policy().attempts == 1
    for var, bad in (("QK_SNIFFER_HTTP_TIMEOUT_S", "0"), ("QK_SNIFFER_HTTP_TIMEOUT_S", "soon"),
                     ("QK_SNIFFER_HTTP_TIMEOUT_S", "inf"), ("QK_SNIFFER_HTTP_RETRIES", "0"),
                     ("QK_SNIFFER_HTTP_RETRIES", "2.5")):
        monkeypatch.setenv(var, bad)
        with pytest.raises(ConfigError, match=rf"^{var}='{bad}' is not a positive"):
            http_timeout() if var.endswith("_S") else retry_policy()
        monkeypatch.delenv(var)
