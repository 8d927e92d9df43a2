"""Personal data and secrets in training text: find them, count them by kind, redact them.

Detectors are regexes with an optional validator (a card number must pass the Luhn check and
start like a real card network's number). They favour precision over recall: a report that
flags every long number would be ignored. When matches overlap, the detector listed first wins
(a GitHub token inside `api_key=...` is reported as a GitHub token), so each span is counted once.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

# Template values (`YOUR_API_KEY`, `<token>`, `xxxx`, an env var's NAME) are not leaks.
_PLACEHOLDER_VALUE = re.compile(r"^(?:(?i:your|my)|<|\$\{|\{\{|[xX]{4,}|\*{3,}|\.{3})|^[A-Z_]+$")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:  # every second digit from the right is doubled, 16 -> 1 + 6 = 7
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    # Luhn alone passes 1 in 10 random numbers; real cards also start with a network's digit
    # (2/5 Mastercard, 3 Amex/Diners/JCB, 4 Visa, 6 Discover/UnionPay).
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits)


def _phone(match: str) -> bool:
    digits = sum(c.isdigit() for c in match)
    return 10 <= digits <= 15 or (match.startswith("+") and 8 <= digits <= 15)  # E.164: at most 15 digits


def _secret_value(match: str) -> bool:
    return not _PLACEHOLDER_VALUE.search(match)


@dataclass(frozen=True)
class Detector:
    kind: str
    pattern: re.Pattern
    valid: Callable[[str], bool] | None = None
    group: int = 0  # the part of the match that is the secret (the value of `api_key=...`)
    # Substrings one of which every match contains: a cheap `in` test skips the regex scan,
    # which costs ~10 us per 600 characters even when nothing matches.
    hints: tuple[str, ...] = ()
    hint_casefold: bool = False


# Order is priority when matches overlap: specific formats before generic ones. The digit
# patterns assert a digit (or +/() ahead before their lookbehind: that lets the regex engine jump
# from digit to digit instead of trying the lookbehind at every character (2x faster).
DETECTORS: tuple[Detector, ...] = (
    Detector("private_key", re.compile(
        r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY((?: BLOCK)?)-----(?:[\s\S]*?-----END \1PRIVATE KEY\2-----)?"),
        hints=("PRIVATE KEY",)),
    Detector("aws_access_key", re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}\b"),
             hints=("AKIA", "ASIA", "ABIA", "ACCA", "A3T")),
    Detector("github_token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b"),
             hints=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    Detector("sk_api_key", re.compile(r"(?<![\w-])sk-[A-Za-z0-9_-]{20,}"), hints=("sk-",)),
    Detector("generic_secret", re.compile(
        r"(?i)\b(?:api[_-]?key|secret[_-]?key|client[_-]?secret|access[_-]?token|auth[_-]?token|api[_-]?secret"
        r"|secret|password|passwd)[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9_\-./+=]{8,})"), _secret_value, 1,
        hints=("key", "secret", "token", "passw"), hint_casefold=True),
    Detector("email", re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
             hints=("@",)),
    # Card numbers as written: one run of digits, or groups of 4 (4-6-5 / 4-6-4 for Amex/Diners)
    # with one consistent separator; "2000000-400000 0" in a maths answer is not a card.
    Detector("credit_card", re.compile(
        r"\d(?<![\d.,-]\d)(?:\d{12,18}|\d{3}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{3}([ -])\d{6}\2\d{4,5})(?![\d-])"),
        _card),
    Detector("phone", re.compile(
        r"(?=[+(\d])(?<![\w+.-])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
        r"|(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4})(?![\w-])"), _phone),
)
KINDS = tuple(d.kind for d in DETECTORS)


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


def find(text: str) -> list[Finding]:
    """Non-overlapping findings in text order."""
    hits: list[tuple[int, int, Finding]] = []
    lower = text.lower()
    for priority, det in enumerate(DETECTORS):
        haystack = lower if det.hint_casefold else text
        if det.hints and not any(h in haystack for h in det.hints):
            continue
        for m in det.pattern.finditer(text):
            span = m.span(det.group)
            if det.valid is None or det.valid(m.group(det.group)):
                hits.append((priority, span[0] - span[1], Finding(det.kind, *span)))
    kept: list[Finding] = []
    for _, _, f in sorted(hits, key=lambda h: h[:2]):  # by priority, then longest first
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    return sorted(kept, key=lambda f: f.start)


def placeholder(kind: str) -> str:
    return f"[REDACTED_{kind.upper()}]"


def redact(text: str, findings: list[Finding] | None = None) -> str:
    findings = find(text) if findings is None else findings
    out, cursor = [], 0
    for f in findings:
        out += [text[cursor:f.start], placeholder(f.kind)]
        cursor = f.end
    return "".join(out) + text[cursor:]


def count_kinds(text: str) -> Counter:
    return Counter(f.kind for f in find(text))


def snippet(text: str, width: int = 120) -> str:
    """A one-line excerpt around the first finding, redacted before it is cut (so a cut can never
    leave half a secret readable)."""
    clean = redact(text)
    at = clean.find("[REDACTED_")
    start = max(0, at - width // 3) if at >= 0 else 0
    piece = " ".join(clean[start:start + width].split())
    return ("…" if start else "") + piece + ("…" if start + width < len(clean) else "")
