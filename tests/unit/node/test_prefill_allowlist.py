import asyncio

from qwenvl_pd.decode_node.prefill_allowlist import PrefillAllowList, handle_hosts, host_of
from qwenvl_pd.kv_transfer.handle import KVHandle, KVSegment, LayoutFingerprint

FP = LayoutFingerprint(model="m", dtype="float32", block_size=16, num_layers=2, num_kv_heads=2, head_dim=8,
                       tp_size=2)


def _handle(control: str, transfer: str, rank1: str) -> KVHandle:
    return KVHandle(instance_id="p0", transfer_address=transfer, kv_base_ptr=4096, block_bytes=512,
                    region_num_blocks=8, block_ids=(1, 2), num_tokens=20, fingerprint=FP,
                    control_address=control, rank_segments=(KVSegment(rank1, 8192),))


def test_hosts_of_addresses_and_of_a_handle():
    assert [host_of(a) for a in ("10.0.0.7:50051", "[fd00::7]:17777", "prefill.ns.svc", "::1")] == \
        ["10.0.0.7", "fd00::7", "prefill.ns.svc", "::1"]
    assert handle_hosts(_handle("10.0.0.7:50051", "10.0.0.7:17777", "10.0.0.8:17778")) == \
        ["10.0.0.7", "10.0.0.7", "10.0.0.8"]


def test_a_handle_is_read_only_when_every_host_it_names_is_an_allowed_prefills():
    local = _handle("127.0.0.1:50051", "127.0.0.1:17777", "127.0.0.1:17778")
    elsewhere = _handle("127.0.0.1:50051", "127.0.0.1:17777", "10.255.255.9:17778")

    async def verdicts():
        allowed = PrefillAllowList(("localhost:50051", " "))
        return [await allowed.refusal(local), await allowed.refusal(elsewhere),
                await PrefillAllowList(("10.255.255.1",)).refusal(local), bool(PrefillAllowList(()))]

    ok, rank_elsewhere, none_allowed, empty = asyncio.run(verdicts())
    assert ok is None and empty is False
    assert rank_elsewhere == ("the KV handle names 10.255.255.9, not a prefill this decode reads from "
                              "(--allowed-prefills localhost)")
    assert none_allowed == ("the KV handle names 127.0.0.1, not a prefill this decode reads from "
                            "(--allowed-prefills 10.255.255.1)")
