"""Chat rendering and tokenisation with an exact loss mask.

The conversation is rendered once with the tokenizer's chat template (the same one saved in the
run directory and used by generate/eval/serve). The rendered text is cut into segments: template
text and user turns (not trained), each assistant content and the EOS that follows it (trained).
Each segment is tokenised on its own, so the trained span is, by construction, exactly the
assistant content followed by one EOS token: no offset arithmetic that a tokenizer merge across a
boundary could silently shift.
"""
from __future__ import annotations

from dataclasses import dataclass

from tunesmith.errors import DataError

IGNORE = -100  # label value that CrossEntropy skips

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _segments(tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    full = render(tokenizer, messages)
    eos = tokenizer.eos_token
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        if not full.startswith(prefix):
            raise DataError(f"{where}: the chat template renders turn {i} differently in context; "
                            "it cannot be trained turn by turn")
        start = full.find(msg["content"], max(len(prefix), cursor))
        if start < 0:
            raise DataError(f"{where}: the chat template changes assistant message {i}'s text "
                            "(trimming or rewriting it); the trained text would not match the data")
        end = start + len(msg["content"])
        segments += [(full[cursor:start], False), (msg["content"], True)]
        # The EOS after each assistant turn is trained so the model learns to stop; templates
        # that do not emit one get it added.
        segments.append((eos, True))
        cursor = end + len(eos) if full.startswith(eos, end) else end
    segments.append((full[cursor:], False))
    return [(text, trained) for text, trained in segments if text]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def encode_conversation(tokenizer, messages: list[dict], max_length: int, where: str = "<record>") -> Encoded:
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in _segments(tokenizer, messages, where):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    # Keep the start (system + prompt) and cut the end: a truncated answer still teaches its start.
    return Encoded(ids[:max_length], labels[:max_length])


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation ready for the assistant's next turn (generation)."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def encode_dataset(tokenizer, conversations: list[list[dict]], max_length: int, source: str = "data"):
    """Encode all rows; rows left with nothing to train (truncated away) are dropped and counted."""
    encoded, empty = [], 0
    for n, msgs in enumerate(conversations):
        enc = encode_conversation(tokenizer, msgs, max_length, where=f"{source} record {n + 1}")
        if enc.trained_tokens == 0:
            empty += 1
            continue
        encoded.append(enc)
    if not encoded or empty > len(conversations) // 2:
        raise DataError(f"{source}: {empty} of {len(conversations)} rows have no trained tokens left after "
                        f"truncation to data.max_length={max_length}; raise data.max_length")
    if empty:
        print(f"warning: {source}: dropped {empty} rows whose answer was truncated away "
              f"(data.max_length={max_length})", flush=True)
    return encoded
