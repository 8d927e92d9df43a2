"""Loading a run or model for inference, and batched KV-cached generation with its chat template."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.data.templates import stop_ids
from tunesmith.data.tokenize import ensure_chat_template, prompt_ids
from tunesmith.errors import ModelError
from tunesmith.models.load import attach_adapter, load_model, load_tokenizer
from tunesmith.models.registry import resolve_model


@dataclass
class InferenceModel:
    model: torch.nn.Module
    tokenizer: object
    label: str


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "manifest.json").is_file() and (
        (p / "adapter" / "adapter_config.json").is_file() or (p / "model" / "config.json").is_file())


def run_config(run: Path):
    """The resolved config a run saved (config.yaml)."""
    import yaml

    from tunesmith.config import parse_config

    return parse_config(yaml.safe_load((run / "config.yaml").read_text()), str(run / "config.yaml"))


def run_base_path(run: Path) -> Path:
    """The base model directory a run trained on (re-resolved when the recorded path has moved)."""
    base = json.loads((run / "manifest.json").read_text())["model"]
    return Path(base["path"]) if Path(base["path"]).is_dir() else resolve_model(base["id"]).path


def load_run_base(run: Path, dtype: torch.dtype = torch.float32):
    """(the base model loaded the way the run trained on it (QLoRA: 4-bit), the run's config)."""
    from tunesmith.methods import get_method

    cfg = run_config(run)
    return load_model(run_base_path(run), dtype=dtype, **get_method(cfg.method.name).load_kwargs(cfg.method)), cfg


def refuse_reward_run(run: str | Path) -> None:
    """A reward model run (objective.name=reward) has a score head and no LM head: nothing to generate
    or evaluate as a language model; the error says what measures it."""
    from tunesmith.training.reward_model import is_reward_run

    if isinstance(run, (str, Path)) and is_reward_run(run):
        raise ModelError(f"{run} is a reward model (objective.name=reward): it scores replies and does not generate; "
                         f"measure it on preference pairs with `tunesmith score {run} --data PAIRS.jsonl`")


def _load_run(run: Path, adapter: bool):
    """Base model loaded the way it was trained (QLoRA: 4-bit) plus the run's adapter, or the run's
    whole model for methods that train the weights themselves."""
    refuse_reward_run(run)
    tokenizer = load_tokenizer(run / "tokenizer")
    if adapter and (run / "model" / "config.json").is_file():
        return load_model(run / "model"), tokenizer, run.name
    model, _ = load_run_base(run)
    if adapter:
        return attach_adapter(model, run / "adapter"), tokenizer, run.name
    base_id = json.loads((run / "manifest.json").read_text())["model"]["id"]
    return model, tokenizer, f"{base_id} (base of {run.name})"


def load_for_inference(spec: str | Path, adapter: bool = True) -> InferenceModel:
    """A run directory (base model + its adapter + the tokenizer/template it trained with), or a
    model spec (alias, directory, GGUF, hub id). adapter=False loads a run's base model only."""
    if is_run_dir(spec):
        model, tokenizer, label = _load_run(Path(spec), adapter)
    elif Path(spec).is_dir() and (Path(spec) / "manifest.json").is_file():
        raise ModelError(f"{spec} looks like a run directory but holds no adapter/ or model/ (did the run finish?)")
    else:
        resolved = resolve_model(str(spec))
        tokenizer, model, label = load_tokenizer(resolved.path), load_model(resolved.path), resolved.id
    ensure_chat_template(tokenizer)
    model.eval()
    return InferenceModel(model, tokenizer, label)


def _sampling_kwargs(temperature: float, top_p: float) -> dict:
    # Explicit values for every knob: a model's own generation_config (top_k=50, a default
    # temperature ...) must not silently change what greedy or sampled decoding means here.
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


class _StopOnStrings:
    """A transformers stopping criterion, per row: done once the generated text (the prompt left
    out, so a prompt ending in a stop string does not end the reply before it starts) contains
    one of the stop strings, `end_at` finds the end of its answer, or `stop_when` holds for the
    reply it would give. Done rows are padded by generate while the others go on; `ended_at[r]`
    is the number of tokens row r had when it was done."""

    def __init__(self, tokenizer, stops: list[str], prompt_width: int,
                 stop_when: Callable[[str], bool] | None = None, end_at: Callable[[str], int | None] | None = None):
        self.tokenizer, self.stops, self.width, self.stop_when = tokenizer, stops, prompt_width, stop_when
        self.end_at = end_at
        self.done: list[bool] | None = None
        self.ended_at: dict[int, int] = {}

    def _ended(self, text: str) -> bool:
        if any(s in text for s in self.stops):
            return True
        # an ending that may grow into a stop string could still be cut off, so it is not judged yet
        judged = text[:len(text) - _stop_prefix(text, self.stops)]
        return ((self.end_at is not None and self.end_at(judged) is not None)
                or (self.stop_when is not None and self.stop_when(judged)))

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.done is None:
            self.done = [False] * input_ids.shape[0]
        rows = [r for r, d in enumerate(self.done) if not d]
        texts = self.tokenizer.batch_decode(input_ids[rows, self.width:].tolist(), skip_special_tokens=True)
        for r, text in zip(rows, texts):
            self.done[r] = self._ended(text)
            if self.done[r]:
                self.ended_at[r] = input_ids.shape[1] - self.width
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def _stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest ending of `text` that begins some stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def cut_at_stop(text: str, stops: list[str] | tuple[str, ...]) -> str:
    """The text before the earliest stop string (all of it when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def cut_answer(text: str, stops: list[str] | tuple[str, ...] = (),
               end_at: Callable[[str], int | None] | None = None) -> str:
    """The text before the earliest stop string, and no further than the end of its answer (end_at)."""
    text = cut_at_stop(text, stops)
    end = end_at(text) if end_at is not None else None
    return text if end is None else text[:end]


@dataclass
class GenerationStats:
    """What a generate call computed (summed over calls when one object is passed to several)."""
    rows: int = 0        # replies
    tokens: int = 0      # new tokens the replies needed: each row's up to its end (EOS, stop, answer end, limit)
    row_steps: int = 0   # decoding steps times the rows in the batch at each (what was computed)
    seconds: float = 0.0


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-aligned so every row's next token is at the same position; the mask hides the
    pads and generate derives positions from it, so padding changes no row's result."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


PRUNE_EVERY = 4  # new tokens per model.generate call; ended rows leave the batch between calls


def _generate_rows(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, criterion, eos_ids,
                   stats: GenerationStats | None = None, **kwargs) -> list[list[int]]:
    """Each row's new tokens (padding after an end included). model.generate runs PRUNE_EVERY
    tokens at a time on one KV cache, and between runs the rows that have ended (EOS, or
    `criterion(width)` says so) leave the batch and the cache: an ended row costs no more compute,
    and a long batch goes on with only its unfinished rows. Greedy replies are those of one
    uninterrupted model.generate; each call continues from the cache of the last."""
    from transformers import DynamicCache, StoppingCriteriaList

    width, rows = ids.shape[1], list(range(ids.shape[0]))
    eos = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids or ())
    out: list[list[int]] = [[] for _ in rows]
    cache = DynamicCache()
    while rows:
        crit = criterion(width) if criterion else None
        before = ids.shape[1]
        res = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, eos_token_id=eos_ids,
                             max_new_tokens=min(PRUNE_EVERY, max_new_tokens - (ids.shape[1] - width)),
                             stopping_criteria=StoppingCriteriaList([crit] if crit else []),
                             return_dict_in_generate=True, use_cache=True, **kwargs)
        ids, cache = res.sequences, res.past_key_values
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], ids.shape[1] - mask.shape[1]))], dim=1)
        new = ids[:, width:].tolist()
        live = []
        for k, r in enumerate(rows):
            out[r] = new[k]
            at_eos = next((i + 1 for i, t in enumerate(new[k]) if t in eos), None)
            if len(new[k]) >= max_new_tokens or at_eos or (crit and crit.done[k]):
                if stats is not None:  # the row's tokens up to its end, not the padding after it
                    stats.tokens += min(at_eos or len(new[k]), crit.ended_at.get(k, len(new[k])) if crit
                                        else len(new[k]))
            else:
                live.append(k)
        if stats is not None:
            stats.row_steps += len(rows) * (ids.shape[1] - before)
        if len(live) < len(rows):
            keep = torch.tensor(live, dtype=torch.long, device=ids.device)
            cache.batch_select_indices(keep)
            ids, mask, rows = ids[keep], mask[keep], [rows[k] for k in live]
    return out


@torch.no_grad()
def generate(im: InferenceModel, conversations: list[list[dict]], max_new_tokens: int = 128,
             batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             stop: list[str] | tuple[str, ...] = (), stop_when: Callable[[str], bool] | None = None,
             end_at: Callable[[str], int | None] | None = None, stats: GenerationStats | None = None) -> list[str]:
    """Assistant replies to each conversation, generated in left-padded, KV-cached batches.

    Greedy when temperature is 0; otherwise sampled (temperature, top_p, no top-k) with torch's
    RNG seeded with `seed` inside a fork, so the same call gives the same replies and the
    caller's RNG state is left as it was. A reply ends at the template's end of turn or EOS
    (data/templates.stop_ids), at max_new_tokens, just before the first of `stop`, at the end of
    its answer (`end_at(reply so far)`: an index, e.g. eval.answer_end's json_end, past the first
    JSON object; the reply is cut there), or as soon as `stop_when(reply so far)` is true (e.g.
    eval.json_fields.json_reply_decided: once the reply's JSON score can no longer change); an
    ended row leaves its batch. Prompts are sorted by length so batches carry little padding.
    `stats`, when given, is added what was generated and computed."""
    import time

    t0 = time.perf_counter()
    tok, model = im.tokenizer, im.model
    stops = [s for s in stop if s]
    eos = stop_ids(tok, getattr(model, "generation_config", None))
    prompts = [prompt_ids(tok, conv) for conv in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    criterion = ((lambda width: _StopOnStrings(tok, stops, width, stop_when, end_at))
                 if stops or stop_when or end_at else None)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [],
                               device_type=device.type):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = _left_padded([prompts[i] for i in idx], tok.pad_token_id, device)
            new = _generate_rows(model, ids, mask, max_new_tokens, criterion, eos, stats=stats,
                                 pad_token_id=tok.pad_token_id, **_sampling_kwargs(temperature, top_p))
            replies = tok.batch_decode(new, skip_special_tokens=True)
            for i, reply in zip(idx, replies):
                out[i] = cut_answer(reply, stops, end_at).strip()
    if stats is not None:
        stats.rows += len(prompts)
        stats.seconds += time.perf_counter() - t0
    return out
