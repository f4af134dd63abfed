"""fap without its optional dependencies: HF ``datasets``, FFCV, DeepSpeed (and pydantic, which
only DeepSpeed needs), as on a GPU node that has none of them (issue #15).

Each check runs in a subprocess whose import system cannot see those packages (every finder
of ``sys.meta_path`` wrapped to find neither their modules nor their metadata), so the
installed copies on this machine cannot leak in.
"""
import subprocess
import sys
import textwrap

from helpers_engine import REPO, clean_env, make_image_folder

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {"datasets", "ffcv", "deepspeed", "pydantic"}

    class Hide(importlib.abc.MetaPathFinder):
        \"\"\"Wraps one finder; finds nothing for BLOCKED packages, as if they were not installed.\"\"\"
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED or not hasattr(self.inner, "find_spec"):
                return None
            return self.inner.find_spec(name, path, target)

        def find_distributions(self, context=None):  # importlib.metadata: hide their metadata too
            found = getattr(self.inner, "find_distributions", lambda context=None: [])(context)
            return [d for d in found if d.metadata["Name"].lower() not in BLOCKED]

    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
""")


def _python(code: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code), *args], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=timeout)


def test_fap_imports_without_datasets_ffcv_and_deepspeed():
    proc = _python("""
        import fap, fap.engine, fap.methods, fap.models, fap.data, fap.cli, fap.bench, fap.evaluate, fap.checkpoint
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        try:
            import datasets
        except ImportError as e:
            assert "No module named 'datasets'" in str(e)
        else:
            raise AssertionError("the blocker let datasets through")
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_each_missing_extra_is_named_where_it_is_used(tmp_path):
    """A clear error naming the pip extra, where the package is needed; what does not need it still works."""
    folder = make_image_folder(tmp_path / "folder", classes=2, train_per_class=2, val_per_class=1)
    proc = _python("""
        import os
        from fap.checks import MissingExtra
        from fap.data import hf, inspect, ffcv
        from fap.engine.distributed import deepspeed_preflight

        def message(fn):
            try:
                fn()
            except ImportError as e:
                return str(e)
            raise AssertionError("no error")

        assert hf.detect_layout(sys.argv[1]) == "imagefolder"      # needs no datasets
        assert inspect.inspect_path(sys.argv[1]).splits        # nor does inspecting a folder
        print(message(lambda: hf.load_split(sys.argv[1], "train")))
        print(message(ffcv.import_ffcv))
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        try:
            deepspeed_preflight(None, 10, 1)
        except MissingExtra as e:
            print(e)
    """, str(folder))
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf_line, ffcv_line, ds_line = proc.stdout.strip().splitlines()
    assert "data.source='hf'" in hf_line and "pip install 'fap[hf]'" in hf_line
    assert "pip install 'fap[ffcv]'" in ffcv_line
    assert "--use_deepspeed" in ds_line and "'deepspeed'" in ds_line and "pip install 'fap[deepspeed]'" in ds_line


def test_a_run_on_hf_data_without_datasets_is_a_one_line_error(tmp_path):
    """Through the command line: exit status 2 and one line, not a traceback."""
    folder = make_image_folder(tmp_path / "folder", classes=2, train_per_class=2, val_per_class=1)
    proc = _python("""
        from fap.engine.__main__ import main
        sys.exit(main(sys.argv[1:]))
    """, "--data.source=hf", f"--data.path={folder}", "--train.epochs=1", f"--log.output_dir={tmp_path / 'run'}",
                   "--log.trackers=")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "pip install 'fap[hf]'" in proc.stderr.strip().splitlines()[-1]
