"""Check a model's per-sample gradients against micro-batches of size one.

By definition, sample ``i``'s gradient is the gradient of its loss computed with a
batch holding only that sample. :func:`check_per_sample_gradients` computes it
that way for every sample, then asks a grad sampler for the same batch through
the pipeline's own questions (per-sample norms, clipped sums for random clip
factors, and ``p.grad_sample`` where the sampler exposes it) and compares.

It also runs the model on the whole batch and on each sample alone: if the
outputs differ, the model mixes samples (batch statistics such as BatchNorm,
attention or a reduction over the batch dimension, a transpose that puts the
batch on another axis before such an operation) and no per-sample gradient can
be right. The report says so.

Dropout layers are switched to eval mode in the copies the check runs on (a
random mask cannot be compared); the module you pass in is never modified.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .errors import DPCoreError, GradSampleError

LossFn = Callable[[Any, Any], Tensor]


@dataclass
class ParameterMismatch:
    """A parameter whose per-sample quantity disagrees with micro-batches."""

    name: str  # qualified parameter name
    module: str  # path of the module that owns it ("" for the root)
    quantity: str  # "per-sample gradient", "per-sample norm" or "clipped sum"
    max_abs_error: float
    max_rel_error: float

    def __str__(self) -> str:
        where = self.module or "<model>"
        return (
            f"{self.name} (module {where}): {self.quantity} off by up to {self.max_abs_error:.3g} "
            f"(relative {self.max_rel_error:.3g})"
        )


@dataclass
class CheckReport:
    """Result of :func:`check_per_sample_gradients`; ``bool(report)`` is ``report.ok``."""

    grad_sample_mode: str
    batch_size: int
    parameters: list[str] = field(default_factory=list)
    mismatches: list[ParameterMismatch] = field(default_factory=list)
    batch_mixing: bool = False
    mixing_details: str = ""
    error: str | None = None  # the grad sampler could not serve this model
    max_abs_error: float = 0.0
    hints: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.batch_mixing and self.error is None

    def __bool__(self) -> bool:
        return self.ok

    @property
    def mismatched_parameters(self) -> list[str]:
        return sorted({m.name for m in self.mismatches})

    def summary(self) -> str:
        head = f"grad_sample_mode={self.grad_sample_mode!r}, batch of {self.batch_size}: "
        if self.ok:
            return head + (
                f"OK ({len(self.parameters)} parameters, max error {self.max_abs_error:.2g})"
            )
        lines = [head + "FAILED"]
        if self.error:
            lines.append(f"  error: {self.error}")
        if self.batch_mixing:
            lines.append(f"  batch mixing: {self.mixing_details}")
        lines.extend(f"  mismatch: {m}" for m in self.mismatches)
        lines.extend(f"  hint: {h}" for h in self.hints)
        return "\n".join(lines)

    __str__ = summary

    def raise_for_failure(self) -> None:
        """Raise :class:`~dpcore.errors.GradSampleError` with the summary unless ok."""
        if not self.ok:
            raise GradSampleError(self.summary())


# ----------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------
def _batch_size(inputs: Any, dim: int) -> int:
    for leaf in pytree.tree_leaves(inputs):
        if isinstance(leaf, Tensor) and leaf.dim() > dim:
            return int(leaf.shape[dim])
    raise GradSampleError(f"inputs hold no tensor with a batch dimension {dim}")


def _select(tree: Any, dims: tuple[int, ...], batch: int, index: int) -> Any:
    """Sample ``index`` (kept as a batch of one) of every tensor with the batch size in
    one of ``dims`` (tried in order); other tensors are shared by all samples."""

    def pick(leaf: Any) -> Any:
        if not isinstance(leaf, Tensor):
            return leaf
        for dim in dims:
            if leaf.dim() > dim and leaf.shape[dim] == batch:
                return leaf.narrow(dim, index, 1)
        return leaf

    return pytree.tree_map(pick, tree)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _prepare(module: nn.Module) -> nn.Module:
    model = copy.deepcopy(module)
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return model


def _per_sample_leaf(t: Any) -> bool:
    """Output tensors that can hold one row per sample; a 0-dim output (a loss the model
    computes inside forward, e.g. Hugging Face models given ``labels``) is a reduction
    over the batch and has no per-sample form to compare."""
    return isinstance(t, Tensor) and t.dim() > 0


def _concat_outputs(outputs: list[Any], dim: int, batch: int) -> list[Tensor]:
    """Per-sample outputs glued back into batch tensors (leaf by leaf)."""
    leaves = [[t for t in pytree.tree_leaves(o) if _per_sample_leaf(t)] for o in outputs]
    glued = []
    for parts in zip(*leaves, strict=True):
        d = dim if parts[0].dim() > dim and parts[0].shape[dim] == 1 else 0
        glued.append(torch.cat(parts, dim=d))
    return glued


# ----------------------------------------------------------------------------------------
# the check
# ----------------------------------------------------------------------------------------
def microbatch_gradients(
    module: nn.Module,
    inputs: Any,
    targets: Any,
    loss_fn: LossFn,
    *,
    batch_first: bool = True,
    targets_batch_dim: int | None = None,
) -> tuple[dict[str, Tensor], list[Any]]:
    """``({name: [B, *shape]}, outputs)``: each sample's gradient from a batch of one."""
    model = _prepare(module)
    dim = 0 if batch_first else 1
    batch = _batch_size(inputs, dim)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows: dict[str, list[Tensor]] = {n: [] for n in params}
    outputs = []
    input_dims = (dim, 0) if dim else (0,)
    if targets_batch_dim is not None:
        target_dims: tuple[int, ...] = (targets_batch_dim,)
    else:  # per-sample targets ([B], [B, k]) first, then per-token ones ([T, B])
        target_dims = (0, dim) if dim else (0,)
    for i in range(batch):
        out = _call(model, _select(inputs, input_dims, batch, i))
        loss = loss_fn(out, _select(targets, target_dims, batch, i))
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, p), g in zip(params.items(), grads, strict=True):
            rows[name].append(torch.zeros_like(p) if g is None else g.detach())
        outputs.append(pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out))
    stacked = {
        n: torch.stack(r) if r else p.new_zeros((0, *p.shape))
        for (n, p), r in zip(params.items(), rows.values(), strict=True)
    }
    return stacked, outputs


