"""Host/device overlap for an embedding engine: batches prepared ahead, moved on side streams.

The same code runs on the CPU, where the streams are absent and every copy is a plain copy:

- ``prefetched``: each batch prepared (tokenized, into pinned memory) by a background thread while the
  caller computes the one before;
- ``Transfers.upload``: a prepared batch to the device, on a side stream that the compute stream then
  waits for (or, without overlap, as before: pinned and queued on the compute stream);
- ``VectorSink``: each batch's vectors into the result, either kept on the device and copied back once
  at the end (as before), or copied back batch by batch on a side stream into pinned host memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

Item = TypeVar("Item")
Prepared = TypeVar("Prepared")
AHEAD = 2
"""Batches prepared ahead of the one being computed."""


def prefetched(
    items: Iterable[Item], prepare: Callable[[Item], Prepared], background: bool
) -> Iterator[tuple[Item, Prepared]]:
    """``(item, prepare(item))`` in order; with ``background`` the next ``AHEAD`` items are prepared by one
    background thread meanwhile. An error of ``prepare`` is raised when its item is reached."""
    if not background:
        for item in items:
            yield item, prepare(item)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
    pending: deque[tuple[Item, Future[Prepared]]] = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(prepare, item)))
            if len(pending) > AHEAD:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Transfers:
    """Moving prepared batches (objects with ``map(function)`` over their tensors) to ``device``."""

    def __init__(self, device: torch.device, side_stream: bool) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if side_stream and self.cuda else None

    def pin(self, batch: Any) -> Any:
        """The batch in pinned host memory, so that its copy to the device can be asynchronous (on a GPU)."""
        return batch.map(lambda tensor: tensor.pin_memory()) if self.stream is not None else batch

    def upload(self, batch: Any) -> Any:
        """The batch on the device; the compute stream will wait for the copies, the caller does not."""
        import torch

        from virnucpro.engines.embedded import to_device

        if self.stream is None:
            return batch.map(lambda tensor: to_device(tensor, self.device))
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            moved = batch.map(lambda tensor: tensor.to(self.device, non_blocking=True))
        compute.wait_stream(self.stream)

        def used_on_compute(tensor: torch.Tensor) -> torch.Tensor:
            tensor.record_stream(compute)
            return tensor

        return moved.map(used_on_compute)


class VectorSink:
    """The [count, dim] float32 result, filled batch by batch; rows never filled stay NaN."""

    def __init__(self, count: int, dim: int, device: torch.device, streamed: bool) -> None:
        import torch

        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if streamed and self.device.type == "cuda" else None
        self.streamed = streamed
        self.count, self.dim = count, dim
        self.rows: list[int] = []
        if streamed:  # rows in arrival order, put in input order at the end
            self.staging = torch.empty((count, dim), dtype=torch.float32, pin_memory=self.stream is not None)
        else:
            self.vectors = torch.full((count, dim), float("nan"), dtype=torch.float32, device=self.device)

    def put(self, rows: list[int], vectors: torch.Tensor) -> None:
        """``vectors`` [len(rows), dim] (float32, on the device) are the result's ``rows``."""
        import torch

        from virnucpro.engines.embedded import to_device

        if not self.streamed:
            self.vectors.index_copy_(0, to_device(torch.tensor(rows), self.device), vectors)
            return
        start = len(self.rows)
        self.rows += rows
        target = self.staging[start : start + len(rows)]
        if self.stream is None:
            target.copy_(vectors)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            target.copy_(vectors, non_blocking=True)
        vectors.record_stream(self.stream)

    def result(self) -> torch.Tensor:
        """The vectors on the CPU, in input order (waits for the copies)."""
        import torch

        if not self.streamed:
            return self.vectors.cpu()
        if self.stream is not None:
            self.stream.synchronize()
        vectors = torch.full((self.count, self.dim), float("nan"), dtype=torch.float32)
        if self.rows:
            vectors[torch.tensor(self.rows)] = self.staging[: len(self.rows)]
        return vectors
