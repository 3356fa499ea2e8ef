import dataclasses

from qwenvl_pd.kv_transfer.embedding_key import bytes_hash, embedding_key
from qwenvl_pd.messages import MediaItem

IMAGE = MediaItem(kind="image", content_hash=bytes_hash(b"png"), grid_thw=(1, 4, 6), data=b"png")


def test_key_is_a_fixed_digest_of_the_items_identity():
    # pinned: proxy, encode and prefill of different builds must agree (a change bumps KEY_VERSION)
    assert bytes_hash(b"png") == "8f8cbb7dcf46e0bc7d53265749a6c17d116093a6ba95e442764060c76fd4a86c"
    assert embedding_key(IMAGE, "fp") == "997985fa0ac284b8971a051ba793dabc3e230e0beaa959680039f03d2129de6b"


def test_every_field_changes_the_key():
    video = MediaItem(kind="video", content_hash="h", grid_thw=(2, 4, 6), data=b"mp4",
                      second_per_grid_t=1.0)
    base = embedding_key(video, "fp")
    changed = [dataclasses.replace(video, content_hash="h2"), dataclasses.replace(video, grid_thw=(2, 4, 8)),
               dataclasses.replace(video, second_per_grid_t=0.5), dataclasses.replace(video, timestamps=(0.0, 1.0)),
               dataclasses.replace(video, fps=2.0), dataclasses.replace(video, kind="image")]
    keys = {embedding_key(v, "fp") for v in changed} | {embedding_key(video, "fp2")}
    assert len(keys) == 7 and base not in keys


def test_the_bytes_themselves_are_not_hashed():
    # prefill holding only a handle (no bytes) computes the same key
    handle_only = dataclasses.replace(IMAGE, data=b"other bytes")
    assert embedding_key(handle_only, "fp") == embedding_key(IMAGE, "fp")


def test_the_key_and_store_modules_load_no_torch():  # the proxy imports them
    import subprocess
    import sys
    code = ("import sys, qwenvl_pd.kv_transfer.embedding_key, qwenvl_pd.kv_transfer.embedding_store\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr
