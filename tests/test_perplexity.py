import copy
import math

import pytest
import torch

from conftest import tiny_llama, write_jsonl
from tunesmith.config import EvalTaskSection
from tunesmith.data.tokenize import IGNORE, encode_example
from tunesmith.errors import ConfigError
from tunesmith.eval.perplexity import evaluate, windows
from tunesmith.eval.tasks import load_task_examples
from tunesmith.generation import InferenceModel

TEXT = ("Deliver to Lyon, attention Grace Mori: 3 scarves, pink. Overnight delivery please.\n"
        "Hello there. What is the capital of France? Paris is the capital.\n") * 3


@pytest.fixture(scope="module")
def im(tiny_tokenizer):
    return InferenceModel(tiny_llama(len(tiny_tokenizer), seed=5).eval(), tiny_tokenizer, "tiny")


@pytest.fixture(scope="module")
def model64(im):
    return copy.deepcopy(im.model).double()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def text_ids(tok):
    return [tok.eos_token_id] + tok(TEXT, add_special_tokens=False)["input_ids"]  # the tiny tokenizer adds no BOS


@torch.no_grad()
def nll64(model64, ids: list[int], first: int) -> float:
    """Summed NLL, computed in float64 from the full logits, of ids[first:] given everything before."""
    logp = torch.log_softmax(model64(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    return -sum(logp[t - 1, ids[t]].item() for t in range(first, len(ids)))


def task(path, **kw):
    return EvalTaskSection(name="ppl", kind="perplexity", path=str(path), **kw)


def test_single_window_matches_a_float64_reference(im, model64, text_file):
    ids = text_ids(im.tokenizer)
    assert 100 < len(ids) < 512
    res = evaluate(im, task(text_file))  # default window: the model's 512 positions, so one pass
    ref = nll64(model64, ids, 1)
    assert res.settings["windows"] == 1
    assert res.metrics["tokens"] == len(ids) - 1  # every text token predicted, the start token is context
    assert res.metrics["nll"] == pytest.approx(ref / (len(ids) - 1), rel=1e-6)
    assert res.metrics["perplexity"] == pytest.approx(math.exp(ref / (len(ids) - 1)), rel=1e-6)
    assert res.metrics["bits_per_byte"] == pytest.approx(ref / math.log(2) / len(TEXT.encode()), rel=1e-6)
    assert res.primary == "perplexity" and res.kind == "perplexity"
    # a window that just fits is still the single pass
    exact = evaluate(im, task(text_file, max_length=len(ids), stride=7))
    assert exact.settings["windows"] == 1 and exact.metrics["nll"] == pytest.approx(res.metrics["nll"], rel=1e-9)


def test_windows_score_every_token_exactly_once():
    for n, length, stride in [(10, 4, 2), (11, 4, 3), (100, 16, 1), (5, 16, 8), (64, 9, 8)]:
        scored = [t for _, e, f in windows(n, length, stride) for t in range(f, e)]
        assert sorted(scored) == list(range(1, n))
        assert all(e - b <= length and b < f for b, e, f in windows(n, length, stride))
    with pytest.raises(ConfigError, match="stride"):
        windows(100, 16, 16)


def test_sliding_window_matches_a_float64_reference_per_window(im, model64, text_file):
    ids = text_ids(im.tokenizer)
    res = evaluate(im, task(text_file, max_length=32, stride=12, batch_size=4))
    spans = windows(len(ids), 32, 12)
    assert res.settings["windows"] == len(spans) > 5
    ref = sum(nll64(model64, ids[b:e], f - b) for b, e, f in spans)
    assert sum(r["tokens"] for r in res.examples) == res.metrics["tokens"] == len(ids) - 1
    assert res.metrics["nll"] == pytest.approx(ref / (len(ids) - 1), rel=1e-6)
    assert res.metrics["nll"] != pytest.approx(nll64(model64, ids, 1) / (len(ids) - 1), rel=1e-3)  # less context


def test_batch_size_does_not_change_the_result(im, text_file, order_data):
    for path, kw in ((text_file, {"max_length": 24, "stride": 10}), (order_data["validation"], {})):
        one, many = (evaluate(im, task(path, batch_size=b, **kw)) for b in (1, 3))
        assert one.metrics["tokens"] == many.metrics["tokens"]
        assert many.metrics["perplexity"] == pytest.approx(one.metrics["perplexity"], rel=1e-6)


def test_data_split_scores_exactly_the_trained_tokens(im, model64, order_data):
    t = task(order_data["validation"], batch_size=3)
    res = evaluate(im, t)
    examples = load_task_examples(t)
    total = tokens = 0
    for ex in examples:
        enc = encode_example(im.tokenizer, ex, 512)
        lab = enc.labels
        trained = [k for k in range(1, len(lab)) if lab[k] != IGNORE]
        assert trained and all(lab[k] == enc.input_ids[k] for k in trained)
        logp = torch.log_softmax(model64(input_ids=torch.tensor([enc.input_ids])).logits[0], -1)
        total -= sum(logp[k - 1, enc.input_ids[k]].item() for k in trained)
        tokens += len(trained)
    assert res.metrics["tokens"] == tokens == sum(e.trained_tokens for e in
                                                  (encode_example(im.tokenizer, x, 512) for x in examples))
    assert res.metrics["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-6)
    assert "bits_per_byte" not in res.metrics
    assert [r["id"] for r in res.examples] == list(range(len(examples)))
    weighted = sum(r["nll"] * r["tokens"] for r in res.examples) / sum(r["tokens"] for r in res.examples)
    assert weighted == pytest.approx(res.metrics["nll"], rel=1e-9)


def test_limit_and_sample_pick_records(im, tmp_path):
    from tunesmith.demo.orders import make_splits

    path = write_jsonl(tmp_path / "d.jsonl", make_splits(4, {"train": 12})["train"])
    assert [r["id"] for r in evaluate(im, task(path, limit=3)).examples] == [0, 1, 2]
    a, again = ([r["id"] for r in evaluate(im, task(path, sample=4, seed=1)).examples] for _ in range(2))
    assert len(a) == 4 and a == sorted(a) and a == again
    assert a != [r["id"] for r in evaluate(im, task(path, sample=4, seed=2)).examples]
