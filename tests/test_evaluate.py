"""`fap eval` / `fap.evaluate`: the suite on demo and demo-C against direct computations,
1 vs 2 processes, and the errors for bad input."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms

from helpers_engine import accelerate_cmd, clean_env, run

from fap.attacks import pgd
from fap.data import DataConfig, DataError, make_demo
from fap.data.corrupt import CORRUPTIONS, make_corrupted
from fap.evaluate import SuiteConfig, evaluate_model, flatten, format_markdown
from fap.evaluation.loading import WeightsError, load_model
from fap.evaluation.metrics import corruption_summary
from fap.models import PixelModel, create_model

SIZE = 32
# hendrycks/robustness ImageNet-C/test.py: AlexNet top-1 error per corruption (mean over severities)
ALEXNET = dict(zip(CORRUPTIONS, [0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360, 0.866816,
                                 0.826572, 0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500]))
ALEXNET_CLEAN = 1 - 0.56522  # torchvision AlexNet top-1 56.522 %


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(str(tmp_path_factory.mktemp("eval") / "demo"), image_size=SIZE, train_per_class=4,
                     val_per_class=2, num_workers=0)


@pytest.fixture(scope="module")
def demo_c(demo, tmp_path_factory):
    return make_corrupted(os.path.join(demo, "val"), str(tmp_path_factory.mktemp("eval") / "demo-c"), num_workers=2,
                          progress=False)


@pytest.fixture(scope="module")
def export(demo, tmp_path_factory):
    """A resnet18 with random features and a least-squares classifier fitted to the demo's training
    images (so that its predictions vary), exported as the engine exports (`fap.checkpoint.export_timm`)."""
    from fap.checkpoint import export_timm

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10).eval()
    classes = sorted(os.listdir(os.path.join(demo, "train")))
    x, y = _images(os.path.join(demo, "train"), classes, _eval_transform())
    with torch.no_grad():
        net = model.net
        features = net.forward_head(net.forward_features((x - model.mean) / model.std), pre_logits=True)
        design = torch.cat([features, torch.ones(len(y), 1)], dim=1).double()
        solution = torch.linalg.lstsq(design, 10.0 * torch.nn.functional.one_hot(y, 10).double()).solution.float()
        net.fc.weight.copy_(solution[:-1].T)
        net.fc.bias.copy_(solution[-1])
    out = tmp_path_factory.mktemp("eval") / "export"
    return str(export_timm(model.state_dict(), out, model_cfg={"name": "resnet18"}, num_classes=10,
                           data_cfg={"image_size": SIZE, "crop_pct": 0.875, "interpolation": "bilinear"}))


def _eval_transform():
    """timm's eval crop written out: Resize(floor(32 / 0.875)) + CenterCrop(32), to [0, 1]."""
    return transforms.Compose([transforms.Resize(math.floor(SIZE / 0.875)), transforms.CenterCrop(SIZE),
                               transforms.ToTensor()])


def _reference_model(export_dir):
    """The export loaded with plain timm, normalising like timm's pretrained config says."""
    cfg = json.load(open(os.path.join(export_dir, "config.json")))
    net = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"])
    net.load_state_dict(load_file(os.path.join(export_dir, "model.safetensors")))
    return PixelModel(net.eval(), cfg["pretrained_cfg"]["mean"], cfg["pretrained_cfg"]["std"]).eval()


def _images(folder, classes, transform):
    paths, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(folder, name))):
            paths.append(os.path.join(folder, name, f))
            labels.append(label)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    return x, torch.tensor(labels)


def _top1_hits(model, x, y):
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum())


