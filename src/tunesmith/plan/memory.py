"""Bytes per device, component by component (helper M implements `estimate_memory`).

Components (keys of MemoryEstimate.components, in this order; a component that does not apply is 0):
  weights          frozen base weights in their dtype (4-bit NF4 with or without double quant for QLoRA's
                   linear layers; the head, embeddings and norms stay in the compute dtype)
  trainable        trained weights (fp32, training/device.py trainable_in_fp32)
  gradients        of the trained weights (fp32)
  optimizer        AdamW: 2 fp32 moments; 8-bit: 2 bytes; paged: as 8-bit, pageable to CPU
  activations      what the forwards running at once keep for their backward (per layer, with or without
                   checkpointing, train.activation_memory_mb's budget; training/memory.py's per-layer figure)
  logits           the LM head's chunked cross-entropy (training/losses.py CHUNK_ROWS) and its grads
  kv_cache         eval/generation during training (eval.during_training), else 0
  overhead         framework: CUDA context + allocator slack on GPUs; the interpreter, torch and
                   allocator slack on CPU (measured in this process for this machine)
divided by the strategy (ddp: every rank holds all; fsdp: weights, grads and optimizer / world plus one
layer gathered; ZeRO-2: grads and optimizer / world; ZeRO-3: all three / world; offload: to CPU memory).

Every figure below is either read from the code that training runs (named where used) or measured, and
the physical reason for each term is said in `notes`. Calibrated on CPU by benchmarks/plan_memory_probe.py
(docs/notes/issue17-plan-memory.md has the table).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

COMPONENTS = ("weights", "trainable", "gradients", "optimizer", "activations", "logits", "kv_cache", "overhead")

GiB = 2**30
NF4_BLOCK = 64             # bitsandbytes 4-bit blocksize (one absmax per 64 weights)
DQ_BLOCK = 256             # double quant: the 8-bit absmaxes are themselves quantized per 256
DQ_CODE = 256 * 4          # double quant's own fp32 code table (256 entries) per layer
NF4_CODE = 16 * 4          # the NF4 code (16 fp32 levels) each layer's QuantState keeps
BNB8_BLOCK = 256           # bitsandbytes 8-bit optimizer states: one fp32 absmax per 256 values
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed zero_optimization.reduce_bucket_size default (elements)
CUDA_CONTEXT = int(0.75 * GiB)  # CUDA context + cuBLAS/cuDNN handles, outside torch's allocator
CUDA_SLACK = 0.08          # caching allocator: reserved-but-unused blocks, as a fraction of the tensors
CPU_BASE = 430 * 2**20     # RSS of python + torch + transformers + peft imported (measured here: 447 MB)
CPU_TOKENIZER = 50 * 2**20  # a fast tokenizer (SmolLM2's 49k vocabulary: 49 MB RSS measured)
DATA_BYTES_PER_TOKEN = 48  # encoded examples as Python lists: 2 x 8-byte pointers + one int object per token
CPU_SLACK = 0.10           # CPU allocator (mimalloc/tcmalloc/glibc) holding freed activations, fraction of them

# Activation bytes per element the saved tensors take, measured with saved-tensor hooks on a Llama layer
# (tests/test_plan_memory.py re-measures them): fp32 everywhere: 4. Half-precision autocast over a half
# base (adapters on a GPU): 2.8, not 2 (RMSNorm upcasts its input to fp32, PEFT casts the LoRA input to the
# adapter's fp32 dtype). Autocast over fp32 weights (full fine-tuning, QLoRA's upcast norms/embeddings): the
# residual stream stays fp32 and autocast saves half copies beside it: ~4.
ACT_BYTES = {"fp32": 4.0, "half_base": 2.8, "fp32_base_autocast": 4.0}


@dataclass(frozen=True)
class MemoryEstimate:
    components: dict[str, int]          # bytes on one device (rank 0), COMPONENTS order
    capacity: int                       # bytes the device has
    host: dict[str, int] = field(default_factory=dict)  # bytes put in CPU memory by offload, per component
    notes: tuple[str, ...] = ()         # assumptions said out loud ("activations at the longest sequence: 512")

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def margin(self) -> int:
        """Bytes left (negative: short by that much)."""
        return self.capacity - self.total

    @property
    def fits(self) -> bool:
        return self.margin >= 0


def _gb(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


# --- weights ---------------------------------------------------------------------------------------
def nf4_bytes(numel: int, double_quant: bool, layers: int = 1) -> int:
    """bitsandbytes' storage of `numel` weights in NF4 over `layers` Linear4bit layers: two 4-bit values
    per byte, plus per 64-block an fp32 absmax, or with double quant an 8-bit absmax, one fp32 absmax per
    256 of those, a 256-entry fp32 code and an fp32 offset (bitsandbytes.functional.quantize_4bit)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    if not double_quant:
        return numel // 2 + 4 * blocks + NF4_CODE * layers
    return numel // 2 + blocks + 4 * math.ceil(blocks / DQ_BLOCK) + (NF4_CODE + DQ_CODE + 4) * layers


