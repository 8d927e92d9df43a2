"""The online RL recipe on a tiny model: the reward it is given rises (group and GAE advantages),
sampling is a pure function of (seed, step, prompt, sample), an interrupted run resumes to the
uninterrupted result (the sampler's streams included), and what it cannot do is refused."""
import json

import pytest
import torch

from conftest import write_jsonl
from tunesmith.config import load_config
from tunesmith.errors import ConfigError, DataError
from tunesmith.recipes.rl import run_rl
from tunesmith.training.logging import read_metrics
from tunesmith.training.rollout import row_seed, sample

WORDS = ["cats", "dogs", "fish", "birds", "rain", "sun", "tea", "maps", "snow", "wind", "rocks", "milk"]
REWARD = "rl_reward_fns:low_ids"  # tests/rl_reward_fns.py: the share of completion tokens with a low id


@pytest.fixture
def prompts(tmp_path):
    rows = [{"prompt": f"Write about {w}.", "topic": w} for w in WORDS]
    return {"train": write_jsonl(tmp_path / "train.jsonl", rows[:8]),
            "validation": write_jsonl(tmp_path / "val.jsonl", rows[8:])}


def cfg(model_dir, data, out, *extra):
    return load_config(None, [f"model.name={model_dir}", f"data.train={data['train']}",
                              f"data.validation={data['validation']}", f"run.output_dir={out}", "run.name=r",
                              "objective.name=rl", f"objective.rewards=[{{function: '{REWARD}'}}]",
                              "objective.num_generations=4", "objective.max_new_tokens=8", "train.batch_size=2",
                              "method.r=8", "train.log_every=1", *extra])


def rewards_of(run):
    return [r["reward"] for r in read_metrics(run / "metrics.jsonl") if "reward" in r]


@pytest.mark.parametrize("advantage", ["group", "gae"])
def test_rl_raises_the_reward(advantage, tiny_model_dir, prompts, tmp_path):
    run = run_rl(cfg(tiny_model_dir, prompts, tmp_path, "train.max_steps=12", "train.lr=1e-2", "train.batch_size=4", "objective.num_generations=8",
                     f"objective.advantage={advantage}", "objective.kl_coef=0.01"))
    got = rewards_of(run)
    assert len(got) == 12
    # sampled at temperature 1: noisy, but up; GAE spends its first steps fitting the value head, so its
    # sampled reward rises later (+0.01 to +0.5 over train.seed 0-3); the held-out check below is the firm one
    assert sum(got[-4:]) / 4 > sum(got[:4]) / 4 + (0.03 if advantage == "group" else 0.0), got
    manifest = json.loads((run / "manifest.json").read_text())
    start, end = manifest["heldout_reward"]["start"], manifest["heldout_reward"]["end"]
    assert end["val_reward"] > start["val_reward"] + 0.2, (start, end)  # greedy replies to unseen prompts
    logged = read_metrics(run / "metrics.jsonl")[-2]
    for key in ("rewards/low_ids", "rewards/low_ids_std", "kl", "clip_fraction", "completion_length",
                "generation_tokens_per_s", "train_tokens_per_s", *(["value_loss"] if advantage == "gae" else [])):
        assert key in logged, key
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "loss.png").is_file()


def test_a_completion_samples_the_same_tokens_whatever_shares_its_batch(tiny_model_dir, tiny_tokenizer):
    from tunesmith.models.load import load_model

    model = load_model(tiny_model_dir).eval()
    a, b = tiny_tokenizer("Write about cats.")["input_ids"], tiny_tokenizer("Hi")["input_ids"]
    seeds = [row_seed(0, 3, 7, j) for j in range(3)]
    together = sample(model, [a, a, a, b], [*seeds, row_seed(0, 3, 8, 0)], 10, set(), tiny_tokenizer.pad_token_id)
    alone = sample(model, [a, a, a], seeds, 10, set(), tiny_tokenizer.pad_token_id)
    assert together[:3] == alone
    assert len({tuple(c) for c in alone}) == 3  # different streams, different samples
    other_step = sample(model, [a], [row_seed(0, 4, 7, 0)], 10, set(), tiny_tokenizer.pad_token_id)
    assert other_step[0] != alone[0]


