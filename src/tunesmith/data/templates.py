"""Chat templates. The tokenizer's own template by default; named templates for models without
one (or to override). The template and EOS chosen here are saved with the run's tokenizer and
reused by generate, eval, export and serve, so training and serving render chats identically."""
from __future__ import annotations

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

# name -> (template, end-of-turn token it needs, or None to use the tokenizer's EOS)
NAMED = {"chatml": (CHATML, "<|im_end|>"), "llama-3": (LLAMA3, "<|eot_id|>"), "alpaca": (ALPACA, None)}


def _has_token(tokenizer, token: str) -> bool:
    return token in tokenizer.get_vocab()


def apply_template(tokenizer, name: str | None = None) -> str:
    """Set the tokenizer's chat template (and EOS = the template's end of turn). Returns the name used."""
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
        tokenizer.eos_token = eot  # the token that ends an assistant turn is the one generation stops on
    tokenizer.chat_template = template
    return name
