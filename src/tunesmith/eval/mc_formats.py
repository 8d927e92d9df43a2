"""Multiple-choice data files -> one item shape, with the prompt text lm-eval's own tasks build.

Formats (`task.format`, or detected from the file):
- arc:       JSONL {question, choices: {text, label}, answerKey}; labels A-E or 1-5 (lm-eval arc_easy).
- hellaswag: JSONL {ctx_a, ctx_b, activity_label, endings, label} (lm-eval hellaswag), or the
             6-lines-per-item text file (.txt / .txt.bz2: "<activity_label>: <ctx>", gold 0-3, four
             endings) as mirrored from llama.cpp's extraction.
- mmlu:      CSV in one of the shapes of CSV_SHAPES: question,A,B,C,D,answer (letter);
             question,choice0,...,choiceN,answer (index); hendrycks' files without a header (the
             subject comes from a `<subject>_test.csv` name). Or JSONL {question, choices, answer}
             with a `subject` (lm-eval mmlu default template).
- choices:   JSONL {question, choices: [...]} without a subject, or a CSV with task.format: choices;
             prompted as ARC.
In every shape the answer may be a choice's text, an index (int or digits) or a letter A..

Each item carries `text` (lm-eval's doc_to_text), `choices` (doc_to_choice, scored with a leading
space: lm-eval's target_delimiter) and `gold`. A bad row stops with DataError naming file:line.
"""
from __future__ import annotations

import bz2
import csv
import io
import itertools
import re
import string
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import DataError

FORMATS = ("arc", "hellaswag", "mmlu", "choices")
LETTERS = string.ascii_uppercase
MMLU_HEADER = ["question", "a", "b", "c", "d", "answer"]


@dataclass
class MCItem:
    id: str | int           # the record's own id, else its 0-based position in the file
    question: str           # what the per-example row shows as input
    text: str               # the prompt of this item alone (lm-eval doc_to_text)
    choices: list[str]      # continuations, without the delimiter (lm-eval doc_to_choice)
    gold: int               # index of the right choice
    labels: list[str]       # how choices are named in rows (A-D, 1-4, 0-3)
    description: str = ""   # put once before any shots (MMLU: "The following are ...")
    where: str = ""         # file:line, for messages


# --- lm-eval's prompt functions, re-stated (tests compare them with lm-eval's own) ----------

