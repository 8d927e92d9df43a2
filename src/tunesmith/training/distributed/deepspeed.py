"""DeepSpeed ZeRO-2/3 as a strategy (an optional extra: pip install 'tunesmith[deepspeed]').

tunesmith's config is mapped to DeepSpeed's JSON here (`deepspeed_config`, importable without
DeepSpeed), and every DeepSpeed call goes through this module. What stays tunesmith's:

- Batches: train.batch_size x train.grad_accum is the GLOBAL step batch, split over the ranks by
  the loop (which also decides each forward's size). DeepSpeed's three batch numbers are set to
  describe the same step (train_batch_size = the step batch, micro x accumulation = one rank's
  share); the loop tells the engine where a step ends (set_gradient_accumulation_boundary), so
  DeepSpeed's own micro-step counting never decides anything.
- Loss: the loop divides each summed loss by the step's global token count and wants gradients
  SUMMED over ranks; DeepSpeed divides by its accumulation steps (off: scale_wrt_gas=False) and
  AVERAGES over ranks, so the loss is multiplied by the world size before its backward (exact
  for power-of-two worlds, one rounding otherwise).
- Schedule: the loop's scheduler (train.schedule, warmup) sets the lr of the optimizer tunesmith
  built, whose param_groups ZeRO steps; DeepSpeed gets no scheduler. Clipping: ZeRO clips inside
  engine.step() at train.max_grad_norm (its formula is torch's clip_grad_norm_).
- Saving: the final weights are the fp32 master weights gathered from every rank (ZeRO-3 holds
  each weight in shards: saving the model's own would write an empty adapter). Checkpoints are
  DeepSpeed's (engine.save_checkpoint, every rank its shards) inside tunesmith's step-N folder,
  which appears complete (state.json last, renamed into place) or not at all.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import torch

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.training.distributed.group import barrier, is_main, world
from tunesmith.training.distributed.strategy import LossModule, Strategy, inner_model

INSTALL = "pip install 'tunesmith[deepspeed]'"
TAG = "zero"  # DeepSpeed's name for the checkpoint inside tunesmith's step-N folder
STAGES = (2, 3)
AUTO = "auto"  # what Hugging Face's DeepSpeed JSONs write for "filled in by the trainer"


# --- config mapping (no DeepSpeed import) ------------------------------------------------------
def read_user_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.distributed.deepspeed.config: {path} is not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"train.distributed.deepspeed.config: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"train.distributed.deepspeed.config: {path} must hold a JSON object")
    return data


def batch_numbers(batch_size: int, grad_accum: int, world_size: int) -> tuple[int, int, int]:
    """(train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps) for a step
    of batch_size x grad_accum examples over world_size ranks: a rank's share as the fewest
    accumulation steps of at most batch_size examples that divide it evenly."""
    step = batch_size * grad_accum
    if step % world_size:
        raise ConfigError(f"train.batch_size x train.grad_accum = {step} cannot be split over {world_size} "
                          "processes")
    share = step // world_size
    gas = next(g for g in range(math.ceil(share / batch_size), share + 1) if share % g == 0)
    return step, share // gas, gas


def zero_optimization(ds_cfg, user: dict | None, source: str, device_type: str = "cuda") -> dict:
    """DeepSpeed's zero_optimization section: the JSON's when given (tunesmith's keys, where set,
    must agree with it), else built from train.distributed.deepspeed."""
    key = "train.distributed.deepspeed"
    default = type(ds_cfg).model_fields
    ours = {"stage": ds_cfg.zero_stage}
    if ds_cfg.offload_optimizer != "none":
        ours["offload_optimizer"] = {"device": ds_cfg.offload_optimizer, "pin_memory": device_type == "cuda"}
    if ds_cfg.offload_params != "none":
        ours["offload_param"] = {"device": ds_cfg.offload_params, "pin_memory": device_type == "cuda"}
    zero = ours
    if user is not None and "zero_optimization" in user:
        zero = dict(user["zero_optimization"])
        theirs = {"zero_stage": zero.get("stage", 0),
                  "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device", "none"),
                  "offload_params": (zero.get("offload_param") or {}).get("device", "none")}
        for name, value in theirs.items():
            mine = getattr(ds_cfg, name)
            if mine != default[name].default and mine != value:
                raise ConfigError(f"{key}.{name}={mine!r} but {source} says {value!r} (zero_optimization): set it "
                                  f"in one place")
    stage = zero.get("stage", 0)
    if stage not in STAGES:
        raise ConfigError(f"{source}: zero_optimization.stage={stage}; tunesmith runs DeepSpeed with ZeRO stage 2 "
                          "or 3 (for no sharding use train.distributed.strategy=ddp)")
    if (zero.get("offload_param") or {}).get("device", "none") != "none" and stage != 3:
        raise ConfigError(f"{source}: zero_optimization.offload_param needs stage 3 (it is {stage}): ZeRO-2 keeps "
                          "every weight on every rank")
    return zero


def _agree(out: dict, key: str, value, source: str, fix: str) -> None:
    """Set out[key] = value unless the user's JSON already says something else ("auto" = fill in)."""
    theirs = out.get(key, AUTO)
    if theirs != AUTO and theirs != value:
        raise ConfigError(f"{source} sets {key}={theirs!r}, but tunesmith sets it to {value!r} from {fix}: remove "
                          f"{key} from {source} (or set it to \"auto\"), or change train.*")
    out[key] = value


