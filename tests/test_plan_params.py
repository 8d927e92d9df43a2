"""plan/params.py and plan/shapes.py: exact parameter counts from a config alone (meta device).

Cross-checks, each against something the counting code does not share:
- the published totals of real models (tests/data/model_configs: their hub config.json files);
- LoRA by hand, r * (in + out) summed over the family table's targets, in/out read from config.json;
- every registered method on the tiny family fixtures, materialised with random weights on CPU and
  counted by tunesmith.methods.count_parameters (what training reports), QLoRA through bitsandbytes.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from families import FIXTURES
from tunesmith.config import MethodSection
from tunesmith.errors import ModelError
from tunesmith.methods import METHODS, Method, get_method, method_names
from tunesmith.methods import count_parameters as materialised_counts
from tunesmith.models.families import family_of
from tunesmith.plan.params import count_parameters, meta_model
from tunesmith.plan.shapes import ModelShape, model_config

CONFIGS = Path(__file__).parent / "data" / "model_configs"

# Total parameters as published (model cards, the safetensors index's total): tied embeddings once.
PUBLISHED = {
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3.2-3B": 3_212_749_824,
    "Llama-3.1-8B": 8_030_261_248,
    "Llama-3.1-70B": 70_553_706_496,
    "Llama-2-7b-hf": 6_738_415_616,
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-7B": 7_615_616_512,
    "Mistral-7B-v0.1": 7_241_732_096,
    "gemma-2-2b": 2_614_341_888,
    "Phi-3-mini-4k-instruct": 3_821_079_552,
}
NAMES = sorted(PUBLISHED)


def raw(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


@functools.cache
def hub_config(name: str):
    return model_config(str(CONFIGS / f"{name}.json"))[0]


@functools.cache
def counts(name: str, method: str = "full", **options):
    return count_parameters(hub_config(name), MethodSection(name=method, **options))


def block_linears(c: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of one decoder block, from config.json alone."""
    h, heads = c["hidden_size"], c["num_attention_heads"]
    kv, i = c.get("num_key_value_heads") or heads, c["intermediate_size"]
    hd = c.get("head_dim") or h // heads
    return {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
            "qkv_proj": (h, (heads + 2 * kv) * hd), "gate_up_proj": (h, 2 * i)}  # Phi-3's fused ones


# --- the shipped configs ----------------------------------------------------------------------------

def test_shipped_configs_are_the_listed_ones_and_load_without_remote_code():
    from transformers import AutoConfig

    assert sorted(p.stem for p in CONFIGS.glob("*.json")) == NAMES
    readme = (CONFIGS / "README.md").read_text()
    for name in NAMES:
        AutoConfig.from_pretrained(str(CONFIGS / f"{name}.json"), trust_remote_code=False)
        row = re.search(rf"^\| `{re.escape(name)}\.json` \| \S+/{re.escape(name)} \| ([\d,]+) \|", readme, re.M)
        assert row, f"README.md has no row for {name}"
        assert int(row.group(1).replace(",", "")) == PUBLISHED[name]


@pytest.mark.parametrize("name", NAMES)
def test_full_counts_are_the_published_totals(name):
    c, cfg = counts(name), raw(name)
    assert c.base == c.total == c.trainable == PUBLISHED[name]
    assert c.added == 0 and c.quantized == 0 and c.trains_base
    assert c.embedding == cfg["vocab_size"] * cfg["hidden_size"]
    tied = c.head == 0
    assert tied == hub_config(name).tie_word_embeddings
    assert c.head == (0 if tied else cfg["vocab_size"] * cfg["hidden_size"])


def test_the_70b_counts_on_the_meta_device_quickly():
    counts("Qwen2.5-0.5B", "lora")  # imports (PEFT, bitsandbytes) outside the timing
    # CPU time, not wall time: other processes sharing the cores do not count against it
    t0 = time.process_time()
    full = count_parameters(hub_config("Llama-3.1-70B"), MethodSection(name="full"))
    t1 = time.process_time()
    lora = count_parameters(hub_config("Llama-3.1-70B"), MethodSection(name="lora"))
    t2 = time.process_time()
    assert full.total == PUBLISHED["Llama-3.1-70B"] and lora.trainable == 207_093_760
    # adapters too stay shapes: PEFT alone allocates and initialises 0.8 GB of them
    assert t1 - t0 < 2 and t2 - t1 < 4, (t1 - t0, t2 - t1)  # ~0.1 s and ~1 s (7 s with CPU adapters)


@pytest.mark.parametrize("name", ["Qwen2.5-0.5B", "Llama-3.2-1B"])
def test_tied_embeddings_are_counted_once(name):
    c, cfg = counts(name), raw(name)
    assert cfg["tie_word_embeddings"] is True and c.head == 0
    model = meta_model(hub_config(name))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    every_reference = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert c.base == every_reference - c.embedding == PUBLISHED[name]


