"""`serve --num-encode` and `--embedding-store mooncake`: the encoders' cores and command lines,
the flags' checks, and the wheel's Mooncake master and memory-lending client started on loopback
(real processes)."""
from __future__ import annotations

import os
import subprocess

import pytest

from qwenvl_pd import serve_epd
from qwenvl_pd.cli import build_parser
from qwenvl_pd.cpus import split_encode, split_roles
from qwenvl_pd.kv_transfer.embedding_store import EmbeddingStore
from qwenvl_pd.serve import ServeConfig, _node_args, _start_store, _stop


@pytest.mark.parametrize("prefill, kept, encode", [
    ((), (), ()), ((1,), (1,), (1,)), ((2, 3), (3,), (2,)), ((3, 4, 5), (4, 5), (3,)),
    ((4, 5, 6, 7), (6, 7), (4, 5)),
])
def test_split_encode_gives_encoders_the_first_half_of_prefills_cores(prefill, kept, encode):
    assert split_encode(prefill) == (kept, encode)


def test_serve_pins_encoders_only_with_num_encode():
    cores = tuple(sorted(os.sched_getaffinity(0)))
    prefill, decode, proxy = split_roles(cores)
    epd = ServeConfig(num_encode=1).pinned()
    assert (epd.cpus_prefill, epd.cpus_encode) == split_encode(prefill)
    assert (epd.cpus_decode, epd.cpus_proxy) == (decode, proxy)
    assert ServeConfig().pinned().cpus_encode == ()
    given = ServeConfig(num_encode=1, cpus_encode=cores[:1])
    assert given.pinned() == given
    assert given.layout() == f"prefill on cores all, decode on cores all, proxy on cores all, encode on cores {cores[0]}"


@pytest.mark.parametrize("kwargs, message", [
    ({"num_encode": -1}, "--num-encode must be >= 0"),
    ({"num_encode": 1, "colocated": True}, "0 with --colocated"),
    ({"embedding_store": "mooncake"}, "needs --num-encode >= 1"),
    ({"num_encode": 1, "embedding_store": "redis"}, "takes mooncake"),
    ({"num_encode": 1, "embedding_store": "mooncake", "embedding_store_gib": 0}, "--embedding-store-gib must be > 0"),
])
def test_bad_encode_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig(**kwargs)


def test_serve_flags_reach_the_config_and_the_command_lines():
    args = build_parser().parse_args(["serve", "--num-encode", "2", "--embedding-cache-gib", "0.5",
                                      "--embedding-store", "mooncake", "--cpus-encode", "0",
                                      "--embedding-store-gib", "2"])
    assert (args.num_encode, args.embedding_cache_gib, args.embedding_store, args.cpus_encode,
            args.embedding_store_gib) == (2, 0.5, "mooncake", (0,), 2.0)
    assert build_parser().parse_args(["serve"]).embedding_store_gib == 1.0
    assert serve_epd.encode_args("/m", 7, "cpu", "0-1", 0.5, "127.0.0.1:9") == [
        "--model", "/m", "--port", "7", "--host", "127.0.0.1", "--bind", "127.0.0.1", "--device", "cpu",
        "--embedding-cache-gib", "0.5", "--cpus", "0-1", "--embedding-store", "127.0.0.1:9",
        "--embedding-store-segment-gib", "0"]
    assert serve_epd.encode_args("/m", 7, "auto", "", 1.0, "")[-2:] == ["--embedding-cache-gib", "1.0"]
    prefill = _node_args(ServeConfig(num_encode=1), "prefill", "/m", 5, "127.0.0.1:9")
    decode = _node_args(ServeConfig(num_encode=1), "decode", "/m", 6, "127.0.0.1:9")
    assert prefill[-2:] == ["--embedding-store", "127.0.0.1:9"] and "--embedding-store" not in decode
    # every peer is loopback: neither node reads from an address a handle names elsewhere
    assert prefill[prefill.index("--allowed-encoders") + 1] == decode[decode.index("--allowed-prefills") + 1] \
        == "127.0.0.1"


def test_serve_starts_the_wheels_master_and_a_holder_on_loopback_and_stops_them():
    children = []
    try:
        address = _start_store(ServeConfig(num_encode=1, embedding_store="mooncake", embedding_store_gib=0.0625),
                               children)
        master, holder = children
        assert (master.role, holder.role, master.address) == ("mooncake_master", "mooncake_client", address)
        assert address.startswith("127.0.0.1:") and serve_epd.tcp_open(address) and serve_epd.tcp_open(holder.address)
        assert [os.path.basename(c.proc.args[0]) for c in children] == ["mooncake_master", "mooncake_client"]
        assert f"--master_server_address={address}" in holder.proc.args
        assert f"--global_segment_size={1 << 26}" in holder.proc.args
        # an encoder lends nothing: what it puts lives in the holder and outlives the encoder
        encoder = EmbeddingStore(address, segment_bytes=0, buffer_bytes=1 << 20)
        assert encoder.put("k", b"embedding" * 100)
        encoder.close()
        prefill = EmbeddingStore(address, segment_bytes=0, buffer_bytes=1 << 20)
        assert prefill.get("k") == b"embedding" * 100
        prefill.close()
    finally:
        _stop(children)
    assert master.proc.returncode is not None and not serve_epd.tcp_open(address)
    assert holder.proc.returncode is not None and not serve_epd.tcp_open(holder.address)
    assert _start_store(ServeConfig(), []) == ""


def test_store_command_lines_bind_loopback_and_the_holder_lends_the_flags_gib():
    (master, *args) = serve_epd.master_command(5, 6)
    assert os.path.basename(master) == "mooncake_master" and os.access(master, os.X_OK)
    assert args == ["--rpc_port=5", "--rpc_address=127.0.0.1", "--metrics_host=127.0.0.1", "--metrics_port=6",
                    "--enable_metric_reporting=false"]
    (holder, *args) = serve_epd.holder_command("127.0.0.1:5", 7, 1.5)
    assert os.path.basename(holder) == "mooncake_client" and os.access(holder, os.X_OK)
    assert args == ["--master_server_address=127.0.0.1:5", "--host=127.0.0.1", "--port=7",
                    f"--global_segment_size={3 << 29}", "--metadata_server=P2PHANDSHAKE", "--protocol=tcp"]
    assert subprocess.run([master, "--help"], capture_output=True, timeout=60).returncode in (0, 1)