def test_repeats_sample_what_the_repeated_prompts_do(tiny_model_dir, tiny_tokenizer):
    """The rollout reads each prompt once (repeats=k, its KV cache copied to the k completions): the
    same completions as sampling the k copies of each prompt."""
    from tunesmith.models.load import load_model

    model = load_model(tiny_model_dir).eval()
    a, b = tiny_tokenizer("Write about cats.")["input_ids"], tiny_tokenizer("Hi")["input_ids"]
    seeds = [row_seed(0, 3, i, j) for i in (7, 8) for j in range(3)]
    shared = sample(model, [a, b], seeds, 10, set(), tiny_tokenizer.pad_token_id, temperature=0.9, repeats=3)
    assert shared == sample(model, [a, a, a, b, b, b], seeds, 10, set(), tiny_tokenizer.pad_token_id, temperature=0.9)


def test_the_shared_prompt_forward_equals_the_whole_rows(tiny_model_dir, tiny_tokenizer):
    """completion_logps reads each group's prompt once and its completions behind the copied cache:
    the log-probs, value estimates and gradients of reading every whole row (to float rounding)."""
    from tunesmith.config import MethodSection
    from tunesmith.data.prompts import PromptRow
    from tunesmith.methods import get_method
    from tunesmith.models.load import load_model
    from tunesmith.training.rollout import completion_batch, completion_logps

    torch.manual_seed(0)
    model = get_method("lora").build(load_model(tiny_model_dir), MethodSection(name="lora", r=4))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # a trained adapter: its path carries gradient
    rows = [PromptRow(i, f"p:{i}", [], None, {}, tiny_tokenizer(t)["input_ids"])
            for i, t in enumerate(["Write about cats.", "Hi there, tell me about the weather today"])]
    completions = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19], [20, 21, 22, 23, 24, 25]]
    batch = completion_batch(rows, completions, 3, tiny_tokenizer.pad_token_id)
    from tunesmith.models.load import decoder_and_head
    from tunesmith.training.rollout import _shared_prompt_hidden
    with torch.no_grad():
        assert _shared_prompt_hidden(decoder_and_head(model)[0], batch).shape == (len(batch["targets"]), model.config.hidden_size)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    results = []
    for shared in (True, False):
        b = batch if shared else {k: v for k, v in batch.items() if k != "group_size"}
        model.zero_grad()
        logps, values = completion_logps(model, b, 0.8, head)
        (logps * torch.arange(1.0, logps.shape[1] + 1)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logps.detach(), values.detach(), grads))
    (lp1, v1, g1), (lp2, v2, g2) = results
    assert lp1.shape == lp2.shape == batch["mask"].shape and (lp1[~batch["mask"]] == 0).all()
    torch.testing.assert_close(lp1, lp2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for n in g1:
        assert (g1[n] - g2[n]).norm() <= 1e-5 * g2[n].norm() + 1e-7, n  # float rounding, summed in another order


def test_sampling_draws_from_the_temperature_softmax(tiny_model_dir, tiny_tokenizer):
    """Inverse-CDF sampling with a row's stream is a draw from softmax(logits / T): the first token's
    frequencies over many streams match the model's probabilities."""
    from tunesmith.models.load import load_model

    model = load_model(tiny_model_dir).eval()
    ids = tiny_tokenizer("Write about cats.")["input_ids"]
    n, temperature = 3000, 0.7
    firsts = sample(model, [ids] * n, [row_seed(1, 0, 0, j) for j in range(n)], 1, set(),
                    tiny_tokenizer.pad_token_id, temperature=temperature)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1] / temperature, -1)
    top = probs.topk(3).indices.tolist()
    for t in top:
        seen = sum(f[0] == t for f in firsts) / n
        assert abs(seen - float(probs[t])) < 4 * (float(probs[t]) / n) ** 0.5 + 0.01, (t, seen, float(probs[t]))


