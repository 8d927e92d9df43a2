import json
import os
import shutil
import subprocess
import sys

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


def _http_error(cls, status: int):
    """A huggingface_hub HTTP error as the hub client raises it, with a response of `status`."""
    from huggingface_hub.errors import HfHubHTTPError

    http = sys.modules[HfHubHTTPError.__mro__[1].__module__.split(".")[0]]  # the HTTP client the hub library uses
    url = "https://huggingface.co/api/models/someorg/some-model"
    return cls(f"{status} for {url}", response=http.Response(status, request=http.Request("GET", url)))


def _connect_failure():
    """What snapshot_download raises when the hub cannot be reached and nothing is cached."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    http = sys.modules[HfHubHTTPError.__mro__[1].__module__.split(".")[0]]
    try:
        raise LocalEntryNotFoundError("cannot find the snapshot folder") from http.ConnectError("Name or service not known")
    except LocalEntryNotFoundError as exc:
        return exc


@pytest.mark.parametrize("failure, expected", [
    (lambda e: _http_error(e.GatedRepoError, 403), r"is gated on the Hugging Face hub \(HTTP 403\).*accept its terms"),
    (lambda e: _http_error(e.RepositoryNotFoundError, 404), r"was not found on the Hugging Face hub \(HTTP 404\)"),
    (lambda e: _http_error(e.RepositoryNotFoundError, 401), r"was not found on the Hugging Face hub \(HTTP 401\).*"
                                                             r"private.*HF_TOKEN"),
    (lambda e: _http_error(e.HfHubHTTPError, 401), r"refused the credentials.*\(HTTP 401\)"),
    (lambda e: _http_error(e.HfHubHTTPError, 503), r"answered HTTP 503"),
    (lambda e: _connect_failure(), r"the hub could not be reached \(ConnectError: Name or service not known\)"),
], ids=["gated", "404", "private-401", "bad-token-401", "503", "no-network"])
def test_hub_download_failure_is_reported_as_what_it_is(monkeypatch, failure, expected):
    import huggingface_hub
    from huggingface_hub import constants, errors

    calls = []

    def snapshot_download(repo_id, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        if local_files_only:
            raise errors.LocalEntryNotFoundError("not in the cache")
        raise failure(errors)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelError, match=expected) as e:
        resolve_model("someorg/some-model")
    assert calls == [True, False]  # the cache first, then the download that failed
    assert "model.name=DIR" in str(e.value)
    if "reached" not in expected:  # not a cache problem: must not be called one
        assert "not in the Hugging Face cache" not in str(e.value)


def test_hub_offline_says_downloads_are_off_and_does_not_try(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants, errors

    calls = []

    def snapshot_download(repo_id, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        raise errors.LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"not in the Hugging Face cache, and downloads are off \(HF_HUB_OFFLINE=1\)"):
        resolve_model("someorg/some-model")
    assert calls == [True]


def test_a_missing_weight_is_reported_through_the_cli(tiny_model_dir, tmp_path):
    """quiet_upstream keeps noise down, not transformers' report of weights it had to initialise."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    env = dict(os.environ, TUNESMITH_ALLOCATOR="system")
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "generate", str(broken), "--prompt", "hi",
                           "--max-new-tokens", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "model.layers.0.mlp.up_proj.weight" in done.stderr and "MISSING" in done.stderr
    assert "newly initialized" in done.stderr


def test_quiet_upstream_drops_only_known_noise():
    import logging
    import warnings

    from tunesmith.cli import quiet_upstream

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_upstream()
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "modeling_utils.py", 1,
                               module="transformers.modeling_utils")
        warnings.warn_explicit("this API of yours is deprecated", FutureWarning, "train.py", 1, module="mytrainer")
    assert [str(w.message) for w in seen] == ["this API of yours is deprecated"]

    def shown(logger_name: str, message: str) -> bool:
        """Whether a warning logged there passes tunesmith's filters on the logger and its handlers."""
        logger = logging.getLogger(logger_name)
        record = logger.makeRecord(logger_name, logging.WARNING, "x.py", 1, message, None, None)
        root = logging.getLogger(logger_name.split(".")[0])
        return logger.isEnabledFor(logging.WARNING) and logger.filter(record) and all(
            h.filter(record) for h in root.handlers)

    assert not shown("transformers.generation.configuration_utils",
                     "The following generation flags are not valid and may be ignored: ['temperature'].")
    assert shown("transformers.modeling_utils", "LlamaForCausalLM LOAD REPORT from: x\nmodel.norm.weight | MISSING")
    assert shown("transformers.modeling_utils", "Some weights of the model checkpoint were not used")
    assert not shown("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: x")
    assert shown("bitsandbytes.backends.cpu.ops", "anything else bitsandbytes has to say")
