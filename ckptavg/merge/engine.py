"""The streaming engine: executes a plan chunk by chunk, reading ahead while it folds.

Memory is bounded by the staging buffers (two sets of one chunk per input), whatever the model size or
the number of inputs. Each chunk is folded block by block so that the accumulator stays in cache.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from ckptavg.errors import CkptavgError, NonFiniteError
from ckptavg.formats.base import dtype_name, tensor_buffer
from ckptavg.formats.writer import SafetensorsWriter
from ckptavg.merge.plan import Plan, PlanEntry

ProgressFn = Callable[[int, int, str], None]
CACHE_BLOCK_BYTES = 1 << 20
DEFAULT_STAGING_BYTES = 256 << 20
MIN_BUFFER_BYTES = 1 << 20
MAX_BUFFER_BYTES = 64 << 20


def fold(inputs: list[torch.Tensor], weights: list[float], divisor: float, acc: torch.Tensor, out: torch.Tensor) -> None:
    """out = sum_i weights[i] * inputs[i] / divisor, accumulated in acc.dtype in input order, rounded once to out.dtype.

    `acc` is a 1-D buffer whose length sets the block: small enough to stay in cache on a CPU, the whole
    chunk on a GPU. The arithmetic per element is the same either way, so CPU and CUDA agree.
    """
    n = out.numel()
    block = acc.numel()
    # float8 does not promote in mixed-dtype arithmetic; it goes through a widened copy.
    scratch = torch.empty_like(acc) if inputs[0].dtype.itemsize == 1 else None
    for start in range(0, n, block):
        stop = min(n, start + block)
        a = acc[: stop - start]
        a.copy_(inputs[0][start:stop])
        if weights[0] != 1:
            a.mul_(weights[0])
        for x, w in zip(inputs[1:], weights[1:]):
            if scratch is None:
                a.add_(x[start:stop], alpha=w)
            else:
                widened = scratch[: stop - start]
                widened.copy_(x[start:stop])
                a.add_(widened, alpha=w)
        if divisor != 1:
            a.div_(divisor)
        out[start:stop].copy_(a)


def _finite(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t.float() if t.dtype.itemsize == 1 else t)


@dataclass
class Chunk:
    entry: PlanEntry
    start: int  # first element
    count: int  # elements
    last: bool


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Engine:
    """Runs a plan into a writer on one device ('cpu' or a CUDA device)."""

    def __init__(self, plan: Plan, device: torch.device, staging_bytes: int = DEFAULT_STAGING_BYTES) -> None:
        self.plan = plan
        self.device = device
        width = max(1, sum(1 for w in plan.weights.scales if w != 0))
        self.buffer_bytes = max(MIN_BUFFER_BYTES, min(MAX_BUFFER_BYTES, staging_bytes // (2 * width)))
        self.buffer_bytes -= self.buffer_bytes % 64
        self._stop = threading.Event()
        self._free: queue.Queue = queue.Queue()
        self._full: queue.Queue = queue.Queue()
        pin = device.type == "cuda"
        for _ in range(2):
            self._free.put([torch.empty(self.buffer_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(width)])
        out_bytes = max((min(e.numel, self.buffer_bytes // e.input_dtype.itemsize) * e.dtype.itemsize for e in plan.entries), default=0)
        self._out = torch.empty(max(out_bytes, 64), dtype=torch.uint8, pin_memory=pin)
        self._acc: dict[torch.dtype, torch.Tensor] = {}
        self.bytes_read = 0

    def chunks(self) -> list[Chunk]:
        """The work, in output order; alias entries have no chunks (their bytes are repeated)."""
        work = []
        for entry in self.plan.entries:
            if entry.alias_of is not None:
                continue
            per_chunk = max(1, self.buffer_bytes // entry.input_dtype.itemsize)
            starts = list(range(0, entry.numel, per_chunk)) or [0]
            for i, start in enumerate(starts):
                work.append(Chunk(entry, start, min(per_chunk, entry.numel - start), i == len(starts) - 1))
        return work

    def _active(self, entry: PlanEntry) -> list[tuple[int, float]]:
        if entry.weights is None:
            return [(len(entry.sources) - 1, 1.0)]
        return [(i, w) for i, w in enumerate(entry.weights) if w != 0]

    def _read_ahead(self, work: list[Chunk]) -> None:
        try:
            for chunk in work:
                buffers = self._free.get()
                if buffers is None or self._stop.is_set():
                    return
                itemsize = chunk.entry.input_dtype.itemsize
                for buffer, (i, _) in zip(buffers, self._active(chunk.entry)):
                    source = chunk.entry.sources[i]
                    source.read_into(chunk.start * itemsize, buffer[: chunk.count * itemsize])
                    if chunk.last:
                        source.release()
                self._full.put((chunk, buffers))
        except BaseException as e:  # handed to the main thread, which raises it
            self._full.put(_Failure(e))

    def run(self, writer: SafetensorsWriter, on_progress: ProgressFn | None = None) -> None:
        work = self.chunks()
        reader = threading.Thread(target=self._read_ahead, args=(work,), daemon=True, name="ckptavg-read")
        reader.start()
        total = self.plan.read_bytes
        pending = iter(work)
        try:
            for entry in self.plan.entries:
                if entry.alias_of is not None:
                    writer.repeat(entry.alias_of)
                    continue
                while True:
                    item = self._full.get()
                    if isinstance(item, _Failure):
                        raise item.error
                    chunk, buffers = item
                    assert chunk is next(pending)
                    self._reduce(chunk, buffers, writer)
                    self.bytes_read += chunk.count * entry.input_dtype.itemsize * len(self._active(entry))
                    self._free.put(buffers)
                    if on_progress:
                        on_progress(self.bytes_read, total, entry.name)
                    if chunk.last:
                        break
        finally:
            self._stop.set()
            self._free.put(None)
            reader.join(timeout=5)

    def _accumulator(self, dtype: torch.dtype, count: int) -> torch.Tensor:
        block = count if self.device.type == "cuda" else max(1024, CACHE_BLOCK_BYTES // dtype.itemsize)
        acc = self._acc.get(dtype)
        if acc is None or acc.numel() < block:
            acc = self._acc[dtype] = torch.empty(block, dtype=dtype, device=self.device)
        return acc[:block]

    def _reduce(self, chunk: Chunk, buffers: list[torch.Tensor], writer: SafetensorsWriter) -> None:
        entry = chunk.entry
        in_bytes = chunk.count * entry.input_dtype.itemsize
        active = self._active(entry)
        views = [buf[:in_bytes].view(entry.input_dtype) for buf in buffers[: len(active)]]
        if entry.weights is None:
            writer.write(tensor_buffer(buffers[0][:in_bytes]))
            return
        out_bytes = chunk.count * entry.dtype.itemsize
        out = self._out[:out_bytes].view(entry.dtype)
        assert entry.accum_dtype is not None
        if self.device.type == "cuda":
            gpu_inputs = [v.to(self.device, non_blocking=True) for v in views]
            gpu_out = torch.empty(chunk.count, dtype=entry.dtype, device=self.device)
            fold(gpu_inputs, [w for _, w in active], entry.divisor, self._accumulator(entry.accum_dtype, chunk.count), gpu_out)
            out.copy_(gpu_out, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        else:
            fold(views, [w for _, w in active], entry.divisor, self._accumulator(entry.accum_dtype, chunk.count), out)
        if not bool(_finite(out).all()):
            self._explain_nonfinite(chunk, views, active)
        writer.write(tensor_buffer(self._out[:out_bytes]))

    def _explain_nonfinite(self, chunk: Chunk, views: list[torch.Tensor], active: list[tuple[int, float]]) -> None:
        entry = chunk.entry
        for view, (i, _) in zip(views, active):
            bad = ~_finite(view)
            if bool(bad.any()):
                first = chunk.start + int(bad.nonzero()[0, 0])
                value = float(view[first - chunk.start].float())
                source = entry.sources[i]
                raise NonFiniteError(source.path, f"tensor {entry.name} holds {value} (element {first}); NaN/Inf weights cannot be averaged")
        raise CkptavgError(None, f"the average of tensor {entry.name} overflows {dtype_name(entry.dtype)}; choose a wider --dtype")
