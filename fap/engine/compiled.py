"""``train.compile``: ``torch.compile`` of the network, and what it compiled during the run.

The network is compiled in place (``nn.Module.compile``: state-dict keys unchanged) before
DDP, DeepSpeed or FSDP2 wrap it; under DeepSpeed ZeRO-3 compile is refused at start
(`check_compile`). Routing between main and auxiliary norms
(`fap.norm.route`) is a Python attribute of each dual-norm layer; dynamo guards on it, so
each pass of a method compiles its own graph once and later steps reuse them: Fast
AdvProp's three passes (clean through the main norms; noisy with an input gradient and
adversarial through the auxiliary norms) are three graphs in the first update, then none.
README ("torch.compile") has the counts per method, measured with `CompileWatch`.

`CompileWatch` reads ``torch._dynamo``'s counters around every update: graphs compiled,
graph breaks, and which updates compiled anything. An update after the first
``warmup`` that compiles again is what a run must not do (a guard that fails every step
makes every step pay a compile); the watch warns once, naming the update, and the run
summary reports it under ``compile``.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, Iterator, List

import torch

__all__ = ["check_compile", "compile_network", "CompileWatch", "dynamo_counts"]


def check_compile(compile_: bool, zero_stage) -> None:
    """Refuse ``train.compile`` where it does not compose: DeepSpeed ZeRO-3.

    ZeRO-3 keeps each parameter as an empty placeholder outside the forward of its module
    and gathers it in a hook; dynamo traces the placeholders, and the first backward fails
    ("attempting to assign a gradient of size [192] to a tensor of size [0]"; DeepSpeed
    0.19.8, torch 2.14, aot_eager). ZeRO-2 and FSDP2 compose with it (tests/test_distributed.py).

    Raises:
        ConfigError: ``train.compile=true`` under ZeRO-3.
    """
    if compile_ and zero_stage == 3:
        from fap.config import ConfigError

        raise ConfigError("train.compile=true under DeepSpeed ZeRO-3: torch.compile cannot trace ZeRO-3's "
                          "partitioned parameters (its first backward fails); use ZeRO-2, FSDP2 or DDP with "
                          "train.compile, or train.compile=false under ZeRO-3")


def compile_network(model: torch.nn.Module, backend: str) -> None:
    """``model.net.compile(backend=...)``: in place, so state-dict keys and checkpoints are
    unchanged, and before any wrapper (DDP, DeepSpeed, FSDP2) so that it compiles the network
    itself. An EMA copy of the model shares the compiled code and its graphs."""
    model.net.compile(backend=backend)


def dynamo_counts() -> Dict[str, int]:
    """Graphs compiled, frames dynamo converted, and graph breaks so far in this process."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "frames": int(counters["frames"]["ok"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


class CompileWatch:
    """What torch.compile did over a run's updates (a no-op when the run does not compile).

    Args:
        enabled: the run compiles (``train.compile``).
        warmup: updates allowed to compile (the first update compiles one graph per pass;
            the second may make a batch dimension dynamic).
    """

    def __init__(self, enabled: bool, warmup: int = 2):
        self.enabled, self.warmup = enabled, warmup
        self.first: List[Dict[str, int]] = []   # graphs and breaks of the first updates
        self.late: List[int] = []               # updates after the warm-up that compiled
        self._start = dynamo_counts() if enabled else None

    @contextlib.contextmanager
    def update(self, step: int) -> Iterator[None]:
        """Wrap update number ``step`` (1-based)."""
        if not self.enabled:
            yield
            return
        before = dynamo_counts()
        yield
        after = dynamo_counts()
        graphs = after["graphs"] - before["graphs"]
        if step <= self.warmup + 2:
            self.first.append({"update": step, "graphs": graphs,
                               "graph_breaks": after["graph_breaks"] - before["graph_breaks"]})
        if graphs and step > self.warmup:
            self.late.append(step)
        if len(self.late) == 1 and self.late[0] == step:
            warnings.warn(f"train.compile: update {step} compiled {graphs} new graph(s) after the first "
                          f"{self.warmup} updates; a guard fails as the run goes on (run with "
                          "TORCH_LOGS=recompiles to see which)", stacklevel=3)

    def summary(self) -> Dict[str, Any]:
        """Totals over the run (evaluation included), the first updates' counts, and the
        number (and first 20) of updates after the warm-up that compiled; {} without compile."""
        if not self.enabled:
            return {}
        now = dynamo_counts()
        return {"graphs": now["graphs"] - self._start["graphs"],
                "graph_breaks": now["graph_breaks"] - self._start["graph_breaks"],
                "first_updates": list(self.first), "late_compiling_updates": len(self.late),
                "late_compiling_first": self.late[:20]}
