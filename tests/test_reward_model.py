"""Reward models (objective.name=reward): the Bradley-Terry loss against TRL's RewardTrainer on the same
sequence classifier and batch; `tunesmith train` saving LoRA and full runs that plain transformers + PEFT
load to the same scores; `tunesmith score`; 2 ranks equal 1 process; errors that name what is wrong."""
from __future__ import annotations

import copy
import json
import shutil
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from conftest import write_jsonl
from reward_ranks import MARGINS, ddp_rank, fixed_batch, lora_scorer, tiny_scorer
from test_dpo import pairs
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.dataset import load_examples
from tunesmith.errors import ConfigError, DataError, ModelError
from tunesmith.recipes.reward import RewardLoss, read_margins, reward_pairs, run_reward
from tunesmith.training.reward_model import bradley_terry_loss, encode_scored, load_reward_model, use_reward_pad

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.trainer.reward_trainer import RewardTrainer

def trl_loss(model, batch: dict, center: float | None):
    """TRL 1.16's RewardTrainer.compute_loss, run without its __init__ (only what it reads)."""
    trainer = RewardTrainer.__new__(RewardTrainer)
    trainer.__dict__.update(
        args=SimpleNamespace(center_rewards_coefficient=center), model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    loss = trainer.compute_loss(model, dict(batch))
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("with_margin,center", [(False, None), (True, None), (False, 0.01), (True, 0.5)])
def test_loss_equals_trl_reward_trainer(with_margin, center):
    model, batch = tiny_scorer(), fixed_batch()
    n = batch["input_ids"].shape[0] // 2
    if with_margin:
        batch["margin"] = torch.tensor([0.0, 0.5, 1.0, -0.3, 2.0, 0.25])
    want, logged = trl_loss(model, batch, center)
    ours = RewardLoss(center or 0.0)
    got_sum, units = ours(model, {**batch, "units": n})
    torch.testing.assert_close(got_sum / units, want, rtol=0, atol=1e-5)
    mine = ours._metrics[-1]
    assert mine["rewards/accuracies"] == pytest.approx(logged["accuracy"], abs=1e-6)
    assert mine["rewards/margins"] == pytest.approx(logged["margin"], abs=1e-5)
    assert 0 < logged["accuracy"] < 1  # a batch where the order of the scores is not trivially all one way
    # the pure function on the scores alone, with the center term's gradient too
    scores = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, 0]
    loss, _ = bradley_terry_loss(scores[:n], scores[n:], batch.get("margin"), center or 0.0)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-5)