def _check_optimizer(section: dict, tcfg, source: str) -> None:
    """A JSON written for another trainer may carry an AdamW section: accepted when it asks for the
    AdamW tunesmith builds from train.* (the one DeepSpeed then steps), refused otherwise."""
    kind = str(section.get("type", AUTO)).lower()
    plain_adam = kind == "adam" and not section.get("params", {}).get("adam_w_mode", True)  # no decoupled decay
    if kind not in ("adamw", "adam", AUTO) or plain_adam:
        raise ConfigError(f"{source}: optimizer type {section.get('type')!r}; tunesmith trains with AdamW "
                          "(train.optimizer): remove the optimizer section")
    expected = {"lr": (tcfg.lr, "train.lr"), "weight_decay": (tcfg.weight_decay, "train.weight_decay"),
                "betas": ([0.9, 0.999], "tunesmith's AdamW"), "eps": (1e-8, "tunesmith's AdamW"),
                "adam_w_mode": (True, "tunesmith's AdamW")}
    for name, theirs in section.get("params", {}).items():
        if name not in expected:
            raise ConfigError(f"{source}: optimizer.params.{name}: tunesmith builds AdamW from train.*; remove it")
        value, field = expected[name]
        theirs = list(theirs) if isinstance(theirs, (list, tuple)) else theirs
        if theirs != AUTO and theirs != value:
            raise ConfigError(f"{source} sets optimizer.params.{name}={theirs!r}, but {field} is {value!r}: "
                              f"remove it from {source} (or set it to \"auto\"), or change {field}")


