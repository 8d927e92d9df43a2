import json

import pytest

from tunesmith.cli import main
from tunesmith.errors import ModelError
from tunesmith.models import registry
from tunesmith.models.registry import list_models, resolve_model, sha256_file


def test_local_directory_resolves_with_weights_hash(tiny_model_dir):
    r = resolve_model(str(tiny_model_dir))
    assert r.source == "directory" and r.path == tiny_model_dir.resolve()
    assert r.sha256 == sha256_file(tiny_model_dir / "model.safetensors")


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="pickled weights are refused"):
        resolve_model(str(tmp_path))


def test_hub_id_offline_says_not_cached_and_how_to_point_locally(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError) as e:
        resolve_model("someorg/some-model")
    assert "not in the Hugging Face cache" in str(e.value) and "model.name=DIR" in str(e.value)


def test_unknown_name_lists_aliases():
    with pytest.raises(ModelError, match="smollm2-135m-instruct"):
        resolve_model("smollm3")
    with pytest.raises(ModelError, match="not a model directory"):
        resolve_model("./does/not/exist")


class FakeConversion:
    """Stands in for transformers' GGUF loaders so the cache logic is tested in milliseconds."""

    def __init__(self, model_dir, fail: bool):
        import transformers

        self.model_dir, self.fail, self.calls = model_dir, fail, 0
        self.load_tok = transformers.AutoTokenizer.from_pretrained
        self.load_model = transformers.AutoModelForCausalLM.from_pretrained

    def tokenizer(self, *a, **k):
        self.calls += 1
        return self.load_tok(self.model_dir)

    def model(self, *a, **k):
        m = self.load_model(self.model_dir)
        if self.fail:
            def half_write(path, **kw):
                (path / "model.safetensors").write_bytes(b"partial")
                raise OSError("No space left on device")
            m.save_pretrained = half_write
        return m


@pytest.mark.parametrize("fail", [True, False])
def test_gguf_conversion_is_atomic(tiny_model_dir, tmp_path, monkeypatch, fail):
    import transformers

    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake")
    fake = FakeConversion(tiny_model_dir, fail)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake.tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake.model)
    cache = tmp_path / "home" / "models"
    if fail:
        with pytest.raises(OSError, match="No space left"):
            resolve_model(str(gguf))
        assert list(cache.iterdir()) == []  # neither a broken entry nor a temp folder is left
        return
    r = resolve_model(str(gguf))
    assert r.source == "gguf" and r.sha256 == sha256_file(gguf)
    assert json.loads((r.path / "tunesmith.json").read_text())["sha256"] == r.sha256
    assert (r.path / "model.safetensors").stat().st_size > 1000
    assert resolve_model(str(gguf)).path == r.path and fake.calls == 1  # converted once, then cached
    assert [p.name for p in cache.iterdir()] == [r.path.name]


def test_models_list_shows_alias_and_cache_state(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path))
    rows = {r["name"]: r for r in list_models()}
    assert rows["smollm2-135m-instruct"]["state"] == "available"
    gguf = registry.ALIASES["smollm2-135m-instruct"].locate()
    fake_entry = tmp_path / "models" / f"{gguf.stem}-abc"
    fake_entry.mkdir(parents=True)
    (fake_entry / "tunesmith.json").write_text("{}")
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and f"cached at {fake_entry}" in out
