"""Fast AdvProp for object detection (Mei et al., ICLR 2022, Table 7): RetinaNet with dual BatchNorm.

* `fap.detection.model`: torchvision's RetinaNet (ResNet-FPN) with trainable BatchNorm,
  converted with `fap.norm.convert_dual_norm`, wrapped so that ``model(images, targets)``
  returns per-image losses in train and eval mode; export strips the aux norms.
* `fap.detection.evaluate`: COCO mAP (pycocotools) on clean and corrupted copies.
* `fap.detection.train`: the detection run (Accelerate; the methods' one ``train_step``
  with `fap.tasks.DetectionTask`, the updates of `fap.engine.step`).

Data lives in `fap.data.coco` and `fap.data.demo_det`.
"""
