"""`qwenvl-pd serve`: prefill, decode and proxy as separate processes on this machine, with
`--num-encode N` encoders too (EPD; serve_epd.py) and `--embedding-store mooncake` a Mooncake
Store on loopback (a master and a client lending it --embedding-store-gib) that the encoders and
prefills share.

The embedded default: the same three roles a cluster runs, talking over loopback (gRPC, and
Mooncake TCP for the KV). Children share serve's process group, so a terminal's Ctrl-C reaches
all of them; SIGTERM to serve is forwarded; and on Linux each child also gets SIGTERM if serve
itself dies, so no node outlives it holding its ports.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

from qwenvl_pd import serve_epd
from qwenvl_pd.cpus import check_cpus, format_cpus, split_encode, split_roles, union
from qwenvl_pd.process import die_with_parent, free_port

STARTUP_S = 900.0  # a large checkpoint takes minutes to load
TINY_ARCH = "qwen2_5_vl"


@dataclass(frozen=True)
class ServeConfig:
    model: str = ""  # "": the tiny random-weight checkpoint
    host: str = "127.0.0.1"
    port: int = 8000
    num_prefill: int = 1
    num_decode: int = 1
    max_model_len: int = 8192
    kv_cache_gib: float = 1.0
    device: str = "auto"
    served_model_name: str = ""
    api_key: str = ""
    colocated: bool = False
    extra_proxy_args: tuple[str, ...] = ()
    prefill_tp: int = 1
    decode_tp: int = 1
    enable_expert_parallel: bool = False
    quantization: str | None = None
    kv_transfer_mode: str = "whole"  # the proxy's --kv-transfer-mode
    max_num_batched_tokens: int = 2048
    node_args: tuple[str, ...] = ()  # more flags for every instance (cli.py: vLLM's engine flags)
    # cores per role (() : not pinned); --colocated pins its one process to their union
    cpus_prefill: tuple[int, ...] = ()
    cpus_decode: tuple[int, ...] = ()
    cpus_proxy: tuple[int, ...] = ()
    pin: bool = True  # no cores given: split this process's cores between the roles (split_roles)
    num_encode: int = 0  # encoders (EPD); 0: prefill runs the vision tower, today's PD
    embedding_cache_gib: float = 1.0  # each encoder's pool
    embedding_store: str = ""  # "mooncake": a master on loopback shared by encoders and prefills
    embedding_store_gib: float = 1.0  # what the store's holder lends it (the encoders lend none)
    cpus_encode: tuple[int, ...] = ()

    def __post_init__(self):
        for cpus in (self.cpus_prefill, self.cpus_decode, self.cpus_proxy, self.cpus_encode):
            check_cpus(cpus)  # here, not in a child that would die while starting
        if self.num_encode < 0 or (self.num_encode and self.colocated):
            raise ValueError("--num-encode must be >= 0, and 0 with --colocated")
        if self.embedding_store not in serve_epd.STORES or (self.embedding_store and not self.num_encode):
            raise ValueError("--embedding-store takes mooncake, and needs --num-encode >= 1")
        if self.embedding_store_gib <= 0:
            raise ValueError("--embedding-store-gib must be > 0")

    @property
    def cpus_colocated(self) -> tuple[int, ...]:
        return union(self.cpus_prefill, self.cpus_decode, self.cpus_proxy)

    def pinned(self) -> "ServeConfig":
        """The default layout where no role's cores were given (explicit lists win)."""
        if not self.pin or self.cpus_colocated or self.cpus_encode:
            return self
        prefill, decode, proxy = split_roles(tuple(os.sched_getaffinity(0)))
        prefill, encode = split_encode(prefill) if self.num_encode else (prefill, ())
        return replace(self, cpus_prefill=prefill, cpus_decode=decode, cpus_proxy=proxy, cpus_encode=encode)

    def layout(self) -> str:
        if not (self.cpus_colocated or self.cpus_encode):
            return "not pinned: every role on every core"
        if self.colocated:
            return f"the colocated engine and proxy on cores {format_cpus(self.cpus_colocated)}"
        roles = [("prefill", self.cpus_prefill), ("decode", self.cpus_decode), ("proxy", self.cpus_proxy)]
        roles += [("encode", self.cpus_encode)] if self.num_encode else []
        return ", ".join(f"{role} on cores {format_cpus(cpus) if cpus else 'all'}" for role, cpus in roles)