def _find_auto(node, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    return [path] if node == AUTO else []


def deepspeed_config(tcfg, placement, world_size: int, user: dict | None = None,
                     source: str = "the DeepSpeed JSON") -> dict:
    """DeepSpeed's JSON for train.* (tcfg) on `world_size` ranks in `placement`'s precision, starting
    from a user's JSON when given (theirs wins except where tunesmith must decide: a conflict is an
    error naming both)."""
    out = json.loads(json.dumps(user or {}))  # a deep copy
    step, micro, gas = batch_numbers(tcfg.batch_size, tcfg.grad_accum, world_size)
    split = (f"train.batch_size x train.grad_accum = {tcfg.batch_size} x {tcfg.grad_accum} examples a step over "
             f"{world_size} process(es): {micro} x {gas} a process")
    _agree(out, "train_batch_size", step, source, split)
    _agree(out, "train_micro_batch_size_per_gpu", micro, source, split)
    _agree(out, "gradient_accumulation_steps", gas, source, split)
    _agree(out, "gradient_clipping", float(tcfg.max_grad_norm), source, "train.max_grad_norm (0: no clipping)")
    if placement.precision == "fp16":
        raise ConfigError("fp16 with train.distributed.strategy=deepspeed: the loop's fp16 loss scaler cannot "
                          "reach DeepSpeed's partitioned gradients; set train.precision=bf16 (or use ddp/fsdp)")
    for name in ("bf16", "fp16"):
        want = placement.precision == name
        section = out.setdefault(name, {})
        theirs = section.get("enabled", AUTO)
        if theirs != AUTO and bool(theirs) != want:
            raise ConfigError(f"{source} sets {name}.enabled={theirs}, but this run trains in {placement.precision} "
                              f"(train.precision={tcfg.precision}): remove {name} from {source} or change "
                              "train.precision")
        section["enabled"] = want
    if "optimizer" in out:
        _check_optimizer(out.pop("optimizer"), tcfg, source)
    if "scheduler" in out:
        raise ConfigError(f"{source} has a scheduler section: tunesmith's train.schedule and train.warmup_steps "
                          f"set the learning rate; remove it from {source}")
    out["zero_optimization"] = zero_optimization(tcfg.distributed.deepspeed, user, source, placement.device.type)
    out.setdefault("steps_per_print", 2**62)  # tunesmith logs the steps; DeepSpeed's own lines would repeat them
    out.setdefault("wall_clock_breakdown", False)
    left = _find_auto(out)
    if left:
        raise ConfigError(f"{source}: {', '.join(left)} {'is' if len(left) == 1 else 'are'} \"auto\"; tunesmith "
                          "fills in only batch sizes, accumulation, clipping, precision and the optimizer: give "
                          "a value")
    return out


def offloads_optimizer(config: dict) -> bool:
    return (config["zero_optimization"].get("offload_optimizer") or {}).get("device", "none") != "none"


# --- the strategy -------------------------------------------------------------------------------
def _deepspeed():
    """The deepspeed package, imported here only (an optional extra)."""
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(f"train.distributed.strategy=deepspeed needs DeepSpeed ({exc}): {INSTALL}") from None
    import logging

    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines come from every rank, on every step
    return deepspeed


class DeepSpeedModule(torch.nn.Module):
    """What the loop holds and calls as module(batch). The loop wraps the model (prepare) before it
    builds the optimizer (make_optimizer), and DeepSpeed builds its engine from both at once: this
    stand-in holds the model with its loss (so inner_model finds it) and calls the engine that
    make_optimizer puts behind it (engine.forward must run: ZeRO resets its hook state there)."""

    def __init__(self, loss_module: LossModule):
        super().__init__()
        self.module = loss_module
        object.__setattr__(self, "engine", None)  # not a submodule: it holds the same parameters

    def forward(self, batch: dict):
        if self.engine is None:
            raise TunesmithError("DeepSpeedStrategy.make_optimizer builds the engine before the first forward")
        return self.engine(batch)


class _NormAfterStep:
    """The step's gradient norm before clipping. The loop asks for it before optimizer_step and
    reads it (float) only after, when ZeRO has measured it inside engine.step()."""

    def __init__(self, engine):
        self.engine = engine

    def __float__(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return math.nan if norm is None else float(norm)


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    shards = True

    def __init__(self, placement, dcfg, reason: str = "one process"):
        super().__init__(placement, dcfg, reason)
        _deepspeed()  # a missing extra stops the run before its directory is made
        ds = dcfg.deepspeed
        self.source = ds.config or "train.distributed.deepspeed"
        self.user = read_user_config(ds.config) if ds.config else None
        self.zero = zero_optimization(ds, self.user, self.source, placement.device.type)
        self.engine = None
        self.max_norm = None

    def describe(self) -> str:
        offload = [f"{what} offloaded to {self.zero[key]['device']}" for key, what in
                   (("offload_optimizer", "optimizer"), ("offload_param", "weights"))
                   if (self.zero.get(key) or {}).get("device", "none") != "none"]
        return f"strategy deepspeed (ZeRO-{self.zero['stage']}{', ' + ', '.join(offload) if offload else ''}): " \
               f"{self.reason}"

    def prepare(self, model, loss_fn):
        return DeepSpeedModule(LossModule(model, loss_fn))

    def make_optimizer(self, module: DeepSpeedModule, tcfg):
        """tunesmith's AdamW (DeepSpeed's CPU Adam when the optimizer is offloaded: the same update,
        computed on the CPU) and the engine around it. Returns that optimizer: ZeRO steps its
        param_groups, so the loop's scheduler sets their lr."""
        deepspeed = _deepspeed()
        import torch.distributed as dist

        config = deepspeed_config(tcfg, self.placement, world()[1], self.user, self.source)
        _check_savable(inner_model(module), config["zero_optimization"]["stage"])
        params = [p for p in module.parameters() if p.requires_grad]
        if offloads_optimizer(config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, adamw_mode=True)
        else:
            optimizer = super().make_optimizer(module, tcfg)
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)  # wraps the run's group
        engine, *_ = deepspeed.initialize(model=module.module, optimizer=optimizer, config=config,
                                          dist_init_required=False)
        engine.set_gradient_accumulation_boundary(True)  # until no_sync says otherwise (see backward)
        object.__setattr__(module, "engine", engine)
        self.engine, self.max_norm = engine, float(tcfg.max_grad_norm)
        return optimizer

    @contextlib.contextmanager
    def no_sync(self, module):
        """A micro-batch that is not the step's last: the engine must not take its step yet."""
        self.engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.engine.set_gradient_accumulation_boundary(True)

    def backward(self, module, loss):
        # the loop's loss is already the step's mean (scale_wrt_gas=False); ZeRO averages the
        # gradients over ranks where the loop wants them summed: x world size
        self.engine.backward(loss * world()[1], scale_wrt_gas=False)

    def clip_grad_norm(self, module, max_norm: float):
        if float(max_norm) != self.max_norm:
            raise TunesmithError(f"DeepSpeed clips at gradient_clipping={self.max_norm} (train.max_grad_norm), "
                                 f"not {max_norm}")
        return _NormAfterStep(self.engine)

    def optimizer_step(self, module, optimizer, scheduler, scaler) -> dict:
        self.engine.step()  # reduce, clip, AdamW on each rank's shard, zero the gradients
        scheduler.step()
        return {}

    def trainable_state(self, module) -> dict[str, torch.Tensor] | None:
        """The full trained weights on rank 0 (a collective): the fp32 master weights (the model's
        own are bf16 under bf16, and shards under ZeRO-3). An adapter needs only those; a whole
        model also its frozen weights (gathered) and buffers."""
        deepspeed = _deepspeed()
        model = inner_model(module)
        whole = not _is_peft(model)
        state = {}
        for name, p in model.named_parameters():  # the same order on every rank: each is a collective
            if p.requires_grad:
                value = deepspeed.utils.safe_get_full_fp32_param(p)
            elif whole:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):  # a no-op below ZeRO-3
                    value = p.detach().clone()
            else:
                continue
            if is_main():
                state[name] = value.detach().to("cpu", copy=True).contiguous()
        if whole:
            buffers = {n for n, _ in model.named_buffers()}
            state.update({n: b.detach().cpu() for n, b in model.state_dict().items() if n in buffers})
        return state if is_main() else None

    # --- checkpoints: DeepSpeed's shards inside tunesmith's step-N folder ------------------------
    def save_checkpoint(self, root: Path, module, optimizer, scheduler, state, keep_last: int, scaler=None) -> None:
        from dataclasses import asdict

        from tunesmith.atomic import atomic_dir
        from tunesmith.training.checkpoint import _prune, _rng_state

        final = root / f"step-{state.step}"
        staging = root / f".step-{state.step}.deepspeed"  # one name every rank writes its shards into
        if is_main():
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        try:
            self.engine.save_checkpoint(str(staging), tag=TAG, client_state={}, save_latest=False,
                                        exclude_frozen_parameters=True)  # frozen weights: the base model's file
            barrier()
            if is_main():
                with atomic_dir(final, if_exists="replace", staging=staging) as tmp:
                    torch.save({"scheduler": scheduler.state_dict(), "rng": _rng_state(), "world_size": world()[1],
                                "zero_stage": self.zero["stage"]}, tmp / "tunesmith.pt")
                    (tmp / "state.json").write_text(json.dumps(asdict(state)))  # last: marks completeness
                _prune(root, keep_last, state.best_step)
        except BaseException as exc:
            if is_main():  # the unfinished shards never look like a checkpoint, and do not stay behind
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError):
                raise TunesmithError(f"could not write checkpoint step-{state.step} in {root} "
                                     f"({exc.strerror or exc}); earlier checkpoints are intact") from exc
            raise
        barrier()

    def load_checkpoint(self, path: Path, module, optimizer, scheduler, scaler=None):
        from tunesmith.training.checkpoint import TrainState, _set_rng_state

        extra = self._load_engine(path, "resume from")
        scheduler.load_state_dict(extra["scheduler"])
        _set_rng_state(extra["rng"])
        return TrainState(**json.loads((path / "state.json").read_text()))

    def restore_weights(self, module, ckpt_root: Path | None, step: int) -> None:
        path = ckpt_root / f"step-{step}" if ckpt_root else None
        if path is None or not (path / "state.json").is_file():
            raise TunesmithError(f"train.restore_best: no checkpoint of step {step} (set train.save_every)")
        self._load_engine(path, "restore the best weights from")  # the optimizer's too: they hold the masters
        print(f"restored the best weights (step {step})", flush=True)

    def _load_engine(self, path: Path, doing: str) -> dict:
        marker = path / "tunesmith.pt"
        if not marker.is_file():
            raise TunesmithError(f"cannot {doing} {path} with DeepSpeed: it is not a DeepSpeed checkpoint (it was "
                                 "saved by another train.distributed.strategy); resume with that strategy")
        extra = torch.load(marker, weights_only=True)
        if extra["world_size"] != world()[1] or extra["zero_stage"] != self.zero["stage"]:
            raise TunesmithError(f"cannot {doing} {path}: it holds ZeRO-{extra['zero_stage']} shards of "
                                 f"{extra['world_size']} processes, this run has ZeRO-{self.zero['stage']} on "
                                 f"{world()[1]}; resume with the same --nproc and zero stage")
        loaded, _ = self.engine.load_checkpoint(str(path), tag=TAG, load_module_strict=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise TunesmithError(f"DeepSpeed found no checkpoint in {path / TAG}")
        return extra


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "active_peft_config")


def _check_savable(model, stage: int) -> None:
    """PEFT saves prompt-learning adapters (prefix, prompt) by running their encoder on rank 0
    alone; under ZeRO-3 that forward would wait forever for the other ranks' shards."""
    if stage == 3 and _is_peft(model) and model.active_peft_config.is_prompt_learning:
        raise ConfigError("method.name prefix/prompt with ZeRO-3: PEFT saves these adapters by running their "
                          "encoder on one rank, which ZeRO-3's sharded weights cannot do; use "
                          "train.distributed.deepspeed.zero_stage=2 (or strategy ddp: their weights are tiny)")
