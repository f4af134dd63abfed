#!/usr/bin/env bash
# GPU check, one prepared script for one GPU, no network, < 8 min on an H100/H200:
#
#   bash benchmarks/gpu_check.sh                      # results: runs/gpu_check/ and benchmarks/results/gpu_<device>.*
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh    # every part at toy size on the CPU (CI: tests/test_gpu_path.py)
#
# 0. Python. The system python3 (PY=...) when it imports fap and deepspeed; otherwise the
#    wheels of benchmarks/gpu_wheels.sh (WHEELS=wheelhouse/) are installed with no index and
#    no dependencies into $OUT/site, which goes first on PYTHONPATH. Everything then runs
#    from $OUT, so a checkout in the working directory cannot shadow the installed fap.
# 1. Cost sweep, eager (benchmarks/gpu_sweep.py): images/s, step time, MFU and peak memory in
#    bf16 of vanilla, Fast AdvProp three-pass and fused, and the plain three-pass floor;
#    ResNet-50 (channels_last) and ViT-B/16 at 224 px; per-GPU loader batches 80 (64 + 16),
#    160 and 320.
# 2. fap.train under DeepSpeed ZeRO-2 (bf16, accelerate_configs/deepspeed_zero2.json): a few
#    Fast AdvProp updates of ViT-B/16 on demo images; it must coalesce the reduction and export.
# 3. fap.train under FSDP2 (accelerate_configs/fsdp2.yaml), the same run, one process per GPU
#    (FAP_FSDP2_ONE_PROCESS=1 lets a one-GPU machine through; CPU smoke: 2 processes).
# 4. Cost sweep, compiled (train.compile, inductor), with whatever time is left.
# 5. One table (benchmarks/gpu_report.py; ratios to vanilla of the same model, batch and mode) and the two runs:
#    $OUT/gpu_<device>.txt/.json, copied to benchmarks/results/ (not in smoke mode).
# A part that fails is recorded and the next one runs; the exit status is 1 if any failed.
#
# Budget (H100/H200, 989 TFLOP/s dense bf16; training = 3x forward FLOPs, 2 FLOPs per MAC):
#   ResNet-50: 24.6 GFLOP per image-pass; at an assumed 5 % MFU 0.50 ms  -> ~2,000 images/s
#   ViT-B/16: 105 GFLOP per image-pass;  at an assumed 10 % MFU 1.06 ms  ->   ~940 images/s
#   one (model, mode): (80 + 160 + 320) images x (1 + 3 x 1.2) passes x 14 steps (3 warm-up,
#   10 timed, 1 FLOP count) = 36,100 image-passes: ResNet-50 18 s, ViT-B 38 s; plus building
#   the models and cuDNN autotuning ~30 s: eager sweep ~90 s (it stops starting cells at
#   EAGER_S = 150 s). ZeRO-2 and FSDP2: 12 updates of 160 images at 64 px each, seconds of
#   compute; launch, DeepSpeed/NCCL set-up and demo data ~40 s each (cut at RUN_S = 120 s).
#   Compiled: the same cells plus inductor's compile, an assumed 45 s per graph (a cell
#   starts only if its graphs fit; gpu_sweep.py learns the real figure from the first ones).
#   Expected: 15 s of imports, then 90 + 40 + 40 s, leaving ~275 s of BUDGET_S = 460 s for
#   compiled cells (about 6 graphs; the 80-image cells of both models first). Worst case: the
#   eager sweep killed at EAGER_S + 60 s and both runs at RUN_S leave no compiled cell; the
#   report still comes, at ~465 s.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SMOKE=${GPU_CHECK_SMOKE:-0}
OUT="$(mkdir -p "${OUT:-$REPO/runs/gpu_check}" && cd "${OUT:-$REPO/runs/gpu_check}" && pwd)"
PY=${PY:-python3}
WHEELS=${WHEELS:-$REPO/wheelhouse}
if [ "$SMOKE" = 1 ]; then  # a shared 2-core CI machine: generous limits, the toy sizes keep it short
    BUDGET_S=${BUDGET_S:-3000}; EAGER_S=${EAGER_S:-1200}; RUN_S=${RUN_S:-900}
