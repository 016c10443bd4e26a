"""The streaming engine: executes a plan chunk by chunk, on three threads.

A reader thread stages the next chunk of every input while the main thread folds the current one into the
accumulator, and a writer thread appends finished chunks to the output. On the CPU a staged chunk is a
read-only file mapping, populated by the reader thread and folded without a copy; for CUDA it is a pinned
buffer filled with pread, ready for an asynchronous host-to-device copy. At most two chunks per input are
staged at once, so memory is bounded whatever the model size or the number of inputs. Each chunk is folded
block by block so that the accumulator stays in the CPU cache.
"""

from __future__ import annotations

import math
import mmap
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ckptavg.errors import CkptavgError, NonFiniteError, OutputError
from ckptavg.formats.base import dtype_name, tensor_buffer
from ckptavg.formats.writer import TensorWriter
from ckptavg.merge.plan import Plan, PlanEntry

CACHE_BLOCK_BYTES = 1 << 20
DEFAULT_STAGING_BYTES = 256 << 20
MIN_BUFFER_BYTES = 256 << 10
MAX_BUFFER_BYTES = 32 << 20


@dataclass(frozen=True)
class Progress:
    bytes_done: int
    bytes_total: int
    tensors_done: int
    tensors_total: int
    tensor: str


ProgressFn = Callable[[Progress], None]


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


def all_finite(t: torch.Tensor, block: int = 1 << 20) -> bool:
    """True when no element is NaN or Inf: a fast sum per block (NaN and Inf survive a sum), and an exact
    check only where that sum is not finite. Blocks keep the sum's upcast copy small."""
    for start in range(0, t.numel(), block):
        part = t[start : start + block]
        if part.dtype.itemsize == 1:
            part = part.float()
        if not math.isfinite(float(part.sum())) and not bool(torch.isfinite(part).all()):
            return False
    return True


@dataclass
class Chunk:
    entry: PlanEntry
    start: int  # first element
    count: int  # elements
    last: bool


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_STOP = object()


@dataclass
class Staged:
    """One chunk's input bytes, one uint8 tensor per active input, and what to give back once folded."""

    chunk: Chunk
    inputs: list[torch.Tensor]
    mappings: list[mmap.mmap]
    token: object

    def release(self) -> object:
        self.inputs.clear()
        for mapping in self.mappings:
            try:
                mapping.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes when it does
                pass
        return self.token