def test_suite_on_demo_and_demo_c_matches_direct_computation(demo, demo_c, export, tmp_path):
    suite = SuiteConfig(clean=True, imagenet_c=demo_c, pgd_steps=2, pgd_epsilon=2.0, batch_size=20, num_workers=0)
    res = evaluate_model(export, suite, data=DataConfig(path=demo, image_size=SIZE, crop_pct=0.875), out_dir=str(tmp_path))
    sets = res["sets"]
    ref = _reference_model(export)
    classes = sorted(os.listdir(os.path.join(demo, "val")))

    # clean: top-1 and top-5 from the logits
    x, y = _images(os.path.join(demo, "val"), classes, _eval_transform())
    with torch.no_grad():
        logits = ref(x)
    assert sets["clean"]["images"] == 20
    assert sets["clean"]["top1"] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
    assert sets["clean"]["top5"] == pytest.approx(100 * top5)
    assert 0 < sets["clean"]["top1"] < 100  # the check is not vacuous

    # PGD-2 at eps 2/255 on the same batch, from the clean image (no random start)
    x_adv = pgd(ref, x, y, epsilon=2.0, steps=2, random_init_prob=0.0)
    assert (x_adv - x).abs().max() <= 2 / 255 + 1e-6
    adv = sets["adversarial"]
    assert adv["top1"] == pytest.approx(100 * _top1_hits(ref, x_adv, y) / 20)
    with torch.no_grad():
        assert (ref(x_adv).argmax(1) != logits.argmax(1)).any()  # the attack moves predictions
    assert adv["clean_top1"] == sets["clean"]["top1"]
    assert (adv["steps"], adv["epsilon"], adv["step"]) == (2, 2.0, 1.0)

    # ImageNet-C: every corruption and severity from the logits (images are pre-cropped: no resize)
    c = sets["imagenet_c"]
    assert c["images"] == 15 * 5 * 20 and c["complete"] and list(c["corruptions"]) == list(CORRUPTIONS)
    for corruption in CORRUPTIONS:
        for severity in range(1, 6):
            folder = os.path.join(demo_c, corruption, str(severity))
            xs, ys = _images(folder, classes, transforms.ToTensor())
            error = 100 * (1 - _top1_hits(ref, xs, ys) / 20)
            assert c["corruptions"][corruption]["errors"][severity - 1] == pytest.approx(error), (corruption, severity)

    # the summary numbers from the per-corruption errors; a 10-class model is no ImageNet model,
    # so no AlexNet-normalised (m)CE: the unnormalised mean error alone, labelled as such
    mean_err = {k: np.mean(v["errors"]) / 100 for k, v in c["corruptions"].items()}
    clean_err = 1 - sets["clean"]["top1"] / 100
    assert c["mean_error"] == pytest.approx(100 * np.mean(list(mean_err.values())))
    assert not c["alexnet_normalised"] and c["mce"] is None and c["relative_mce"] is None
    assert all(v["ce"] is None and v["relative_ce"] is None for v in c["corruptions"].values())
    # the AlexNet-normalised numbers, as for an ImageNet model, from the same errors
    normalised = corruption_summary({k: [e / 100 for e in v["errors"]] for k, v in c["corruptions"].items()},
                                    clean_err)
    assert normalised["mce"] == pytest.approx(100 * np.mean([mean_err[k] / ALEXNET[k] for k in CORRUPTIONS]))
    assert normalised["relative_mce"] == pytest.approx(
        100 * np.mean([(mean_err[k] - clean_err) / (ALEXNET[k] - ALEXNET_CLEAN) for k in CORRUPTIONS]))
    assert normalised["corruptions"]["fog"]["ce"] == pytest.approx(100 * mean_err["fog"] / ALEXNET["fog"])
    assert format_markdown({"sets": {"imagenet_c": dict(normalised, path="x", images=1)}}).count("mCE") >= 2

    # the written report
    on_disk = json.load(open(tmp_path / "results.json"))
    assert on_disk["sets"]["imagenet_c"]["mean_error"] == pytest.approx(c["mean_error"])
    md = open(tmp_path / "results.md").read()
    assert f"| {sets['clean']['top1']:.2f} |" in md and f"{c['mean_error']:.2f}" in md and "| fog |" in md
    assert "mean err ↓ (unnormalised)" in md and "mCE" not in md.replace("(m)CE", "")
    assert md == format_markdown(res) + "\n"
    flat = flatten(res)
    assert "eval/imagenet_c/mce" not in flat and flat["eval/clean/top1"] == sets["clean"]["top1"]
    assert flat["eval/imagenet_c/mean_error"] == pytest.approx(c["mean_error"])