def _compare(
    name: str, quantity: str, got: Tensor, want: Tensor, atol: float, rtol: float
) -> tuple[ParameterMismatch | None, float]:
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return ParameterMismatch(
            name, name.rpartition(".")[0], quantity + " (shape)", math.inf, math.inf
        ), math.inf
    if got.numel() == 0:
        return None, 0.0
    err = (got - want).abs()
    max_abs = float(err.max())
    max_rel = float((err / want.abs().clamp_min(1e-12)).max())
    if bool((err > atol + rtol * want.abs()).any()) or not bool(torch.isfinite(got).all()):
        return ParameterMismatch(name, name.rpartition(".")[0], quantity, max_abs, max_rel), max_abs
    return None, max_abs


def check_per_sample_gradients(
    module: nn.Module,
    inputs: Any,
    targets: Any,
    loss_fn: LossFn,
    grad_sample_mode: str = "hooks",
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    batch_first: bool = True,
    loss_reduction: str = "mean",
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
    targets_batch_dim: int | None = None,
) -> CheckReport:
    """Compare grad sampler ``grad_sample_mode`` with micro-batches of size one.

    Args:
        module: the model (not modified; the check runs on copies).
        inputs: the batch: a tensor, a tuple of positional arguments or a dict of
            keyword arguments; every tensor whose batch dimension has the batch size
            is split into samples.
        targets: passed to ``loss_fn`` with the output, split like the inputs.
        loss_fn: ``loss_fn(output, targets) -> scalar`` reducing over the batch as
            ``loss_reduction`` says (e.g. ``nn.CrossEntropyLoss()`` for ``"mean"``).
        grad_sample_mode: a registered grad sampler (``dpcore list-plugins --kind grad_sampler``).
        atol, rtol: a value fails when ``|got - want| > atol + rtol * |want|``.
        batch_first: where the batch dimension of the inputs is (0 or 1).
        loss_reduction: ``"mean"`` or ``"sum"``, as given to the grad sampler.
        options: options of the grad sampler (``store_grad_sample`` is turned on
            where the sampler has it, to compare the gradients themselves).
        seed: seeds the random clip factors.
        targets_batch_dim: the batch dimension of the targets; by default dim 0 where
            it has the batch size, else (sequence-first) dim 1.

    Returns:
        A :class:`CheckReport` naming each disagreeing parameter by its module path.
    """
    from .registry import get_registry

    dim = 0 if batch_first else 1
    batch = _batch_size(inputs, dim)
    report = CheckReport(grad_sample_mode, batch)

    try:
        reference, micro_outputs = microbatch_gradients(
            module,
            inputs,
            targets,
            loss_fn,
            batch_first=batch_first,
            targets_batch_dim=targets_batch_dim,
        )
    except (RuntimeError, ValueError) as exc:
        report.batch_mixing = True
        report.mixing_details = (
            f"the model cannot run on one sample alone ({type(exc).__name__}: {exc}): it needs "
            "other samples of the batch (e.g. BatchNorm statistics), so no per-sample gradient "
            "is defined; replace such layers (dpcore.ModuleValidator.fix)"
        )
        return report
    report.parameters = list(reference)

    registry = get_registry()
    info = registry.get("grad_sampler", grad_sample_mode)
    opts = dict(options or {})
    fields = info.options.model_fields if info.options is not None else {}
    if "store_grad_sample" in fields:
        opts.setdefault("store_grad_sample", True)
    if "check_sums" in fields:  # compare everything here instead, parameter by parameter
        opts.setdefault("check_sums", False)
    model = _prepare(module)
    sampler = registry.create("grad_sampler", grad_sample_mode, opts)

    # -- does the model mix samples? ------------------------------------------------------
    with torch.no_grad():
        full = _call(_prepare(module), inputs)
    if batch:
        full_leaves = [t for t in pytree.tree_leaves(full) if _per_sample_leaf(t)]
        try:
            glued = _concat_outputs(micro_outputs, dim, batch)
        except (RuntimeError, ValueError):
            glued = []
        if len(glued) != len(full_leaves) or any(
            a.shape != b.shape for a, b in zip(glued, full_leaves, strict=False)
        ):
            report.batch_mixing = True
            report.mixing_details = (
                "the model's outputs for the whole batch do not have the shapes of the per-sample "
                "outputs put together: it does not keep the batch dimension "
                f"{'first' if dim == 0 else 'second'}"
            )
        else:
            diffs = [
                float((a.double() - b.double()).abs().max())
                for a, b in zip(glued, full_leaves, strict=True)
                if a.numel()
            ]
            worst = max(diffs, default=0.0)
            scale = max((float(b.abs().max()) for b in full_leaves if b.numel()), default=0.0)
            if worst > atol + rtol * scale:
                report.batch_mixing = True
                report.mixing_details = (
                    f"a sample's output changes (by up to {worst:.3g}) when other samples are in the "
                    "batch: the model mixes samples (batch statistics such as BatchNorm, or an "
                    "operation across the batch dimension, e.g. after a transpose). No per-sample "
                    "gradient is defined; replace such layers (dpcore.ModuleValidator.fix) and keep "
                    "operations within each sample."
                )

    # -- the grad sampler ------------------------------------------------------------------
    try:
        sampler.attach(model, batch_first=batch_first, loss_reduction=loss_reduction)
        try:
            loss = loss_fn(_call(model, inputs), targets)
            loss.backward()
            named = sampler.named_parameters()
            grad_samples = {
                n: p.grad_sample.detach().clone()
                for n, p in named.items()
                if getattr(p, "grad_sample", None) is not None
            }
            norms = sampler.per_sample_sq_norms()
            gen = torch.Generator().manual_seed(seed)
            factors = {n: torch.rand(batch, generator=gen).to(p.device) for n, p in named.items()}
            sums = sampler.clipped_sums(factors)
            # per-sample gradients exposed after the flush (ghost/bk never materialise)
            for n, p in named.items():
                if n not in grad_samples and getattr(p, "grad_sample", None) is not None:
                    grad_samples[n] = p.grad_sample.detach().clone()
        finally:
            sampler.detach()
    except (DPCoreError, RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        report.error = f"{type(exc).__name__}: {exc}"
        return report

    missing = [n for n in reference if n not in named]
    for n in missing:
        report.mismatches.append(
            ParameterMismatch(
                n, n.rpartition(".")[0], "not covered by the grad sampler", math.inf, math.inf
            )
        )
    worst = 0.0
    for name, want in reference.items():
        if name in missing:
            continue
        want_norms = want.flatten(1).double().pow(2).sum(1)
        want_sum = torch.einsum("b,b...->...", factors[name].double().cpu(), want.double().cpu())
        checks = [
            ("per-sample norm", norms.get(name), want_norms),
            ("clipped sum", sums.get(name), want_sum),
        ]
        if name in grad_samples:
            checks.insert(0, ("per-sample gradient", grad_samples[name], want))
        for quantity, got, expected in checks:
            if got is None:
                report.mismatches.append(
                    ParameterMismatch(
                        name, name.rpartition(".")[0], quantity + " missing", math.inf, math.inf
                    )
                )
                continue
            if quantity == "per-sample norm":  # compare norms, not squares, for a fair tolerance
                got, expected = got.double().clamp_min(0).sqrt(), expected.sqrt()
            mismatch, err = _compare(name, quantity, got.cpu(), expected.cpu(), atol, rtol)
            worst = max(worst, err)
            if mismatch is not None:
                report.mismatches.append(mismatch)
    report.max_abs_error = worst
    if report.mismatches:
        report.hints.extend(_hints(reference, norms, batch, loss_reduction, report))
    return report


def _hints(
    reference: Mapping[str, Tensor],
    norms: Mapping[str, Tensor],
    batch: int,
    loss_reduction: str,
    report: CheckReport,
) -> list[str]:
    hints = []
    want = sum(float(g.double().pow(2).sum()) for g in reference.values())
    got = sum(float(norms[n].double().sum()) for n in reference if n in norms)
    if want > 0 and got > 0 and batch > 1:
        ratio = math.sqrt(got / want)
        if abs(ratio - batch) < 1e-3 * batch:
            hints.append(
                "every per-sample gradient is batch-size times too large: loss_fn sums over the "
                "batch, so pass loss_reduction='sum'"
            )
        elif abs(ratio * batch - 1) < 1e-3:
            hints.append(
                "every per-sample gradient is batch-size times too small: loss_fn averages over "
                "the batch, so pass loss_reduction='mean'"
            )
    if not report.batch_mixing and not hints:
        hints.append(
            "the outputs do not mix samples, so the model probably moves the batch dimension "
            "(a transpose/permute/reshape of dim 0 before a layer) or a layer grad sampler of the "
            "listed modules is wrong; grad_sample_mode='functorch' does not depend on layer "
            "samplers"
        )
    return hints
