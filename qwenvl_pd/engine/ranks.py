"""The ranks of one tensor-parallel instance: child processes of the role's own command.

Rank 0 is the calling process: it owns the scheduler and the block manager and broadcasts each
step's StepInput; ranks 1..N-1 hold their shard of the weights and of the KV cache and run the
same forward. Collectives of the forward go over the device's backend (gloo on CPU, nccl, hccl);
the step messages over a gloo group of their own, on the host. A rank that dies breaks the
collectives of the others, so rank 0's step raises and the instance fails loudly.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from qwenvl_pd.engine import step_input
from qwenvl_pd.engine.step_input import StepInput
from qwenvl_pd.model.parallel import TensorParallel
from qwenvl_pd.process import die_with_parent

if TYPE_CHECKING:
    from qwenvl_pd.engine.engine_config import EngineConfig

log = logging.getLogger(__name__)
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
# a rank alive but stuck inside a forward (not dead: a dead one closes its sockets at once)
# fails the step after this
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# the host-side groups wait for the next step or pull as long as the instance idles; a dead
# peer still fails them at once, and rank 0 polls its children besides
IDLE_TIMEOUT = timedelta(days=365)
START_POLL_S = 0.2
STOP = -1  # header length that tells the ranks to exit


@dataclass(frozen=True)
class RankContext:
    """What a rank_setup hook sees on every rank: its shard of the KV cache and a host-side group
    of its own (None at tensor_parallel 1), e.g. for the node's KV transfers."""
    tp: TensorParallel
    kv_cache: torch.Tensor
    group: object | None


@dataclass(frozen=True)
class RankSpec:
    """What a rank needs to build its shard: sent once to each child at start."""
    model_dir: str
    tp: TensorParallel
    device_type: str
    dtype: str
    engine: "EngineConfig"
    port: int
    threads: int
    # builds the rank's model shard and runner (stack.build_rank_runner; handed in, so this
    # module does not import the stack that spawns it)
    build_runner: Callable[["RankSpec"], object]
    # run on every rank once its KV cache exists (picklable: a top-level function or partial)
    rank_setup: Callable[[RankContext], object] | None = None
    quantization: str | None = None


def send_message(ints: torch.Tensor | None, data: torch.Tensor, group) -> None:
    """Rank 0: one message of an int64 and a uint8 tensor to every rank; ints None says stop."""
    sizes = [STOP, 0] if ints is None else [len(ints), len(data)]
    dist.broadcast(torch.tensor(sizes), 0, group=group)
    if ints is not None:
        dist.broadcast(ints, 0, group=group)
    if len(data):
        dist.broadcast(data, 0, group=group)


def recv_message(group) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Ranks 1..N-1: the next (ints, data) rank 0 sends, or None when it says stop."""
    sizes = torch.zeros(2, dtype=torch.long)
    dist.broadcast(sizes, 0, group=group)
    if sizes[0] == STOP:
        return None
    ints = torch.empty(int(sizes[0]), dtype=torch.long)
    data = torch.empty(int(sizes[1]), dtype=torch.uint8)
    dist.broadcast(ints, 0, group=group)
    if len(data):
        dist.broadcast(data, 0, group=group)
    return ints, data


class StepChannel:
    """Rank 0 sends each step's StepInput; the other ranks receive it."""

    def __init__(self, group):
        self.group = group

    def send(self, step: StepInput) -> None:
        send_message(*step_input.encode(step), self.group)

    def recv(self) -> StepInput | None:
        """The next step, or None when rank 0 closes the instance."""
        message = recv_message(self.group)
        return None if message is None else step_input.decode(*message)

    def close(self) -> None:
        send_message(None, torch.empty(0, dtype=torch.uint8), self.group)


def rank_device(device_type: str, rank: int) -> torch.device:
    if device_type == "cpu":
        return torch.device("cpu")
    getattr(torch, device_type).set_device(rank)
    return torch.device(device_type, rank)


