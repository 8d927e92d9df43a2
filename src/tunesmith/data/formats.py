"""Record formats, detected per record and normalised to `Example`s.

Each format is a (detector, normaliser) pair in FORMATS; adding one is adding an entry. Column
mapping renames a source's columns to a format's canonical fields before detection, e.g.
{"instruction": "text", "output": "category"} for a CSV classification set.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Callable

from tunesmith.data.records import Example, Messages
from tunesmith.errors import DataError

ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "function_call": "assistant", "observation": "tool",
                  "function": "tool"}
TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _message(m, where: str, i: int) -> dict:
    if not isinstance(m, dict) or "role" not in m:
        raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
    if m["role"] not in ROLES:
        raise DataError(f"{where}: messages[{i}].role '{m['role']}' is not one of {sorted(ROLES)}")
    content = m.get("content")
    if content is None and m.get("tool_calls"):
        content = json.dumps(m["tool_calls"], ensure_ascii=False)  # tool calls are trained as text
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return {"role": m["role"], "content": _text(content, where, f"messages[{i}].content")}


def _messages(value, where: str, field: str = "messages") -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages")
    return [_message(m, where, i) for i, m in enumerate(value)]


def _needs_assistant(msgs: Messages, where: str) -> Messages:
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant message, so nothing to train on")
    return msgs


def from_messages(r: dict, where: str) -> list[Example]:
    return [Example("chat", where, "messages", messages=_needs_assistant(_messages(r["messages"], where), where))]


def from_sharegpt(r: dict, where: str) -> list[Example]:
    turns = r["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list")
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise DataError(f"{where}: conversations[{i}] needs 'from' and 'value'")
        role = SHAREGPT_ROLES.get(t["from"])
        if role is None:
            raise DataError(f"{where}: conversations[{i}].from '{t['from']}' is not one of {sorted(SHAREGPT_ROLES)}")
        msgs.append({"role": role, "content": _text(t["value"], where, f"conversations[{i}].value")})
    return [Example("chat", where, "sharegpt", messages=_needs_assistant(msgs, where))]


def _alpaca_messages(instruction: str, extra: str, output: str, system: str | None = None) -> Messages:
    prompt = instruction + (f"\n\n{extra}" if extra.strip() else "")
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def from_alpaca(r: dict, where: str) -> list[Example]:
    system = _text(r["system"], where, "system") if r.get("system") is not None else None
    msgs = _alpaca_messages(_text(r["instruction"], where, "instruction"), _text(r.get("input") or "", where, "input"),
                            _text(r["output"], where, "output"), system)
    return [Example("chat", where, "alpaca", messages=msgs)]


def from_self_instruct(r: dict, where: str) -> list[Example]:
    inst = _text(r["instruction"], where, "instruction")
    if not isinstance(r["instances"], list) or not r["instances"]:
        raise DataError(f"{where}: field 'instances' must be a non-empty list of {{input, output}}")
    out = []
    for i, x in enumerate(r["instances"]):
        if not isinstance(x, dict) or "output" not in x:
            raise DataError(f"{where}: instances[{i}] needs 'output'")
        msgs = _alpaca_messages(inst, _text(x.get("input") or "", where, f"instances[{i}].input"),
                                _text(x["output"], where, f"instances[{i}].output"))
        out.append(Example("chat", f"{where}#{i}", "self_instruct", messages=msgs))
    return out


def _as_turns(value, where: str, field: str, role: str) -> Messages:
    if isinstance(value, list):
        return _messages(value, where, field)
    return [{"role": role, "content": _text(value, where, field)}]


def from_prompt_completion(r: dict, where: str) -> list[Example]:
    msgs = _as_turns(r["prompt"], where, "prompt", "user") + _as_turns(r["completion"], where, "completion", "assistant")
    return [Example("chat", where, "prompt_completion", messages=_needs_assistant(msgs, where))]


def from_text(r: dict, where: str) -> list[Example]:
    text = _text(r["text"], where, "text")
    if not text.strip():
        raise DataError(f"{where}: field 'text' is empty")
    return [Example("text", where, "text", text=text)]


def parse_transcript(text: str, where: str) -> Messages:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages."""
    msgs: Messages = []
    for chunk in text.split("\n\n"):
        speaker, sep, rest = chunk.partition(":")
        if sep and speaker in TRANSCRIPT_ROLES:
            msgs.append({"role": TRANSCRIPT_ROLES[speaker], "content": rest.strip()})
        elif msgs:  # a paragraph break inside a turn
            msgs[-1]["content"] += "\n\n" + chunk
        elif chunk.strip():
            raise DataError(f"{where}: transcript does not start with 'Human:' or 'Assistant:'")
    for m in msgs:
        m["content"] = m["content"].strip()
    return msgs