def layer_params(shape) -> int:
    """One decoder layer's weights (attention + gated MLP + two norms): what FSDP gathers at a time."""
    attn = shape.hidden * (2 * shape.q_width + 2 * shape.kv_width)
    return attn + 3 * shape.hidden * shape.intermediate + 2 * shape.hidden


def _weights(shape, counts, w, notes) -> int:
    frozen = counts.base - (counts.trainable if counts.trains_base else 0)
    if not w.quantized:
        notes.append(f"weights: {frozen:,} frozen parameters x {w.base_dtype_bytes:g} bytes "
                     f"({'half-precision base: adapters on a GPU' if w.base_dtype_bytes == 2 else 'fp32'})")
        return int(frozen * w.base_dtype_bytes)
    n_linear = 7 * shape.layers
    q = nf4_bytes(counts.quantized, w.double_quant, n_linear)
    rest = frozen - counts.quantized
    # bitsandbytes dequantizes a whole weight to the compute dtype for each matmul (forward, and the input
    # gradient in the backward): one layer's dequantized copy exists at a time
    largest = shape.hidden * max(shape.intermediate, shape.q_width)
    compute = 4 if w.precision == "fp32" else 2
    notes.append(f"weights: {counts.quantized:,} linear weights in NF4{' with double quant' if w.double_quant else ''} "
                 f"= {_gb(q)} (bitsandbytes: 0.5 byte each + per-64-block absmax), the other {rest:,} in fp32 "
                 "(peft's prepare_model_for_kbit_training upcasts norms/embeddings/head), plus the largest linear "
                 f"dequantized for its matmul ({_gb(largest * compute)})")
    return q + rest * 4 + largest * compute


def _optimizer(trainable: int, name: str, notes) -> int:
    if name == "adamw":
        notes.append("optimizer: AdamW, two fp32 moments (8 bytes per trained parameter; fused, no temporaries)")
        return 8 * trainable
    per = 2 + 2 * 4 / BNB8_BLOCK
    notes.append(f"optimizer: {name}, two 8-bit moments + an fp32 absmax per {BNB8_BLOCK} (~{per:.2f} bytes per "
                 "trained parameter; bitsandbytes keeps tensors under 4096 elements in fp32)"
                 + ("; paged: pages may move to CPU memory under pressure, so the GPU figure is an upper bound"
                    if name.startswith("paged") else ""))
    return int(per * trainable)


# --- activations -----------------------------------------------------------------------------------
def layer_elements_per_token(shape) -> int:
    """training/memory.layer_bytes_per_token's measured figure, in saved elements (not bytes)."""
    from tunesmith.training.memory import BYTES, layer_bytes_per_token

    cfg = SimpleNamespace(hidden_size=shape.hidden, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                          num_attention_heads=shape.heads, intermediate_size=shape.intermediate)
    return layer_bytes_per_token(cfg) // BYTES


def _lora_in_features(shape, name: str) -> int:
    if any(k in name for k in ("down", "fc2", "w2")):
        return shape.intermediate
    if any(k in name for k in ("o_proj", "out_proj", "wo", "dense")):
        return shape.q_width
    return shape.hidden


def act_bytes_per_element(w) -> float:
    if w.precision == "fp32":
        return ACT_BYTES["fp32"]
    return ACT_BYTES["half_base"] if w.base_dtype_bytes == 2 and not w.quantized else ACT_BYTES["fp32_base_autocast"]


