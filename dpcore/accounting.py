"""Privacy accounting helpers shared by the engine, the CLI and accountant plugins.

* :func:`get_noise_multiplier` — the smallest noise multiplier that meets a privacy
  budget, for any installed accountant plugin.
* :func:`compute_epsilon` / :func:`create_accountant` — one-shot questions for the
  engine and the command line.
* :class:`HistoryAccountant` — a base class for accountant plugins: input checks,
  the ``(noise_multiplier, sample_rate, steps)`` history and its state dict.

The core never imports the built-in accountants; it reaches them by name through
:func:`dpcore.get_registry`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from .errors import AccountingError

Segment = tuple[float, float, int]

__all__ = [
    "HistoryAccountant",
    "check_delta",
    "check_noise_multiplier",
    "check_sample_rate",
    "check_steps",
    "compute_epsilon",
    "create_accountant",
    "get_noise_multiplier",
    "steps_for_epochs",
]


# ----------------------------------------------------------------------------------------
# Input checks (one wording everywhere: accountants, engine, CLI)
# ----------------------------------------------------------------------------------------
def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_sample_rate(sample_rate: Any) -> float:
    if not _is_number(sample_rate) or not (0.0 < float(sample_rate) <= 1.0):
        raise AccountingError(
            f"sample_rate must be in (0, 1] (the probability that one example is in a "
            f"batch, e.g. batch_size / dataset_size), got {sample_rate!r}"
        )
    return float(sample_rate)


def check_noise_multiplier(noise_multiplier: Any, *, allow_zero: bool = True) -> float:
    ok = _is_number(noise_multiplier) and math.isfinite(noise_multiplier)
    if not ok or noise_multiplier < 0 or (noise_multiplier == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise AccountingError(
            f"noise_multiplier (sigma) must be a finite number {bound} (noise std divided "
            f"by the clipping norm), got {noise_multiplier!r}"
        )
    return float(noise_multiplier)


def check_delta(delta: Any) -> float:
    if not _is_number(delta) or not (0.0 < float(delta) < 1.0):
        raise AccountingError(
            f"delta must be in (0, 1) (commonly below 1 / dataset_size, e.g. 1e-5), got {delta!r}"
        )
    return float(delta)


def check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise AccountingError(f"steps must be a non-negative integer, got {steps!r}")
    return int(steps)


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """Steps in ``epochs`` epochs of Poisson sampling at ``sample_rate``.

    One epoch has ``round(1 / sample_rate)`` steps (the length of the ``poisson``
    sampler); a fractional epoch count is rounded up to whole steps.
    """
    q = check_sample_rate(sample_rate)
    if not _is_number(epochs) or not epochs > 0 or not math.isfinite(epochs):
        raise AccountingError(f"epochs must be a positive number, got {epochs!r}")
    per_epoch = max(1, round(1.0 / q))
    return max(1, math.ceil(epochs * per_epoch - 1e-9))


# ----------------------------------------------------------------------------------------
# Base class for accountant plugins
# ----------------------------------------------------------------------------------------
class HistoryAccountant:
    """Keeps the history of privacy events; subclasses implement :meth:`get_epsilon`.

    The history is a list of ``(noise_multiplier, sample_rate, steps)`` segments,
    each one a run of identical Poisson-subsampled Gaussian steps; consecutive
    equal events are merged into one segment.
    """

    #: registry name, written into the state dict so a state cannot be loaded into
    #: an accountant of another kind by mistake
    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.history: list[Segment] = []

    # -- events ---------------------------------------------------------------------
    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Account ``steps`` Poisson-subsampled Gaussian steps."""
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        n = check_steps(steps)
        if n == 0:
            return
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + n)
        else:
            self.history.append((sigma, q, n))

    def __len__(self) -> int:
        return sum(n for _, _, n in self.history)

    def get_epsilon(self, delta: float) -> float:
        raise NotImplementedError

    def events(self) -> dict[tuple[float, float], int]:
        """Steps per distinct ``(noise_multiplier, sample_rate)``; composition is
        commutative, so this is all an accountant of independent steps needs."""
        out: dict[tuple[float, float], int] = {}
        for sigma, q, n in self.history:
            out[(sigma, q)] = out.get((sigma, q), 0) + n
        return out

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "history": [[s, q, n] for s, q, n in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        name = state.get("name", self.name)
        if name != self.name:
            raise AccountingError(
                f"this state belongs to the {name!r} accountant, not {self.name!r}; create "
                f"the accountant it was saved from (accountant={name!r})"
            )
        try:
            rows: Sequence[Sequence[Any]] = state["history"]
            history = [
                (
                    check_noise_multiplier(float(s)),
                    check_sample_rate(float(q)),
                    check_steps(int(n)),
                )
                for s, q, n in rows
            ]
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, AccountingError):
                raise
            raise AccountingError(f"not an accountant state dict: {exc}") from None
        self.history = []
        for s, q, n in history:
            self.step(noise_multiplier=s, sample_rate=q, steps=n)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={len(self)}, segments={len(self.history)})"


# ----------------------------------------------------------------------------------------
# Engine / CLI helpers (through the registry: any accountant plugin works)
# ----------------------------------------------------------------------------------------
def create_accountant(accountant: str = "prv", **options: Any) -> Any:
    """A fresh accountant plugin, ``options`` validated against its own model."""
    from .registry import get_registry

    return get_registry().create("accountant", accountant, options)


def compute_epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "prv",
    **accountant_options: Any,
) -> float:
    """Epsilon after ``steps`` identical steps, with a fresh accountant."""
    sigma = check_noise_multiplier(noise_multiplier)
    q = check_sample_rate(sample_rate)
    n = check_steps(steps)
    d = check_delta(delta)
    acc = create_accountant(accountant, **accountant_options)
    acc.step(noise_multiplier=sigma, sample_rate=q, steps=n)
    return float(acc.get_epsilon(d))


def _gaussian_dp_mu(epsilon: float, delta: float) -> float:
    """mu of the mu-GDP mechanism whose (epsilon, delta) curve passes through the target.

    Only used for a starting guess of the search below.
    """
    from scipy.optimize import brentq
    from scipy.special import ndtr

    def excess(mu: float) -> float:
        return float(
            ndtr(-epsilon / mu + mu / 2) - math.exp(epsilon) * ndtr(-epsilon / mu - mu / 2) - delta
        )

    hi = 1.0
    while excess(hi) < 0 and hi < 1e3:
        hi *= 2
    return float(brentq(excess, 1e-6, hi)) if excess(hi) >= 0 else hi


def _initial_sigma(epsilon: float, delta: float, q: float, steps: int) -> float:
    """Sigma from the central-limit (GDP) approximation: a good first guess."""
    try:
        mu = _gaussian_dp_mu(epsilon, delta)
    except Exception:
        return 1.0
    if q >= 1.0:
        return math.sqrt(steps) / mu
    # mu = q sqrt(T (exp(1/sigma^2) - 1))  =>  sigma = 1 / sqrt(log(1 + (mu/q)^2 / T))
    inner = math.log1p((mu / q) ** 2 / steps)
    return 1.0 / math.sqrt(inner) if inner > 0 else 1.0


