"""The pilots that chose recipes/demo_det.py's optimizer: vanilla RetinaNet-R18 on the demo
detection set, seed 0, one thread, mAP on the 40 val images every EVERY updates.

    python benchmarks/demo_det_pilot.py NAME {sgd,adamw} LR UPDATES EVERY [DATA]

Warm-up 50 updates, lr x0.1 after 80 % of UPDATES; SGD momentum 0.9 and weight decay 1e-4,
AdamW weight decay 0.05. Writes /tmp/det/pilot_NAME.jsonl. Results: benchmarks/results/demo_det.md.
"""
import sys, time, json, torch
torch.set_num_threads(1)
from fap.config import DetectionSection, TrainConfig
from fap.data.config import DataConfig
from fap.detection.train import build_model, GlobalBatches
from fap.methods import build_method
from fap.tasks import get_task
from fap.detection.evaluate import coco_map
from fap.data.coco import dataset_for, detection_collate, num_classes_of
from fap.data.base import to_unit_float
name, opt_name, lr, updates, every = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
data = sys.argv[6] if len(sys.argv) > 6 else "/tmp/det/demo-det"
torch.manual_seed(0)
tr = dataset_for(data, "train", flip_prob=0.5, seed=0); va = dataset_for(data, "val")
cfg = TrainConfig(task="detection", data=DataConfig(source="demo-det", path=data),
                  detection=DetectionSection(backbone="resnet18", min_size=96, max_size=96))
m = build_method("vanilla", task=get_task("detection")); model = build_model(cfg, num_classes_of(tr.coco)); model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = (torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4) if opt_name == "sgd"
       else torch.optim.AdamW(params, lr=lr, weight_decay=0.05))
warm = 50
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: min(1.0, 0.001 + u / warm) * (0.1 if u >= 0.8 * updates else 1.0))
sampler = GlobalBatches(len(tr), 8, seed=0)
loader = torch.utils.data.DataLoader(tr, batch_sampler=sampler, collate_fn=detection_collate)
u, ep, t0, out = 0, 0, time.time(), open(f"/tmp/det/pilot_{name}.jsonl", "w")
while u < updates:
    sampler.set_epoch(ep); tr.set_epoch(ep); ep += 1
    for images, targets in loader:
        opt.zero_grad(); met = m.train_step(model, to_unit_float(images), targets, lambda l: l.backward()); opt.step(); sched.step(); u += 1
        if u % every == 0 or u == updates:
            r = coco_map(model, va, batch_size=20)
            rec = {"u": u, "s": round(time.time() - t0), "loss": float(met["loss_clean"]), "map": round(r["map"], 2), "map50": round(r["map50"], 2)}
            print(name, rec, flush=True); out.write(json.dumps(rec) + "\n"); out.flush()
        if u >= updates: break
