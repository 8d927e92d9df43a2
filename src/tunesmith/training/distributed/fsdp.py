"""FSDP2 (torch's `fully_shard`): parameters, gradients and optimizer state split over the ranks.

Each decoder layer is its own FSDP unit (all-gathered just before its forward, freed after, again
for its backward); the root unit is the LossModule, so the embeddings, final norm and head are
gathered by the root's forward, around the loss that calls the decoder and the head directly.

Gradients are SUMMED over ranks: every rank divides its summed loss by the step's global token
count (loop.accumulate), so FSDP's default average would divide a second time. The reduce-scatter
is forced to a plain SUM with a divide factor of 1 (gloo has no PREMUL_SUM, and FSDP's AVG over
gloo is not to be trusted: tests/test_fsdp.py compares 2 processes against 1).

Checkpoints are torch.distributed.checkpoint folders (training/checkpoint.py), every rank writing
its own shard; they load on any number of ranks, or in one process without a process group.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from tunesmith.errors import ConfigError
from tunesmith.training.distributed.group import is_main
from tunesmith.training.distributed.strategy import LossModule, Strategy, inner_model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: the classes the model itself names as not to be
    split (transformers' `_no_split_modules`), else the decoder's `layers` list."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers and hasattr(base, "get_decoder"):
        found = getattr(base.get_decoder(), "layers", None)
        layers = list(found) if isinstance(found, torch.nn.ModuleList) else []
    if not layers:
        raise ConfigError(f"train.distributed.strategy=fsdp: found no decoder layers to shard in "
                          f"{type(base).__name__} (no _no_split_modules, no decoder .layers); use strategy ddp")
    return layers


def _is_prompt_learning(model) -> bool:
    cfg = getattr(model, "active_peft_config", None)
    return bool(cfg is not None and cfg.is_prompt_learning)


class FSDPStrategy(Strategy):
    name = "fsdp"
    shards = True

    def prepare(self, model, loss_fn):
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if _is_prompt_learning(model):
            # PEFT builds the saved prompt by running its encoder outside any forward, where FSDP
            # holds only a shard of it; the prompt is tiny anyway
            raise ConfigError("train.distributed.strategy=fsdp cannot train prompt/prefix tuning (PEFT computes "
                              "the saved prompt outside the sharded forward); use train.distributed.strategy=ddp")
        options = self._options()
        for layer in decoder_layers(model):  # after activation checkpointing (recipes/sft.py prepare_model)
            fully_shard(layer, **options)
        root = fully_shard(LossModule(model, loss_fn), **options)
        for unit in root.modules():
            if isinstance(unit, FSDPModule):  # per unit: the setters do not recurse
                unit.set_force_sum_reduction_for_comms(True)
                unit.set_gradient_divide_factor(1.0)
        return root

    def _options(self) -> dict:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        options = {}
        precision = self.placement.precision
        if self.placement.device.type == "cuda" and precision in ("bf16", "fp16"):
            # weights gathered and computed in half precision, gradients reduced in fp32 (a sum of
            # many ranks' half-precision gradients would lose their small parts)
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.placement.dtype, reduce_dtype=torch.float32)
        if getattr(self.dcfg, "fsdp_cpu_offload", False):
            if self.placement.device.type == "cpu":
                raise ConfigError("train.distributed.fsdp_cpu_offload=true moves an accelerator's shards to CPU "
                                  "memory; this run trains on the CPU already: remove it")
            options["offload_policy"] = CPUOffloadPolicy()  # pinned memory: copies overlap with compute
        return options

    def describe(self) -> str:
        extra = "; parameters, gradients and optimizer state kept on the CPU between uses" \
            if getattr(self.dcfg, "fsdp_cpu_offload", False) else ""
        return super().describe() + extra

    def no_sync(self, module):
        @contextlib.contextmanager
        def unsynced():
            module.set_requires_gradient_sync(False)  # accumulate unsharded gradients locally
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)
        return unsynced()

    def clip_grad_norm(self, module, max_norm: float) -> float:
        """The norm over every rank's shards (a collective), the same float on every rank."""
        from torch.distributed.tensor import DTensor

        params = [p for p in module.parameters() if p.requires_grad and p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # a partial (per-rank) sum of squares until reduced
        torch.nn.utils.clip_grads_with_norm_(params, max_norm if max_norm > 0 else math.inf, norm)
        return float(norm)

    def trainable_state(self, module):
        """The full trained weights on rank 0 (every rank takes part in gathering them), with the
        model's own key names: what save_pretrained(state_dict=...) expects. Adapters: only the
        trained weights (PEFT keeps the adapter's keys); full fine-tuning: the whole model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        model = inner_model(module)
        adapter = hasattr(model, "peft_config")
        state = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapter))
        if not is_main():
            return None
        # a tied weight (the head sharing the embeddings) comes out under each of its names, as two
        # gathered copies (frozen too: torch drops a frozen weight by its first name only): keep
        # its first name, as the model's own save does
        first: dict[int, str] = {}
        aliases = [n for n, p in model.named_parameters(remove_duplicate=False) if first.setdefault(id(p), n) != n]
        return {k: v for k, v in state.items() if k not in aliases}

    # --- checkpoints: every rank writes its shard (training/checkpoint.py) -------------------------
    def save_checkpoint(self, root: Path, module, optimizer, scheduler, state, keep_last: int, scaler=None) -> None:
        from tunesmith.training.checkpoint import save_sharded_checkpoint

        save_sharded_checkpoint(root, inner_model(module), optimizer, scheduler, state, keep_last, scaler)
