"""Losses. Cross-entropy is computed only at trained positions: the hidden states of prompt and
padding tokens never go through the vocabulary projection (49k columns for SmolLM2), which
saves that matmul and the logits' memory for every untrained token."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.tokenize import IGNORE
from tunesmith.models.load import decoder_and_head


def _virtual_tokens(model) -> int | None:
    """Virtual-token count of a PEFT prompt-learning model (prefix/prompt tuning), else None."""
    cfg = getattr(model, "active_peft_config", None)
    return cfg.num_virtual_tokens if cfg is not None and cfg.is_prompt_learning else None


def _prompt_learning_loss_sum(model, batch, n_virtual: int) -> tuple[torch.Tensor, int]:
    # PEFT injects the learned prefix/prompt inside its own forward, so these methods go through
    # it (full logits); prompt tuning returns logits for its virtual tokens first: drop them.
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    logits = out.logits[:, -batch["input_ids"].shape[1]:]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    loss = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


def sft_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over trained targets, number of trained targets)."""
    n_virtual = _virtual_tokens(model)
    if n_virtual is not None:
        return _prompt_learning_loss_sum(model, batch, n_virtual)
    decoder, head = decoder_and_head(model)
    # Packed batches carry position_ids and no attention_mask (data/pack.py). use_cache=False:
    # with a KV cache transformers ignores restarting positions and packed examples would leak.
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                     position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE
    logits = head(hidden[:, :-1][keep]).float()
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    return loss, int(keep.sum())


def reference_sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean CE the plain transformers way (full logits, labels=...): used by tests as a cross-check."""
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 position_ids=batch.get("position_ids"), labels=batch["labels"], use_cache=False).loss
