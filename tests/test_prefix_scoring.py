"""Shared-prefix scoring (eval/block_scoring.py: one row per question behind a block mask, the default;
eval/prefix_scoring.py: continuations over copied KV-cache rows, its fallback): the same log-likelihoods
as the per-choice path (which test_multiple_choice checks against float64 and lm-eval), for every
multiple-choice shape, 0-shot and k-shot, with fewer tokens fed; models that cannot take the block
mask fall back to the cache, models whose cache cannot be reused to the per-choice path."""
import logging
import random
import time

import pytest
import torch

from conftest import SHARED_DATA, tiny_llama
from tunesmith.eval import multiple_choice as mc
from tunesmith.eval import block_scoring, prefix_scoring
from tunesmith.eval.mc_formats import MCItem, load_items

WORDS = ("red blue green lyon paris river stone apple winter summer garden train letter window chair "
         "music bread coffee market bridge").split()


def arc_items(n: int, seed: int = 0) -> list[MCItem]:
    """Short questions, 4-5 short choices (some one token, some several)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        q = f"Which {rng.choice(WORDS)} is next to the {rng.choice(WORDS)} {rng.choice(WORDS)}?"
        k = 4 + i % 2
        choices = [" ".join(rng.sample(WORDS, 1 + j % 3)) for j in range(k)]
        items.append(MCItem(i, q, f"Question: {q}\nAnswer:", choices, i % k, list("ABCDE"[:k])))
    return items


def hellaswag_items(n: int, seed: int = 1) -> list[MCItem]:
    """A long context ending mid-sentence, 4 long endings of different lengths."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        ctx = "Gardening: " + " ".join(rng.choices(WORDS, k=10 + 3 * (i % 3))) + ". Then"
        endings = [", " + " ".join(rng.choices(WORDS, k=4 + 3 * j)) + "." for j in range(4)]
        items.append(MCItem(i, ctx, ctx, endings, i % 4, list("0123")))
    return items


def two_choice_items(n: int, seed: int = 2) -> list[MCItem]:
    rng = random.Random(seed)
    return [MCItem(i, q, f"{q}\nAnswer:", [rng.choice(WORDS), " ".join(rng.sample(WORDS, 3))], i % 2, ["A", "B"])
            for i, q in enumerate(f"Is the {rng.choice(WORDS)} {rng.choice(WORDS)}?" for _ in range(n))]


SHAPES = {"arc": arc_items, "hellaswag": hellaswag_items, "two_choice": two_choice_items}


def contexts_for(items: list[MCItem], shots: str) -> list[str]:
    if shots == "0":
        return [mc.build_context(it, []) for it in items]
    if shots == "same":  # one shots block for the whole task: the shared head is reused
        block = items[:3]
        return [mc.build_context(it, block) for it in items]
    return [mc.build_context(it, mc.draw_shots(it, items, 3, seed=7)) for it in items]  # per question, as evaluate


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    return tiny_llama(len(tiny_tokenizer), seed=5).eval()


