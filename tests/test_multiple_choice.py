"""Multiple choice by log-likelihood: loaders, lm-eval prompt parity, scoring against float64 and lm-eval."""
import bz2
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import SHARED_DATA, tiny_llama, write_jsonl
from tunesmith.config import EvalTaskSection
from tunesmith.errors import DataError
from tunesmith.eval import multiple_choice as mc
from tunesmith.eval.mc_formats import MCItem, load_items
from tunesmith.generation import InferenceModel

ARC = SHARED_DATA / "arc" / "ARC-Easy-test.jsonl"
HELLASWAG_TXT = SHARED_DATA / "hellaswag-val" / "hellaswag_val_full.txt.bz2"
needs_arc = pytest.mark.skipif(not ARC.is_file(), reason="shared ARC data absent")
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed")


def lm_eval_tasks() -> Path:
    """lm-eval's bundled task folder: its own prompt templates."""
    return Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks"


def arc_row(q, texts, answer, labels="ABCD", **extra):
    return {"question": q, "choices": {"text": texts, "label": list(labels[:len(texts)])}, "answerKey": answer, **extra}


HELLASWAG_DOCS = [  # shaped as Rowan/hellaswag rows, with the WikiHow markers lm-eval strips
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering "
     "the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then",
     "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift.",
                 ", the man puts on a christmas coat, knitted with netting.",
                 ", the man continues removing the snow on his car."], "label": "3"},
    {"ind": 9, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow a lemon tree [title] Pick a "
     "sunny  spot. [step] Lemon trees need sun.", "ctx_b": "", "endings": [
        "[substeps] Water it daily.", "Plant it in  shade.", "Buy a lemon.", "[title] Prune it."], "label": "0"},
]


# --- loaders ----------------------------------------------------------------------------------

