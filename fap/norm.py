"""Disentangled normalisation: main and auxiliary norm layers with explicit routing.

AdvProp (Xie et al., CVPR 2020, Sec. 4.2) and Fast AdvProp (Mei et al., ICLR 2022, Sec. 3)
learn clean and adversarial images *disentangled*: every normalisation layer gets an
auxiliary copy that only adversarial images pass through, and only the main layers are
kept for inference.

`convert_dual_norm(model)` swaps each BatchNorm (torch's and timm's ``BatchNormAct2d``),
LayerNorm (torch's, timm's ``LayerNorm`` / ``LayerNorm2d``) and GroupNorm for a dual
version, in place:

* the dual module *is* the main branch: it keeps the original class as a base, its
  parameter and buffer names, and its exact forward, so a converted model routed to
  ``"main"`` is bit-identical to the original and its checkpoint (after `strip_aux`)
  loads into plain ``timm.create_model(name)``;
* the auxiliary branch is a child module ``aux_norm`` initialised as a copy of the main
  one (copying matters: timm zero-inits the last BN of each residual block);
* for ``BatchNormAct2d`` the activation and drop run after *either* branch.

Routing is explicit and independent of train/eval mode (`route`, `split_route`).
Auxiliary BatchNorm can compute batch statistics in groups of ``aux_group_size``
samples ("ghost batches") to emulate per-GPU BN groups on one device, which Shuffling BN
needs. `set_grad_scale` multiplies the gradients reaching each branch's affine
parameters inside autograd (a custom identity Function), which is how Fast AdvProp's
per-group gradient normalisation stays exact under DDP and DeepSpeed ZeRO, where
nothing may edit ``param.grad`` after backward.

The norm layers know nothing about training methods: only which branch they are routed
to, their group size and their gradient scales.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, Iterator, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # timm is a hard dependency, but keep this module importable for plain torch models
    from timm.layers import BatchNormAct2d as _TimmBatchNormAct2d
    from timm.layers import LayerNorm2d as _TimmLayerNorm2d
except ImportError:  # pragma: no cover
    _TimmBatchNormAct2d = None
    _TimmLayerNorm2d = None

__all__ = [
    "AUX_NAME",
    "branch_distance",
    "NORM_BRANCHES",
    "DualNorm",
    "convert_dual_norm",
    "copy_main_to_aux",
    "dual_norm_modules",
    "has_batch_norm",
    "has_dual_norm",
    "norm_param_names",
    "route",
    "select_branch",
    "split_route",
    "set_grad_scale",
    "set_aux_group_size",
    "strip_aux",
]

AUX_NAME = "aux_norm"
NORM_BRANCHES = ("main", "aux")


class GradScale(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradients by ``scale``.

    ``GradScale.apply(scale, *tensors)`` returns one output per tensor. A norm layer
    passes its weight and bias together: one autograd node per layer and pass instead of
    two, which halves the Python calls in the backward (126 per Fast AdvProp step of a
    ResNet-18: 21 norm layers × 2 parameters × 3 passes; each costs tens of µs on CPU).

    The forward returns clones, not views: DeepSpeed ZeRO-3 frees gathered parameter
    storage after the module's forward, so a view would dangle.
    """

    @staticmethod
    def forward(ctx, scale: float, *tensors: torch.Tensor):
        ctx.scale = scale
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return (None,) + tuple(None if g is None else g * ctx.scale for g in grads)


def _scaled_affine(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], scale: float):
    """``(weight, bias)`` whose gradients are multiplied by ``scale`` (None stays None)."""
    if scale == 1.0 or not torch.is_grad_enabled():
        return weight, bias
    params = [p for p in (weight, bias) if p is not None and p.requires_grad]
    if not params:
        return weight, bias
    scaled = iter(GradScale.apply(scale, *params))
    return tuple(next(scaled) if (p is not None and p.requires_grad) else p for p in (weight, bias))


# ---------------------------------------------------------------------------------------
# Functional forwards, one per supported norm family. Each reproduces the original
# module's forward exactly (same functional call, same arguments), with the affine
# parameters passed in so that a gradient scale can be applied to them.
# ---------------------------------------------------------------------------------------