def layer_bytes(shape, counts, w, notes=None) -> float:
    """Bytes one decoder layer keeps per token for its backward, in this workload's dtypes."""
    elems = layer_elements_per_token(shape)
    why = [f"{elems} elements/token/layer (training/memory.py)"]
    if counts.trains_base:  # trained norm weights keep their normalised inputs for their own gradient
        elems += 2 * shape.hidden
        why.append("+2 x hidden (trained norms)")
    if w.lora_r and w.lora_targets:  # the rank-r intermediate each adapter keeps for lora_B's gradient
        elems += w.lora_r * len(w.lora_targets)
        why.append(f"+{w.lora_r} x {len(w.lora_targets)} LoRA intermediates")
        if w.lora_dropout > 0:  # each target's own dropped-out copy of its input, and the mask (1 byte)
            extra = sum(_lora_in_features(shape, t) for t in w.lora_targets)
            elems += extra * 1.25 if w.precision == "fp32" else extra * 1.5
            why.append("+ LoRA dropout outputs and masks")
    b = act_bytes_per_element(w)
    per = elems * b
    if w.attention == "eager":  # the softmax scores [heads x L x L] (fp32 + a compute-dtype copy) and k/v repeated
        score = 4 + (0 if w.precision == "fp32" else 2)
        per += shape.heads * w.seq_len * score + 2 * (shape.q_width - shape.kv_width) * b
        why.append(f"+ eager attention's L x L scores (heads x {w.seq_len} x {score} bytes/token)")
    if notes is not None:
        dtype_why = {ACT_BYTES["half_base"]: ", half base: autocast keeps RMSNorm's fp32 upcast and PEFT's fp32 "
                                             "adapter inputs beside the half copies",
                     ACT_BYTES["fp32_base_autocast"]: ", fp32 weights under autocast: the residual stream stays fp32 "
                                                      "and autocast saves half copies beside it"}
        notes.append(f"activations: {' '.join(why)} x {b:g} bytes/element ({w.precision}"
                     + (dtype_why.get(b, "") if w.precision != "fp32" else "") + f"), attention "
                     f"{w.attention}" + (": no L x L scores kept" if w.attention != "eager" else ""))
    return per


def recomputed_layers(shape, w) -> int:
    """Decoder layers a forward of this workload recomputes in its backward: all with gradient
    checkpointing, train.activation_memory_mb's choice (training/memory.py, with training's own fp32
    per-token figure, so the decision is the one the run makes), else none."""
    from tunesmith.training.memory import layers_to_recompute

    if w.gradient_checkpointing:
        return shape.layers
    if not w.activation_budget_mb:
        return 0
    tokens = w.micro_batch * w.seq_len * w.sequences_per_example
    return layers_to_recompute(tokens, shape.layers, layer_elements_per_token(shape) * 4, shape.hidden,
                               int(w.activation_budget_mb * 2**20))


def _activations(shape, counts, w, notes) -> tuple[int, int]:
    """(bytes all running forwards keep, tokens of one forward)."""
    tokens = w.micro_batch * w.seq_len * w.sequences_per_example
    per = layer_bytes(shape, counts, w, notes)
    full, n = tokens * per, shape.layers
    resid = 4 if act_bytes_per_element(w) >= 4 else 2
    ckpt = tokens * shape.hidden * resid  # a checkpointed layer keeps only its input
    k = recomputed_layers(shape, w)
    if w.gradient_checkpointing:
        how = "gradient checkpointing: every layer keeps its input, one layer is recomputed at a time"
    elif w.activation_budget_mb:
        how = f"train.activation_memory_mb={w.activation_budget_mb:g}: {k} of {n} layers recomputed"
    else:
        how = "every layer keeps its activations"
    # outside the layers: the embedding output and the final norm's input/output; the backward's working set:
    # the gradients of one layer's intermediates live beside the saved tensors not yet freed (~ one layer)
    outside = tokens * shape.hidden * resid * 3
    per_forward = (n - k) * full + k * ckpt + (full if k else 0) + full + outside
    notes.append(f"activations: {how}; {w.micro_batch} sequence(s) x {w.seq_len} tokens"
                 + (f" x {w.sequences_per_example} (chosen + rejected)" if w.sequences_per_example > 1 else "")
                 + f" per forward, {w.parallel} forward(s) at once; + one layer's worth for the backward's working "
                 "set" + ("; the DPO reference forward runs without grad (keeps nothing)"
                          if w.sequences_per_example > 1 else ""))
    return int(per_forward * w.parallel), tokens


def _logits(shape, counts, w, tokens, notes) -> int:
    from tunesmith.training.losses import CHUNK_ROWS

    rows = w.micro_batch * w.sequences_per_example * (w.trained_len or w.seq_len)
    v = shape.vocab
    half = 0 if w.precision == "fp32" else 2  # the head's half-precision output before .float()
    if w.method in ("prefix", "prompt"):
        b = tokens * v * (half or 4) + 3 * rows * v * 4
        notes.append(f"logits: {w.method} runs PEFT's own forward: the full [tokens x vocab] logits plus the "
                     "trained rows' log-softmax and gradients in fp32")
    elif w.objective in ("dpo",):
        b = rows * v * (3 * 4 + half)
        notes.append(f"logits: preference log-probs project the trained rows ({rows}) unchunked: log-softmax kept, "
                     "its gradient and the logits' gradient in fp32 (3 x 4 bytes x vocab per row; the adapter-off "
                     "reference forward peaks as high)")
    else:
        chunk = min(CHUNK_ROWS, rows)
        b = chunk * v * (4 + 2 * half) + rows * shape.hidden * 4 * 2
        notes.append(f"logits: chunked head (training/losses.py): {chunk} rows x {v} vocab in fp32 at a time, "
                     f"and d(hidden) + the trained rows' hidden [{rows} x {shape.hidden}]")
    if counts.trains_base and shape.tied:  # the head's fp32 grad beside the embedding's dense grad
        b += v * shape.hidden * 4
    if not w.trained_len:
        notes.append("logits: every position assumed trained (an upper bound: prompts are not projected)")
    return int(b * w.parallel)


def _kv_cache(shape, w, transient: int, notes) -> int:
    if not w.generation:
        return 0
    b = 4 if w.precision == "fp32" else 2
    need = max(bs * (w.seq_len + new) * 2 * shape.layers * shape.kv_width * b + bs * shape.vocab * 4
               for bs, new in w.generation)
    extra = max(0, need - transient)
    notes.append(f"kv_cache: eval.during_training generation needs {_gb(need)} (batch x (prompt <= {w.seq_len} + "
                 f"max_new_tokens) x 2 x layers x kv width); it runs between steps, when activations, logits and "
                 f"gradients are freed, so it adds {_gb(extra)}")
    return int(extra)


def _overhead_cpu(w, tensors: int, device, notes, counts=None) -> int:
    base, source = CPU_BASE, "constant (measured on this project's machines)"
    if device.source == "probe":
        import psutil

        rss = psutil.Process().memory_info().rss
        # only an imports-only process measures the framework: one that has loaded a model or data already
        # would count them twice (they are components of their own)
        if CPU_BASE / 2 <= rss <= 2 * CPU_BASE:
            base, source = rss, "this process's RSS now"
    data = w.data_tokens * DATA_BYTES_PER_TOKEN
    slack = int(CPU_SLACK * tensors)
    mapped = 0
    if w.quantized and counts is not None:
        # quantizing reads every weight of the memory-mapped checkpoint; the file stays mapped while the
        # unquantized weights (embeddings, norms) view it, so its pages stay resident (clean: reclaimable)
        mapped = int(counts.base * w.checkpoint_dtype_bytes)
        notes.append(f"overhead: QLoRA on CPU keeps the checkpoint file mapped and resident ({_gb(mapped)}, "
                     f"{w.checkpoint_dtype_bytes:g} bytes per weight): counted in RSS, reclaimable under pressure")
    notes.append(f"overhead: python+torch+transformers+peft {_gb(base)} ({source}), tokenizer {_gb(CPU_TOKENIZER)}, "
                 f"data {w.data_tokens:,} tokens x {DATA_BYTES_PER_TOKEN} bytes, allocator slack "
                 f"{CPU_SLACK:.0%} of activations+logits")
    return base + CPU_TOKENIZER + data + slack + mapped


