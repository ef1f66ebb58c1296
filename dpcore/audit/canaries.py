"""White-box Dirac canaries inserted into the DP-SGD pipeline through its protocols.

A canary is a fake training example whose per-sample gradient is zero except at
one coordinate of the flattened trainable parameters, where it is ``magnitude``
(well above the clipping bound). ``m`` canaries sit on distinct random
coordinates; each is *in* the training set with probability 1/2. The in-canaries
extend the data set's index space: the sampler plugin draws over ``N + m_in``
indices with the configured rule, and indices ``>= N`` are canaries, which are
dropped from the data batch and handed to :class:`CanaryGradSampler`.

:class:`CanaryGradSampler` wraps whatever grad sampler the pipeline uses and
appends the canaries of the current step to its pending batch, *before* the
clipper: their squared norms are added as extra rows, the clipper's factors for
those rows scale their contributions, and the clipped contributions are added to
the clipped sums. The noise mechanism then noises the sum as usual, and a noise
hook of the DP optimizer (:meth:`dpcore.optimizer.DPOptimizer.register_noise_hook`)
reads what the noised sum put on each canary's coordinate: summed over steps,
that is the canary's score. Nothing in the grad sampler, clipper, noise or
sampler plugins knows about canaries, so any plugin (third-party included) is
audited exactly as it runs.

Correlated noise: if the noise mechanism exposes its band coefficients as
``coefs`` (``c_0 .. c_{b-1}``, as ``bandmf`` does), the noised stream is multiplied
back by the banded matrix ``C`` before scoring, so every score gets independent
noise again.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import PrivacyEngineError
from ..rng import derive_seed

#: a canary's gradient is this many times the clipper's sensitivity
DEFAULT_MAGNITUDE_FACTOR = 10.0


@dataclass
class Canaries:
    """Where the canaries are, which are in, and what they scored."""

    #: (parameter name, flat index) of each canary
    coordinates: list[tuple[str, int]]
    #: inclusion bit of each canary (each drawn with probability 1/2)
    included: np.ndarray
    seed: int
    magnitude: float = 0.0
    scores: np.ndarray = field(init=False)
    #: per step: mean contribution of one included canary at its coordinate (nan: none drawn)
    contributions: list[float] = field(default_factory=list)
    #: per step: noise std the pipeline used (clipper's multiplier x sensitivity)
    noise_stds: list[float] = field(default_factory=list)
    #: largest L2 norm of one canary's clipped contribution, and the sensitivity then
    max_contribution: float = 0.0
    sensitivity_at_max: float = 0.0
    #: times each canary was drawn
    draws: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.scores = np.zeros(len(self.coordinates), dtype=np.float64)
        self.draws = np.zeros(len(self.coordinates), dtype=np.int64)

    @property
    def count(self) -> int:
        return len(self.coordinates)

    @property
    def in_ids(self) -> np.ndarray:
        """Ids of the in-canaries, in the order of their data set indices ``N, N+1, ...``."""
        return np.flatnonzero(self.included)

    @classmethod
    def place(cls, parameters: Mapping[str, nn.Parameter], count: int, seed: int) -> Canaries:
        """``count`` canaries on distinct random coordinates of ``parameters`` (in order)."""
        names = list(parameters)
        sizes = np.array([parameters[n].numel() for n in names], dtype=np.int64)
        total = int(sizes.sum())
        if count < 2:
            raise PrivacyEngineError(f"an audit needs at least 2 canaries, got {count}")
        if count > total:
            raise PrivacyEngineError(
                f"{count} canaries need {count} distinct parameter coordinates, but the model "
                f"has only {total} trainable ones; use at most {total} canaries."
            )
        rng = np.random.default_rng(derive_seed(seed, "audit-canaries"))
        flat = np.sort(rng.choice(total, size=count, replace=False))
        rng.shuffle(flat)  # canary ids carry no information about the coordinate
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        owner = np.searchsorted(starts, flat, side="right") - 1
        coords = [(names[o], int(f - starts[o])) for o, f in zip(owner, flat, strict=True)]
        included = rng.random(count) < 0.5
        return cls(coords, included, seed)


class CanarySampler:
    """A sampler plugin over ``N + m_in`` indices that hands data indices to the loader
    and canary draws to the audit.

    Implements the :class:`~dpcore.protocols.Sampler` protocol (delegating rate,
    separation and state to the wrapped plugin), so it can replace the plugin inside a
    :class:`~dpcore.data.DPDataLoader`. Canary draws are queued in the order batches
    are drawn; :meth:`pop_canaries` returns those of the next delivered batch.
    """

    def __init__(self, inner: Any, num_data: int, in_ids: np.ndarray) -> None:
        self.inner = inner
        self.num_data = int(num_data)
        self._in_ids = np.asarray(in_ids, dtype=np.int64)
        self._drawn: deque[list[int]] = deque()

    @property
    def sample_rate(self) -> float:
        return float(self.inner.sample_rate)

    @property
    def min_separation(self) -> int:
        return int(getattr(self.inner, "min_separation", 1))

    @property
    def dp_exact(self) -> bool:
        return bool(getattr(self.inner, "dp_exact", True))

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[list[int]]:
        n = self.num_data
        for batch in self.inner:
            data = [i for i in batch if i < n]
            self._drawn.append([int(self._in_ids[i - n]) for i in batch if i >= n])
            yield data

    def pop_canaries(self) -> list[int]:
        """Canary ids drawn with the oldest batch not yet delivered."""
        return self._drawn.popleft() if self._drawn else []

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._drawn.clear()
        self.inner.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:  # plugin-specific extras (e.g. require_separation)
        return getattr(self.__dict__["inner"], name)


class CanaryGradSampler:
    """Wraps a grad sampler and appends the queued canaries to its pending batch.

    Implements the :class:`~dpcore.protocols.GradSampler` protocol. Canaries queued
    with :meth:`queue` join the next flushed backward pass (or are flushed alone if
    the data batch had no backward pass); :meth:`clear` (``zero_grad``) keeps them,
    since they belong to the drawn batch, not to a backward pass.
    """

    def __init__(self, inner: Any, canaries: Canaries, clipper: Any) -> None:
        self.inner = inner
        self.canaries = canaries
        self.clipper = clipper
        self._queued: list[int] = []
        self._batch: list[int] = []
        self._real_rows = 0
        self._inner_pending = False
        self._step_contributions: list[float] = []
        params = inner.named_parameters()
        self._names = list(params)
        missing = {name for name, _ in canaries.coordinates} - set(params)
        if missing:
            raise PrivacyEngineError(
                f"canaries placed on parameters the grad sampler does not cover: {sorted(missing)}"
            )
        position = {name: i for i, name in enumerate(self._names)}
        self._param_of = torch.tensor([position[name] for name, _ in canaries.coordinates])
        self._flat = torch.tensor([idx for _, idx in canaries.coordinates], dtype=torch.long)

    # -- the audit's side ------------------------------------------------------------
    def queue(self, canary_ids: Sequence[int]) -> None:
        self._queued.extend(int(i) for i in canary_ids)

    def take_step_contributions(self) -> list[float]:
        values, self._step_contributions = self._step_contributions, []
        return values

    # -- GradSampler protocol ----------------------------------------------------------
    def attach(self, module: nn.Module, **kwargs: Any) -> None:
        self.inner.attach(module, **kwargs)

    def detach(self) -> None:
        self.inner.detach()

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return self.inner.named_parameters()

    def has_pending(self) -> bool:
        return bool(self.inner.has_pending()) or bool(self._queued)

    def per_sample_sq_norms(self) -> dict[str, Tensor]:
        params = self.inner.named_parameters()
        self._inner_pending = bool(self.inner.has_pending())
        if self._inner_pending:
            sq = dict(self.inner.per_sample_sq_norms())
        else:  # canaries drawn with an empty data batch: a pass of canaries only
            sq = {
                n: torch.zeros(0, dtype=torch.float32, device=p.device) for n, p in params.items()
            }
        self._real_rows = next((int(v.shape[0]) for v in sq.values()), 0)
        self._batch, self._queued = self._queued, []
        if not self._batch:
            return sq
        owner = self._param_of[torch.tensor(self._batch)]
        mag2 = self.canaries.magnitude**2
        out: dict[str, Tensor] = {}
        for i, (name, p) in enumerate(params.items()):
            rows = (owner == i).to(device=p.device, dtype=torch.float32) * mag2
            base = sq.get(name)
            if base is None:
                base = torch.zeros(self._real_rows, dtype=torch.float32, device=p.device)
            out[name] = torch.cat([base.to(torch.float32), rows])
        return out

    def clipped_sums(self, factors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        batch, self._batch = self._batch, []
        n = self._real_rows
        params = self.inner.named_parameters()
        if self._inner_pending:
            self._inner_pending = False
            sums = dict(self.inner.clipped_sums({k: f[:n] for k, f in factors.items()}))
        else:
            sums = {}
        if not batch:
            return sums
        c = self.canaries
        ids = torch.tensor(batch)
        owner = self._param_of[ids]
        for i, (name, p) in enumerate(params.items()):
            rows = torch.nonzero(owner == i).flatten()
            if rows.numel() == 0:
                continue
            values = factors[name][n + rows].detach().to(torch.float32) * c.magnitude
            target = sums.get(name)
            target = (
                torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                if target is None
                else target.detach().clone()
            )
            target.view(-1).index_add_(
                0, self._flat[ids[rows]].to(p.device), values.to(target.dtype)
            )
            sums[name] = target
            magnitudes = values.abs().cpu()
            self._step_contributions.extend(magnitudes.tolist())
            largest = float(magnitudes.max())
            if largest > c.max_contribution:
                c.max_contribution = largest
                c.sensitivity_at_max = float(self.clipper.sensitivity())
        np.add.at(c.draws, np.asarray(batch), 1)
        return sums

    def clear(self) -> None:
        self._batch = []
        self._inner_pending = False
        self.inner.clear()

    def __getattr__(self, name: str) -> Any:  # grad-sampler-specific extras
        return getattr(self.__dict__["inner"], name)


class CanaryScorer:
    """Noise hook: adds what the noised sum put on each canary's coordinate to its score.

    With correlated noise exposing ``coefs`` the stream is first multiplied back by the
    banded matrix ``C`` (``y'_t = sum_j c_j y_{t-j}``), which leaves independent noise.
    """

    def __init__(self, canaries: Canaries, gs: CanaryGradSampler, optimizer: Any) -> None:
        self.canaries = canaries
        self.gs = gs
        self.optimizer = optimizer
        coefs = getattr(optimizer.noise, "coefs", None)
        self.coefs: list[float] = [float(x) for x in coefs] if coefs is not None else [1.0]
        self._history: deque[np.ndarray] = deque(maxlen=max(len(self.coefs) - 1, 0) or None)
        by_param: dict[str, tuple[list[int], list[int]]] = {}
        for cid, (name, flat) in enumerate(canaries.coordinates):
            ids, idx = by_param.setdefault(name, ([], []))
            ids.append(cid)
            idx.append(flat)
        self._by_param = {
            n: (np.array(ids), torch.tensor(idx)) for n, (ids, idx) in by_param.items()
        }

    def __call__(self, noised: dict[str, Tensor], step: int) -> None:
        c = self.canaries
        raw = np.zeros(c.count, dtype=np.float64)
        for name, (ids, idx) in self._by_param.items():
            values = noised[name].detach().reshape(-1)[idx.to(noised[name].device)]
            raw[ids] = values.double().cpu().numpy()
        if len(self.coefs) > 1:
            decorrelated = self.coefs[0] * raw
            for cj, past in zip(self.coefs[1:], self._history, strict=False):
                decorrelated = decorrelated + cj * past
            self._history.appendleft(raw)
            raw = decorrelated
        c.scores += raw
        opt = self.optimizer
        std = float(opt.clipper.gradient_noise_multiplier(opt.noise_multiplier)) * float(
            opt.clipper.sensitivity()
        )
        c.noise_stds.append(std)
        drawn = self.gs.take_step_contributions()
        c.contributions.append(float(np.mean(drawn)) if drawn else math.nan)


def effective_contributions(canaries: Canaries, coefs: Sequence[float]) -> np.ndarray:
    """Per step, what one inclusion adds to the canary's *score*: its contribution, times
    the sum of the band coefficients that reach it before the run ends (1 without
    correlated noise). Steps where no canary was drawn get the run's mean."""
    a = np.asarray(canaries.contributions, dtype=np.float64)
    if a.size == 0:
        return a
    fill = float(np.nanmean(a)) if np.isfinite(a).any() else 0.0
    a = np.where(np.isfinite(a), a, fill)
    c = np.asarray(coefs, dtype=np.float64)
    steps = a.size
    reach = np.array([c[: min(c.size, steps - t)].sum() for t in range(steps)])
    return a * reach


class CanaryAudit:
    """Canaries in a private training run, and the audit report at its end.

    ::

        model, optimizer, loader = engine.make_private(...)
        audit = CanaryAudit(engine, canaries=1000).attach()
        ...  # train as usual: the canaries ride along with the data
        report = audit.report()          # AuditReport (claimed epsilon from the engine)

    ``attach`` wraps the optimizer's grad sampler in a :class:`CanaryGradSampler`,
    replaces the data loader's sampler by a :class:`CanarySampler` over the data
    plus the in-canaries (same plugin, options and rate, created through the
    registry), and registers a :class:`CanaryScorer` noise hook. The model sees only
    real data; the canaries cost accuracy only through their clipped gradients (one
    coordinate each, at most the clipping bound per draw).
    """

    def __init__(
        self,
        engine: Any,
        canaries: int = 1000,
        seed: int | None = None,
        *,
        alpha: float = 0.05,
        selection: str = "grid",
        magnitude_factor: float = DEFAULT_MAGNITUDE_FACTOR,
        synthetic: bool = False,
    ) -> None:
        self.engine = engine
        #: True when the data's gradients are zero (``dpcore audit``): mu_hat must then match
        #: mu_expected from both sides; with real data it may only fall short of it
        self.synthetic = bool(synthetic)
        self.count = int(canaries)
        self.seed = seed
        self.alpha = float(alpha)
        self.selection = selection
        self.magnitude_factor = float(magnitude_factor)
        self.canaries: Canaries | None = None
        self.sampler: CanarySampler | None = None
        self.grad_sampler: CanaryGradSampler | None = None
        self._undo: list[Any] = []

    def attach(self) -> CanaryAudit:
        from ..registry import get_registry
        from ..rng import make_generator

        engine = self.engine
        opt, loader = engine.optimizer, engine.data_loader
        if opt is None or loader is None:
            raise PrivacyEngineError("attach the audit after engine.make_private(...)")
        if getattr(engine, "world_size", 1) > 1:
            raise PrivacyEngineError("canary audits run on one process; audit without DPDDP")
        if self.grad_sampler is not None:
            raise PrivacyEngineError("this audit is already attached")
        config = getattr(engine, "_run_config", None) or engine.config
        seed = int(self.seed if self.seed is not None else engine.seed)
        self.seed = seed
        params = {n: p for n, p in opt.grad_sampler.named_parameters().items() if p.requires_grad}
        canaries = Canaries.place(params, self.count, seed)
        canaries.magnitude = self.magnitude_factor * float(opt.clipper.sensitivity())
        num_data = int(engine.num_samples)
        num_in = int(canaries.included.sum())
        # the rate the engine asked the sampler for: expected batch / data set size
        rate = float(opt.expected_batch_size) / num_data
        inner = get_registry().create(
            "sampler", config.sampler.name, config.sampler.options,
            num_samples=num_data + num_in, sample_rate=rate,
            generator=make_generator(seed, "audit-sampler", 0), rank=0, world_size=1,
        )  # fmt: skip
        adapt = getattr(inner, "require_separation", None)
        if callable(adapt):
            adapt(int(getattr(opt.noise, "min_separation", 1)))
        sampler = CanarySampler(inner, num_data, canaries.in_ids)
        gs = CanaryGradSampler(opt.grad_sampler, canaries, opt.clipper)

        old_gs, old_sampler, old_ebs = opt.grad_sampler, loader.dp_sampler, opt.expected_batch_size
        opt.grad_sampler = gs
        loader.dp_sampler = sampler
        loader.batch_sampler.sampler = sampler

        def deliver() -> None:
            gs.queue(sampler.pop_canaries())

        loader.batch_listeners.append(deliver)
        opt.expected_batch_size = rate * (num_data + num_in)
        remove_hook = opt.register_noise_hook(CanaryScorer(canaries, gs, opt))

        def undo() -> None:
            remove_hook()
            loader.batch_listeners.remove(deliver)
            opt.grad_sampler, opt.expected_batch_size = old_gs, old_ebs
            loader.dp_sampler = old_sampler
            loader.batch_sampler.sampler = old_sampler

        self._undo.append(undo)
        self.canaries, self.sampler, self.grad_sampler = canaries, sampler, gs
        return self

    def detach(self) -> None:
        """Restore the optimizer and the data loader (the scores are kept)."""
        while self._undo:
            self._undo.pop()()
        self.grad_sampler = None

    def report(self, claimed_epsilon: float | None = None, delta: float | None = None) -> Any:
        """The :class:`~dpcore.audit.report.AuditReport` of the steps taken so far."""
        from .report import build_report

        if self.canaries is None or self.sampler is None:
            raise PrivacyEngineError("the audit was never attached")
        engine = self.engine
        config = getattr(engine, "_run_config", None) or engine.config
        delta = float(delta if delta is not None else config.delta)
        if claimed_epsilon is None:
            claimed_epsilon = float(engine.get_epsilon(delta))
        opt = engine.optimizer
        coefs = getattr(opt.noise, "coefs", None) or [1.0]
        plugins = {
            k: getattr(config, k).name
            for k in ("grad_sampler", "clipper", "noise", "sampler", "accountant")
        }
        return build_report(
            self.canaries,
            claimed_epsilon=float(claimed_epsilon),
            delta=delta,
            alpha=self.alpha,
            selection=self.selection,
            rate_per_step=self.sampler.sample_rate / max(1, self.sampler.min_separation),
            coefs=[float(c) for c in coefs],
            noise_multiplier=float(opt.noise_multiplier),
            sensitivity=float(opt.clipper.sensitivity()),
            plugins=plugins,
            two_sided=self.synthetic,
        )