def get_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int | None = None,
    epochs: float | None = None,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
    **accountant_options: Any,
) -> float:
    """The smallest noise multiplier whose epsilon after ``steps`` steps (or ``epochs``
    epochs, ``round(1 / sample_rate)`` steps each) is at most ``target_epsilon``.

    Works for any accountant plugin (``accountant`` is its registry name; extra keyword
    arguments are its options). The result spends between ``target_epsilon -
    epsilon_tolerance`` and ``target_epsilon``, as stated by that accountant.
    """
    if not _is_number(target_epsilon) or not target_epsilon > 0:
        raise AccountingError(f"target_epsilon must be positive, got {target_epsilon!r}")
    if not _is_number(epsilon_tolerance) or not 0 < epsilon_tolerance < target_epsilon:
        raise AccountingError(
            f"epsilon_tolerance must be in (0, target_epsilon), got {epsilon_tolerance!r}"
        )
    delta = check_delta(target_delta)
    q = check_sample_rate(sample_rate)
    if (steps is None) == (epochs is None):
        raise AccountingError("give exactly one of steps and epochs")
    n = check_steps(steps) if steps is not None else steps_for_epochs(epochs, q)  # type: ignore[arg-type]
    if n == 0:
        raise AccountingError("steps must be at least 1 to calibrate the noise")
    create_accountant(accountant, **accountant_options)  # fail early on a bad name/option

    cache: dict[float, float] = {}
    caught: dict[tuple[type[Warning], str], warnings.WarningMessage] = {}

    def eps(sigma: float) -> float:
        if sigma not in cache:
            # Each trial accountant may warn (e.g. gdp's approximation); say it once.
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                acc = create_accountant(accountant, **accountant_options)
                acc.step(noise_multiplier=sigma, sample_rate=q, steps=n)
                cache[sigma] = float(acc.get_epsilon(delta))
            for w in seen:
                caught.setdefault((w.category, str(w.message)), w)
        return cache[sigma]

    try:
        return _search_sigma(
            eps,
            target_epsilon,
            epsilon_tolerance,
            _initial_sigma(target_epsilon, delta, q, n),
            what=f"{accountant!r} with {n} steps at q={q}",
        )
    finally:
        for w in caught.values():
            warnings.warn(w.message, w.category, stacklevel=2)


def _search_sigma(
    eps: Callable[[float], float], target: float, tolerance: float, guess: float, what: str
) -> float:
    """Smallest sigma with ``target - tolerance <= eps(sigma) <= target`` (eps decreasing).

    log(epsilon) is close to linear in log(sigma), so secant steps in log-log space
    (safeguarded: Illinois once the root is bracketed) need only a few evaluations.
    """
    aim = math.log(target - tolerance / 2)

    def f(x: float) -> float:
        e = eps(math.exp(x))
        if e <= 0:
            return -50.0
        return min(math.log(e), 50.0) - aim if math.isfinite(e) else 50.0

    def good(x: float) -> bool:
        return target - tolerance <= eps(math.exp(x)) <= target

    x = math.log(min(max(guess, 1e-3), 1e4))
    fx = f(x)
    above: tuple[float, float] | None = None  # (x, f) with eps too large (sigma too small)
    below: tuple[float, float] | None = None  # (x, f) with eps small enough
    prev: tuple[float, float] | None = None
    side = 0
    for _ in range(200):
        if good(x):
            return math.exp(x)
        if fx > 0:
            above = (x, fx)
        else:
            below = (x, fx)
        if above is not None and below is not None:
            (xa, fa), (xb, fb) = above, below
            if abs(xa - xb) < 1e-13:
                break
            new = xb - fb * (xb - xa) / (fb - fa) if fa != fb else 0.5 * (xa + xb)
            lo_x, hi_x = min(xa, xb), max(xa, xb)
            if not lo_x < new < hi_x:
                new = 0.5 * (xa + xb)
        else:
            slope = -1.5  # d log(eps) / d log(sigma) of a typical DP-SGD run
            if prev is not None and prev[0] != x:
                s = (fx - prev[1]) / (x - prev[0])
                if s < -0.05:
                    slope = s
            step = max(-3.0, min(3.0, -fx / slope * 1.05))
            new = x + step
            if new > math.log(1e7):
                raise AccountingError(
                    f"no noise multiplier up to 1e7 reaches epsilon {target} ({what})"
                )
            if new < math.log(1e-6):
                return math.exp(x) if fx <= 0 else math.exp(new)
        prev = (x, fx)
        fnew = f(new)
        # Illinois: halve the stale end's value when the same end is kept twice
        if above is not None and below is not None:
            if fnew > 0:
                if side == 1:
                    below = (below[0], below[1] / 2)
                side = 1
            else:
                if side == -1:
                    above = (above[0], above[1] / 2)
                side = -1
        x, fx = new, fnew
    if below is not None:
        return math.exp(below[0])
    raise AccountingError(f"could not calibrate the noise multiplier ({what})")
