"""One rule for what a model stops on (data/templates.stop_tokens), with tokenizers whose EOS is not
the template's end of turn: ChatML with eos=<|endoftext|> (as Qwen2.5 base) and a Gemma-style
<start_of_turn>/<end_of_turn> template with eos=<eos>. Training ends each assistant turn with the
end of turn, and the merged export, the GGUF, the Modelfile, generate and the server stop on it."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import CHATML, build_tokenizer, tiny_llama, train_tiny_run
from tunesmith.data.templates import ALPACA, stop_ids, stop_tokens
from tunesmith.data.tokenize import IGNORE, encode_conversation, encode_text, prompt_ids, render

GEMMA = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' "
         "else m['role']) + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Order 2 mugs for Oslo."},
        {"role": "assistant", "content": '{"city": "Oslo", "quantity": 2}'},
        {"role": "user", "content": "And the name?"}, {"role": "assistant", "content": " Maria\n"}]
STYLES = {"chatml": ("<|im_end|>", "<|endoftext|>"), "gemma": ("<end_of_turn>", "<eos>")}


def styled_tokenizer(style: str):
    """The tiny tokenizer with a template whose end of turn differs from the tokenizer's EOS."""
    if style == "chatml":
        tok = build_tokenizer(CHATML)
        tok.eos_token = "<|endoftext|>"
    else:
        tok = build_tokenizer(GEMMA)
        tok.add_special_tokens({"additional_special_tokens": ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]})
        tok.bos_token, tok.eos_token = "<bos>", "<eos>"
    return tok


def trained_runs(enc) -> list[list[int]]:
    runs, cur = [], []
    for tid, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE:
            cur.append(tid)
        elif cur:
            runs, cur = runs + [cur], []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("style", STYLES)
def test_rule_reads_the_end_of_turn_off_the_template(style):
    tok = styled_tokenizer(style)
    eot, eos = STYLES[style]
    stops = stop_tokens(tok)
    assert (stops.end_of_turn, stops.eos) == (eot, eos)
    assert stops.ids == [tok.convert_tokens_to_ids(eot), tok.convert_tokens_to_ids(eos)]
    assert tok.eos_token == eos  # the tokenizer itself is left as it was


