"""Chat templates, and the one rule for what a model stops on.

The tokenizer's own template by default; named templates for models without one (or to
override). The template chosen here is saved with the run's tokenizer and reused by generate,
eval, export and serve, so training and serving render chats identically.

`stop_tokens` is the only place that decides which token ends an assistant turn: the special
token the template writes right after an assistant message (<|im_end|>, <|eot_id|>,
<end_of_turn>), else the tokenizer's EOS. Training appends exactly that token to each trained
turn, and every consumer (generate, the server, the merged export's generation_config, the GGUF's
EOS/EOT, the Modelfile's stop lines) stops on it and on the tokenizer's EOS. The tokenizer's EOS
is left as it is (a document still ends with it in continued pre-training), so the rule reads the
same from a run's saved tokenizer as it did in training.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

from tunesmith.errors import DataError

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ALPACA = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
          "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
          "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}")

# name -> (template, end-of-turn token it needs, or None when it ends turns with the tokenizer's EOS)
NAMED = {"chatml": (CHATML, "<|im_end|>"), "llama-3": (LLAMA3, "<|eot_id|>"), "alpaca": (ALPACA, None)}


def _has_token(tokenizer, token: str) -> bool:
    return token in tokenizer.get_vocab()


def apply_template(tokenizer, name: str | None = None) -> str:
    """Set the tokenizer's chat template. Returns the name used."""
    if name is None:
        if getattr(tokenizer, "chat_template", None):
            return "tokenizer"
        name = "chatml" if _has_token(tokenizer, "<|im_end|>") else "alpaca"
    if name not in NAMED:
        raise DataError(f"data.template '{name}' is not one of {', '.join(NAMED)} (or leave it unset to use "
                        "the tokenizer's own template)")
    template, eot = NAMED[name]
    if eot is not None:
        if not _has_token(tokenizer, eot):
            raise DataError(f"data.template '{name}' needs the special token {eot}, which this tokenizer lacks; "
                            "use data.template=alpaca (it ends turns with the tokenizer's own EOS)")
    tokenizer.chat_template = template
    return name


@dataclass(frozen=True)
class StopTokens:
    end_of_turn: str      # the token a trained assistant turn ends with
    end_of_turn_id: int
    eos: str              # the tokenizer's own EOS (the same token for templates that end turns with it)
    eos_id: int

    @property
    def ids(self) -> list[int]:
        """What generation stops on: the end of turn first, then EOS."""
        return list(dict.fromkeys([self.end_of_turn_id, self.eos_id]))

    @property
    def texts(self) -> list[str]:
        return list(dict.fromkeys([self.end_of_turn, self.eos]))


_PROBE = "PROBE-REPLY-7"
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def stop_tokens(tokenizer) -> StopTokens:
    """The run's stop tokens, read off its tokenizer and chat template (see the module docstring).
    The end of turn is the longest special or added token that the template renders right after
    an assistant message (spaces allowed between them); a template that writes none there (or no
    template at all) ends turns with the tokenizer's EOS."""
    template = getattr(tokenizer, "chat_template", None)
    key = (template if isinstance(template, str) else repr(template), tokenizer.eos_token, len(tokenizer))
    try:
        cached = _CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable: compute every time
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    eot = _template_end_of_turn(tokenizer) if template else None
    stops = StopTokens(eot, tokenizer.convert_tokens_to_ids(eot), eos, eos_id) if eot else \
        StopTokens(eos, eos_id, eos, eos_id)
    try:
        _CACHE[tokenizer] = (key, stops)
    except TypeError:
        pass
    return stops


def _template_end_of_turn(tokenizer) -> str | None:
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": _PROBE}], tokenize=False)
    except Exception as exc:  # the template's own error (e.g. raise_exception) says what it wants
        raise DataError(f"the chat template cannot render a plain user/assistant chat "
                        f"({type(exc).__name__}: {exc}), so the token that ends a turn cannot be read off it") from None
    if _PROBE not in text:
        raise DataError("the chat template rewrites the assistant's text, so the token that ends a turn "
                        "cannot be read off it")
    after = text[text.rindex(_PROBE) + len(_PROBE):].lstrip(" ")
    specials = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
    return next((t for t in sorted(specials, key=len, reverse=True) if t and after.startswith(t)), None)


_SYSTEM_PROBE = "PROBE-SYSTEM-5"
_SYSTEM_CACHE: dict[str, str] = {}


def system_support(tokenizer) -> str:
    """How the chat template treats a leading system message: 'kept' when its text is in the
    render (as its own turn, or merged by the template itself as Gemma 3's does), 'raises' when
    the template refuses it (Gemma 2, Mistral v0.2), 'drops' when the template renders the chat
    without it (Phi-3-mini's first template). data/tokenize.render merges it into the first user
    message for the last two, so no system text is ever trained or served without a word."""
    template = getattr(tokenizer, "chat_template", None)
    key = template if isinstance(template, str) else repr(template)
    if key not in _SYSTEM_CACHE:
        try:
            text = tokenizer.apply_chat_template([{"role": "system", "content": _SYSTEM_PROBE},
                                                  {"role": "user", "content": "hi"}], tokenize=False)
            _SYSTEM_CACHE[key] = "kept" if _SYSTEM_PROBE in text else "drops"
        except Exception:  # noqa: BLE001 (the template's own raise_exception, whatever its wording)
            _SYSTEM_CACHE[key] = "raises"
    return _SYSTEM_CACHE[key]


def stop_ids(tokenizer, generation_config=None) -> list[int]:
    """Token ids generation stops on: the rule's (end of turn, EOS), then any other EOS id the
    model's own generation_config lists (a base model may end text with one of its own)."""
    ids = stop_tokens(tokenizer).ids
    extra = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for i in extra if isinstance(extra, (list, tuple)) else [extra]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids
