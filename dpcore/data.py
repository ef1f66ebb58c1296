"""Private data loading: batches drawn by a sampler plugin, and physical batch splitting.

:class:`DPDataLoader` is a :class:`torch.utils.data.DataLoader` whose batches come
from a :class:`~dpcore.protocols.Sampler` plugin (Poisson by default), with empty
batches collated to correctly shaped empty tensors. :class:`BatchMemoryManager`
splits each logical batch into physical batches that fit in memory while the
optimizer takes exactly one real step per logical batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from torch.utils.data.dataloader import default_collate

from .errors import PrivacyEngineError

if TYPE_CHECKING:
    from .optimizer import DPOptimizer
    from .protocols import Sampler as SamplerPlugin


# ------------------------------------------------------------------------------------
# Empty batches
# ------------------------------------------------------------------------------------
def _empty_like(batch: Any) -> Any:
    """The same structure as ``batch`` with every batch dimension of size 0."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, Mapping):
        items = {k: _empty_like(v) for k, v in batch.items()}
        return items if type(batch) is dict else type(batch)(items)  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_empty_like(v) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_empty_like(v) for v in batch)
    return batch  # scalars and strings carried by the collate function as is


class EmptyBatchCollate:
    """Wraps a collate function so an empty list of samples gives empty tensors.

    The structure (tensor, tuple, dict, nested) and the non-batch dimensions come
    from collating the data set's first sample, computed once.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None, dataset: Dataset) -> None:
        self.collate_fn = collate_fn or default_collate
        self.dataset = dataset
        self._template: Any = None

    def __call__(self, samples: list[Any]) -> Any:
        if len(samples) > 0:
            return self.collate_fn(samples)
        if self._template is None:
            self._template = _empty_like(self.collate_fn([self.dataset[0]]))
        return self._template


# ------------------------------------------------------------------------------------
# The data loader
# ------------------------------------------------------------------------------------
class _PluginBatchSampler(Sampler[list[int]]):
    def __init__(self, sampler: SamplerPlugin) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def _require_map_style(data_loader: DataLoader) -> None:
    dataset = data_loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise PrivacyEngineError(
            f"the data loader's dataset ({type(dataset).__name__}) is not map-style: private "
            "sampling needs len(dataset) and dataset[i] to include each example independently. "
            "Use a map-style Dataset (e.g. TensorDataset), or drive dpcore's components "
            "yourself (see docs/migration.md, 'No DataLoader')."
        )
    try:
        len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise PrivacyEngineError(
            f"the data loader's dataset ({type(dataset).__name__}) has no len(); private "
            "sampling needs the number of examples."
        ) from None


class DPDataLoader(DataLoader):
    """A data loader whose batches come from a sampler plugin (Poisson by default).

    Build it with :meth:`from_data_loader`. ``len()`` is the number of steps per
    epoch. ``state_dict()`` holds the sampler's random state and the number of
    batches delivered in the current epoch, so a resumed run continues with
    exactly the batches the uninterrupted run would have drawn.
    """

    def __init__(
        self, dataset: Dataset, *, sampler: SamplerPlugin, collate_fn: Any = None, **kwargs: Any
    ) -> None:
        # [checkpoint owner] every DataLoader iterator draws a worker base seed from its
        # `generator`, by default torch's GLOBAL one; that shifted dropout masks after a
        # resume (one extra draw). A private generator keeps the global stream untouched.
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(
            dataset,
            batch_sampler=_PluginBatchSampler(sampler),
            collate_fn=EmptyBatchCollate(collate_fn, dataset),
            **kwargs,
        )
        self.dp_sampler = sampler
        self.sample_rate = float(sampler.sample_rate)
        self._snapshot: dict[str, Any] | None = None
        self._delivered = 0
        #: called once per delivered logical batch (the engine counts batches per step)
        self.batch_listeners: list[Callable[[], None]] = []

    @classmethod
    def from_data_loader(
        cls,
        data_loader: DataLoader,
        *,
        sampler: str | Mapping[str, Any] | SamplerPlugin = "poisson",
        sample_rate: float | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> DPDataLoader:
        """A private loader over the same dataset, collate function and workers.

        ``sampler`` is a plugin name, ``{"name": ..., **options}``, or a ready sampler
        object. The sample rate defaults to ``1 / len(data_loader)`` (the expected batch
        size is then the original batch size).
        """
        _require_map_style(data_loader)
        if isinstance(sampler, (str, Mapping)):
            from .registry import get_registry
            from .rng import fresh_seed, make_generator

            name, options = (
                (sampler, {})
                if isinstance(sampler, str)
                else (sampler["name"], {k: v for k, v in sampler.items() if k != "name"})
            )
            if generator is None:
                generator = make_generator(fresh_seed() if seed is None else seed, "sampler", rank)
            q = sample_rate if sample_rate is not None else 1.0 / len(data_loader)
            sampler = get_registry().create(
                "sampler",
                name,
                options,
                num_samples=len(data_loader.dataset),  # type: ignore[arg-type]
                sample_rate=q,
                generator=generator,
                rank=rank,
                world_size=world_size,
            )
        collate = data_loader.collate_fn
        if isinstance(collate, EmptyBatchCollate):
            collate = collate.collate_fn
        return cls(
            data_loader.dataset,
            sampler=sampler,  # type: ignore[arg-type]
            collate_fn=collate,
            num_workers=data_loader.num_workers,
            pin_memory=data_loader.pin_memory,
            timeout=data_loader.timeout,
            worker_init_fn=data_loader.worker_init_fn,
            multiprocessing_context=data_loader.multiprocessing_context,
            prefetch_factor=data_loader.prefetch_factor if data_loader.num_workers > 0 else None,
            persistent_workers=data_loader.persistent_workers,
        )

    # -- delivery bookkeeping ----------------------------------------------------------
    def _begin_epoch(self) -> None:
        self._snapshot = dict(self.dp_sampler.state_dict())
        self._delivered = 0

    def _note_delivered(self) -> None:
        self._delivered += 1
        for fn in self.batch_listeners:
            fn()

    def _end_epoch(self) -> None:
        self._snapshot = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._begin_epoch()
        for batch in super().__iter__():
            self._note_delivered()
            yield batch
        self._end_epoch()

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The sampler's state, with ``position`` = batches delivered in this epoch."""
        if self._snapshot is None:
            return dict(self.dp_sampler.state_dict())
        state = dict(self._snapshot)
        state["position"] = int(state.get("position", 0)) + self._delivered
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.dp_sampler.load_state_dict(state)
        self._snapshot = None
        self._delivered = 0


