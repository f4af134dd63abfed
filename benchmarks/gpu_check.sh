#!/usr/bin/env bash
# GPU check, one prepared script (< 8 min on one H100/H200; no network needed):
#
#   bash benchmarks/gpu_check.sh            # results in $OUT (default runs/gpu_check)
#
# 1. ViT-B/16, 224 px, bf16 autocast, synthetic batches on the GPU: training images/s and
#    MFU for vanilla and for Fast AdvProp (3-pass and fused) through the methods' own
#    train_step. FLOPs per step are counted by torch's FlopCounterMode on one real step
#    (forward, backward, and the attack's input gradient), so the MFU is of executed work.
#    Peak bf16 dense FLOP/s: H100/H200 989 TFLOP/s, A100 312; override with PEAK_TFLOPS=...
# 2. fap.train under DeepSpeed ZeRO-2 (bf16, the shipped accelerate_configs JSON) for a few
#    Fast AdvProp updates of ViT-B/16 on the demo images: it must run, coalesce the
#    gradient reduction, and export.
#
# Writes $OUT/gpu_check.json, $OUT/gpu_check.txt (the table) and $OUT/nvidia-smi.txt.
#
# GPU_CHECK_SMOKE=1 runs the same two parts on the CPU at toy size (a 2-block ViT-Tiny on
# 32 px, a few steps, ZeRO-2 over gloo) so that the script itself is tested in CI
# (tests/test_benchmarks.py) and a lent GPU's minutes are not spent finding a typo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
ACCEL=${ACCEL:-$(dirname "$PY")/accelerate}
[ -x "$ACCEL" ] || ACCEL=accelerate
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
start=$(date +%s)
SMOKE=${GPU_CHECK_SMOKE:-0}
export GPU_CHECK_SMOKE=$SMOKE

echo "== 1. ViT-B/16 bf16 throughput and MFU: vanilla vs Fast AdvProp"
timeout 300 "$PY" - "$OUT" <<'EOF' 2>&1 | tee "$OUT/throughput.log"
import json, os, sys, time
import torch
from torch.utils.flop_counter import FlopCounterMode
from fap.methods import build_method
from fap.models import create_model

out = sys.argv[1]
smoke = os.environ.get("GPU_CHECK_SMOKE") == "1"
if smoke:  # the script's own test, on CPU: toy sizes, no MFU
    dev, name, peak = torch.device("cpu"), "CPU (smoke test)", 0.0
    MODEL, MODEL_KW, SIZE, BATCH, STEPS, WARMUP = "vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32, 20, 2, 1
else:
    assert torch.cuda.is_available(), "no CUDA device (GPU_CHECK_SMOKE=1 runs the toy CPU version)"
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = float(os.environ.get("PEAK_TFLOPS", 0)) or (989.0 if ("H100" in name or "H200" in name) else 312.0 if "A100" in name else 0.0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    MODEL, MODEL_KW, SIZE, BATCH, STEPS, WARMUP = "vit_base_patch16_224", {}, 224, 256, 30, 8
cuda = dev.type == "cuda"
gen = torch.Generator(device=dev).manual_seed(0)
x = torch.rand(BATCH, 3, SIZE, SIZE, device=dev, generator=gen)
y = torch.randint(0, 1000, (BATCH,), device=dev, generator=gen)

def sync():
    if cuda:
        torch.cuda.synchronize()

def run(label, method_name, **kw):
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=1000, **MODEL_KW).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    method = build_method(method_name, **kw)
    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            m = method.train_step(model, x, y, lambda loss: loss.backward())
        opt.step(); opt.zero_grad(set_to_none=True)
        return m
    for _ in range(WARMUP):
        step()
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(STEPS):
        m = step()
    sync()
    dt = (time.perf_counter() - t) / STEPS
    res = {"label": label, "loader_images_per_s": BATCH / dt, "step_ms": 1000 * dt, "tflop_per_step": flops / 1e12,
           "achieved_tflops": flops / dt / 1e12, "mfu": (flops / dt / 1e12 / peak) if peak else None,
           "image_passes_per_step": m["image_passes"], "cost_ratio": m["cost_ratio"],
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan"),
           "loss_clean": float(m["loss_clean"])}
    print(json.dumps(res), flush=True)
    return res

