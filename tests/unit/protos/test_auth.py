"""Handle signatures with the cluster secret: exact, and any change to the handle breaks them."""
import dataclasses

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
