"""The real ``huggingface_hub`` and ``datasets`` clients against the fake Hub of tests/support/fakehub/.

These pin down that the fake answers what the clients actually call, so the tests of the Hub
remote exercise the real client code over real HTTP.
"""

from __future__ import annotations

import hashlib
import io
import time

import httpx2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    RepoFile,
    RepoFolder,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .support.fakehub import FakeHub, fake_hub_fixture, git_blob_sha1  # noqa: F401  (the fixture fake_hub)

REPO = "tester/qk"


def parquet_bytes(ids: list[int], dim: int = 4) -> bytes:
    table = pa.table(
        {
            "example_id": pa.array(ids, pa.int64()),
            "position": pa.array([i % 7 for i in ids], pa.int32()),
            "vector": pa.array([[float(i)] * dim for i in ids], pa.list_(pa.float32(), dim)),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


CARD = b"""---
configs:
- config_name: all
  default: true
  data_files:
  - split: tiny
    path: data/tiny/*/*.parquet
- config_name: l00h00q
  data_files:
  - split: tiny
    path: data/tiny/l00h00q/*.parquet
- config_name: l00h01q
  data_files:
  - split: tiny
    path: data/tiny/l00h01q/*.parquet
---
# test card
"""


@pytest.fixture
def api(fake_hub):
    return HfApi(endpoint=fake_hub.url, token=fake_hub.token)


@pytest.fixture
def populated(fake_hub, api, tmp_path):
    """A private dataset repo with a card, two Parquet files (LFS) and a text file (regular)."""
    api.create_repo(REPO, repo_type="dataset", private=True)
    files = {
        "README.md": CARD,
        "data/tiny/l00h00q/data.parquet": parquet_bytes([0, 1, 2, 3, 4]),
        "data/tiny/l00h01q/data.parquet": parquet_bytes([10, 11, 12]),
        "notes/info.txt": b"plain text\n",
    }
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in files.items()]
    info = api.create_commit(REPO, operations=ops, commit_message="add data", repo_type="dataset")
    return files, info.oid


def test_create_repo_private_and_exist_ok(fake_hub, api):
    url = api.create_repo(REPO, repo_type="dataset", private=True)
    assert url.repo_id == REPO and url.repo_type == "dataset"
    assert fake_hub.repos[("dataset", REPO)].private is True
    assert api.repo_info(REPO, repo_type="dataset").private is True
    # the Hub's initial commit holds .gitattributes
    assert list(fake_hub.files(REPO)) == [".gitattributes"]
    again = api.create_repo(REPO, repo_type="dataset", exist_ok=True)
    assert again.repo_id == REPO
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO, repo_type="dataset")
    assert err.value.response.status_code == 409
    api.create_repo("tester/open", repo_type="dataset", private=False)
    assert fake_hub.repos[("dataset", "tester/open")].private is False


def test_commit_regular_and_lfs_files(fake_hub, api, populated):
    files, sha = populated
    assert fake_hub.head(REPO) == sha
    blobs = fake_hub.blobs(REPO)
    assert {p: b.data for p, b in blobs.items() if p != ".gitattributes"} == files
    assert blobs["data/tiny/l00h00q/data.parquet"].lfs and not blobs["README.md"].lfs
    assert not blobs["notes/info.txt"].lfs
    # Parquet went through the LFS batch endpoint and a PUT; text went inline in the commit
    assert len(fake_hub.requests_matching("POST", r"\.git/info/lfs/objects/batch$")) == 1
    puts = fake_hub.requests_matching("PUT", r"^/lfs-upload/")
    assert sorted(r.body_size for r in puts) == sorted(len(files[p]) for p in files if p.endswith(".parquet"))
    assert len(fake_hub.requests_matching("POST", r"/api/validate-yaml$")) == 1
    commits = fake_hub.requests_matching("POST", r"/api/datasets/tester/qk/commit/main$")
    assert [r.status for r in commits] == [200]
    assert fake_hub.history(REPO)[0].title == "add data"