def _bn_momentum_and_count(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """Torch's ``_BatchNorm.forward`` bookkeeping: bumps ``num_batches_tracked``."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return factor


def _bn_forward(bn, x, weight, bias, group_size: Optional[int]):
    bn._check_input_dim(x)
    factor = _bn_momentum_and_count(bn)
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_running = not bn.training or bn.track_running_stats
    if group_size is None or not bn.training or x.shape[0] <= group_size:
        return F.batch_norm(
            x,
            bn.running_mean if use_running else None,
            bn.running_var if use_running else None,
            weight, bias, bn_training, factor, bn.eps,
        )
    return _ghost_bn_forward(bn, x, weight, bias, group_size, factor)


def _ghost_bn_forward(bn, x, weight, bias, group_size: int, factor: float):
    """Batch statistics per group of ``group_size`` samples (ghost batch norm).

    Each group is normalised by its own statistics, exactly as a BN replica on one GPU
    of a DDP job would be; the running statistics are updated once, with the mean of the
    groups' statistics (what averaging the replicas' buffers would give).

    The groups' statistics come out of the batch-norm kernel itself: each group's call
    gets a scratch running buffer with momentum 1, which the kernel overwrites with that
    group's mean and unbiased variance; recomputing them from ``x`` (a variance over
    non-adjacent dimensions) was slower (``benchmarks/results/README.md``).
    """
    n = x.shape[0]
    if not ghost_groups_fit(group_size, n):
        raise ValueError(
            f"aux_group_size={group_size} must divide the auxiliary batch, got {n} samples; "
            f"choose a group size that divides B_a (e.g. {_divisors_hint(n)})"
        )
    chunks = x.split(group_size, dim=0)
    if not (bn.track_running_stats and bn.running_mean is not None):
        return torch.cat([F.batch_norm(c, None, None, weight, bias, True, 0.0, bn.eps) for c in chunks])
    groups = len(chunks)
    means = bn.running_mean.new_zeros((groups,) + bn.running_mean.shape)
    vars_ = bn.running_var.new_ones((groups,) + bn.running_var.shape)
    out = torch.cat([
        F.batch_norm(c, means[i], vars_[i], weight, bias, True, 1.0, bn.eps) for i, c in enumerate(chunks)
    ])
    with torch.no_grad():
        bn.running_mean.mul_(1 - factor).add_(means.mean(0), alpha=factor)
        bn.running_var.mul_(1 - factor).add_(vars_.mean(0), alpha=factor)
    return out


def _divisors_hint(n: int) -> str:
    return ", ".join(str(d) for d in range(2, n) if n % d == 0) or "none: use aux_group_size=None"


def _layer_norm(ln, x, weight, bias):
    if getattr(ln, "_fast_norm", False):  # timm's fused-kernel option, same maths
        from timm.layers.fast_norm import fast_layer_norm
        return fast_layer_norm(x, ln.normalized_shape, weight, bias, ln.eps)
    return F.layer_norm(x, ln.normalized_shape, weight, bias, ln.eps)


def _ln_forward(ln, x, weight, bias, group_size=None):
    if _TimmLayerNorm2d is not None and isinstance(ln, _TimmLayerNorm2d):
        # timm's LayerNorm2d: channels-first input, normalised over C.
        return _layer_norm(ln, x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)
    return _layer_norm(ln, x, weight, bias)


def _gn_forward(gn, x, weight, bias, group_size=None):
    if getattr(gn, "_fast_norm", False):
        from timm.layers.fast_norm import fast_group_norm
        return fast_group_norm(x, gn.num_groups, weight, bias, gn.eps)
    return F.group_norm(x, gn.num_groups, weight, bias, gn.eps)


def _family(module: nn.Module):
    """The functional forward for a supported norm module, or None."""
    if isinstance(module, (nn.modules.instancenorm._InstanceNorm, nn.SyncBatchNorm)):
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _bn_forward
    if isinstance(module, nn.LayerNorm):
        return _ln_forward
    if isinstance(module, nn.GroupNorm):
        return _gn_forward
    return None


def _is_exactly_supported(module: nn.Module) -> bool:
    """True when the module's own forward is the one our functional form reproduces.

    timm subclasses (``BatchNormAct2d``, ``LayerNorm``, ``LayerNorm2d``, ``GroupNorm``)
    add activation/drop or permutes that we handle; anything else that overrides
    ``forward`` (e.g. ``GroupNormAct``, ``LayerNormAct``) is refused rather than
    silently mis-converted.
    """
    cls = type(module)
    known = {
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    }
    if cls in known:
        return True
    if _TimmBatchNormAct2d is not None and cls is _TimmBatchNormAct2d:
        return True
    if _TimmLayerNorm2d is not None and cls is _TimmLayerNorm2d:
        return True
    # timm.layers.LayerNorm / GroupNorm only change defaults or use a fused kernel with
    # the same maths; accept subclasses whose forward is not overridden beyond those.
    import timm.layers as tl  # local: optional for plain-torch users
    for name in ("LayerNorm", "GroupNorm", "GroupNorm1"):
        if getattr(tl, name, None) is cls:
            return True
    return False


class DualNorm(nn.Module):
    """Mixin for dual normalisation modules; see the module docstring.

    Attributes:
        route_to: ``"main"``, ``"aux"`` or an int ``n`` (first ``n`` rows main, rest aux).
        aux_group_size: ghost-batch size for auxiliary BatchNorm statistics, or None.
        grad_scale: ``{"main": s, "aux": s}`` gradient multipliers for the affine params.
    """

    _norm_forward = None  # set per generated class

    def _init_dual(self, source: nn.Module, aux_group_size: Optional[int]) -> None:
        self.route_to: Union[str, int] = "main"
        self.aux_group_size = aux_group_size
        self.grad_scale: Dict[str, float] = {"main": 1.0, "aux": 1.0}
        aux = copy.deepcopy(source)
        # The aux branch only normalises; activation and drop of a norm-act layer run
        # once, after whichever branch, from the dual module itself.
        if _TimmBatchNormAct2d is not None and isinstance(source, _TimmBatchNormAct2d):
            aux.act = nn.Identity()
            aux.drop = nn.Identity()
        aux.__class__ = _aux_class(type(source))
        aux.aux_group_size = aux_group_size
        aux.grad_scale = 1.0
        self.add_module(AUX_NAME, aux)

    def _main(self, x: torch.Tensor) -> torch.Tensor:
        s = self.grad_scale["main"]
        return type(self)._norm_forward(self, x, *_scaled_affine(self.weight, self.bias, s), None)

    def _post(self, x: torch.Tensor) -> torch.Tensor:
        if _TimmBatchNormAct2d is not None and isinstance(self, _TimmBatchNormAct2d):
            x = self.drop(x)
            x = self.act(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.route_to
        aux = getattr(self, AUX_NAME)
        aux.grad_scale = self.grad_scale["aux"]
        aux.aux_group_size = self.aux_group_size
        if r == "main":
            out = self._main(x)
        elif r == "aux":
            out = aux(x)  # call the child module: ZeRO-3 gathers its params in its own forward
        else:
            n = int(r)
            if n >= x.shape[0]:
                out = self._main(x)
            elif n <= 0:
                out = aux(x)
            else:
                # One split (its backward is one concatenation) rather than two slices
                # (each slice's backward zero-fills a full-size gradient, then they add).
                x_main, x_aux = x.split([n, x.shape[0] - n], dim=0)
                out = torch.cat([self._main(x_main), aux(x_aux)], dim=0)
        return self._post(out)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, route={self.route_to!r}, aux_group_size={self.aux_group_size}"


class _AuxMixin(nn.Module):
    """Auxiliary branch: the original norm's maths with gradient scale and ghost groups."""

    _norm_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.grad_scale
        return type(self)._norm_forward(self, x, *_scaled_affine(self.weight, self.bias, s), self.aux_group_size)


