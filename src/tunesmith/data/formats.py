"""Record formats, detected and normalised to one shape: a list of {role, content} messages."""
from __future__ import annotations

from tunesmith.errors import DataError

ROLES = {"system", "user", "assistant", "tool"}


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise DataError(f"cannot tell the format of a record with keys {sorted(record)}: expected 'messages' "
                    "(chat) or 'instruction'/'output' (Alpaca); set data.format")


def _from_messages(record: dict, where: str) -> list[dict]:
    msgs = record.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}].role '{m['role']}' is not one of {sorted(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message, so nothing to train on")
    return out


def _from_alpaca(record: dict, where: str) -> list[dict]:
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: Alpaca field '{key}' must be a string")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: Alpaca field 'input' must be a string")
    prompt = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


NORMALISERS = {"messages": _from_messages, "alpaca": _from_alpaca}


def to_messages(record: dict, fmt: str, where: str, system_prompt: str | None = None) -> list[dict]:
    msgs = NORMALISERS[fmt](record, where)
    if system_prompt is not None and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    return msgs


def load_conversations(path, fmt: str = "auto", system_prompt: str | None = None) -> tuple[list[list[dict]], str]:
    """Read a file and return (conversations, detected format)."""
    from tunesmith.data.sources import read_records

    rows = read_records(path)
    if fmt == "auto":
        try:
            fmt = detect_format(rows[0][1])
        except DataError as exc:
            raise DataError(f"{rows[0][0]}: {exc}") from None
    return [to_messages(rec, fmt, where, system_prompt) for where, rec in rows], fmt
