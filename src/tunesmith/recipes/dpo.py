"""Preference optimisation recipe (DPO and its family): setup -> train -> save, top to bottom.

No second model in memory: with an adapter method the reference is the same base with the adapter
disabled; with full fine-tuning (or objective.reference=precomputed) the reference log-probs are
computed once before training and cached. Chosen and rejected share the prompt's tokens exactly
(tokenize.encode_preference) and prompt tokens are never scored.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config import Config
from tunesmith.data.batching import collate
from tunesmith.data.tokenize import IGNORE, Encoded, EncodedPair, encode_preference
from tunesmith.errors import DataError
from tunesmith.models.load import decoder_and_head
from tunesmith.training import preference as pref
from tunesmith.training.distributed import sum_scalar
from tunesmith.training.losses import _virtual_tokens
from tunesmith.training.distributed.group import map_shared, world
from tunesmith.training.memory import forward_budget


@dataclass
class PairItem:
    """One preference pair; `input_ids` (the longer side) lets the length-grouped batcher sort pairs.
    `partner`: the pair whose replies KTO's mismatched rows give this pair's prompt (see _mismatched)."""
    index: int
    pair: EncodedPair
    partner: EncodedPair | None = None

    @property
    def n_tokens(self) -> int:
        """Tokens one pass over the pair processes: prompt + chosen and prompt + rejected."""
        return len(self.pair.chosen.input_ids) + len(self.pair.rejected.input_ids)

    @property
    def input_ids(self) -> list[int]:
        c, r = self.pair.chosen.input_ids, self.pair.rejected.input_ids
        return c if len(c) >= len(r) else r


def _mismatched(items: list[PairItem]) -> list[Encoded]:
    """KTO's KL reference point: each prompt with both replies of its partner pair (the next one
    in its data file, fixed when the data is encoded, as TRL's KTOTrainer builds its KL rows from
    the data), replies the model was never asked to prefer for that prompt. A fixed partner makes
    the rows the same whichever batch or process the pair lands in, so the estimate over a step
    is the same on 1 process or N."""
    out = []
    for it in items:
        p, other = it.pair.prompt_length, it.partner or it.pair
        q = other.prompt_length
        for seq in (other.chosen, other.rejected):
            out.append(Encoded(it.pair.chosen.input_ids[:p] + seq.input_ids[q:], [IGNORE] * p + seq.labels[q:]))
    return out


def collate_pairs(items: list[PairItem], pad_id: int, kl_rows: bool = False) -> dict:
    """Chosen rows first, then rejected rows, right-padded into one batch (one forward pass);
    `kl_rows` adds the mismatched rows an unpaired loss (KTO) needs for its reference point."""
    batch = collate([it.pair.chosen for it in items] + [it.pair.rejected for it in items], pad_id)
    batch.update(units=len(items), index=torch.tensor([it.index for it in items]))
    if kl_rows:
        batch["kl"] = collate(_mismatched(items), pad_id)
    return batch


def sequence_logps(model, batch: dict) -> pref.SeqLogps:
    """Summed log-prob of each row's trained tokens and their count, projecting only trained
    positions through the LM head."""
    if _virtual_tokens(model) is not None:  # prefix/prompt tuning act inside PEFT's own forward: full logits
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return pref.sequence_logps(logits, batch["labels"])
    decoder, head = decoder_and_head(model)
    with forward_budget(model, batch["input_ids"].numel()):  # train.activation_memory_mb (training/memory.py)
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
    return pref.sequence_logps_from_hidden(hidden, head, batch["labels"])


_PAIRS = "_pairs"  # a metrics record's weight: the pairs it was measured on


class PreferenceLoss:
    """loss_fn for the training loop: (loss x pairs, pairs), with per-step reward metrics."""

    def __init__(self, objective, reference_logps: dict[int, tuple[float, float]] | None):
        self.obj, self.cache = objective, reference_logps
        # KTO's z0 is the mean over every process's mismatched rows of a training forward (each
        # process runs one forward a step: run_dpo refuses grad_accum > 1 for KTO on several);
        # held-out batches are scored by one process each and keep their own batch's z0
        self.kl_across_ranks = True
        self.spec = pref.get_preference_loss(objective.loss)
        self.kwargs = self.spec.keywords(objective.loss, objective)
        self._metrics: list[dict] = []

    def _reference(self, model, batch: dict, rows: dict | None = None) -> torch.Tensor:
        """Reference log-probs of the batch's rows: cached, or the base with the adapter off."""
        if self.cache is not None and rows is None:
            idx = batch["index"].tolist()
            return torch.tensor([self.cache[i][0] for i in idx] + [self.cache[i][1] for i in idx])
        with torch.no_grad(), model.disable_adapter():
            return sequence_logps(model, rows or batch).sum

    def _loss(self, model, batch: dict, logps: pref.SeqLogps):
        n, spec = batch["units"], self.spec
        if not spec.paired:  # every row is its own example: the chosen rows desirable, the rejected not
            return spec.loss(logps, self._reference(model, batch), torch.arange(2 * n) < n, self._kl(model, batch),
                             **self.kwargs)
        args = [pref.SeqLogps(logps.sum[:n], logps.tokens[:n]), pref.SeqLogps(logps.sum[n:], logps.tokens[n:])]
        if spec.needs_reference:
            ref = self._reference(model, batch)
            args += [ref[:n], ref[n:]]
        return spec.loss(*args, **self.kwargs)

    def _kl(self, model, batch: dict) -> torch.Tensor:
        """The unpaired loss's reference point: policy vs reference on the mismatched rows, no gradient."""
        with torch.no_grad():
            return pref.kto_kl(sequence_logps(model, batch["kl"]).sum, self._reference(model, batch, batch["kl"]),
                               across_ranks=self.kl_across_ranks)

    def __call__(self, model, batch: dict):
        n = batch["units"]
        logps = sequence_logps(model, batch)
        loss, metrics = self._loss(model, batch, logps)
        self._metrics.append({**{k: float(v) for k, v in metrics.items()}, _PAIRS: n})
        self.last_logps = pref.SeqLogps(logps.sum.detach(), logps.tokens)
        return loss * n, n

    def pop_metrics(self) -> dict:
        """The logged steps' metrics as means over their pairs: each rank scored its own share of a
        step's pairs, so they are weighted by pairs and added over ranks (every rank calls this)."""
        rows, self._metrics = self._metrics, []
        keys = sorted(set().union(*rows) - {_PAIRS}) if rows else []
        means = {}
        for k in keys:
            total = sum_scalar(sum(r[k] * r[_PAIRS] for r in rows if k in r))
            means[k] = round(total / max(sum_scalar(sum(r[_PAIRS] for r in rows if k in r)), 1), 6)
        return means


