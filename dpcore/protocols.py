"""The protocols of the DP-SGD pipeline.

One optimizer step, whatever plugins are chosen::

    Sampler ─▶ forward/backward ─▶ GradSampler.per_sample_sq_norms()      (per parameter)
                                   Clipper.clip_factors(sq_norms)         (c_i per parameter)
                                   GradSampler.clipped_sums(factors)      (Σ_i c_i g_i)
                                   NoiseMechanism.add_noise(sums, std)    std = σ_grad · sensitivity
                                   ÷ expected batch size, inner optimizer step
                                   Accountant.step(σ, q)                  (per the Sampler's separation)

Every plugin is created by the registry from its factory as
``factory(**runtime_arguments, **validated_options)``; the runtime arguments of
each kind are documented on its protocol below. Stateful components expose
``state_dict()`` / ``load_state_dict()`` holding plain data only (numbers,
strings, lists, dicts, tensors) so checkpoints load with
``torch.load(weights_only=True)``.

Optional, on a grad sampler, clipper and noise mechanism alike: ``graph_safe = True``
declares that the step's arithmetic is a fixed sequence of kernels for fixed shapes (no host
synchronisation, no tensors kept between steps); when all three declare it and the grad
sampler has ``graph_inputs()``, the DP optimizer may replay that arithmetic from a CUDA graph
(:mod:`dpcore.graphs`, which also verifies the claim when it captures).

Parameters are always identified by their qualified name in the *unwrapped*
module (``"encoder.layer.0.weight"``), never by object identity, so factors and
thresholds survive checkpoints and re-wrapping.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

LossReduction = Literal["mean", "sum"]

#: Plugin kinds, in pipeline order; the registry and CLI use these strings.
KINDS: tuple[str, ...] = (
    "grad_sampler",
    "layer_grad_sampler",
    "clipper",
    "noise",
    "sampler",
    "accountant",
    "module_fixer",
)


@runtime_checkable
class Stateful(Protocol):
    """Anything whose state goes into a checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        """Plain data only: numbers, strings, lists, dicts and tensors."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


# ----------------------------------------------------------------------------------------
# Per-sample gradients
# ----------------------------------------------------------------------------------------
@runtime_checkable
class LayerGradSampler(Protocol):
    """Per-sample gradients of the parameters of one ``nn.Module`` type.

    Registered per module type (``register(nn.Linear, sampler)``); the instance is
    shared by every layer of that type, so it must hold no per-layer state.

    Conventions for all methods:

    * ``inputs`` are the positional tensor arguments the layer received in
      forward, and ``grad_output`` is the gradient of the loss w.r.t. the layer's
      output. Both have the batch dimension first (grad samplers transpose for
      ``batch_first=False``) and ``grad_output`` is already rescaled so that row
      ``i`` is the gradient of sample ``i``'s own loss.
    * Results are keyed by the parameter's local name (``"weight"``, ``"bias"``)
      and cover exactly the parameters with ``requires_grad``.
    """

    def per_sample_grads(
        self, layer: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        """``{name: Tensor[B, *param.shape]}``: each sample's gradient."""
        ...

    def per_sample_sq_norms(
        self, layer: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        """``{name: Tensor[B]}`` (float32): squared norm of each sample's gradient.

        Fast samplers compute this without materialising per-sample gradients
        (ghost norm) where that is cheaper; the default materialises.
        """
        ...

    def clipped_sums(
        self,
        layer: nn.Module,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        factors: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        """``{name: Σ_i factors[name][i] · g_i}`` with the parameter's shape.

        Book-keeping samplers compute this directly (``aᵀ diag(c) g``); the default
        materialises per-sample gradients and reduces them.
        """
        ...


@runtime_checkable
class GradSampler(Protocol):
    """Answers the two questions of the pipeline for a whole module.

    Factory: ``factory(**options)``; then :meth:`attach`. After each backward pass
    the sampler holds one *pending* batch; the DP optimizer asks for its norms,
    computes clip factors and asks for the clipped sums, which also clears it.
    Accumulation over several backward passes is done by the optimizer, pass by
    pass, so a sampler never has to keep more than one batch.
    """

    def attach(
        self,
        module: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction: LossReduction = "mean",
    ) -> None:
        """Instrument ``module`` (hooks, wrappers) for per-sample computation."""
        ...

    def detach(self) -> None:
        """Remove every hook and patch; the module is as before :meth:`attach`."""
        ...

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters this sampler covers, by qualified name."""
        ...

    def has_pending(self) -> bool:
        """Whether a backward pass has completed whose batch awaits clipping."""
        ...

    def per_sample_sq_norms(self) -> dict[str, Tensor]:
        """``{param_name: Tensor[B]}`` (float32) for the pending batch."""
        ...

    def clipped_sums(self, factors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{param_name: Σ_i c_i g_i}`` for the pending batch; clears it."""
        ...

    def clear(self) -> None:
        """Drop any pending batch and stored activations (e.g. on ``zero_grad``)."""
        ...


# ----------------------------------------------------------------------------------------
# Clipping, noise, sampling, accounting
# ----------------------------------------------------------------------------------------
@runtime_checkable
class Clipper(Protocol):
    """Turns per-sample norms into clip factors and states the sensitivity.

    Factory: ``factory(*, max_grad_norm: float | Sequence[float], parameter_names:
    Sequence[str], **options)``.
    """

    def clip_factors(self, sq_norms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{param_name: Tensor[B]}``; after scaling, each sample's contribution has
        L2 norm at most :meth:`sensitivity`."""
        ...

    def sensitivity(self) -> float:
        """L2 bound of one sample's total clipped contribution (noise std = σ · this)."""
        ...

    def gradient_noise_multiplier(self, noise_multiplier: float) -> float:
        """Noise multiplier to apply to the gradient so that the *whole* step (including
        any private statistics the clipper releases itself) is a Gaussian mechanism
        with ``noise_multiplier``. Non-adaptive clippers return it unchanged."""
        ...

    def end_step(self, *, expected_batch_size: float, generator: torch.Generator | None) -> None:
        """Called once per optimizer step after noise (adaptive clippers update here)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class NoiseMechanism(Protocol):
    """Adds noise to the clipped sum. Factory: ``factory(**options)``.

    ``min_separation`` is the number of steps that must separate two participations
    of one example for the step-wise accounting to hold: 1 for independent noise,
    the number of bands for banded matrix-factorisation noise. The engine refuses a
    sampler whose ``min_separation`` is smaller.
    """

    min_separation: int

    def add_noise(
        self, grads: dict[str, Tensor], *, std: float, generator: torch.Generator | None
    ) -> None:
        """Add noise of per-coordinate standard deviation ``std`` in place.

        Randomness comes from ``generator`` (seeded by the engine) unless the
        mechanism uses a cryptographic source."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class Sampler(Protocol):
    """Batches of dataset indices, and what the accountant needs to know of them.

    Factory: ``factory(*, num_samples: int, sample_rate: float, generator:
    torch.Generator, rank: int = 0, world_size: int = 1, **options)``; the sample
    rate is the *global* one (over all ranks).

    ``min_separation``: the fewest steps between two steps in which one example can
    participate (1 for Poisson; the cycle length for cyclic Poisson). The engine
    accounts one Poisson-subsampled Gaussian event at ``sample_rate`` every
    ``min_separation`` steps, which is exact for independent noise and for banded
    noise with no more bands than the separation.
    ``dp_exact`` is False for samplers whose accounting is only an approximation.

    Optional: ``require_separation(n)``. If a sampler has it, the engine calls it with
    the noise mechanism's ``min_separation`` before checking compatibility, so the
    sampler can adopt it as a default (``cyclic_poisson``'s cycle length defaults to
    the number of bands); the check still refuses a separation below ``n``.

    Optional: ``world_size_independent = True`` declares that the global batches do
    not depend on the number of ranks, so a checkpoint may resume on another world
    size (the engine refuses that otherwise).
    """

    sample_rate: float
    min_separation: int
    dp_exact: bool

    def __iter__(self) -> Iterator[list[int]]:
        """One epoch of batches (lists of indices; possibly empty)."""
        ...

    def __len__(self) -> int:
        """Steps per epoch."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Random state, epoch and position within the epoch."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class Accountant(Protocol):
    """Composes privacy events and states the privacy spent.

    Factory: ``factory(**options)``. The history is a list of
    ``(noise_multiplier, sample_rate, steps)`` segments.
    """

    history: list[tuple[float, float, int]]

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None: ...

    def get_epsilon(self, delta: float) -> float: ...

    def __len__(self) -> int:
        """Number of steps accounted so far."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class ModuleFixer(Protocol):
    """Detects and repairs one kind of module that cannot be trained privately as is
    (e.g. BatchNorm mixes samples). Registered as an instance."""

    def problem(self, module: nn.Module) -> str | None:
        """Why ``module`` (this module alone, not its children) is a problem, or None."""
        ...

    def fix(self, module: nn.Module) -> nn.Module:
        """A replacement for ``module`` without the problem (weights carried over)."""
        ...
