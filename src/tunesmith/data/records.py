"""The one record shape every format is normalised to."""
from __future__ import annotations

from dataclasses import dataclass, field

Messages = list[dict]  # [{"role": ..., "content": ...}]


@dataclass
class Example:
    """kind 'chat': messages; kind 'text': text (continued pre-training);
    kind 'preference': prompt messages shared by the chosen and rejected continuations."""

    kind: str
    location: str
    format: str
    messages: Messages = field(default_factory=list)
    text: str = ""
    prompt: Messages = field(default_factory=list)
    chosen: Messages = field(default_factory=list)
    rejected: Messages = field(default_factory=list)

    def all_text(self) -> str:
        """Every piece of text in the example, for dedup, PII scans and contamination checks."""
        parts = [self.text] + [m["content"] for m in (*self.messages, *self.prompt, *self.chosen, *self.rejected)]
        return "\n".join(p for p in parts if p)