def test_rule_falls_back_to_eos_and_dedups():
    same = build_tokenizer(CHATML)  # eos is <|im_end|>: one stop id
    assert stop_tokens(same).ids == [same.eos_token_id]
    alpaca = build_tokenizer(ALPACA)  # ends a turn with eos_token itself
    assert stop_tokens(alpaca).end_of_turn == alpaca.eos_token
    plain = build_tokenizer("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    assert stop_tokens(plain).end_of_turn == plain.eos_token  # no token after a turn: EOS is appended
    # a base model's own EOS ids come after the rule's, once
    gen = type("G", (), {"eos_token_id": [plain.eos_token_id, 7]})()
    assert stop_ids(plain, gen) == [plain.eos_token_id, 7]


@pytest.mark.parametrize("style", STYLES)
def test_training_ends_each_assistant_turn_with_the_end_of_turn(style):
    tok = styled_tokenizer(style)
    eot_id, eos_id = (tok.convert_tokens_to_ids(t) for t in STYLES[style])
    enc = encode_conversation(tok, CONV, max_length=1024)
    runs = trained_runs(enc)
    answers = [m["content"] for m in CONV if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert run[-1] == eot_id and run[:-1] == tok(answer, add_special_tokens=False)["input_ids"]
    assert eos_id not in enc.input_ids  # no EOS trained where the template has none
    # the sequence is exactly the template's rendering: inference sees what training saw
    assert enc.input_ids == tok(render(tok, CONV), add_special_tokens=False)["input_ids"]
    # raw text still ends with the tokenizer's EOS
    assert encode_text(tok, "Paris.", 64).input_ids[-1] == eos_id


def test_spaces_before_the_end_of_turn_are_trained_once():
    spaced = CHATML.replace("message['content'] + '<|im_end|>'", "message['content'] + ' <|im_end|>'")
    tok = build_tokenizer(spaced)
    enc = encode_conversation(tok, CONV[1:3], max_length=1024)
    assert enc.input_ids == tok(render(tok, CONV[1:3]), add_special_tokens=False)["input_ids"]
    (run,) = trained_runs(enc)
    assert tok.decode(run) == CONV[2]["content"] + " <|im_end|>"


# ---------------------------------------------------------------- a model that ends its reply
def ends_after(model, token_id: int, n: int):
    """Make the model choose `token_id` as its (n+1)-th generated token: from the n-th forward pass
    after the prefill on, that token's logit is raised far above the rest."""
    calls = []

    def hook(module, args, out):
        calls.append(1)
        if len(calls) == n + 1:
            out = out.clone()
            out[..., token_id] += 1e4
        return out
    model.lm_head.register_forward_hook(hook)
    return calls


def base_model(tok):
    """A tiny model whose own config stops only on the tokenizer's EOS (as a base model's does)."""
    model = tiny_llama(len(tok)).eval()
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    return model


@pytest.mark.parametrize("style", STYLES)
def test_generate_and_server_stop_on_the_end_of_turn(style):
    from tunesmith.generation import InferenceModel, generate
    from tunesmith.serve.engine import Engine, GenRequest

    tok = styled_tokenizer(style)
    eot_id = tok.convert_tokens_to_ids(STYLES[style][0])
    conv = CONV[:2]
    free = generate(InferenceModel(base_model(tok), tok, "t"), [conv], max_new_tokens=12)[0]
    model = base_model(tok)
    calls = ends_after(model, eot_id, 3)
    ids = prompt_ids(tok, conv)
    with torch.no_grad():
        first = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=3, do_sample=False, eos_token_id=None,
                               pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    assert eot_id not in first
    calls.clear()
    reply = generate(InferenceModel(model, tok, "t"), [conv], max_new_tokens=12)[0]
    assert reply == tok.decode(first, skip_special_tokens=True).strip() and len(reply) < len(free)
    calls.clear()
    with Engine(model, tok, "t") as eng:
        res = eng.submit(GenRequest(ids, "t", max_tokens=12)).result()
    assert res.token_ids == first + [eot_id] and res.finish_reason == "stop"


# ---------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def styled_runs(tmp_path_factory):
    runs = {}
    for style in STYLES:
        tmp = tmp_path_factory.mktemp(f"stop-{style}")
        tok = styled_tokenizer(style)
        base_model(tok).save_pretrained(tmp / "base")
        tok.save_pretrained(tmp / "base")
        runs[style] = train_tiny_run(tmp / "base", tmp, style)
    return runs


def _gguf_field(path, key):
    from gguf import GGUFReader

    return GGUFReader(path).fields[key].contents()


@pytest.mark.parametrize("style", STYLES)
def test_exports_stop_on_the_end_of_turn(styled_runs, tmp_path, style):
    from tunesmith.export import export_run
    from tunesmith.export.gguf import write_gguf
    from tunesmith.models.load import load_tokenizer

    run = styled_runs[style]
    tok = load_tokenizer(run / "tokenizer")
    eot_id, eos_id = (tok.convert_tokens_to_ids(t) for t in STYLES[style])
    assert tok.eos_token_id == eos_id  # the run's tokenizer keeps its EOS; the template says the rest
    merged = export_run(run, "merged", tmp_path / "merged")
    gen = json.loads((merged / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [eot_id, eos_id]
    assert json.loads((merged / "config.json").read_text())["eos_token_id"] == [eot_id, eos_id]
    gguf = write_gguf(merged, tmp_path / "m.gguf", "f32")
    assert _gguf_field(gguf, "tokenizer.ggml.eos_token_id") == eot_id == _gguf_field(gguf, "tokenizer.ggml.eot_token_id")


def test_gguf_export_modelfile_stops_on_the_end_of_turn_then_eos(styled_runs, tmp_path):
    from tunesmith.export import export_run

    out = export_run(styled_runs["chatml"], "gguf", tmp_path / "g", quant=["f16"])
    stops = [line for line in (out / "Modelfile").read_text().splitlines() if line.startswith("PARAMETER stop")]
    assert stops[:2] == ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"']
    (path,) = out.glob("*.gguf")
    im_end = styled_tokenizer("chatml").convert_tokens_to_ids("<|im_end|>")
    assert _gguf_field(path, "tokenizer.ggml.eos_token_id") == im_end


@pytest.mark.parametrize("style", STYLES)
def test_llama_cpp_stops_on_the_end_of_turn(styled_runs, tmp_path, style):
    """llama.cpp itself reads the exported file's EOS as the end of turn and counts it as an
    end-of-generation token."""
    from tunesmith.export import export_run
    from tunesmith.export.gguf import write_gguf

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not built (the test extras build it)")
    merged = export_run(styled_runs[style], "merged", tmp_path / "merged")
    path = write_gguf(merged, tmp_path / "m.gguf", "f32")
    eot_id = styled_tokenizer(style).convert_tokens_to_ids(STYLES[style][0])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, n_threads_batch=1, verbose=False)
    try:
        assert llm.token_eos() == eot_id and llama_cpp.llama_vocab_is_eog(llm._model.vocab, eot_id)
    finally:
        llm.close()
