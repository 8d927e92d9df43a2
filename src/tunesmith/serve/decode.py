"""Per-row token choice (greedy or seeded temperature/top-p sampling) and incremental text with stop
strings, for the serving engine's decode loop."""
from __future__ import annotations

import torch

REPLACEMENT = "\ufffd"  # what a decoder prints for an incomplete UTF-8 sequence


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One token from softmax(logits / temperature), restricted to the smallest set of most likely
    tokens whose probability reaches top_p (nucleus, no top-k). The row's own generator makes a
    seeded request reproducible whatever else shares its batch."""
    probs = torch.softmax(logits.detach().to("cpu", torch.float32) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the tokens ranked above each one
        sorted_p[before >= top_p] = 0.0                     # the top token always stays (before = 0)
        choice = torch.multinomial(sorted_p, 1, generator=gen)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=gen))


def choose(logits: torch.Tensor, params: list[tuple[float, float, torch.Generator | None]]) -> list[int | Exception]:
    """Next token of each row: params[i] = (temperature, top_p, generator); temperature 0 is greedy.
    A row whose sampling raises (NaN logits from a bad adapter ...) gets the exception in its place,
    so the caller fails that row alone."""
    greedy = logits.argmax(dim=-1).tolist()
    out: list[int | Exception] = []
    for i, (t, p, g) in enumerate(params):
        try:
            out.append(greedy[i] if t <= 0 else sample(logits[i], t, p, g))
        except RuntimeError as exc:
            out.append(exc)
    return out


class RowText:
    """The text of one row's generated tokens, released piece by piece.

    The whole generation is re-decoded at every token (so multi-token characters and tokenizers
    that merge bytes come out as they would at the end); a piece is released only when no later
    token can change it: text ending in U+FFFD (an incomplete character) waits, and so does an ending
    that could be the start of a stop string. The final text ends before the earliest stop string."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already released

    def _decode(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token: (newly releasable text, whether a stop string now ends the row)."""
        self.ids.append(token)
        text = self._decode()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            return self.flush(), True
        self.text = text
        safe = len(text.rstrip(REPLACEMENT))
        safe -= self._stop_prefix(text[:safe])
        if safe <= self.sent:
            return "", False
        piece, self.sent = text[self.sent:safe], safe
        return piece, False

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest ending of `text` that begins some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """Everything not yet released (the row is ending)."""
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece
