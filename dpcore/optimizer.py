"""The DP optimizer: one implementation of the DP-SGD pipeline over any torch optimizer.

For every backward pass ("flush")::

    sq_norms = grad_sampler.per_sample_sq_norms()
    factors  = clipper.clip_factors(sq_norms)
    summed  += grad_sampler.clipped_sums(factors)

and at ``step()``::

    [distributed: rank 0 adds the noise, then one all-reduce of the sums]
    noise.add_noise(summed, std=clipper.gradient_noise_multiplier(σ) · clipper.sensitivity())
    noise hooks(noised, step)
    p.grad = noised / expected_batch_size        (loss_reduction="mean")
    clipper.end_step(...); inner optimizer step; step hooks (the engine accounts here)

Flushing per backward pass keeps at most one physical batch of activations alive,
whatever the accumulation pattern: each sample is clipped in the pass it took
part in and only clipped sums are kept.

:class:`DPOptimizer` is a :class:`torch.optim.Optimizer` that *shares*
``param_groups``, ``state`` and ``defaults`` with the optimizer it wraps, so LR
schedulers, ``optimizer.param_groups[0]["lr"] = ...`` and the inner optimizer's
``state_dict()`` all keep working.
"""

from __future__ import annotations

import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import distributed as _dist
from .errors import GradSampleError, PrivacyEngineError
from .graphs import StepGraph
from .protocols import Clipper, GradSampler, LossReduction, NoiseMechanism

NoiseHook = Callable[[dict[str, Tensor], int], None]
StepHook = Callable[["DPOptimizer"], None]


#: modules, parameters and buffers registered anywhere in this process so far (counted by
#: torch's global registration hooks once a DP optimizer watches a model)
_registrations = 0
_watching = False


def _count_registration(*_: Any) -> None:
    global _registrations
    _registrations += 1


def _watch_registrations() -> None:
    global _watching
    if not _watching:
        from torch.nn.modules import module as torch_module

        torch_module.register_module_parameter_registration_hook(_count_registration)
        torch_module.register_module_buffer_registration_hook(_count_registration)
        torch_module.register_module_module_registration_hook(_count_registration)
        _watching = True


class _ModelTensors:
    """Every parameter and buffer of a model (each once), walked again only when the model
    may have changed: something was registered (``setattr`` of a parameter, buffer or
    module, ``register_*``, ``add_module``: how PEFT adds adapters), or a table of a module
    walked before changed past the module API (a direct write to ``module._parameters``,
    ``_buffers`` or ``_modules``, as accelerate does: an entry no longer holds what it held,
    or the tables hold more or fewer entries). ``requires_grad`` is read afresh by the
    callers.

    A step needs this list twice (coverage check, CUDA-graph key); walking a PEFT-wrapped
    GPT-2's ~650 modules at every step cost more host time than the rest of the step. The
    checks of the tables run in C (``map``), about a tenth of a walk.
    """

    def __init__(self, module: nn.Module) -> None:
        _watch_registrations()
        self.module = module
        #: changes whenever a new walk finds other tensors
        self.version = 0
        self._seen = -1
        self._tables: list[dict[str, Any]] = []  # every table of every module walked
        self._entries = 0  # how many entries they held
        # each entry as three aligned lists: its table, its name, what it held (None too)
        self._owners: list[dict[str, Any]] = []
        self._names: list[str] = []
        self._held: list[Any] = []
        self.params: list[nn.Parameter] = []
        self.buffers: list[Tensor] = []

    def _changed(self) -> bool:
        return (
            self._seen != _registrations
            or sum(map(len, self._tables)) != self._entries
            or any(map(operator.is_not, map(dict.get, self._owners, self._names), self._held))
        )

    def current(self) -> tuple[list[nn.Parameter], list[Tensor]]:
        if self._changed():
            self._walk()
        return self.params, self.buffers

    def _walk(self) -> None:
        self._seen = _registrations
        params: dict[int, nn.Parameter] = {}
        buffers: dict[int, Tensor] = {}
        tables: list[dict[str, Any]] = []
        owners: list[dict[str, Any]] = []
        names: list[str] = []
        held: list[Any] = []
        stack, seen = [self.module], set()
        while stack:
            m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            for table, found in (
                (m._parameters, params),
                (m._buffers, buffers),
                (m._modules, None),
            ):
                tables.append(table)
                for name, t in table.items():
                    owners.append(table)
                    names.append(name)
                    held.append(t)
                    if found is not None and t is not None:
                        found.setdefault(id(t), t)  # type: ignore[arg-type]
            stack.extend(c for c in reversed(m._modules.values()) if c is not None)
        self._tables, self._entries = tables, len(owners)
        self._owners, self._names, self._held = owners, names, held
        new_params, new_buffers = list(params.values()), list(buffers.values())
        # a registration that changed nothing here (another model built, a parameter
        # swapped in and back by torch.func.functional_call) keeps the version
        if not (_same(new_params, self.params) and _same(new_buffers, self.buffers)):
            self.params, self.buffers = new_params, new_buffers
            self.version += 1


