#!/usr/bin/env bash
# DeepSpeed on a GPU machine: 2-step LoRA runs of the embedded model with ZeRO-2, ZeRO-3 (every
# weight sharded) and ZeRO-3 with optimizer + weight offload, each compared with the same run
# without DeepSpeed. The check that matters: under ZeRO-3 the saved adapter holds the trained
# weights (other tools save the empty shards), so every tensor must be non-empty, lora_B (zero
# at the start) non-zero, and pointing the way of the run without DeepSpeed (cosine > 0.98;
# bf16 is not bit-equal).
#
#   NPROC=1 bash benchmarks/gpu_check_deepspeed.sh     # one GPU (default: every GPU)
#
# DeepSpeed is an optional extra. A machine without internet can use a copy installed here with
#   pip install --no-deps --target .ds-site deepspeed==0.19.8 einops hjson msgpack ninja py-cpuinfo
# (24 MB; DS_SITE=.ds-site is the default). The offload run compiles DeepSpeed's CPU Adam on first
# use (ninja and a C++ compiler; a few minutes): if it cannot, that row says so and the others stand.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DS_SITE=${DS_SITE:-.ds-site}
export PYTHONPATH="$(pwd)/src${DS_SITE:+:$(realpath -m "$DS_SITE")}${PYTHONPATH:+:$PYTHONPATH}"
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$NPROC" -ge 1 ] || { echo "no GPU found (nvidia-smi -L)"; exit 1; }
OUT=${OUT:-$(mktemp -d /tmp/ds-check.XXXX)}
mkdir -p "$OUT"
$PY -c "import deepspeed; print('deepspeed', deepspeed.__version__)" || { echo "DeepSpeed is not importable"; exit 1; }

$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from tunesmith.demo.orders import make_splits, write_splits
out = Path(sys.argv[1])
write_splits(out / "data", make_splits(0, {"train": 64, "validation": 8}))
(out / "z3.json").write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
(out / "cfg.yaml").write_text(f"""
data: {{train: {out}/data/train.jsonl, max_length: 256}}
method: {{name: lora, r: 16, alpha: 32}}
train: {{max_steps: 2, batch_size: 4, grad_accum: 2, lr: 1.0e-3, seed: 0}}
run: {{output_dir: {out}/runs}}
""")
EOF

run() {  # name, overrides...
  local name=$1; shift
  local t0=$SECONDS
  if $PY -m tunesmith train "$OUT/cfg.yaml" run.name="$name" "$@" --nproc "$NPROC" > "$OUT/$name.log" 2>&1; then
    echo "$name: $((SECONDS - t0)) s ($(grep -m1 '^strategy' "$OUT/$name.log"))"
  else
    echo "$name: FAILED after $((SECONDS - t0)) s, last lines of $OUT/$name.log:"; tail -n 15 "$OUT/$name.log"
  fi
}
DS=train.distributed.strategy=deepspeed
if [ "$NPROC" -gt 1 ]; then run plain train.distributed.strategy=ddp; else
  $PY -m tunesmith train "$OUT/cfg.yaml" run.name=plain > "$OUT/plain.log" 2>&1 && echo "plain: done" \
    || { echo "plain run failed"; tail -n 15 "$OUT/plain.log"; exit 1; }
fi
run zero2 $DS train.distributed.deepspeed.zero_stage=2
run zero3 $DS train.distributed.deepspeed.config="$OUT/z3.json"
run zero3-offload $DS train.distributed.deepspeed.zero_stage=3 train.distributed.deepspeed.offload_optimizer=cpu \
    train.distributed.deepspeed.offload_params=cpu

$PY - "$OUT" <<'EOF'
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file
runs = Path(sys.argv[1]) / "runs"
ref = load_file(str(runs / "plain" / "adapter" / "adapter_model.safetensors"))
bad = 0
for name in ("zero2", "zero3", "zero3-offload"):
    path = runs / name / "adapter" / "adapter_model.safetensors"
    if not path.is_file():
        print(f"{name:14s} no adapter saved"); bad += 1; continue
    got = load_file(str(path))
    empty = [k for k, v in got.items() if v.numel() == 0]
    b_max = max((float(v.abs().max()) for k, v in got.items() if "lora_B" in k and v.numel()), default=0.0)
    # bf16 runs are not bit-equal, and Adam's first steps move near-zero gradients by about lr whatever
    # their sign: compare the whole adapter's direction (an empty or zero adapter gives 0)
    keys = sorted(k for k in ref if k in got and got[k].shape == ref[k].shape)
    a = torch.cat([got[k].double().flatten() for k in keys]) if keys else torch.zeros(1)
    b = torch.cat([ref[k].double().flatten() for k in keys]) if keys else torch.ones(1)
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    diff = float((a - b).abs().max())
    ok = got.keys() == ref.keys() and not empty and b_max > 0 and cos > 0.98
    bad += not ok
    print(f"{name:14s} tensors {len(got)}/{len(ref)}  empty {len(empty)}  max|lora_B| {b_max:.3e}  "
          f"vs plain: cosine {cos:.5f}, max diff {diff:.2e}  {'OK' if ok else 'FAIL'}")
sys.exit(1 if bad else 0)
EOF