def hellaswag_preprocess(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py preprocess: WikiHow bracket markers out, spaces fixed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def arc_text(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def mmlu_text(question: str, choices: list[str]) -> str:
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question.strip()}{options}\nAnswer:"


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""


# --- one record -> MCItem -------------------------------------------------------------------

def _need(rec: dict, key: str, kind: type, where: str, fmt: str):
    value = rec.get(key)
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        got = "missing" if key not in rec else f"a {type(value).__name__}"
        raise DataError(f"{where}: {fmt} record needs '{key}' as a non-empty {kind.__name__} ({got}); "
                        f"fix the row, or map the column with task.columns")
    return value


def _string_list(rec: dict, key: str, where: str, fmt: str, least: int = 2) -> list[str]:
    value = _need(rec, key, list, where, fmt)
    if len(value) < least or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: '{key}' must be a list of at least {least} strings, got {value!r:.120}")
    return value


def arc_item(rec: dict, pos: int, where: str) -> MCItem:
    question = _need(rec, "question", str, where, "ARC")
    choices = _need(rec, "choices", dict, where, "ARC")
    texts, labels = choices.get("text"), choices.get("label")
    if not (isinstance(texts, list) and isinstance(labels, list) and len(texts) == len(labels) >= 2):
        raise DataError(f"{where}: ARC 'choices' must be {{text: [...], label: [...]}} of equal length >= 2")
    labels = [str(x) for x in labels]
    key = str(rec.get("answerKey", ""))
    if key not in labels:
        raise DataError(f"{where}: answerKey {rec.get('answerKey')!r} is not one of the labels {labels}")
    return MCItem(rec.get("id", pos), question, arc_text(question), [str(t) for t in texts],
                  labels.index(key), labels, where=where)


def _gold(value, n: int, where: str) -> int:
    """An answer given as an index, a digit string, or a letter A.. -> index."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS[:n]:
        return LETTERS.index(value.strip().upper())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
        return value
    raise DataError(f"{where}: answer {value!r} is not a choice index 0-{n - 1} or letter A-{LETTERS[n - 1]}")


def hellaswag_item(rec: dict, pos: int, where: str) -> MCItem:
    """lm-eval's process_docs: query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())."""
    label = _need(rec, "activity_label", str, where, "HellaSwag")
    ctx_a = rec.get("ctx_a", rec.get("ctx"))
    if not isinstance(ctx_a, str):
        raise DataError(f"{where}: HellaSwag record needs 'ctx_a' (and 'ctx_b') or 'ctx' as strings")
    ctx_b = rec.get("ctx_b", "") if "ctx_a" in rec else ""
    if not isinstance(ctx_b, str):
        raise DataError(f"{where}: HellaSwag 'ctx_b' must be a string")
    endings = _string_list(rec, "endings", where, "HellaSwag")
    query = hellaswag_preprocess(label + ": " + ctx_a + " " + ctx_b.capitalize())
    return MCItem(rec.get("ind", pos), query, query, [hellaswag_preprocess(e) for e in endings],
                  _gold(rec.get("label"), len(endings), where), [str(i) for i in range(len(endings))], where=where)


def _answer(value, choices: list[str], where: str) -> int:
    """An answer given as a choice's text, an index or a letter -> index. The text of a choice wins
    over reading it as a letter (choices "A", "B", ... are common)."""
    if isinstance(value, str) and value in choices:
        return choices.index(value)
    return _gold(value, len(choices), where)


def mmlu_item(rec: dict, pos: int, where: str, subject: str = "") -> MCItem:
    question = _need(rec, "question", str, where, "MMLU")
    choices = [str(c) for c in _string_list(rec, "choices", where, "MMLU")]
    subject = str(rec.get("subject") or subject).replace("_", " ")
    return MCItem(rec.get("id", pos), question, mmlu_text(question, choices), list(LETTERS[:len(choices)]),
                  _answer(rec.get("answer"), choices, where), list(LETTERS[:len(choices)]),
                  description=mmlu_description(subject), where=where)


def choices_item(rec: dict, pos: int, where: str) -> MCItem:
    question = _need(rec, "question", str, where, "multiple-choice")
    choices = _string_list(rec, "choices", where, "multiple-choice")
    return MCItem(rec.get("id", pos), question, arc_text(question), choices, _answer(rec.get("answer"), choices, where),
                  list(LETTERS[:len(choices)]), where=where)


BUILDERS = {"arc": arc_item, "hellaswag": hellaswag_item, "mmlu": mmlu_item, "choices": choices_item}


def detect_format(rec: dict, where: str) -> str:
    if isinstance(rec.get("choices"), dict) and "answerKey" in rec:
        return "arc"
    if "endings" in rec and ("ctx_a" in rec or "ctx" in rec):
        return "hellaswag"
    if isinstance(rec.get("choices"), list) and "answer" in rec:
        return "mmlu" if "subject" in rec else "choices"
    raise DataError(f"{where}: cannot tell the multiple-choice format from keys {sorted(rec)[:12]}; expected ARC "
                    "(question, choices{text,label}, answerKey), HellaSwag (ctx_a, ctx_b, endings, label), "
                    "or question/choices/answer; set task.format or map keys with task.columns")


# --- files ------------------------------------------------------------------------------------

def _open_text(path: Path) -> io.TextIOBase:
    try:
        if path.name.endswith(".bz2"):
            return io.TextIOWrapper(bz2.open(path, "rb"), encoding="utf-8")
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def _read_lines(path: Path) -> list[str]:
    try:
        with _open_text(path) as f:
            return f.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not readable UTF-8 text ({exc}); re-create or re-download the file") from None


def hellaswag_text_items(path: Path) -> list[MCItem]:
    """The 6-lines-per-item file. Its context line is "<activity_label>: <ctx_a> <ctx_b>" already
    preprocessed, with ctx_b's first letter still lower case; lm-eval capitalises ctx_b, so the
    letter starting the last sentence is upper-cased to recover lm-eval's query (best effort: the
    file does not mark where ctx_b starts)."""
    lines = _read_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or len(lines) % 6:
        raise DataError(f"{path}: a HellaSwag text file holds 6 lines per item (context, gold 0-3, 4 endings); "
                        f"it has {len(lines)} lines")
    items = []
    for pos, start in enumerate(range(0, len(lines), 6)):
        where = f"{path}:{start + 1}"
        context, gold, endings = lines[start], lines[start + 1].strip(), lines[start + 2:start + 6]
        if not gold.isdigit() or int(gold) > 3:
            raise DataError(f"{path}:{start + 2}: expected the gold ending 0-3, got {gold!r}")
        if not context.strip() or not all(e.strip() for e in endings):
            raise DataError(f"{where}: empty context or ending in this item")
        matches = list(re.finditer(r"[.!?] ([a-z])", context))
        if matches:
            i = matches[-1].start(1)
            context = context[:i] + context[i].upper() + context[i + 1:]
        query = hellaswag_preprocess(context)
        items.append(MCItem(pos, query, query, [hellaswag_preprocess(e) for e in endings], int(gold),
                            ["0", "1", "2", "3"], where=where))
    return items


def csv_subject(path: Path) -> str:
    """hendrycks' MMLU files are named <subject>_{test,dev,val}.csv."""
    stem = path.name.split(".")[0]
    for suffix in ("_test", "_dev", "_val"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)].replace("_", " ")
    return ""


CSV_SHAPES = ("question,A,B,C,D,answer (answer a letter; any number of letter columns A, B, ...), "
              "question,choice0,...,choiceN,answer (answer an index 0-N), or hendrycks' MMLU rows with no header "
              "(question, four choices, answer letter)")


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    try:
        with _open_text(path) as f:
            reader = csv.reader(f, strict=True)
            return [(reader.line_num, row) for row in reader if row]
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc}); check quotes in this row") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason}); re-encode the file as UTF-8") from None


