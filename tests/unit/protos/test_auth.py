"""Handle signatures with the cluster secret: exact, and any change to the handle breaks them."""
import asyncio
import dataclasses

import grpc
import pytest

from qwenvl_pd.kv_transfer.handle import KVHandle, LayoutFingerprint
from qwenvl_pd.prefill_node.leases import lease_seconds
from qwenvl_pd.protos import auth

FP = LayoutFingerprint("m", "float32", 16, 2, 2, 8)
HANDLE = KVHandle("prefill-1", "127.0.0.1:7000", 4096, 512, 64, (3, 4), 20, FP, 1_000, "127.0.0.1:50051")


def test_a_signed_handle_verifies_and_every_change_breaks_it():
    signed = auth.sign(HANDLE, b"k")
    assert len(signed.signature) == 32 and auth.is_signed(signed, b"k")
    assert not auth.is_signed(signed, b"another cluster")
    for change in ({"block_ids": (5, 6)}, {"kv_base_ptr": 8192}, {"control_address": ""},
                   {"lease_expires_unix_ms": 10**13}, {"transfer_address": "10.0.0.9:7000"}):
        assert not auth.is_signed(dataclasses.replace(signed, **change), b"k"), change
    assert not auth.is_signed(HANDLE, b"k")  # never signed


def test_leases_are_capped():
    assert lease_seconds(0, 30.0) == 30.0
    assert lease_seconds(5_000, 30.0) == 5.0
    assert lease_seconds(49 * 24 * 3600 * 1000, 30.0) == 600.0


def test_read_secret_strips_what_kubernetes_adds_and_refuses_empty(monkeypatch, tmp_path):
    monkeypatch.setenv(auth.ENV, "s3cret\n")
    assert auth.read_secret() == b"s3cret"
    (tmp_path / "s").write_bytes(b"  from-file\r\n")
    assert auth.read_secret(str(tmp_path / "s")) == b"from-file"
    monkeypatch.setenv(auth.ENV, " \n")
    with pytest.raises(SystemExit, match="empty"):
        auth.read_secret()
    monkeypatch.delenv(auth.ENV)
    assert auth.read_secret() == b""


def _echo_server(secret: bytes):
    async def echo(request, context):
        return request
    handler = grpc.method_handlers_generic_handler("t.Echo", {"Say": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.aio.server(interceptors=[auth.ServerAuth(secret)])
    server.add_generic_rpc_handlers((handler,))
    return server, server.add_insecure_port("127.0.0.1:0")


@pytest.mark.parametrize("secret", [b"with newline\n".strip(), b"\xff\x00binary", "k\u00e9y".encode()])
def test_any_secret_bytes_authenticate_and_a_wrong_one_is_refused(secret):
    async def run():
        server, port = _echo_server(secret)
        await server.start()
        try:
            async with auth.channel(f"127.0.0.1:{port}", secret) as ch:
                assert await ch.unary_unary("/t.Echo/Say")(b"hi", timeout=5) == b"hi"
            async with auth.channel(f"127.0.0.1:{port}", b"other") as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ch.unary_unary("/t.Echo/Say")(b"hi", timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(None)
    asyncio.run(run())
