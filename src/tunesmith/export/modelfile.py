"""An Ollama Modelfile for an exported GGUF, with a TEMPLATE that renders chats exactly as the
run's chat template did in training.

Ollama cannot run a Jinja chat template: it needs the same format written in Go's text/template.
We do not translate Jinja. We know the chat formats of the families tunesmith is tested on
(ChatML for Qwen 2/2.5/3 and SmolLM, Llama 3, Mistral's [INST], Gemma's turns, Phi-3's, Alpaca),
each with an Ollama TEMPLATE, and pick the one whose rendering of a set of probe conversations
equals the run's rendering (data/tokenize.render, what training and serving use), character for
character. The check uses a small renderer for the subset of Go templates these TEMPLATEs use
(`render_go`). A template that injects a default system prompt when the chat has none (Qwen 2.5's,
SmolLM2's) gets it as SYSTEM, which Ollama prepends as a system message in exactly that case.
Templates without a system role (Mistral v0.2, Gemma 2; Gemma 3 merges it itself) get tunesmith's
rule in Go: the system text goes before the first user message, followed by a blank line. A
template that matches no family gets a ModelError and no Modelfile, never a TEMPLATE that would
serve a different prompt format than the one trained.

Go templates have no `trim`: where a family's Jinja trims message contents (Llama 3, Gemma), a
message with leading or trailing whitespace renders with it in Ollama.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tunesmith.atomic import write_text
from tunesmith.data.templates import stop_tokens
from tunesmith.errors import ModelError


@dataclass(frozen=True)
class Family:
    name: str
    template: str             # Ollama TEMPLATE (Go text/template over .Messages)
    stops: tuple[str, ...]    # PARAMETER stop lines (besides the run's end of turn and EOS)


CHATML = Family("chatml", "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                          "<|im_start|>assistant\n", ("<|im_end|>", "<|im_start|>"))
# Without <|begin_of_text|>: llama.cpp adds BOS itself when the tokenizer does (_bos_prefix).
LLAMA3 = Family("llama-3", "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
                           "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
                ("<|eot_id|>", "<|start_header_id|>"))
ALPACA = Family("alpaca", '{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
                          '{{ else if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
                          '{{ else }}### Response:\n{{ .Content }}{{ .Eos }}\n\n{{ end }}{{ end }}### Response:\n',
                ("### Instruction:",))
# The system text is held in $system and written at the start of the next user message (tunesmith's
# rule for templates without a system role, and Gemma 3's own).
_HOLD_SYSTEM = '{{- $system := "" }}{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}'
_SYSTEM_FIRST = '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}'
MISTRAL = Family("mistral", _HOLD_SYSTEM + '{{ else if eq .Role "user" }}[INST] ' + _SYSTEM_FIRST +
                 '{{ .Content }} [/INST]{{ else if eq .Role "assistant" }}{{ .Content }}{{ .Eos }}{{ end }}{{ end }}',
                 ("[INST]",))
GEMMA = Family("gemma", _HOLD_SYSTEM + '{{ else if eq .Role "user" }}<start_of_turn>user\n' + _SYSTEM_FIRST +
               '{{ .Content }}<end_of_turn>\n{{ else if eq .Role "assistant" }}<start_of_turn>model\n'
               '{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n',
               ("<end_of_turn>", "<start_of_turn>"))
PHI3 = Family("phi-3", '{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n',
              ("<|end|>", "<|user|>", "<|assistant|>"))
FAMILIES = (CHATML, LLAMA3, MISTRAL, GEMMA, PHI3, ALPACA)

PROBES = [
    [{"role": "user", "content": "Hello, who are you?"}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Two lines:\nfirst {{ braces }} and \"quotes\"\nsecond"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
]


# ---------------------------------------------------------------- Go template subset
_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)


def _lex(template: str) -> list[tuple[str, str]]:
    """[(kind, value)] with kind 'text' or 'action'; Go's `{{- ` / ` -}}` trim the whitespace
    of the text on that side."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        text = text.lstrip() if trim_next else text
        out.append(("text", text.rstrip() if m.group(1) else text))
        out.append(("action", m.group(2)))
        pos, trim_next = m.end(), bool(m.group(3))
    tail = template[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


_VAR = re.compile(r"(\$\w+)\s*(:?=)\s*(.+)")


def _parse(tokens: list[tuple[str, str]], i: int = 0, stop: tuple[str, ...] = ()) -> tuple[list, int, str]:
    nodes: list = []
    while i < len(tokens):
        kind, value = tokens[i]
        i += 1
        if kind == "text":
            nodes.append(("text", value))
        elif value in stop or any(value.startswith(s + " ") for s in stop):
            return nodes, i, value
        elif value.startswith("range "):
            body, i, _ = _parse(tokens, i, ("end",))
            nodes.append(("range", value[6:].strip(), body))
        elif value.startswith("if "):
            branches, cond = [], value[3:].strip()
            while True:
                body, i, end = _parse(tokens, i, ("else", "else if", "end"))
                branches.append((cond, body))
                if end == "end":
                    break
                cond = end[8:].strip() if end.startswith("else if ") else "true"
            nodes.append(("if", branches))
        elif value.startswith("."):
            nodes.append(("field", value[1:]))
        elif m := _VAR.fullmatch(value):
            nodes.append(("set", m.group(1), m.group(3).strip()))
        elif re.fullmatch(r"\$\w+", value):
            nodes.append(("var", value))
        else:
            raise ValueError(f"unsupported Go template action {{{{ {value} }}}}")
    if stop:
        raise ValueError(f"Go template: missing {{{{ {stop[-1]} }}}}")
    return nodes, i, ""


def _value(expr: str, dot: dict, root: dict, vars: dict) -> str:
    if expr == '""':
        return ""
    if expr.startswith("."):
        return str(dot.get(expr[1:], root.get(expr[1:], "")))
    if expr.startswith("$"):
        return vars[expr]  # KeyError: used before `:=`, as Go refuses to parse it
    raise ValueError(f"unsupported Go template value '{expr}'")


def _true(cond: str, dot: dict, root: dict, vars: dict) -> bool:
    if cond == "true":
        return True
    if re.fullmatch(r"\$\w+", cond):
        return bool(vars[cond])  # Go: the empty string is false
    m = re.fullmatch(r'eq \.(\w+) "([^"]*)"', cond)
    if not m:
        raise ValueError(f"unsupported Go template condition '{cond}'")
    return dot.get(m.group(1)) == m.group(2)


def _eval(nodes: list, dot: dict, root: dict, vars: dict) -> str:
    """Variables live in one scope: these templates declare them at the top and assign them inside
    range/if, which Go (1.11+) applies to the outer variable."""
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(_value("." + node[1], dot, root, vars))
        elif node[0] == "var":
            out.append(vars[node[1]])
        elif node[0] == "set":
            vars[node[1]] = _value(node[2], dot, root, vars)
        elif node[0] == "range":
            out += [_eval(node[2], item, root, vars) for item in root[node[1].lstrip(".")]]
        else:  # only the first true branch runs (its assignments included)
            body = next((body for cond, body in node[1] if _true(cond, dot, root, vars)), None)
            out.append(_eval(body, dot, root, vars) if body is not None else "")
    return "".join(out)


def render_go(template: str, messages: list[dict], **fields) -> str:
    """Render the Go text/template subset used here: text, {{ .Field }}, {{ range .Messages }},
    {{ if eq .Role "x" }} / {{ if $var }} / {{ else if ... }} / {{ else }} / {{ end }}, string
    variables ({{ $v := "" }}, {{ $v = .Content }}, {{ $v }}), and `{{- ` / ` -}}` trimming."""
    nodes, _, _ = _parse(_lex(template))
    msgs = [{"Role": m["role"], "Content": m["content"]} | fields for m in messages]
    return _eval(nodes, {}, {"Messages": msgs} | fields, {})


# ---------------------------------------------------------------- family detection
def _hf(tokenizer, messages: list[dict]) -> str:
    """The prompt tunesmith renders for `messages` (training, generate and serve render this way)."""
    from tunesmith.data.tokenize import render

    return render(tokenizer, messages, add_generation_prompt=True)


def _bos_prefix(tokenizer) -> str:
    """Text llama.cpp/Ollama put before the rendered prompt themselves: BOS, when the GGUF says
    add_bos_token (export/gguf_vocab.adds_bos decides it)."""
    from tunesmith.export.gguf_vocab import adds_bos

    return tokenizer.bos_token if adds_bos(tokenizer) else ""


def _ollama(family: Family, tokenizer, messages: list[dict], system: str | None, bos: bool = True) -> str:
    """What Ollama would feed the model: its default SYSTEM prepended when the chat has no system
    message (server/routes.go), the TEMPLATE rendered, after the BOS llama.cpp adds."""
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    prefix = _bos_prefix(tokenizer) if bos else ""
    return prefix + render_go(family.template, messages, Eos=tokenizer.eos_token or "")


def _default_system(family: Family, tokenizer) -> str | None:
    """The system prompt the HF template injects when a chat has none, read off by lining up the
    family's rendering of a marked system message with the HF rendering of a chat without one."""
    mark, user = "\x00SYSTEM\x00", [{"role": "user", "content": "Hello, who are you?"}]
    pre, _, post = _ollama(family, tokenizer, [{"role": "system", "content": mark}] + user, None).partition(mark)
    hf = _hf(tokenizer, user)
    if not (post and hf.startswith(pre) and post in hf[len(pre):]):
        return None
    return hf[len(pre):hf.index(post, len(pre))]


def _candidates(tokenizer) -> list[Family]:
    """Each family as is, and, for a tokenizer that does not add BOS itself but whose template
    writes it as text, with the BOS written at the start of the TEMPLATE."""
    out = list(FAMILIES)
    if tokenizer.bos_token and not _bos_prefix(tokenizer):
        out += [Family(f.name, tokenizer.bos_token + f.template, f.stops) for f in FAMILIES]
    return out


def _expected(tokenizer) -> list[str]:
    """The probes as tunesmith renders them (a system message that the template refuses is merged
    into the first user message there, and the TEMPLATEs of such formats do the same)."""
    try:
        return [_hf(tokenizer, p) for p in PROBES]
    except Exception as exc:  # a template that rejects plain system/user/assistant chats
        raise ModelError(f"the chat template fails on a plain chat ({type(exc).__name__}: {exc}); "
                         "write the Ollama TEMPLATE by hand") from None


def detect_family(tokenizer) -> tuple[Family, str | None]:
    """(family, default system prompt or None) whose Ollama rendering equals the tokenizer's chat
    template on every probe conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("the tokenizer has no chat template, so no Ollama TEMPLATE can match it")
    probes, expected = PROBES, _expected(tokenizer)
    for family in _candidates(tokenizer):
        for system in (None, _default_system(family, tokenizer)):
            if all(_ollama(family, tokenizer, p, system) == e for p, e in zip(probes, expected)):
                return family, system
    shown = expected[-1][:200].replace("\n", "\\n")
    raise ModelError(f"the run's chat template matches none of the Ollama templates tunesmith knows "
                     f"({', '.join(f.name for f in FAMILIES)}); it renders a system+user chat as '{shown}'. "
                     "No Modelfile was written: a wrong TEMPLATE would serve a prompt format the model "
                     "was not trained on. Use the GGUF with llama.cpp (it reads the template from the "
                     "file) or write the Modelfile's TEMPLATE by hand")


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ModelError('a template or system prompt containing """ cannot be written into a Modelfile')
    return f'"""{text}"""'


def modelfile_text(gguf_path: Path, tokenizer, out_dir: Path, name: str = "Modelfile") -> str:
    family, system = detect_family(tokenizer)
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    source = f"./{gguf_path.name}" if gguf_path.resolve().parent == out_dir.resolve() else str(gguf_path.resolve())
    stops = list(dict.fromkeys([*stop_tokens(tokenizer).texts, *family.stops]))
    template = family.template.replace("{{ .Eos }}", tokenizer.eos_token or "")
    lines = [f"# Ollama Modelfile written by tunesmith; chat template family: {family.name}",
             f"# in this folder: ollama create NAME -f {name}", f"FROM {source}", f"TEMPLATE {_quoted(template)}"]
    if system is not None:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, tokenizer, out_dir: Path, name: str = "Modelfile") -> Path:
    """Write out_dir/<name> for `gguf_path` (atomically)."""
    return write_text(Path(out_dir) / name, modelfile_text(gguf_path, tokenizer, out_dir, name))
