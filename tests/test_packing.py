"""Packing: every packed example must compute exactly what it computes alone (tiny random Llama, fp32)."""
import json
import random
from collections import Counter

import pytest
import torch

from conftest import tiny_llama
from test_training import tiny_cfg
from tunesmith.data.batching import collate, trained_targets
from tunesmith.data.dataset import load_examples
from tunesmith.data.pack import best_fit_decreasing, collate_packed, pack_examples, pack_row
from tunesmith.data.tokenize import IGNORE, Encoded, encode_dataset, encode_text
from tunesmith.errors import ModelError
from tunesmith.models.load import check_packing_isolates
from tunesmith.recipes.sft import run_sft
from tunesmith.training.logging import read_metrics
from tunesmith.training.loop import evaluate_loss
from tunesmith.training.losses import reference_sft_loss, sft_loss_sum


@pytest.fixture
def encoded(tiny_tokenizer, order_data):
    return encode_dataset(tiny_tokenizer, load_examples(order_data["train"]).examples, 512)


def three_lengths(tokenizer) -> list[Encoded]:
    texts = ["Hello there.", "What is the capital of France? Paris is the capital of France, not Lyon.",
             "Order for Maria Lopez in Lisbon: 3 x mug, color red. Please use express shipping."]
    examples = [encode_text(tokenizer, t, 512) for t in texts]
    assert len({len(e.input_ids) for e in examples}) == 3
    return examples


def model_with(tokenizer, attn: str):
    model = tiny_llama(len(tokenizer)).eval()
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    return model


def logits_of(model, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}  # whatever collate produced
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def alone_logits(model, examples: list[Encoded]) -> torch.Tensor:
    return torch.cat([logits_of(model, {"input_ids": torch.tensor([e.input_ids])})[0] for e in examples])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(tiny_tokenizer, attn):
    model = model_with(tiny_tokenizer, attn)
    examples = three_lengths(tiny_tokenizer)
    batch = collate_packed([pack_row(examples)], tiny_tokenizer.pad_token_id)
    assert "attention_mask" not in batch
    packed = logits_of(model, batch)[0]
    alone = alone_logits(model, examples)
    assert (packed - alone).abs().max() < 1e-4
    # and the check can fail: the same row without restarting positions is a leak, and differs
    assert (logits_of(model, {"input_ids": batch["input_ids"]})[0] - alone).abs().max() > 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_multi_row_batch_equals_examples_alone(tiny_tokenizer, encoded, attn):
    model = model_with(tiny_tokenizer, attn)
    members = [encoded[:3], encoded[3:4], encoded[4:6]]  # the 2nd and 3rd rows get padding
    rows = [pack_row(m) for m in members]
    packed = logits_of(model, collate_packed(rows, tiny_tokenizer.pad_token_id))
    for i, (row, examples) in enumerate(zip(rows, members)):
        n = len(row.input_ids)
        assert n < packed.shape[1] or i == 0
        assert (packed[i, :n] - alone_logits(model, examples)).abs().max() < 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_changing_one_example_changes_no_logit_of_the_next(tiny_tokenizer, attn):
    model = model_with(tiny_tokenizer, attn)
    first, second, third = three_lengths(tiny_tokenizer)
    other = Encoded([(t * 7 + 11) % len(tiny_tokenizer) for t in first.input_ids], first.labels)
    n = len(first.input_ids)
    for positions in (True, False):
        before, after = (collate_packed([pack_row([a, second, third])], 0) for a in (first, other))
        if not positions:  # the leaking layout, to show this test can see a leak
            before.pop("position_ids"), after.pop("position_ids")
        a, b = logits_of(model, before)[0], logits_of(model, after)[0]
        assert (a[:n] - b[:n]).abs().max() > 1e-2  # the edit is visible where it happened
        leak = (a[n:] - b[n:]).abs().max()
        assert (leak < 1e-6) if positions else (leak > 1e-2)


def test_packed_loss_sum_and_count_equal_the_examples_alone(tiny_tokenizer, encoded):
    model = tiny_llama(len(tiny_tokenizer))
    assert model.config.use_cache  # a KV cache switches packed masking off: sft_loss_sum must not use one
    # raw text trains its first token too: only the boundary IGNORE keeps it from being a target
    examples = encoded[:7] + three_lengths(tiny_tokenizer)
    rows = pack_examples(examples, 512)
    assert len(rows) < 10 and any(len(r.lengths) >= 3 for r in rows)
    batch = collate(rows, tiny_tokenizer.pad_token_id)
    loss_sum, n = sft_loss_sum(model, batch)
    alone = [sft_loss_sum(model, collate([e], tiny_tokenizer.pad_token_id)) for e in examples]
    assert n == trained_targets(batch["labels"]) == sum(k for _, k in alone)
    torch.testing.assert_close(loss_sum, sum(s for s, _ in alone), rtol=1e-5, atol=0)
    # transformers' own loss (full logits, labels=...) on the packed batch agrees
    torch.testing.assert_close(loss_sum / n, reference_sft_loss(model, batch), rtol=1e-5, atol=1e-6)