# --- LoRA, DoRA by hand -------------------------------------------------------------------------------

def test_lora_r16_all_linear_matches_the_issues_figures():
    assert counts("Llama-3.1-8B", "lora", r=16).trainable == 41_943_040
    assert counts("Llama-2-7b-hf", "lora", r=16).trainable == 39_976_960


@pytest.mark.parametrize("name", NAMES)
def test_lora_r16_all_linear_is_r_times_in_plus_out(name):
    cfg, r = raw(name), 16
    targets = family_of(hub_config(name)).linear_modules
    assert len(targets) == (4 if cfg["model_type"] == "phi3" else 7)  # the seven projections (Phi-3 fuses)
    shapes = block_linears(cfg)
    expected = cfg["num_hidden_layers"] * sum(r * sum(shapes[t]) for t in targets)
    c = counts(name, "lora", r=r)
    assert c.trainable == c.added == expected
    assert c.total == PUBLISHED[name] + expected and c.quantized == 0


@pytest.mark.parametrize("name", ["Llama-3.2-1B", "Phi-3-mini-4k-instruct"])
def test_dora_adds_one_magnitude_per_output_feature(name):
    cfg = raw(name)
    shapes = block_linears(cfg)
    targets = family_of(hub_config(name)).linear_modules
    magnitudes = cfg["num_hidden_layers"] * sum(shapes[t][1] for t in targets)
    assert counts(name, "dora", r=8).trainable == counts(name, "lora", r=8).trainable + magnitudes


@pytest.mark.parametrize("name", ["Llama-3.1-8B", "Qwen2.5-0.5B"])
def test_qlora_quantizes_every_linear_layer_but_the_head(name):
    cfg, c, lora = raw(name), counts(name, "qlora"), counts(name, "lora")
    assert (c.trainable, c.added, c.total) == (lora.trainable, lora.added, lora.total)
    targets = family_of(hub_config(name)).linear_modules
    per_block = sum(i * o for t, (i, o) in block_linears(cfg).items() if t in targets)
    assert c.quantized == cfg["num_hidden_layers"] * per_block


def test_the_meta_count_of_qlora_needs_no_bitsandbytes(monkeypatch):
    """Counting never loads in 4-bit nor runs QLoRA's builder (prepare_model_for_kbit_training): both
    need bitsandbytes; the adapters are LoRA's and the quantized layers are counted from shapes."""
    def needs_bitsandbytes(*_):
        raise AssertionError("the meta count reached a bitsandbytes code path")
    monkeypatch.setitem(METHODS, "qlora", Method("qlora", needs_bitsandbytes, needs_bitsandbytes, "adapter", ""))
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # a fresh import fails
    c = count_parameters(hub_config("Qwen2.5-0.5B"), MethodSection(name="qlora"))
    assert c.trainable == counts("Qwen2.5-0.5B", "lora").trainable and c.quantized > 0


# --- every method, materialised on the tiny family fixtures --------------------------------------------

# Phi-3's pad token (32000) must be a row of its embedding; the others need no large vocabulary.
FIXTURE_VOCAB = {"phi3": 32064}
OPTIONS = dict(r=8, num_virtual_tokens=5)  # not the defaults: the counts must follow the options


def fixture_config(family: str):
    import transformers

    fx = FIXTURES[family]
    return getattr(transformers, fx.config_class)(**{**fx.config, "vocab_size": FIXTURE_VOCAB.get(family, 512)})


