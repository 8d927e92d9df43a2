"""Answer ends (eval/answer_end.py): where a reply's answer ends, generation stops per row, and the
replies and scores are those of generating to max_new_tokens and cutting there; fewer forward
steps; the answer_end setting; examples/s in the results file."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from conftest import build_tokenizer, tiny_llama, write_jsonl
from tunesmith.config import EvalTaskSection, load_config
from tunesmith.data.tokenize import prompt_ids
from tunesmith.errors import ConfigError
from tunesmith.eval.answer_end import (ANSWER_ENDS, METRIC_ANSWER_ENDS, json_end, json_object_end, line_end,
                                       resolve_answer_end)
from tunesmith.eval.json_fields import parse_json_object
from tunesmith.eval.metrics import METRICS, Context, score
from tunesmith.eval.results import read_result
from tunesmith.eval.run import run_tasks
from tunesmith.generation import GenerationStats, InferenceModel, cut_answer, generate

OBJ = '{"customer": "Ana {Diaz}", "note": "say \\"}\\" twice", "nested": {"a": {"b": [1, {"c": "}"}]}}}'


# ---- the end functions ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, end", [
    (OBJ, len(OBJ)),                                          # braces and escaped quotes inside strings
    (OBJ + "\nI hope this helps", len(OBJ)),
    ("```json\n" + OBJ + "\n```", len("```json\n" + OBJ)),    # fenced: the answer ends at the brace
    (OBJ[:-1], None),                                         # still open
    ('{"a": "}', None),                                       # a brace inside an unclosed string
    ('{"a": "\\\\"}', len('{"a": "\\\\"}')),                  # an escaped backslash ends no string escape
    ('{"a": "\\"}', None),                                    # an escaped quote: the string is still open
    ("{}{}", 2),                                              # the first object
    ("no object here", None),
])
def test_json_object_end(text, end):
    assert json_object_end(text) == end


def test_json_object_end_agrees_with_the_json_decoder():
    for obj in [{"a": "}{", "b": {"c": ["{", "}"]}}, {"q": 'x\\"}'}, {}, {"k": {"k": {"k": {}}}}]:
        text = json.dumps(obj)
        assert json_object_end(text + ' trailing "}" text') == len(text)
        assert json.loads(text[:json_object_end(text)]) == obj


@pytest.mark.parametrize("text, end", [
    ("refund", None), ("refund\nbecause", 6), ("\n\n  refund\nx", 10), ("\n \n", None), ("a\r\nb", 2),
])
def test_line_end_skips_blank_lines_before_the_answer(text, end):
    assert line_end(text) == end


@pytest.mark.parametrize("text, end", [
    ("Sure, here it is: " + OBJ, len("Sure, here it is: " + OBJ)),  # prose first: ended (scores nothing)
    ("S", 1),
    ("```", None), ("```js", None), ("```python", len("```python")),  # the fence tag decides
    ("```json\n" + OBJ[:10], None),
    ("  " + OBJ + " more", 2 + len(OBJ)),
])
def test_json_end(text, end):
    assert json_end(text) == end


TEXT = st.lists(st.sampled_from(list('{}"\\\n :ab`') + ["json", "```", "Sure"]), max_size=40).map("".join)


@settings(max_examples=400, deadline=None)
@given(TEXT, st.data())
def test_an_end_found_in_a_prefix_is_the_end_of_every_continuation(text, data):
    """What lets generation stop at the first token where an end is found: it never moves later."""
    k = data.draw(st.integers(0, len(text)))
    for end in (json_object_end, line_end):
        e = end(text[:k])
        if e is not None:
            assert end(text) == e
    e = json_end(text[:k])
    if e is not None:  # json_end moves only for a reply that cannot parse, cut anywhere
        assert json_end(text) == e or (parse_json_object(text[:json_end(text)]) is None
                                       and parse_json_object(text[:k][:e]) is None)


# ---- the setting ----------------------------------------------------------------------------------

def test_answer_end_setting_is_validated_and_defaults_from_the_metrics(tmp_path):
    assert EvalTaskSection(name="t", kind="generation", path="x").answer_end == "auto"
    with pytest.raises(ValidationError, match=r"answer_end[\s\S]*unknown answer end 'jsn' \(did you mean 'json'\?\)"):
        EvalTaskSection(name="t", kind="generation", path="x", answer_end="jsn")
    with pytest.raises(ValidationError, match="answer_end=line applies to generation tasks"):
        EvalTaskSection(name="t", kind="multiple_choice", path="x", answer_end="line")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval:\n  tasks:\n  - {name: t, kind: generation, path: x, answer_end: lines}\n")
    with pytest.raises(ConfigError, match=r"eval\.tasks\.0\.answer_end.*did you mean 'line'"):
        load_config(str(cfg))
    assert resolve_answer_end("auto", ["json"]) == "json"
    assert resolve_answer_end("auto", ["exact_match", "accuracy"]) == "line"
    assert resolve_answer_end("auto", ["rouge_l"]) == "none"
    assert resolve_answer_end("none", ["json"]) == "none"
    assert set(METRIC_ANSWER_ENDS) <= set(METRICS) and set(METRIC_ANSWER_ENDS.values()) <= set(ANSWER_ENDS)


# ---- on a tiny model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def im():
    """A tiny random Llama nudged towards braces, quotes and line breaks, so its replies open and
    close objects and lines at different points (some rows end early, some never)."""
    tok = build_tokenizer()
    model = tiny_llama(len(tok), seed=3).eval()
    bias = torch.zeros(len(tok))
    for piece, b in [("{", 3.0), ("}", 3.0), ('"', 2.5), ("\u010a", 2.0), (":", 1.0)]:  # \u010a: "\n" byte-level
        bias[tok.convert_tokens_to_ids(piece)] = b
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    return InferenceModel(model, tok, "tiny-biased")


PROMPTS = [[{"role": "user", "content": f"Order {k}: {k} red mugs to Oslo, {'x ' * k}"}] for k in range(6)]
N = 32


def count_forward_rows(model) -> tuple[dict, object]:
    """Counts rows x forward passes (each pass decodes one token per row)."""
    count = {"rows": 0}

    def hook(module, args, kwargs):
        count["rows"] += kwargs["input_ids"].shape[0]

    return count, model.register_forward_pre_hook(hook, with_kwargs=True)


def generate_counted(im, **kwargs) -> tuple[list[str], GenerationStats, int]:
    stats = GenerationStats()
    count, handle = count_forward_rows(im.model)
    try:
        replies = generate(im, PROMPTS, max_new_tokens=N, batch_size=len(PROMPTS), stats=stats, **kwargs)
    finally:
        handle.remove()
    return replies, stats, count["rows"]


@pytest.fixture(scope="module")
def full(im):
    """(replies generated to N tokens, stats, forward rows, each row's tokens from one un-pruned
    model.generate per prompt: the reference for how many tokens a row needs)."""
    tok = im.tokenizer
    alone = []
    for conv in PROMPTS:
        ids = torch.tensor([prompt_ids(tok, conv)])
        out = im.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N,
                                do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        alone.append(out[0, ids.shape[1]:].tolist())
    return (*generate_counted(im), alone)


def tokens_needed(tok, new: list[int], end) -> int:
    """Tokens up to and with EOS, or up to the first one after which `end` finds the answer's end."""
    return next((i for i in range(1, len(new) + 1) if new[i - 1] == tok.eos_token_id
                 or (end is not None and end(tok.decode(new[:i], skip_special_tokens=True)) is not None)), len(new))