def test_interrupted_rl_resumes_to_the_uninterrupted_result(tiny_model_dir, prompts, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from tunesmith.training import rl_step

    args = ("train.max_steps=4", "train.lr=1e-2", "train.save_every=2", "objective.advantage=gae")
    whole = run_rl(cfg(tiny_model_dir, prompts, tmp_path / "a", *args))
    calls, real = {"n": 0}, rl_step.RLLossFn.__call__

    def interrupt_in_step_3(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, model, batch)
    monkeypatch.setattr(rl_step.RLLossFn, "__call__", interrupt_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_rl(cfg(tiny_model_dir, prompts, tmp_path / "b", *args))
    monkeypatch.setattr(rl_step.RLLossFn, "__call__", real)
    staging = next((tmp_path / "b").glob(".r.incomplete-*"))
    staging.rename(staging.with_name(".r.incomplete-999999"))  # as if left by a process that has exited
    resumed = run_rl(cfg(tiny_model_dir, prompts, tmp_path / "b", *args), resume=True)
    a, b = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (whole, resumed))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert rewards_of(whole) == rewards_of(resumed)  # the same completions were sampled after the resume


def test_what_rl_cannot_do_is_refused(tiny_model_dir, prompts, tmp_path):
    with pytest.raises(ConfigError, match="objective.kl_coef"):
        run_rl(cfg(tiny_model_dir, prompts, tmp_path, "method.name=full", "method.r=16"))
    with pytest.raises(ConfigError, match="method.name=prefix"):
        run_rl(cfg(tiny_model_dir, prompts, tmp_path, "method.name=prefix", "method.r=16"))
    with pytest.raises(ConfigError, match="objective.gamma"):
        cfg(tiny_model_dir, prompts, tmp_path, "objective.gamma=0.9")  # read by gae only
    with pytest.raises(ConfigError, match="objective.scale_rewards"):
        cfg(tiny_model_dir, prompts, tmp_path, "objective.advantage=gae", "objective.scale_rewards=none")
    with pytest.raises(ConfigError, match="strategy=fsdp"):
        cfg(tiny_model_dir, prompts, tmp_path, "train.distributed.strategy=fsdp")
    with pytest.raises(ConfigError, match="objective.rewards"):
        run_rl(load_config(None, [f"model.name={tiny_model_dir}", f"data.train={prompts['train']}",
                                  "objective.name=rl"]))  # no reward function at all
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "hi"}])
    with pytest.raises(DataError, match="bad.jsonl:1.*'prompt'.*data.columns.prompt"):
        run_rl(cfg(tiny_model_dir, {"train": bad, "validation": prompts["validation"]}, tmp_path))


def test_plan_says_it_does_not_model_rl(tiny_model_dir, prompts, tmp_path):
    from tunesmith.plan.workload import resolve_workload

    with pytest.raises(ConfigError, match="objective.name=rl"):
        resolve_workload(cfg(tiny_model_dir, prompts, tmp_path), device=None)


def test_the_gsm8k_example_config_loads_and_its_rewards_read_the_data(tiny_tokenizer):
    """examples/rl-gsm8k.yaml validates, its prompts come from GSM8K's question column, and a reply
    ending with the right '#### n' scores 1 on the numeric reward (the wrong number 0)."""
    from conftest import ROOT
    from tunesmith.data.prompts import load_prompts
    from tunesmith.training.rewards import build_rewards

    cfg = load_config(ROOT / "examples" / "rl-gsm8k.yaml")
    path = ROOT / cfg.data.train  # relative to the repository root, where the README runs it
    if not path.is_file():
        pytest.skip("../shared/data/gsm8k is not next to this checkout")
    rows = load_prompts(str(path), cfg.data.columns, cfg.data.system_prompt)[:2]
    assert rows[0].messages[0]["role"] == "system" and rows[0].messages[1]["content"] == rows[0].given
    rewards = build_rewards(cfg.objective.rewards, None, set(rows[0].columns))
    answer = rows[0].columns["answer"].split("####")[-1].strip()
    per_fn = rewards([rows[0].given] * 2, [f"so #### {answer}", "so #### 99999"],
                     {"answer": [rows[0].columns["answer"]] * 2})
    assert per_fn[0] == [1.0, 0.0] and per_fn[1] == [1.0, 1.0]


