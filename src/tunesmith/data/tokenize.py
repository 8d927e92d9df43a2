"""Chat rendering and tokenisation with an exact loss mask.

The conversation is rendered once with the tokenizer's chat template (the same one saved in the
run directory and used by generate/eval/serve). The rendered text is cut into segments: template
text and user turns (not trained), each assistant content and the end-of-turn token that follows
it (trained; data/templates.stop_tokens says which token that is). Each segment is tokenised on
its own, so the trained span is, by construction, exactly the assistant content followed by one
end-of-turn token: no offset arithmetic that a tokenizer merge across a boundary could silently
shift.
"""
from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.records import Example
from tunesmith.errors import DataError

IGNORE = -100  # label value that CrossEntropy skips
TRAIN_ON = ("all_assistant", "last_assistant", "all")


def ensure_chat_template(tokenizer) -> None:
    from tunesmith.data.templates import apply_template

    apply_template(tokenizer, None)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _segments(tokenizer, messages: list[dict], where: str, train_on: str = "all_assistant") -> list[tuple[str, bool]]:
    from tunesmith.data.templates import stop_tokens

    full = render(tokenizer, messages)
    eot = stop_tokens(tokenizer).end_of_turn
    segments: list[tuple[str, bool]] = []
    cursor = 0
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        trained = train_on != "last_assistant" or i == last
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        if not full.startswith(prefix):
            raise DataError(f"{where}: the chat template renders turn {i} differently in context; "
                            "it cannot be trained turn by turn")
        start = full.find(msg["content"], max(len(prefix), cursor))
        if start < 0:
            raise DataError(f"{where}: the chat template changes assistant message {i}'s text "
                            "(trimming or rewriting it); the trained text would not match the data")
        end = start + len(msg["content"])
        segments += [(full[cursor:start], False), (msg["content"], trained)]
        # The end-of-turn token after each assistant turn is trained so the model learns to stop
        # on what every consumer stops on; a turn the template does not end with it gets it added.
        rest = full[end:]
        gap = rest[:len(rest) - len(rest.lstrip(" "))]  # spaces some templates put before the token
        if full.startswith(eot, end + len(gap)):
            segments.append((gap, trained))
            end += len(gap) + len(eot)
        segments.append((eot, trained))
        cursor = end
    segments.append((full[cursor:], False))
    if train_on == "all":  # prompts too: every token is a target
        return [(text, True) for text, _ in segments if text]
    return [(text, trained) for text, trained in segments if text]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    full_length: int = 0  # tokens before truncation

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)


def encode_conversation(tokenizer, messages: list[dict], max_length: int, where: str = "<record>",
                        train_on: str = "all_assistant") -> Encoded:
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in _segments(tokenizer, messages, where, train_on):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    # Keep the start (system + prompt) and cut the end: a truncated answer still teaches its start.
    return Encoded(ids[:max_length], labels[:max_length], len(ids))


def encode_text(tokenizer, text: str, max_length: int) -> Encoded:
    """Continued pre-training: every token is a target, and the document ends with the tokenizer's EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Encoded(ids[:max_length], ids[:max_length], len(ids))


def encode_example(tokenizer, ex: Example, max_length: int, train_on: str = "all_assistant") -> Encoded:
    if ex.kind == "text":
        return encode_text(tokenizer, ex.text, max_length)
    if ex.kind == "chat":
        return encode_conversation(tokenizer, ex.messages, max_length, ex.location, train_on)
    raise DataError(f"{ex.location}: a preference row cannot be used for supervised fine-tuning; "
                    "train it with a preference objective (DPO) or drop it")


@dataclass
class EncodedPair:
    prompt_length: int  # shared by both: chosen.input_ids[:n] == rejected.input_ids[:n]
    chosen: Encoded
    rejected: Encoded


def encode_preference(tokenizer, ex: Example, max_length: int) -> EncodedPair:
    """Prompt + chosen and prompt + rejected, whose prompt tokens are identical by construction
    (both are cut at the same rendered generation prompt) and never trained."""
    n = len(prompt_ids(tokenizer, ex.prompt))
    pair = [encode_conversation(tokenizer, ex.prompt + side, max_length, ex.location) for side in (ex.chosen, ex.rejected)]
    for enc in pair:
        enc.labels[:n] = [IGNORE] * min(n, len(enc.labels))
    if pair[0].input_ids[:n] != pair[1].input_ids[:n]:
        raise DataError(f"{ex.location}: the chat template renders the prompt differently for chosen and rejected")
    return EncodedPair(n, *pair)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation ready for the assistant's next turn (generation)."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def encode_dataset(tokenizer, examples: list[Example], max_length: int, source: str = "data",
                   train_on: str = "all_assistant"):
    """Encode all rows; rows left with nothing to train (truncated away) are dropped and counted.
    A dataset where most rows would be dropped stops instead of training on almost nothing."""
    encoded, empty = [], 0
    for ex in examples:
        enc = encode_example(tokenizer, ex, max_length, train_on)
        if enc.trained_tokens == 0:
            empty += 1
            continue
        encoded.append(enc)
    if not encoded or empty > len(examples) // 2:
        raise DataError(f"{source}: {empty} of {len(examples)} rows have no trained tokens left after "
                        f"truncation to data.max_length={max_length}; raise data.max_length")
    if empty:
        print(f"warning: {source}: dropped {empty} rows whose answer was truncated away "
              f"(data.max_length={max_length})", flush=True)
    return encoded