def build_materialised(family: str, method: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(fixture_config(family))
    with contextlib.redirect_stdout(io.StringIO()):
        return get_method(method).build(model, MethodSection(name=method, **OPTIONS))


def test_every_registered_method_is_covered():
    assert set(method_names()) == {"full", "selective", "lora", "dora", "qlora", "ia3", "prefix", "prompt"}


@pytest.mark.parametrize("method", [m for m in ("full", "selective", "lora", "dora", "ia3", "prefix", "prompt")])
@pytest.mark.parametrize("family", sorted(FIXTURES))
def test_meta_counts_equal_the_materialised_model(family, method):
    built = build_materialised(family, method)
    trainable, total = materialised_counts(built)
    c = count_parameters(fixture_config(family), MethodSection(name=method, **OPTIONS))
    assert (c.trainable, c.total) == (trainable, total)
    assert 0 < c.trainable <= c.total and (method == "full") == (c.trainable == c.total)
    assert c.trains_base == (method in ("full", "selective"))


def has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not has_bnb(), reason="bitsandbytes is not installed (the meta count is tested without it)")
@pytest.mark.parametrize("family", sorted(FIXTURES))
def test_qlora_meta_counts_equal_the_4bit_model(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunesmith.models.load import load_model

    cfg = fixture_config(family)
    plain = AutoModelForCausalLM.from_config(cfg)
    plain.save_pretrained(tmp_path)
    head = plain.get_output_embeddings()
    linear_but_head = sum(m.weight.numel() for m in plain.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    mcfg = MethodSection(name="qlora", **OPTIONS)
    model = load_model(tmp_path, **get_method("qlora").load_kwargs(mcfg))
    four_bit = sum(torch.Size(m.weight.quant_state.shape).numel() for m in model.modules()
                   if hasattr(getattr(m, "weight", None), "quant_state"))
    with contextlib.redirect_stdout(io.StringIO()):
        built = get_method("qlora").build(model, mcfg)
    c = count_parameters(cfg, mcfg)
    assert (c.trainable, c.total) == materialised_counts(built)  # 4-bit weights count as what they stand for
    assert c.quantized == four_bit == linear_but_head
    assert c.trainable == count_parameters(cfg, MethodSection(name="lora", **OPTIONS)).trainable


# --- shapes.model_config: where a config comes from -----------------------------------------------------

def test_config_json_file_and_directory(tmp_path):
    (tmp_path / "config.json").write_text((CONFIGS / "Llama-3.2-1B.json").read_text())
    config, source = model_config(str(tmp_path / "config.json"))
    assert config.hidden_size == 2048 and source == str(tmp_path / "config.json")
    config, source = model_config(str(tmp_path))
    assert config.num_hidden_layers == 16 and source == str(tmp_path / "config.json")


def test_embedded_alias():
    config, source = model_config("smollm2-135m-instruct")
    assert source.startswith("smollm2-135m-instruct (") and source.endswith("config.json)")
    assert count_parameters(config, MethodSection(name="full")).total == 134_515_008  # SmolLM2-135M, tied


def fake_hub_cache(root: Path, repo: str, config: Path) -> Path:
    """A Hugging Face cache holding one repo's config.json, laid out as huggingface_hub writes it."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / "hub" / f"models--{repo.replace('/', '--')}"
    (repo_dir / "snapshots" / sha).mkdir(parents=True)
    shutil.copy(config, repo_dir / "snapshots" / sha / "config.json")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(sha)
    return repo_dir / "snapshots" / sha / "config.json"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    # huggingface_hub reads the variables once, at import: its module constant is what it uses
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_hub_id_found_in_the_hugging_face_cache(hf_cache):
    from huggingface_hub import try_to_load_from_cache

    cached = fake_hub_cache(hf_cache, "meta-llama/Llama-3.1-8B", CONFIGS / "Llama-3.1-8B.json")
    assert try_to_load_from_cache("meta-llama/Llama-3.1-8B", "config.json") == str(cached)
    config, source = model_config("meta-llama/Llama-3.1-8B")
    assert source == "meta-llama/Llama-3.1-8B (hub config.json)" and config.intermediate_size == 14336
    # a hub alias of the family table resolves to its repo, then through the same cache
    fake_hub_cache(hf_cache, "Qwen/Qwen2.5-0.5B-Instruct", CONFIGS / "Qwen2.5-0.5B.json")
    config, source = model_config("qwen2.5-0.5b-instruct")
    assert source == "Qwen/Qwen2.5-0.5B-Instruct (hub config.json)" and config.hidden_size == 896


def test_hub_id_not_cached_while_offline_says_the_fix(hf_cache):
    with pytest.raises(ModelError, match=r"Llama-3\.1-8B is not in the Hugging Face cache.*HF_HUB_OFFLINE=1.*"
                                         r"model\.name=path/to/config\.json.*unset HF_HUB_OFFLINE"):
        model_config("meta-llama/Llama-3.1-8B")
    with pytest.raises(ModelError, match="no config.json found"):
        model_config(str(hf_cache / "not-a-model"))


# --- ModelShape -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_model_shape_from_each_shipped_config(name):
    cfg, shape = raw(name), ModelShape.from_config(hub_config(name))
    heads = cfg["num_attention_heads"]
    assert (shape.model_type, shape.hidden, shape.layers, shape.heads) == (
        cfg["model_type"], cfg["hidden_size"], cfg["num_hidden_layers"], heads)
    assert shape.kv_heads == cfg.get("num_key_value_heads", heads)
    assert shape.head_dim == cfg.get("head_dim", cfg["hidden_size"] // heads)
    assert (shape.intermediate, shape.vocab, shape.max_positions) == (
        cfg["intermediate_size"], cfg["vocab_size"], cfg["max_position_embeddings"])
    assert shape.tied == (counts(name).head == 0)
    assert shape.q_width == heads * shape.head_dim and shape.kv_width == shape.kv_heads * shape.head_dim


def test_head_dim_comes_from_the_config_when_given():
    shape = ModelShape.from_config(hub_config("gemma-2-2b"))
    assert shape.head_dim == 256 != shape.hidden // shape.heads  # 2304 / 8 = 288
    assert shape.q_width == 2048 and shape.kv_width == 1024 and shape.tied
