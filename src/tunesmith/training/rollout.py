"""Rollouts for online RL: k seeded completions per prompt, scored, turned into a training batch.

Sampling is a KV-cached decode loop of our own (not model.generate) for one reason: each
completion draws its tokens from its own random stream, seeded by (train.seed, step, prompt,
sample). Inverting the cumulative distribution at one uniform number from the completion's stream
per token draws exactly from softmax(logits / temperature) after top-p (one random number a token,
where Gumbel-max needed one a vocabulary entry: ~1 ms a row a step on a 49k vocabulary, measured),
and makes a completion independent of
which other prompts share its batch, of how many processes split the step, and of where a
resumed run restarts: the same step of the same prompt samples the same completion. Ended rows
leave the batch and the cache, so a long completion costs only itself.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunesmith.data.prompts import PromptRow
from tunesmith.methods.peft_methods import lean_lora_inference
from tunesmith.models.load import decoder_and_head
from tunesmith.models.packed import packed_linears


def row_seed(seed: int, step: int, index: int, sample: int) -> int:
    """The random stream of one completion: a pure function of where it is in the run."""
    return ((seed * 1_000_003 + step) * 1_000_033 + index) * 1_009 + sample & 0x7FFF_FFFF_FFFF_FFFF


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits outside the smallest set of tokens whose probability reaches top_p set to -inf (the
    most likely token always stays), as transformers' TopPLogitsWarper."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - top_p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


_BLOCK = 256  # vocabulary entries a block of the two-level search in _pick


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature in float32; at 1.0 no division (x / 1 is x: a pass over [rows,
    vocabulary] saved, and its backward when training)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def _pick(logits: torch.Tensor, generators: list[torch.Generator] | None, temperature: float,
          top_p: float) -> torch.Tensor:
    """Next token of each row: argmax when greedy, else the first token whose cumulative probability
    (float64) passes u x total, u ~ U[0, 1) from the row's own stream: token i is drawn with
    probability p_i (a token of probability 0 adds no width, so it is never drawn). The search runs
    in two levels, over blocks of _BLOCK tokens and then within the one block it lands in: a running
    sum over the whole vocabulary is a sequential pass that cost ~3 ms a step at 8 rows x 49k (more
    than the rest of the pick), block sums are not."""
    if generators is None:
        return logits.argmax(dim=-1)
    probs = _top_p(_tempered(logits, temperature), top_p).softmax(dim=-1).double()
    rows, vocab = probs.shape
    blocks = -(-vocab // _BLOCK)
    if blocks * _BLOCK != vocab:
        probs = F.pad(probs, (0, blocks * _BLOCK - vocab))
    probs = probs.view(rows, blocks, _BLOCK)
    block_cdf = probs.sum(dim=-1).cumsum(dim=-1)  # [rows, blocks]
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=logits.device) for g in generators])
    target = (u * block_cdf[:, -1])[:, None]
    # u x total can round up to the total: never past the last block (token) that has probability
    last = torch.searchsorted(block_cdf, block_cdf[:, -1:], right=False)
    block = torch.minimum(torch.searchsorted(block_cdf, target, right=True), last)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    within = probs[torch.arange(rows, device=probs.device), block[:, 0]].cumsum(dim=-1)  # [rows, _BLOCK]
    last_in = torch.searchsorted(within, within[:, -1:], right=False)
    picked = torch.minimum(torch.searchsorted(within, target - before, right=True), last_in)
    return (block * _BLOCK + picked)[:, 0]


@dataclass
class SampleStats:
    tokens: int = 0      # completion tokens generated
    seconds: float = 0.0


@torch.no_grad()
def sample(model, prompts: list[list[int]], seeds: list[int] | None, max_new_tokens: int, eos: set[int],
           pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
           stats: SampleStats | None = None, repeats: int = 1) -> list[list[int]]:
    """Each prompt's completion tokens (up to and including its end-of-turn / EOS token, or
    max_new_tokens long), `repeats` completions of each prompt in a row (seeds: one per
    completion); each prompt is read once and its KV cache copied to its completions. seeds=None:
    greedy. LoRA layers run lean (methods/peft_methods.lean_lora_inference: PEFT's arithmetic,
    less of its per-call work), and a frozen bf16 base's linear layers on weights reordered once
    for oneDNN (models/packed.py; the same outputs)."""
    t0 = time.perf_counter()
    with packed_linears(model, len(prompts) * repeats), lean_lora_inference(model):
        out = _sample(model, prompts, seeds, max_new_tokens, eos, pad_id, temperature, top_p, repeats)
    if stats is not None:
        stats.tokens += sum(len(o) for o in out)
        stats.seconds += time.perf_counter() - t0
    return out


def _sample(model, prompts, seeds, max_new_tokens, eos, pad_id, temperature, top_p, repeats) -> list[list[int]]:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):  # left-padded: every row's next token is at the same position
        ids[r, width - len(p):] = torch.tensor(p, device=device)
        mask[r, width - len(p):] = 1
    gens = None
    if seeds is not None:
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    out: list[list[int]] = [[] for _ in range(len(prompts) * repeats)]
    rows = list(range(len(out)))
    cache = DynamicCache()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
        logits, mask = logits.repeat_interleave(repeats, dim=0), mask.repeat_interleave(repeats, dim=0)
    for _ in range(max_new_tokens):
        nxt = _pick(logits, gens, temperature, top_p)
        live = []
        for k, r in enumerate(rows):
            tok = int(nxt[k])
            out[r].append(tok)
            if tok not in eos and len(out[r]) < max_new_tokens:
                live.append(k)
        if not live:
            break
        if len(live) < len(rows):
            keep = torch.tensor(live, dtype=torch.long, device=device)
            cache.batch_select_indices(keep)
            nxt, mask = nxt[keep], mask[keep]
            rows = [rows[k] for k in live]
            gens = [gens[k] for k in live] if gens is not None else None
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                       past_key_values=cache, use_cache=True).logits[:, -1]
    return out


def completion_batch(rows: list[PromptRow], completions: list[list[int]], k: int, pad_id: int) -> dict:
    """Prompt + completion of each sample, right-padded: input_ids/attention_mask [B, L], `keep`
    [B, L] (positions whose next token is a completion token), `mask` [B, C] (completion tokens,
    from position 0), `targets` [N] (the completion tokens, row-major), `prompt_lens` [B] and
    `group_size` k (rows g k .. g k + k - 1 share their prompt)."""
    seqs = [rows[b // k].input_ids + c for b, c in enumerate(completions)]
    width, c_width = max(map(len, seqs)), max(max(map(len, completions)), 1)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    cmask = torch.zeros((len(seqs), c_width), dtype=torch.bool)
    for b, (s, c) in enumerate(zip(seqs, completions)):
        ids[b, :len(s)], attn[b, :len(s)] = torch.tensor(s), 1
        p = len(s) - len(c)
        keep[b, p - 1:len(s) - 1] = True
        cmask[b, :len(c)] = True
    targets = torch.tensor([t for c in completions for t in c], dtype=torch.long)
    prompt_lens = torch.tensor([len(rows[b // k].input_ids) for b in range(len(completions))], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": attn, "keep": keep, "mask": cmask, "targets": targets,
            "prompt_lens": prompt_lens, "group_size": k}


def _shared_prompt_hidden(decoder, batch: dict) -> torch.Tensor | None:
    """The hidden states before each completion token ([N, H], row-major, as `targets`), reading
    each group's prompt once: the prompt's forward fills a KV cache (gradients flow through it),
    copied to the group's k completions, which are then read behind it. The same states as the
    whole rows' forward (tests/test_rl.py), for (P + k C) tokens of work instead of k (P + C).
    None where the decoder fills no cache in training (activation checkpointing turns it off):
    the caller then reads the whole rows."""
    from transformers import DynamicCache

    k, ids, plens = batch.get("group_size"), batch["input_ids"], batch.get("prompt_lens")
    if not k or k < 2 or plens is None:
        return None
    clens, out = batch["mask"].sum(dim=1), []
    for g in range(0, ids.shape[0], k):
        p, c = int(plens[g]), int(clens[g:g + k].max())
        cache = DynamicCache()
        prompt = decoder(input_ids=ids[g:g + 1, :p], past_key_values=cache, use_cache=True).last_hidden_state
        if cache.get_seq_length() != p:
            return None
        cache.batch_repeat_interleave(k)
        # right-padded completions: a completion's tokens never attend to the padding after it
        rest = decoder(input_ids=ids[g:g + k, p:p + c], past_key_values=cache, use_cache=True).last_hidden_state
        h = torch.cat([prompt[:, -1:].expand(k, 1, prompt.shape[-1]), rest[:, :-1]], dim=1)
        out.append(h[batch["mask"][g:g + k, :c]])
    return torch.cat(out)


def completion_logps(model, batch: dict, temperature: float, value_head: torch.nn.Module | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, C] of the completion tokens under `model` at the sampling temperature (the
    distribution they were drawn from, as TRL scores them), 0 on padding; and the value head's
    estimate at the same positions (the state before each token) when given. Only completion
    positions go through the LM head."""
    decoder, head = decoder_and_head(model)
    h = _shared_prompt_hidden(decoder, batch)
    if h is None:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
        h = hidden[batch["keep"]]
    token_logps = -F.cross_entropy(_tempered(head(h), temperature), batch["targets"], reduction="none")
    mask = batch["mask"]
    logps = torch.zeros(mask.shape, dtype=token_logps.dtype, device=token_logps.device)
    logps = logps.masked_scatter(mask, token_logps)
    values = None
    if value_head is not None:
        # the head reads the policy's features without moving them: a shared trunk trained on the
        # value loss too would let the regression's gradient (large while the head is new) drown
        # the policy's; PPO implementations keep a separate value model for the same reason
        v = value_head(h.detach().to(value_head.weight.dtype)).squeeze(-1).float()
        values = torch.zeros(mask.shape, dtype=v.dtype, device=v.device).masked_scatter(mask, v)
    return logps, values