def test_the_pick_draws_each_token_at_its_probability_and_never_a_removed_one():
    """_pick on fixed logits: frequencies over many streams match softmax(logits / T) restricted to
    top-p (a token top-p removes, or of probability 0, is never drawn), whatever the dtype."""
    from tunesmith.training.rollout import _pick, _top_p

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, float("-inf"), 0.0]])
    n, temperature, top_p = 20000, 0.8, 0.9
    gens = [torch.Generator().manual_seed(row_seed(3, 0, 0, j)) for j in range(n)]
    for dtype in (torch.float32, torch.bfloat16):
        picks = _pick(logits.to(dtype).expand(n, -1), gens, temperature, top_p)
        probs = _top_p(logits / temperature, top_p).softmax(-1)[0]
        counts = torch.bincount(picks, minlength=logits.shape[1]).double() / n
        assert counts[probs == 0].sum() == 0 and (probs == 0).sum() >= 2  # -inf and what top-p dropped
        for t in range(logits.shape[1]):
            assert abs(counts[t] - probs[t]) < 4 * (float(probs[t]) / n) ** 0.5 + 1e-3, (dtype, t)
    # a row's draw depends on its own stream only, not on the rows beside it
    a = _pick(logits.expand(2, -1), [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)], 1.0, 1.0)
    b = _pick(logits[:1], [torch.Generator().manual_seed(5)], 1.0, 1.0)
    assert a[0] == b[0]


def test_rl_in_bf16_keeps_the_base_in_bf16_and_trains_fp32_adapters(tiny_model_dir, prompts, tmp_path, monkeypatch):
    """train.precision=bf16 on a CPU: the frozen base loads in bf16 (what the sampler and the reference
    read), the adapter trains in fp32, and the run learns (Placement.frozen_dtype)."""
    from tunesmith.recipes import sft
    from tunesmith.training import device, rl_step

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)  # emulated where not: slow, still right
    seen, prepare, rollout = {}, sft.prepare_model, rl_step.Rollout.__call__

    def recording_prepare(model, cfg, placement):
        out = prepare(model, cfg, placement)
        seen["frozen"] = {p.dtype for p in out.parameters() if not p.requires_grad}
        seen["trained"] = {p.dtype for p in out.parameters() if p.requires_grad}
        return out

    def recording_rollout(self, group, pad_id):
        batch = rollout(self, group, pad_id)
        seen.setdefault("sampled", []).append(len(batch["targets"]))
        return batch
    monkeypatch.setattr(sft, "prepare_model", recording_prepare)
    monkeypatch.setattr(rl_step.Rollout, "__call__", recording_rollout)
    run = run_rl(cfg(tiny_model_dir, prompts, tmp_path, "train.precision=bf16", "train.max_steps=2", "train.lr=1e-2"))
    assert seen["frozen"] == {torch.bfloat16} and seen["trained"] == {torch.float32}
    assert len(seen["sampled"]) == 2 and all(n > 0 for n in seen["sampled"])
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["precision"] == "bf16"
    assert all(v == v for v in rewards_of(run))  # finite rewards logged each step


def test_the_two_level_pick_lands_where_one_running_sum_over_the_vocabulary_does(monkeypatch):
    """_pick searches blocks, then one block: the token it draws for a uniform number is the one the
    plain inverse CDF over the whole vocabulary (float64) gives, across block edges, with whole blocks of
    zero probability, a vocabulary that is not a multiple of the block, and u at the ends of [0, 1)."""
    from tunesmith.training import rollout

    monkeypatch.setattr(rollout, "_BLOCK", 16)
    torch.manual_seed(0)
    vocab, n = 203, 4000
    logits = torch.randn(n, vocab) * 3
    logits[:, 32:64] = float("-inf")  # two whole blocks without probability
    logits[: n // 2, 190:] = float("-inf")  # the last, partial block empty for half the rows
    gens = [torch.Generator().manual_seed(row_seed(1, 2, 3, j)) for j in range(n)]
    u = torch.cat([torch.rand(1, generator=torch.Generator().manual_seed(row_seed(1, 2, 3, j)), dtype=torch.float64)
                   for j in range(n)])
    picks = rollout._pick(logits, gens, 1.0, 1.0)
    cdf = logits.softmax(-1).double().cumsum(-1)
    want = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    assert (picks == want).float().mean() > 0.999  # float64 sums in another order: ties at an edge at most
    assert bool(torch.isfinite(logits.gather(1, picks[:, None])).all())
    probs = logits.softmax(-1)
    for end in (0.0, 1.0 - 2 ** -53):  # the smallest and the largest uniform number
        monkeypatch.setattr(rollout.torch, "rand", lambda *a, value=end, **k: torch.tensor([value], dtype=torch.float64))
        p = rollout._pick(logits[:50], [None] * 50, 1.0, 1.0)
        assert bool((probs[:50].gather(1, p[:, None]) > 0).all()), end
