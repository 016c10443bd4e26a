"""The share of each rank: the plan's tensors cut into units (element ranges) and handed out by the bytes they
read, the costliest first onto the least loaded rank; the same on every rank, from the plan alone."""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckptavg.formats.base import TensorSource
    from ckptavg.merge.plan import Plan

UNITS_PER_RANK = 8  # pieces per rank: enough to even out the shares, few enough to keep each read long
MIN_UNIT_BYTES = 16 << 20
ALIGN = 4096  # elements: units start on page-friendly boundaries in every dtype


@dataclass(frozen=True)
class Unit:
    """Elements [first, first + count) of the plan's entry `entry`, and the bytes reading them costs."""

    entry: int
    first: int
    count: int
    read_bytes: int


def split_work(plan: Plan, world_size: int) -> list[Unit]:
    """The plan's tensors cut into units of about 1/UNITS_PER_RANK of a rank's fair share of reading (at least
    MIN_UNIT_BYTES), in output order. A tensor that can only be read whole (computed, or a strided view) is
    one unit; zero-element tensors have none (rank 0 writes the headers that describe them)."""
    from ckptavg.formats.base import readable_by_range
    from ckptavg.merge.engine import active_inputs

    piece = max(MIN_UNIT_BYTES, plan.read_bytes // (world_size * UNITS_PER_RANK))
    units = []
    for index, entry in enumerate(plan.entries):
        if entry.numel == 0:
            continue
        per_element = entry.input_dtype.itemsize * len(active_inputs(entry))
        step = entry.numel
        if all(readable_by_range(entry.sources[i]) for i, _ in active_inputs(entry)):
            step = max(ALIGN, piece // per_element // ALIGN * ALIGN)
        for first in range(0, entry.numel, step):
            count = min(step, entry.numel - first)
            units.append(Unit(index, first, count, count * per_element))
    return units


def owners(costs: list[int], world_size: int) -> list[int]:
    """The rank of each item: the costliest first onto the least loaded rank (ties to the highest rank: rank 0
    also lays out, finishes and verifies the output). Longest-processing-time packing: the most and least
    loaded ranks differ by at most the largest item."""
    rank_of = [0] * len(costs)
    loads = [(0, -rank) for rank in range(world_size)]
    for item in sorted(range(len(costs)), key=lambda i: -costs[i]):  # sorted() is stable: equal items keep their order
        load, rank = heapq.heappop(loads)
        rank_of[item] = -rank
        heapq.heappush(loads, (load + costs[item], rank))
    return rank_of


def assign(units: list[Unit], world_size: int) -> list[list[Unit]]:
    """Each rank's units (see owners), each share in output order, so a rank writes its files front to back."""
    shares: list[list[Unit]] = [[] for _ in range(world_size)]
    for unit, rank in zip(units, owners([u.read_bytes for u in units], world_size)):
        shares[rank].append(unit)
    return shares


def share_plan(plan: Plan, units: list[Unit]) -> Plan:
    """The plan of one rank: its units as entries of their own."""
    return share_plans([plan], units)[0]


def share_plans(plans: list[Plan], units: list[Unit]) -> list[Plan]:
    """The plans of one rank (a sweep's candidates, made of the same tensors): its units as entries of their own
    in each, every source the plans share cut once, so that one pass reads it once for all of them."""
    from ckptavg.formats.base import slice_source
    from ckptavg.merge.plan import Plan

    cut: dict[tuple[int, int, int], TensorSource] = {}

    def slice_once(source: TensorSource, first: int, count: int) -> TensorSource:
        key = (id(source), first, count)
        if key not in cut:
            cut[key] = slice_source(source, first, count)
        return cut[key]

    shares = []
    for plan in plans:
        entries = [plan.entries[u.entry].slice(u.first, u.count, slice_once) for u in units]
        shares.append(Plan(plan.inputs, plan.weights, entries, plan.output_kind, plan.adapter_config, plan.files_from))
    return shares


def fingerprint(plan: Plan, layout: Iterable[object]) -> str:
    """What every rank must agree on before writing: each output tensor's recipe and the output's layout."""
    described = [
        (
            e.name,
            str(e.dtype),
            list(e.shape),
            e.weights,
            e.divisor,
            str(e.accum_dtype),
            e.alias_of,
            [str(s.path) for s in e.sources],
        )
        for e in plan.entries
    ]
    text = json.dumps([described, [str(x) for x in layout]], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
