"""`--cpus LIST`: pin a role's process to some cores, as `taskset -c LIST` would (torch-free:
`serve` and the proxy import it).

Children inherit the affinity (fork and exec keep it), so a node's tensor-parallel ranks run on
the node's cores without being told. Torch's thread pool is sized at import from the cores it
saw then, so the caller also sets the thread count (node: cli._node; colocated: cli).
"""
from __future__ import annotations

import os


def parse_cpus(spec: str) -> tuple[int, ...]:
    """taskset's list syntax: "0", "0-3", "0,2,4-5", "0-7:2" (every 2nd) -> sorted unique ids."""
    cpus: set[int] = set()
    for item in spec.split(","):
        cpus.update(_item(item.strip(), spec))
    return tuple(sorted(cpus))


def _item(item: str, spec: str) -> range:
    bounds, _, stride = item.partition(":")
    lo, sep, hi = bounds.partition("-")
    if not item or not lo.isdigit() or (sep and not hi.isdigit()) or (stride and not sep):
        raise ValueError(f"CPU list {spec!r}: {item!r} is not N, N-M or N-M:S (e.g. 0, 0-1, 0,2-3)")
    first, last = int(lo), int(hi) if sep else int(lo)
    if last < first:
        raise ValueError(f"CPU list {spec!r}: range {item!r} runs backwards")
    if stride and (not stride.isdigit() or int(stride) < 1):
        raise ValueError(f"CPU list {spec!r}: stride in {item!r} must be a positive integer")
    return range(first, last + 1, int(stride or 1))


def format_cpus(cpus: tuple[int, ...]) -> str:
    """The inverse of parse_cpus (runs collapsed), for passing a set on to a child's --cpus."""
    runs: list[list[int]] = []
    for c in sorted(set(cpus)):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def check_cpus(cpus: tuple[int, ...]) -> None:
    """Every core must be one this process may run on (a container's cpuset, an outer taskset)."""
    allowed = os.sched_getaffinity(0)
    missing = [c for c in cpus if c not in allowed]
    if missing:
        raise ValueError(f"CPU list {format_cpus(cpus)}: core(s) {format_cpus(tuple(missing))} not "
                         f"available here (this process may use {format_cpus(tuple(allowed))})")


def pin(cpus: tuple[int, ...]) -> None:
    """Pin this process (and what it starts later) to cpus; () leaves the affinity alone."""
    if not cpus:
        return
    check_cpus(cpus)
    # sched_setaffinity(0) moves only the calling thread: move every thread already running
    # (an imported library's pool) too; threads started later inherit it
    for tid in _threads():
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            pass  # that thread has just ended


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except FileNotFoundError:  # no procfs: the calling thread is what there is to move
        return [0]


def union(*lists: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(set().union(*lists)))


def threads_for(cpus: tuple[int, ...], threads: int, tp: int) -> int:
    """Torch threads per rank: --threads if given, else the pinned cores shared by the ranks,
    else 0 (torch's default, or cores / ranks under tensor parallelism)."""
    if threads or not cpus:
        return threads
    return max(1, len(cpus) // tp)


def split_roles(cores: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """serve's default pins -> (prefill, decode, proxy): decode alone on the first half of the
    cores, prefill and the proxy on the rest (on 2 cores: decode 0, prefill + proxy 1); () for
    all under 2 cores. Unpinned, a prefill that overlaps a decode oversubscribes the cores with
    both nodes' torch threads, and decode's TPOT pays (benchmarks/pd_vs_colocated.py)."""
    cores = tuple(sorted(cores))
    if len(cores) < 2:
        return (), (), ()
    half = len(cores) // 2
    return cores[half:], cores[:half], cores[half:]


def split_encode(prefill: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """serve --num-encode: the encoders' share of prefill's cores -> (prefill, encode): the
    encoders take the first half (rounded down), prefill keeps the rest; one core (or none) is
    shared. The vision tower moves off prefill, so its cores go with it."""
    if len(prefill) < 2:
        return prefill, prefill
    half = len(prefill) // 2
    return prefill[half:], prefill[:half]
