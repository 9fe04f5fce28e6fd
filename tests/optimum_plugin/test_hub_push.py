"""optimum_plugin.hub against a real HTTP server (tests/hub_server.py): pushes as one atomic commit, failures that
leave no half-written revision and retries that succeed, token errors, private repos, branches, and model cards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hub_helpers import OTHER, READ, TOKENS, WRITE, HubServer, folder_digest, point_hub_at

from optimum_plugin.hub import CardSpec, HubPushError, local_files, model_card, push_to_hub, resolve_folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with HubServer(tmp_path / "server", TOKENS) as server:
        point_hub_at(monkeypatch, server, tmp_path / "hf_home")
        yield server


def _model_folder(root: Path, tag: str, lfs_bytes: int = 200_000) -> Path:
    """A folder like a checkpoint: JSON (regular upload), two binary weight files (LFS), a nested file."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"tag": tag, "hidden_size": 64}))
    (root / "model.safetensors").write_bytes(os.urandom(lfs_bytes))
    (root / "rotkv.safetensors").write_bytes(os.urandom(lfs_bytes // 3))
    (root / "sub").mkdir()
    (root / "sub" / "notes.txt").write_text(f"version {tag}\n")
    return root


def _lfs_puts(hub: HubServer) -> list[str]:
    return [path for method, path, status in hub.log if method == "PUT" and path.startswith("/__lfs/upload/")]


def test_push_uploads_every_file_in_one_commit_and_downloads_identically(hub, tmp_path):
    src = _model_folder(tmp_path / "m", "v1")
    res = push_to_hub(src, "alice/tiny", token=WRITE, progress=False)
    assert (res.repo_id, res.revision, res.files, res.retries) == ("alice/tiny", "main", 4, 0)
    assert res.bytes == sum(p.stat().st_size for p in local_files(src).values())
    # The repo has its initial commit and exactly one more: ours.
    repo = hub.repos[("model", "alice/tiny")]
    assert len(repo.commits) == 2 and repo.branches["main"] == res.commit_oid
    # Binary weights went through the LFS batch + PUT path, the JSON as a regular (inline) file.
    assert len(_lfs_puts(hub)) == 2
    commit = repo.commits[res.commit_oid]
    assert commit.tree["model.safetensors"].lfs and not commit.tree["config.json"].lfs
    # A fresh download (empty cache) gives back the folder byte for byte.
    snap = resolve_folder("alice/tiny")
    got = {k: v for k, v in folder_digest(snap).items() if k != ".gitattributes"}
    assert got == folder_digest(src)


def test_failed_commit_leaves_no_half_written_revision_then_retry_succeeds(hub, tmp_path):
    v1 = _model_folder(tmp_path / "v1", "v1")
    first = push_to_hub(v1, "alice/tiny", token=WRITE, progress=False)
    v2 = _model_folder(tmp_path / "v2", "v2")
    before = folder_digest(v2)
    hub.inject("commit", times=1)  # the server stages half of the operations, then fails with a 500
    with pytest.raises(HubPushError, match="Nothing was committed") as err:
        push_to_hub(v2, "alice/tiny", token=WRITE, retries=0, progress=False)
    assert first.commit_oid in str(err.value)
    # The branch did not move; the repo holds exactly v1, none of v2's files, not even the staged half.
    assert hub.head("alice/tiny") == first.commit_oid
    remote = {k: v for k, v in hub.files("alice/tiny").items() if k != ".gitattributes"}
    assert remote == {k: (v1 / k).read_bytes() for k in folder_digest(v1)}
    assert folder_digest(v2) == before  # the user's folder is untouched
    # v2's blobs did reach the server before the commit failed: the retry does not send them again.
    puts_before = len(_lfs_puts(hub))
    second = push_to_hub(v2, "alice/tiny", token=WRITE, retries=0, progress=False)
    assert len(_lfs_puts(hub)) == puts_before
    assert hub.head("alice/tiny") == second.commit_oid != first.commit_oid
    remote = {k: v for k, v in hub.files("alice/tiny").items() if k != ".gitattributes"}
    assert remote == {k: (v2 / k).read_bytes() for k in folder_digest(v2)}
    assert folder_digest(v2) == before


def test_transient_commit_failure_is_retried_by_push(hub, tmp_path):
    src = _model_folder(tmp_path / "m", "v1")
    hub.inject("commit", times=1, status=503)
    res = push_to_hub(src, "alice/tiny", token=WRITE, retries=2, retry_wait=0.01, progress=False)
    assert res.retries == 1
    commits = [r for r in hub.log if r[0] == "POST" and "/commit/" in r[1]]
    assert [status for _, _, status in commits] == [503, 200]
    assert hub.files("alice/tiny")["config.json"] == (src / "config.json").read_bytes()


def test_commit_whose_answer_is_lost_is_reported_and_pushing_again_is_a_no_op(hub, tmp_path):
    src = _model_folder(tmp_path / "m", "v1")
    hub.create_repo("alice/tiny", "alice", private=False)
    initial = hub.head("alice/tiny")
    hub.inject("commit", times=1, applied=True)  # the server commits, then answers 500
    with pytest.raises(HubPushError, match=f"main is now at [0-9a-f]{{40}} \\(was {initial}\\): check the repo"):
        push_to_hub(src, "alice/tiny", token=WRITE, retries=0, progress=False)
    committed = hub.head("alice/tiny")
    assert committed != initial
    # Pushing the same folder again finds every file unchanged and makes no second commit.
    res = push_to_hub(src, "alice/tiny", token=WRITE, retries=0, progress=False)
    assert res.commit_oid == committed and len(hub.repos[("model", "alice/tiny")].commits) == 2


def test_upload_cut_off_midway_is_resent_and_committed_intact(hub, tmp_path):
    """The LFS PUT dies after a third of the body: huggingface_hub's own backoff resends it; what is committed is
    the whole file (the server checks the sha256 of every upload)."""
    src = _model_folder(tmp_path / "m", "v1", lfs_bytes=3_000_000)
    hub.inject("lfs-upload", times=1, after_bytes=1_000_000)
    res = push_to_hub(src, "alice/tiny", token=WRITE, retries=0, progress=False)
    failed = [r for r in hub.log if r[0] == "PUT" and r[2] >= 500]
    assert len(failed) == 1 and len(_lfs_puts(hub)) == 3
    assert hub.head("alice/tiny") == res.commit_oid
    assert hub.files("alice/tiny")["model.safetensors"] == (src / "model.safetensors").read_bytes()


@pytest.mark.parametrize("token, message", [
    ("hf_not_a_token", "rejected the token"),
    (READ, "read-only"),
    (None, "no Hugging Face token"),
])
def test_bad_tokens_are_clear_errors_before_any_upload(hub, tmp_path, token, message):
    src = _model_folder(tmp_path / "m", "v1")
    before = folder_digest(src)
    with pytest.raises(ValueError, match=message) as err:
        push_to_hub(src, "alice/tiny", token=token, progress=False)
    assert "token" in str(err.value).lower() and ("--token" in str(err.value) or "HF_TOKEN" in str(err.value))
    assert hub.repos == {} and _lfs_puts(hub) == []
    assert folder_digest(src) == before


def test_pushing_into_another_users_namespace_is_refused(hub, tmp_path):
    src = _model_folder(tmp_path / "m", "v1")
    push_to_hub(src, "alice/tiny", token=WRITE, progress=False)
    head = hub.head("alice/tiny")
    with pytest.raises(ValueError, match="'bob' may not write to alice/tiny"):
        push_to_hub(src, "alice/tiny", token=OTHER, retries=0, progress=False)
    assert hub.head("alice/tiny") == head


def test_private_repo_loads_only_with_a_token(hub, tmp_path):
    src = _model_folder(tmp_path / "m", "v1")
    res = push_to_hub(src, "alice/secret", token=WRITE, private=True, progress=False)
    assert res.private is True
    with pytest.raises(ValueError, match="does not exist or is private"):
        resolve_folder("alice/secret")
    snap = resolve_folder("alice/secret", token=READ)
    assert (snap / "config.json").read_bytes() == (src / "config.json").read_bytes()


def test_push_to_a_branch_leaves_main_alone_and_revisions_resolve(hub, tmp_path):
    v1 = _model_folder(tmp_path / "v1", "v1")
    v2 = _model_folder(tmp_path / "v2", "v2")
    push_to_hub(v1, "alice/tiny", token=WRITE, progress=False)
    res = push_to_hub(v2, "alice/tiny", token=WRITE, revision="candidate", progress=False)
    assert res.revision == "candidate"
    main = resolve_folder("alice/tiny")
    cand = resolve_folder("alice/tiny", revision="candidate")
    assert json.loads((main / "config.json").read_text())["tag"] == "v1"
    assert json.loads((cand / "config.json").read_text())["tag"] == "v2"
    with pytest.raises(ValueError, match="no revision 'nope'"):
        resolve_folder("alice/tiny", revision="nope")


def test_offline_mode_serves_the_cache_and_says_why_otherwise(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    src = _model_folder(tmp_path / "m", "v1")
    push_to_hub(src, "alice/tiny", token=WRITE, progress=False)
    cached = resolve_folder("alice/tiny")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(hub.log)
    assert resolve_folder("alice/tiny") == cached
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        resolve_folder("alice/never-downloaded")
    assert len(hub.log) == n  # offline means no request at all


def test_readme_override_is_uploaded_from_memory(hub, tmp_path):
    src = _model_folder(tmp_path / "m", "v1")
    (src / "README.md").write_text("---\nlibrary_name: transformers\n---\nlocal card\n")
    before = folder_digest(src)
    card = b"---\nlibrary_name: transformers\ntags:\n- rotkv\n---\nthe pushed card\n"
    push_to_hub(src, "alice/tiny", token=WRITE, replace_files={"README.md": card}, progress=False)
    assert hub.files("alice/tiny")["README.md"] == card
    assert folder_digest(src) == before
    info = hub.repos[("model", "alice/tiny")]
    assert info.branches["main"]


def test_bad_inputs_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        push_to_hub(tmp_path / "missing", "alice/x", token=WRITE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no file"):
        push_to_hub(tmp_path / "empty", "alice/x", token=WRITE)
    with pytest.raises(ValueError, match="not a Hub repo id"):
        push_to_hub(tmp_path, "alice/x/y", token=WRITE)
    with pytest.raises(ValueError, match="neither a local folder nor a Hub repo id"):
        resolve_folder(str(tmp_path / "no" / "such" / "folder"))


def test_model_card_metadata_usage_and_ratios():
    from huggingface_hub import ModelCard

    spec = CardSpec(method="RotateKV", summary="s", library_name="transformers", pipeline_tag="text-generation",
                    tags=("rotkv2",), base_model="org/base", config={"key_bits": 2},
                    calibration={"source": "file:calib.txt", "num_tokens": 256},
                    evaluation=[{"metric": "perplexity", "data": "d", "reference": 10.0, "quantized": 12.5}],
                    sizes=[{"what": "KV", "bf16_bytes": 4096, "quantized_bytes": 512}],
                    usage=[("Serve:", "bash", "vllm serve {repo} --kv-cache-dtype rotkv2")],
                    command="optimum-cli rotkv rotatekv -m x out --token $HF_TOKEN")
    text = str(model_card(spec, "alice/m"))
    card = ModelCard(text)
    meta = card.data.to_dict()
    assert meta["base_model"] == "org/base" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and meta["tags"][:3] == ["rotkv", "rotatekv", "rotkv2"]
    assert "vllm serve alice/m --kv-cache-dtype rotkv2" in text
    assert "| 10 | 12.5 | 1.2500 |" in text  # ratio = 12.5 / 10
    assert "8.00x smaller" in text and '"key_bits": 2' in text and "$HF_TOKEN" in text