def _split_shared_prefix(chosen: Messages, rejected: Messages, where: str):
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # The prompt ends before the last assistant turn that differs; everything after is the response.
    while n > 0 and chosen[n - 1]["role"] == "assistant" and (n == len(chosen) or n == len(rejected)):
        n -= 1
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    if not prompt or not c or not r:
        raise DataError(f"{where}: chosen and rejected share no prompt, or one of them has no response")
    return prompt, c, r


def from_preference(r: dict, where: str) -> list[Example]:
    if "prompt" in r:
        prompt = _as_turns(r["prompt"], where, "prompt", "user")
        chosen = _as_turns(r["chosen"], where, "chosen", "assistant")
        rejected = _as_turns(r["rejected"], where, "rejected", "assistant")
        # Conversational datasets sometimes repeat the prompt inside chosen/rejected.
        if chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt:
            chosen, rejected = chosen[len(prompt):] or chosen, rejected[len(prompt):] or rejected
    else:
        c = r["chosen"] if isinstance(r["chosen"], list) else parse_transcript(_text(r["chosen"], where, "chosen"), where)
        j = (r["rejected"] if isinstance(r["rejected"], list)
             else parse_transcript(_text(r["rejected"], where, "rejected"), where))
        prompt, chosen, rejected = _split_shared_prefix(_messages(c, where, "chosen"), _messages(j, where, "rejected"),
                                                        where)
    if chosen == rejected:
        raise DataError(f"{where}: chosen equals rejected, so there is no preference to learn; drop the row")
    return [Example("preference", where, "preference", prompt=prompt, chosen=chosen, rejected=rejected)]


def from_openai_preference(r: dict, where: str) -> list[Example]:
    """OpenAI's DPO rows: {"input": {"messages": [...]}, "preferred_output": [assistant message],
    "non_preferred_output": [assistant message]} (its `tools` / `parallel_tool_calls` are not trained)."""
    inp = r["input"]
    if not isinstance(inp, dict) or "messages" not in inp:
        raise DataError(f"{where}: field 'input' must be an object with 'messages' (OpenAI's preference format)")
    prompt = _messages(inp["messages"], where, "input.messages")
    chosen = _messages(r["preferred_output"], where, "preferred_output")
    rejected = _messages(r["non_preferred_output"], where, "non_preferred_output")
    for field, msgs in (("preferred_output", chosen), ("non_preferred_output", rejected)):
        if any(m["role"] != "assistant" for m in msgs):
            raise DataError(f"{where}: field '{field}' must hold assistant messages only")
    if chosen == rejected:
        raise DataError(f"{where}: preferred_output equals non_preferred_output, so there is no preference to "
                        "learn; drop the row")
    return [Example("preference", where, "openai_preference", prompt=prompt, chosen=chosen, rejected=rejected)]


Detector = Callable[[dict], bool]
FORMATS: dict[str, tuple[Detector, Callable[[dict, str], list[Example]]]] = {
    "messages": (lambda r: "messages" in r, from_messages),
    "sharegpt": (lambda r: "conversations" in r, from_sharegpt),
    "preference": (lambda r: "chosen" in r and "rejected" in r, from_preference),
    "openai_preference": (lambda r: "preferred_output" in r and "non_preferred_output" in r, from_openai_preference),
    "self_instruct": (lambda r: "instruction" in r and "instances" in r, from_self_instruct),
    "alpaca": (lambda r: "instruction" in r and "output" in r, from_alpaca),
    "prompt_completion": (lambda r: "prompt" in r and "completion" in r, from_prompt_completion),
    "text": (lambda r: "text" in r, from_text),  # last: other formats may carry a 'text' column too
}
TREE_FORMATS = {"oasst"}  # formats whose conversations span several rows (rebuilt from parent links)
FORMAT_NAMES = (*FORMATS, *TREE_FORMATS)