@dataclass
class Child:
    role: str
    proc: subprocess.Popen
    address: str


def tiny_model_dir() -> Path:
    """Build the tiny checkpoint once into the user's cache; later runs reuse it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = cache / "qwenvl-pd" / f"tiny-{TINY_ARCH}"
    if (root / ".complete").exists():
        return root
    from qwenvl_pd.model.tiny import make_tiny
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    print(f"qwenvl-pd serve: building a tiny {TINY_ARCH} checkpoint in {root} (once)", flush=True)
    make_tiny(TINY_ARCH, tmp)
    (tmp / ".complete").touch()
    shutil.rmtree(root, ignore_errors=True)  # a half-written one from an interrupted run
    tmp.rename(root)
    return root


def _banner(lines: list[str]) -> None:
    bar = "=" * max(len(line) for line in lines)
    print("\n".join([bar, *lines, bar]), file=sys.stderr, flush=True)


def _spawn(role: str, args: list[str], address: str) -> Child:
    cmd = [sys.executable, "-m", "qwenvl_pd.cli", role, *args]
    return Child(role, subprocess.Popen(cmd, preexec_fn=die_with_parent), address)


def _parallel_args(tp: int, cfg: ServeConfig) -> list[str]:
    return (["--tensor-parallel-size", str(tp)]
            + (["--enable-expert-parallel"] if cfg.enable_expert_parallel else [])
            + (["--quantization", cfg.quantization] if cfg.quantization else []))


def _cpus_args(cpus: tuple[int, ...]) -> list[str]:
    return ["--cpus", format_cpus(cpus)] if cpus else []


def _node_args(cfg: ServeConfig, role: str, model: str, port: int, store: str = "") -> list[str]:
    tp, cpus = (cfg.prefill_tp, cfg.cpus_prefill) if role == "prefill" else (cfg.decode_tp, cfg.cpus_decode)
    args = ["--model", model, "--port", str(port), "--host", "127.0.0.1", "--bind", "127.0.0.1",
            "--max-model-len", str(cfg.max_model_len), "--kv-cache-gib", str(cfg.kv_cache_gib),
            "--max-num-batched-tokens", str(cfg.max_num_batched_tokens),
            "--device", cfg.device, *_parallel_args(tp, cfg), *_cpus_args(cpus), *cfg.node_args]
    # every peer is local: nothing else may be named in a KV or embedding handle
    args += ["--allowed-prefills" if role == "decode" else "--allowed-encoders", "127.0.0.1"]
    args += ["--embedding-store", store] if store and role == "prefill" else []
    return args + (["--served-model-name", cfg.served_model_name] if cfg.served_model_name else [])


def grpc_serving(address: str) -> bool:
    """Whether the gRPC health service at address answers SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str) -> bool:
    """Whether a GET of url answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _wait(children: list[Child], ready, what: str) -> None:
    deadline, pending = time.monotonic() + STARTUP_S, list(children)
    while pending:
        for c in list(pending):
            if c.proc.poll() is not None:
                raise RuntimeError(f"{c.role} ({c.address}) exited with code {c.proc.returncode} "
                                   "while starting; see its log above")
            if ready(c.address):
                pending.remove(c)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {STARTUP_S:.0f}s")
        time.sleep(0.3)


def _start(cfg: ServeConfig, model: str, children: list[Child]) -> Child:
    proxy_args = ["--host", cfg.host, "--port", str(cfg.port), *cfg.extra_proxy_args]
    if not cfg.colocated:
        proxy_args += ["--kv-transfer-mode", cfg.kv_transfer_mode]
    if cfg.api_key:
        proxy_args += ["--api-key", cfg.api_key]
    if cfg.served_model_name:
        proxy_args += ["--served-model-name", cfg.served_model_name]
    if cfg.colocated:
        proxy_args += ["--colocated-model", model, "--max-model-len", str(cfg.max_model_len),
                       "--kv-cache-gib", str(cfg.kv_cache_gib), "--device", cfg.device,
                       "--max-num-batched-tokens", str(cfg.max_num_batched_tokens),
                       *_parallel_args(cfg.prefill_tp, cfg), *_cpus_args(cfg.cpus_colocated)]
    else:
        proxy_args += _cpus_args(cfg.cpus_proxy)
        store = _start_store(cfg, children)
        nodes = [_spawn(role, _node_args(cfg, role, model, port, store), f"127.0.0.1:{port}")
                 for role, n in (("prefill", cfg.num_prefill), ("decode", cfg.num_decode))
                 for port in [free_port() for _ in range(n)]]
        nodes += [_spawn("encode", serve_epd.encode_args(model, port, cfg.device, format_cpus(cfg.cpus_encode),
                                                         cfg.embedding_cache_gib, store), f"127.0.0.1:{port}")
                  for port in [free_port() for _ in range(cfg.num_encode)]]
        children += nodes
        _wait(nodes, grpc_serving, "prefill/decode/encode instances")
        for role in ("prefill", "decode", "encode"):
            addresses = [c.address for c in nodes if c.role == role]
            proxy_args += [f"--{role}", ",".join(addresses)] if addresses else []
    local = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    proxy = _spawn("proxy", proxy_args, f"http://{local}:{cfg.port}")
    children.append(proxy)
    _wait([proxy], lambda url: http_ok(url + "/health"), "the proxy")
    return proxy


def _start_store(cfg: ServeConfig, children: list[Child]) -> str:
    """--embedding-store mooncake: the wheel's master on loopback and the client lending it
    memory -> the master's "host:port" ("": none)."""
    if not cfg.embedding_store:
        return ""
    master = _start_binary("mooncake_master", lambda port: serve_epd.master_command(port, free_port()), children)
    _start_binary("mooncake_client", lambda port: serve_epd.holder_command(
        master.address, port, cfg.embedding_store_gib), children)
    return master.address


