"""Prompt rows for online RL: the prompt to sample from, and every other column for the rewards.

A row gives its prompt as `prompt` (a string, or a list of {"role", "content"} messages ending
with a user turn), or as `messages` (everything before the last assistant turn, which is the
reference reply and stays available to rewards as the column `reference_reply`). data.columns
renames a column to `prompt` ({"prompt": "question"}); data.system_prompt is added to prompts
that have no system message. Every other column (an answer, a reference JSON ...) is passed to
the reward functions by name, as TRL passes dataset columns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.sources import iter_records
from tunesmith.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class PromptRow:
    index: int
    location: str                 # file:line
    messages: list[dict]          # the prompt as chat messages (rendered with the chat template)
    given: Any                    # the prompt as the data gave it: what reward functions receive
    columns: dict[str, Any]       # every other column
    input_ids: list[int] = field(default_factory=list)  # the rendered prompt's tokens (encode_prompts)
    n_tokens: int = 0             # tokens the last rollout of this prompt processed (prompt + completions)


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} of the prompt must be {{'role': one of {ROLES}, "
                            "'content': text}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def prompt_row(record: dict, where: str, index: int, system_prompt: str | None) -> PromptRow:
    columns = dict(record)
    if "prompt" in columns:
        given = columns.pop("prompt")
        messages = [{"role": "user", "content": given}] if isinstance(given, str) else _messages(given, where)
    elif "messages" in columns:
        given = _messages(columns.pop("messages"), where)
        last = max((i for i, m in enumerate(given) if m["role"] == "assistant"), default=None)
        if last is not None:
            columns.setdefault("reference_reply", given[last]["content"])
            given = given[:last]
        messages = given
    else:
        raise DataError(f"{where}: objective rl needs a 'prompt' column (or 'messages'); the row has "
                        f"{', '.join(sorted(record)) or 'no columns'} (rename one with data.columns.prompt=NAME)")
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user message (the model replies to it)")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return PromptRow(index, where, messages, given, columns)


def load_prompts(spec: str, columns: dict[str, str] | None = None, system_prompt: str | None = None,
                 first_index: int = 0) -> list[PromptRow]:
    """Every row of a data source as a PromptRow, numbered from `first_index` (a split's numbers
    must not repeat another's: a rollout's seed is made from them)."""
    rename = {column: canonical for canonical, column in (columns or {}).items()}
    rows = []
    for raw in iter_records(spec):
        if raw.error:
            raise DataError(f"{raw.where}: {raw.error}")
        record = {rename.get(k, k): v for k, v in raw.record.items()}
        rows.append(prompt_row(record, raw.where, first_index + len(rows), system_prompt))
    if not rows:
        raise DataError(f"{spec}: no prompt rows")
    names = set(rows[0].columns)
    for r in rows:
        if set(r.columns) != names:
            raise DataError(f"{r.location}: columns {sorted(r.columns)} differ from the first row's {sorted(names)}; "
                            "every row needs the same columns (reward functions receive each as a list)")
    return rows


def encode_prompts(tokenizer, rows: list[PromptRow], max_length: int, source: str) -> list[PromptRow]:
    """Each row's rendered prompt tokens; a prompt longer than data.max_length is an error naming it
    (cutting a prompt would change the question)."""
    from tunesmith.data.tokenize import prompt_ids

    for r in rows:
        r.input_ids = prompt_ids(tokenizer, r.messages)
        r.n_tokens = len(r.input_ids)
        if len(r.input_ids) > max_length:
            raise DataError(f"{r.location}: the prompt is {len(r.input_ids)} tokens, over data.max_length="
                            f"{max_length} ({source}); raise data.max_length or shorten the prompt")
    return rows
