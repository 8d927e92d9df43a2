"""The Ollama Modelfile per model family (export/modelfile.py): for each family's real chat template
(tests/families.py), the TEMPLATE written, rendered as Ollama renders it (with its SYSTEM and the
BOS llama.cpp adds), equals the prompt tunesmith renders with the Jinja template and
add_generation_prompt, on chats with and without a system message and with several turns; the
PARAMETER stop lines start with the family's end of turn and EOS. Fixed strings pin each family's
format, so a wrong Jinja rendering cannot make both sides agree on the wrong thing."""
from __future__ import annotations

import re

import pytest

from families import NAMES, family_tokenizer
from tunesmith.data.templates import stop_tokens
from tunesmith.data.tokenize import render
from tunesmith.export.gguf_vocab import adds_bos
from tunesmith.export.modelfile import detect_family, modelfile_text, render_go

USER = {"role": "user", "content": "Deliver to Lyon:\n3 {{ scarves }}, \"pink\""}
CHATS = [
    [USER],
    [{"role": "system", "content": "Reply in JSON."}, USER],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}, USER],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     USER],
]
FORMAT = {"llama": "llama-3", "qwen2": "chatml", "qwen3": "chatml", "mistral": "mistral", "gemma2": "gemma",
          "gemma3": "gemma", "phi3": "phi-3"}
# the system+user chat as each family's prompt, written out by hand from the hub templates
PINNED = {
    "llama": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n\nu<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n",
    "qwen3": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n",
    "mistral": "<s>[INST] S\n\nu [/INST]",
    "gemma2": "<s><start_of_turn>user\nS\n\nu<end_of_turn>\n<start_of_turn>model\n",
    "gemma3": "<s><start_of_turn>user\nS\n\nu<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|system|>\nS<|end|>\n<|user|>\nu<|end|>\n<|assistant|>\n",
}
MARKERS = {"<|start_header_id|>", "<|im_start|>", "[INST]", "<start_of_turn>", "<|user|>", "<|assistant|>"}


def tunesmith_prompt(tok, chat: list[dict]) -> str:
    """What training and serving render (a system message that the template refuses goes before
    the first user message, with a blank line: data/tokenize.render)."""
    return render(tok, chat, add_generation_prompt=True)


def parse_modelfile(text: str) -> dict:
    block = lambda key: (m.group(1) if (m := re.search(rf'^{key} """(.*?)"""$', text, re.S | re.M)) else None)  # noqa: E731
    return {"template": block("TEMPLATE"), "system": block("SYSTEM"),
            "stops": re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)}


def ollama_prompt(tok, modelfile: dict, chat: list[dict]) -> str:
    """Ollama's prompt: SYSTEM as a first message when the chat has none, the TEMPLATE rendered,
    after the BOS llama.cpp adds when the GGUF says add_bos_token (the tokenizer adds it)."""
    if modelfile["system"] is not None and chat[0]["role"] != "system":
        chat = [{"role": "system", "content": modelfile["system"]}] + chat
    return (tok.bos_token if adds_bos(tok) else "") + render_go(modelfile["template"], chat)


@pytest.fixture(scope="module")
def tokenizers():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = family_tokenizer(name)
        return cache[name]
    return get


@pytest.mark.parametrize("family", NAMES)
def test_modelfile_template_renders_the_family_prompt(family, tokenizers, tmp_path):
    tok = tokenizers(family)
    pinned = [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]
    assert tunesmith_prompt(tok, pinned) == PINNED[family]
    modelfile = parse_modelfile(modelfile_text(tmp_path / "m.gguf", tok, tmp_path))
    assert detect_family(tok)[0].name == FORMAT[family]
    for chat in CHATS + [pinned]:
        assert ollama_prompt(tok, modelfile, chat) == tunesmith_prompt(tok, chat), (family, chat)
    # Qwen 2.5's template injects its default system prompt; Ollama gets it as SYSTEM
    assert (modelfile["system"] is not None) == (family == "qwen2")
    stops = stop_tokens(tok)
    assert modelfile["stops"][:len(stops.texts)] == stops.texts  # the end of turn first, then EOS
    assert set(modelfile["stops"][len(stops.texts):]) <= MARKERS
    assert stops.end_of_turn == {"llama": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>", "mistral": "</s>",
                                 "gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>", "phi3": "<|end|>"}[family]


def test_a_template_without_bos_makes_a_gguf_without_add_bos(tmp_path, tokenizers):
    """Phi-3.5's template writes no BOS while its tokenizer adds one to plain text: tunesmith trains
    on the rendered chat (no BOS), so the GGUF says add_bos_token false and Ollama's prompt (no BOS
    added) equals the training prompt; a template that writes BOS keeps add_bos_token."""
    phi3, llama = tokenizers("phi3"), tokenizers("llama")
    assert phi3("a")["input_ids"][0] == phi3.bos_token_id and not adds_bos(phi3)
    assert adds_bos(llama) and not adds_bos(tokenizers("qwen2"))
    chat = [{"role": "user", "content": "u"}]
    modelfile = parse_modelfile(modelfile_text(tmp_path / "m.gguf", phi3, tmp_path))
    assert ollama_prompt(phi3, modelfile, chat) == tunesmith_prompt(phi3, chat) == "<|user|>\nu<|end|>\n<|assistant|>\n"


def test_go_variables_hold_the_system_text_for_the_first_user_turn():
    template = ('{{- $s := "" }}{{- range .Messages }}{{ if eq .Role "system" }}{{ $s = .Content }}'
                '{{ else }}[{{ if $s }}{{ $s }}|{{ $s = "" }}{{ end }}{{ .Content }}]{{ end }}{{ end }}')
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert render_go(template, chat) == "[S|a][b][c]"
    assert render_go(template, chat[1:]) == "[a][b][c]"
    with pytest.raises(KeyError):  # a variable used before `:=` (Go refuses such a template)
        render_go("{{ range .Messages }}{{ $x }}{{ end }}", chat)
