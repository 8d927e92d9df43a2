"""Losses. Cross-entropy is computed only at trained positions: the hidden states of prompt and
padding tokens never go through the vocabulary projection (49k columns for SmolLM2), which
saves that matmul and the logits' memory for every untrained token. The trained positions'
logits are not built whole either: `linear_cross_entropy` projects them a chunk of rows at a
time and keeps only the gradients it needs (see there)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.tokenize import IGNORE
from tunesmith.models.load import decoder_and_head
from tunesmith.training.concurrent import rows_loss_sum_with
from tunesmith.training.memory import forward_budget


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


def sft_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over trained targets, number of trained targets). A batch
    of separate unpadded sequences (`rows`, from data.batching.collate_examples) runs them
    `threads` at a time (see `rows_loss_sum`)."""
    if "rows" in batch:
        return rows_loss_sum(model, batch["rows"], batch.get("threads", 1))
    return _batch_loss_sum(model, batch)


def _batch_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    n_virtual = _virtual_tokens(model)
    if n_virtual is not None:
        return _prompt_learning_loss_sum(model, batch, n_virtual)
    decoder, head = decoder_and_head(model)
    # Packed batches carry position_ids and no attention_mask (data/pack.py). use_cache=False:
    # with a KV cache transformers ignores restarting positions and packed examples would leak.
    with forward_budget(model, batch["input_ids"].numel()):  # train.activation_memory_mb (training/memory.py)
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                         position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE
    return head_cross_entropy(head, hidden[:, :-1][keep], targets[keep]), int(keep.sum())


def rows_loss_sum(model, rows: list[dict], threads: int = 1) -> tuple[torch.Tensor, int]:
    """Summed loss of separate sequences, each through the ordinary path on its own."""
    return rows_loss_sum_with(_batch_loss_sum, model, rows, threads)


CHUNK_ROWS = 256  # rows of logits alive at once: 256 x 49,152 fp32 = 48 MiB for SmolLM2


def head_cross_entropy(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed CE of `head(hidden)` against `targets`. `head`: a models.load.OutputHead (its logit
    scale and soft-cap applied) or a bare module. Chunked when the projection is a plain linear
    layer (an adapter on the head itself, e.g. LoRA on lm_head, goes the ordinary way)."""
    proj = getattr(head, "proj", head)
    if type(proj) is torch.nn.Linear and hidden.shape[0] > 0:
        return linear_cross_entropy(hidden, proj.weight, proj.bias, targets, scale=getattr(head, "scale", 1.0),
                                    softcap=getattr(head, "softcap", None))
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_rows: int = CHUNK_ROWS, scale: float = 1.0,
                         softcap: float | None = None) -> torch.Tensor:
    """sum_i CE(z_i, targets[i]) with z_i = hidden[i] @ weight.T + bias, times `scale`, then
    soft-capped (cap * tanh(z / cap)) when `softcap` is set (models.load.OutputHead), never holding
    more than `chunk_rows` rows of logits. Equal to the unchunked computation up to float rounding.
    Its backward runs once (it scales gradients computed in the forward in place)."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, torch.is_grad_enabled(), scale,
                                     softcap)


class _LinearCrossEntropy(torch.autograd.Function):
    """The gradients are computed chunk by chunk in the forward, while each chunk's logits exist,
    and only scaled in the backward. Plain autograd would keep the [rows x vocab] log-softmax
    for the backward and build two more tensors that size in it (three copies of the logits);
    here the extra memory is one chunk plus d(hidden) [rows x hidden] and, only when the head
    trains (full fine-tuning), d(weight), which autograd would allocate anyway. Same FLOPs."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, grad_enabled, scale=1.0, softcap=None):
        need_h, need_w, need_b = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
            logits, dlogits = _finish(F.linear(h, weight, bias).float(), scale, softcap)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(t), device=t.device), t] -= 1  # d CE / d logits = softmax - onehot
            if dlogits is not None:  # chain rule through the scale / soft-cap: d CE / d (h @ W.T + b)
                grad.mul_(dlogits)
            if need_h:
                grad_h[start:start + chunk_rows] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(grad.t(), h.float())
            if need_b:
                grad_b += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out,
                None if grad_w is None else grad_w.mul_(grad_out).to(ctx.weight_dtype),  # in place: no 2nd copy
                None if grad_b is None else grad_b.mul_(grad_out).to(ctx.weight_dtype), None, None, None, None, None)


def _finish(raw: torch.Tensor, scale: float, softcap: float | None):
    """(logits, d logits / d raw or None) for OutputHead's transform of one chunk's raw logits."""
    if softcap:
        t = torch.tanh(raw * (scale / softcap))
        return t * softcap, (1 - t * t).mul_(scale)
    if scale != 1.0:
        return raw * scale, scale
    return raw, None


def reference_sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean CE the plain transformers way (full logits, labels=...): used by tests as a cross-check."""
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 position_ids=batch.get("position_ids"), labels=batch["labels"], use_cache=False).loss