def map_columns(record: dict, columns: dict[str, str], where: str) -> dict:
    if not columns:
        return record
    missing = [src for src in columns.values() if src not in record]
    if missing:
        raise DataError(f"{where}: column(s) {missing} named in data.columns are missing; the record has "
                        f"columns {sorted(record)}; fix data.columns (canonical field -> column in the file)")
    mapped = {k: v for k, v in record.items() if k not in columns.values()}
    mapped.update({canon: record[src] for canon, src in columns.items()})
    return mapped


def detect_format(record: dict, where: str = "record") -> str:
    if {"message_id", "parent_id", "role", "text"} <= set(record):
        return "oasst"
    for name, (detect, _) in FORMATS.items():
        if detect(record):
            return name
    raise DataError(f"{where}: cannot tell the format of a record with keys {sorted(record)}; expected one of "
                    "messages, conversations (ShareGPT), instruction/output (Alpaca), prompt/completion, "
                    "text, chosen/rejected (preference), input/preferred_output/non_preferred_output (OpenAI's "
                    "preference format); map your columns with data.columns "
                    "(e.g. {instruction: question, output: answer}) or set data.format")


def normalise(record: dict, fmt: str, where: str, columns: dict[str, str] | None = None,
              system_prompt: str | None = None) -> list[Example]:
    """One raw record -> Examples (several for self-instruct). fmt may be 'auto'."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be an object, got {type(record).__name__}")
    record = map_columns(record, columns or {}, where)
    fmt = detect_format(record, where) if fmt == "auto" else fmt
    if fmt in TREE_FORMATS:
        raise DataError(f"{where}: '{fmt}' rows form trees; load them with load_examples, not one by one")
    if fmt not in FORMATS:
        raise DataError(f"{where}: unknown format '{fmt}'; use one of {', '.join(FORMAT_NAMES)} or auto")
    if not FORMATS[fmt][0](record):
        raise DataError(f"{where}: record with keys {sorted(record)} does not fit format '{fmt}'")
    try:
        examples = FORMATS[fmt][1](record, where)
    except DataError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise DataError(f"{where}: malformed {fmt} record ({type(exc).__name__}: {exc})") from None
    if system_prompt is not None:
        for ex in examples:
            for msgs in (ex.messages, ex.prompt):
                if msgs and msgs[0]["role"] != "system":
                    msgs.insert(0, {"role": "system", "content": system_prompt})
    return examples


def check_tree_row(r: dict, where: str) -> None:
    """An OpenAssistant row fit to link into a tree (ids that can be looked up, a comparable rank)."""
    missing = [k for k in ("message_id", "parent_id", "role", "text") if k not in r]
    if missing:
        raise DataError(f"{where}: an oasst row needs message_id, parent_id, role and text; {missing} missing")
    _text(r["message_id"], where, "message_id")
    if r["parent_id"] is not None:
        _text(r["parent_id"], where, "parent_id")
    _text(r["role"], where, "role")
    _text(r["text"], where, "text")
    if r.get("rank") is not None and (isinstance(r["rank"], bool) or not isinstance(r["rank"], (int, float))):
        raise DataError(f"{where}: field 'rank' must be a number or null, got {type(r['rank']).__name__}")


def oasst_conversations(rows: list[tuple[str, dict]], best_only: bool = True) -> list[Example]:
    """Rebuild OpenAssistant trees (message_id/parent_id/role/rank) into conversations: one per
    path from a root prompt to a leaf, following the best-ranked replies when best_only."""
    by_id, children = {}, defaultdict(list)
    for where, r in rows:
        if r.get("deleted") or r.get("role") not in ("prompter", "assistant"):
            continue
        by_id[r["message_id"]] = (where, r)
        children[r.get("parent_id")].append(r["message_id"])
    out: list[Example] = []

    def walk(mid: str, path: Messages, where: str):
        r = by_id[mid][1]
        path = path + [{"role": "user" if r["role"] == "prompter" else "assistant", "content": r["text"]}]
        kids = sorted(children.get(mid, []), key=lambda k: (by_id[k][1].get("rank") is None, by_id[k][1].get("rank") or 0))
        if best_only:
            kids = kids[:1]
        if not kids:
            # A path that ends on an unanswered prompt still teaches every reply before it.
            while path and path[-1]["role"] != "assistant":
                path = path[:-1]
            if path:
                out.append(Example("chat", where, "oasst", messages=path))
        for k in kids:
            walk(k, path, where)

    for root in children.get(None, []):
        walk(root, [], by_id[root][0])
    return out
