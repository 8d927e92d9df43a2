"""Chat rendering and tokenisation with an exact loss mask.

The conversation is rendered once with the tokenizer's chat template (the same one saved in the
run directory and used by generate/eval/serve). The rendered text is cut into segments: template
text and user turns (not trained), each assistant content and the end-of-turn token that follows
it (trained; data/templates.stop_tokens says which token that is). The whole text is then
tokenised in one call, so the ids are exactly the tokenizer's own ids for the rendered chat (what
generation and the server see): tokenising segments one by one differs for SentencePiece
vocabularies (Mistral, Gemma, Phi-3), whose Metaspace step prepends '▁' to every piece. Each token
is trained when its characters (the tokenizer's offsets) touch a trained segment.
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
    """The chat as the template writes it. The one place that decides what happens to a system
    message the template cannot take (data/templates.system_support: it raises or drops it):
    its text is merged into the first user message, joined by a blank line, which is Gemma 3's
    own rule (its template does exactly this), said once per template."""
    if messages and messages[0]["role"] == "system":
        from tunesmith.data.templates import system_support

        support = system_support(tokenizer)
        if support != "kept":
            _note_merge(tokenizer, support)
            messages = _merge_system(messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


_NOTED: set[str] = set()


def _note_merge(tokenizer, support: str) -> None:
    template = str(getattr(tokenizer, "chat_template", ""))
    if template in _NOTED:
        return
    _NOTED.add(template)
    name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
    verb = "refuses" if support == "raises" else "silently drops"
    print(f"note: the chat template of {name} {verb} system messages; tunesmith merges each system message into "
          "the first user message, separated by a blank line (as Gemma 3's template does)", flush=True)


def _merge_system(messages: list[dict]) -> list[dict]:
    system, rest = messages[0], messages[1:]
    if not system["content"]:
        return rest  # nothing to keep
    if not rest or rest[0]["role"] != "user":
        raise DataError("the chat template has no system role, and this system message is not followed by a user "
                        "message to merge it into; start the conversation with system then user")
    return [{**rest[0], "content": f"{system['content']}\n\n{rest[0]['content']}"}, *rest[1:]]


def _segments(tokenizer, messages: list[dict], where: str, train_on: str = "all_assistant") -> list[tuple[str, bool]]:
    from tunesmith.data.templates import stop_tokens

    try:
        full = render(tokenizer, messages)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
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
        # Template text between the generation prompt and the content stays untrained: Qwen3's
        # template writes an empty "<think>\n\n</think>\n\n" there for the last assistant turn
        # (after the last user message), which serving adds at the same place, never the model.
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
    segments = _segments(tokenizer, messages, where, train_on)
    if getattr(tokenizer, "is_fast", False):
        ids, labels = _masked_ids(tokenizer, segments)
    else:  # a Python tokenizer has no offsets: segment by segment (ids may differ at boundaries)
        ids, labels = [], []
        for text, trained in segments:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
    # Keep the start (system + prompt) and cut the end: a truncated answer still teaches its start.
    return Encoded(ids[:max_length], labels[:max_length], len(ids))


def _masked_ids(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids of the joined segments (the rendered chat, plus any end-of-turn token the template did not
    write), tokenised once; a token is trained when its characters overlap a trained segment. A
    token the tokenizer merges across a segment boundary (rare: every family's template ends a
    turn with a special token) is trained, since the model must emit it to write the answer."""
    spans, pos = [], 0
    for text, trained in segments:
        if trained and spans and spans[-1][1] == pos:
            spans[-1] = (spans[-1][0], pos + len(text))
        elif trained:
            spans.append((pos, pos + len(text)))
        pos += len(text)
    enc = tokenizer("".join(t for t, _ in segments), add_special_tokens=False, return_offsets_mapping=True)
    ids, labels, j = enc["input_ids"], [], 0
    for tok, (start, end) in zip(ids, enc["offset_mapping"]):
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        # overlap of [start, end) with the span; a zero-width token counts as the point `start`
        trained = j < len(spans) and spans[j][0] < max(end, start + 1)
        labels.append(tok if trained else IGNORE)
    return ids, labels


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
