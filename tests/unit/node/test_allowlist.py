"""The --allowed-prefills (decode) and --allowed-encoders (prefill) lists: hosts of the addresses
a handle names, matched by resolved IPs (node/allowlist.py)."""
import asyncio

from qwenvl_pd.decode_node.prefill_allowlist import handle_addresses as kv_addresses, prefill_allowlist
from qwenvl_pd.kv_transfer.embedding_handle import EmbeddingHandle
from qwenvl_pd.kv_transfer.handle import KVHandle, KVSegment, LayoutFingerprint
from qwenvl_pd.node.allowlist import HostAllowList, host_of
from qwenvl_pd.prefill_node.encoder_allowlist import encoder_allowlist, handle_addresses as embedding_addresses

FP = LayoutFingerprint(model="m", dtype="float32", block_size=16, num_layers=2, num_kv_heads=2, head_dim=8,
                       tp_size=2)


def _handle(control: str, transfer: str, rank1: str) -> KVHandle:
    return KVHandle(instance_id="p0", transfer_address=transfer, kv_base_ptr=4096, block_bytes=512,
                    region_num_blocks=8, block_ids=(1, 2), num_tokens=20, fingerprint=FP,
                    control_address=control, rank_segments=(KVSegment(rank1, 8192),))


def _embedding(transfer: str, control: str = "") -> EmbeddingHandle:
    return EmbeddingHandle("k", "e0", transfer, 4096, 4 * 8 * 4, 4, 8, "float32", "vfp", control_address=control)


def test_hosts_of_addresses_and_the_addresses_of_handles():
    assert [host_of(a) for a in ("10.0.0.7:50051", "[fd00::7]:17777", "prefill.ns.svc", "::1")] == \
        ["10.0.0.7", "fd00::7", "prefill.ns.svc", "::1"]
    assert kv_addresses(_handle("10.0.0.7:50051", "10.0.0.7:17777", "10.0.0.8:17778")) == \
        ["10.0.0.7:50051", "10.0.0.7:17777", "10.0.0.8:17778"]
    assert embedding_addresses(_embedding("10.0.0.9:17777", "10.0.0.9:50053")) == \
        ["10.0.0.9:17777", "10.0.0.9:50053"]


def test_a_kv_handle_is_read_only_when_every_host_it_names_is_an_allowed_prefills():
    local = _handle("127.0.0.1:50051", "127.0.0.1:17777", "127.0.0.1:17778")
    elsewhere = _handle("127.0.0.1:50051", "127.0.0.1:17777", "10.255.255.9:17778")

    async def verdicts():
        allowed = prefill_allowlist(("localhost:50051", " "))
        return [await allowed.refusal("the KV handle", kv_addresses(local)),
                await allowed.refusal("the KV handle", kv_addresses(elsewhere)),
                await prefill_allowlist(("10.255.255.1",)).refusal("the KV handle", kv_addresses(local)),
                bool(prefill_allowlist(()))]

    ok, rank_elsewhere, none_allowed, empty = asyncio.run(verdicts())
    assert ok is None and empty is False
    assert rank_elsewhere == ("the KV handle names 10.255.255.9, not a prefill this decode reads from "
                              "(--allowed-prefills localhost)")
    assert none_allowed == ("the KV handle names 127.0.0.1, not a prefill this decode reads from "
                            "(--allowed-prefills 10.255.255.1)")


def test_an_embedding_handle_passes_only_when_its_engine_and_release_addresses_are_allowed():
    async def verdicts():
        allowed = encoder_allowlist(("127.0.0.1", "localhost:50053"))
        names = [["127.0.0.1:17777", "127.0.0.1:50053"], ["127.0.0.1:17777", ""],
                 ["127.0.0.1:17777", "10.255.255.9:50053"], ["unresolvable.invalid:1", "127.0.0.1:2"]]
        return [await allowed.refusal("item 0's embedding handle", n) for n in names], allowed.hosts
    (local, no_control, control_elsewhere, unresolvable), hosts = asyncio.run(verdicts())
    assert (local, no_control, hosts) == (None, None, ("127.0.0.1", "localhost"))
    assert control_elsewhere == ("item 0's embedding handle names 10.255.255.9, not an encoder this prefill "
                                 "reads from (--allowed-encoders 127.0.0.1,localhost)")
    assert unresolvable.startswith("item 0's embedding handle names unresolvable.invalid, not an encoder")


def test_names_are_resolved_again_after_resolve_s(monkeypatch):
    import qwenvl_pd.node.allowlist as allowlist
    allowed = HostAllowList(("127.0.0.1",), "--allowed-x", "an x")
    clock = [100.0]
    monkeypatch.setattr(allowlist.time, "monotonic", lambda: clock[0])

    async def rounds():
        first = await allowed.refusal("h", ["127.0.0.1:1"])
        allowed.hosts = ("10.255.255.1",)  # as if the name now resolved elsewhere
        cached = await allowed.refusal("h", ["127.0.0.1:1"])
        clock[0] += allowlist.RESOLVE_S
        return first, cached, await allowed.refusal("h", ["127.0.0.1:1"])
    first, cached, later = asyncio.run(rounds())
    assert (first, cached) == (None, None)
    assert later == "h names 127.0.0.1, not an x (--allowed-x 10.255.255.1)"