# --- the estimate ----------------------------------------------------------------------------------
def estimate_memory(shape, counts, workload, device) -> MemoryEstimate:
    w, notes = workload, []
    c = dict.fromkeys(COMPONENTS, 0)
    c["weights"] = _weights(shape, counts, w, notes)
    c["trainable"] = 4 * counts.trainable
    c["gradients"] = 4 * counts.trainable
    notes.append(f"trainable: {counts.trainable:,} parameters in fp32, and their fp32 gradients")
    c["optimizer"] = _optimizer(counts.trainable, w.optimizer, notes)
    c["activations"], tokens = _activations(shape, counts, w, notes)
    c["logits"] = _logits(shape, counts, w, tokens, notes)
    host = _divide(c, shape, counts, w, notes)
    c["kv_cache"] = _kv_cache(shape, w, c["activations"] + c["logits"] + c["gradients"], notes)
    if device.kind == "cuda":
        slack = int(CUDA_SLACK * sum(c.values()))
        c["overhead"] = CUDA_CONTEXT + slack
        notes.append(f"overhead: CUDA context {_gb(CUDA_CONTEXT)} (0.5-1 GiB with lazy module loading: kernels, "
                     f"cuBLAS workspace; outside torch's allocator) + caching-allocator slack {CUDA_SLACK:.0%}")
    else:
        c["overhead"] = _overhead_cpu(w, c["activations"] + c["logits"], device, notes, counts)
    return MemoryEstimate({k: int(v) for k, v in c.items()}, device.memory_bytes, host, tuple(notes))


def _divide(c: dict, shape, counts, w, notes) -> dict[str, int]:
    """Divide the model states by the strategy (in place); returns what offload moved to CPU memory."""
    n, host = max(w.world, 1), {}
    if w.strategy in ("single", "ddp"):
        if w.strategy == "ddp":
            notes.append(f"strategy ddp: every one of {n} ranks holds everything (gradients as bucket views: no copy)")
        return host
    if w.strategy == "fsdp":
        dtype = 4 if w.precision == "fp32" or w.device_kind != "cuda" else 2  # MixedPrecisionPolicy param dtype
        for k in ("weights", "trainable", "gradients", "optimizer"):
            c[k] = math.ceil(c[k] / n)
        if w.offload_params:
            for k in ("weights", "trainable", "gradients", "optimizer"):
                host[k], c[k] = c[k], 0
        lp = layer_params(shape)
        root = counts.embedding + counts.head + shape.hidden
        gathered = (2 * lp + root) * dtype + (lp * 4 if counts.trains_base else 0)
        c["weights"] += gathered
        notes.append(f"strategy fsdp over {n}: weights, gradients, optimizer / {n}"
                     + (" and offloaded to CPU memory" if w.offload_params else "")
                     + f"; gathered unsharded: two decoder layers (the running one and the prefetched next) and the "
                     f"root unit (embeddings, head, final norm) in {dtype}-byte params"
                     + (", one layer's unsharded fp32 gradient before its reduce-scatter" if counts.trains_base else "")
                     + f" = {_gb(gathered)}")
        return host
    # deepspeed: bf16/fp16 engines hold a half copy of the model and fp32 master weights in the optimizer
    stage, half = w.zero_stage, w.precision in ("bf16", "fp16")
    if half:
        master = c["trainable"]
        c["trainable"] = 2 * counts.trainable
        c["optimizer"] += master
        c["weights"] = int(c["weights"] / w.base_dtype_bytes * 2) if not w.quantized else c["weights"]
    grad_elems = c["gradients"] // 4
    c["gradients"] = math.ceil(c["gradients"] / n) + min(DS_REDUCE_BUCKET, grad_elems) * (2 if half else 4)
    c["optimizer"] = math.ceil(c["optimizer"] / n)
    if stage == 3:
        c["trainable"] = math.ceil(c["trainable"] / n)
        c["weights"] = math.ceil(c["weights"] / n) + 2 * layer_params(shape) * (2 if half else 4)
    if w.offload_optimizer:
        host["optimizer"], c["optimizer"] = c["optimizer"], 0
    if w.offload_params and stage == 3:
        host["weights"], host["trainable"] = c["weights"], c["trainable"]
        c["weights"], c["trainable"] = 2 * layer_params(shape) * (2 if half else 4), 0
    notes.append(f"strategy deepspeed ZeRO-{stage} over {n}: gradients and optimizer"
                 + (", weights" if stage == 3 else "") + f" / {n}"
                 + ("; a half copy of the trained weights, fp32 master weights with the optimizer" if half else "")
                 + f"; gradient reduce bucket (reduce_bucket_size {DS_REDUCE_BUCKET:.0e} elements at most)"
                 + ("; optimizer state in CPU memory" if w.offload_optimizer else "")
                 + ("; weights in CPU memory" if w.offload_params and stage == 3 else ""))
    return host