def test_repo_info_and_tree(fake_hub, api, populated):
    files, sha = populated
    info = api.repo_info(REPO, repo_type="dataset", files_metadata=True)
    assert info.sha == sha and info.last_modified is not None
    sib = {s.rfilename: s for s in info.siblings}
    pq_path = "data/tiny/l00h00q/data.parquet"
    assert sib[pq_path].lfs.sha256 == hashlib.sha256(files[pq_path]).hexdigest()
    assert sib["README.md"].lfs is None and sib["README.md"].blob_id == git_blob_sha1(files["README.md"])

    tree = list(api.list_repo_tree(REPO, repo_type="dataset", recursive=True))
    paths = {t.path: t for t in tree}
    assert isinstance(paths["data/tiny"], RepoFolder) and isinstance(paths[pq_path], RepoFile)
    assert paths[pq_path].lfs.sha256 == hashlib.sha256(files[pq_path]).hexdigest()
    assert paths[pq_path].size == len(files[pq_path])
    top = {t.path for t in api.list_repo_tree(REPO, repo_type="dataset")}
    assert top == {".gitattributes", "README.md", "data", "notes"}
    sub = {t.path for t in api.list_repo_tree(REPO, "data/tiny", repo_type="dataset")}
    assert sub == {"data/tiny/l00h00q", "data/tiny/l00h01q"}
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, "nowhere", repo_type="dataset"))

    fake_hub.tree_page_size = 2  # the client follows the Link header across pages
    paged = list(api.list_repo_tree(REPO, repo_type="dataset", recursive=True))
    assert [t.path for t in paged] == [t.path for t in tree]
    assert len(fake_hub.requests_matching("GET", r"/tree/main\?.*cursor=")) >= 2

    info = api.get_paths_info(REPO, ["README.md", "data", "missing.txt"], repo_type="dataset")
    assert [(type(i).__name__, i.path) for i in info] == [("RepoFile", "README.md"), ("RepoFolder", "data")]
    refs = api.list_repo_refs(REPO, repo_type="dataset")
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", sha)]
    commits = api.list_repo_commits(REPO, repo_type="dataset")
    assert [c.title for c in commits] == ["add data", "initial commit"]


def test_snapshot_and_file_download(fake_hub, api, populated, tmp_path):
    files, sha = populated
    dest = tmp_path / "snap"
    snapshot_download(REPO, repo_type="dataset", revision=sha, local_dir=dest, token=fake_hub.token)
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    got = {p: b for p, b in got.items() if not p.startswith(".cache/")}
    assert got == {**files, ".gitattributes": fake_hub.files(REPO)[".gitattributes"]}
    heads = fake_hub.requests_matching("HEAD", rf"/datasets/{REPO}/resolve/{sha}/")
    assert heads and all(r.status == 200 for r in heads)

    path = hf_hub_download(REPO, "data/tiny/l00h01q/data.parquet", repo_type="dataset", token=fake_hub.token)
    assert open(path, "rb").read() == files["data/tiny/l00h01q/data.parquet"]
    assert pq.read_table(path).column("example_id").to_pylist() == [10, 11, 12]


def test_resolve_headers_and_range(fake_hub, populated):
    files, sha = populated
    url = f"{fake_hub.url}/datasets/{REPO}/resolve/main/data/tiny/l00h00q/data.parquet"
    auth = {"Authorization": f"Bearer {fake_hub.token}"}
    data = files["data/tiny/l00h00q/data.parquet"]
    head = httpx2.head(url, headers=auth)
    assert head.status_code == 200
    assert head.headers["X-Repo-Commit"] == sha
    assert head.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert int(head.headers["Content-Length"]) == len(data)
    part = httpx2.get(url, headers={**auth, "Range": "bytes=4-11"})
    assert part.status_code == 206 and part.content == data[4:12]
    assert part.headers["Content-Range"] == f"bytes 4-11/{len(data)}"
    tail = httpx2.get(url, headers={**auth, "Range": "bytes=-4"})
    assert tail.content == data[-4:] == b"PAR1"
    readme = httpx2.head(f"{fake_hub.url}/datasets/{REPO}/resolve/{sha}/README.md", headers=auth)
    assert readme.headers["ETag"] == f'"{git_blob_sha1(files["README.md"])}"'


def test_stale_parent_commit_is_412_and_changes_nothing(fake_hub, api, populated):
    _, sha = populated
    newer = fake_hub.commit(REPO, {"other.txt": b"another writer\n"})
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(
            REPO,
            operations=[CommitOperationAdd("mine.txt", b"mine\n")],
            commit_message="late",
            repo_type="dataset",
            parent_commit=sha,
        )
    assert err.value.response.status_code == 412
    assert fake_hub.head(REPO) == newer and "mine.txt" not in fake_hub.files(REPO)
    # with the current head as parent it lands
    info = api.create_commit(
        REPO,
        operations=[CommitOperationAdd("mine.txt", b"mine\n")],
        commit_message="on time",
        repo_type="dataset",
        parent_commit=newer,
    )
    assert fake_hub.head(REPO) == info.oid and fake_hub.files(REPO)["mine.txt"] == b"mine\n"


def test_unchanged_files_send_no_commit(fake_hub, api, populated):
    files, sha = populated
    ops = [CommitOperationAdd(p, data) for p, data in files.items()]
    info = api.create_commit(REPO, operations=ops, commit_message="again", repo_type="dataset")
    assert info.oid == sha and fake_hub.head(REPO) == sha
    assert len(fake_hub.requests_matching("POST", r"/commit/main$")) == 1


