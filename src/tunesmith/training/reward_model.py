"""Reward models: a sequence-scoring head on a causal LM, trained on preference pairs.

The model is transformers' AutoModelForSequenceClassification with num_labels=1 (what TRL's
RewardTrainer trains, what vLLM and TGI serve as reward models): the decoder plus a bias-free
linear `score` head read at each row's last non-pad token. With an adapter method the head is
trained whole next to the adapter and saved with it (PEFT task_type SEQ_CLS, modules_to_save).

Where a conversation is scored: at the last token of the assistant's last turn, its end-of-turn
token (`scored`: whatever the chat template writes after it, e.g. ChatML's newline, is cut off), so
the score has read the whole reply and the fact that it ended. transformers finds that token as the
rightmost one that is not `config.pad_token_id`, so the pad token must never be an end-of-turn token
(`use_reward_pad`: SmolLM2 and Llama 3 pad with theirs); the run's saved tokenizer carries the pad
token chosen, and its config (full) or the loader (adapter) the same id.

Run directory of objective.name=reward: adapter/ (PEFT, SEQ_CLS) or model/ (full), tokenizer/,
manifest.json with "objective": {"name": "reward", ...}. `load_reward_model` reads it for
`tunesmith score`, `tunesmith eval` and the RL recipe's reward.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tunesmith.data.tokenize import IGNORE, Encoded, encode_conversation
from tunesmith.errors import DataError, ModelError

Metrics = dict[str, torch.Tensor]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """-log sigmoid(r_chosen - r_rejected - margin), mean over pairs, + center * mean((r_c + r_r)^2).
    Matches TRL `RewardTrainer.compute_loss` (margin column, center_rewards_coefficient).

    Metrics (detached means over the pairs, DPO's names so logs and plots read alike): the share of
    pairs scored the right way round, the score difference (without the margin) and each side's score."""
    from tunesmith.training.preference import _pair_metrics

    diff = chosen - rejected
    loss = -F.logsigmoid(diff if margin is None else diff - margin.to(diff.dtype)).mean()
    if center:
        loss = loss + center * ((chosen + rejected) ** 2).mean()
    return loss, _pair_metrics(chosen, rejected)


# --- what is scored ------------------------------------------------------------------------------

def scored(enc: Encoded, where: str = "conversation") -> Encoded:
    """The encoded conversation cut after its last trained token (the reply's end of turn), where
    the score is read. A conversation cut by data.max_length inside its reply is scored at the
    cut; one with no reply token left cannot be scored."""
    last = max((i for i, label in enumerate(enc.labels) if label != IGNORE), default=None)
    if last is None:
        raise DataError(f"{where}: no assistant reply left to score (an empty reply, or the prompt fills "
                        f"data.max_length={len(enc.input_ids)})")
    return Encoded(enc.input_ids[:last + 1], enc.labels[:last + 1], enc.full_length)


def use_reward_pad(tokenizer) -> int:
    """Make the tokenizer's pad token one that is not an end-of-turn/EOS token (the scored last
    token of every row) and return its id: its own pad when it differs from them, else its unk,
    BOS or EOS token, else any other special token. A BOS pad is harmless: transformers reads the
    rightmost non-pad token, and BOS only starts a row."""
    from tunesmith.data.templates import stop_ids

    ends = set(stop_ids(tokenizer))
    candidates = [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
                  *tokenizer.all_special_ids]
    pad = next((int(i) for i in candidates if i is not None and int(i) not in ends), None)
    if pad is None:
        raise ModelError(f"the tokenizer has no token to pad with besides its end-of-turn tokens {sorted(ends)}: a "
                         "reward model is read at each row's last non-pad token, which is the end of turn; add a "
                         "pad token to tokenizer_config.json")
    if pad != tokenizer.pad_token_id:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    return pad


def encode_scored(tokenizer, messages: list[dict], max_length: int, where: str) -> Encoded:
    return scored(encode_conversation(tokenizer, messages, max_length, where), where)


def scores_of(model, batch: dict) -> torch.Tensor:
    """One score per row of a right-padded batch (float32), read by transformers at each row's last
    non-pad token (the model's config.pad_token_id)."""
    from tunesmith.training.memory import forward_budget

    with forward_budget(model, batch["input_ids"].numel()):  # train.activation_memory_mb (training/memory.py)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, 0].float()


# --- a trained reward model, loaded --------------------------------------------------------------

@dataclass
class RewardModel:
    model: torch.nn.Module
    tokenizer: object
    label: str
    max_length: int = 2048  # the run's data.max_length: conversations are cut as in training

    @torch.no_grad()
    def score(self, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
        """One score per conversation (prompt messages + the assistant reply), rendered with the
        reward model's chat template, batched (longest first, so each batch pads little)."""
        from tunesmith.data.batching import collate

        encoded = [encode_scored(self.tokenizer, conv, self.max_length, f"conversation {i}")
                   for i, conv in enumerate(conversations)]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
        device = next(self.model.parameters()).device
        out: list[float] = [0.0] * len(encoded)
        self.model.eval()
        for s in range(0, len(order), max(1, batch_size)):
            idx = order[s:s + batch_size]
            batch = collate([encoded[i] for i in idx], self.tokenizer.pad_token_id)
            values = scores_of(self.model, {k: v.to(device) for k, v in batch.items()})
            for i, v in zip(idx, values.tolist()):
                out[i] = v
        return out


def is_reward_run(path: str | Path) -> bool:
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return (json.loads(manifest.read_text()).get("objective") or {}).get("name") == "reward"
    except (ValueError, AttributeError):
        return False


def _check_saved_head(adapter: Path) -> None:
    """The adapter holds the trained score head (PEFT's modules_to_save): without it the loaded model
    would score with a random head."""
    from safetensors import safe_open

    files = list(adapter.glob("*.safetensors"))
    keys = [k for f in files for k in safe_open(str(f), "pt").keys()]
    if not any(".score." in f".{k}" for k in keys):
        raise ModelError(f"{adapter}: the adapter holds no trained score head (modules_to_save 'score'); it was not "
                         "saved by a reward model run")


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_reward_model(path: str | Path) -> RewardModel:
    """A reward run directory (objective.name=reward) loaded for scoring; ModelError naming the
    path when it is not one."""
    from tunesmith.generation import is_run_dir, run_base_path, run_config
    from tunesmith.methods import get_method
    from tunesmith.models.load import attach_adapter, load_score_model, load_tokenizer

    run = Path(path)
    if not run.exists():
        raise ModelError(f"{run}: no such reward model run directory")
    if not is_run_dir(run):
        raise ModelError(f"{run} is not a finished run directory (no manifest.json with adapter/ or model/); a "
                         "reward model is trained with `tunesmith train CONFIG objective.name=reward`")
    if not is_reward_run(run):
        name = (json.loads((run / "manifest.json").read_text()).get("objective") or {}).get("name", "sft")
        raise ModelError(f"{run} is a run of objective.name={name}, not a reward model; train one with "
                         "objective.name=reward")
    cfg = run_config(run)
    tokenizer = load_tokenizer(run / "tokenizer")  # its pad token is the one the run scored with
    if (run / "model" / "config.json").is_file():
        model = load_score_model(run / "model")
    else:
        _check_saved_head(run / "adapter")
        with _quiet_transformers():  # its load report: the base's score head is new, and replaced just below
            base = load_score_model(run_base_path(run), **get_method(cfg.method.name).load_kwargs(cfg.method))
        model = attach_adapter(base, run / "adapter")  # restores the trained score head (modules_to_save)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return RewardModel(model, tokenizer, run.name, cfg.data.max_length)
