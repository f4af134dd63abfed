"""ViT-L/16 on ImageNet-1k, DeiT-style, with Fast AdvProp under DeepSpeed ZeRO-3.

    # 8 GPUs, ZeRO-3, bf16 (the JSON enables bf16):
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/vit_l.py --data.path=/data/imagenet
    # 4 nodes x 8 GPUs: accelerate_configs/slurm_multi_node.sh with the ZeRO-3 flags it lists.
    # Or PyTorch FSDP2 (no DeepSpeed; parameters, gradients and optimizer state sharded too):
    accelerate launch --config_file accelerate_configs/fsdp2.yaml recipes/vit_l.py --data.path=/data/imagenet

Why ZeRO-3: ViT-L/16 has 304 M parameters. With AdamW, the fp32 master weights, gradients
and two moments are 16 bytes per parameter, 4.9 GB, before activations; Fast AdvProp
keeps the clean pass's activations (the largest of its three graphs) while the batch
grows by 25 % for the adversarial split. ZeRO-3 shards parameters, gradients and
optimizer state over the GPUs (1/8 each on 8 GPUs), which leaves 24-40 GB GPUs room for
the per-GPU batch of 160 this recipe uses. The method's three backward passes per update
run inside DeepSpeed's ``coalesce_grad_reduction``: one gradient reduce-scatter per update,
not three. An EMA is refused under ZeRO-3 (it would be a full replica on every rank).

Expected results (ImageNet val top-1): none published for this combination, and none
measured (no GPUs here). For orientation only: plain ViT-L/16 trained from scratch on
ImageNet-1k overfits without strong regularisation; DeiT III (Touvron et al., ECCV 2022)
is the reference recipe for it. What we measured: the smoke run in the test suite, which
runs this recipe under ZeRO-3 with 2 CPU processes (it trains; no accuracy claim).

Cost (exact): loader batch 1280 = 1024 clean + 256 adversarial-split -> 1536 image-passes
per step = 1.2x vanilla per step; 250 epochs against 300 = 1.0x vanilla's compute.

Settings: as recipes/vit_b.py (DeiT), with stochastic depth 0.4 for the deeper, wider model.
No gradient clipping, as DeiT: the shipped ZeRO-3 JSON says gradient_clipping 0.0. To clip,
set both --optim.clip_grad=1.0 and "gradient_clipping": 1.0 in the JSON (fap refuses a
JSON that disagrees with the recipe rather than let one silently win).
"""
import dataclasses
import os
import sys

import fap
from fap.data import DataConfig
from fap.methods import CONFIGS, budget_matched

DEIT_EPOCHS, BATCH_CLEAN = 300, 1024
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def config(method: str = "fast_advprop") -> fap.TrainConfig:
    method_cfg = CONFIGS[method]()
    if method == "fast_advprop":
        batch = round(BATCH_CLEAN / (1 - method_cfg.p_adv))
        epochs, _ = budget_matched(DEIT_EPOCHS, p_adv=method_cfg.p_adv, attack_steps=method_cfg.attack_steps)
    else:
        batch, epochs = BATCH_CLEAN, DEIT_EPOCHS
    return fap.TrainConfig(
        train=fap.RunSection(name=f"vit_l_{method}", epochs=epochs, batch_size=batch, reference_epochs=DEIT_EPOCHS,
                             precision="bf16"),
        data=DataConfig(source="folder", path="", image_size=224, crop_pct=0.875, interpolation="bicubic",
                        scale=(0.08, 1.0), hflip=0.5, auto_augment="rand-m9-mstd0.5-inc1", num_workers=10),
        model=fap.ModelConfig(name="vit_large_patch16_224", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                              dual_norm=method != "vanilla", drop_path_rate=0.4),
        method=method_cfg,
        optim=fap.OptimConfig(opt="adamw", lr=5e-4, lr_base_size=round(512 * batch / BATCH_CLEAN),
                              weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8),
        sched=fap.ScheduleConfig(sched="cosine", warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5),
        mixup=fap.MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1),
        checkpoint=fap.CheckpointConfig(every_steps=1000, every_epochs=1, keep=2),
    )


def smoke(cfg: fap.TrainConfig) -> fap.TrainConfig:
    """Two updates of a 2-block ViT-L (full width) on 32 px images, patch 8."""
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, epochs=2, batch_size=20, max_steps=2, reference_epochs=None),
        data=dataclasses.replace(cfg.data, image_size=32, num_workers=0),
        model=dataclasses.replace(cfg.model, img_size=32, kwargs={"patch_size": 8, "depth": 2}),
        sched=dataclasses.replace(cfg.sched, warmup_epochs=0.5),
        checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=0, every_epochs=1, keep=1),
        log=dataclasses.replace(cfg.log, every_steps=1),
    )


def launched_config(method: str = "fast_advprop") -> fap.TrainConfig:
    """`config`, refused unless ``accelerate launch`` set up DeepSpeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        raise fap.ConfigError(
            "this is a DeepSpeed ZeRO-3 recipe: launch it with `accelerate launch --config_file "
            "accelerate_configs/deepspeed_zero3.yaml recipes/vit_l.py ...`\n"
            "  (for DDP, take recipes/vit_b.py and --model.name=vit_large_patch16_224)")
    return config(method)


if __name__ == "__main__":
    sys.exit(fap.train_cli(launched_config, smoke=smoke))
