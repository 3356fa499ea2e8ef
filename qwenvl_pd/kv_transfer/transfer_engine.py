"""One Mooncake TransferEngine per instance: register the KV region once, pull slices from peers.

Mooncake facts this wrapper is built on (mooncake-transfer-engine 0.3.x, classic backend):
- `transfer_sync_read` / `batch_transfer_sync_read` release the GIL and busy-poll until the
  transfer completes, fails, or Mooncake's own deadline passes: MC_TRANSFER_TIMEOUT seconds
  (read once, when a TransferEngine is constructed; at least 5, default 30) plus 1 ns per byte.
  A dead peer fails at once (connection refused); a hung peer blocks for that whole deadline.
  The wait spins one core, so calls run on worker threads and our own deadline is enforced there.
- The `protocol` argument of initialize() only picks a host allocator: the transport itself is
  auto-discovered (RDMA when HCAs are found unless MC_FORCE_TCP is set, TCP otherwise); NPU builds
  install the "ascend" transport unconditionally.
- The TCP transport bounds queued slices per peer (MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER, default
  1024, plus as many waiting admissions); a batch beyond that fails at once with "queue-full".
  We raise the bound (unless the operator set it) and cut batches so concurrent reads fit.
- There is no close(): the engine tears down when the Python object is collected, and that must
  not happen while a native call may still be running on it.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import threading
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Iterator, Sequence

from qwenvl_pd.kv_transfer.layout import Slice
from qwenvl_pd.kv_transfer.peer_pools import PeerPools

PROTOCOLS = ("tcp", "rdma", "ascend")  # "ascend": the NPU build's transport name (HCCS/RoCE)
TCP_QUEUE_PER_PEER = 4096  # our default for MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER
_ENV_LOCK = threading.Lock()  # the env knobs below are process-global; set them one engine at a time


class TransferError(RuntimeError):
    """A read did not complete; the local destination holds unspecified bytes."""


class TransferTimeout(TransferError):
    """Our deadline passed while Mooncake's call was still running. That call can still write the
    local destination until `settled` completes (at the latest at Mooncake's own deadline, see
    `native_timeout_s`): free or reuse those blocks only from `settled`'s callback or after close()."""

    def __init__(self, message: str, settled: Future):
        super().__init__(message)
        self.settled = settled