def test_arc_loader_numeric_labels_and_bad_rows(tmp_path):
    good = write_jsonl(tmp_path / "arc.jsonl", [arc_row("Q1?", ["a", "b", "c"], "B", id="x1"),
                                                arc_row("Q2?", ["w", "x", "y", "z"], "3", labels="1234")])
    items, fmt = load_items(good)
    assert fmt == "arc" and [i.gold for i in items] == [1, 2] and items[1].labels == ["1", "2", "3", "4"]
    assert items[0].id == "x1" and items[1].id == 1 and items[0].text == "Question: Q1?\nAnswer:"
    bad = write_jsonl(tmp_path / "bad.jsonl", [arc_row("Q1?", ["a", "b"], "A"), arc_row("Q2?", ["a", "b"], "E")])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: answerKey 'E' is not one of"):
        load_items(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(arc_row("Q?", ["a", "b"], "A")) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:2: malformed JSON"):
        load_items(broken)
    with pytest.raises(DataError, match=r"nochoice\.jsonl:1: .*'question'"):
        load_items(write_jsonl(tmp_path / "nochoice.jsonl", [{"choices": {"text": [], "label": []}, "answerKey": "A"}]),
                   "arc")


@needs_lm_eval
def test_hellaswag_jsonl_matches_lm_eval_process_docs(tmp_path):
    import datasets
    from lm_eval.tasks.hellaswag import utils as hs

    items, fmt = load_items(write_jsonl(tmp_path / "hs.jsonl", HELLASWAG_DOCS))
    theirs = hs.process_docs(datasets.Dataset.from_list(HELLASWAG_DOCS))
    assert fmt == "hellaswag"
    for item, doc in zip(items, theirs):
        assert (item.text, item.choices, item.gold) == (doc["query"], doc["choices"], doc["gold"])
    assert items[0].text.endswith("smiles. Then") and "[" not in items[1].text + "".join(items[1].choices)
    with pytest.raises(DataError, match=r"bad\.jsonl:1: answer 7 is not a choice index 0-3"):
        load_items(write_jsonl(tmp_path / "bad.jsonl", [{**HELLASWAG_DOCS[0], "label": 7}]))


@pytest.mark.skipif(not HELLASWAG_TXT.is_file(), reason="shared HellaSwag data absent")
def test_hellaswag_text_file_layout():
    items, fmt = load_items(HELLASWAG_TXT)
    with bz2.open(HELLASWAG_TXT, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert fmt == "hellaswag" and len(items) == 10042 == len(lines) // 6
    first = items[0]
    # lm-eval capitalises ctx_b ("he" -> "He"); the file keeps it lower case
    assert first.text == "Roof shingle removal: A man is sitting on a roof. He" and lines[0].endswith("roof. he")
    assert first.gold == 3 and first.choices == lines[2:6]
    assert all(it.gold == int(lines[6 * k + 1]) for k, it in enumerate(items))


def test_hellaswag_text_bad_layout(tmp_path):
    (tmp_path / "h.txt").write_text("Ctx: a b\n3\ne1\ne2\ne3\ne4\nCtx: c\nx\ne1\ne2\ne3\ne4\n")
    with pytest.raises(DataError, match=r"h\.txt:8: expected the gold ending 0-3, got 'x'"):
        load_items(tmp_path / "h.txt")
    (tmp_path / "short.txt").write_text("Ctx: a b\n3\ne1\ne2\ne3\n")
    with pytest.raises(DataError, match="6 lines per item.*has 5 lines"):
        load_items(tmp_path / "short.txt")


def _mmlu_template() -> tuple[str, list[str]]:
    cfg = yaml.safe_load((lm_eval_tasks() / "mmlu" / "default" / "_default_template_yaml").read_text())
    return cfg["doc_to_text"], cfg["doc_to_choice"]


@needs_lm_eval
@pytest.mark.parametrize("header", [True, False])
def test_mmlu_csv_prompt_equals_lm_eval_template(tmp_path, header):
    from lm_eval.utils import apply_template

    rows = ['" What is 2+2? ",3,4,5,"22",B', 'Pick the prime,4,6,7,9,C']
    path = tmp_path / "high_school_mathematics_test.csv"
    path.write_text(("question,A,B,C,D,answer\n" if header else "") + "\n".join(rows) + "\n")
    items, fmt = load_items(path)
    template, choices = _mmlu_template()
    doc = {"question": " What is 2+2? ", "choices": ["3", "4", "5", "22"]}
    assert fmt == "mmlu" and [i.gold for i in items] == [1, 2]
    assert items[0].text == apply_template(template, doc) and items[0].choices == choices
    assert items[0].description == "The following are multiple choice questions (with answers) about high school " \
                                   "mathematics.\n\n"
    bad = tmp_path / "x_test.csv"
    bad.write_text(rows[0] + "\nonly,four,fields,here\n")
    with pytest.raises(DataError, match=r"x_test\.csv:2: the CSV's rows have 6 fields"):
        load_items(bad)
    wrong = tmp_path / "y_test.csv"
    wrong.write_text(rows[0].replace(",B", ",F") + "\n")
    with pytest.raises(DataError, match=r"y_test\.csv:1: answer 'F'"):
        load_items(wrong)


def test_generic_choices_jsonl_answer_forms(tmp_path):
    rows = [{"question": "q0", "choices": ["x", "y", "z"], "answer": 2},
            {"question": "q1", "choices": ["x", "y", "z"], "answer": "b"},
            {"question": "q2", "choices": ["x", "y", "z"], "answer": "x"},
            {"prompt": "q3", "options": ["x", "y"], "answer": "1"}]
    columns = {"question": "prompt", "choices": "options"}
    items, fmt = load_items(write_jsonl(tmp_path / "g.jsonl", rows), columns=columns)
    assert fmt == "choices" and [i.gold for i in items] == [2, 1, 0, 1]
    assert items[3].text == "Question: q3\nAnswer:"
    with pytest.raises(DataError, match=r"bad\.jsonl:1: answer 5 is not a choice index 0-2"):
        load_items(write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b", "c"], "answer": 5}]))
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [rows[0], arc_row("Q", ["a", "b"], "A")])
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: a arc record in a file whose first record is choices"):
        load_items(mixed)


QUESTIONS = [("What is 2+2?", ["3", "4", "5", "22"], 1), ("Pick the prime, please", ["4", "6", "7", "9"], 2),
             ("Which is a colour?", ["red", "run", "rock", "rain"], 0)]


def _mc_shapes(tmp_path) -> dict[str, Path]:
    """The same three questions in each shape people have."""
    def csv_line(cells):
        return ",".join('"' + c.replace('"', '""') + '"' if "," in c else c for c in cells) + "\n"

    letters = [[q, *c, "ABCD"[g]] for q, c, g in QUESTIONS]
    shapes = {
        "letters": csv_line(["question", "A", "B", "C", "D", "answer"]) + "".join(map(csv_line, letters)),
        "index": csv_line(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
        + "".join(csv_line([q, *c, str(g)]) for q, c, g in QUESTIONS),
        "hendrycks": "".join(map(csv_line, letters)),
    }
    paths = {}
    for name, text in shapes.items():
        paths[name] = tmp_path / f"{name}.csv"
        paths[name].write_text(text, encoding="utf-8")
    answers = [1, "c", "red"]  # index, letter (any case), a choice's text
    paths["jsonl"] = write_jsonl(tmp_path / "mc.jsonl", [{"question": q, "choices": c, "answer": a}
                                                         for (q, c, _), a in zip(QUESTIONS, answers)])
    return paths


@pytest.mark.parametrize("fmt", ["mmlu", "choices"])
def test_every_multiple_choice_shape_parses_to_the_same_items(tmp_path, fmt):
    parsed = {name: load_items(path, fmt) for name, path in _mc_shapes(tmp_path).items()}
    assert {kind for _, kind in parsed.values()} == {fmt}
    strip = [[{**vars(i), "where": ""} for i in items] for items, _ in parsed.values()]
    assert all(s == strip[0] for s in strip), parsed
    items = parsed["index"][0]
    assert [i.gold for i in items] == [g for _, _, g in QUESTIONS]
    assert [i.question for i in items] == [q for q, _, _ in QUESTIONS]
    if fmt == "choices":
        assert [i.choices for i in items] == [c for _, c, _ in QUESTIONS]
    else:
        assert items[1].text == "Pick the prime, please\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer:"
    assert parsed["letters"][0][0].where.endswith("letters.csv:2") and parsed["hendrycks"][0][0].where.endswith(":1")


def test_csv_choice_columns_of_any_count_and_mapped_question(tmp_path):
    path = tmp_path / "five.csv"
    path.write_text("prompt,choice0,choice1,choice2,choice3,choice4,answer\nq,a,b,c,d,e,4\n")
    items, fmt = load_items(path, columns={"question": "prompt"})
    assert fmt == "mmlu" and items[0].gold == 4 and items[0].choices == list("ABCDE")


@pytest.mark.parametrize("header", ["prompt,opt1,opt2,opt3,opt4,label",           # nothing known
                                    "question,choice1,choice2,choice3,choice4,answer",  # 1-based: ambiguous
                                    "question,A,B,C,D"])                              # no answer column
def test_unrecognised_csv_header_names_it_and_the_shapes_accepted(tmp_path, header):
    path = tmp_path / "odd.csv"
    path.write_text(header + "\n" + "q,w,x,y,z,1\n")
    with pytest.raises(DataError) as err:
        load_items(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:1: unrecognised multiple-choice CSV header {header!r}")
    assert "question,A,B,C,D,answer" in msg and "question,choice0,...,choiceN,answer" in msg and "no header" in msg
    with pytest.raises(DataError, match=r"not as arc"):
        load_items(path, "arc")


@needs_lm_eval
@needs_arc
def test_arc_prompts_equal_lm_eval_arc_easy_templates():
    from lm_eval.utils import apply_template

    cfg = yaml.safe_load((lm_eval_tasks() / "arc" / "arc_easy.yaml").read_text())
    docs = [json.loads(line) for line in ARC.read_text().splitlines()]
    numeric = [i for i, d in enumerate(docs) if d["choices"]["label"][0] == "1"][:3]
    items, _ = load_items(ARC)
    for i in [0, 1, 2, 500, *numeric]:
        doc, item = docs[i], items[i]
        assert item.text == apply_template(cfg["doc_to_text"], doc)
        assert item.gold == int(apply_template(cfg["doc_to_target"], doc))
        assert str(item.choices) == apply_template(cfg["doc_to_choice"], doc)
    assert numeric, "the file has items labelled 1-4"


# --- prompts with shots -----------------------------------------------------------------------

def test_shots_never_hold_the_question_and_follow_lm_eval_layout(tmp_path):
    rows = [arc_row(f"Question number {i}?", ["red", "blue"], "AB"[i % 2]) for i in range(6)]
    rows.append(arc_row("Question number 0?", ["red", "blue"], "A"))  # a duplicate of row 0
    items, _ = load_items(write_jsonl(tmp_path / "a.jsonl", rows))
    for item in items:
        for seed in range(5):
            shots = mc.draw_shots(item, items, 3, seed)
            ctx = mc.build_context(item, shots)
            assert len(shots) == 3 and item.question not in ctx[: -len(item.text)]
            assert ctx == "".join(f"{s.text} {s.choices[s.gold]}\n\n" for s in shots) + item.text
    draws = {tuple(s.question for s in mc.draw_shots(items[1], items, 3, seed)) for seed in range(8)}
    assert len(draws) > 1 and mc.draw_shots(items[1], items, 3, 4) == mc.draw_shots(items[1], items, 3, 4)
    with pytest.raises(DataError, match="6 shots asked for but only 5 other questions"):
        mc.draw_shots(items[0], items, 6, 0)


def test_mmlu_description_comes_once_before_shots(tmp_path):
    path = tmp_path / "anatomy_test.csv"
    path.write_text("Q1,a,b,c,d,A\nQ2,a,b,c,d,B\nQ3,a,b,c,d,C\n")
    items, _ = load_items(path)
    ctx = mc.build_context(items[0], mc.draw_shots(items[0], items, 2, 0))
    assert ctx.startswith("The following are multiple choice questions (with answers) about anatomy.\n\nQ")
    assert ctx.count("The following") == 1 and ctx.count("\nAnswer:") == 3 and ctx.endswith(items[0].text)


# --- scoring ----------------------------------------------------------------------------------

REQUESTS = [("Question: What is the capital of France?\nAnswer:", " Paris"),
            ("Question: What is the capital of France?\nAnswer:", " Lyon is the capital"),
            ("Deliver to Lyon, attention ", "Grace Mori"),        # trailing space moves into the continuation
            ("Hello there.", " What is the capital of France? Paris is the capital. " * 3),
            ("", "Hello there")]                                   # empty context: the prefix token conditions


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    return tiny_llama(len(tiny_tokenizer), seed=5).eval()


def float64_reference(model, tok, context, continuation):
    """One unpadded sequence, whole logits, float64: sum of log p(continuation token)."""
    ctx, cont = mc.encode_pair(tok, context, continuation)
    ref = model.double()
    try:
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor([ctx + cont])).logits[0].double()
    finally:
        model.float()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_encode_pair_follows_lm_eval_split(tiny_tokenizer):
    tok = tiny_tokenizer
    ctx, cont = mc.encode_pair(tok, "Deliver to Lyon, attention ", "Grace")
    assert ctx == tok.encode("Deliver to Lyon, attention")
    assert ctx + cont == tok.encode("Deliver to Lyon, attention Grace")
    assert mc.encode_pair(tok, "", "Hello")[0] == [tok.bos_token_id]


@needs_lm_eval
def test_loglikelihoods_equal_float64_and_lm_eval_hflm(tiny, tiny_tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    ours = mc.score_requests(tiny, tiny_tokenizer, REQUESTS, batch_size=3)
    exact = [float64_reference(tiny, tiny_tokenizer, c, x) for c, x in REQUESTS]
    lm = HFLM(pretrained=tiny, tokenizer=tiny_tokenizer, batch_size=2)
    theirs = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)],
                                                disable_tqdm=True)]
    assert ours == pytest.approx(exact, abs=1e-4) and ours == pytest.approx(theirs, abs=1e-4)
    assert mc.score_requests(tiny, tiny_tokenizer, REQUESTS, batch_size=1) == pytest.approx(ours, abs=1e-5)
    assert len({round(x, 3) for x in ours}) == len(ours)  # distinct values: a real comparison


