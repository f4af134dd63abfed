"""ImageNet-R / ImageNet-A: the shipped 200-class lists, logit masking, and folder-to-label alignment."""
import math
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo
from torchvision import transforms

from fap.data import DataError
from fap.data.class_subsets import IMAGENET_A_WNIDS, IMAGENET_R_WNIDS, subset_indices
from fap.evaluate import SuiteConfig, evaluate_model
from fap.evaluation.folders import align_classes
from fap.evaluation.metrics import topk_correct, topk_predictions
from fap.models import create_model

SYNSETS = list(ImageNetInfo("imagenet-1k").label_names())  # the 1000 sorted WordNet ids = label order

# hendrycks/imagenet-r eval.py: imagenet_r_indices (the columns of imagenet_r_mask)
R_INDICES = [1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99, 100, 105,
             107, 113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163, 171, 172, 178, 187,
             195, 199, 203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247, 250, 251, 254, 259, 260, 263, 265, 267,
             269, 276, 277, 281, 288, 289, 291, 292, 293, 296, 299, 301, 308, 309, 310, 311, 314, 315, 319, 323, 327,
             330, 334, 335, 337, 338, 340, 341, 344, 347, 353, 355, 361, 362, 365, 366, 367, 368, 372, 388, 390, 393,
             397, 401, 407, 413, 414, 425, 428, 430, 435, 437, 441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476,
             483, 487, 515, 546, 555, 558, 570, 579, 583, 587, 593, 594, 596, 609, 613, 617, 621, 629, 637, 657, 658,
             701, 717, 724, 763, 768, 774, 776, 779, 780, 787, 805, 812, 815, 820, 824, 833, 847, 852, 866, 875, 883,
             889, 895, 907, 928, 931, 932, 933, 934, 936, 937, 943, 945, 947, 948, 949, 951, 953, 954, 957, 963, 965,
             967, 980, 981, 983, 988]
# hendrycks/natural-adv-examples eval.py: the keys k of thousand_k_to_200 with a value != -1 (indices_in_1k)
A_INDICES = [6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97, 99, 105,
             107, 108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277, 283, 287, 291, 295,
             298, 301, 306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330, 334, 335, 336,
             347, 361, 363, 372, 378, 386, 397, 400, 401, 402, 404, 407, 411, 416, 417, 420, 425, 428, 430, 437, 438,
             445, 456, 457, 461, 462, 470, 472, 483, 486, 488, 492, 496, 514, 516, 528, 530, 539, 542, 543, 549, 552,
             557, 561, 562, 569, 572, 573, 575, 579, 589, 606, 607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668,
             677, 682, 684, 687, 701, 704, 719, 736, 746, 749, 752, 758, 763, 765, 768, 773, 774, 776, 779, 780, 786,
             792, 797, 802, 803, 804, 813, 815, 820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870, 879, 880,
             888, 890, 897, 900, 907, 913, 924, 932, 933, 934, 937, 943, 945, 947, 951, 954, 956, 957, 959, 971, 972,
             980, 981, 984, 986, 987, 988]


def _timm_list(name):
    path = os.path.join(os.path.dirname(timm.__file__), "data", "_info", name)
    return open(path).read().split()


def test_shipped_lists_are_the_reference_codes_and_timms():
    assert len(R_INDICES) == len(A_INDICES) == 200
    assert list(IMAGENET_R_WNIDS) == [SYNSETS[i] for i in R_INDICES]
    assert list(IMAGENET_A_WNIDS) == [SYNSETS[i] for i in A_INDICES]
    assert list(IMAGENET_R_WNIDS) == _timm_list("imagenet_r_synsets.txt")
    assert list(IMAGENET_A_WNIDS) == _timm_list("imagenet_a_synsets.txt")
    assert subset_indices(SYNSETS, IMAGENET_R_WNIDS) == R_INDICES
    assert subset_indices(SYNSETS, IMAGENET_A_WNIDS) == A_INDICES
    with pytest.raises(ValueError, match=r"ImageNet-R needs a model whose classes include its 200 WordNet ids; 200 are "
                                         r"not among the model's 10 classes: 'n01443537'|n01443537"):
        subset_indices([f"c{i}" for i in range(10)], IMAGENET_R_WNIDS, name="ImageNet-R")


def test_masking_picks_the_best_logits_inside_the_subset():
    subset = torch.tensor(R_INDICES)
    logits = torch.zeros(3, 1000)
    logits[0, 0] = 10.0          # tench (index 0) is not an ImageNet-R class: ignored
    logits[0, R_INDICES[5]] = 3.0
    logits[0, R_INDICES[7]] = 2.0
    logits[1, R_INDICES[-1]] = 1.0
    logits[2, :] = -torch.arange(1000).float()  # unmasked order 0, 1, 2, ...; masked: 1, 2, 4, 6, 8
    assert topk_predictions(logits, 1).view(-1).tolist() == [0, R_INDICES[-1], 0]
    assert topk_predictions(logits, 1, subset).view(-1).tolist() == [R_INDICES[5], R_INDICES[-1], 1]
    assert topk_predictions(logits, 5, subset)[2].tolist() == [1, 2, 4, 6, 8]
    labels = torch.tensor([R_INDICES[7], R_INDICES[-1], 8])
    assert topk_correct(logits, labels, (1, 5), subset).tolist() == [[0, 1], [1, 1], [0, 1]]
    assert topk_correct(logits, labels, (1, 5)).tolist() == [[0, 1], [1, 1], [0, 0]]  # 8 is 9th unmasked


def _wnid_folder(root, wnids, per_class=2, size=40, seed=0):
    rng = np.random.default_rng(seed)
    for w in wnids:
        os.makedirs(os.path.join(root, w), exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(root, w, f"{i}.jpg"))
    return str(root)


def test_imagenet_r_and_a_mask_logits_end_to_end(tmp_path):
    r_wnids, a_wnids = list(IMAGENET_R_WNIDS[3:6]), list(IMAGENET_A_WNIDS[-2:])
    r_root, a_root = _wnid_folder(tmp_path / "r", r_wnids), _wnid_folder(tmp_path / "a", a_wnids, seed=1)
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=1000, dual_norm=False).eval()
    suite = SuiteConfig(clean=False, imagenet_r=r_root, imagenet_a=a_root, image_size=32, batch_size=4, num_workers=0)
    sets = evaluate_model(model, suite)["sets"]
    tf = transforms.Compose([transforms.Resize(math.floor(32 / 0.875)), transforms.CenterCrop(32),
                             transforms.ToTensor()])
    for key, root, wnids, indices in (("imagenet_r", r_root, r_wnids, R_INDICES),
                                      ("imagenet_a", a_root, a_wnids, A_INDICES)):
        x = torch.stack([tf(Image.open(os.path.join(root, w, f)).convert("RGB"))
                         for w in wnids for f in sorted(os.listdir(os.path.join(root, w)))])
        labels = torch.tensor([SYNSETS.index(w) for w in wnids for _ in range(2)])
        with torch.no_grad():
            logits = model(x)
        masked = torch.tensor(indices)[logits[:, indices].argmax(1)]  # the reference code's output[:, indices]
        assert not torch.equal(masked, logits.argmax(1))  # masking changes predictions here
        assert sets[key]["images"] == len(labels) and sets[key]["masked_to"] == 200
        assert sets[key]["top1"] == pytest.approx(100 * (masked == labels).float().mean().item())
    # a folder with a class outside the subset
    _wnid_folder(tmp_path / "r", ["n01440764"])  # tench: an ImageNet-1k class, not an ImageNet-R one
    with pytest.raises(DataError, match=r"class folders 'n01440764' are not ImageNet-R classes"):
        evaluate_model(model, suite)
    # a model that was not trained on the ImageNet-1k classes
    small = create_model("resnet18", num_classes=10, dual_norm=False)
    with pytest.raises(ValueError, match=r"masked to its 200 classes, which needs the model's class names"):
        evaluate_model(small, SuiteConfig(clean=False, imagenet_a=a_root, num_workers=0))
    with pytest.raises(ValueError, match=r"ImageNet-A needs a model whose classes include its 200 WordNet ids"):
        evaluate_model(small, SuiteConfig(clean=False, imagenet_a=a_root, num_workers=0), classes=[str(i) for i in range(10)])


def test_folder_to_label_alignment_rules():
    classes = ["cat", "dog", "emu"]
    assert align_classes(["dog", "emu"], model_classes=classes, num_classes=3, where="x") == {"dog": 1, "emu": 2}
    # ImageNet-V2 names its folders by label index (not sorted as strings: "10" is label 10)
    v2 = align_classes(["0", "10", "2"], model_classes=[f"n{i}" for i in range(11)], num_classes=11, where="v2")
    assert v2 == {"0": 0, "10": 10, "2": 2}
    with pytest.raises(DataError, match=r"v2: class folders '11' are label indices outside the model's 0\.\.10"):
        align_classes(["0", "11"], model_classes=None, num_classes=11, where="v2")
    # class names unknown: a folder with exactly num_classes classes is taken in sorted order (ImageFolder)
    assert align_classes(["a", "b"], model_classes=None, num_classes=2, where="x") == {"a": 0, "b": 1}
    with pytest.raises(DataError, match=r"x: class folders 'fox' are not classes of the model .* like 'cat', 'dog'"):
        align_classes(["cat", "fox"], model_classes=classes, num_classes=3, where="x")
