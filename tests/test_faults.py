"""Fault injection: training survives kills, bad numbers and bad files, and loses nothing.

Every run is a subprocess of `tests/fault_runner.py` (``fap.engine`` with one fault from
``FAP_FAULT``) on the tiny ViT of `helpers_engine`: 48 images, batch 20, so 2 Fast
AdvProp updates per epoch, a checkpoint after every update, the newest 2 kept. The data
pipeline is the default one (RandomResizedCrop + flip, seeded per sample), with the random
start on, so every resume that must be bitwise exact is one through random augmentation,
half of them mid-epoch.
"""
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fap.checkpoint import MARKER, list_checkpoints
from helpers_engine import REPO, accelerate_cmd, clean_env, load_export, read_log, tiny_vit_overrides

RUNNER = str(REPO / "tests" / "fault_runner.py")
FAULTS = {"train.epochs": 6, "method.random_init_prob": 1.0, "checkpoint.every_steps": 1, "checkpoint.keep": 2,
          "checkpoint.every_epochs": 0, "log.every_steps": 1}
UPDATES = 12


def _cmd(data, out, **overrides):
    return [sys.executable, RUNNER, *tiny_vit_overrides(data, out, **{**FAULTS, **overrides})]


def _run(data, out, fault="", timeout=300, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(data, out, **overrides), cwd=REPO, env=clean_env(FAP_FAULT=fault),
                          capture_output=True, text=True, timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _digest(path: Path):
    """Every file under ``path`` (or the file itself) -> sha256."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _state(run_dir: Path):
    """What a failed start must leave untouched: checkpoints, log and config."""
    out = {}
    for p in [run_dir / "checkpoints", run_dir / "log.jsonl", run_dir / "config.json"]:
        if p.exists():
            out.update(_digest(p))
    return out


def _steps(run_dir):
    return [int(p.name.split("_")[1]) for p in list_checkpoints(run_dir)]


def _resumed_from(proc):
    lines = [line for line in proc.stdout.splitlines() if line.startswith("resumed from")]
    return lines[0].split()[2] if lines else None


@pytest.fixture(scope="module")
def straight(tiny_folder, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    _ok(_run(tiny_folder, out))
    return out


def _equal_exports(a, b):
    ea, eb = load_export(a), load_export(b)
    return ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


# ------------------------------------------------------------------------------------
# Kill and resume
# ------------------------------------------------------------------------------------

def _kill_when(proc, condition, timeout=240):
    """SIGKILL ``proc`` as soon as ``condition()`` holds (polled every millisecond)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    proc.communicate(timeout=timeout)
    return proc


def test_killed_runs_resume_to_the_same_weights(tiny_folder, straight, tmp_path):
    """SIGKILL at 6 points - inside a checkpoint write, between marker and rename, inside a
    prune, while a save is in flight (seen from outside) and at 2 random times - each
    followed by ``--checkpoint.resume=auto``; the run ends bitwise equal to the straight one.
    The killed attempts decode in a loader worker, the last one in two, the straight run in
    the main process: the augmentation does not depend on it."""
    out = tmp_path / "killed"
    worker = {"data.num_workers": 1}
    ckpts = out / "checkpoints"
    kills = []

    def check_after_kill(proc, what):
        assert proc.returncode == -signal.SIGKILL, f"{what}: expected a SIGKILL, got {proc.returncode}\n{proc.stderr[-3000:]}"
        complete = list_checkpoints(out)
        for p in complete:  # every marked checkpoint is whole: marker last, nothing missing
            names = {f.name for f in p.iterdir()}
            assert {"model.safetensors", "optimizer.bin", MARKER} <= names, (what, p, names)
        kills.append((what, _steps(out)))
        return complete

    def resume(fault="", **kw):
        proc = _run(tiny_folder, out, fault, **{"checkpoint.resume": "auto", **worker, **kw})
        return proc

    # 1. Inside the 3rd save: the weights are on disk, the optimizer state half-written.
    p = _run(tiny_folder, out, "kill_in_save:3", **worker)
    check_after_kill(p, "in save")
    assert _steps(out) == [1, 2] and (ckpts / ".tmp-step_00000003").is_dir()

    # 2. After the 2nd save of the resumed run wrote its marker, before the rename.
    p = resume("kill_before_rename:2")
    assert _resumed_from(p) == str(ckpts / "step_00000002"), p.stdout  # never the partial step 3
    check_after_kill(p, "before rename")
    assert _steps(out) == [2, 3] and (ckpts / ".tmp-step_00000004" / MARKER).is_file()

    # 3. Inside the prune that follows the next save: step 2 renamed away, not yet deleted.
    p = resume("kill_in_prune:1")
    assert _resumed_from(p) == str(ckpts / "step_00000003"), p.stdout
    check_after_kill(p, "in prune")
    assert _steps(out) == [3, 4] and (ckpts / ".tmp-del-step_00000002").is_dir()

    # 4. From outside, the moment the next save's temporary directory appears.
    proc = subprocess.Popen(_cmd(tiny_folder, out, **{"checkpoint.resume": "auto", **worker}), cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_when(proc, lambda: any(c.name.startswith(".tmp-step_") for c in ckpts.iterdir()))
    check_after_kill(proc, "save in flight")
    assert _steps(out)[-1] >= 4

    # 5-6. At random moments (seeded) once the next two attempts are training.
    rng = random.Random(7)
    for attempt in range(2):
        log_size = (out / "log.jsonl").stat().st_size
        proc = subprocess.Popen(_cmd(tiny_folder, out, **{"checkpoint.resume": "auto", **worker}), cwd=REPO,
                                env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        delay, started = rng.uniform(0.0, 1.0), []

        def due():
            if not started and (out / "log.jsonl").stat().st_size > log_size + 200:  # a record past "resume"
                started.append(time.time())
            return bool(started) and time.time() - started[0] > delay
        _kill_when(proc, due)
        if proc.returncode == 0:  # the run outran the kill: nothing more to test
            break
        check_after_kill(proc, f"random, {delay:.2f}s into training")

    final = resume(**{"data.num_workers": 2})  # data.num_workers may change on resume: still exact
    _ok(final)
    assert _steps(out)[-1] == UPDATES
    assert not any(c.name.startswith(".tmp-") for c in ckpts.iterdir()), "leftovers were not cleaned up"
    assert _equal_exports(straight, out), f"weights differ from the uninterrupted run after kills {kills}"
    print("kills:", kills)


# ------------------------------------------------------------------------------------
# Non-finite losses
# ------------------------------------------------------------------------------------

def test_a_nan_loss_stops_naming_update_branch_and_checkpoint(tiny_folder, tmp_path):
    out = tmp_path / "nan"
    proc = _run(tiny_folder, out, "nan:3:adversarial")
    assert proc.returncode != 0
    err = proc.stderr
    assert "NonFiniteLossError: non-finite loss in update 3" in err, err[-3000:]
    assert "the adversarial loss is NaN/Inf" in err
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step_00000002'}" in err
    assert _steps(out) == [1, 2]  # nothing saved after the bad update
    record = [r for r in read_log(out) if r["type"] == "nonfinite"]
    assert record == [{"type": "nonfinite", "step": 3, "epoch": 1, "branches": ["adversarial"], "action": "stop"}]


# The tiny ViT, and a small ResNet whose BatchNorm statistics the skipped forward passes moved.
SKIP_MODELS = [pytest.param({}, id="vit"),
               pytest.param({"model.name": "resnet18", "model.img_size": "None", "model.aux_group_size": 4,
                             "model.kwargs": json.dumps({"channels": [8, 16, 32, 64]})}, id="resnet-bn")]


@pytest.mark.parametrize("model", SKIP_MODELS)
def test_skipping_a_nan_update_leaves_the_weights_untouched(tiny_folder, tmp_path, model):
    out = tmp_path / "skip"
    proc = _ok(_run(tiny_folder, out, "nan:3:noisy", **{"train.nonfinite": "skip", "checkpoint.keep": 0, **model}))
    assert "update 3 skipped: non-finite noisy" in proc.stdout
    log = read_log(out)
    assert [r for r in log if r["type"] == "nonfinite"] == [
        {"type": "nonfinite", "step": 3, "epoch": 1, "branches": ["noisy"], "action": "skip", "skipped_total": 1}]
    assert log[-1]["type"] == "summary" and log[-1]["nonfinite_skipped"] == 1 and log[-1]["steps"] == UPDATES
    # Update 3 changed nothing: the weights and optimizer state after it equal those before it.
    from safetensors.torch import load_file
    c = out / "checkpoints"
    before, after = load_file(str(c / "step_00000002" / "model.safetensors")), \
        load_file(str(c / "step_00000003" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # parameters and norm statistics
    assert model == {} or any("running_mean" in k for k in before)
    from fap.checkpoint import safe_torch_load
    opt_before, opt_after = (safe_torch_load(c / f"step_0000000{i}" / "optimizer.bin")["state"] for i in (2, 3))
    assert opt_before.keys() == opt_after.keys() and all(
        torch.equal(opt_before[i]["momentum_buffer"], opt_after[i]["momentum_buffer"]) for i in opt_before)
    head = "net.fc.weight" if model else "net.head.weight"
    assert not torch.equal(after[head], load_file(str(c / "step_00000004" / "model.safetensors"))[head])
    assert all(torch.isfinite(v).all() for v in load_export(out).values())


# ------------------------------------------------------------------------------------
# Bad files: each a clear error before any state is overwritten
# ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_steps(tiny_folder, tmp_path_factory):
    """A run stopped after 2 updates (checkpoints step 1 and 2), to break in various ways."""
    out = tmp_path_factory.mktemp("bad") / "run"
    _ok(_run(tiny_folder, out, **{"train.max_steps": 2}))
    summary = json.loads((out / "summary.json").read_text())  # the cost of what ran: 1 of 6 epochs
    assert summary["epochs_run"] == 1 and summary["cost_ratio_run"] == pytest.approx(1.2 / 6)
    return out


def _broken_copy(two_steps, tmp_path, name):
    run = tmp_path / name
    shutil.copytree(two_steps, run)
    return run, run / "checkpoints" / "step_00000002"


class Evil:
    """A pickle that would run a shell command when loaded."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _make_evil(path, sentinel):
    torch.save({"step": 2, "payload": Evil(sentinel)}, path)


def _bad_resume_cases(tiny_folder, two_steps, tmp_path):
    """(name, breaking function, overrides, expected words) for a resume from step 2."""
    sentinel = tmp_path / "pwned"

    def marker_edit(**changes):
        def f(ckpt):
            m = json.loads((ckpt / MARKER).read_text())
            m.update(changes)
            (ckpt / MARKER).write_text(json.dumps(m))
        return f

    def other_model_weights(ckpt):
        other = tmp_path / "other_model"
        _ok(_run(tiny_folder, other, **{"train.max_steps": 1, "model.kwargs": json.dumps({"patch_size": 8, "depth": 1})}))
        shutil.copy(list_checkpoints(other)[-1] / "model.safetensors", ckpt / "model.safetensors")

    def unknown_key_in_marker(ckpt):
        m = json.loads((ckpt / MARKER).read_text())
        m["config"]["train"]["warmup_epochz"] = 3
        (ckpt / MARKER).write_text(json.dumps(m))

    def truncate(name):
        def f(ckpt):
            p = ckpt / name
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        return f

    return [
        ("malicious custom state", lambda c: _make_evil(c / "custom_checkpoint_0.pkl", sentinel), {},
         ["custom_checkpoint_0.pkl: refused to load (it references posix.system)"]),
        ("malicious optimizer state", lambda c: _make_evil(c / "optimizer.bin", sentinel), {},
         ["optimizer.bin: refused to load"]),
        ("malicious RNG state", lambda c: _make_evil(c / "random_states_0.pkl", sentinel), {},
         ["random_states_0.pkl: refused to load"]),
        ("another fap version", marker_edit(fap_version="0.0.9"), {},
         ["was written by fap 0.0.9; this is fap 0.1.0", "resume with fap 0.0.9"]),
        ("another checkpoint format", marker_edit(format=2), {}, ["has checkpoint format 2", "reads format 1 only"]),
        ("a marker without version", marker_edit(format=None, fap_version=None), {}, ["format None (fap unknown)"]),
        ("another model's config", lambda c: None, {"model.kwargs": json.dumps({"patch_size": 8, "depth": 1})},
         ["cannot resume", "model.kwargs: checkpoint has"]),
        ("another model's weights", other_model_weights, {}, ["does not fit this run's model or optimizer"]),
        ("an unknown key in the checkpoint's config", unknown_key_in_marker, {},
         ["unknown keys ['warmup_epochz'] in section 'train'"]),
        ("a truncated weights file", truncate("model.safetensors"), {}, ["model.safetensors is not a readable safetensors"]),
        ("a truncated optimizer state", truncate("optimizer.bin"), {}, ["optimizer.bin cannot be loaded"]),
        ("an unknown command-line key", lambda c: None, {"train.warmup_epochz": 3},
         ["unknown key 'warmup_epochz' in --train.warmup_epochz: section 'train' has name, seed"]),
    ]


def _train_in_process(data, out, **overrides) -> str:
    """Start ``fap.train`` here and return its error; the cases fail before Accelerate starts."""
    from fap.config import TrainConfig, parse_args
    from fap.engine import train

    try:
        train(parse_args(TrainConfig(), tiny_vit_overrides(data, out, **{**FAULTS, **overrides})))
    except Exception as e:  # the test checks which, by its message
        return f"{type(e).__name__}: {e}"
    raise AssertionError("the run did not fail")


def test_bad_checkpoints_and_configs_are_refused_before_anything_is_written(tiny_folder, two_steps, tmp_path):
    cases = _bad_resume_cases(tiny_folder, two_steps, tmp_path)
    for i, (name, breaker, overrides, words) in enumerate(cases):
        run, ckpt = _broken_copy(two_steps, tmp_path, f"case{i}")
        breaker(ckpt)
        before = _state(run)
        overrides = {"checkpoint.resume": "auto", **overrides}
        if name == "another model's weights":  # found by Accelerate's load: in a process of its own
            proc = _run(tiny_folder, run, **overrides)
            assert proc.returncode != 0, f"{name}: the run did not fail\n{proc.stdout[-2000:]}"
            error = proc.stderr
        else:
            error = _train_in_process(tiny_folder, run, **overrides)
        for w in words:
            assert w in error, f"{name}: {w!r} not in the error:\n{error[-3000:]}"
        assert _state(run) == before, f"{name}: the failed start changed files of the run"
    assert not (tmp_path / "pwned").exists(), "a malicious pickle was executed"


def test_export_and_weight_loading_refuse_malicious_pickles(two_steps, tmp_path):
    from fap.checkpoint import CheckpointError, load_checkpoint_weights

    run, ckpt = _broken_copy(two_steps, tmp_path, "evil_ema")
    marker = json.loads((ckpt / MARKER).read_text())
    marker["state_files"] = {**marker.get("state_files", {}), "ema": "custom_checkpoint_0.pkl"}  # pretend it is an EMA
    (ckpt / MARKER).write_text(json.dumps(marker))
    _make_evil(ckpt / "custom_checkpoint_0.pkl", tmp_path / "pwned")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint_weights(ckpt, ema=True)
    proc = subprocess.run([sys.executable, "-m", "fap", "export", str(run), "--ema"], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "refused to load" in proc.stderr
    assert not (tmp_path / "pwned").exists()


def test_corrupt_image_and_truncated_beton_name_the_file(tiny_folder, two_steps, tmp_path):
    # A JPEG that goes bad between two attempts: the resumed run names it and stops;
    # the checkpoints it resumed from are untouched.
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    bad = sorted((data / "train" / "class_01").iterdir())[3]
    bad.write_bytes(bad.read_bytes()[:200])
    run, _ = _broken_copy(two_steps, tmp_path, "corrupt")
    before = {k: v for k, v in _state(run).items() if "checkpoints" in k}
    proc = _run(data, run, **{"checkpoint.resume": "auto"})
    assert proc.returncode != 0 and f"{bad}: corrupt or truncated image" in proc.stderr, proc.stderr[-3000:]
    after = {k: v for k, v in _state(run).items() if "checkpoints" in k}
    assert all(after.get(k) == v for k, v in before.items()), "a complete checkpoint changed"
    assert all(p.name.startswith("step_") for p in (run / "checkpoints").iterdir())

    # A .beton cut short by an interrupted copy, at three places.
    from fap.cli import main as fap_main
    betons = tmp_path / "betons"
    assert fap_main(["data", "to-beton", str(tiny_folder), str(betons), "--write-mode", "jpg",
                     "--max-resolution", "0"]) == 0
    full = (betons / "train.beton").read_bytes()
    for cut in (100, len(full) // 2, len(full) - 5):
        (betons / "train.beton").write_bytes(full[:cut])
        out = tmp_path / f"beton_run_{cut}"
        proc = _run(betons, out, **{"data.source": "ffcv"})
        assert proc.returncode != 0
        assert f"{betons / 'train.beton'}: " in proc.stderr and "truncated" in proc.stderr, proc.stderr[-3000:]
        assert not (out / "checkpoints").exists()


# ------------------------------------------------------------------------------------
# Disk full and read-only output directory
# ------------------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB tmpfs (root only), unmounted afterwards."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); this test needs root")
    yield mnt
    nested = mnt / "run" / "checkpoints"
    if nested.is_dir() and os.path.ismount(nested):
        subprocess.run(["umount", "-l", str(nested)], check=False)
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("fault,errno_text", [("disk_full", "No space left on device"),
                                              ("read_only", "Read-only file system")])
def test_disk_full_or_read_only_at_checkpoint_time(tiny_folder, straight, small_fs, fault, errno_text):
    out = small_fs / "run"
    mount = small_fs
    if fault == "read_only":
        # The checkpoints on a file system of their own: Linux refuses to remount read-only
        # a file system with files open for writing (the run's log).
        mount = out / "checkpoints"
        mount.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], check=True)
    env = clean_env(FAP_FAULT=f"{fault}:3", FAP_FAULT_FILL=str(small_fs), FAP_FAULT_MOUNT=str(mount))
    proc = subprocess.run(_cmd(tiny_folder, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2  # a CheckpointError: the user's to fix, so one line and no traceback
    err = proc.stderr
    assert f"error: could not write checkpoint {out / 'checkpoints' / 'step_00000003'}" in err, err[-3000:]
    assert "Traceback" not in err
    assert errno_text in err
    assert f"the previous checkpoint {out / 'checkpoints' / 'step_00000002'} is intact" in err
    assert _steps(out) == [1, 2]
    kept = _digest(out / "checkpoints" / "step_00000002")

    # Space or write access back: the run continues from step 2 and ends as if nothing happened.
    if fault == "disk_full":
        (small_fs / "filler").unlink()
    else:
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
    assert _digest(out / "checkpoints" / "step_00000002") == kept
    final = _ok(_run(tiny_folder, out, **{"checkpoint.resume": "auto"}))
    assert _resumed_from(final) == str(out / "checkpoints" / "step_00000002")
    assert _equal_exports(straight, out)


# ------------------------------------------------------------------------------------
# A rank dies
# ------------------------------------------------------------------------------------

def _workers(launcher_pid):
    import psutil

    found = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            env = child.environ()
        except psutil.Error:
            continue
        if "LOCAL_RANK" in env and any("fault_runner" in a for a in child.cmdline()):
            found[int(env["LOCAL_RANK"])] = child
    return found


def test_a_dead_rank_ends_the_run_and_resume_continues(tiny_folder, tmp_path):
    """2-process DDP: SIGKILL rank 1 after checkpoint 2; the launcher (and rank 0) exit
    non-zero within a bounded time; ``--resume auto`` with 2 processes finishes the run,
    within tolerance of an uninterrupted 2-process run."""
    args = tiny_vit_overrides(tiny_folder, tmp_path / "dead", **{**FAULTS, "train.dist_timeout_s": 60})
    proc = subprocess.Popen(accelerate_cmd(RUNNER, args, processes=2), cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt2 = tmp_path / "dead" / "checkpoints" / "step_00000002" / MARKER
    deadline = time.time() + 240
    while not ckpt2.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt2.is_file() and proc.poll() is None, "the run did not reach checkpoint 2"
    workers = _workers(proc.pid)
    assert sorted(workers) == [0, 1], workers
    workers[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    stdout, stderr = proc.communicate(timeout=180)
    waited = time.time() - killed_at
    assert proc.returncode != 0
    assert waited < 90, f"the surviving rank took {waited:.0f}s to exit"
    assert not workers[0].is_running() or workers[0].status() == "zombie"
    assert 2 in _steps(tmp_path / "dead")

    resumed = subprocess.run(accelerate_cmd(RUNNER, tiny_vit_overrides(
        tiny_folder, tmp_path / "dead", **{**FAULTS, "checkpoint.resume": "auto"}), processes=2),
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    _ok(resumed)
    assert "resumed from" in resumed.stdout and _steps(tmp_path / "dead")[-1] == UPDATES
    whole = subprocess.run(accelerate_cmd(RUNNER, tiny_vit_overrides(tiny_folder, tmp_path / "whole", **FAULTS),
                                          processes=2), cwd=REPO, env=clean_env(), capture_output=True, text=True,
                           timeout=300)
    _ok(whole)
    a, b = load_export(tmp_path / "whole"), load_export(tmp_path / "dead")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"resumed 2-process run differs by {worst}"
    print(f"surviving rank exited after {waited:.1f}s; max weight difference {worst:.2e}")


# ------------------------------------------------------------------------------------
# Pre-emption: SIGTERM saves the update in flight and exits
# ------------------------------------------------------------------------------------

def _wait_for_training(run_dir: Path, proc, records: int = 3, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        log = run_dir / "log.jsonl"
        if log.is_file() and sum(1 for line in log.read_text().splitlines() if '"type": "train"' in line) >= records:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not start training (rc {proc.poll()})")


def test_sigterm_saves_a_checkpoint_and_resume_matches(tiny_folder, straight, tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen(_cmd(tiny_folder, out, **{"checkpoint.every_steps": 0}), cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_training(out, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, (proc.returncode, stderr[-3000:])
    saved = [r for r in read_log(out) if r["type"] == "preempted"]
    assert len(saved) == 1 and saved[0]["signal"] == "SIGTERM", saved
    assert _steps(out)[-1] == saved[0]["step"] < UPDATES  # every_steps=0: only the pre-emption saved mid-run
    assert f"received SIGTERM: saved {saved[0]['path']}" in stdout
    final = _ok(_run(tiny_folder, out, **{"checkpoint.resume": "auto", "checkpoint.every_steps": 0}))
    assert _resumed_from(final) == saved[0]["path"]
    assert _equal_exports(straight, out), "weights differ after a pre-emption"


def test_sigterm_to_the_launcher_stops_every_rank_at_the_same_update(tiny_folder, tmp_path):
    out = tmp_path / "term2"
    args = tiny_vit_overrides(tiny_folder, out, **{**FAULTS, "checkpoint.every_steps": 0})
    proc = subprocess.Popen(accelerate_cmd(RUNNER, args, processes=2), cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_training(out, proc, records=2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    saved = [r for r in read_log(out) if r["type"] == "preempted"]
    assert len(saved) == 1 and _steps(out)[-1] == saved[0]["step"], (saved, stderr[-3000:])
    marker = json.loads((Path(saved[0]["path"]) / MARKER).read_text())
    assert marker["reason"] == "preempted" and marker["world_size"] == 2
    assert sorted(p.name for p in Path(saved[0]["path"]).glob("random_states_*.pkl")) == \
        ["random_states_0.pkl", "random_states_1.pkl"]  # both ranks wrote their part
    resumed = subprocess.run(accelerate_cmd(RUNNER, tiny_vit_overrides(
        tiny_folder, out, **{**FAULTS, "checkpoint.every_steps": 0, "checkpoint.resume": "auto"}), processes=2),
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    _ok(resumed)
    assert _resumed_from(resumed) == saved[0]["path"]