def _same(a: Sequence[Tensor], b: Sequence[Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _dense_gradients(
    sums: Mapping[str, Tensor], params: Mapping[str, nn.Parameter]
) -> dict[str, Tensor]:
    """A float32 tensor shaped and laid out like each parameter: its clipped sum, or
    zeros. (The same strides as the parameter keep the optimizer's foreach kernels on
    their fast path: one mismatched gradient sends every parameter through a loop.)"""
    out = {}
    for name, p in params.items():
        if name not in sums:
            out[name] = torch.zeros_like(p, dtype=torch.float32)
            continue
        g = sums[name].to(torch.float32).reshape(p.shape)
        if g.stride() != p.stride():
            g = torch.empty_like(p, dtype=torch.float32).copy_(g)
        out[name] = g
    return out


class DPOptimizer(Optimizer):
    """Clips, noises and rescales gradients, then steps the wrapped optimizer.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over (a subset of) the module's parameters.
        grad_sampler: an attached :class:`~dpcore.protocols.GradSampler`.
        clipper: a :class:`~dpcore.protocols.Clipper`.
        noise: a :class:`~dpcore.protocols.NoiseMechanism`.
        noise_multiplier: σ, as the accountant sees it.
        expected_batch_size: expected number of samples per step over all ranks (q·N);
            the noised sum is divided by it when ``loss_reduction="mean"``.
        noise_generator: random source of the noise (``None``: torch's default one).
        clipper_generator: random source of private clipper statistics (adaptive clipping).
        module: the user's (unwrapped) module, only used to name parameters in errors.
        distributed: data-parallel over the default ``torch.distributed`` group (the
            engine sets it for a :class:`~dpcore.DPDDP` model): at each step rank 0 adds
            the noise and the sums are all-reduced, so every rank takes the same step.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        grad_sampler: GradSampler,
        clipper: Clipper,
        noise: NoiseMechanism,
        noise_multiplier: float,
        expected_batch_size: float,
        loss_reduction: LossReduction = "mean",
        noise_generator: torch.Generator | None = None,
        clipper_generator: torch.Generator | None = None,
        module: nn.Module | None = None,
        distributed: bool = False,
    ) -> None:
        if distributed:  # [distributed owner] explicit, never inferred from global state
            _dist.require_initialized("a distributed DPOptimizer")
        if isinstance(optimizer, DPOptimizer):
            raise PrivacyEngineError(
                "the optimizer is already a DPOptimizer; pass the original torch optimizer "
                "(make_private must be called once per optimizer)."
            )
        if loss_reduction not in ("mean", "sum"):
            raise PrivacyEngineError(
                f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}"
            )
        if expected_batch_size <= 0:
            raise PrivacyEngineError(
                f"expected_batch_size must be positive, got {expected_batch_size}"
            )
        self.original_optimizer = optimizer
        self.grad_sampler = grad_sampler
        self.clipper = clipper
        self.noise = noise
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.loss_reduction = loss_reduction
        self.noise_generator = noise_generator
        self.clipper_generator = clipper_generator
        self.distributed = bool(distributed)

        # Shared with the inner optimizer: schedulers and user code see one object.
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._patch_step_function()

        self._names_by_id: dict[int, str] = {}
        #: the private model, to find parameters created, replaced or unfrozen after attach
        self._module = module
        self._model_tensors = _ModelTensors(module) if module is not None else None
        if module is not None:
            self._names_by_id = {id(p): n for n, p in module.named_parameters()}
        self._names_by_id.update({id(p): n for n, p in grad_sampler.named_parameters().items()})

        self._summed: dict[str, Tensor] = {}
        #: whether the last forward pass had an empty batch (set by the engine's forward hook)
        self.empty_forward = False
        self._skip_next = False
        self._last_step_skipped = False
        self._needs_zero_grad = False
        self._zero_grad_witness: tuple[nn.Parameter, Tensor] | None = None
        #: logical batches drawn from the data loader since the last real step (set by the
        #: engine's data loader); 0 means "unknown", counted as one.
        self.logical_batches = 0
        #: logical batches the last real step aggregated (the engine accounts with it)
        self.last_step_batches = 1
        self.last_step_drawn = 0
        #: largest number of logical batches one step may aggregate (None: no limit)
        self.max_batches_per_step: int | None = None
        #: backward passes flushed since the last real step, and samples in them (this rank)
        self.backward_passes = 0
        self.samples_seen = 0
        #: real (non-skipped) steps taken so far
        self.steps = 0
        self._noise_hooks: list[NoiseHook] = []
        self._step_hooks: list[StepHook] = []
        #: replay the step's clipping and noise from a CUDA graph where the plugins allow
        #: it and the shapes repeat (see dpcore.graphs); False: always run eagerly
        self.cuda_graphs = True
        self._graph = StepGraph()

    # ------------------------------------------------------------------------------
    # Hooks
    # ------------------------------------------------------------------------------
    def attach_step_hook(self, fn: StepHook) -> None:
        """Call ``fn(optimizer)`` after every real (non-skipped) step, e.g. to account."""
        self._step_hooks.append(fn)

    def register_noise_hook(self, fn: NoiseHook) -> Callable[[], None]:
        """Call ``fn(noised_sums, step)`` after the noise is added, before scaling.

        ``noised_sums`` maps parameter names to the noised clipped sums (summed over
        ranks when distributed); ``step`` is the 0-based index of the real step.
        Returns a function that removes the hook.
        """
        self._noise_hooks.append(fn)
        return lambda: self._noise_hooks.remove(fn)

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Make the next ``step()`` only accumulate (virtual step), not update or account."""
        self._skip_next = do_skip

    @property
    def max_grad_norm(self) -> Any:
        return getattr(self.clipper, "max_grad_norm", None)

    @property
    def accumulated_iterations(self) -> int:
        """Backward passes accumulated since the last real step (Opacus' name)."""
        return self.backward_passes

    # ------------------------------------------------------------------------------
    # The pipeline
    # ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Clip the pending backward pass (if any) and add it to the running sum.

        Called at ``step()`` and, through a forward-pre-hook the engine installs, at the
        start of every forward pass of the model.
        """
        gs = self.grad_sampler
        if not gs.has_pending():
            return
        self._check_zero_grad_called()
        if self.empty_forward:
            # the pass had no samples: its clipped sum is zero, whatever the grad sampler
            gs.clear()
            self.backward_passes += 1
            return
        sq_norms = gs.per_sample_sq_norms()
        factors = self.clipper.clip_factors(sq_norms)
        sums = gs.clipped_sums(factors)
        # fp32 running sum (low-precision models lose nothing over many passes); a copy,
        # so a grad sampler may reuse its buffers. One foreach launch per group, not one
        # per parameter: on small models the step is bound by Python launch overhead.
        summed = self._summed
        old_names = [n for n in sums if n in summed]
        if old_names:
            torch._foreach_add_(
                [summed[n] for n in old_names],
                [sums[n].detach().to(torch.float32) for n in old_names],
            )
        new_names = [n for n in sums if n not in summed]
        fp32 = [n for n in new_names if sums[n].dtype == torch.float32]
        if fp32:  # x * 1 is an exact copy (signed zeros included), one launch for all
            copies = torch._foreach_mul([sums[n].detach() for n in fp32], 1.0)
            summed.update(zip(fp32, copies, strict=True))
        for name in new_names:
            if name not in summed:
                summed[name] = sums[name].detach().to(torch.float32, copy=True)
        self.backward_passes += 1
        self.samples_seen += next((int(v.shape[0]) for v in sq_norms.values()), 0)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._covered_trainable()
        walked = self._model_tensors.current() if self._model_tensors is not None else None
        batches = max(1, self.logical_batches)
        scale = 1.0 / (self.expected_batch_size * batches) if self.loss_reduction == "mean" else 1.0
        # noise hooks see the noised sum before the scale: then it cannot be replayed with it
        fold = 1.0 if self._noise_hooks else scale
        graphed = None if self._skip_next else self._graphed_private_gradient(params, walked, fold)
        if graphed is None:
            self.flush()
        self._check_coverage(params, walked)
        if self._skip_next:
            self._skip_next = False
            self._last_step_skipped = True
            return loss
        self._last_step_skipped = False

        if self.max_batches_per_step is not None and batches > self.max_batches_per_step:
            raise PrivacyEngineError(
                f"this step aggregates {batches} batches drawn from the data loader, but the "
                f"sampler/noise combination allows at most {self.max_batches_per_step} per step "
                "(correlated noise accounts each step as one participation). Take one optimizer "
                "step per batch, and use dpcore.BatchMemoryManager to split large batches."
            )
        grads = graphed if graphed is not None else self._private_gradient(params)
        for fn in self._noise_hooks:
            fn(grads, self.steps)
        self._zero_grad_witness = None
        if scale != 1.0 and grads and (graphed is None or fold == 1.0):
            torch._foreach_mul_([grads[name] for name in params], scale)
        for name, p in params.items():
            g = grads[name]
            if g.dtype != p.dtype:
                g = g.to(dtype=p.dtype)
            p.grad = g if g.shape == p.shape else g.view_as(p)
            if self._zero_grad_witness is None:
                self._zero_grad_witness = (p, p.grad)
        self.clipper.end_step(
            expected_batch_size=self.expected_batch_size * batches,
            generator=self.clipper_generator,
        )
        self.original_optimizer.step()

        self.last_step_batches = batches
        #: batches the data loader delivered for the last real step (0: none seen)
        self.last_step_drawn = self.logical_batches
        self._summed = {}
        self.logical_batches = 0
        self.backward_passes = 0
        self.samples_seen = 0
        self._needs_zero_grad = True
        for hook in self._step_hooks:
            hook(self)
        self.steps += 1
        return loss

    def _private_gradient(self, params: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
        """Noised clipped sums (fp32) of every covered trainable parameter, summed over ranks."""
        grads = _dense_gradients(self._summed, params)
        std = self._noise_std()
        if self.distributed:
            self._distributed_noise_and_reduce(grads, std)
        else:
            self.noise.add_noise(grads, std=std, generator=self.noise_generator)
        return grads

    def _graphed_private_gradient(
        self,
        params: Mapping[str, nn.Parameter],
        walked: tuple[list[nn.Parameter], list[Tensor]] | None,
        scale: float,
    ) -> dict[str, Tensor] | None:
        """Flush, noise and ``scale`` of a step with one backward pass, replayed from a CUDA
        graph (:mod:`dpcore.graphs`); None: the step runs eagerly."""
        gs, gen = self.grad_sampler, self.noise_generator
        if (
            not self.cuda_graphs
            or self._graph.disabled is not None
            or self.distributed
            or self._summed
            or self.backward_passes
            or self.empty_forward
            or not all(getattr(x, "graph_safe", False) for x in (gs, self.clipper, self.noise))
            or gen is None  # the default generator must never enter a capture
            or gen.device.type != "cuda"
            or not torch.cuda.is_available()
            or torch.cuda.is_current_stream_capturing()
            or not gs.has_pending()
        ):
            return None
        prepared = gs.graph_inputs()  # type: ignore[attr-defined]
        if prepared is None:
            return None
        inputs, batch, restore = prepared
        if not inputs or not all(t.is_cuda for t in (*inputs, *params.values())):
            return None
        self._check_zero_grad_called()
        std = self._noise_std()
        persistent = [*walked[0], *walked[1]] if walked is not None else [*params.values()]
        structure = self._model_tensors.version if self._model_tensors is not None else 0
        extra = (
            std,
            scale,
            tuple(params),
            repr(self.clipper.state_dict()),
            repr(self.noise.state_dict()),
            batch,
        )

        def compute(generators: Sequence[torch.Generator]) -> dict[str, Tensor]:
            sums = gs.clipped_sums(self.clipper.clip_factors(gs.per_sample_sq_norms()))
            grads = _dense_gradients(sums, params)
            self.noise.add_noise(grads, std=std, generator=generators[0])
            if scale != 1.0:  # the same kernel the eager step runs after the noise
                torch._foreach_mul_(list(grads.values()), scale)
            return grads

        generators = [gen]
        shapes = {name: (p.shape, p.device) for name, p in params.items()}
        out = self._graph.run(inputs, persistent, structure, extra, compute, generators, shapes)
        if out is None:
            restore()
            return None
        gs.clear()
        self.backward_passes += 1
        self.samples_seen += batch
        return dict(out)

    def _noise_std(self) -> float:
        std = (
            self.clipper.gradient_noise_multiplier(self.noise_multiplier)
            * self.clipper.sensitivity()
        )
        if not math.isfinite(std) or std < 0:
            raise PrivacyEngineError(f"the noise standard deviation is {std}; check the clipper")
        return std

    def _distributed_noise_and_reduce(self, grads: dict[str, Tensor], std: float) -> None:
        """Distributed step: noise once (rank 0), then one all-reduce of the sums.

        Every rank calls this at every real step (with zeros if its local batch was
        empty), so the collectives always match.
        """
        if _dist.rank() == 0:
            self.noise.add_noise(grads, std=std, generator=self.noise_generator)
        _dist.all_reduce_sum_(grads)
        reduce_stats = getattr(self.clipper, "all_reduce_statistics", None)
        if reduce_stats is not None:
            reduce_stats(lambda t: _dist.all_reduce_sum_([t]))

    # ------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------
    def _covered_trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.grad_sampler.named_parameters().items() if p.requires_grad}

    def _param_label(self, p: Tensor, group: int, index: int) -> str:
        name = self._names_by_id.get(id(p))
        where = f"param_groups[{group}]['params'][{index}]"
        return f"{name!r} ({where})" if name else f"{where} of shape {tuple(p.shape)}"

    def _check_coverage(
        self,
        covered: Mapping[str, nn.Parameter],
        walked: tuple[list[nn.Parameter], list[Tensor]] | None,
    ) -> None:
        covered_ids = {id(p) for p in self.grad_sampler.named_parameters().values()}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.requires_grad and id(p) not in covered_ids:
                    raise PrivacyEngineError(
                        f"the optimizer updates parameter {self._param_label(p, gi, pi)}, which has "
                        "no per-sample gradients: it was made trainable, replaced or added after "
                        "make_private (e.g. a lazily created adapter), or it does not belong to the "
                        "private model. dpcore never applies a raw gradient; create or unfreeze every "
                        "parameter before make_private, or freeze it (requires_grad=False)."
                    )
        if self._module is not None and walked is not None:
            # A parameter of the model that the grad sampler does not cover (a PEFT adapter
            # materialised or replaced after make_private, a layer unfrozen later) would be
            # silently never updated (the optimizer does not hold it) or updated with a raw
            # gradient: refuse, naming it.
            uncovered = [p for p in walked[0] if p.requires_grad and id(p) not in covered_ids]
            if uncovered:  # the slow walk only to name it
                name = next(n for n, p in self._module.named_parameters() if p is uncovered[0])
                raise PrivacyEngineError(
                    f"the model's trainable parameter {name!r} has no per-sample gradients: "
                    "it was created, replaced or made trainable after make_private (e.g. a "
                    "lazily created or re-initialised adapter), so the private optimizer "
                    "would never update it correctly. Create, replace and unfreeze every "
                    "parameter before make_private (then build the optimizer and call "
                    "make_private again), or freeze it (requires_grad=False)."
                )
        # A parameter autograd gave a gradient to, while the grad sampler saw no per-sample
        # gradient for it, is read outside its module's forward (tied weights, functional
        # calls): training it on the clipped sum alone would silently drop that use.
        witness = self._zero_grad_witness[1] if self._zero_grad_witness else None
        missing = []
        # Checked at the first real step only (such a model shows the problem from its
        # first step), with one device sync for all parameters.
        if self.backward_passes > 0 and self.steps == 0 and not self._skip_next:
            suspects = [
                (n, p.grad)
                for n, p in covered.items()
                if p.grad is not None and p.grad is not witness
            ]
            if suspects:
                flags: list[Tensor] = []
                device = suspects[0][1].device
                for n, grad in suspects:
                    s = self._summed.get(n)
                    used = grad.ne(0).any().to(device)
                    clipped = s.ne(0).any().to(device) if s is not None else torch.zeros_like(used)
                    flags.append(torch.stack((used, clipped)))
                values = torch.stack(flags).tolist()
                missing = [
                    n
                    for (n, _), (used, clipped) in zip(suspects, values, strict=True)
                    if used and not clipped
                ]
        if missing:
            raise GradSampleError(
                f"parameter(s) {', '.join(repr(m) for m in missing[:5])} received a gradient from "
                "autograd but no per-sample gradient: they are used outside the forward pass of "
                "the module that owns them (e.g. tied weights read by another module, or a "
                "functional call on module.weight). Restructure the model so every parameter is "
                "used through its own module, or use grad_sample_mode='functorch'."
            )

    def _check_zero_grad_called(self) -> None:
        if not self._needs_zero_grad or self._zero_grad_witness is None:
            return
        p, written = self._zero_grad_witness
        if p.grad is written and bool(written.ne(0).any()):
            raise PrivacyEngineError(
                "a backward pass followed optimizer.step() without optimizer.zero_grad(). "
                "Call optimizer.zero_grad() once per step (before the forward pass or after the "
                "step); dpcore refuses to guess whether the previous step's gradient should be "
                "kept, because a private gradient is never accumulated across steps."
            )
        self._needs_zero_grad = False

    # ------------------------------------------------------------------------------
    # torch.optim.Optimizer interface
    # ------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and the pending batch; the running clipped sum survives a
        skipped (virtual) step, so accumulation over virtual steps works."""
        if not self._last_step_skipped:
            self._summed = {}
        self.grad_sampler.clear()
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.grad_sampler.named_parameters().values():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self._needs_zero_grad = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.original_optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.original_optimizer.load_state_dict(state_dict)
        # [checkpoint owner] torch's load_state_dict replaces the inner optimizer's
        # param_groups and state with new objects; share them again, or LR schedulers
        # (which hold this optimizer) would change a stale copy after a resume.
        self.param_groups = self.original_optimizer.param_groups
        self.state = self.original_optimizer.state

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r})"