else
    BUDGET_S=${BUDGET_S:-460}; EAGER_S=${EAGER_S:-150}; RUN_S=${RUN_S:-120}
fi
start=$(date +%s)
deadline=$((start + BUDGET_S))
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false GPU_CHECK_SMOKE=$SMOKE
failed=()
left() { echo $((deadline - $(date +%s))); }
part() { echo "== $* (at $(($(date +%s) - start)) s)"; }
cap() { local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo $((l > 10 ? l : 10)); }
# A sweep's exit status: 0 all cells measured or skipped for time, 1 a cell failed, 124 killed at its time limit
sweep_status() {
    case "$2" in 0) ;; 124) failed+=("$1 (killed at its time limit; finished cells are kept)");; *) failed+=("$1");; esac
}

part "0. python: $PY"
if ! "$PY" -c "import fap, deepspeed" > /dev/null 2>&1; then  # also when deepspeed is missing
    echo "fap or deepspeed is not importable: installing $WHEELS with no index into $OUT/site"
    if ! ls "$WHEELS"/*.whl > /dev/null 2>&1; then
        echo "gpu_check.sh: no wheels in $WHEELS; make them where there is an index: bash benchmarks/gpu_wheels.sh $WHEELS" >&2
        exit 1
    fi
    PIP_NO_INDEX=1 "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$OUT/site" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$OUT/site/bin:$PATH"
    # --no-deps installs what the wheelhouse assumed the node has; pip check says where it has not
    "$PY" -m pip check > "$OUT/pip_check.txt" 2>&1 || echo "pip check found conflicts (often the node's own): $OUT/pip_check.txt"
fi
cd "$OUT" || exit 1
"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt" || exit 1
import accelerate, fap, timm, torch
try:
    import deepspeed
    ds = deepspeed.__version__
except Exception as e:  # part 2 will fail and say so; the rest runs
    ds = f"not importable ({type(e).__name__}: {e})"
print(f"fap {fap.__version__} ({fap.__file__}) | torch {torch.__version__} | timm {timm.__version__} | "
      f"accelerate {accelerate.__version__} | deepspeed {ds} | "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
EOF
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
if [ "$SMOKE" = 1 ]; then
    SWEEP=(--smoke --device cpu --backend eager --warmup 1 --steps 1)
    NPROC=2
else
    "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || {
        echo "gpu_check.sh: no CUDA device (GPU_CHECK_SMOKE=1 runs the toy CPU version)" >&2; exit 1; }
    SWEEP=(--backend inductor)
    NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count())")
fi

part "1. cost sweep, eager"
timeout $(($(cap "$EAGER_S") + 60)) "$PY" "$REPO/benchmarks/gpu_sweep.py" measure --mode eager --out "$OUT" \
    --deadline $((start + EAGER_S)) "${SWEEP[@]}" 2>&1 | tee "$OUT/sweep_eager.log"
sweep_status sweep_eager "${PIPESTATUS[0]}"

# fap.train for a few Fast AdvProp updates under a distributed backend; $1: name, rest: launch flags
train_run() {
    local name=$1 nproc=$2; shift 2
    local run=(--train.max_steps=4 --train.batch_size=20 --data.source=folder --data.path="$OUT/tiny"
               --data.image_size=32 --data.num_workers=0 --model.name=vit_tiny_patch16_224 --model.img_size=32
               '--model.kwargs={"patch_size": 8, "depth": 2}' --checkpoint.every_steps=2)
    if [ "$SMOKE" != 1 ]; then
        run=(--train.max_steps=12 --train.batch_size=$((160 * nproc)) --data.source=demo --data.path="$OUT/demo"
             --data.image_size=64 --data.num_workers=8 --model.name=vit_base_patch16_224 --model.img_size=64
             --checkpoint.every_steps=6)
    fi
    rm -rf "${OUT:?}/$name"
    timeout "$(cap "$RUN_S")" "$PY" -m accelerate.commands.launch --num_machines 1 --mixed_precision bf16 \
        --dynamo_backend no --main_process_port "${PORT:-29577}" "$@" \
        -m fap.engine --method fast_advprop --train.precision=bf16 --train.epochs=2 "${run[@]}" \
        --optim.opt=adamw --optim.lr=1e-4 --optim.lr_base_size=0 --optim.weight_decay=0.05 \
        --log.output_dir="$OUT/$name" --log.trackers= --log.progress=false --log.every_steps=2 2>&1 | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    "$PY" - "$OUT" "$name" "$status" <<'EOF' || failed+=("$name")
import json, os, sys
out, name, status = sys.argv[1], sys.argv[2], int(sys.argv[3])
summary_file = os.path.join(out, name, "summary.json")
record = {"status": "ok" if status == 0 and os.path.isfile(summary_file) else f"failed (exit status {status})"}
if record["status"] == "ok":
    s = json.load(open(summary_file))
    export = os.path.join(out, name, "export", "model.safetensors")
    keys = ("steps", "processes", "precision", "zero_stage", "gradient_reduction", "images_per_s", "top1",
            "cost_ratio_per_step", "train_seconds")
    record.update({k: s.get(k) for k in keys}, export=export if os.path.getsize(export) > 0 else None)
    banner = next(l for l in open(os.path.join(out, name + ".log")) if l.startswith("fap: "))
    record["backend"] = banner.split(" | ")[2]          # e.g. "2 process(es), FSDP2, bf16"
    record["line"] = (f"{s['steps']} updates, {record['backend']}, gradients {s['gradient_reduction']}, "
                      f"{s['images_per_s']:.0f} img/s (includes the first steps), exported {export}")
else:
    lines = open(os.path.join(out, name + ".log")).read().strip().splitlines()
    record["line"] = lines[-1][:300] if lines else ""
json.dump(record, open(os.path.join(out, name + ".json"), "w"), indent=1)
print(f"{name}: {record['status']}; {record['line']}")
sys.exit(0 if record["status"] == "ok" else 1)
EOF
}

if [ "$SMOKE" = 1 ]; then
    "$PY" -c "import sys; from fap.data import make_demo; make_demo(sys.argv[1], image_size=32, train_per_class=4, val_per_class=2)" "$OUT/tiny"
fi
part "2. fap.train, DeepSpeed ZeRO-2, bf16"
train_run zero2 1 --use_deepspeed --deepspeed_config_file "$REPO/accelerate_configs/deepspeed_zero2.json" \
    --deepspeed_multinode_launcher standard --num_processes 1
grep -q "gradients: coalesced" "$OUT/zero2.log" || failed+=(zero2_reduction)

part "3. fap.train, FSDP2, bf16, $NPROC process(es)"
FAP_FSDP2_ONE_PROCESS=1 train_run fsdp2 "$NPROC" --config_file "$REPO/accelerate_configs/fsdp2.yaml" \
    --num_processes "$NPROC"

part "4. cost sweep, compiled ($(left) s left)"
timeout "$(cap $(($(left) + 60)))" "$PY" "$REPO/benchmarks/gpu_sweep.py" measure --mode compiled --out "$OUT" \
    --deadline $((deadline - 15)) --flops-from "$OUT/sweep_eager.json" "${SWEEP[@]}" 2>&1 \
    | tee "$OUT/sweep_compiled.log"
sweep_status sweep_compiled "${PIPESTATUS[0]}"

part "5. report"
results=(--wall-seconds $(($(date +%s) - start)))
[ "$SMOKE" = 1 ] || results+=(--results-dir "$REPO/benchmarks/results")
"$PY" "$REPO/benchmarks/gpu_report.py" --out "$OUT" "${results[@]}" || failed+=(report)
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check done in $(($(date +%s) - start)) s; results in $OUT"
else
    printf 'gpu_check done in %s s; results in %s; FAILED: %s\n' "$(($(date +%s) - start))" "$OUT" "${failed[*]}"
    exit 1
fi