def _cli_args(export, demo, demo_c, out):
    return ["eval", export, "--suite", f"clean={demo}", "pgd", f"imagenet_c={demo_c}", "--corruptions",
            "fog", "--pgd-steps", "1", "--pgd-epsilon", "1", "--batch-size", "3", "--num-workers", "0",
            "--image-size", str(SIZE), "--out", str(out)]


def test_one_and_two_processes_give_identical_results(demo, demo_c, export, tmp_path):
    from fap.cli import main

    # 20 images in batches of 3: 7 batches, so the second process gets a padded last batch
    assert main(_cli_args(export, demo, demo_c, tmp_path / "one")) == 0
    cmd = accelerate_cmd("-m", ["fap.cli"] + _cli_args(export, demo, demo_c, tmp_path / "two"), processes=2)
    proc = run(cmd, env=clean_env(ACCELERATE_USE_CPU="1"), timeout=300)
    one = json.load(open(tmp_path / "one" / "results.json"))
    two = json.load(open(tmp_path / "two" / "results.json"))
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert two["sets"] == one["sets"]
    assert two["sets"]["clean"]["images"] == 20 and two["sets"]["adversarial"]["images"] == 20
    assert two["sets"]["imagenet_c"]["images"] == 5 * 20  # duplicates of the padded batches removed
    assert "| fog |" in proc.stdout


def _tiny_folder(root, classes, per_class=2):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
                os.path.join(root, c, f"{i}.jpg"))
    return str(root)