def test_scores_are_read_at_the_end_of_turn_with_a_pad_that_is_not_one(tiny_tokenizer):
    """SmolLM2 / Llama 3 pad with their end-of-turn token: transformers would then read each row's
    score before it. The pad is moved off the end-of-turn token and the row cut after it."""
    tok = copy.deepcopy(tiny_tokenizer)  # the session's fixture stays as it is
    tok.pad_token = tok.eos_token  # <|im_end|>, the end of turn
    pad = use_reward_pad(tok)
    assert pad != tok.convert_tokens_to_ids("<|im_end|>") and tok.pad_token_id == pad
    conv = [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Paris is the capital."}]
    enc = encode_scored(tok, conv, 256, "c")
    assert enc.input_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")  # ChatML's newline after it is cut
    with pytest.raises(DataError, match="no assistant reply left to score"):
        encode_scored(tok, conv, 4, "row 7")


# --- end to end: `tunesmith train` -> run directory -> load / score ---------------------------------

@pytest.fixture(scope="module")
def space(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("reward")
    train_rows, val_rows = pairs(21, 16), pairs(22, 8)
    for i, row in enumerate(train_rows + val_rows):
        row["m"] = 0.25 * (i % 3)  # objective.margin_column=m (the LoRA run): every file needs it
    data = {"train": write_jsonl(root / "train.jsonl", train_rows), "val": write_jsonl(root / "val.jsonl", val_rows)}
    config = {"model": {"name": str(tiny_model_dir)}, "objective": {"name": "reward"},
              "data": {"train": str(data["train"]), "validation": str(data["val"])},
              "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "log_every": 1}}
    path = root / "reward.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"root": root, "config": path, **data}


@pytest.fixture(scope="module")
def runs(space):
    out = {}
    for name, extra in (("lora", ["method.r=4", "objective.margin_column=m", "objective.center_rewards=0.01"]),
                        ("full", ["method.name=full", "train.lr=1e-3"])):
        code = main(["train", str(space["config"]), f"run.output_dir={space['root'] / 'runs'}", f"run.name={name}",
                     *extra])
        assert code == 0
        out[name] = space["root"] / "runs" / name
    return out


def conversations(path, limit: int = 6) -> list[list[dict]]:
    examples = load_examples(path).examples[:limit]
    return [ex.prompt + side for ex in examples for side in (ex.chosen, ex.rejected)]


def fresh_scores(model, tokenizer, convs, max_length: int) -> list[float]:
    """Each conversation alone (no padding) through a model loaded with transformers / PEFT only."""
    out = []
    for conv in convs:
        ids = torch.tensor([encode_scored(tokenizer, conv, max_length, "c").input_ids])
        with torch.no_grad():
            out.append(float(model(input_ids=ids).logits[0, 0]))
    return out


@pytest.mark.parametrize("name", ["lora", "full"])
def test_train_saves_a_run_that_transformers_and_peft_load_to_the_same_scores(runs, space, name):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = runs[name]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["kind"] == "reward" and manifest["objective"]["name"] == "reward"
    acc = manifest["preference_accuracy"]
    assert {"val_loss", "val_preference_accuracy", "val_margin"} <= set(acc["start"]) and acc["end"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "val_preference_accuracy" in rows[0]
    assert {"rewards/accuracies", "rewards/margins"} <= set(rows[1])

    rm = load_reward_model(run)
    convs = conversations(space["val"])
    got = rm.score(convs, batch_size=4)  # padded batches
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    if name == "lora":
        assert (run / "adapter" / "adapter_config.json").is_file() and not (run / "model").exists()
        config = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
        base = AutoModelForSequenceClassification.from_pretrained(manifest["model"]["path"], num_labels=1)
        fresh = PeftModel.from_pretrained(base, run / "adapter")
        fresh.config.pad_token_id = tokenizer.pad_token_id
    else:
        fresh = AutoModelForSequenceClassification.from_pretrained(run / "model")
        assert fresh.config.pad_token_id == tokenizer.pad_token_id
    want = fresh_scores(fresh.eval(), tokenizer, convs, rm.max_length)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
    # the trained head is not the random one a fresh base would start from
    untrained = AutoModelForSequenceClassification.from_pretrained(manifest["model"]["path"], num_labels=1)
    untrained.config.pad_token_id = tokenizer.pad_token_id
    assert not torch.allclose(torch.tensor(fresh_scores(untrained, tokenizer, convs[:2], 256)), torch.tensor(want[:2]))


def test_score_prints_pair_accuracy(runs, space, capsys):
    assert main(["score", str(runs["lora"]), "--data", str(space["val"]), "--limit", "5", "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    rm = load_reward_model(runs["lora"])
    scores = rm.score(conversations(space["val"], 5))
    diffs = [c - r for c, r in zip(scores[0::2], scores[1::2])]
    assert "pairs                   5" in out
    assert f"accuracy                {sum(d > 0 for d in diffs) / 5:.4f}" in out
    assert f"mean margin             {sum(diffs) / 5:.4f}" in out
    # `tunesmith eval RM` measures the same on the run's own held-out pairs (data.validation)
    assert main(["eval", str(runs["lora"]), "--limit", "5"]) == 0
    assert f"accuracy                {sum(d > 0 for d in diffs) / 5:.4f}" in capsys.readouterr().out


def test_bad_inputs_are_named(runs, space, tmp_path, capsys):
    assert main(["score", str(tmp_path / "nope"), "--data", str(space["val"])]) == 2
    assert f"{tmp_path / 'nope'}: no such reward model run" in capsys.readouterr().err
    assert main(["score", str(runs["lora"]), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    sft = tmp_path / "sft-run"
    shutil.copytree(runs["lora"], sft)
    manifest = json.loads((sft / "manifest.json").read_text())
    (sft / "manifest.json").write_text(json.dumps({**manifest, "objective": {"name": "sft"}}))
    with pytest.raises(ModelError, match="objective.name=sft, not a reward model"):
        load_reward_model(sft)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "yo"}]}])
    assert main(["score", str(runs["lora"]), "--data", str(chat)]) == 2
    assert "chat.jsonl:1: scoring needs preference rows" in capsys.readouterr().err
    # `tunesmith eval` (and generate) on a reward run: what measures it instead
    assert main(["eval", str(runs["full"]), "--task", f"p=perplexity:{space['val']}", "--out", str(tmp_path)]) == 2
    assert f"tunesmith score {runs['full']} --data" in capsys.readouterr().err
    assert main(["export", str(runs["lora"]), "--format", "merged", "--out", str(tmp_path / "m")]) == 2
    assert "is a reward model" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_margin_column_is_read_from_the_raw_rows_and_a_missing_one_is_named(space, tiny_tokenizer, tiny_model_dir,
                                                                            tmp_path):
    examples = load_examples(space["train"]).examples
    items = reward_pairs(tiny_tokenizer, examples, 256, "t", first_index=100)
    margins = read_margins(str(space["train"]), "m", items, examples, first_index=100)
    assert [margins[it.index] for it in items[:4]] == [0.0, 0.25, 0.5, 0.0]
    with pytest.raises(DataError, match=r"train.jsonl:1: the row has no column 'nope' \(objective.margin_column\)"):
        read_margins(str(space["train"]), "nope", items, examples, 100)
    rows = pairs(21, 2)
    rows[1]["m"] = "big"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**rows[0], "m": 1}, rows[1]])
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={bad}", "objective.name=reward",
                             "objective.margin_column=m", f"run.output_dir={tmp_path}"])
    with pytest.raises(DataError, match="bad.jsonl:2: the row has 'big' in column 'm'"):
        run_reward(cfg)