_DUAL_CLASSES: Dict[type, type] = {}
_AUX_CLASSES: Dict[type, type] = {}


def _dual_class(cls: type) -> type:
    if cls not in _DUAL_CLASSES:
        fn = _family_for_class(cls)
        _DUAL_CLASSES[cls] = type(f"Dual{cls.__name__}", (DualNorm, cls), {"_norm_forward": staticmethod(fn)})
    return _DUAL_CLASSES[cls]


def _aux_class(cls: type) -> type:
    if cls not in _AUX_CLASSES:
        fn = _family_for_class(cls)
        _AUX_CLASSES[cls] = type(f"Aux{cls.__name__}", (_AuxMixin, cls), {"_norm_forward": staticmethod(fn)})
    return _AUX_CLASSES[cls]


def _family_for_class(cls: type):
    if issubclass(cls, nn.modules.batchnorm._BatchNorm):
        return _bn_forward
    if issubclass(cls, nn.LayerNorm):
        return _ln_forward
    if issubclass(cls, nn.GroupNorm):
        return _gn_forward
    raise TypeError(f"no dual form for {cls.__name__}")


def convert_dual_norm(model: nn.Module, *, aux_group_size: Optional[int] = None) -> nn.Module:
    """Give every normalisation layer of ``model`` an auxiliary copy, in place.

    Args:
        model: any ``nn.Module``; timm ResNet, EfficientNet and ViT families are tested.
        aux_group_size: ghost-batch size for auxiliary BatchNorm statistics (e.g. 16 to
            emulate 16 adversarial images per GPU, as the reference recipe has). None
            uses the whole auxiliary batch as one group.

    Returns:
        The same ``model`` object, converted.

    Raises:
        ValueError: the model has no norm layer to convert, or one of a kind whose
            forward we cannot reproduce exactly (named in the message).
    """
    if aux_group_size is not None and aux_group_size < 2:
        raise ValueError(f"aux_group_size must be >= 2 or None, got {aux_group_size}")
    converted, refused = 0, []
    for name, module in model.named_modules():
        if isinstance(module, (DualNorm, _AuxMixin)):
            raise ValueError(f"model is already converted (found dual norm at {name!r})")
    for name, module in list(model.named_modules()):
        if _family(module) is None:
            continue
        if not _is_exactly_supported(module):
            refused.append(f"{name} ({type(module).__module__}.{type(module).__name__})")
            continue
        source = copy.deepcopy(module)
        module.__class__ = _dual_class(type(module))
        module._init_dual(source, aux_group_size)
        converted += 1
    if refused:
        raise ValueError(
            "convert_dual_norm cannot reproduce the forward of these norm layers exactly: "
            + ", ".join(refused[:5]) + (" ..." if len(refused) > 5 else "")
            + ". Supported: torch BatchNorm1d/2d/3d, LayerNorm, GroupNorm and timm "
            "BatchNormAct2d, LayerNorm, LayerNorm2d, GroupNorm."
        )
    if converted == 0:
        raise ValueError(
            f"{type(model).__name__} has no normalisation layer to convert (BatchNorm, "
            "LayerNorm or GroupNorm); dual norms need at least one. Train it with "
            "dual_norm=False (shared norms) instead."
        )
    return model


