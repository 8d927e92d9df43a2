"""GGUF export (export/gguf.py) and the Ollama Modelfile (export/modelfile.py).

Cross-checks: transformers' own GGUF reader (which undoes llama.cpp's Q/K permutation) must load
our file back to the source's logits and tokenizer; a real llama.cpp (llama-cpp-python) must
tokenise and score like the source; the embedded model's original llama.cpp-made GGUF must be
reproduced (vocabulary, special ids, template, tensor names, shapes and values)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import CHATML, build_tokenizer
from tunesmith.errors import ModelError
from tunesmith.data.templates import stop_tokens
from tunesmith.export.gguf import permute_qk, write_gguf
from tunesmith.export.modelfile import detect_family, render_go, write_modelfile

PROBE = "Hello there. What is the capital of France? 0123 {\"a\": 1}"


def _reader(path):
    from gguf import GGUFReader

    return GGUFReader(path)


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


def _types(reader):
    return {t.name: t.tensor_type.name for t in reader.tensors}


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {t: write_gguf(tiny_model_dir, out / f"tiny-{t}.gguf", t) for t in ("f32", "f16", "q8_0", "q4_0")}


def _ids(tok, text=PROBE):
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def test_transformers_reads_our_gguf_back_to_the_same_logits(tiny_model_dir, tiny_tokenizer, exported):
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([_ids(tiny_tokenizer)])
    ref = source(ids).logits
    for outtype, rtol in (("f32", 1e-6), ("f16", 1e-2)):
        path = exported[outtype]
        back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        diff = float((back(ids).logits - ref).abs().max())
        assert diff <= rtol * float(ref.abs().max()), (outtype, diff)


@torch.no_grad()
def test_mistral_exports_as_llama(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False,
                        initializer_range=0.2)
    source = MistralForCausalLM(cfg).eval()
    source.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    # (not "mistral.gguf": transformers takes "mistral" in general.name for an architecture of its own)
    path = write_gguf(tmp_path, tmp_path / "tiny-m.gguf", "f32")
    assert "output.weight" in _types(_reader(path))  # untied: its own output projection
    ids = torch.tensor([_ids(tiny_tokenizer)])
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ref = source(ids).logits
    assert float((back(ids).logits - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_transformers_rebuilds_the_same_tokenizer_from_our_gguf(tiny_tokenizer, exported):
    from transformers import AutoTokenizer

    path = exported["f16"]
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": PROBE}], tokenize=False,
                                              add_generation_prompt=True)
    assert back(text, add_special_tokens=False)["input_ids"] == _ids(tiny_tokenizer, text)
    assert back.chat_template == tiny_tokenizer.chat_template


def test_metadata_carries_tokenizer_template_and_stop_tokens(tiny_tokenizer, exported):
    r = _reader(exported["f16"])
    vocab = tiny_tokenizer.get_vocab()
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == len(vocab) and all(tokens[i] == t for t, i in vocab.items())
    types = _field(r, "tokenizer.ggml.token_type")
    assert [i for i, t in enumerate(types) if t == 3] == [0, 1, 2]  # the three special tokens are CONTROL
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "gpt-2"
    merges = json.loads(tiny_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert _field(r, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert _field(r, "tokenizer.ggml.eos_token_id") == im_end == _field(r, "tokenizer.ggml.eot_token_id")
    assert _field(r, "tokenizer.ggml.bos_token_id") == tiny_tokenizer.bos_token_id
    assert _field(r, "tokenizer.ggml.padding_token_id") == tiny_tokenizer.pad_token_id
    assert _field(r, "tokenizer.ggml.add_bos_token") is False  # the tiny tokenizer adds no BOS
    assert _field(r, "tokenizer.chat_template") == CHATML
    assert _field(r, "general.architecture") == "llama" and _field(r, "llama.block_count") == 2
    assert _field(r, "llama.attention.head_count_kv") == 2 and _field(r, "llama.embedding_length") == 64


def test_tensor_types_follow_llama_cpp_rules(exported):
    for outtype, matrix in (("f32", "F32"), ("f16", "F16"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0")):
        types = _types(_reader(exported[outtype]))
        assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
        assert all(v == "F32" for k, v in types.items() if k.endswith("norm.weight"))
        assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == matrix
    assert _types(_reader(exported["q4_0"]))["token_embd.weight"] == "Q8_0"  # output projection above 4 bits


def test_quantised_values_are_the_permuted_source_within_block_error(tiny_model_dir, exported):
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    src = load_file(tiny_model_dir / "model.safetensors")
    q = permute_qk(src["model.layers.1.self_attn.q_proj.weight"].numpy(), 4)
    k = permute_qk(src["model.layers.1.self_attn.k_proj.weight"].numpy(), 2)
    tensors = {t.name: t for t in _reader(exported["q8_0"]).tensors}
    for name, want in (("blk.1.attn_q.weight", q), ("blk.1.attn_k.weight", k)):
        t = tensors[name]
        got = dequantize(t.data, t.tensor_type).reshape(want.shape)
        # Q8_0: each block of 32 is x ~ d*round(x/d), d = max|x|/127 stored in f16: at most half a
        # step off, plus up to 127 steps times d's f16 rounding (2^-11 relative)
        step = np.abs(want.reshape(-1, 32)).max(1, keepdims=True) / 127
        assert np.all(np.abs(got - want).reshape(-1, 32) <= step * (0.5 + 127 * 2.0 ** -11) + 1e-7), name
    # the permutation is real (q and its permuted copy differ) and is its own kind of shuffle: rows only
    original = src["model.layers.1.self_attn.q_proj.weight"].numpy()
    assert not np.allclose(q, original)
    assert sorted(map(tuple, q.round(6))) == sorted(map(tuple, original.round(6)))


def test_rows_not_in_whole_blocks_stay_f16(tmp_path, tiny_tokenizer, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    types = _types(_reader(write_gguf(tmp_path, tmp_path / "m.gguf", "q8_0")))
    assert types["blk.0.attn_q.weight"] == "F16"      # rows of 48
    assert types["blk.0.ffn_down.weight"] == "Q8_0"   # rows of 96 = 3 blocks
    assert "rows of 48 are not a multiple of 32; kept in F16" in capsys.readouterr().out


def test_refusals_name_the_problem_and_leave_no_file(tiny_model_dir, tmp_path):
    bad = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelError, match="GPT2LMHeadModel cannot be exported"):
        write_gguf(bad, tmp_path / "out.gguf", "f16")
    with pytest.raises(ModelError, match="use one of f32, f16, q8_0, q4_0"):
        write_gguf(tiny_model_dir, tmp_path / "out.gguf", "q5_k")
    scaled = tmp_path / "yarn"
    shutil.copytree(tiny_model_dir, scaled)
    cfg = json.loads((scaled / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (scaled / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="RoPE scaling 'yarn'"):
        write_gguf(scaled, tmp_path / "out.gguf", "f16")
    assert list(tmp_path.glob("*.gguf*")) == []


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(tiny_model_dir, tmp_path):
    from tokenizers import pre_tokenizers

    from tunesmith.models.load import load_tokenizer

    odd = tmp_path / "odd"
    shutil.copytree(tiny_model_dir, odd)
    tok = load_tokenizer(odd)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.save_pretrained(odd)
    with pytest.raises(ModelError, match="pre-tokenizer .* is not one this exporter can name"):
        write_gguf(odd, tmp_path / "odd.gguf", "f16")
    assert not (tmp_path / "odd.gguf").exists()


def test_a_failure_while_writing_tensors_leaves_no_partial_file(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "extra"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    save_file(weights | {"model.layers.0.mystery.weight": torch.zeros(4)}, broken / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelError, match="mystery.weight' has no GGUF counterpart"):
        write_gguf(broken, tmp_path / "out" / "m.gguf", "q8_0")
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------- llama.cpp
def _llama(path, **kw):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not built: pip install llama-cpp-python "
                                                       "(needs a C compiler and cmake)")
    return llama_cpp, llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_threads_batch=1,
                                      logits_all=True, verbose=False, **kw)


@pytest.mark.parametrize("outtype,rtol", [("f32", 5e-3), ("f16", 1e-2)])
def test_llama_cpp_tokenises_and_scores_like_the_source(tiny_model_dir, tiny_tokenizer, exported, outtype, rtol):
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    llama_cpp, llm = _llama(exported[outtype])
    try:
        text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": PROBE}], tokenize=False,
                                                  add_generation_prompt=True)
        ids = _ids(tiny_tokenizer, text)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        ref = source(torch.tensor([ids])).logits[0].detach().numpy()
        # llama.cpp keeps its KV cache in f16, hence a tolerance even for f32 weights
        assert np.abs(np.array(llm.scores[:len(ids)]) - ref).max() <= rtol * np.abs(ref).max()
        vocab = llm._model.vocab
        im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert llm.token_eos() == im_end and llama_cpp.llama_vocab_is_eog(vocab, im_end)
        assert not llama_cpp.llama_vocab_is_eog(vocab, ids[-2])
    finally:
        llm.close()


def test_llama_cpp_greedy_generation_equals_transformers(tiny_model_dir, tiny_tokenizer, exported):
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    _, llm = _llama(exported["f32"])
    try:
        for question in ("What is the capital of France?", "Hello there."):
            text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                      add_generation_prompt=True)
            ids = _ids(tiny_tokenizer, text)
            want = source.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(ids):].tolist()
            got = llm.generate(ids, temp=0.0, top_k=1, reset=True)
            assert [next(got) for _ in range(12)] == want
    finally:
        llm.close()


@pytest.mark.parametrize("outtype,ftype", [("q8_0", 7), ("q4_0", 2)])  # LLAMA_FTYPE_MOSTLY_Q8_0 / _Q4_0
def test_quantised_tensors_are_byte_identical_to_llama_cpp_own_quantiser(exported, tmp_path, outtype, ftype):
    import ctypes

    llama_cpp, llm = _llama(exported["f32"])
    llm.close()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 1
    theirs = tmp_path / "llama-quantize.gguf"
    assert llama_cpp.llama_model_quantize(str(exported["f32"]).encode(), str(theirs).encode(),
                                          ctypes.byref(params)) == 0
    ours = {t.name: t for t in _reader(exported[outtype]).tensors}
    ref = {t.name: t for t in _reader(theirs).tensors}
    assert ours.keys() == ref.keys()
    for name, t in ours.items():
        assert t.tensor_type == ref[name].tensor_type and np.array_equal(t.data, ref[name].data), name


@torch.no_grad()
def test_llama3_rope_scaling_runs_in_llama_cpp_like_transformers(tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # original context 16 << prompt length, so the scaled frequencies really matter here
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, initializer_range=0.2, rope_parameters=rope)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    plain = LlamaForCausalLM(LlamaConfig(**(cfg.to_dict() | {"rope_parameters": {"rope_type": "default",
                                                                                 "rope_theta": 10000.0}}))).eval()
    plain.load_state_dict(model.state_dict())
    path = write_gguf(tmp_path, tmp_path / "l3.gguf", "f32")
    ids = _ids(tiny_tokenizer, PROBE * 3)
    ref, unscaled = model(torch.tensor([ids])).logits[0].numpy(), plain(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ref - unscaled).max() > 0.1 * np.abs(ref).max()  # the scaling changes the logits
    _, llm = _llama(path)
    try:
        llm.eval(ids)
        assert np.abs(np.array(llm.scores[:len(ids)]) - ref).max() <= 5e-3 * np.abs(ref).max()
    finally:
        llm.close()


# ---------------------------------------------------------------- Modelfile
def _go_vs_hf(tok, family, system, conv):
    hf = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    msgs = conv if system is None or conv[0]["role"] == "system" else [{"role": "system", "content": system}] + conv
    return render_go(family.template, msgs, Eos=tok.eos_token), hf


def test_go_subset_renderer_follows_go_trim_and_branch_rules():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    trimmed = "  {{- range .Messages }}[{{ .Role }}]  {{- .Content -}}  ;{{ end }}"
    assert render_go(trimmed, msgs) == "[system]s;[user]u;"
    branchy = ('{{ range .Messages }}{{ if eq .Role "user" }}U{{ else if eq .Role "system" }}S{{ else }}A{{ end }}'
               '{{ end }}')
    assert render_go(branchy, msgs + [{"role": "assistant", "content": "a"}]) == "SUA"


def test_modelfile_template_renders_like_the_training_template(tmp_path, tiny_tokenizer):
    path = write_modelfile(tmp_path / "m.gguf", tiny_tokenizer, tmp_path)
    text = path.read_text()
    assert "FROM ./m.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text and "SYSTEM" not in text
    # the TEMPLATE written is Ollama's documented ChatML format (ollama.com/library/qwen2 family)
    assert ('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
            '<|im_start|>assistant\n"""') in text
    second = write_modelfile(tmp_path / "m-q4_0.gguf", tiny_tokenizer, tmp_path, name="Modelfile.q4_0")
    assert path.read_text() == text and "FROM ./m-q4_0.gguf\n" in second.read_text()  # one per file, none lost
    family, system = detect_family(tiny_tokenizer)
    conv = [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"},
            {"role": "user", "content": "d"}]
    go, hf = _go_vs_hf(tiny_tokenizer, family, system, conv)
    assert go == hf