# ------------------------------------------------------------------------------------
# Physical batches
# ------------------------------------------------------------------------------------
class _SplittingBatchSampler(Sampler[list[int]]):
    """Splits each logical batch into chunks; records which chunk ends a logical batch."""

    def __init__(self, sampler: SamplerPlugin, max_size: int) -> None:
        self.sampler = sampler
        self.max_size = max_size
        self.ends: deque[bool] = deque()

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            chunks = [
                batch[i : i + self.max_size] for i in range(0, len(batch), self.max_size)
            ] or [[]]
            for i, chunk in enumerate(chunks):
                self.ends.append(i == len(chunks) - 1)
                yield chunk

    def __len__(self) -> int:
        return len(self.sampler)  # logical batches; the physical count is random


class BatchMemoryManager:
    """Physical batches of at most ``max_physical_batch_size``, one real step per logical batch.

    ::

        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=32,
                                optimizer=optimizer) as physical_loader:
            for x, y in physical_loader:
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()      # a real step only after a logical batch's last chunk

    Only the samples of one physical batch are loaded and held at a time. Every
    sample of a logical batch is clipped in the one physical batch that holds it,
    so the update equals that of the whole logical batch at once.
    """

    def __init__(
        self, *, data_loader: DPDataLoader, max_physical_batch_size: int, optimizer: DPOptimizer
    ) -> None:
        if not isinstance(data_loader, DPDataLoader):
            raise PrivacyEngineError(
                "BatchMemoryManager needs the data loader returned by make_private (a "
                f"DPDataLoader), got {type(data_loader).__name__}."
            )
        if max_physical_batch_size < 1:
            raise PrivacyEngineError("max_physical_batch_size must be at least 1")
        if not hasattr(optimizer, "signal_skip_step"):
            raise PrivacyEngineError(
                "BatchMemoryManager needs the DPOptimizer returned by make_private"
            )
        self.data_loader = data_loader
        self.max_physical_batch_size = int(max_physical_batch_size)
        self.optimizer = optimizer

    def __enter__(self) -> _PhysicalLoader:
        return _PhysicalLoader(self)

    def __exit__(self, *exc: object) -> None:
        self.optimizer.signal_skip_step(do_skip=False)


class _PhysicalLoader:
    def __init__(self, manager: BatchMemoryManager) -> None:
        self.manager = manager

    def __len__(self) -> int:
        return len(self.manager.data_loader)

    def __iter__(self) -> Iterator[Any]:
        dl = self.manager.data_loader
        splitter = _SplittingBatchSampler(dl.dp_sampler, self.manager.max_physical_batch_size)
        loader = DataLoader(
            dl.dataset,
            batch_sampler=splitter,
            collate_fn=dl.collate_fn,
            num_workers=dl.num_workers,
            pin_memory=dl.pin_memory,
            timeout=dl.timeout,
            worker_init_fn=dl.worker_init_fn,
            multiprocessing_context=dl.multiprocessing_context,
            prefetch_factor=dl.prefetch_factor if dl.num_workers > 0 else None,
            persistent_workers=dl.persistent_workers,
            generator=dl.generator,  # [checkpoint owner] not torch's global generator
        )
        optimizer = self.manager.optimizer
        dl._begin_epoch()
        # DataLoader keeps the sampler's order, so the flags line up with delivered batches
        # even when workers prefetch.
        for batch in loader:
            last = splitter.ends.popleft()
            optimizer.signal_skip_step(do_skip=not last)
            if last:
                dl._note_delivered()
            yield batch
        dl._end_epoch()
        optimizer.signal_skip_step(do_skip=False)