def copy_main_to_aux(model: nn.Module) -> int:
    """Make every auxiliary norm a copy of its main norm again (affine parameters, running
    statistics, batch count); return how many layers were copied.

    What `convert_dual_norm` does when it converts, done again after the main norms were
    loaded from a model without auxiliary ones: fine-tuning a converged vanilla model with
    dual norms (AdvProp, Xie et al., CVPR 2020) starts both branches from its norms.
    """
    marker = f"{AUX_NAME}."
    layers = dual_norm_modules(model)
    with torch.no_grad():
        for m in layers:
            main = {k: v for k, v in m.state_dict().items() if not k.startswith(marker)}
            getattr(m, AUX_NAME).load_state_dict(main, strict=True)
    return len(layers)


def dual_norm_modules(model: nn.Module) -> List[DualNorm]:
    return [m for m in model.modules() if isinstance(m, DualNorm)]


def has_batch_norm(model: nn.Module) -> bool:
    """Whether any norm layer of ``model`` normalises with batch statistics (BatchNorm)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def ghost_groups_fit(group_size: Optional[int], n: int) -> bool:
    """Whether ``n`` auxiliary samples can be normalised in ghost groups of ``group_size``:
    no groups, one group (``n <= group_size``), or groups that divide ``n``."""
    return group_size is None or n <= group_size or n % group_size == 0


def has_dual_norm(model: nn.Module) -> bool:
    return any(isinstance(m, DualNorm) for m in model.modules())


@contextlib.contextmanager
def _routed(model: nn.Module, value: Union[str, int]) -> Iterator[nn.Module]:
    modules = dual_norm_modules(model)
    previous = [m.route_to for m in modules]
    for m in modules:
        m.route_to = value
    try:
        yield model
    finally:
        for m, p in zip(modules, previous):
            m.route_to = p


def route(model: nn.Module, branch: str):
    """Context manager: send every sample through the ``"main"`` or ``"aux"`` norms.

    Routing is independent of ``model.train()`` / ``model.eval()``. A model without dual
    norms is left as it is (shared norms), so methods work on both.
    """
    if branch not in NORM_BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; expected one of {NORM_BRANCHES}")
    return _routed(model, branch)


def split_route(model: nn.Module, n_main: int):
    """Context manager: the first ``n_main`` rows of each batch use the main norms, the rest aux."""
    if isinstance(n_main, bool) or not isinstance(n_main, int) or n_main < 0:
        raise ValueError(f"n_main must be a non-negative int, got {n_main!r}")
    return _routed(model, n_main)


def set_grad_scale(model: nn.Module, *, main: float = 1.0, aux: float = 1.0) -> None:
    """Multiply the gradients reaching main / aux affine parameters by ``main`` / ``aux``."""
    for m in dual_norm_modules(model):
        m.grad_scale = {"main": float(main), "aux": float(aux)}


def set_aux_group_size(model: nn.Module, group_size: Optional[int]) -> None:
    for m in dual_norm_modules(model):
        m.aux_group_size = group_size


def norm_param_names(model: nn.Module) -> Dict[str, List[str]]:
    """Names of the main-norm and aux-norm affine parameters (the rest is shared)."""
    groups: Dict[str, List[str]] = {"main": [], "aux": []}
    for mod_name, m in model.named_modules():
        if isinstance(m, DualNorm):
            prefix = f"{mod_name}." if mod_name else ""
            for p_name, _ in m.named_parameters(recurse=False):
                groups["main"].append(prefix + p_name)
            for p_name, _ in getattr(m, AUX_NAME).named_parameters():
                groups["aux"].append(f"{prefix}{AUX_NAME}.{p_name}")
    return groups


def strip_aux(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A copy of ``state_dict`` without auxiliary-norm entries: a plain timm checkpoint."""
    marker = f"{AUX_NAME}."
    return {
        k: v for k, v in state_dict.items()
        if not (k.startswith(marker) or f".{marker}" in k)
    }