@pytest.mark.parametrize("name, end", [("json object", json_object_end), ("line", line_end), ("json", json_end)])
def test_early_stop_equals_generating_everything_then_cutting(im, full, name, end):
    full_replies, full_stats, full_rows, alone = full
    early, early_stats, early_rows = generate_counted(im, end_at=end)
    cut = [cut_answer(f, (), end).strip() for f in full_replies]
    ended = [end(f) is not None for f in full_replies]
    # the test means something: some rows end early, some do not (json: the prose rows all end at once)
    assert 0 < sum(ended) and (end is json_end or sum(ended) < len(full_replies))
    if end is json_end:  # a reply opening with prose ends at once: a shorter reply, equally unparsable
        for e, c, f in zip(early, cut, full_replies):
            assert e == c or (f.startswith(e) and parse_json_object(e) is None and parse_json_object(c) is None)
        assert any(e == c != f for e, c, f in zip(early, cut, full_replies))  # objects cut at their brace
    else:
        assert early == cut
    # rows left the batch at their end: fewer forward passes, as many as the stats say
    assert early_rows == early_stats.row_steps < full_rows == full_stats.row_steps
    assert early_stats.tokens == sum(tokens_needed(im.tokenizer, a, end) for a in alone) < full_stats.tokens
    assert full_stats.tokens == sum(tokens_needed(im.tokenizer, a, None) for a in alone)
    assert early_stats.rows == len(PROMPTS) and early_stats.seconds > 0