def _is_answer(cell: str) -> bool:
    cell = cell.strip()
    return cell.isdigit() or (len(cell) == 1 and cell.upper() in LETTERS)


def _choice_columns(header: list[str]) -> list[str] | None:
    """The header's choice columns in order: letters A, B, ... or choice0, choice1, ...; None when
    neither run is there (a run must start at A / choice0 and have no gaps, or the answer index is ambiguous)."""
    for names in ([c.lower() for c in LETTERS], [f"choice{i}" for i in range(len(LETTERS))]):
        run = list(itertools.takewhile(lambda n: n in header, names))
        if len(run) >= 2:
            return run
    return None


def csv_header(first: list[str], where: str, columns: dict[str, str]) -> tuple[list[str] | None, list[str]]:
    """(the header, or None when the first row is already a question, and the choice columns).
    hendrycks' files have no header: a first row whose last field is an answer (a letter or digits) is data."""
    if len(first) == len(MMLU_HEADER) and _is_answer(first[-1]):
        return None, list("abcd")
    alias = {col.strip().lower(): canon for canon, col in columns.items()}  # task.columns: canonical -> column
    header = [alias.get(c.strip().lower(), c.strip().lower()) for c in first]
    choices = _choice_columns(header)
    if {"question", "answer"} <= set(header) and choices and len(set(header)) == len(header):
        return header, choices
    raise DataError(f"{where}: unrecognised multiple-choice CSV header {','.join(first)!r}; accepted shapes: "
                    f"{CSV_SHAPES}; rename the columns, or map question/answer with task.columns")


def csv_records(path: Path, columns: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """(file:line, {question, choices, answer, subject}) per row of a multiple-choice CSV."""
    rows = _csv_rows(path)
    if not rows:
        raise DataError(f"{path}: the file holds no questions")
    header, choice_cols = csv_header(rows[0][1], f"{path}:{rows[0][0]}", columns or {})
    if header is None:
        header = MMLU_HEADER
    else:
        rows = rows[1:]
    subject = csv_subject(path)
    out = []
    for line, row in rows:
        where = f"{path}:{line}"
        if len(row) != len(header):
            raise DataError(f"{where}: the CSV's rows have {len(header)} fields ({','.join(header)}), "
                            f"this one has {len(row)}; quote fields that contain commas")
        rec = dict(zip(header, row))
        rec = {"subject": subject, **rec, "choices": [rec[k] for k in choice_cols]}
        out.append((where, rec))
    return out


def _map_columns(rec: dict, columns: dict[str, str]) -> dict:
    return {**rec, **{canon: rec[col] for canon, col in columns.items() if col in rec}}


def record_items(path: Path, fmt: str, columns: dict[str, str]) -> tuple[list[MCItem], str]:
    from tunesmith.data.sources import iter_records

    items, first = [], None
    for row in iter_records(path):
        if row.error:
            raise DataError(f"{row.where}: {row.error}")
        rec = _map_columns(row.record, columns)
        kind = fmt if fmt != "auto" else detect_format(rec, row.where)
        if first is None:
            first = kind
        elif kind != first:  # one prompt format per task, or the scores mean nothing together
            raise DataError(f"{row.where}: a {kind} record in a file whose first record is {first}; "
                            "keep one format per file or set task.format")
        items.append(BUILDERS[kind](rec, len(items), row.where))
    return items, first or fmt


def load_items(path: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None) -> tuple[list[MCItem], str]:
    """(items, the format used). `fmt` is one of FORMATS or "auto"."""
    path = Path(path)
    if fmt not in (*FORMATS, "auto"):
        raise DataError(f"multiple-choice format {fmt!r} is not one of {', '.join(FORMATS)} (or auto)")
    if not path.is_file():
        raise DataError(f"multiple-choice file not found: {path} (relative to {Path.cwd()}); check task.path")
    name = path.name.lower()
    if name.endswith((".txt", ".txt.bz2")):
        if fmt not in ("auto", "hellaswag"):
            raise DataError(f"{path}: a text file is read as the HellaSwag 6-line layout, not as {fmt}")
        return hellaswag_text_items(path), "hellaswag"
    if name.endswith(".csv"):
        # A CSV holds question, choices and answer, prompted as MMLU unless task.format says choices.
        kind = "mmlu" if fmt == "auto" else fmt
        if kind not in ("mmlu", "choices"):
            raise DataError(f"{path}: a CSV file is read as mmlu or choices ({CSV_SHAPES}), not as {fmt}")
        return [BUILDERS[kind](rec, pos, where) for pos, (where, rec) in enumerate(csv_records(path, columns))], kind
    items, kind = record_items(path, fmt, columns or {})
    if not items:
        raise DataError(f"{path}: the file holds no questions")
    return items, kind
