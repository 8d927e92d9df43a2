"""The built-in reward functions of objective.rewards (registered in training/rewards.py).

Each is fn(prompts, completions, reference=list | None, **options) -> list[float | None] on plain
string completions; `reference` is the spec's column (None where the function reads none). A row
whose reference is missing (None) gets None: the function does not apply to it. `check_*` validate
options at config time (pure: no files read, as a saved config is reloaded elsewhere); `prepare_*`
turn options into the function's keyword arguments when the run starts (files read, patterns
compiled). Answer extraction reuses eval's (eval/json_fields.py, eval/answer_end.py) so that a
reward and the eval metric of the same task agree on what counts as the answer.
"""
from __future__ import annotations

import json
import math
import re
from numbers import Real
from pathlib import Path

from tunesmith.eval.answer_end import json_object_end
from tunesmith.eval.json_fields import json_metrics, parse_json_object

# A number as people write answers: thousands commas (GSM8K's "#### 1,080"), a sign, decimals. Not
# preceded by a word character or a dot, so "16-3" reads 16 and 3 (a subtraction, not -3), "x2"
# and the "5" of "3.5" are not numbers; a sentence's full stop ("18.") is not a decimal point.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _spaces(text: str) -> str:
    return " ".join(text.split())


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _pattern(value, option: str, groups: int | None = None) -> re.Pattern:
    if not isinstance(value, str):
        raise ValueError(f"option '{option}' must be a regular expression string, got {value!r}")
    try:
        compiled = re.compile(value)
    except re.error as exc:
        raise ValueError(f"option '{option}': {value!r} is not a valid regular expression ({exc})") from None
    if groups is not None and compiled.groups != groups:
        raise ValueError(f"option '{option}': {value!r} has {compiled.groups} groups; it needs exactly {groups} "
                         f"(the answer), e.g. 'answer: (.+)' (use (?:...) for groups that are not the answer)")
    return compiled


def _positive(options: dict, name: str, allow_zero: bool = False) -> None:
    value = options.get(name)
    if value is None:
        return
    if not _is_number(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"option '{name}' must be a number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _bool(options: dict, name: str) -> None:
    if name in options and not isinstance(options[name], bool):
        raise ValueError(f"option '{name}' must be true or false, got {options[name]!r}")


def _rows(completions, reference):
    return zip(completions, reference if reference is not None else [None] * len(completions))


# -- exact ------------------------------------------------------------------------------------------

def check_exact(options: dict) -> None:
    if "extract" in options:
        _pattern(options["extract"], "extract", groups=1)
    _bool(options, "case_sensitive")


def exact(prompts, completions, reference=None, extract: str | None = None, case_sensitive: bool = True) -> list:
    """1.0 when the answer equals the reference after stripping and collapsing whitespace (and
    case-folding unless case_sensitive). The answer is the whole completion, or with `extract` the
    group of its last match (a reply that restates the question before answering is judged on its
    final answer); a completion without a match scores 0."""
    fold = (lambda s: s) if case_sensitive else str.casefold
    out: list = []
    for text, ref in _rows(completions, reference):
        if ref is None:
            out.append(None)
            continue
        if extract is not None:
            found = [m.group(1) for m in re.finditer(extract, text)]
            if not found:
                out.append(0.0)
                continue
            text = found[-1]
        out.append(float(fold(_spaces(text)) == fold(_spaces(str(ref)))))
    return out


# -- numeric ----------------------------------------------------------------------------------------

def check_numeric(options: dict) -> None:
    if "marker" in options and (not isinstance(options["marker"], str) or not options["marker"].strip()):
        raise ValueError(f"option 'marker' must be a non-empty string (e.g. '####'), got {options['marker']!r}")
    _positive(options, "tolerance", allow_zero=True)


def extract_number(text: str, marker: str | None = None) -> float | None:
    """The first number after the last `marker` (None when the text has no marker), or without a
    marker the text's last number; None when there is none."""
    if marker is not None:
        at = text.rfind(marker)
        if at < 0:
            return None
        found = _NUMBER.search(text, at + len(marker))
    else:
        found = next(reversed(list(_NUMBER.finditer(text))), None)
    return float(found.group().replace(",", "")) if found else None


def numeric(prompts, completions, reference=None, marker: str | None = None, tolerance: float = 0.0) -> list:
    """1.0 when the completion's number equals the reference's within `tolerance` (absolute). The
    completion's number: the first after its last `marker` (GSM8K: "#### 18"; a completion without
    the marker scores 0), else its last number. The reference: a number, or a text read the same
    way (the marker if it has one, else its last number: GSM8K's worked answers work unchanged)."""
    out: list = []
    for i, (text, ref) in enumerate(_rows(completions, reference)):
        if ref is None:
            out.append(None)
            continue
        text_ref = str(ref)
        want = float(ref) if _is_number(ref) else extract_number(
            text_ref, marker if marker and marker in text_ref else None)
        if want is None:
            raise ValueError(f"numeric reward: the reference of completion {i} has no number: {str(ref)[:80]!r}")
        got = extract_number(text, marker)
        out.append(float(got is not None and math.isclose(got, want, rel_tol=0.0, abs_tol=tolerance)))
    return out


# -- json / json_schema -----------------------------------------------------------------------------

def reply_object(text: str) -> dict | None:
    """The completion's JSON object as eval reads a `json` task's reply (answer_end json, then
    parse_json_object): cut past the first top-level object, a code fence tolerated, prose before
    the object not (eval scores such a reply 0, so the reward does too)."""
    end = json_object_end(text)
    return parse_json_object(text[:end] if end is not None else text)


def check_json(options: dict) -> None:
    fields = options.get("fields")
    if fields is not None and (not isinstance(fields, list) or not fields
                               or not all(isinstance(f, str) for f in fields)):
        raise ValueError(f"option 'fields' must be a non-empty list of field names, got {fields!r}")


def json_valid(prompts, completions, reference=None, fields: list[str] | None = None) -> list:
    """1.0 when the completion is one JSON object (reply_object). With a reference column (a JSON
    object, or its text): the share of the reference's fields (or of `fields`) the object has with
    the same value, as eval's json metric's field_accuracy scores it; an invalid reply scores 0."""
    out: list = []
    for i, (text, ref) in enumerate(_rows(completions, reference)):
        obj = reply_object(text)
        if reference is None:
            out.append(float(obj is not None))
            continue
        if ref is None:
            out.append(None)
            continue
        ref_obj = ref if isinstance(ref, dict) else parse_json_object(str(ref))
        if ref_obj is None:
            raise ValueError(f"json reward: the reference of completion {i} is not a JSON object: {str(ref)[:80]!r}")
        names = tuple(fields or ref_obj)
        missing = [f for f in names if f not in ref_obj]
        if missing:
            raise ValueError(f"json reward: the reference of completion {i} lacks the fields {missing} named in "
                             f"option 'fields'")
        if obj is None or not names:
            out.append(float(obj is not None))
            continue
        out.append(json_metrics([json.dumps(obj)], [ref_obj], names)["field_accuracy"])
    return out


def check_json_schema(options: dict) -> None:
    schema = options.get("schema")
    if isinstance(schema, str):
        if not schema.endswith(".json"):
            raise ValueError(f"option 'schema' must be a JSON Schema (a mapping) or the path of a .json file, "
                             f"got {schema!r}")
        return  # read when the run starts: a saved config is reloaded where the path may not resolve
    if not isinstance(schema, dict):
        raise ValueError(f"option 'schema' must be a JSON Schema (a mapping) or the path of a .json file, "
                         f"got {schema!r}")
    _check_schema(schema, "option 'schema'")


def _check_schema(schema: dict, where: str):
    from jsonschema import SchemaError, validators

    cls = validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"{where} is not a valid JSON Schema: {exc.message}") from None
    return cls(schema)