@needs_lm_eval
def test_loglikelihoods_of_a_lora_model_equal_lm_eval(tiny_tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(len(tiny_tokenizer), seed=6),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    ours = mc.score_requests(model, tiny_tokenizer, REQUESTS[:3])
    lm = HFLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=4)
    requests = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS[:3])]
    theirs = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    with model.disable_adapter():
        base = mc.score_requests(model, tiny_tokenizer, REQUESTS[:3])
    assert ours == pytest.approx(theirs, abs=1e-4) and ours != pytest.approx(base, abs=1e-3)


def test_one_token_choices_share_one_row(monkeypatch, tiny, tiny_tokenizer):
    """Per-choice path: choices that are one token each after the same context need one forward row, not four."""
    texts = sorted({tiny_tokenizer.decode([t]) for t in range(len(tiny_tokenizer))})
    words = [w for w in texts if w[:1] == " " and w[1:].isalpha() and len(tiny_tokenizer.encode(w)) == 1][:4]
    requests = [("Deliver to Lyon, attention Grace Mori: 3 scarves,", w) for w in words]
    rows, real = [], mc._forward_tail

    def counting(model, ids, keep):
        rows.append(ids.shape[0])
        return real(model, ids, keep)

    monkeypatch.setattr(mc, "_forward_tail", counting)
    scores = mc.score_requests(tiny, tiny_tokenizer, requests + REQUESTS[:2], shared_prefix=False)
    assert len(words) == 4 and sum(rows) == 3
    exact = [float64_reference(tiny, tiny_tokenizer, c, x) for c, x in requests + REQUESTS[:2]]
    assert scores == pytest.approx(exact, abs=1e-4) and len(set(scores)) == len(scores)