def test_prompt_tuning_is_refused_for_a_scorer():
    from tunesmith.config import MethodSection
    from tunesmith.methods import get_method

    with pytest.raises(ConfigError, match="method.name=prompt cannot train a sequence scorer"):
        get_method("prompt").build(tiny_scorer(), MethodSection(name="prompt"), task_type="SEQ_CLS")


# --- 2 ranks x 2 pairs == 1 process x 4 pairs (DDP strategy, gloo) -----------------------------------

@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")
def test_two_ranks_give_the_one_process_loss_and_gradients(tmp_path):
    from tunesmith.training import loop
    from tunesmith.training.device import choose_placement
    from tunesmith.training.distributed.strategy import Strategy

    out = str(tmp_path / "ranked.pt")
    mp.spawn(ddp_rank, args=(2, f"file://{tmp_path / 'init'}", out), nprocs=2, join=True)
    ranked = torch.load(out)
    model = lora_scorer()
    placement = choose_placement("fp32")
    module = Strategy(placement, None).prepare(model, RewardLoss(0.05))
    batch = fixed_batch(4, seed=5) | {"units": 4, "margin": MARGINS}
    loss, _ = loop.accumulate(module, [batch], loop.call_module, placement)
    assert ranked["loss"] == pytest.approx(loss, rel=1e-6)
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ranked["grads"].keys() and any("score" in k for k in grads)
    for k in grads:
        torch.testing.assert_close(ranked["grads"][k], grads[k], rtol=1e-5, atol=1e-6)


# --- every family of the table: the pad token, the scored token, padded batches ----------------------

@pytest.mark.parametrize("name", sorted(__import__("families").FIXTURES))
def test_each_family_scores_at_its_end_of_turn_in_padded_batches(name):
    """The pad chosen is none of the family's end-of-turn tokens, each conversation is scored at one
    of them, and a padded batch gives each conversation its unpadded score."""
    from families import family_config, family_tokenizer
    from transformers import AutoModelForSequenceClassification

    from tunesmith.data.templates import stop_ids
    from tunesmith.training.reward_model import RewardModel

    tok = family_tokenizer(name)
    pad = use_reward_pad(tok)
    assert pad not in stop_ids(tok)
    torch.manual_seed(0)
    config = family_config(name, len(tok))
    config.num_labels, config.pad_token_id = 1, pad
    model = AutoModelForSequenceClassification.from_config(config).eval()
    convs = [[{"role": "user", "content": "What is the capital of France?"},
              {"role": "assistant", "content": "Paris is the capital of France, and its largest city."}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]]
    assert all(encode_scored(tok, c, 512, name).input_ids[-1] in stop_ids(tok) for c in convs)
    rm = RewardModel(model, tok, name, 512)
    batched = torch.tensor(rm.score(convs, batch_size=2))
    with torch.no_grad():  # the score head on the decoder's last position, the end-of-turn token
        at_end = [model.score(model.model(torch.tensor([encode_scored(tok, c, 512, name).input_ids]))
                              .last_hidden_state[0, -1])[0] for c in convs]
    torch.testing.assert_close(batched, torch.stack(at_end), rtol=1e-5, atol=1e-5)


def test_rl_scores_completions_with_a_trained_reward_model(runs, space, tiny_model_dir, tmp_path):
    """objective.reward_model: the RL recipe loads the reward run and logs its scores as the
    reward_model function, the same numbers `load_reward_model(...).score` gives those replies."""
    from tunesmith.recipes.rl import run_rl
    from tunesmith.training.logging import read_metrics

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("Say hi.", "Name a fruit.")])
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={prompts}", f"data.validation={prompts}",
                             "objective.name=rl", f"objective.reward_model={runs['lora']}",
                             "objective.num_generations=2", "objective.max_new_tokens=4", "train.batch_size=2",
                             "train.max_steps=1", f"run.output_dir={tmp_path}", "run.name=rl"])
    run = run_rl(cfg)
    logged = [r for r in read_metrics(run / "metrics.jsonl") if "val_reward" in r]
    assert logged and all("val_rewards/reward_model" in r for r in logged)
    assert logged[0]["val_reward"] == pytest.approx(logged[0]["val_rewards/reward_model"])
    assert logged[0]["val_reward"] != 0  # a real score, not a missing one counted as 0