@contextmanager
def _env(**values: str | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    try:
        _set_env(values)
        yield
    finally:
        _set_env(saved)


def _set_env(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class KVTransferEngine:
    """Pull-only wrapper: reads block slices from peers into this instance's registered region."""

    def __init__(self, host: str, protocol: str = "tcp", device_name: str = "",
                 timeout_s: float = 10.0, max_inflight: int = 4):
        """timeout_s bounds each read (plus 1 s per GiB); max_inflight reads run at once per peer
        (each peer has its own workers: a hung one cannot hold up the others), each submitted in
        batches of at most max_batch_slices so that all fit Mooncake's per-peer TCP queue."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        from mooncake.engine import TransferEngine  # import here: the package is an optional extra

        self.protocol, self.timeout_s = protocol, timeout_s
        # Mooncake's own deadline backs ours up, so a hung peer frees the worker thread too.
        self.native_timeout_s = max(5, math.ceil(timeout_s))
        queue_env = os.environ.get("MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER") or str(TCP_QUEUE_PER_PEER)
        self.max_batch_slices = max(1, _tcp_queue_bound(queue_env) // max_inflight)
        with _ENV_LOCK, _env(MC_TRANSFER_TIMEOUT=str(self.native_timeout_s),
                             MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER=queue_env,
                             MC_FORCE_TCP=_force_tcp(protocol)):
            self._engine = TransferEngine()
            rc = self._engine.initialize(host, "P2PHANDSHAKE", protocol, device_name)
        if rc != 0:
            raise TransferError(f"Mooncake initialize({host!r}, P2PHANDSHAKE, {protocol!r}, "
                                f"{device_name!r}) failed with return code {rc}")
        if protocol == "rdma" and not _has_hca(self._engine.get_local_topology(device_name or None)):
            # Without HCAs Mooncake silently installs TCP; asking for rdma and getting tcp is a misconfig.
            raise TransferError(f"protocol 'rdma' but Mooncake found no RDMA device "
                                f"(device_name={device_name!r})")
        self.session_id = f"{host}:{self._engine.get_rpc_port()}"
        self._regions: dict[int, object] = {}  # data_ptr -> tensor: kept alive while registered
        self._pools = PeerPools(max_inflight)
        self._lock = threading.Lock()
        self._closed = False

    def register(self, tensor, location: str = "*") -> int:
        """Register a contiguous tensor (the KV region, once at start) and return its address.
        CPU tensors today; NPU/GPU tensors go through the same call with their device location."""
        if not tensor.is_contiguous():
            raise ValueError("only a contiguous tensor can be registered")
        addr, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        with self._lock:
            self._check_open()
            rc = self._engine.register_memory(addr, nbytes, location)
            if rc != 0:
                raise TransferError(f"Mooncake register_memory({addr:#x}, {nbytes} B, {location!r}) "
                                    f"failed with return code {rc}")
            self._regions[addr] = tensor
        return addr

    def read(self, peer_session: str, local_addr: int, remote_addr: int, length: int) -> None:
        self.read_batch(peer_session, [(local_addr, remote_addr, length)])

    def read_batch(self, peer_session: str, slices: Sequence[Slice]) -> None:
        """Copy every (local_addr, remote_addr, length) from the peer with as few Mooncake batch
        calls as its TCP queue allows; return when all bytes landed. Raises TransferError on
        failure, TransferTimeout after timeout_s + 1 s per GiB (Mooncake's budget for the bytes)."""
        if not slices:
            return
        fut, what, limit = self._submit(peer_session, slices)
        try:
            rc = fut.result(timeout=limit)
        except CancelledError:  # close() dropped it before it started
            raise TransferError(f"engine closed while {what}") from None
        except FutureTimeout:
            raise self._timed_out(fut, what, limit) from None
        _check_rc(rc, what)

    async def read_batch_async(self, peer_session: str, slices: Sequence[Slice]) -> None:
        """read_batch for an event loop: the caller's thread waits on nothing, so a one-rank
        decode awaits its read without a thread hop of its own."""
        if not slices:
            return
        fut, what, limit = self._submit(peer_session, slices)
        try:
            rc = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), limit)
        except asyncio.TimeoutError:
            raise self._timed_out(fut, what, limit) from None
        except asyncio.CancelledError:
            if fut.cancelled():  # close() dropped it before it started
                raise TransferError(f"engine closed while {what}") from None
            raise
        _check_rc(rc, what)

    def _submit(self, peer_session: str, slices: Sequence[Slice]) -> tuple[Future, str, float]:
        locs, rems, lens = (list(col) for col in zip(*slices))
        total = sum(lens)
        with self._lock:
            self._check_open()
            self._check_local(locs, lens)
            fut = self._pools.submit(peer_session, self._read_chunks, peer_session, locs, rems, lens)
        return fut, f"reading {total} B in {len(lens)} slices from {peer_session}", self.timeout_s + total / 2**30

    def _timed_out(self, fut: Future, what: str, limit: float) -> TransferError:
        if fut.cancel():  # still queued behind other reads: it will never touch memory
            return TransferError(f"timed out {what} before it started")
        return TransferTimeout(f"timed out {what} after {limit:.1f} s; "
                               f"Mooncake gives up by {self.native_timeout_s} s", fut)

    def _read_chunks(self, peer: str, locs: list[int], rems: list[int], lens: list[int]) -> int:
        """Runs on a worker thread. Chunks go one after another: a failed one stops the rest, so a
        hung peer costs one Mooncake deadline, not one per chunk."""
        k = self.max_batch_slices
        for i in range(0, len(locs), k):
            rc = self._engine.batch_transfer_sync_read(peer, locs[i:i + k], rems[i:i + k], lens[i:i + k])
            if rc != 0:
                return rc
        return 0

    def close(self) -> None:
        """Wait for native calls still running (each ends by Mooncake's deadline), then unregister
        and drop the engine. After close() no read can write local memory any more."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pools.shutdown()
        for addr in list(self._regions):
            self._engine.unregister_memory(addr)
        self._regions.clear()
        del self._engine  # the native destructor closes the RPC listener and transport

    def __enter__(self) -> KVTransferEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError("the KV transfer engine is closed")

    def _check_local(self, locs: list[int], lens: list[int]) -> None:
        # A destination outside our registered regions would be written by the transport anyway
        # (TCP recv into it) or rejected late by RDMA: refuse it before anything moves.
        spans = [(a, a + t.numel() * t.element_size()) for a, t in self._regions.items()]
        for loc, n in zip(locs, lens):
            if n <= 0 or not any(lo <= loc and loc + n <= hi for lo, hi in spans):
                raise ValueError(f"local slice [{loc:#x}, +{n}) is not inside a registered region")


def _check_rc(rc: int, what: str) -> None:
    if rc != 0:
        raise TransferError(f"Mooncake batch_transfer_sync_read failed {what}: return code {rc}")


def _force_tcp(protocol: str) -> str | None:
    """MC_FORCE_TCP during initialize(): set for tcp (else HCAs would be used), cleared for rdma
    (else an inherited setting would silently give TCP), left as the operator set it otherwise."""
    return {"tcp": "1", "rdma": None}.get(protocol, os.environ.get("MC_FORCE_TCP"))


def _tcp_queue_bound(value: str) -> int:
    """The per-peer queue Mooncake will actually use: it accepts 1..65535 and falls back to 1024."""
    try:
        q = int(value)
    except ValueError:
        return 1024
    return q if 1 <= q <= 65535 else 1024


def _has_hca(topology_json: str) -> bool:
    """Mooncake's topology maps each location to [preferred HCAs, other HCAs]."""
    try:
        topo = json.loads(topology_json)
    except ValueError:
        return False
    return any(hcas for lists in topo.values() for hcas in lists)