def fed_tokens(model, fn):
    """fn()'s result and the number of token positions (padding included) the model embedded."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        return fn(), sum(seen)
    finally:
        hook.remove()


def lls(rows):
    return [ll for r in rows for ll in r["loglikelihoods"]]


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("shots", ["0", "same", "drawn"])
def test_shared_prefix_equals_per_choice(tiny, tiny_tokenizer, shape, shots):
    items = SHAPES[shape](9)
    contexts = contexts_for(items, shots)
    longest = max(len(tiny_tokenizer.encode(c + " " + x)) for c, it in zip(contexts, items) for x in it.choices)
    assert longest <= tiny.config.max_position_embeddings  # none truncated: all go through the cache
    old, old_tokens = fed_tokens(tiny, lambda: mc.score_items(tiny, tiny_tokenizer, items, contexts, 4,
                                                               shared_prefix=False))
    new, new_tokens = fed_tokens(tiny, lambda: mc.score_items(tiny, tiny_tokenizer, items, contexts, 4))
    assert max(abs(a - b) for a, b in zip(lls(old), lls(new))) < 1e-4
    assert [r["prediction"] for r in old] == [r["prediction"] for r in new]
    # the KV-cache fallback, on the same requests
    encoded = [mc.encode_pair(tiny_tokenizer, c, " " + x) for c, it in zip(contexts, items) for x in it.choices]
    cached = prefix_scoring.score_grouped(tiny, encoded, list(range(len(encoded))), 0, 4)
    assert max(abs(cached[i] - a) for i, a in enumerate(lls(old))) < 1e-4
    assert len({round(x, 3) for x in lls(old)}) > len(lls(old)) // 2  # distinct values: a real comparison
    assert new_tokens < old_tokens
    if shots == "same":  # the shots block is encoded once for the task, not once per choice
        assert 3 * new_tokens < old_tokens


def test_batch_size_and_mixed_lengths_do_not_change_scores(tiny, tiny_tokenizer):
    """Rows of different context lengths share a batch: the padding inside the cache is masked."""
    requests = [(mc.build_context(it, []), " " + c) for it in arc_items(5) + hellaswag_items(3) for c in it.choices]
    requests += [("", " Hello there"), ("Deliver to Lyon, attention ", "Grace Mori")]
    reference = mc.score_requests(tiny, tiny_tokenizer, requests, 16, shared_prefix=False)
    for batch_size in (1, 3, 64):
        got = mc.score_requests(tiny, tiny_tokenizer, requests, batch_size)
        assert max(abs(a - b) for a, b in zip(got, reference)) < 1e-4


def test_one_token_choices_share_one_row(tiny, tiny_tokenizer):
    """After the cached context, one-token choices of a question are all predicted by one row of one token."""
    texts = sorted({tiny_tokenizer.decode([t]) for t in range(len(tiny_tokenizer))})
    words = [w for w in texts if w[:1] == " " and w[1:].isalpha() and len(tiny_tokenizer.encode(w)) == 1][:4]
    requests = [("Deliver to Lyon, attention Grace Mori: 3 scarves,", w) for w in words]
    ctx, _ = mc.encode_pair(tiny_tokenizer, *requests[0])
    got, tokens = fed_tokens(tiny, lambda: mc.score_requests(tiny, tiny_tokenizer, requests))
    _, probes = fed_tokens(tiny, lambda: (prefix_scoring.unsupported(tiny), block_scoring.unsupported(tiny)))
    assert tokens == probes + len(ctx)  # the context's row, no segment: all predicted by its last position
    assert got == pytest.approx(mc.score_requests(tiny, tiny_tokenizer, requests, shared_prefix=False), abs=1e-4)


def test_truncated_pairs_keep_the_per_choice_cut(tiny, tiny_tokenizer):
    long = ("Hello there. " * 200, " Paris")
    requests = [long, ("Question: Where?\nAnswer:", " Paris"), ("Question: Where?\nAnswer:", " Lyon")]
    assert mc.score_requests(tiny, tiny_tokenizer, requests) == pytest.approx(
        mc.score_requests(tiny, tiny_tokenizer, requests, shared_prefix=False), abs=1e-4)


def test_lora_model_uses_the_cache_and_agrees(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(len(tiny_tokenizer), seed=6),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    items = arc_items(4)
    contexts = contexts_for(items, "same")
    assert prefix_scoring.unsupported(model) is None
    old = lls(mc.score_items(model, tiny_tokenizer, items, contexts, shared_prefix=False))
    assert lls(mc.score_items(model, tiny_tokenizer, items, contexts)) == pytest.approx(old, abs=1e-4)


def test_prompt_tuning_falls_back_with_a_reason(tiny_tokenizer, caplog):
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(tiny_llama(len(tiny_tokenizer), seed=7),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    assert "prompt-learning adapter" in prefix_scoring.unsupported(model)
    requests = [("Question: Where?\nAnswer:", " Paris"), ("Question: Where?\nAnswer:", " Lyon")]
    with caplog.at_level(logging.INFO, logger="tunesmith.eval"):
        got = mc.score_requests(model, tiny_tokenizer, requests)
    assert "cannot be reused (a prompt-learning adapter" in caplog.text
    assert got == mc.score_requests(model, tiny_tokenizer, requests, shared_prefix=False)


def test_sliding_window_cache_falls_back(tiny_tokenizer):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, sliding_window=8, max_position_embeddings=128)).eval()
    assert "DynamicSlidingWindowLayer" in prefix_scoring.unsupported(model)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "arc" / "ARC-Easy-test.jsonl").is_file()
                    or not (SHARED_DATA / "hellaswag-val" / "hellaswag_val_full.txt.bz2").is_file(),
                    reason="shared ARC / HellaSwag data absent")
def test_embedded_model_shared_prefix_equals_per_choice(embedded_model):
    """>= 50 real items (ARC 0- and 5-shot, HellaSwag 0- and 2-shot, two-choice) on SmolLM2, fp32."""
    from tunesmith.generation import load_for_inference

    im = load_for_inference(str(embedded_model.path))
    model, tok = im.model.float().eval(), im.tokenizer
    assert prefix_scoring.unsupported(model) is None
    arc, _ = load_items(SHARED_DATA / "arc" / "ARC-Easy-test.jsonl")
    hs, _ = load_items(SHARED_DATA / "hellaswag-val" / "hellaswag_val_full.txt.bz2")
    two = [MCItem(it.id, it.question, it.text, [it.choices[it.gold], it.choices[(it.gold + 1) % len(it.choices)]],
                  0, ["A", "B"]) for it in arc[40:50]]
    cases = {"arc 0-shot": (arc[:20], 0, arc), "arc 5-shot": (arc[20:28], 5, arc), "hellaswag 0-shot": (hs[:10], 0, hs),
             "hellaswag 2-shot": (hs[10:14], 2, hs), "two-choice 0-shot": (two, 0, two)}
    worst, n = 0.0, 0
    for name, (items, k, pool) in cases.items():
        contexts = [mc.build_context(it, mc.draw_shots(it, pool, k, seed=1)) for it in items]
        t0 = time.perf_counter()
        old = mc.score_items(model, tok, items, contexts, 16, shared_prefix=False)
        t1 = time.perf_counter()
        new = mc.score_items(model, tok, items, contexts, 16)
        t2 = time.perf_counter()
        diff = max(abs(a - b) for a, b in zip(lls(old), lls(new)))
        print(f"{name}: {len(items)} items, largest difference {diff:.2e}, per-choice {t1 - t0:.1f}s, "
              f"shared prefix {t2 - t1:.1f}s")
        assert [r["prediction"] for r in old] == [r["prediction"] for r in new]
        worst, n = max(worst, diff), n + len(items)
    assert n >= 50 and worst < 1e-4


def test_evaluate_records_the_scoring_and_the_switch_keeps_results(tiny, tiny_tokenizer, tmp_path):
    from conftest import write_jsonl
    from tunesmith.config import EvalTaskSection
    from tunesmith.generation import InferenceModel

    rows = [{"question": it.question, "choices": {"text": it.choices, "label": it.labels}, "answerKey": it.labels[it.gold]}
            for it in arc_items(6)]
    path = write_jsonl(tmp_path / "arc.jsonl", rows)
    im = InferenceModel(tiny, tiny_tokenizer, "tiny")
    results = {on: mc.evaluate(im, EvalTaskSection(name="arc", kind="multiple_choice", path=str(path), shots=2,
                                                   batch_size=4, shared_prefix=on)) for on in (True, False)}
    assert results[True].settings["scoring"] == "shared prefix, one row per question (block attention mask)"
    assert results[False].settings["scoring"] == "per choice (shared_prefix off)"
    assert results[True].metrics == results[False].metrics
    assert lls(results[True].examples) == pytest.approx(lls(results[False].examples), abs=1e-4)


# --- the one-row block layout ------------------------------------------------------------------

def test_pack_fills_rows_first_fit_within_the_first_question_width():
    lengths = [40, 33, 20, 18, 15, 9, 7, 5, 5, 2]
    batches = block_scoring._pack(lengths, 2, row_tokens=30)
    placed = sorted(q for rows in batches for row in rows for q in row)
    assert placed == list(range(len(lengths)))  # each question once
    for rows in batches:
        width = lengths[rows[0][0]]  # the batch's first question is its longest
        assert all(sum(lengths[q] for q in row) <= width for row in rows)
        assert len(rows) <= max(2, 2 * 30 // width)
    assert batches[0][0] == [0] and batches[0][1][0] == 1  # 40 wide: 2 rows; 33 does not fit beside 40
    assert any(len(row) > 1 for rows in batches for row in rows)  # short questions share rows
    for rows in batches:  # a question alone in its row fills at least 3/4 of the batch's width
        assert all(4 * lengths[row[0]] >= 3 * lengths[rows[0][0]] for row in rows)


def test_block_layout_on_eager_attention_and_mixed_rows(tiny_tokenizer):
    """eager attention adds the float mask as sdpa does; contexts of every length, one-token and
    repeated choices, several questions packed into a row, a shared head in the cache."""
    from conftest import tiny_llama as build

    model = build(len(tiny_tokenizer), seed=8)
    model.config._attn_implementation = "eager"
    model.eval()
    assert block_scoring.unsupported(model) is None
    requests = [(mc.build_context(it, items[:k]), " " + c) for items, k in ((arc_items(7), 0), (hellaswag_items(4), 2))
                for it in items for c in it.choices + it.choices[:1]]
    requests += [(f"Q{n}: where?", x) for n in range(3) for x in (" Lyon", " Paris river")]  # fit any leftover room
    encoded = [mc.encode_pair(tiny_tokenizer, c, x) for c, x in requests]
    idx = list(range(len(encoded)))
    reference = mc._score_rows(model, encoded, idx, 512, 0, 8)
    fed = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: fed.append(args[0].shape))
    got = block_scoring.score_blocks(model, encoded, idx, 0, 3)
    hook.remove()
    assert max(abs(got[i] - reference[i]) for i in idx) < 1e-4
    assert sum(shape[0] for shape in fed) < len({tuple(e[0]) for e in encoded})  # short questions share rows


def test_a_model_ignoring_the_block_mask_falls_back_to_the_cache_with_a_reason(tiny, tiny_tokenizer, caplog):
    """A forward that drops the 4D mask and position ids would score every segment as if it followed
    the other segments: the probe catches it, the KV-cache path scores, results record why."""

    class MaskBlind(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
            if attention_mask is not None and attention_mask.dim() == 4:
                attention_mask = position_ids = None
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

    blind = MaskBlind(tiny)
    assert "does not honour a custom 4D attention mask" in block_scoring.unsupported(blind)
    assert "not one row per question: a probe row" in mc.scoring_mode(blind, True)
    items = arc_items(4)
    contexts = contexts_for(items, "0")
    with caplog.at_level(logging.INFO, logger="tunesmith.eval"):
        got = lls(mc.score_items(blind, tiny_tokenizer, items, contexts))
    assert "copied KV-cache rows, not one row per question: a probe row" in caplog.text
    assert got == pytest.approx(lls(mc.score_items(tiny, tiny_tokenizer, items, contexts, shared_prefix=False)),
                                abs=1e-4)


def test_attention_without_custom_masks_is_reported():
    class Flash(torch.nn.Module):
        config = type("Config", (), {"_attn_implementation": "flash_attention_2"})()

    assert "'flash_attention_2' takes no custom 4D mask" in block_scoring.unsupported(Flash())


def test_a_model_without_a_reachable_head_scores_from_full_logits(tiny, tiny_tokenizer):
    """No get_output_embeddings(): the head-gathering hook cannot be set, full logits are indexed instead."""

    class NoHead(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    encoded = [mc.encode_pair(tiny_tokenizer, mc.build_context(it, []), " " + c)
               for it in arc_items(3) for c in it.choices]
    idx = list(range(len(encoded)))
    got = block_scoring.score_blocks(NoHead(tiny), encoded, idx, 0, 4)
    want = block_scoring.score_blocks(tiny, encoded, idx, 0, 4)
    assert max(abs(got[i] - want[i]) for i in idx) < 1e-5
