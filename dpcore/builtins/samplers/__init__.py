"""Built-in samplers (poisson, distributed_poisson, cyclic_poisson, shuffle)."""

from __future__ import annotations

from dpcore.hookspecs import Register, hookimpl


@hookimpl
def dpcore_register_samplers(register: Register) -> None:
    from .poisson import PoissonOptions, PoissonSampler
    from .shuffle import ShuffleSampler

    register(
        "poisson",
        PoissonSampler,
        options=PoissonOptions,
        description="each example included independently with probability q",
    )
    register(
        "shuffle",
        ShuffleSampler,
        description="fixed-size shuffled batches; accounting is only an approximation",
    )
    from .distributed import DistributedPoissonOptions, distributed_poisson

    register(
        "distributed_poisson",
        distributed_poisson,
        options=DistributedPoissonOptions,
        description="each rank's shard of one Poisson sample at the global rate",
    )
    from .cyclic import DETAILS as CYCLIC_DETAILS
    from .cyclic import CyclicPoissonOptions, CyclicPoissonSampler

    register(
        "cyclic_poisson",
        CyclicPoissonSampler,
        options=CyclicPoissonOptions,
        details=CYCLIC_DETAILS,
        description="Poisson sampling from one of k fixed groups in turn (for bandmf)",
    )
