"""Token log-probabilities for the server: computed by the engine from the model's logits, rendered
by the app in OpenAI's two shapes.

A log-probability is log_softmax of the raw logits in float32 at the position that predicts the
token (temperature 1, whatever the request samples with: OpenAI reports the model's own
distribution). The chosen token's value is always given, with the k most likely tokens beside it.

Shapes: chat completions give `logprobs.content[]` of {token, logprob, bytes, top_logprobs[]};
text completions give the legacy {tokens, token_logprobs, top_logprobs, text_offset}, where
top_logprobs[i] maps token text to logprob for the k most likely tokens plus the chosen one (so up
to k + 1 entries, as OpenAI documents) and the first prompt token of an echo has null for both
(nothing predicts it). text_offset counts characters of the returned text (the prompt's text
first: with echo it is part of the text, without it the offsets start after it, as OpenAI's do),
summing each token's own decoded length as vLLM does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

MAX_TOP_CHAT = 20    # OpenAI: top_logprobs in 0..20
MAX_TOP_LEGACY = 5   # OpenAI: the completions endpoint's logprobs in 0..5
LOGIT_BYTES = 1 << 30  # prompt logits one echo prefill may hold (raw and float32 copies)
REPLACEMENT = "\ufffd"
METASPACE = "\u2581"  # SentencePiece's word-start mark
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte fallback


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None                  # None: the first prompt token (nothing predicts it)
    top: list[tuple[int, float]] = field(default_factory=list)  # the k most likely, most likely first


def pick(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Entries for `tokens[i]` predicted by `logits[i]` ([n, vocab], any dtype)."""
    if not tokens:
        return []
    lp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    ids = torch.tensor(tokens, dtype=torch.long, device=lp.device)
    chosen = lp.gather(-1, ids[:, None])[:, 0].tolist()
    if k > 0:
        vals, idx = lp.topk(min(k, lp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops)]


def prompt_entries(logits: torch.Tensor, prompt: list[int], k: int) -> list[TokenLogprob]:
    """A prompt's own entries from its row of all-position logits ([width, vocab], left-padded: the
    prompt fills the last len(prompt) columns; column j predicts the token at column j + 1)."""
    n = len(prompt)
    return [TokenLogprob(prompt[0], None)] + pick(logits[-n:-1], prompt[1:], k)


def prefill_parts(lengths: list[int], vocab: int) -> list[list[int]]:
    """Indices of echo rows grouped so that one prefill's all-position logits stay within
    LOGIT_BYTES (rows x widest prompt x vocab, raw plus float32); a row alone is always allowed."""
    budget = max(1, LOGIT_BYTES // (max(vocab, 1) * 8))
    parts: list[list[int]] = []
    widest = 0
    for i, n in enumerate(lengths):
        if parts and (len(parts[-1]) + 1) * max(widest, n) <= budget:
            parts[-1].append(i)
            widest = max(widest, n)
        else:
            parts.append([i])
            widest = n
    return parts


# ------------------------------------------------------------------------------- rendering

class TokenText:
    """Each token's text and UTF-8 bytes for one tokenizer (cached: a vocabulary's tokens repeat)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_level = _byte_level_decoder(tokenizer)

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            self._cache[token] = self._render(token)
        return self._cache[token]

    def _render(self, token: int) -> tuple[str, list[int]]:
        text = self.tok.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        piece = self.tok.convert_ids_to_tokens(token)
        if isinstance(piece, str) and piece.startswith(METASPACE) and not text.startswith(" "):
            text = " " + text  # SentencePiece drops a word's space when its token is decoded alone
        if REPLACEMENT not in text:
            return text, list(text.encode("utf-8"))
        # part of a character: its real bytes, from the byte-level alphabet or a <0xNN> piece
        raw = None
        if isinstance(piece, str):
            m = _BYTE_PIECE.match(piece)
            if m:
                raw = bytes([int(m.group(1), 16)])
            elif self._byte_level and all(ch in self._byte_level for ch in piece):
                raw = bytes(self._byte_level[ch] for ch in piece)
        if raw is None:
            return text, list(text.encode("utf-8"))
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def _byte_level_decoder(tokenizer) -> dict[str, int] | None:
    """GPT-2's byte <-> printable character map, when the tokenizer decodes with ByteLevel."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or "ByteLevel" not in type(backend.decoder).__name__ + repr(backend.decoder):
        return None
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def chat_content(text_of: TokenText, entries: list[TokenLogprob]) -> list[dict]:
    """OpenAI chat `logprobs.content`: one object per generated token."""
    out = []
    for e in entries:
        token, raw = text_of(e.token)
        top = []
        for t, v in e.top:
            s, b = text_of(t)
            top.append({"token": s, "logprob": v, "bytes": b})
        out.append({"token": token, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
    return out


def legacy(text_of: TokenText, entries: list[TokenLogprob], offset: int) -> dict:
    """OpenAI completions `logprobs`; `offset` is the character offset of the first token."""
    tokens, values, tops, offsets = [], [], [], []
    for e in entries:
        token = text_of(e.token)[0]
        tokens.append(token)
        values.append(e.logprob)
        offsets.append(offset)
        offset += _length(token)
        if e.logprob is None:
            tops.append(None)
            continue
        top = {text_of(t)[0]: v for t, v in e.top}
        top.setdefault(token, e.logprob)  # the chosen token is always there (up to k + 1 entries)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _length(token: str) -> int:
    return 0 if token.startswith("bytes:") else len(token)  # part of a character: it adds none alone


def next_offset(legacy_obj: dict) -> int:
    """The text_offset the token after this legacy object's last one gets (streaming)."""
    return legacy_obj["text_offset"][-1] + _length(legacy_obj["tokens"][-1])