def prepare_json_schema(options: dict) -> dict:
    schema = options["schema"]
    where = "option 'schema'"
    if isinstance(schema, str):
        path = Path(schema)
        where = f"option 'schema' ({path.resolve()})"
        try:
            schema = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{where}: no such file (a path is read relative to the working directory "
                             f"{Path.cwd()})") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(schema, dict):
            raise ValueError(f"{where}: a JSON Schema is an object, the file holds {type(schema).__name__}")
    return {"validator": _check_schema(schema, where)}


def json_schema(prompts, completions, reference=None, validator=None) -> list:
    """1.0 when the completion's JSON object (reply_object) validates against options.schema."""
    return [float(obj is not None and validator.is_valid(obj)) for obj in map(reply_object, completions)]


# -- regex, length ----------------------------------------------------------------------------------

MODES = ("search", "fullmatch")


def check_regex(options: dict) -> None:
    _pattern(options.get("pattern"), "pattern")
    if options.get("mode", "search") not in MODES:
        raise ValueError(f"option 'mode' must be one of {', '.join(MODES)}, got {options['mode']!r}")


def regex(prompts, completions, reference=None, pattern: str = "", mode: str = "search") -> list:
    """1.0 when `pattern` matches: mode search = anywhere in the completion, fullmatch = the whole
    completion. Python `re` syntax, no implicit flags: write (?s) for '.' to cross lines, (?i) to
    ignore case."""
    compiled = re.compile(pattern)
    match = compiled.search if mode == "search" else compiled.fullmatch
    return [float(match(text) is not None) for text in completions]


def check_length(options: dict) -> None:
    _positive(options, "target")
    _positive(options, "cap")


def length(prompts, completions, reference=None, target: float = 1.0, cap: float | None = None) -> list:
    """-|len - target| / target, len in characters (of the completion as decoded; characters, not
    tokens, so the reward needs no tokenizer and reads the same across models): 0 at the target,
    -1 at twice it or at empty. `cap` bounds the penalty at -cap."""
    out = [-abs(len(text) - target) / target for text in completions]
    return [max(p, -cap) if cap is not None else p for p in out]
