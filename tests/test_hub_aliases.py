"""Hub models tested per family (models/families.py HUB_ALIASES), with the hub offline as in every
test: an alias resolves to its repo through the Hugging Face cache and is recorded as alias + repo;
`tunesmith models list` shows every family's aliases, repos and cache state; a miss says which
alias, which repo and how to download it."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from families import build_family_model
from tunesmith.cli import main
from tunesmith.errors import ModelError
from tunesmith.models.families import FAMILIES, HUB_ALIASES
from tunesmith.models.registry import list_models, resolve_model

ALIAS, REPO = "qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct"
COMMIT = "4f2c1d0e9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e"


def fake_hub_cache(cache: Path, repo: str, model_dir: Path) -> Path:
    """Lay `model_dir` out as huggingface_hub's cache holds a downloaded repo: blobs named by their
    hash, a snapshot folder of relative symlinks to them, and refs/main naming the commit."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, storage / "blobs" / digest)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", digest))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    return cache


def test_every_family_has_hub_aliases_and_they_are_unique():
    aliases = [h.alias for f in FAMILIES.values() for h in f.hub]
    assert all(f.hub for f in FAMILIES.values()) and len(aliases) == len(set(aliases)) == len(HUB_ALIASES)
    for name in ("qwen2.5-0.5b-instruct", "llama-3.2-1b-instruct", "gemma-3-1b-it", "mistral-7b-instruct",
                 "phi-3-mini"):
        assert name in HUB_ALIASES  # the ones issue 15 names


def test_uncached_alias_offline_names_alias_repo_and_download(hf_cache):
    with pytest.raises(ModelError) as e:
        resolve_model(ALIAS)
    msg = str(e.value)
    assert f"model '{ALIAS}' (hub repo {REPO}) is not in the Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE=1" in msg and f"hf download {REPO} --local-dir DIR" in msg and "model.name=DIR" in msg
    with pytest.raises(ModelError) as e:  # a gated one also says to accept its terms first
        resolve_model("gemma-3-1b-it")
    assert "accept its terms at https://huggingface.co/google/gemma-3-1b-it" in str(e.value)


def test_unknown_name_points_to_the_hub_aliases(hf_cache):
    with pytest.raises(ModelError, match=r"hub alias such as llama-3.2-1b-instruct.*tunesmith models list"):
        resolve_model("qwen2.5-0.5b")


def test_cached_alias_resolves_offline_and_is_recorded_with_its_repo(hf_cache, tmp_path, capsys):
    snapshot = fake_hub_cache(hf_cache, REPO, build_family_model("qwen2", tmp_path / "tiny-qwen2"))
    resolved = resolve_model(ALIAS.upper())  # aliases are case-insensitive
    assert resolved.path == snapshot and resolved.source == "hub"
    assert resolved.record() | {"path": None} == {"id": ALIAS, "repo": REPO, "source": "hub", "path": None,
                                                  "sha256": resolved.sha256}
    assert json.loads((resolved.path / "config.json").read_text())["model_type"] == "qwen2"
    assert resolve_model(REPO).record()["id"] == REPO  # the repo id itself is a plain hub id (no alias)

    rows = {r["name"]: r for r in list_models()}
    assert rows[ALIAS]["state"] == f"cached at {snapshot}" and rows[ALIAS]["repo"] == REPO
    assert rows["qwen2.5-1.5b-instruct"]["state"] == "needs download"
    assert rows["gemma-3-1b-it"]["state"] == "gated, needs download"
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for family in FAMILIES.values():
        assert f"  {family.name}: {family.description}" in out
        for hub in family.hub:
            assert hub.alias in out and hub.repo in out
    assert f"{ALIAS:<24} {REPO:<36} cached at {snapshot}" in out


def test_training_on_an_alias_records_alias_and_repo_in_the_manifest(hf_cache, tmp_path):
    from conftest import train_tiny_run

    fake_hub_cache(hf_cache, REPO, build_family_model("qwen2", tmp_path / "tiny-qwen2"))
    (tmp_path / "runs").mkdir()
    run = train_tiny_run(ALIAS, tmp_path / "runs", "alias-run", "method.name=lora", "data.max_length=160",
                         steps=1)
    model = json.loads((run / "manifest.json").read_text())["model"]
    assert (model["id"], model["repo"], model["source"]) == (ALIAS, REPO, "hub")