def test_deletions_are_atomic(fake_hub, api, populated):
    _, sha = populated
    ops = [CommitOperationAdd("new.txt", b"new\n"), CommitOperationDelete("no/such/file.txt")]
    with pytest.raises(EntryNotFoundError):
        api.create_commit(REPO, operations=ops, commit_message="bad", repo_type="dataset")
    assert fake_hub.head(REPO) == sha and "new.txt" not in fake_hub.files(REPO)
    ops = [CommitOperationDelete("data/tiny/l00h01q/"), CommitOperationDelete("notes/info.txt")]
    api.create_commit(REPO, operations=ops, commit_message="prune", repo_type="dataset")
    assert sorted(fake_hub.files(REPO)) == [".gitattributes", "README.md", "data/tiny/l00h00q/data.parquet"]


def test_branches(fake_hub, api, populated):
    _, sha = populated
    api.create_branch(REPO, branch="dev", repo_type="dataset")
    info = api.create_commit(
        REPO, operations=[CommitOperationAdd("dev.txt", b"d")], commit_message="dev", repo_type="dataset", revision="dev"
    )
    assert fake_hub.head(REPO, "dev") == info.oid and fake_hub.head(REPO) == sha
    assert "dev.txt" not in fake_hub.files(REPO, "main")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch(REPO, branch="dev", repo_type="dataset")
    assert err.value.response.status_code == 409
    with pytest.raises(RevisionNotFoundError):
        api.create_commit(
            REPO, operations=[CommitOperationAdd("x", b"x")], commit_message="x", repo_type="dataset", revision="nope"
        )


def test_typed_errors_and_auth(fake_hub, api, populated):
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("tester/missing", repo_type="dataset")
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(REPO, repo_type="dataset", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.txt", repo_type="dataset", token=fake_hub.token)
    # private repo: invisible without a token; a wrong token is refused everywhere
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=fake_hub.url, token=False).repo_info(REPO, repo_type="dataset")
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=fake_hub.url, token="hf_" + "x" * 34).repo_info(REPO, repo_type="dataset")
    assert err.value.response.status_code == 401
    # writes need the token even on a public repo
    api.create_repo("tester/open", repo_type="dataset")
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=fake_hub.url, token=False).create_commit(
            "tester/open", operations=[CommitOperationAdd("a", b"a")], commit_message="a", repo_type="dataset"
        )
    assert err.value.response.status_code == 401
    assert HfApi(endpoint=fake_hub.url, token=False).repo_info("tester/open", repo_type="dataset").private is False


def test_token_roles_organisations_and_auth_check(fake_hub, api, populated):
    def status(fn) -> int:
        with pytest.raises(HfHubHTTPError) as err:
            fn()
        return err.value.response.status_code

    def add(client: HfApi, path: str, repo: str = REPO):
        return client.create_commit(repo, operations=[CommitOperationAdd(path, b"x")], commit_message=path,
                                    repo_type="dataset")

    me = api.whoami()
    assert (me["name"], me["orgs"], me["auth"]["accessToken"]["role"]) == ("tester", [], "write")
    api.auth_check(REPO, repo_type="dataset", write=True)  # answers 200: no exception
    with pytest.raises(RepositoryNotFoundError):
        api.auth_check("tester/missing", repo_type="dataset", write=True)
    # a read token reads (the private repo too) and is refused every write with 403
    reader = HfApi(endpoint=fake_hub.url, token=fake_hub.add_token("read"))
    access = reader.whoami()["auth"]["accessToken"]
    assert access["role"] == "read" and "fineGrained" not in access
    assert reader.list_repo_refs(REPO, repo_type="dataset").branches
    reader.auth_check(REPO, repo_type="dataset")
    assert status(lambda: reader.auth_check(REPO, repo_type="dataset", write=True)) == 403
    assert status(lambda: add(reader, "r.txt")) == 403
    assert status(lambda: reader.create_repo("tester/new", repo_type="dataset")) == 403
    assert status(lambda: reader.create_branch(REPO, branch="r", repo_type="dataset")) == 403
    # fine-grained: repo.write where it is granted, nowhere else; creating needs it on the namespace
    scoped = [("dataset", REPO, ["repo.content.read", "repo.write"])]
    fine = HfApi(endpoint=fake_hub.url, token=fake_hub.add_token("fineGrained", scoped=scoped))
    assert fine.whoami()["auth"]["accessToken"]["fineGrained"]["scoped"] == [
        {"entity": {"type": "dataset", "name": REPO}, "permissions": ["repo.content.read", "repo.write"]}]
    add(fine, "fine.txt")
    assert fake_hub.files(REPO)["fine.txt"] == b"x"
    assert status(lambda: fine.create_repo("tester/new", repo_type="dataset")) == 403
    # organisations: writable per the user's role in them
    assert status(lambda: api.create_repo("acme/data", repo_type="dataset")) == 403
    fake_hub.orgs["acme"] = "read"
    assert api.whoami()["orgs"] == [{"type": "org", "name": "acme", "roleInOrg": "read"}]
    assert status(lambda: api.create_repo("acme/data", repo_type="dataset")) == 403
    fake_hub.orgs["acme"] = "write"
    api.create_repo("acme/data", repo_type="dataset")
    add(api, "a.txt", "acme/data")
    # a revoked token is a wrong token
    token = fake_hub.add_token("write")
    HfApi(endpoint=fake_hub.url, token=token).whoami()
    fake_hub.revoke_token(token)
    assert status(lambda: HfApi(endpoint=fake_hub.url, token=token).whoami()) == 401
    assert status(lambda: HfApi(endpoint=fake_hub.url, token=token).list_repo_refs(REPO, repo_type="dataset")) == 401


