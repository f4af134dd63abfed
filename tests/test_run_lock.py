"""fap.engine.lock: one run writes to a run directory at a time.

A second run on a directory in use stops at once (exit 2, naming the first); the lock of a
run that was SIGKILLed is taken over with a warning, so its directory resumes without any
cleanup; a multi-process launch takes one lock (rank 0's) and every rank stops when it is
taken. The runs are `tests/fault_runner.py` subprocesses on the tiny ViT of `helpers_engine`.
"""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import fap.engine.lock as lock_module
from fap.checkpoint import list_checkpoints
from fap.engine.lock import LOCK_FILE, RunDirInUse, RunDirLock
from helpers_engine import REPO, accelerate_cmd, clean_env, read_log, run, tiny_vit_overrides

RUNNER = str(REPO / "tests" / "fault_runner.py")
HOST = socket.gethostname()
STEPS = {"train.epochs": 2, "checkpoint.every_steps": 1, "checkpoint.keep": 0, "checkpoint.every_epochs": 0,
         "method": "vanilla"}

HOLDER = textwrap.dedent("""
    import sys, time
    from fap.engine.lock import RunDirLock
    RunDirLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def _record(run_dir):
    text = (run_dir / LOCK_FILE).read_text()
    return json.loads(text) if text else {}


def test_a_second_holder_is_refused_and_a_release_frees_the_directory(tmp_path):
    first = RunDirLock(tmp_path / "run")
    assert first.acquire() is None and first.held
    record = _record(tmp_path / "run")
    assert record["pid"] == os.getpid() and record["host"] == HOST and record["started"] <= time.time()
    with pytest.raises(RunDirInUse, match=rf"run is in use by another fap run \(pid {os.getpid()} on {HOST}, started"):
        RunDirLock(tmp_path / "run").acquire()
    first.release()
    first.release()  # idempotent
    assert _record(tmp_path / "run") == {}  # released cleanly: nothing to take over
    again = RunDirLock(tmp_path / "run")
    assert again.acquire() is None
    again.release()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO, env=clean_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match=rf"\(pid {holder.pid} on {HOST}, started .*-c"):
            RunDirLock(run_dir).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    successor = RunDirLock(run_dir)
    warning = successor.acquire()
    assert warning is not None and "ended without releasing it (killed?)" in warning and f"pid {holder.pid}" in warning
    assert _record(run_dir)["pid"] == os.getpid()
    successor.release()


def test_without_file_locks_the_record_decides(tmp_path, monkeypatch):
    """A filesystem that refuses flock (Lustre -o noflock): a record of a live process on this
    host or of another host is in use; one of a dead process on this host is taken over."""
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", no_flock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cases = [({"host": HOST, "pid": os.getppid()}, rf"in use by another fap run \(pid {os.getppid()} on {HOST}"),
             ({"host": "node-17", "pid": 1}, r"node-17.*this filesystem has no file locks.*that run is gone, delete"),
             ({"host": HOST, "pid": int(dead.stdout)}, None)]
    for i, (record, refused) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        (run_dir / LOCK_FILE).write_text(json.dumps({**record, "started": time.time()}))
        lock = RunDirLock(run_dir)
        if refused:
            with pytest.raises(RunDirInUse, match=refused):
                lock.acquire()
            assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == record["pid"]  # left alone
        else:
            assert f"pid {record['pid']} on {HOST}" in lock.acquire()
            lock.release()


def _wait_for(condition, proc, what, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_second_fap_train_exits_2_and_a_killed_run_resumes_without_cleanup(tiny_folder, tmp_path):
    """The issue's case: `fap train --checkpoint.resume=auto` on the directory of a run that is
    still training (a requeue while the first attempt runs) exits 2 naming the first, and
    touches nothing; once the first is SIGKILLed, the same command resumes it."""
    out = tmp_path / "run"
    args = tiny_vit_overrides(tiny_folder, out, **STEPS)
    first = subprocess.Popen([sys.executable, RUNNER, *args], cwd=REPO, env=clean_env(FAP_FAULT="pause_after_save:1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(list_checkpoints(out)) == 1, first, "its first checkpoint")
        second = subprocess.run([sys.executable, "-m", "fap", "train", *args, "--checkpoint.resume=auto"], cwd=REPO,
                                env=clean_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        error = [line for line in second.stderr.splitlines() if line.startswith("fap train: error:")]
        assert len(error) == 1 and f"{out} is in use by another fap run (pid {first.pid} on {HOST}" in error[0], \
            second.stderr[-3000:]
        assert "fault_runner.py" in error[0]  # the other run's command
        assert [p.name for p in list_checkpoints(out)] == ["step_00000001"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    resumed = subprocess.run([sys.executable, "-m", "fap", "train", *args, "--checkpoint.resume=auto"], cwd=REPO,
                             env=clean_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "taking over the lock of a run that ended without releasing it (killed?)" in resumed.stderr
    assert f"pid {first.pid}" in resumed.stderr
    assert "resumed from" in resumed.stdout and [r["step"] for r in read_log(out) if r["type"] == "train"][-1] == 4
    assert _record(out) == {}  # the run released the directory when it ended


@pytest.mark.distributed
def test_every_rank_of_a_launch_stops_when_the_directory_is_taken(tiny_folder, tmp_path):
    """2 processes: rank 0 finds the lock taken, every rank raises the same one-line error
    (the others wait for rank 0's outcome), and the launch ends instead of hanging. (The
    launcher may stop rank 1 before it prints its line: one line or two.)"""
    out = tmp_path / "run"
    held = RunDirLock(out)
    held.acquire()
    try:
        args = tiny_vit_overrides(tiny_folder, out, **STEPS)
        cmd = accelerate_cmd("-m", [], processes=2)[:-1] + ["-m", "fap.engine", *args]
        proc = run(cmd, check=False, timeout=240)  # helpers_engine.run: once more if a rank aborts at start-up
    finally:
        held.release()
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line and "is in use by another fap run" in line]
    assert 1 <= len(errors) <= 2 and all(f"(pid {os.getpid()} on {HOST}" in e for e in errors), proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing read or written besides the lock
