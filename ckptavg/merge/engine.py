"""The streaming engine: executes a plan chunk by chunk within a memory budget.

On the CPU every chunk of an output tensor is split between fold workers (one per core). A worker walks its
slice in cache-sized blocks: it preads the block of every input into small buffers of its own, folds them
into one FP32 (or FP64) block while they are still in the CPU cache, rounds the block into the output chunk
and checks it is finite. Each worker reads its files sequentially, so the kernel's readahead keeps a cold
disk busy (asking for more with posix_fadvise WILLNEED measured slower: docs/benchmarks.md). A writer
thread appends finished output chunks to the output file while the next chunks are folded. Memory is the
budget's buffers, whatever the model size or the number of inputs.

On a CUDA device a reader thread preads whole chunks into double-buffered pinned memory; they are copied
to the device on a side stream while the previous chunk is folded, and the result is copied back on a
third stream while the next chunk is folded. The per-element arithmetic is the same `fold` in the same
input order, so both devices produce the same bits for the same accumulation dtype.

One pass can make several outputs (`ckptavg sweep`): given K plans over the same inputs (one per candidate
weighting), each chunk of every input any of them reads is read once and folded K times, each candidate's
fold over its own inputs in its own order, into its own output chunk and writer. A candidate's bytes are
therefore those a run of its plan alone writes. K = 1 is `average`. Uniform means are summed newest first,
so the means of nested windows of the newest inputs (`last:2,4,8`) are made from one running sum
(`fold_nested`), each window's sum the start of the next's, with the same operations as each alone.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ckptavg.errors import CkptavgError, NonFiniteError, OutputError, UsageError, option
from ckptavg.formats.base import FILES, TensorSource, read_exact, tensor_buffer
from ckptavg.formats.dtypes import dtype_name
from ckptavg.formats.writer import DIRECT_ALIGN, TensorWriter
from ckptavg.merge.plan import Plan, PlanEntry
from ckptavg.progress import Progress, ProgressFn
from ckptavg.sizes import format_size

CPU_MEMORY_BUDGET = 64 << 20
CUDA_MEMORY_BUDGET = 512 << 20
CACHE_BLOCK_ELEMENTS = 1 << 18  # a 1 MiB FP32 accumulator block: it and the inputs' blocks stay in L2/L3
MIN_BLOCK_ELEMENTS = 1 << 12
MAX_CHUNK_BYTES = 64 << 20
OUTPUT_SLOTS = 3
WRITE_THREADS = 2  # with several outputs (a sweep), two threads write them: a disk takes two streams faster than one


def fold(inputs: list[torch.Tensor], weights: list[float], divisor: float, acc: torch.Tensor, out: torch.Tensor) -> None:
    """out = sum_i weights[i] * inputs[i] / divisor, accumulated in acc.dtype, rounded once to out.dtype: in input
    order, or newest first for a uniform sum (every weight 1; see fold_nested).

    `acc` is a 1-D buffer whose length sets the block: small enough to stay in cache on a CPU, the whole
    chunk on a GPU. The arithmetic per element is the same either way, so CPU and CUDA agree.
    """
    n = out.numel()
    block = acc.numel()
    for start in range(0, n, block):
        stop = min(n, start + block)
        fold_block([x[start:stop] for x in inputs], weights, divisor, acc[: stop - start], out[start:stop])


def fold_block(inputs: list[torch.Tensor], weights: list[float], divisor: float, acc: torch.Tensor, out: torch.Tensor) -> None:
    """fold() for inputs, accumulator and output of the same length."""
    if all(w == 1 for w in weights):
        fold_nested(inputs, [len(inputs)], [divisor], acc, [out])
        return
    acc.copy_(inputs[0])
    if weights[0] != 1:
        acc.mul_(weights[0])
    scratch = torch.empty_like(acc) if inputs[0].dtype.itemsize == 1 else None
    for x, w in zip(inputs[1:], weights[1:]):
        _add(acc, x, w, scratch)
    _round(acc, divisor, out)


def fold_nested(
    inputs: list[torch.Tensor], windows: list[int], divisors: list[float], acc: torch.Tensor, outs: list[torch.Tensor]
) -> None:
    """outs[k] = the sum of the newest windows[k] of `inputs` (oldest first) / divisors[k], for windows in
    increasing order, from one running sum taken newest first: each window's sum is where the next one's
    starts. A window alone (fold_block of a uniform sum) takes the same steps, so the bits are the same; a
    sweep of last:2,4,8 adds each input block once instead of 2 + 4 + 8 times."""
    acc.copy_(inputs[-1])
    scratch = torch.empty_like(acc) if inputs[0].dtype.itemsize == 1 else None
    added = 1
    for window, divisor, out in zip(windows, divisors, outs):
        for x in reversed(inputs[len(inputs) - window : len(inputs) - added]):
            _add(acc, x, 1.0, scratch)
        added = window
        _round(acc, divisor, out)


def _add(acc: torch.Tensor, x: torch.Tensor, w: float, scratch: torch.Tensor | None) -> None:
    """acc += w * x; float8 does not promote in mixed-dtype arithmetic, so it is widened into `scratch` first."""
    acc.add_(x if scratch is None else scratch.copy_(x), alpha=w)


def _round(acc: torch.Tensor, divisor: float, out: torch.Tensor) -> None:
    """out = acc / divisor, computed in acc's dtype and rounded once to out's; acc is left as it was."""
    if divisor != 1:
        torch.div(acc, divisor, out=out)
    else:
        out.copy_(acc)


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


def active_inputs(entry: PlanEntry) -> list[tuple[int, float]]:
    """(input index, weight) of the inputs an entry reads: all with a non-zero weight, or the newest for a copy."""
    if entry.weights is None:
        return [(len(entry.sources) - 1, 1.0)]
    return [(i, w) for i, w in enumerate(entry.weights) if w != 0]


@dataclass
class Row:
    """One output tensor of each of K plans: their entries (the same name and length), the sources any of
    them reads, each once, in the order first used, and for each plan the sources it folds (`picks`, indices
    into `sources` in its own input order) with their weights."""

    entries: list[PlanEntry]
    sources: list[TensorSource]
    picks: list[list[int]]
    weights: list[list[float]]

    @property
    def entry(self) -> PlanEntry:
        return self.entries[0]

    @property
    def copied(self) -> bool:
        return self.entry.weights is None

    @property
    def uniform(self) -> list[bool]:
        """For each plan, whether it is a uniform sum (every weight 1), which fold_block sums newest first."""
        return [all(w == 1 for w in weights) for weights in self.weights]

    @property
    def read_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources)


def rows_of(plans: Sequence[Plan]) -> list[Row]:
    """The plans' entries side by side, each source they share named once; a ValueError when the plans do not
    list the same tensors in the same order (`plans_differ` says why, for the caller that checks first)."""
    if problem := plans_differ(plans):
        raise ValueError(problem)
    rows = []
    for entries in zip(*(p.entries for p in plans)):
        sources: list[TensorSource] = []
        index: dict[int, int] = {}
        picks, weights = [], []
        for entry in entries:
            picked = []
            for i, _ in active_inputs(entry):
                source = entry.sources[i]
                if id(source) not in index:
                    index[id(source)] = len(sources)
                    sources.append(source)
                picked.append(index[id(source)])
            picks.append(picked)
            weights.append([w for _, w in active_inputs(entry)])
        rows.append(Row(list(entries), sources, picks, weights))
    return rows


def fold_groups(row: Row) -> list[list[int]]:
    """The row's plans, as groups folded together: each uniform sum whose inputs are the newest of a longer
    uniform sum's, in the same accumulator dtype, joins that one's chain (fold_nested, shortest window
    first); every other plan is a group of its own."""
    uniform = sorted((k for k, u in enumerate(row.uniform) if u), key=lambda k: len(row.picks[k]))
    chains: list[list[int]] = []
    for k in uniform:
        for chain in chains:
            shorter = row.picks[chain[-1]]
            same_dtype = row.entries[chain[-1]].accum_dtype == row.entries[k].accum_dtype
            if same_dtype and row.picks[k][len(row.picks[k]) - len(shorter) :] == shorter:
                chain.append(k)
                break
        else:
            chains.append([k])
    return chains + [[k] for k, u in enumerate(row.uniform) if not u]


def pass_read_bytes(rows: list[Row]) -> int:
    """The bytes one pass over `rows` reads: each input tensor once, however many outputs fold it."""
    return sum(r.read_bytes for r in rows if r.entry.alias_of is None)


def plans_differ(plans: Sequence[Plan]) -> str | None:
    """Why these plans cannot be run in one pass (None when they can): each must list the same output tensors in
    the same order, each of the same length and input dtype, copied or folded, tied alike (their output and
    accumulator dtypes may differ)."""
    first = plans[0]
    for plan in plans[1:]:
        if len(plan.entries) != len(first.entries):
            return f"{len(plan.entries)} output tensors, the first plan has {len(first.entries)}"
        for a, b in zip(first.entries, plan.entries):
            if (a.name, a.numel, a.input_dtype, a.alias_of, a.weights is None) != (
                b.name,
                b.numel,
                b.input_dtype,
                b.alias_of,
                b.weights is None,
            ):
                return f"tensor {b.name} (in plan order) differs from the first plan's {a.name} in length, dtype, copy or tie"
    return None


@dataclass
class Chunk:
    row: Row
    start: int  # first element
    count: int  # elements
    last: bool

    @property
    def entry(self) -> PlanEntry:
        return self.row.entry

    @property
    def sources(self) -> list[TensorSource]:
        return self.row.sources

    @property
    def input_bytes(self) -> int:
        return self.count * self.entry.input_dtype.itemsize * len(self.row.sources)


@dataclass(frozen=True)
class Sizes:
    """How a memory budget is spent: output chunks in flight, and per-worker input blocks (CPU) or
    double-buffered pinned input chunks (CUDA).

    With K outputs (a sweep's candidates) every chunk in flight is K output chunks, so the chunk is K times
    smaller and the total stays within the budget whatever K. On a CPU the input blocks and the accumulator
    are not multiplied: a worker folds its blocks into the K outputs one after another, reusing one
    accumulator block, while the blocks are still in its cache. The inputs counted are the distinct ones
    any output reads (each read once)."""

    chunk_bytes: int  # bytes of one output chunk (and, on CUDA, of one input's staging buffer)
    block_elements: int  # elements folded at once by a CPU worker

    @staticmethod
    def for_plan(plan: Plan, budget: int, workers: int, cuda: bool) -> Sizes:
        return Sizes.for_rows(rows_of([plan]), budget, workers, cuda)

    @staticmethod
    def for_rows(rows: list[Row], budget: int, workers: int, cuda: bool) -> Sizes:
        outputs = len(rows[0].entries) if rows else 1
        made = [r for r in rows if r.entry.alias_of is None]
        folded = [r for r in made if not r.copied]
        width = max([len(r.sources) for r in made] or [1])
        in_size = max([r.entry.input_dtype.itemsize for r in rows] or [1])
        acc_size = max([e.accum_dtype.itemsize for r in folded for e in r.entries if e.accum_dtype is not None] or [4])
        slots = OUTPUT_SLOTS * outputs
        if cuda:
            chunk = budget // (slots + 2 * width)
            if chunk < MIN_BLOCK_ELEMENTS * in_size:
                raise _too_small(budget, (slots + 2 * width) * MIN_BLOCK_ELEMENTS * in_size, width, outputs)
            return Sizes(_align(min(chunk, MAX_CHUNK_BYTES)), 0)
        # Each worker's input blocks, accumulator and scratch come first (their size sets the fold's speed),
        # up to a cache-sized block; output chunks in flight get the rest.
        per_element = workers * (width * in_size + 2 * acc_size)
        block = min(CACHE_BLOCK_ELEMENTS, budget // 2 // per_element)
        chunk = (budget - block * per_element) // slots
        if block < MIN_BLOCK_ELEMENTS or chunk < MIN_BLOCK_ELEMENTS * 8:
            raise _too_small(budget, MIN_BLOCK_ELEMENTS * (per_element + 8 * slots) * 2, width, outputs)
        chunk = _align(min(MAX_CHUNK_BYTES, chunk))
        return Sizes(chunk, block - block % 64)


def _align(n: int) -> int:
    """A chunk size: a whole number of 4 KiB pages when there is room for one, so that chunks written one after
    another stay on the blocks a DirectFile writes without copying; else of 64 bytes."""
    unit = DIRECT_ALIGN if n >= DIRECT_ALIGN else 64
    return max(64, n - n % unit)


def _page_aligned(nbytes: int, pinned: bool) -> torch.Tensor:
    """An output chunk buffer whose first byte starts a page: O_DIRECT writes it as it is."""
    raw = torch.empty(nbytes + DIRECT_ALIGN, dtype=torch.uint8, pin_memory=pinned)
    skip = -raw.data_ptr() % DIRECT_ALIGN
    return raw[skip : skip + nbytes]


def _too_small(budget: int, needed: int, width: int, outputs: int = 1) -> UsageError:
    outputs_text = f" and {outputs} outputs" if outputs > 1 else ""
    return UsageError(
        None,
        (
            f"{option('memory_budget', format_size(budget))} is too small for {width} inputs{outputs_text}; it needs at least "
            f"{math.ceil(needed / 2**20)}MiB"
        ),
    )


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Engine:
    """Runs a plan into a writer on one device ('cpu' or a CUDA device) within `memory_budget` bytes of buffers.

    Given several plans over the same inputs (one per candidate of a sweep), it runs them in one pass into as
    many writers: each input chunk is read once (see `rows_of`). `staged=True` runs the CUDA pipeline's reader
    thread and staging buffers on the CPU too (tests use it to cover that path on machines without a GPU).
    """

    def __init__(
        self,
        plan: Plan | Sequence[Plan],
        device: torch.device,
        memory_budget: int | None = None,
        staged: bool = False,
        workers: int | None = None,
    ) -> None:
        """`workers`: CPU fold workers (default: torch's thread count, at most the cores)."""
        self.plans = [plan] if isinstance(plan, Plan) else list(plan)
        self.plan = self.plans[0]
        self.rows = rows_of(self.plans)
        self.outputs = len(self.plans)
        self.device = device
        self.cuda = device.type == "cuda"
        self.staged = staged or self.cuda
        self.workers = 1 if self.staged else max(1, workers or min(torch.get_num_threads(), os.cpu_count() or 1))
        budget = memory_budget or (CUDA_MEMORY_BUDGET if self.cuda else CPU_MEMORY_BUDGET)
        self.sizes = Sizes.for_rows(self.rows, budget, self.workers, self.staged)
        self._block_bytes = self.sizes.block_elements * max([r.entry.input_dtype.itemsize for r in self.rows] or [1])
        self.read_bytes = pass_read_bytes(self.rows)  # what run() reads
        self.bytes_read = 0
        self._stop = threading.Event()
        self._out_free: queue.Queue = queue.Queue()
        # One queue per writing thread; each thread writes the outputs k with k % threads == its index.
        self._to_write = [queue.Queue() for _ in range(min(WRITE_THREADS, self.outputs))]
        self._pending_writes: dict[int, int] = {}  # a handed-over chunk's id -> the threads yet to write it
        self._pending_lock = threading.Lock()
        self._write_error: BaseException | None = None
        self._local = threading.local()  # each CPU worker's input blocks and accumulator
        self._acc: dict[torch.dtype, torch.Tensor] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._slots: queue.Queue = queue.Queue()  # staged pipeline: free pinned chunk buffers, one per input
        self._staged: queue.Queue = queue.Queue()

    def chunks(self) -> list[Chunk]:
        """The work, in output order; alias entries have no chunks (their bytes are repeated)."""
        work = []
        for row in self.rows:
            if row.entry.alias_of is None:
                itemsize = max([e.dtype.itemsize for e in row.entries] + [row.entry.input_dtype.itemsize])
                per_chunk = max(1, self.sizes.chunk_bytes // itemsize)
                numel = row.entry.numel
                starts = list(range(0, numel, per_chunk)) or [0]
                for i, start in enumerate(starts):
                    work.append(Chunk(row, start, min(per_chunk, numel - start), i == len(starts) - 1))
        return work

    def run(self, writer: TensorWriter | Sequence[TensorWriter], on_progress: ProgressFn | None = None) -> None:
        """Execute the plan(s) into `writer` (one per plan); returns once every byte has been handed to them."""
        writers = list(writer) if isinstance(writer, (list, tuple)) else [writer]
        if len(writers) != self.outputs:
            raise ValueError(f"{len(writers)} writers for {self.outputs} plans")
        work = self.chunks()
        for _ in range(OUTPUT_SLOTS):
            self._out_free.put([_page_aligned(self.sizes.chunk_bytes, self.cuda) for _ in range(self.outputs)])
        writer_threads = [
            threading.Thread(target=self._write_behind, args=(writers, t), daemon=True, name=f"ckptavg-write-{t}")
            for t in range(len(self._to_write))
        ]
        reader_thread = threading.Thread(target=self._read_ahead, args=(work,), daemon=True, name="ckptavg-read")
        torch_threads = torch.get_num_threads()
        if self.workers > 1:
            # Each worker runs single-threaded torch ops: with the reader and writer threads also
            # busy, torch's intra-op threads would wait on each other at every op.
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ckptavg-fold")
            torch.set_num_threads(1)
        try:
            for thread in writer_threads:
                thread.start()
            if self.staged:
                self._start_staging(work)
                reader_thread.start()
            chunks = iter(work)
            pending: tuple | None = None  # the previous chunk, still being folded (CPU) or copied back (CUDA)
            for done, row in enumerate(self.rows, 1):
                entry = row.entry
                if entry.alias_of is not None:
                    if pending is not None:
                        self._hand_over(*pending)
                        pending = None
                    self._put_write(("repeat", [e.alias_of for e in row.entries], None))
                    continue
                last = False
                while not last:
                    chunk = next(chunks)
                    outs = self._out_free.get()
                    if self._write_error is not None:
                        raise self._write_error
                    current = self._reduce_staged(chunk, outs) if self.staged else self._submit_on_cpu(chunk, outs)
                    if pending is not None:
                        self._hand_over(*pending)
                    pending = current
                    self.bytes_read += chunk.input_bytes
                    last = chunk.last
                    if on_progress:
                        on_progress(Progress(self.bytes_read, self.read_bytes, done - (not last), len(self.rows), entry.name))
            if pending is not None:
                self._hand_over(*pending)
            self._put_write(None)
            for thread in writer_threads:
                thread.join()
            if self._write_error is not None:
                raise self._write_error
        finally:
            self._stop.set()
            self._slots.put(None)
            self._put_write(None)
            for thread in (*writer_threads, reader_thread):
                if thread.is_alive():
                    thread.join(timeout=10)
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
                torch.set_num_threads(torch_threads)

    def _hand_over(self, chunk: Chunk, outs: list[torch.Tensor], finite: Callable[[], list[bool]], copied_back: object) -> None:
        """Give a chunk's finished outputs to the writer thread, once they are on the host and known to be finite."""
        if copied_back is not None:
            copied_back.synchronize()  # type: ignore[attr-defined]
        for k, ok in enumerate(finite()):
            if not ok:
                self._explain_nonfinite(chunk, k)
        self._put_write(("data", outs, [chunk.count * e.dtype.itemsize for e in chunk.row.entries]))
        if chunk.last:
            for source in chunk.sources:
                source.release()

    def _put_write(self, item: tuple | None) -> None:
        """Hand an item to every writing thread (None: no more)."""
        if item is not None and item[0] == "data":
            with self._pending_lock:
                self._pending_writes[id(item)] = len(self._to_write)
        for waiting in self._to_write:
            waiting.put(item)

    def _write_behind(self, writers: list[TensorWriter], thread: int) -> None:
        """Writing thread `thread`: its share of the outputs, chunk after chunk; the last thread done with a chunk's
        output buffers frees them for the next chunk."""
        mine = list(enumerate(writers))[thread :: len(self._to_write)]
        while True:
            item = self._to_write[thread].get()
            if item is None:
                return
            kind, payload, nbytes = item
            for k, writer in mine:
                try:
                    if self._write_error is None:
                        if kind == "repeat":
                            writer.repeat(payload[k])
                        else:
                            writer.write(tensor_buffer(payload[k][: nbytes[k]]))
                except OSError as e:  # the main thread raises it at its next chunk
                    self._write_error = OutputError(e.filename or writer.paths[0].parent, f"cannot write: {e.strerror or e}")
                except BaseException as e:
                    self._write_error = e
            if kind == "data":
                with self._pending_lock:
                    self._pending_writes[id(item)] -= 1
                    done = self._pending_writes[id(item)] == 0
                    if done:
                        del self._pending_writes[id(item)]
                if done:
                    self._out_free.put(payload)

    # The CPU pipeline: workers read and fold block by block.

    def _submit_on_cpu(self, chunk: Chunk, outs: list[torch.Tensor]) -> tuple:
        """Start folding one chunk into `outs` (one buffer per plan): pieces of it go to the workers, a few per
        worker so that one slowed down by the writer's thread does not leave the others idle. Returns what
        _hand_over needs."""
        for source in chunk.sources:
            source.prepare()  # a strided source is made contiguous once, here, not by two workers at once
        count = chunk.count
        if self._pool is None:
            finite = self._fold_slice(chunk, outs, 0, count)
            return chunk, outs, lambda: finite, None
        step = max(self.sizes.block_elements, -(-count // (4 * self.workers)))
        step += -step % 64
        futures = [self._pool.submit(self._fold_slice, chunk, outs, lo, min(count, lo + step)) for lo in range(0, count, step)]

        def finite() -> list[bool]:
            results = [f.result() for f in futures]
            return [all(r[k] for r in results) for k in range(len(outs))]

        return chunk, outs, finite, None

    def _fold_slice(self, chunk: Chunk, outs: list[torch.Tensor], lo: int, hi: int) -> list[bool]:
        """Read elements [lo, hi) of a chunk's inputs block by block, and fold each block into every plan's
        output; for each plan, True when its result is finite.

        This loop runs once per block and input, so it avoids per-call Python work: the descriptors, buffer
        views and accumulator are looked up once per slice, and full blocks reuse the same tensor views."""
        row = chunk.row
        itemsize = row.entry.input_dtype.itemsize
        if row.copied:
            read: dict[int, torch.Tensor] = {}
            for out_buffer, picked in zip(outs, row.picks):
                raw = out_buffer[lo * itemsize : hi * itemsize]
                if picked[0] in read:
                    raw.copy_(read[picked[0]])
                else:
                    row.sources[picked[0]].read_into((chunk.start + lo) * itemsize, raw)
                    read[picked[0]] = raw
            return [True] * len(outs)
        block = self.sizes.block_elements
        buffers, views = self._worker_views(len(row.sources), row.entry.input_dtype)
        results = [out_buffer[: chunk.count * e.dtype.itemsize].view(e.dtype) for e, out_buffer in zip(row.entries, outs)]
        folds = []
        for group in fold_groups(row):
            longest = row.picks[group[-1]]
            accum_dtype = row.entries[group[-1]].accum_dtype
            assert accum_dtype is not None
            folds.append((group, longest, [views[j] for j in longest], self._worker_accumulator(accum_dtype)))
        readers = [(source, FILES.fd(source.path) if source.contiguous else -1) for source in row.sources]
        finite = [True] * len(outs)
        for start in range(lo, hi, block):
            count = min(block, hi - start)
            at = (chunk.start + start) * itemsize
            for (source, fd), buffer in zip(readers, buffers):
                if fd >= 0:
                    read_exact(source.path, source.offset + at, buffer if count == block else buffer[: count * itemsize], fd)
                else:
                    source.read_into(at, torch.frombuffer(buffer, dtype=torch.uint8, count=count * itemsize))
            for group, picked, picked_views, acc in folds:
                inputs = picked_views if count == block else [views[j][:count] for j in picked]
                results_here = [results[k][start : start + count] for k in group]
                if len(group) > 1:  # a chain of nested windows
                    windows = [len(row.picks[k]) for k in group]
                    fold_nested(inputs, windows, [row.entries[k].divisor for k in group], acc[:count], results_here)
                else:
                    k = group[0]
                    fold_block(inputs, row.weights[k], row.entries[k].divisor, acc[:count], results_here[0])
                for k, result in zip(group, results_here):
                    finite[k] = finite[k] and all_finite(result)
        return finite

    def _worker_views(self, width: int, dtype: torch.dtype) -> tuple[list[memoryview], list[torch.Tensor]]:
        """This thread's input blocks, as byte views to read into and as tensors of `dtype` to fold: reused
        from chunk to chunk, so they stay in its core's cache."""
        local = self._local.__dict__
        tensors = local.setdefault("buffers", [])
        while len(tensors) < width:
            tensors.append(torch.empty(self._block_bytes, dtype=torch.uint8))
        key = (width, dtype)
        if key not in local.setdefault("views", {}):
            nbytes = self.sizes.block_elements * dtype.itemsize
            local["views"][key] = (
                [tensor_buffer(t[:nbytes]) for t in tensors[:width]],
                [t[:nbytes].view(dtype) for t in tensors[:width]],
            )
        return local["views"][key]

    def _worker_accumulator(self, dtype: torch.dtype) -> torch.Tensor:
        accumulators = self._local.__dict__.setdefault("accumulators", {})
        if dtype not in accumulators:
            accumulators[dtype] = torch.empty(self.sizes.block_elements, dtype=dtype)
        return accumulators[dtype]

    def _accumulator(self, dtype: torch.dtype, count: int) -> torch.Tensor:
        acc = self._acc.get(dtype)
        if acc is None or acc.numel() < count:
            acc = self._acc[dtype] = torch.empty(count, dtype=dtype, device=self.device)
        return acc[:count]

    # The staged pipeline (CUDA): a reader thread fills pinned chunks; copies overlap the fold on side streams.

    def _start_staging(self, work: list[Chunk]) -> None:
        width = max([len(c.sources) for c in work] or [1])
        for _ in range(2):
            self._slots.put([torch.empty(self.sizes.chunk_bytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(width)])
        if self.cuda:
            self._cuda = _CudaState(self.device, width, self.sizes.chunk_bytes, self.outputs)

    def _read_ahead(self, work: list[Chunk]) -> None:
        try:
            for chunk in work:
                slot = self._slots.get()
                if slot is None or self._stop.is_set():
                    return
                itemsize = chunk.entry.input_dtype.itemsize
                for source, buffer in zip(chunk.sources, slot):
                    source.prepare()
                    source.read_into(chunk.start * itemsize, buffer[: chunk.count * itemsize])
                self._staged.put((chunk, slot))
        except BaseException as e:  # handed to the main thread, which raises it
            self._staged.put(_Failure(e))

    def _reduce_staged(self, chunk: Chunk, outs: list[torch.Tensor]) -> tuple:
        """Fold one staged chunk into every plan's output; returns what _hand_over needs once the results are
        back on the host."""
        item = self._staged.get()
        if isinstance(item, _Failure):
            raise item.error
        staged_chunk, slot = item
        assert staged_chunk is chunk
        row = chunk.row
        in_bytes = chunk.count * row.entry.input_dtype.itemsize
        if row.copied:
            for out_buffer, picked in zip(outs, row.picks):
                out_buffer[:in_bytes].copy_(slot[picked[0]][:in_bytes])
            self._slots.put(slot)
            return chunk, outs, lambda: [True] * len(outs), None
        if not self.cuda:
            views = [buffer[:in_bytes].view(row.entry.input_dtype) for buffer in slot[: len(row.sources)]]
            finite = []
            for entry, out_buffer, picked, weights in zip(row.entries, outs, row.picks, row.weights):
                assert entry.accum_dtype is not None
                out = out_buffer[: chunk.count * entry.dtype.itemsize].view(entry.dtype)
                acc = self._accumulator(entry.accum_dtype, CACHE_BLOCK_ELEMENTS)
                fold([views[j] for j in picked], weights, entry.divisor, acc, out)
                finite.append(all_finite(out))
            self._slots.put(slot)
            return chunk, outs, lambda: finite, None
        cuda = self._cuda
        t = cuda.turn = cuda.turn ^ 1
        with torch.cuda.stream(cuda.to_device):
            if cuda.folded[t] is not None:
                cuda.to_device.wait_event(cuda.folded[t])  # the fold two chunks back has done with these buffers
            inputs = []
            for buffer, device_buffer in zip(slot, cuda.inputs[t]):
                device_buffer[:in_bytes].copy_(buffer[:in_bytes], non_blocking=True)
                inputs.append(device_buffer[:in_bytes].view(row.entry.input_dtype))
            arrived = torch.cuda.Event()
            arrived.record(cuda.to_device)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(arrived)
        if cuda.copied[t] is not None:
            compute.wait_event(cuda.copied[t])  # these output buffers' previous copy-back has finished
        results = []
        for k, (entry, picked, weights) in enumerate(zip(row.entries, row.picks, row.weights)):
            assert entry.accum_dtype is not None
            device_out = cuda.outputs[t][k][: chunk.count * entry.dtype.itemsize].view(entry.dtype)
            fold(
                [inputs[j] for j in picked], weights, entry.divisor, self._accumulator(entry.accum_dtype, chunk.count), device_out
            )
            finite = torch.isfinite(device_out.float() if device_out.dtype.itemsize == 1 else device_out).all()
            results.append((entry, device_out, finite))
        folded = cuda.folded[t] = torch.cuda.Event()
        folded.record(compute)
        with torch.cuda.stream(cuda.to_host):
            cuda.to_host.wait_event(folded)
            for k, (entry, device_out, finite) in enumerate(results):
                out = outs[k][: chunk.count * entry.dtype.itemsize].view(entry.dtype)
                out.copy_(device_out, non_blocking=True)
                cuda.finite[t][k].copy_(finite, non_blocking=True)
                finite.record_stream(cuda.to_host)  # not reused by the allocator before this copy is done
            copied = cuda.copied[t] = torch.cuda.Event()
            copied.record(cuda.to_host)
        arrived.synchronize()  # the pinned slot is on the device: the reader may refill it
        self._slots.put(slot)
        flags = cuda.finite[t]
        return chunk, outs, lambda: [bool(f) for f in flags], copied

    def _explain_nonfinite(self, chunk: Chunk, k: int = 0) -> None:
        """Name the input holding a NaN/Inf in this chunk of plan k (re-read from its file), or report an overflow."""
        entry = chunk.row.entries[k]
        itemsize = entry.input_dtype.itemsize
        for i, _ in active_inputs(entry):
            raw = torch.empty(chunk.count * itemsize, dtype=torch.uint8)
            entry.sources[i].read_into(chunk.start * itemsize, raw)
            view = raw.view(entry.input_dtype)
            bad = ~torch.isfinite(view.float() if view.dtype.itemsize == 1 else view)
            if bool(bad.any()):
                at = int(bad.nonzero()[0, 0])
                value = float(view[at].float())
                first = entry.first_element + chunk.start + at
                raise NonFiniteError(
                    entry.sources[i].path,
                    f"tensor {entry.name} holds {value} (element {first}); NaN/Inf weights cannot be averaged",
                )
        raise CkptavgError(
            None, f"the average of tensor {entry.name} overflows {dtype_name(entry.dtype)}; choose a wider {option('dtype')}"
        )


class _CudaState:
    """Two sets of device buffers used in turn, the copy streams, and the events that order them."""

    def __init__(self, device: torch.device, width: int, chunk_bytes: int, outputs: int = 1) -> None:
        self.to_device = torch.cuda.Stream(device)
        self.to_host = torch.cuda.Stream(device)
        self.inputs = [[torch.empty(chunk_bytes, dtype=torch.uint8, device=device) for _ in range(width)] for _ in range(2)]
        self.outputs = [[torch.empty(chunk_bytes, dtype=torch.uint8, device=device) for _ in range(outputs)] for _ in range(2)]
        self.finite = [[torch.empty((), dtype=torch.bool, pin_memory=True) for _ in range(outputs)] for _ in range(2)]
        self.folded: list = [None, None]
        self.copied: list = [None, None]
        self.turn = 1