class Engine:
    """Runs a plan into a writer on one device ('cpu' or a CUDA device)."""

    def __init__(self, plan: Plan, device: torch.device, staging_bytes: int = DEFAULT_STAGING_BYTES, use_mmap: bool = True) -> None:
        """`use_mmap=False` reads inputs with pread into staging buffers, as for CUDA: for filesystems where a
        mapping is unwelcome (a network filesystem whose files may change underneath, which would SIGBUS)."""
        self.plan = plan
        self.device = device
        width = max(1, sum(1 for w in plan.weights.scales if w != 0))
        self.buffer_bytes = max(MIN_BUFFER_BYTES, min(MAX_BUFFER_BYTES, staging_bytes // (2 * width)))
        self.buffer_bytes -= self.buffer_bytes % 64
        pin = device.type == "cuda"
        copy = pin or not use_mmap
        self._stop = threading.Event()
        self._tokens: queue.Queue = queue.Queue()  # two staging slots: buffers to read into, or () to map
        self._staged: queue.Queue = queue.Queue()
        for _ in range(2):
            self._tokens.put([torch.empty(self.buffer_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(width)] if copy else ())
        out_bytes = max((min(e.numel, self._per_chunk(e)) * e.dtype.itemsize for e in plan.entries), default=0)
        self._out_free: queue.Queue = queue.Queue()
        for _ in range(2):
            self._out_free.put(torch.empty(max(out_bytes, 64), dtype=torch.uint8, pin_memory=pin))
        self._to_write: queue.Queue = queue.Queue()
        self._write_error: BaseException | None = None
        self._acc: dict[tuple[torch.dtype, int], torch.Tensor] = {}
        # On the CPU each chunk is split between fold workers running single-threaded torch ops: with the
        # reader and writer threads also busy, torch's own intra-op threads would wait on each other at
        # every op, while independent workers only meet once per chunk.
        self.workers = 1 if device.type == "cuda" else max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None
        self.bytes_read = 0

    def _per_chunk(self, entry: PlanEntry) -> int:
        return max(1, self.buffer_bytes // entry.input_dtype.itemsize)

    def chunks(self) -> list[Chunk]:
        """The work, in output order; alias entries have no chunks (their bytes are repeated)."""
        work = []
        for entry in self.plan.entries:
            if entry.alias_of is not None:
                continue
            per_chunk = self._per_chunk(entry)
            starts = list(range(0, entry.numel, per_chunk)) or [0]
            for i, start in enumerate(starts):
                work.append(Chunk(entry, start, min(per_chunk, entry.numel - start), i == len(starts) - 1))
        return work

    @staticmethod
    def _active(entry: PlanEntry) -> list[tuple[int, float]]:
        if entry.weights is None:
            return [(len(entry.sources) - 1, 1.0)]
        return [(i, w) for i, w in enumerate(entry.weights) if w != 0]

    def _stage(self, chunk: Chunk, token: object) -> Staged:
        itemsize = chunk.entry.input_dtype.itemsize
        start, length = chunk.start * itemsize, chunk.count * itemsize
        staged = Staged(chunk, [], [], token)
        for k, (i, _) in enumerate(self._active(chunk.entry)):
            source = chunk.entry.sources[i]
            if token:
                buffer = token[k][:length]
                source.read_into(start, buffer)
                staged.inputs.append(buffer)
            else:
                view, mapping = source.view_range(start, length)
                staged.inputs.append(view)
                if mapping is not None:
                    staged.mappings.append(mapping)
            if chunk.last:
                source.release()
        return staged

    def _read_ahead(self, work: list[Chunk]) -> None:
        try:
            for chunk in work:
                token = self._tokens.get()
                if token is _STOP or self._stop.is_set():
                    return
                self._staged.put(self._stage(chunk, token))
        except BaseException as e:  # handed to the main thread, which raises it
            self._staged.put(_Failure(e))

    def _write_behind(self, writer: TensorWriter) -> None:
        while True:
            item = self._to_write.get()
            if item is None:
                return
            kind, payload, nbytes = item
            try:
                if self._write_error is None:
                    if kind == "repeat":
                        writer.repeat(payload)
                    else:
                        writer.write(tensor_buffer(payload[:nbytes]))
            except OSError as e:  # the main thread raises it at its next chunk
                self._write_error = OutputError(e.filename or writer.paths[0].parent, f"cannot write: {e.strerror or e}")
            except BaseException as e:
                self._write_error = e
            if kind == "data":
                self._out_free.put(payload)

    def run(self, writer: TensorWriter, on_progress: ProgressFn | None = None) -> None:
        """Execute the plan into `writer`; returns once every byte has been handed to it."""
        work = self.chunks()
        threads = [
            threading.Thread(target=self._read_ahead, args=(work,), daemon=True, name="ckptavg-read"),
            threading.Thread(target=self._write_behind, args=(writer,), daemon=True, name="ckptavg-write"),
        ]
        for thread in threads:
            thread.start()
        total_bytes, total_tensors = self.plan.read_bytes, len(self.plan.entries)
        torch_threads = torch.get_num_threads()
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ckptavg-fold")
            torch.set_num_threads(1)
        try:
            for done, entry in enumerate(self.plan.entries, 1):
                if entry.alias_of is not None:
                    self._to_write.put(("repeat", entry.alias_of, 0))
                    continue
                last = False
                while not last:
                    staged = self._staged.get()
                    if isinstance(staged, _Failure):
                        raise staged.error
                    chunk = staged.chunk
                    assert chunk.entry is entry
                    out = self._out_free.get()
                    if self._write_error is not None:
                        raise self._write_error
                    nbytes = self._reduce(chunk, staged.inputs, out)
                    self._to_write.put(("data", out, nbytes))
                    self._tokens.put(staged.release())
                    self.bytes_read += chunk.count * entry.input_dtype.itemsize * len(self._active(entry))
                    last = chunk.last
                    if on_progress:
                        on_progress(Progress(self.bytes_read, total_bytes, done - (not last), total_tensors, entry.name))
            self._to_write.put(None)
            threads[1].join()
            if self._write_error is not None:
                raise self._write_error
        finally:
            self._stop.set()
            self._tokens.put(_STOP)
            self._to_write.put(None)
            for thread in threads:
                thread.join(timeout=10)
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
                torch.set_num_threads(torch_threads)

    def _accumulator(self, dtype: torch.dtype, count: int, worker: int = 0) -> torch.Tensor:
        block = count if self.device.type == "cuda" else max(1024, CACHE_BLOCK_BYTES // dtype.itemsize)
        acc = self._acc.get((dtype, worker))
        if acc is None or acc.numel() < block:
            acc = self._acc[(dtype, worker)] = torch.empty(block, dtype=dtype, device=self.device)
        return acc[:block]

    def _fold_part(self, views: list[torch.Tensor], entry: PlanEntry, weights: list[float], out: torch.Tensor, worker: int, lo: int, hi: int) -> bool:
        assert entry.accum_dtype is not None
        part = out[lo:hi]
        fold([v[lo:hi] for v in views], weights, entry.divisor, self._accumulator(entry.accum_dtype, hi - lo, worker), part)
        return all_finite(part)

    def _fold_on_cpu(self, views: list[torch.Tensor], entry: PlanEntry, weights: list[float], out: torch.Tensor) -> bool:
        """Fold into out, split between the workers; True when every output element is finite."""
        count = out.numel()
        if self._pool is None or count < (1 << 16):
            return self._fold_part(views, entry, weights, out, 0, 0, count)
        step = -(-count // self.workers)
        step += -step % 64
        futures = [
            self._pool.submit(self._fold_part, views, entry, weights, out, worker, lo, min(count, lo + step))
            for worker, lo in enumerate(range(0, count, step))
        ]
        return all([f.result() for f in futures])

    def _reduce(self, chunk: Chunk, inputs: list[torch.Tensor], out_buffer: torch.Tensor) -> int:
        """Fold one chunk (uint8 views of each active input) into out_buffer; returns its byte count."""
        entry = chunk.entry
        in_bytes = chunk.count * entry.input_dtype.itemsize
        if entry.weights is None:
            out_buffer[:in_bytes].copy_(inputs[0])
            return in_bytes
        active = self._active(entry)
        weights = [w for _, w in active]
        views = [raw.view(entry.input_dtype) for raw in inputs]
        out_bytes = chunk.count * entry.dtype.itemsize
        out = out_buffer[:out_bytes].view(entry.dtype)
        assert entry.accum_dtype is not None
        if self.device.type == "cuda":
            gpu_inputs = [v.to(self.device, non_blocking=True) for v in views]
            gpu_out = torch.empty(chunk.count, dtype=entry.dtype, device=self.device)
            fold(gpu_inputs, weights, entry.divisor, self._accumulator(entry.accum_dtype, chunk.count), gpu_out)
            out.copy_(gpu_out, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            finite = all_finite(out)
        else:
            finite = self._fold_on_cpu(views, entry, weights, out)
        if not finite:
            self._explain_nonfinite(chunk, views, active)
        return out_bytes

    def _explain_nonfinite(self, chunk: Chunk, views: list[torch.Tensor], active: list[tuple[int, float]]) -> None:
        entry = chunk.entry
        for view, (i, _) in zip(views, active):
            bad = ~torch.isfinite(view.float() if view.dtype.itemsize == 1 else view)
            if bool(bad.any()):
                first = chunk.start + int(bad.nonzero()[0, 0])
                value = float(view[first - chunk.start].float())
                raise NonFiniteError(entry.sources[i].path, f"tensor {entry.name} holds {value} (element {first}); NaN/Inf weights cannot be averaged")
        raise CkptavgError(None, f"the average of tensor {entry.name} overflows {dtype_name(entry.dtype)}; choose a wider --dtype")