def select_branch(state_dict: Dict[str, torch.Tensor], branch: str) -> Dict[str, torch.Tensor]:
    """A plain timm state dict of one branch of a dual-norm model.

    ``"main"`` is `strip_aux`; ``"aux"`` puts each layer's auxiliary entries in place of
    its main ones. In eval mode the plain model with the ``"aux"`` dict computes exactly
    what the dual model routed to ``"aux"`` computes (running statistics and affine
    parameters of the auxiliary norms, shared weights otherwise), so every evaluation can
    score the auxiliary branch (AdvProp, Sec. 4.2: two domains, two sets of statistics).

    Raises:
        ValueError: unknown branch, or ``"aux"`` asked of a dict without auxiliary norms.
    """
    if branch not in NORM_BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; expected one of {NORM_BRANCHES}")
    out = strip_aux(state_dict)
    if branch == "main":
        return out
    marker = f"{AUX_NAME}."
    aux = {k: v for k, v in state_dict.items() if k.startswith(marker) or f".{marker}" in k}
    if not aux:
        raise ValueError("branch 'aux': these weights have no auxiliary norms (an export keeps the main norms "
                         "only, and a run with norms='shared' or 'mixed' has none); evaluate a checkpoint or "
                         "run directory of a norms='dual' run")
    for k, v in aux.items():
        main_key = k[len(marker):] if k.startswith(marker) else k.replace(f".{marker}", ".", 1)
        if main_key not in out:
            raise ValueError(f"branch 'aux': {k} has no main counterpart {main_key}")
        out[main_key] = v
    return out


def branch_distance(model: nn.Module) -> List[Dict[str, float]]:
    """Per dual-norm layer, how far the auxiliary branch has moved from the main one.

    The "two domains" evidence of disentangled learning (AdvProp, Sec. 4.2): for each
    layer, ``‖a − m‖ / ‖m‖`` for the running mean and running variance (BatchNorm only)
    and for the affine weight and bias. Relative distances blow up where the main value
    is near zero (timm zero-inits the last BN of residual blocks); read medians.

    Returns:
        One dict per layer: ``{"layer": name, "kind": class name, "running_mean": d, ...}``.
    """
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, DualNorm):
            continue
        aux = getattr(m, AUX_NAME)
        row: Dict[str, float] = {"layer": name, "kind": type(m).__name__[len("Dual"):]}
        for attr in ("running_mean", "running_var", "weight", "bias"):
            a, b = getattr(m, attr, None), getattr(aux, attr, None)
            if a is None or b is None:
                continue
            a, b = a.detach().float(), b.detach().float()
            row[attr] = float((b - a).norm() / a.norm().clamp_min(1e-12))
        rows.append(row)
    return rows