results = [run("vanilla", "vanilla"), run("fast_advprop", "fast_advprop"),
           run("fast_advprop_fused", "fast_advprop", fused=True)]
van = results[0]["step_ms"]
lines = [f"{name}, peak {peak} TFLOP/s bf16, {MODEL} {SIZE}px, loader batch {BATCH}, bf16 autocast, AdamW",
         f"{'method':>20} {'img/s':>8} {'ms/step':>8} {'vs vanilla':>10} {'passes':>7} {'TFLOP/s':>8} {'MFU':>6} {'GiB':>6}"]
for r in results:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    lines.append(f"{r['label']:>20} {r['loader_images_per_s']:8.0f} {r['step_ms']:8.1f} {r['step_ms'] / van:9.3f}x "
                 f"{r['image_passes_per_step']:7d} {r['achieved_tflops']:8.1f} {mfu:>6} {r['peak_mem_gib']:6.1f}")
print("\n".join(lines))
with open(os.path.join(out, "gpu_check.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
with open(os.path.join(out, "throughput.json"), "w") as f:
    json.dump({"device": name, "peak_tflops": peak, "results": results}, f, indent=1)
EOF

echo "== 2. fap.train, DeepSpeed ZeRO-2, bf16, ViT-B/16 on the demo images"
rm -rf "$OUT/zero2"
if [ "$SMOKE" = 1 ]; then
    "$PY" -c "import sys; from fap.data import make_demo; make_demo(sys.argv[1], image_size=32, train_per_class=4, val_per_class=2)" "$OUT/tiny"
    RUN=(--train.max_steps=4 --train.batch_size=20 --data.source=folder --data.path="$OUT/tiny" --data.image_size=32
         --data.num_workers=0 --model.name=vit_tiny_patch16_224 --model.img_size=32
         '--model.kwargs={"patch_size": 8, "depth": 2}' --checkpoint.every_steps=2)
else
    RUN=(--train.max_steps=12 --train.batch_size=160 --data.source=demo --data.path="$OUT/demo" --data.image_size=64
         --data.num_workers=8 --model.name=vit_base_patch16_224 --model.img_size=64 --checkpoint.every_steps=6)
fi
timeout 360 "$ACCEL" launch --use_deepspeed --deepspeed_config_file accelerate_configs/deepspeed_zero2.json \
    --deepspeed_multinode_launcher standard --num_processes 1 --num_machines 1 --mixed_precision bf16 \
    --dynamo_backend no --main_process_port "${PORT:-29577}" \
    -m fap.engine --method fast_advprop --train.precision=bf16 --train.epochs=2 "${RUN[@]}" \
    --optim.opt=adamw --optim.lr=1e-4 --optim.lr_base_size=0 --optim.weight_decay=0.05 \
    --log.output_dir="$OUT/zero2" --log.trackers= --log.progress=false --log.every_steps=2 2>&1 | tee "$OUT/zero2.log"
grep -q "gradients: coalesced" "$OUT/zero2.log"

"$PY" - "$OUT" "$start" <<'EOF'
import json, os, sys, time
out, start = sys.argv[1], int(sys.argv[2])
summary = json.load(open(os.path.join(out, "zero2", "summary.json")))
export = os.path.join(out, "zero2", "export", "model.safetensors")
assert os.path.getsize(export) > 0, f"no exported model at {export}"
through = json.load(open(os.path.join(out, "throughput.json")))
result = {"throughput": through, "zero2": {k: summary[k] for k in (
    "steps", "precision", "zero_stage", "gradient_reduction", "images_per_s", "top1", "cost_ratio_per_step",
    "train_seconds")}, "wall_seconds": int(time.time()) - start}
json.dump(result, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
with open(os.path.join(out, "gpu_check.txt"), "a") as f:
    z = result["zero2"]
    f.write(f"ZeRO-2 bf16 fap.train: {z['steps']} updates, {z['gradient_reduction']}, {z['images_per_s']:.0f} img/s "
            f"(includes the first steps), exported to {export}\n")
print(open(os.path.join(out, "gpu_check.txt")).read())
print(f"gpu_check done in {result['wall_seconds']} s; results in {out}")
EOF
