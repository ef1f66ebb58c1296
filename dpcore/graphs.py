"""CUDA-graph replay of a step's private arithmetic: norms, clip factors, clipped sums, noise.

On models with many small layers a private step is bound by the host, not the GPU:
every layer's norms and clipped sums are a few small kernels, each launched from
Python. When a step has the same shapes as the one before (a fixed batch size, as
with the ``shuffle`` sampler or a benchmark), the DP optimizer replays those kernels
from a CUDA graph with one launch instead. Steps whose shapes change (Poisson
batches) run eagerly; when shapes or addresses keep changing the optimizer stops trying.

It engages only where every plugin of the step declares ``graph_safe = True`` (its
arithmetic is a fixed sequence of kernels for fixed shapes, with no host
synchronisation) and the grad sampler can list the tensors it recorded
(``graph_inputs()``). Soundness rests on two checks:

* **at capture**, a dispatch mode records every tensor the captured kernels read
  that was not created inside the capture. Each must be one of the grad sampler's
  recorded tensors, a parameter or buffer of the model, or the graph's own output
  buffers; anything else (a cache a plugin keeps, say) and the graph is thrown away
  and the step runs eagerly.
* **at replay**, the recorded tensors of the new step, and the model's tensors
  the capture read (usually none), must sit at the same addresses with the same
  layouts as at capture, the model must hold the same tensors (else it is walked
  anew and the step captured anew), and the noise scale and the plugins' states
  must be equal. The caching allocator hands out the same addresses for the same
  sequence of allocations, so in a steady training loop they are; when not, the
  step runs eagerly.

The replayed result is bit-identical to the eager one: same kernels, and the noise is
drawn from a mirror generator that takes the run's generator state before each replay
and hands the advanced state back (the run's own generator is never registered with a
graph, so a failed capture cannot leave it unusable).
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _ReadTracker(TorchDispatchMode):
    """Notes the storages the ops read that were not produced inside the capture."""

    def __init__(self) -> None:
        super().__init__()
        self.internal: set[int] = set()
        self.external: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, Tensor) and t.device.type == "cuda" and t.numel():
                ptr = _storage(t)
                if ptr not in self.internal:
                    self.external.add(ptr)
        out = func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type == "cuda":
                ptr = _storage(t)
                if ptr not in self.external:  # a view of an outside tensor stays outside
                    self.internal.add(ptr)
        return out


def _layout(t: Tensor) -> tuple[Any, ...]:
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


class StepGraph:
    """Captured private steps, replayed while their inputs stay where they were.

    A step is captured the second time its shapes are seen in a row (the first runs
    eagerly: one-off shapes, e.g. Poisson batches, are never captured, and cuBLAS has
    warmed up). Up to ``max_graphs`` captures are kept (a data loader alternates its
    batches between a few addresses); they share one memory pool and write into the
    same output buffers, so the memory they hold is one set of gradients plus the
    largest step's scratch. After ``max_misses`` steps in a row that change shapes, or
    captures in a row that never replay, graphs are turned off for good (so Poisson
    batches pay for the bookkeeping only on their first few steps).
    """

    max_graphs = 8
    max_misses = 8

    def __init__(self) -> None:
        self.graphs: OrderedDict[Any, Any] = OrderedDict()
        self.outputs: dict[str, Tensor] | None = None
        self.captures = 0
        self.replays = 0
        #: (structure, indices of the persistent tensors the captures read)
        self._reads: tuple[Any, list[int]] | None = None
        self._pool: Any = None
        self._generators: list[torch.Generator] = []
        self._misses = 0
        self._changes = 0
        self._last_shapes: Any = None
        #: why graphs were turned off for this optimizer (None: still on)
        self.disabled: str | None = None

    def key(
        self, inputs: Sequence[Tensor], persistent: Sequence[Tensor], structure: Any, extra: Any
    ) -> Any:
        """(addresses, layouts, ``structure`` and ``extra``) of one step: equal keys replay.

        Of ``persistent`` (the model's tensors, listed the same way while ``structure``
        is unchanged) only those the captured kernels read count, once a capture has
        shown which (typically none: the arithmetic reads only the recorded tensors)."""
        reads = self._reads[1] if self._reads is not None and self._reads[0] == structure else None
        chosen = persistent if reads is None else [persistent[i] for i in reads]
        return (
            tuple(t.data_ptr() for t in (*inputs, *chosen)),
            tuple(map(_layout, inputs)),
            tuple(map(_layout, chosen)),
            structure,
            extra,
        )

    def run(
        self,
        inputs: Sequence[Tensor],
        persistent: Sequence[Tensor],
        structure: Any,
        extra: Any,
        compute: Callable[[Sequence[torch.Generator]], dict[str, Tensor]],
        generators: Sequence[torch.Generator],
        outputs: Mapping[str, tuple[torch.Size, torch.device]],
    ) -> dict[str, Tensor] | None:
        """``compute(generators)``'s float32 results (of the given shapes) for this step,
        by replay or by a new capture; None when the step must run eagerly (``compute``
        has not run, or ran only into a discarded capture: the caller drops what it
        cached). ``compute`` draws from the generators it is given, which stand for
        ``generators`` (same states, advanced the same)."""
        if self.disabled is not None:
            return None
        key = self.key(inputs, persistent, structure, extra)
        graph = self.graphs.get(key)
        if graph is not None:
            self._replay(graph, generators)
            self.graphs.move_to_end(key)
            self._misses = self._changes = 0
            return self.outputs
        shapes = (key[1], key[3], key[4])  # the batch's shapes, not the model's addresses
        if shapes != self._last_shapes:
            self._last_shapes = shapes
            self._changes += 1
            if self._changes > self.max_misses:
                self.disable(f"shapes changed {self.max_misses} steps in a row (e.g. Poisson)")
            return None
        self._changes = 0
        self._misses += 1
        if self._misses > self.max_misses:
            self.disable(f"{self.max_misses} captures in a row never replayed (addresses change)")
            return None
        if self.outputs is None or {n: (t.shape, t.device) for n, t in self.outputs.items()} != {
            n: (torch.Size(shape), device) for n, (shape, device) in outputs.items()
        }:
            self.graphs.clear()
            self.outputs = {
                n: torch.empty(shape, dtype=torch.float32, device=device)
                for n, (shape, device) in outputs.items()
            }
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        captured = self._capture(compute, generators, inputs, persistent)
        if captured is None:
            return None
        graph, reads = captured
        if self._reads is None or self._reads[0] != structure or self._reads[1] != reads:
            self.graphs.clear()  # keys made with other reads are stale
            self._reads = (structure, reads)
        self.captures += 1
        self.graphs[self.key(inputs, persistent, structure, extra)] = graph
        self._replay(graph, generators)
        return self.outputs

    def _mirror(self, generators: Sequence[torch.Generator]) -> list[torch.Generator]:
        """The graphs' own generators, one per caller's generator. The caller's are never
        registered with a graph: a registered generator is stuck if a capture fails, and
        the caller's must keep working eagerly (and in checkpoints)."""
        while len(self._generators) < len(generators):
            self._generators.append(torch.Generator(device="cuda"))
        return self._generators[: len(generators)]

    def _replay(self, graph: Any, generators: Sequence[torch.Generator]) -> None:
        """Replay with the caller's generators' states: the draws, and how far each
        generator advances, are exactly those of the eager step."""
        mirrors = self._mirror(generators)
        for gen, mirror in zip(generators, mirrors, strict=True):
            mirror.set_state(gen.get_state())
        graph.replay()
        for gen, mirror in zip(generators, mirrors, strict=True):
            gen.set_state(mirror.get_state())
        self.replays += 1

    def _capture(
        self,
        compute: Callable[[Sequence[torch.Generator]], dict[str, Tensor]],
        generators: Sequence[torch.Generator],
        inputs: Sequence[Tensor],
        persistent: Sequence[Tensor],
    ) -> tuple[Any, list[int]] | None:
        assert self.outputs is not None
        graph = torch.cuda.CUDAGraph()
        mirrors = self._mirror(generators)
        for mirror in mirrors:
            graph.register_generator_state(mirror)
        tracker = _ReadTracker()
        side = _capture_stream()
        side.wait_stream(torch.cuda.current_stream())
        names = list(self.outputs)
        # a garbage collection inside the capture may free a tensor of another stream,
        # whose event calls invalidate the capture (torch.cuda.graph collects first for that)
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.stream(side):
                graph.capture_begin(pool=self._pool)
                try:
                    with tracker:
                        results = compute(mirrors)
                        torch._foreach_copy_(
                            [self.outputs[n] for n in names], [results[n] for n in names]
                        )
                    del results
                finally:
                    graph.capture_end()
        except Exception as exc:  # a host sync, a CPU tensor, an unsupported op...
            torch.cuda.current_stream().wait_stream(side)
            _unstick(side)
            self._generators = []
            self.disable(f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            return None
        finally:
            if collecting:
                gc.enable()
        torch.cuda.current_stream().wait_stream(side)
        allowed = {_storage(t) for t in (*inputs, *persistent, *self.outputs.values()) if t.numel()}
        strangers = tracker.external - allowed
        if strangers:
            self.disable(f"unsafe capture: {len(strangers)} tensor(s) read from outside the batch")
            return None
        reads = [
            i for i, t in enumerate(persistent) if t.numel() and _storage(t) in tracker.external
        ]
        return graph, reads

    def disable(self, reason: str) -> None:
        self.graphs.clear()
        self._reads = None
        self.outputs = None
        self.disabled = reason


_STREAMS: dict[int, torch.cuda.Stream] = {}


def _capture_stream() -> torch.cuda.Stream:
    """One capture stream per device for the whole process: cuBLAS keeps a workspace for
    every stream it runs on (tens of MiB), and the captured kernels keep using it."""
    device = torch.cuda.current_device()
    stream = _STREAMS.get(device)
    if stream is None:
        stream = _STREAMS[device] = torch.cuda.Stream()
    return stream


def _unstick(stream: torch.cuda.Stream) -> None:
    """After a failed capture torch leaves the generators it registered (the default
    CUDA generator always) in capture mode, and every later eager draw fails. An empty
    capture ends that mode cleanly."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            graph.capture_begin()
            torch.empty(1, device="cuda").zero_()
            graph.capture_end()
    except Exception:  # nothing more can be done; the eager draw will say what is wrong
        pass
    torch.cuda.current_stream().wait_stream(stream)
