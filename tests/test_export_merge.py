"""`tunesmith export --format adapter|merged`: the merged directory is an ordinary HF model that
computes what the run computed (LoRA, DoRA, QLoRA from its dequantised 4-bit base, full), with the
run's chat template and a generation config that stops at the end of an assistant turn."""
import json

import pytest
import torch

from conftest import train_tiny_run
from tunesmith.cli import main
from tunesmith.data.tokenize import prompt_ids
from tunesmith.errors import ModelError
from tunesmith.export import export_run
from tunesmith.generation import load_for_inference
from tunesmith.models.registry import sha256_file

CONV = [{"role": "user", "content": "Order 3 mugs and a teapot"}]


def _plain(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export-runs")
    return {m: train_tiny_run(tiny_model_dir, tmp, m, f"method.name={m}")
            for m in ("lora", "dora", "full", "prefix")}


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_merged_dir_is_a_plain_model_equal_to_the_run(runs, tmp_path, method):
    run = runs[method]
    out = export_run(run, "merged", tmp_path / "merged")
    assert not (out / "adapter_config.json").exists() and list(out.glob("*.safetensors"))
    assert not list(out.glob("*.bin"))
    merged, tok = _plain(out)                      # transformers alone, no PEFT
    ref = load_for_inference(run)
    ids = prompt_ids(ref.tokenizer, CONV)
    assert prompt_ids(tok, CONV) == ids            # same chat template, same tokens
    diff = float((_logits(merged, ids) - _logits(ref.model, ids)).abs().max())
    assert diff < 1e-4, diff
    base = load_for_inference(run, adapter=False)
    assert float((_logits(base.model, ids) - _logits(ref.model, ids)).abs().max()) > 1e-3  # the run changed it


def test_generation_config_stops_on_the_end_of_turn(runs, tmp_path):
    out = export_run(runs["lora"], "merged", tmp_path / "m")
    gen = json.loads((out / "generation_config.json").read_text())
    _, tok = _plain(out)
    eos = gen["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    assert eos[0] == tok.convert_tokens_to_ids("<|im_end|>")
    rendered = tok.apply_chat_template(CONV + [{"role": "assistant", "content": "ok"}], tokenize=False)
    assert rendered.split("ok", 1)[1].startswith(tok.convert_ids_to_tokens(eos[0]))
    assert gen["pad_token_id"] == tok.pad_token_id


def test_dtype_option_writes_that_type(runs, tmp_path):
    out = export_run(runs["lora"], "merged", tmp_path / "bf", dtype="bfloat16")
    from safetensors import safe_open

    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_qlora_merges_into_its_dequantised_base_not_into_4bit(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    run = train_tiny_run(tiny_model_dir, tmp_path, "q", "method.name=qlora")
    out = export_run(run, "merged", tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged, tok = _plain(out)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    ref = load_for_inference(run)                  # adapter on the 4-bit base, as trained
    ids = prompt_ids(tok, CONV)
    # In train mode (no dropout here) bitsandbytes computes as in training: fp32 on the dequantised
    # weights. Its eval-mode CPU kernel repacks the weights and works in bf16 (~1e-1 off).
    target = _logits(ref.model.train(), ids)
    diff = float((_logits(merged, ids) - target).abs().max())
    # Merging into the original full-precision weights instead would not reproduce the trained model:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    naive = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                                      str(run / "adapter")).merge_and_unload().eval()
    naive_diff = float((_logits(naive, ids) - target).abs().max())
    assert diff < 1e-4 and naive_diff > 100 * diff, (diff, naive_diff)


def test_dequantising_after_an_inference_forward_is_refused_not_scrambled(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from tunesmith.models.load import dequantized, load_model

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    used = load_model(tiny_model_dir, quantization_config=q).eval()
    with torch.no_grad():
        used(input_ids=torch.tensor([[3, 4, 5]]))   # bitsandbytes may repack the weights for its CPU kernel
    packed = any(getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
                 for m in used.modules())
    if not packed:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    with pytest.raises(ModelError, match="repacked.*load it again"):
        dequantized(used, torch.float32)


def test_prefix_tuning_cannot_merge_but_exports_as_adapter(runs, tmp_path):
    with pytest.raises(ModelError, match="cannot be merged.*--format adapter"):
        export_run(runs["prefix"], "merged", tmp_path / "m")
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))
    out = export_run(runs["prefix"], "adapter", tmp_path / "a")
    assert (out / "adapter_config.json").is_file()


def test_adapter_export_loads_in_peft_and_lists_checksums(runs, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = export_run(runs["lora"], "adapter", tmp_path / "a")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out)).eval()
    ref = load_for_inference(runs["lora"])
    ids = prompt_ids(ref.tokenizer, CONV)
    assert torch.allclose(_logits(model, ids), _logits(ref.model, ids), atol=1e-6)
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["format"] == "adapter" and manifest["files"]
    for name, digest in manifest["files"].items():
        assert sha256_file(out / name) == digest
    assert "chat_template.jinja" in manifest["files"] or "tokenizer_config.json" in manifest["files"]


def test_full_run_has_no_adapter_to_export(runs, tmp_path):
    with pytest.raises(ModelError, match="whole model.*--format merged"):
        export_run(runs["full"], "adapter", tmp_path / "a")


def test_failure_midway_leaves_nothing_and_existing_output_is_kept(runs, tmp_path, monkeypatch):
    import tunesmith.export.merge as merge

    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="already exists.*--force"):
        export_run(runs["lora"], "merged", out)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(merge, "merged_model", boom)
    with pytest.raises(OSError):
        export_run(runs["lora"], "merged", out, force=True)
    assert (out / "keep.txt").read_text() == "mine"           # the old export survives a failed --force
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_export_writes_under_the_run_by_default(runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(runs["lora"], run)
    assert main(["export", str(run), "--format", "adapter"]) == 0
    assert (run / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["export", str(tmp_path / "nope"), "--format", "merged"]) == 2
    assert "not a finished run directory" in capsys.readouterr().err


def test_gguf_export_writes_one_file_and_modelfile_per_type(runs, tmp_path):
    from gguf import GGUFReader

    out = export_run(runs["lora"], "gguf", tmp_path / "g", quant=["f16", "q8_0"])
    files = sorted(p.name for p in out.iterdir())
    assert files == ["Modelfile", "Modelfile.q8_0", "export.json", "lora-f16.gguf", "lora-q8_0.gguf"]
    assert "FROM ./lora-f16.gguf" in (out / "Modelfile").read_text()
    assert "FROM ./lora-q8_0.gguf" in (out / "Modelfile.q8_0").read_text()
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask     # not the private mode of temporary files:
    for name in files:                                       # Ollama's service user must read them
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    types = {t.tensor_type.name for t in GGUFReader(str(out / "lora-q8_0.gguf")).tensors}
    assert "Q8_0" in types and "F16" not in types
    with pytest.raises(ModelError, match="q5_k.*f32, f16, q8_0, q4_0"):
        export_run(runs["lora"], "gguf", tmp_path / "bad", quant=["q5_k"])
    assert not (tmp_path / "bad").exists()