def test_bad_input_names_the_file_key_and_value(demo, demo_c, export, tmp_path, capsys):
    suite = SuiteConfig(clean=False, batch_size=8, num_workers=0)
    classes = sorted(os.listdir(os.path.join(demo, "val")))
    # a set whose classes are not the model's
    stray = _tiny_folder(tmp_path / "sketch", ["arrow", "zebra"])
    with pytest.raises(DataError, match=r"sketch: class folders 'zebra' are not classes of the model.*'arrow'"):
        evaluate_model(export, SuiteConfig(**{**vars(suite), "sketch": stray}), classes=classes)
    # the clean split itself with a foreign class, and without class names the count decides
    shutil.copytree(os.path.join(demo, "val"), tmp_path / "data" / "val")
    os.rename(tmp_path / "data" / "val" / "star", tmp_path / "data" / "val" / "starfish")
    with pytest.raises(DataError, match=r"data/val: class folders 'starfish' are not classes of the model"):
        evaluate_model(export, SuiteConfig(batch_size=8, num_workers=0), data=DataConfig(path=str(tmp_path / "data")),
                 classes=classes)
    with pytest.raises(DataError, match=r"sketch: cannot tell which model outputs its 2 class folders .* --classes"):
        evaluate_model(export, SuiteConfig(**{**vars(suite), "sketch": stray}))
    # ImageNet-C with a missing severity
    broken = tmp_path / "broken-c"
    shutil.copytree(os.path.join(demo_c, "fog"), broken / "fog")
    shutil.rmtree(broken / "fog" / "3")
    with pytest.raises(DataError, match=r"broken-c/fog: missing severity folder\(s\) 3\. .*1, 2, 3, 4, 5"):
        evaluate_model(export, SuiteConfig(**{**vars(suite), "imagenet_c": str(broken)}))
    (broken / "fgo").mkdir()
    with pytest.raises(DataError, match=r"folders 'fgo' are not ImageNet-C corruptions"):
        evaluate_model(export, SuiteConfig(**{**vars(suite), "imagenet_c": str(broken)}))
    # an export whose config names another architecture than its weights are
    wrong = tmp_path / "wrong-export"
    shutil.copytree(export, wrong)
    cfg = json.load(open(wrong / "config.json"))
    cfg["architecture"] = "resnet34"
    json.dump(cfg, open(wrong / "config.json", "w"))
    with pytest.raises(WeightsError, match=r"wrong-export/model\.safetensors: these weights do not fit timm "
                                           r"'resnet34'.*missing \(e\.g\. 'layer1\.2\.conv1\.weight'"):
        load_model(str(wrong))
    with pytest.raises(WeightsError, match=r"'layer1\.0\.conv1\.weight': file \(64, 64, 3, 3\) vs model \(64, 64, 1, 1\).*records "
                                           r"architecture='resnet18'; evaluate with that architecture"):
        load_model(export, model_name="resnet50")
    # a bare safetensors file that names no architecture
    bare = tmp_path / "bare.safetensors"
    shutil.copy(os.path.join(export, "model.safetensors"), bare)
    with pytest.raises(WeightsError, match=r"bare\.safetensors: its metadata names no architecture"):
        load_model(str(bare))
    # the command line says the same in one line, exit status 2
    from fap.cli import main

    assert main(["eval", str(wrong), "--suite", f"imagenet_c={broken}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fap eval: error: ") and "wrong-export/model.safetensors" in err
    # settings
    with pytest.raises(ValueError, match=r"suite\.pgd_random_init_prob=2 is not valid"):
        SuiteConfig(pgd_random_init_prob=2).validate()
    with pytest.raises(ValueError, match=r"pass data=DataConfig"):
        evaluate_model(export, SuiteConfig(clean=True))


def test_in_python_model_and_safetensors_file_with_metadata(demo, export, tmp_path):
    from safetensors.torch import save_file

    weights = load_file(os.path.join(export, "model.safetensors"))
    path = tmp_path / "weights.safetensors"
    save_file(weights, str(path), metadata={"architecture": "resnet18", "num_classes": "10"})
    data = DataConfig(path=demo, image_size=SIZE)
    suite = SuiteConfig(batch_size=8, num_workers=0)
    from_file = evaluate_model(str(path), suite, data=data)
    module = create_model("resnet18", num_classes=10, dual_norm=True)  # a training model: dual norms
    missing, unexpected = module.net.load_state_dict(weights, strict=False)
    assert not unexpected and missing and all(".aux_norm." in k for k in missing)
    from_module = evaluate_model(module, suite, data=data)
    assert from_file["sets"] == from_module["sets"]
    assert from_file["sets"]["clean"]["images"] == 20


def test_presharded_loader_counts_each_sample_once():
    """An FFCV-style loader is sharded like a DistributedSampler, padded with repeats: they are not counted."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, DistributedSampler, Dataset

    from fap.evaluation.loop import score_loader

    class Ids(Dataset):  # image i is filled with i, its label
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return torch.full((3, 2, 2), i, dtype=torch.uint8), i

    def oracle(x):  # logits that put the label encoded in the pixels first
        return torch.nn.functional.one_hot((x[:, 0, 0, 0] * 255).round().long(), 7).float()

    accelerator, totals = Accelerator(cpu=True), {"images": 0, "top1": 0}
    for rank in range(2):
        sampler = DistributedSampler(Ids(), num_replicas=2, rank=rank, shuffle=False, drop_last=False)
        loader = DataLoader(Ids(), batch_size=3, sampler=sampler)
        assert len(sampler) == 4  # 7 samples over 2 shards: one repeat
        loader.num_samples, loader.num_processes, loader.process_index = 7, 2, rank
        counts = score_loader(accelerator, oracle, loader, prepared=False)
        totals = {k: totals[k] + counts[k] for k in totals}
    assert totals == {"images": 7, "top1": 7}


def test_clean_split_from_hf_datasets_equals_the_folder(demo, export, data_hf_offline):
    suite = SuiteConfig(batch_size=8, num_workers=0)
    by_source = {src: evaluate_model(export, suite, data=DataConfig(source=src, path=demo, image_size=SIZE, num_workers=0))
                 for src in ("hf", "folder")}
    hf, folder = (by_source[s]["sets"]["clean"] for s in ("hf", "folder"))
    assert (hf["images"], hf["top1"], hf["top5"]) == (folder["images"], folder["top1"], folder["top5"]) == \
        (20, folder["top1"], folder["top5"])


def test_checkpoint_run_directory_evaluates_like_its_export(demo, export, tmp_path):
    """A training checkpoint (dual norms, Accelerate state) gives the export's numbers; classes come from
    the run's data config."""
    from accelerate import Accelerator

    from fap.checkpoint import TrainState, save_checkpoint

    model = create_model("resnet18", num_classes=10, dual_norm=True)
    model.net.load_state_dict(load_file(os.path.join(export, "model.safetensors")), strict=False)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    data_cfg = {"source": "folder", "path": demo, "image_size": SIZE, "crop_pct": 0.875, "interpolation": "bilinear"}
    marker = {"config": {"model": {"name": "resnet18", "kwargs": {}}, "data": data_cfg}, "num_classes": 10}
    save_checkpoint(accelerator, tmp_path / "run", TrainState(step=3), marker)
    loaded = load_model(str(tmp_path / "run"))
    assert loaded.classes == sorted(os.listdir(os.path.join(demo, "train"))) and loaded.image_size == SIZE
    suite = SuiteConfig(batch_size=20, num_workers=0)
    data = DataConfig(path=demo, image_size=SIZE)
    assert evaluate_model(loaded, suite, data=data)["sets"] == evaluate_model(export, suite, data=data)["sets"]
    with pytest.raises(FileNotFoundError, match=r"nor a complete checkpoint or run directory"):
        load_model(str(tmp_path))


def test_auxiliary_branch_from_a_checkpoint_equals_the_routed_model(demo, export, tmp_path, capsys):
    """``--branch aux``: a checkpoint's auxiliary norms (their running statistics, eval mode) give what
    the dual model routed to its auxiliary norms gives, through the CLI as in Python; an export has none."""
    from accelerate import Accelerator

    from fap.checkpoint import TrainState, save_checkpoint
    from fap.cli import main
    from fap.norm import AUX_NAME, route, select_branch

    torch.manual_seed(1)
    model = create_model("resnet18", num_classes=10, dual_norm=True)
    model.net.load_state_dict(load_file(os.path.join(export, "model.safetensors")), strict=False)
    with torch.no_grad():  # a second domain: other statistics and affine parameters in the aux norms
        for name, t in model.net.state_dict().items():
            if f"{AUX_NAME}." in name and t.is_floating_point():
                t.mul_(1 + 0.3 * torch.rand_like(t)).add_(0.05 * torch.randn_like(t))
    x = torch.rand(4, 3, SIZE, SIZE)
    plain = create_model("resnet18", num_classes=10, dual_norm=False).eval()
    plain.net.load_state_dict(select_branch(model.net.state_dict(), "aux"), strict=True)
    with torch.no_grad(), route(model.eval(), "aux"):
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)

    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(model)
    data_cfg = {"source": "folder", "path": demo, "image_size": SIZE, "crop_pct": 0.875, "interpolation": "bilinear"}
    marker = {"config": {"model": {"name": "resnet18", "kwargs": {}}, "data": data_cfg}, "num_classes": 10}
    save_checkpoint(accelerator, tmp_path / "run", TrainState(step=3), marker)
    suite = SuiteConfig(batch_size=20, num_workers=0, pgd_steps=1, pgd_epsilon=2.0, pgd_random_init_prob=1.0)
    data = DataConfig(path=demo, image_size=SIZE)
    from_checkpoint = evaluate_model(str(tmp_path / "run"), suite, data=data, branch="aux")
    from_module = evaluate_model(prepared, suite, data=data, branch="aux")
    main_branch = evaluate_model(str(tmp_path / "run"), suite, data=data)
    assert from_checkpoint["sets"] == from_module["sets"] and from_checkpoint["branch"] == "aux"
    assert from_checkpoint["sets"] != main_branch["sets"]
    assert main(["eval", str(tmp_path / "run"), "--suite", "clean", "--data", demo, "--branch", "aux",
                 "--batch-size", "20", "--num-workers", "0", "--out", str(tmp_path / "o")]) == 0
    with open(tmp_path / "o" / "results.json") as f:
        assert json.load(f)["sets"]["clean"]["top1"] == from_checkpoint["sets"]["clean"]["top1"]
    assert "(auxiliary norms)" in capsys.readouterr().out
    assert main(["eval", export, "--suite", "clean", "--data", demo, "--branch", "aux"]) == 2
    assert "model.safetensors: branch 'aux': these weights have no auxiliary norms" in capsys.readouterr().err
    with pytest.raises(ValueError, match="branch='aux' needs a model with auxiliary norms"):
        evaluate_model(plain, suite, data=data, branch="aux")