def test_task_scores_and_results_file_with_the_json_end(im, tmp_path):
    refs = [{"a": k} for k in range(len(PROMPTS))]
    rows = [{"messages": [*p, {"role": "assistant", "content": json.dumps(r)}]} for p, r in zip(PROMPTS, refs)]
    data = write_jsonl(tmp_path / "j.jsonl", rows)

    def task(name, answer_end):
        return EvalTaskSection(name=name, kind="generation", path=str(data), metrics=["json", "exact_match"],
                               max_new_tokens=N, batch_size=3, answer_end=answer_end)

    out = run_tasks(im, [task("early", "auto"), task("full", "none")], tmp_path / "eval")
    early, full = out["early"], out["full"]
    assert early.settings["answer_end"] == "json" and full.settings["answer_end"] == "none"
    # the scores of replies generated to the budget and cut at the answer's end
    cut = [cut_answer(r["prediction"], (), json_end).strip() for r in full.examples]
    expected = score(["json", "exact_match"], cut, [json.dumps(r) for r in refs], Context())
    assert early.metrics == expected.corpus
    assert [r["scores"] for r in early.examples] == [
        {m: v[k] for m, v in expected.per_example.items()} for k in range(len(refs))]
    saved = read_result(tmp_path / "eval" / "early.json")
    assert saved.speed == early.speed
    assert saved.speed["examples_per_s"] == pytest.approx(saved.n / saved.seconds)
    assert 0 < saved.speed["generated_tokens"] < full.speed["generated_tokens"]
    assert saved.speed["decode_row_steps"] < full.speed["decode_row_steps"]
    assert saved.speed["tokens_per_s"] == pytest.approx(saved.speed["generated_tokens"]
                                                        / saved.speed["generation_seconds"], rel=1e-3)


@pytest.mark.slow
def test_embedded_model_json_end_scores_equal_generating_to_the_budget(embedded_model):
    """The real base model on demo rows (prose, fenced and unfinished objects): the demo's scores
    with the json end equal those of replies generated to the budget and cut there, in fewer steps."""
    from tunesmith.demo.orders import FIELDS, make_splits
    from tunesmith.demo.run import answer_budget
    from tunesmith.eval.json_fields import json_metrics
    from tunesmith.generation import load_for_inference

    rows = make_splits(0, {"train": 240, "validation": 24, "test": 60})["test"][:8]
    im = load_for_inference(str(embedded_model.path))
    prompts = [r["messages"][:-1] for r in rows]
    refs = [json.loads(r["messages"][-1]["content"]) for r in rows]
    budget = answer_budget(im.tokenizer, refs)
    full_stats, early_stats = GenerationStats(), GenerationStats()
    full = generate(im, prompts, max_new_tokens=budget, batch_size=8, stats=full_stats)
    early = generate(im, prompts, max_new_tokens=budget, batch_size=8, end_at=json_end, stats=early_stats)
    cut = [cut_answer(f, (), json_end).strip() for f in full]
    assert json_metrics(early, refs, FIELDS) == json_metrics(cut, refs, FIELDS)
    assert all(f.startswith(e) for f, e in zip(full, early))
    assert early_stats.row_steps < full_stats.row_steps and early_stats.tokens < full_stats.tokens
