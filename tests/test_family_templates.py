"""The chat-template contract on every family's real tokenizer and template (tests/families.py).

For multi-turn, system-prompt and no-system-prompt chats: the training ids are the tokenizer's
own ids for the rendered chat, the trained tokens decode to exactly each assistant answer plus the
family's end-of-turn token, the generation prompt is the template's own, and the stop token is
the one each family's model card names. Templates without a system role get the system text
merged into the first user message, by Gemma 3's own rule.
"""
import pytest

from conftest import trained_runs
from families import NAMES, family_tokenizer
from tunesmith.data.records import Example
from tunesmith.data.templates import stop_tokens, system_support
from tunesmith.data.tokenize import IGNORE, encode_conversation, encode_preference, prompt_ids, render
from tunesmith.errors import DataError
from tunesmith.models.families import FAMILIES

# What each family's model card / tokenizer_config says ends an assistant turn.
END_OF_TURN = {"llama": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>", "mistral": "</s>",
               "gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>", "phi3": "<|end|>"}

SYSTEM = "You answer in one short sentence."
CHATS = {
    "multi_turn": [
        {"role": "user", "content": "Hi there, how are you?"},
        {"role": "assistant", "content": "Fine, thanks. And you?"},
        {"role": "user", "content": "Good.\nTell me the weather in Zürich."},
        {"role": "assistant", "content": "Café weather: 3°C,  light rain.\nTake a coat!"},
    ],
    "system": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."},
    ],
    "no_system": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4"},
    ],
}


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    return request.param, family_tokenizer(request.param)


def trained_texts(tok, enc) -> list[str]:
    """The trained tokens, decoded run by run (a run: consecutive trained positions)."""
    return [tok.decode(r) for r in trained_runs(enc)]


@pytest.mark.parametrize("chat", CHATS)
def test_training_ids_are_the_tokenizers_own_and_the_mask_is_each_answer(family, chat):
    name, tok = family
    messages = CHATS[chat]
    enc = encode_conversation(tok, messages, 4096)
    assert enc.input_ids == tok(render(tok, messages), add_special_tokens=False)["input_ids"]
    eot = END_OF_TURN[name]
    answers = [m["content"] + eot for m in messages if m["role"] == "assistant"]
    assert trained_texts(tok, enc) == answers
    # what serving feeds the model before each answer is exactly what training put there
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = prompt_ids(tok, messages[:i])
            assert enc.input_ids[:len(prompt)] == prompt
            n = len(prompt) + (name == "qwen3" and i == len(messages) - 1) * len(tok("<think>\n\n</think>\n\n")["input_ids"])
            assert enc.labels[n - 1] == IGNORE and enc.labels[n] == enc.input_ids[n]  # the answer starts right there


def test_generation_prompt_and_stop_token_are_the_familys(family):
    name, tok = family
    messages = CHATS["multi_turn"][:3]
    reference = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert prompt_ids(tok, messages) == list(reference)
    stops = stop_tokens(tok)
    assert stops.end_of_turn == END_OF_TURN[name]
    assert stops.ids[0] == tok.convert_tokens_to_ids(END_OF_TURN[name])
    assert stops.eos_id == tok.eos_token_id in stops.ids


def test_system_message_is_kept_or_merged_by_gemma3s_rule(family, capsys):
    """Family.system_role says what the hub template does; tunesmith keeps the system text either way."""
    name, tok = family
    messages = CHATS["system"]
    role = FAMILIES[name].system_role
    support = system_support(tok)
    assert support == {"native": "kept", "merged": "kept", "none": "raises"}[role]
    text = render(tok, messages)
    assert SYSTEM in text
    merged = [{"role": "user", "content": f"{SYSTEM}\n\n{messages[1]['content']}"}, *messages[2:]]
    if role == "native":
        assert text == tok.apply_chat_template(messages, tokenize=False)
        assert text != tok.apply_chat_template(merged, tokenize=False)
    else:  # tunesmith's merge (none) and the template's own (gemma3) give the same text
        assert text == tok.apply_chat_template(merged, tokenize=False)
    if role == "none":
        with pytest.raises(Exception):
            tok.apply_chat_template(messages, tokenize=False)
    render(tok, messages)
    notes = capsys.readouterr().out.count("merges each system message into the first user message")
    assert notes <= 1 and (notes == 0 or role == "none")


def test_a_template_that_drops_the_system_message_gets_it_merged(capsys):
    """Phi-3-mini-4k-instruct's first template rendered a system message as nothing at all."""
    tok = family_tokenizer("phi3")
    tok.chat_template = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                         "{{ '<|user|>\n' + message['content'] + '<|end|>\n<|assistant|>\n' }}"
                         "{% elif message['role'] == 'assistant' %}{{ message['content'] + '<|end|>\n' }}"
                         "{% endif %}{% endfor %}")
    messages = CHATS["system"]
    assert SYSTEM not in tok.apply_chat_template(messages, tokenize=False)
    assert system_support(tok) == "drops"
    enc = encode_conversation(tok, messages, 4096)
    assert f"{SYSTEM}\n\nName a colour." in render(tok, messages)
    assert "silently drops system messages" in capsys.readouterr().out
    assert trained_texts(tok, enc) == ["Blue.<|end|>", "Green.<|end|>"]
    with pytest.raises(DataError, match="row 9: the chat template has no system role.*not followed by a user message"):
        encode_conversation(tok, [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}], 64,
                            where="row 9")


def test_qwen3_think_block_is_template_text_not_trained():
    tok = family_tokenizer("qwen3")
    messages = CHATS["multi_turn"]
    text = render(tok, messages)
    think = "<think>\n\n</think>\n\n"
    assert text.count(think) == 1 and text.index(think) < text.index(messages[-1]["content"])  # last turn only
    enc = encode_conversation(tok, messages, 4096)
    untrained = tok.decode([i for i, lb in zip(enc.input_ids, enc.labels) if lb == IGNORE])
    assert think.strip() in untrained
    assert not any("think" in run for run in trained_texts(tok, enc))


def test_preference_prompt_is_the_generation_prompt(family):
    name, tok = family
    prompt = CHATS["system"][:4]
    ex = Example(kind="preference", prompt=prompt, chosen=[{"role": "assistant", "content": "Red."}],
                 rejected=[{"role": "assistant", "content": "I cannot say."}], location="row 1", format="preference")
    pair = encode_preference(tok, ex, 4096)
    assert pair.chosen.input_ids[:pair.prompt_length] == prompt_ids(tok, prompt)
    assert trained_texts(tok, pair.chosen) == ["Red." + END_OF_TURN[name]]
    assert trained_texts(tok, pair.rejected) == ["I cannot say." + END_OF_TURN[name]]


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_templates_that_trim_the_answer_are_refused(name):
    tok = family_tokenizer(name)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello.\n"}]
    with pytest.raises(DataError, match="changes assistant message 1's text"):
        encode_conversation(tok, messages, 4096, where="row 3")
