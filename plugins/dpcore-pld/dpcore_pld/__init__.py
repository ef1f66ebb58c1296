"""dpcore plugin: the PLD accountant of Google's ``dp-accounting`` library as ``pld``.

Each history segment ``(sigma, q, steps)`` becomes ``steps`` self-compositions of a
Poisson-sampled Gaussian event; ``dp-accounting`` composes them as privacy loss
distributions (pessimistic discretisation, so its epsilon is an upper bound up to
its grid).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dpcore.accounting import HistoryAccountant, check_delta
from dpcore.hookspecs import Register, hookimpl

try:
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
except ModuleNotFoundError as exc:  # recorded by dpcore's registry as this plugin's cause
    raise ModuleNotFoundError(
        f"No module named {exc.name!r}: the pld accountant needs Google's dp-accounting; "
        "install it with `pip install 'dpcore-pld[dp-accounting]'`",
        name=exc.name,
    ) from exc

__version__ = "0.1.0"


class PLDOptions(BaseModel):
    """Options of the ``pld`` accountant."""

    model_config = ConfigDict(extra="forbid")

    value_discretization_interval: float = Field(
        default=1e-4, gt=0, description="grid of the privacy loss; smaller is tighter and slower"
    )
    neighboring_relation: Literal["add_or_remove", "replace"] = Field(
        default="add_or_remove", description="neighbouring datasets: add/remove one, or replace one"
    )


_RELATIONS = {
    "add_or_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace": dp_accounting.NeighboringRelation.REPLACE_ONE,
}


class PLDAccountant(HistoryAccountant):
    """Privacy loss distributions from Google's dp-accounting (pessimistic estimate)."""

    name = "pld"

    def __init__(
        self,
        value_discretization_interval: float = 1e-4,
        neighboring_relation: str = "add_or_remove",
    ) -> None:
        super().__init__()
        self.value_discretization_interval = float(value_discretization_interval)
        self.neighboring_relation = neighboring_relation
        self._cache: tuple[Any, Any] | None = None

    def _composed(self) -> Any:
        key = tuple(self.history)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        acc = pld_privacy_accountant.PLDAccountant(
            neighboring_relation=_RELATIONS[self.neighboring_relation],
            value_discretization_interval=self.value_discretization_interval,
        )
        for sigma, q, steps in self.history:
            event: Any = dp_accounting.GaussianDpEvent(sigma)
            if q < 1.0:
                event = dp_accounting.PoissonSampledDpEvent(q, event)
            acc.compose(event, steps)
        self._cache = (key, acc)
        return acc

    def get_epsilon(self, delta: float) -> float:
        delta = check_delta(delta)
        if not self.history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in self.history):
            return math.inf
        return max(0.0, float(self._composed().get_epsilon(delta)))


@hookimpl
def dpcore_register_accountants(register: Register) -> None:
    register(
        "pld",
        PLDAccountant,
        options=PLDOptions,
        description="privacy loss distributions from Google's dp-accounting (PLD)",
        details="Provided by the dpcore-pld distribution; needs the dp-accounting package.",
    )