def _batches(items: list, batch_size: int) -> list[list]:
    return [items[s:s + batch_size] for s in range(0, len(items), batch_size)]


@torch.no_grad()
def precompute_reference(model, items: list[PairItem], pad_id: int, batch_size: int) -> dict[int, tuple]:
    """Reference log-probs of every pair, once, with the model as it is before training. Under
    several processes each scores its share of the batches and every process gets the whole
    cache (a process trains whichever pairs its share of a step holds)."""
    if len({it.index for it in items}) != len(items):  # the cache is keyed by index: a repeat would overwrite
        raise ValueError("precompute_reference: pair indices repeat (training and validation must be numbered apart)")
    was = model.training
    model.eval()

    def score(group: list[PairItem]) -> list[tuple[int, tuple[float, float]]]:
        logps = sequence_logps(model, collate_pairs(group, pad_id)).sum
        n = len(group)
        return [(it.index, (float(logps[j]), float(logps[n + j]))) for j, it in enumerate(group)]

    try:
        return dict(kv for scored in map_shared(score, _batches(items, batch_size)) for kv in scored)
    finally:
        model.train(was)


@torch.no_grad()
def preference_accuracy(model, items: list[PairItem], loss: PreferenceLoss, pad_id: int, batch_size: int) -> dict:
    """Held-out preference accuracy (chosen reward above rejected), loss, and the policy's own
    preference: the share of pairs whose chosen reply has the higher mean log-prob per token. The
    reward accuracy is 0 at step 0 by construction (policy == reference: both rewards are 0); the
    policy's own preference is the base model's there, so its rise measures what training taught.

    Under several processes each batch is scored by one of them (each pair once) and the sums
    gathered: every process gets the numbers of one process, so they decide alike on them."""
    def score(group: list[PairItem]) -> tuple[float, int, float, int]:
        value, n = loss(model, collate_pairs(group, pad_id, kl_rows=not loss.spec.paired))
        m = loss._metrics[-1]
        # KTO has no paired accuracy; its chosen-vs-rejected reward comparison stands in
        acc = m.get("rewards/accuracies", float(m.get("rewards/chosen", 0) > m.get("rewards/rejected", 0)))
        mean = loss.last_logps.mean
        return float(value), n, acc * n, int((mean[:n] > mean[n:]).sum())

    was = model.training
    model.eval()
    loss.kl_across_ranks = False  # a held-out batch's z0 is its own: no other process runs that batch
    try:
        scored = map_shared(score, _batches(items, batch_size))
    finally:
        loss._metrics.clear()
        loss.kl_across_ranks = True
        model.train(was)
    total, n_all, correct, prefers = (sum(column) for column in zip(*scored)) if scored else (0.0, 0, 0.0, 0)
    return {"val_loss": total / max(n_all, 1), "val_preference_accuracy": correct / max(n_all, 1),
            "val_policy_prefers_chosen": prefers / max(n_all, 1)}