def test_truncation_keeps_the_right_end(tiny, tiny_tokenizer):
    """An input past the model's context loses tokens from the left, as lm-eval does."""
    context, cont = "Hello there. " * 200, " Paris"
    ctx, cont_ids = mc.encode_pair(tiny_tokenizer, context, cont)
    limit = tiny.config.max_position_embeddings
    assert len(ctx) + len(cont_ids) > limit + 1
    kept = (ctx + cont_ids)[-(limit + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(tiny(input_ids=torch.tensor([kept[:-1]])).logits[0].double(), -1)
    expected = sum(float(logp[len(kept) - 1 - len(cont_ids) + j, t]) for j, t in enumerate(cont_ids))
    assert mc.score_requests(tiny, tiny_tokenizer, [(context, cont)]) == pytest.approx([expected], abs=1e-4)


def test_acc_norm_divides_by_characters_and_acc_bytes_by_bytes():
    item = MCItem(0, "q", "Question: q\nAnswer:", ["ab", "abcdefgh"], 1, ["A", "B"])
    row = mc._row(item, [-10.0, -12.0])  # total prefers A; per character (-5 vs -1.5) prefers B
    assert (row["prediction"], row["score"], row["prediction_norm"], row["score_norm"]) == ("A", 0.0, "B", 1.0)
    accents = MCItem(1, "q", "t", ["éééé", "abcde"], 0, ["A", "B"])
    row = mc._row(accents, [-4.0, -4.5])  # per char -1 vs -0.9 (B); per byte -0.5 vs -0.9 (A)
    assert (row["score_norm"], row["score_bytes"]) == (0.0, 1.0)
    tie = mc._row(MCItem(2, "q", "t", ["x", "y"], 1, ["A", "B"]), [-1.0, -1.0])
    assert tie["prediction"] == "A"  # first of equal maxima, as numpy argmax


def test_select_limit_then_seeded_sample():
    items = [MCItem(i, f"q{i}", "t", ["a", "b"], 0, ["A", "B"]) for i in range(50)]
    assert [i.id for i in mc.select(items, 10, None, 0)] == list(range(10))
    sampled = mc.select(items, 30, 5, seed=1)
    assert len(sampled) == 5 and all(i.id < 30 for i in sampled) and sampled == mc.select(items, 30, 5, seed=1)
    assert [i.id for i in sampled] == sorted(i.id for i in sampled) and sampled != mc.select(items, 30, 5, seed=2)


def test_evaluate_rows_and_metrics(tmp_path, tiny, tiny_tokenizer):
    rows = [arc_row(f"Which colour is number {i}?", ["red", "dark blue", "green"], "ABC"[i % 3], id=f"q{i}")
            for i in range(7)]
    path = write_jsonl(tmp_path / "arc.jsonl", rows)
    task = EvalTaskSection(name="colours", kind="multiple_choice", path=str(path), limit=6, shots=2, seed=3,
                           batch_size=4)
    result = mc.evaluate(InferenceModel(tiny, tiny_tokenizer, "tiny"), task)
    assert result.kind == "multiple_choice" and result.primary == "acc" and result.n == 6
    assert [r["id"] for r in result.examples] == [f"q{i}" for i in range(6)]
    items, _ = load_items(path)
    for item, row in zip(items, result.examples):
        ctx = mc.build_context(item, mc.draw_shots(item, items, 2, 3))
        direct = [float64_reference(tiny, tiny_tokenizer, ctx, " " + c) for c in item.choices]
        assert row["loglikelihoods"] == pytest.approx(direct, abs=1e-4)
        assert row["reference"] == item.labels[item.gold] and row["input"] == item.question
    assert result.metrics["acc"] == sum(r["score"] for r in result.examples) / 6
    assert result.metrics["acc_norm"] == sum(r["score_norm"] for r in result.examples) / 6
    assert tiny.training is False