def test_default_system_prompt_becomes_SYSTEM(tmp_path):
    smol_like = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are Tiny.<|im_end|>\n' }}{% endif %}"
                 + CHATML[len("{% for message in messages %}"):])
    tok = build_tokenizer(smol_like)
    text = write_modelfile(tmp_path / "m.gguf", tok, tmp_path).read_text()
    assert 'SYSTEM """You are Tiny."""' in text
    family, system = detect_family(tok)
    user = {"role": "user", "content": "q"}
    for conv in ([user], [{"role": "system", "content": "own"}, user]):
        go, hf = _go_vs_hf(tok, family, system, conv)
        assert go == hf


def test_alpaca_family_and_unknown_templates(tmp_path):
    from tunesmith.data.templates import ALPACA

    tok = build_tokenizer(ALPACA)
    assert detect_family(tok)[0].name == "alpaca"
    text = write_modelfile(tmp_path / "m.gguf", tok, tmp_path).read_text()
    assert "{{ .Content }}<|im_end|>\n\n{{ end }}" in text and 'PARAMETER stop "### Instruction:"' in text
    odd = build_tokenizer("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    with pytest.raises(ModelError, match="matches none of the Ollama templates"):
        write_modelfile(tmp_path / "m.gguf", odd, tmp_path / "x")
    # the alpaca template ends a turn with the tokenizer's EOS; one that writes no token there gets EOS too
    assert stop_tokens(tok).end_of_turn == "<|im_end|>" == stop_tokens(odd).end_of_turn == tok.eos_token


def _llama3_tokenizer(adds_bos: bool):
    from tokenizers import processors

    from tunesmith.data.templates import LLAMA3

    tok = build_tokenizer(LLAMA3)
    tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>"]})
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    if adds_bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.bos_token_id)])
    return tok