def _start_binary(role: str, command, children: list[Child]) -> Child:
    """command(port) -> argv of a process that is ready once port accepts connections."""
    port = free_port()
    argv = command(port)
    child = Child(role, subprocess.Popen(argv, preexec_fn=die_with_parent), f"127.0.0.1:{port}")
    children.append(child)
    _wait([child], serve_epd.tcp_open, f"the {role}")
    return child


def _watch(children: list[Child]) -> int:
    """Until a child dies: a dead node is reported loudly; serving goes on while the proxy and
    at least one prefill and one decode live (without encoders or the store, prefill encodes)."""
    alive = list(children)
    while True:
        time.sleep(0.5)
        for c in [c for c in alive if c.proc.poll() is not None]:
            alive.remove(c)
            _banner([f"qwenvl-pd serve: {c.role} at {c.address} (pid {c.proc.pid}) DIED with exit code "
                     f"{c.proc.returncode}"])
            essential = c.role in ("proxy", "prefill", "decode")
            if essential and (c.role == "proxy" or not any(a.role == c.role for a in alive)):
                print(f"qwenvl-pd serve: no {c.role} left; stopping everything", file=sys.stderr)
                return 1


def _stop(children: list[Child]) -> None:
    for c in children:
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for c in children:
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()


def _on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # unwinds into main's finally, which stops every child


def main(cfg: ServeConfig) -> int:
    model = cfg.model
    if not model:
        model = str(tiny_model_dir())
        _banner(["qwenvl-pd serve: NO --model GIVEN: serving a tiny checkpoint with RANDOM weights",
                 f"  ({model}); its answers are noise. For a real model:",
                 "  qwenvl-pd serve --model /path/to/Qwen2.5-VL-7B-Instruct --port 8000"])
    default = cfg.pin and not cfg.cpus_colocated
    cfg = cfg.pinned()
    print(f"qwenvl-pd serve: {cfg.layout()}" + (" (--no-pin to leave them unpinned)" if default else ""),
          file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # the roles of this run share a fresh secret (children inherit it): nothing else on the
    # host can call their node ports or hand decode a KV handle
    os.environ.setdefault("QWENVL_PD_CLUSTER_SECRET", secrets.token_hex(32))
    children: list[Child] = []
    try:
        proxy = _start(cfg, model, children)
        encode = f" + {cfg.num_encode} encode" if cfg.num_encode else ""
        mode = "colocated (one engine)" if cfg.colocated else \
            f"{cfg.num_prefill} prefill + {cfg.num_decode} decode{encode}, KV over Mooncake TCP on loopback"
        _banner([f"qwenvl-pd serve: ready at {proxy.address}/v1 ({mode})",
                 f"  curl {proxy.address}/v1/models"])
        return _watch(children)
    except KeyboardInterrupt:
        print("qwenvl-pd serve: stopping", file=sys.stderr)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"qwenvl-pd serve: error: {e}", file=sys.stderr)
        return 1
    finally:
        _stop(children)
