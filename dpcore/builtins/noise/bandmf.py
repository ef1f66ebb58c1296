"""``bandmf``: banded matrix-factorisation noise, correlated across steps.

Each step emits ``x_t = (z_t - sum_{j=1}^{b-1} c_j x_{t-j}) / c_0`` per parameter,
with ``z_t = std * N(0, 1)`` drawn exactly like ``gaussian`` (one
:func:`dpcore.rng.standard_normal` call per parameter, in dict order), so one band
is bit-identical to ``gaussian``. The last ``b - 1`` noise tensors are kept in
float32 whatever the training dtype. The math lives in :mod:`dpcore.correlated`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from dpcore.correlated import DEFAULT_HORIZON, banded_step, resolve_coefficients
from dpcore.errors import CheckpointError, PrivacyEngineError
from dpcore.rng import standard_normal

DETAILS = (
    "Memory: keeps the last (bands - 1) noise tensors of every trainable parameter in "
    "float32, i.e. (bands - 1) x 4 bytes x number of parameters (on the parameters' device, "
    "rank 0 only under DDP). Needs a sampler whose min_separation is at least `bands` "
    "(cyclic_poisson with cycle_length >= bands); the engine refuses others. Accounted as "
    "DP-SGD with ceil(steps / cycle_length) steps at the per-group rate."
)


class BandMFOptions(BaseModel):
    """Options of the ``bandmf`` noise mechanism."""

    model_config = ConfigDict(extra="forbid")

    bands: int | None = Field(
        default=None,
        ge=1,
        description="number of bands b (1 = DP-SGD); `dpcore noise --choose-bands` suggests one",
    )
    coefs: Literal["sqrt", "optimized"] | list[float] = Field(
        default="sqrt",
        description="strategy: banded square root, L-BFGS optimised, or explicit c_0..c_{b-1} "
        "(always rescaled to column norm 1)",
    )
    horizon: int = Field(
        default=DEFAULT_HORIZON,
        ge=1,
        description="number of steps the 'optimized' coefficients are tuned for",
    )
    secure: bool = Field(default=False, description="draw z_t from the OS's cryptographic source")

    @model_validator(mode="after")
    def _coefficients_resolve(self) -> BandMFOptions:
        if not (self.coefs == "optimized"):  # optimizing is deferred to the plugin
            resolve_coefficients(self.bands, self.coefs, horizon=self.horizon)
        elif self.bands is None:
            raise ValueError("coefs='optimized' needs `bands`")
        return self


class BandMFNoise:
    """Banded matrix-factorisation (BandMF) noise: ``x = C^{-1} z`` streamed step by step."""

    def __init__(
        self,
        bands: int | None = None,
        coefs: Literal["sqrt", "optimized"] | list[float] = "sqrt",
        horizon: int = DEFAULT_HORIZON,
        secure: bool = False,
    ) -> None:
        c = resolve_coefficients(bands, coefs, horizon=horizon)
        self.coefs: list[float] = [float(v) for v in c]
        self.bands = len(self.coefs)
        self.secure = secure
        #: steps that must separate two participations of one example
        self.min_separation = self.bands
        self.step = 0
        # per parameter: x_{t-1}, x_{t-2}, ... (newest first, at most bands - 1), float32
        self._history: dict[str, list[Tensor]] = {}

    def add_noise(
        self, grads: dict[str, Tensor], *, std: float, generator: torch.Generator | None
    ) -> None:
        if self.step > 0 and set(grads) != set(self._history):
            raise PrivacyEngineError(
                "bandmf: the parameters receiving noise changed mid-run (had "
                f"{sorted(self._history)}, now {sorted(grads)}); correlated noise needs the "
                "same parameters every step"
            )
        keep = self.bands - 1
        for name, grad in grads.items():
            z = standard_normal(
                grad.shape, generator=generator, device=grad.device, secure=self.secure
            )
            if keep == 0:  # one band: exactly gaussian's arithmetic, whatever the dtype
                grad.add_(z.to(dtype=grad.dtype), alpha=std)
                self._history[name] = []
                continue
            past = self._history.get(name, [])
            if past and past[0].device != grad.device:
                past = [p.to(grad.device) for p in past]
            x = banded_step(z * std, past, self.coefs)  # float32 whatever the training dtype
            self._history[name] = [x, *past][:keep]
            grad.add_(x.to(grad.dtype))
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "coefs": list(self.coefs),
            "history": {name: list(past) for name, past in self._history.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        coefs = [float(v) for v in state["coefs"]]
        # "optimized" coefficients may differ in the last bits on another machine: those
        # are the same strategy, and the checkpoint's values keep the resume bit-exact.
        if len(coefs) != len(self.coefs) or any(
            abs(a - b) > 1e-6 for a, b in zip(coefs, self.coefs, strict=True)
        ):
            raise CheckpointError(
                f"bandmf: the checkpoint was written with coefficients {coefs} but this run "
                f"uses {self.coefs}; resume with the same `bands` and `coefs` (changing them "
                "mid-run breaks the correlated noise)"
            )
        self.coefs = coefs
        self.step = int(state["step"])
        self._history = {
            name: [t.detach().to(torch.float32).clone() for t in past]
            for name, past in state["history"].items()
        }