def encode_pairs(tokenizer, examples, max_length: int, source: str, first_index: int = 0) -> list[PairItem]:
    """Pairs numbered from `first_index`: a split's numbers must not repeat another's (the
    precomputed reference log-probs are keyed by them)."""
    pairs = [ex for ex in examples if ex.kind == "preference"]
    if len(pairs) != len(examples):
        raise DataError(f"{source}: this objective needs preference rows (prompt/chosen/rejected); "
                        f"{len(examples) - len(pairs)} of {len(examples)} rows are not")
    items = []
    for i, ex in enumerate(pairs):
        enc = encode_preference(tokenizer, ex, max_length)
        if enc.chosen.trained_tokens and enc.rejected.trained_tokens:  # both sides must keep a response
            items.append(PairItem(first_index + i, enc))
    if len(items) < len(pairs) // 2:
        raise DataError(f"{source}: {len(pairs) - len(items)} of {len(pairs)} pairs lose their response to "
                        f"truncation at data.max_length={max_length}; raise data.max_length")
    for k, it in enumerate(items):  # KTO's mismatched rows: each prompt with the next pair's replies
        it.partner = items[(k + 1) % len(items)].pair
    return items


def run_dpo(cfg: Config, resume: bool = False, force: bool = False) -> Path:
    """setup -> (reference) -> train -> save; the run directory has the SFT recipe's shape."""
    from tunesmith.data.templates import apply_template
    from tunesmith.errors import ConfigError
    from tunesmith.methods import count_parameters, get_method
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.models.registry import resolve_model, sha256_file
    from tunesmith.recipes.preflight import check_plan, refuse_sharded_validation
    from tunesmith.recipes.sft import (apply_process_settings, check_context, data_files_of, load_split,
                                       load_training_examples, metrics_logger, model_attention, prepare_model)
    from tunesmith.training.device import choose_placement
    from tunesmith.training.loop import total_steps, train
    from tunesmith.atomic import write_json
    from tunesmith.training.manifest import now_iso
    from tunesmith.training.run import final_evaluation, manifest_base, open_run, save_run_outputs
    from tunesmith.training.distributed import is_main
    from tunesmith.training.distributed.strategy import choose_strategy

    started, tcfg, obj = now_iso(), cfg.train, cfg.objective
    spec = pref.get_preference_loss(obj.loss)
    spec.keywords(obj.loss, obj)  # objective options this loss does not read: refused before any work
    method = get_method(cfg.method.name)
    adapter = method.saves == "adapter"
    if spec.needs_adapter and not adapter:
        raise ConfigError(f"objective.loss={obj.loss} needs an adapter method, not method.name={cfg.method.name} "
                          "(its KL estimate scores mismatched pairs under the adapter-disabled base)")
    if not spec.paired and world()[1] > 1 and tcfg.grad_accum > 1:
        # z0 is gathered over the processes' forwards: with accumulation their j-th forwards hold
        # different micro-batches (so z0 would not be one process's), and a short last batch can
        # leave them with different numbers of forwards, whose gathers would never meet
        raise ConfigError(f"objective.loss={obj.loss} on {world()[1]} processes needs train.grad_accum=1 (it is "
                          f"{tcfg.grad_accum}): its KL estimate z0 is the mean over the step's forward on every "
                          f"process. Set train.batch_size={tcfg.batch_size * tcfg.grad_accum} train.grad_accum=1 "
                          "(each process then runs its share of the step in one forward)")
    apply_process_settings(tcfg)
    torch.manual_seed(tcfg.seed)
    resolved = resolve_model(cfg.model.name)
    check_context(cfg, resolved.path)
    tokenizer = load_tokenizer(resolved.path)
    template = apply_template(tokenizer, cfg.data.template)
    data = load_training_examples(cfg)
    items = encode_pairs(tokenizer, data.examples, cfg.data.max_length, "training data")
    val = encode_pairs(tokenizer, load_split(cfg, cfg.data.validation).examples, cfg.data.max_length,
                       cfg.data.validation, first_index=len(data.examples)) if cfg.data.validation else None
    print(f"data: {len(items)} preference pairs" + (f", {len(val)} held out" if val else "") +
          f"; loss: {obj.loss}; chat template: {template}", flush=True)

    placement = choose_placement(tcfg.precision)
    print(f"device: {placement.reason}", flush=True)
    plan = check_plan(cfg, force, [it.n_tokens for it in items],  # a pair's tokens: chosen + rejected
                      longest=max((len(it.input_ids) for it in items), default=0),
                      trained=[max(it.pair.chosen.trained_tokens, it.pair.rejected.trained_tokens) for it in items])
    model = load_model(resolved.path, dtype=placement.frozen_dtype(method), trust_remote_code=cfg.model.trust_remote_code,
                       attention=model_attention(cfg, resolved.path, placement), **method.load_kwargs(cfg.method))
    precompute = spec.needs_reference and (obj.reference == "precomputed" or not adapter)
    cache = None
    if precompute:  # the reference is the model before training: score every pair once, keep no copy
        print("computing reference log-probs once", flush=True)
        cache = precompute_reference(model, items + (val or []), tokenizer.pad_token_id, tcfg.batch_size)
    model = prepare_model(method.build(model, cfg.method), cfg, placement)
    trainable, total = count_parameters(model)
    print(f"model: {resolved.id}  method: {cfg.method.name}  trainable {trainable:,} of {total:,}", flush=True)
    loss_fn = PreferenceLoss(obj, cache)
    strategy = choose_strategy(tcfg.distributed, method, model, placement)
    print(strategy.describe(), flush=True)
    refuse_sharded_validation(strategy, val, "preference accuracy")

    evaluated: dict = {}  # the last evaluation's step and numbers: the same on every process

    def evaluator(step: int | None = None) -> dict:
        metrics = preference_accuracy(model, val, loss_fn, tokenizer.pad_token_id, tcfg.batch_size)
        evaluated.update(step=step, metrics=dict(metrics))
        return metrics

    with open_run(cfg, resume, prefix="dpo") as run:
        logger = metrics_logger(run, tcfg, total_steps(len(items), tcfg))
        start = evaluator() if val and run.checkpoint is None else None
        if start:
            logger.log(0, **{k: round(v, 6) for k, v in start.items()})
            print(f"step     0  held-out preference accuracy {start['val_preference_accuracy']:.3f}  "
                  f"policy prefers chosen {start['val_policy_prefers_chosen']:.3f}", flush=True)
        try:
            result = train(model, items, tcfg, loss_fn, tokenizer.pad_token_id, logger, val, run_dir=run.dir,
                           resume=run.checkpoint, placement=placement, evaluator=evaluator if val else None,
                           collate_fn=lambda group, pad: collate_pairs(group, pad, not spec.paired), strategy=strategy)
        finally:
            logger.close()
        save_run_outputs(run, model, tokenizer, strategy)
        end = None
        if val:
            end = final_evaluation(evaluated, result, tcfg, evaluator)
        if not is_main():
            return run.final
        manifest = manifest_base("dpo", run, resolved, (trainable, total), started, result, placement,
                                 plan and plan.record())
        manifest.update({
            "objective": obj.model_dump(),
            "data": {"formats": dict(data.formats), "chat_template": template, "pairs": len(items),
                     "validation_pairs": len(val or []), "files_sha256": {str(p): sha256_file(p) for p in data_files_of(cfg)}},
            "reference": "precomputed" if cache is not None else ("adapter-disabled base" if loss_fn.spec.needs_reference else "none"),
            "preference_accuracy": {"start": start, "end": end},
        })
        write_json(run.dir / "manifest.json", manifest)
    return run.final