def test_validation_loss_is_the_same_packed_or_not(tiny_tokenizer, encoded):
    model = tiny_llama(len(tiny_tokenizer))
    plain = evaluate_loss(model, encoded, sft_loss_sum, tiny_tokenizer.pad_token_id, 4)
    packed = evaluate_loss(model, pack_examples(encoded, 512), sft_loss_sum, tiny_tokenizer.pad_token_id, 2)
    assert packed == pytest.approx(plain, rel=1e-5)


def test_each_boundary_target_is_ignored_and_positions_restart(tiny_tokenizer, encoded):
    examples = [encoded[0], *three_lengths(tiny_tokenizer)]
    row = pack_row(examples)
    start = 0
    for example, n in zip(examples, row.lengths):
        assert row.position_ids[start:start + n] == list(range(n))
        assert row.labels[start] == IGNORE and row.labels[start + 1:start + n] == example.labels[1:]
        start += n
    assert start == len(row.input_ids)


def segments(rows) -> Counter:
    out = Counter()
    for row in rows:
        start = 0
        for n in row.lengths:
            out[(tuple(row.input_ids[start:start + n]), tuple(row.labels[start + 1:start + n]))] += 1
            start += n
    return out


def test_packing_is_deterministic_and_keeps_every_example_once(tiny_tokenizer):
    rng = random.Random(0)
    # many lengths, duplicates included, some that fill a row alone
    examples = [Encoded(ids := [rng.randrange(400) for _ in range(rng.choice([1, 2, 5, 40, 63, 64, 100, 128]))], ids)
                for _ in range(300)]
    examples += examples[:5]
    rows = pack_examples(examples, 128)
    assert rows == pack_examples(examples, 128)
    assert all(len(r.input_ids) <= 128 for r in rows)
    assert segments(rows) == Counter((tuple(e.input_ids), tuple(e.labels[1:])) for e in examples)
    tokens = sum(len(e.input_ids) for e in examples)
    assert sum(len(r.input_ids) for r in rows) == tokens
    assert len(rows) <= 11 / 9 * -(-tokens // 128) + 1  # first/best-fit-decreasing bound: rows are full


def test_bin_packing_partitions_indices_and_rejects_overlong():
    lengths = [5, 9, 3, 9, 1, 10, 7]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins) and len(bins) == 5
    with pytest.raises(ValueError, match="11 tokens"):
        best_fit_decreasing([3, 11], 10)


def test_check_refuses_a_model_that_ignores_position_ids(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    check_packing_isolates(model)
    decoder, forward = model.get_decoder(), model.get_decoder().forward
    decoder.forward = lambda position_ids=None, **kw: forward(**kw)
    with pytest.raises(ModelError, match="attend to each other"):
        check_packing_isolates(model)


def test_packed_run_trains_and_counts_the_same_tokens_per_epoch(tiny_model_dir, order_data, encoded, tmp_path):
    runs = {}
    for packing in (False, True):
        cfg = tiny_cfg(tiny_model_dir, order_data, tmp_path / str(packing), epochs=4, batch_size=4 - 2 * packing)
        cfg.data.packing = packing
        run = run_sft(cfg)
        runs[packing] = ([r for r in read_metrics(run / "metrics.jsonl") if "loss" in r],
                         json.loads((run / "manifest.json").read_text()))
    (plain, plain_manifest), (packed, manifest) = runs[False], runs[True]
    assert manifest["data"]["packing"] and manifest["data"]["train_sequences"] < manifest["data"]["train_examples"]
    assert len(packed) < len(plain)  # fewer, fuller steps
    losses = [r["loss"] for r in packed]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    # at the end of every epoch: the same targets and the same real (unpadded) tokens
    per_epoch = -(-manifest["data"]["train_sequences"] // 2)
    for epoch in range(1, 5):
        assert packed[epoch * per_epoch - 1]["trained_tokens"] == plain[epoch * 4 - 1]["trained_tokens"]
        assert packed[epoch * per_epoch - 1]["tokens"] == plain[epoch * 4 - 1]["tokens"]
    assert packed[-1]["tokens"] == plain[-1]["tokens"] == 4 * sum(len(e.input_ids) for e in encoded)
    assert manifest["val_loss"] is not None and plain_manifest["data"]["train_sequences"] == 16


def test_packed_rows_as_separate_sequences_give_the_packed_batch_loss(tiny_tokenizer, encoded):
    """micro_batch=example with data.packing: each packed row is its own unpadded sequence and
    keeps its restarting positions, so the loss equals the padded packed batch's."""
    from tunesmith.data.batching import collate_examples

    model = tiny_llama(len(tiny_tokenizer))
    rows = pack_examples(encoded[:7] + three_lengths(tiny_tokenizer), 512)
    batch = collate(rows, tiny_tokenizer.pad_token_id)
    separate = collate_examples(rows, tiny_tokenizer.pad_token_id, threads=2)
    assert separate["units"] == trained_targets(batch["labels"])
    loss_sum, n = sft_loss_sum(model, batch)
    loss_rows, n_rows = sft_loss_sum(model, separate)
    assert n_rows == n
    torch.testing.assert_close(loss_rows, loss_sum, rtol=1e-5, atol=0)