def init_rank(spec: RankSpec) -> tuple[object, object]:
    """Join the instance's process group; -> host-side groups for step messages and for the
    rank_setup hook (each used by one thread only)."""
    dist.init_process_group(BACKENDS[spec.device_type], init_method=f"tcp://127.0.0.1:{spec.port}",
                            rank=spec.tp.rank, world_size=spec.tp.size, timeout=COLLECTIVE_TIMEOUT)
    return tuple(dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT) for _ in range(2))


class Ranks:
    """Rank 0's handle on the other ranks: start, watch, stop."""

    def __init__(self, spec: RankSpec):
        self._check_devices(spec)
        ctx = mp.get_context("spawn")  # a forked child would inherit rank 0's threads and locks
        self.procs = [ctx.Process(target=run_rank, name=f"tp-rank-{r}", daemon=True,
                                  args=(replace(spec, tp=replace(spec.tp, rank=r)),))
                      for r in range(1, spec.tp.size)]
        for p in self.procs:
            p.start()
        self._threads = torch.get_num_threads()
        if spec.device_type == "cpu":  # the ranks share the cores
            torch.set_num_threads(spec.threads)
        steps, self.aux_group = self._join(spec)
        self.channel = StepChannel(steps)

    def _join(self, spec: RankSpec):
        """init_rank on a helper thread: a child that dies before it joins (a bad install, no
        device) ends the wait with its exit code instead of a 10-minute rendezvous timeout."""
        pool = ThreadPoolExecutor(1, thread_name_prefix="tp-join")
        joined = pool.submit(init_rank, spec)
        pool.shutdown(wait=False)
        while True:
            try:
                return joined.result(timeout=START_POLL_S)
            except FutureTimeout:
                self._raise_if_dead("while joining")

    @staticmethod
    def _check_devices(spec: RankSpec) -> None:
        if spec.device_type != "cpu":
            have = getattr(torch, spec.device_type).device_count()
            if have < spec.tp.size:
                raise ValueError(f"tensor_parallel_size {spec.tp.size} needs {spec.tp.size} "
                                 f"{spec.device_type} devices; {have} visible")

    def ready(self) -> None:
        """Wait until every rank has loaded its shard (a rank that failed ends the wait)."""
        try:
            dist.barrier(group=self.channel.group)
        except RuntimeError:
            self._raise_if_dead("while loading its shard")
            raise

    def _raise_if_dead(self, when: str) -> None:
        for r, p in enumerate(self.procs, 1):
            if p.exitcode is not None:
                raise RuntimeError(f"tensor-parallel rank {r} exited with code {p.exitcode} {when}; "
                                   "see its log above")

    def dead(self) -> list[int]:
        return [r for r, p in enumerate(self.procs, 1) if not p.is_alive()]

    def kill(self) -> None:
        """After a failure: the collectives cannot be trusted, so no goodbye."""
        for p in self.procs:
            p.kill()
            p.join(timeout=10)

    def close(self) -> None:
        if not self.dead():
            try:
                self.channel.close()
            except RuntimeError:
                pass  # a rank is gone: the others fail their next receive and exit
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        dist.destroy_process_group()
        torch.set_num_threads(self._threads)


def run_rank(spec: RankSpec) -> None:
    """A child rank: build its shard, then run every step rank 0 broadcasts until told to stop."""
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {spec.tp.rank} %(levelname)s: %(message)s")
    if spec.device_type == "cpu":
        torch.set_num_threads(spec.threads)
    group, aux = init_rank(spec)
    runner = spec.build_runner(spec)
    # what the hook made (a registered transfer engine) lives as long as the rank
    kept = spec.rank_setup(RankContext(spec.tp, runner.kv_cache, aux)) if spec.rank_setup else None
    channel = StepChannel(group)
    dist.barrier(group=group)
    try:
        while (step := channel.recv()) is not None:
            runner.execute(step)
    except RuntimeError as e:  # rank 0 or a peer went away: nothing left to serve
        log.error("rank %d stopping: %s", spec.tp.rank, e)
        os._exit(1)
    del kept
    dist.destroy_process_group()