def test_hang_fault_answers_nothing_and_changes_nothing(fake_hub, api, populated):
    from huggingface_hub import get_session

    _, sha = populated
    fake_hub.fail_next("POST", r"/commit/main$", mode="hang")
    url = f"{fake_hub.url}/api/datasets/{REPO}/commit/main"
    start = time.monotonic()
    with pytest.raises(httpx2.ReadTimeout):
        get_session().post(url, content=b"{}", headers={"Authorization": f"Bearer {fake_hub.token}"}, timeout=0.5)
    assert time.monotonic() - start < 5
    assert fake_hub.requests_matching("POST", r"/commit/main$")[-1].status == "hung" and fake_hub.head(REPO) == sha
    add = [CommitOperationAdd("after.txt", b"a")]
    assert api.create_commit(REPO, operations=add, commit_message="after", repo_type="dataset").oid == fake_hub.head(REPO)


def test_request_log_masks_the_token(fake_hub, api, populated, tmp_path_factory):
    authed = [r for r in fake_hub.requests if r.auth == "valid"]
    assert authed, "the client sent its token"
    for r in fake_hub.requests:
        assert fake_hub.token not in repr(r)
    assert all(r.headers.get("Authorization", "<masked>") == "<masked>" for r in fake_hub.requests)
    # the LFS upload URL carries its own grant, not the token
    assert all(r.auth == "none" for r in fake_hub.requests_matching("PUT", r"^/lfs-upload/"))


def test_fault_injection(fake_hub, api, populated):
    _, sha = populated
    fake_hub.fail_next("POST", r"/commit/main$", mode="drop")
    with pytest.raises(httpx2.RemoteProtocolError):
        api.create_commit(REPO, operations=[CommitOperationAdd("a.txt", b"a")], commit_message="a", repo_type="dataset")
    assert fake_hub.head(REPO) == sha  # nothing landed
    fake_hub.fail_next("POST", r"/commit/main$", mode="drop_after")
    with pytest.raises(httpx2.RemoteProtocolError):
        api.create_commit(REPO, operations=[CommitOperationAdd("a.txt", b"a")], commit_message="a", repo_type="dataset")
    assert fake_hub.files(REPO)["a.txt"] == b"a"  # landed, but the answer was lost
    fake_hub.fail_next("GET", r"/refs$", mode="status", status=500, message="boom")
    with pytest.raises(HfHubHTTPError) as err:
        api.list_repo_refs(REPO, repo_type="dataset")
    assert err.value.response.status_code == 500 and "boom" in str(err.value)
    assert api.list_repo_refs(REPO, repo_type="dataset").branches[0].target_commit == fake_hub.head(REPO)


def test_load_dataset_through_the_fake_hub(fake_hub, populated):
    import datasets

    one = datasets.load_dataset(REPO, "l00h00q", split="tiny")
    assert one["example_id"] == [0, 1, 2, 3, 4]
    assert one.features["vector"].length == 4
    every = datasets.load_dataset(REPO, split="tiny")
    assert sorted(every["example_id"]) == [0, 1, 2, 3, 4, 10, 11, 12]
    picked = datasets.load_dataset(REPO, data_files={"x": "data/tiny/l00h01q/*.parquet"}, split="x")
    assert picked["example_id"] == [10, 11, 12]
    with pytest.raises(datasets.exceptions.DatasetNotFoundError):
        datasets.load_dataset("tester/missing", split="tiny")


def test_standalone_server_without_token(monkeypatch):
    """Usable without the fixture too: an open server accepts writes without a token."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # tests/conftest.py sets HF_HUB_OFFLINE=1
    with FakeHub() as hub:
        api = HfApi(endpoint=hub.url, token=False)
        api.create_repo("someone/open", repo_type="dataset")
        api.create_commit("someone/open", operations=[CommitOperationAdd("a.txt", b"a")], commit_message="a", repo_type="dataset")
        assert hub.files("someone/open")["a.txt"] == b"a"
    with pytest.raises(RuntimeError):
        _ = hub.url
