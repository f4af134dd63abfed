"""Fast AdvProp for object detection (Mei et al., ICLR 2022, Table 7): RetinaNet with dual BatchNorm.

* `fap.detection.model`: torchvision's RetinaNet (ResNet-FPN) with trainable BatchNorm,
  converted with `fap.norm.convert_dual_norm`, wrapped so that ``model(images, targets)``
  returns per-image losses in train and eval mode; export strips the aux norms.
* `fap.detection.evaluate`: COCO mAP (pycocotools) on clean and corrupted copies.
* `fap.detection.train`: what only a detection run has: data in global batches, the model
  (with optional trunk weights) and the torchvision export, called by `fap.tasks.DetectionTask`;
  the run itself is `fap.engine.train` with ``task="detection"``.
* `fap.detection.config`: the ``detection`` section of a `fap.config.TrainConfig`.

Data lives in `fap.data.coco` and `fap.data.demo_det`.
"""