@pytest.mark.parametrize("adds_bos", [True, False])
def test_llama3_template_leaves_bos_to_llama_cpp_only_when_the_tokenizer_adds_it(adds_bos):
    tok = _llama3_tokenizer(adds_bos)
    family, system = detect_family(tok)
    assert family.name == "llama-3" and system is None
    # BOS comes from llama.cpp (add_bos_token) or from the TEMPLATE text, never both, never neither
    assert family.template.startswith("<|begin_of_text|>") is not adds_bos
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "r"}]
    go, hf = _go_vs_hf(tok, family, system, conv)
    assert (tok.bos_token if adds_bos else "") + go == hf
    assert stop_tokens(tok).end_of_turn == "<|eot_id|>"


# ---------------------------------------------------------------- the embedded model's original GGUF
@pytest.mark.slow
def test_export_of_embedded_model_reproduces_its_original_gguf(embedded_model, tmp_path):
    from gguf.quants import dequantize

    from tunesmith.models.registry import ALIASES

    original = _reader(ALIASES["smollm2-135m-instruct"].locate())
    ours = _reader(write_gguf(embedded_model.path, tmp_path / "smol-f16.gguf", "f16"))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.model",
                "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template", "llama.context_length", "llama.embedding_length", "llama.block_count",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
                "llama.rope.dimension_count"):
        assert _field(ours, key) == _field(original, key), key
    theirs = {t.name: t for t in original.tensors}
    mine = {t.name: t for t in ours.tensors}
    assert mine.keys() == theirs.keys() and len(mine) == 272
    for name, t in mine.items():
        o = theirs[name]
        assert list(t.shape) == list(o.shape), name
        if name.startswith("blk.") and name.split(".")[1] not in ("0", "1", "29"):
            continue  # values: the embeddings, the final norm and three whole blocks (dequantising is slow)
        want = dequantize(o.data, o.tensor_type).reshape(-1)
        got = dequantize(t.data, t.tensor_type).reshape(-1)
        # f16 output: exact up to f16 rounding (half a unit in the 11th bit; absolute near zero)
        assert np.all(np.abs(got - want) <= np.abs(want) * 2.0 ** -11 + 3e-8), name

    # serving end to end: llama-cpp-python renders the chat with the template from the file, generates
    # greedily and stops at <|im_end|> by itself, saying what transformers says with the HF directory
    from tunesmith.generation import generate, load_for_inference

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    want = generate(load_for_inference(embedded_model.path), [chat], max_new_tokens=48)[0]
    _, llm = _llama(tmp_path / "smol-f16.gguf")
    try:
        reply = llm.create_chat_completion(messages=chat, temperature=0.0, top_k=1, max_tokens=48)["choices"][0]
    finally:
        llm.close()
    assert reply["finish_reason"] == "stop" and reply["message"]["content"].strip() == want
