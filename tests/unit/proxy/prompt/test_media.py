"""Media fetching and header-only inspection. HTTP tests talk to a server on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image, ImageFile

from qwenvl_pd.model.processor import load_image, process_image
from qwenvl_pd.model.vision_config import VisionPreprocessConfig
from qwenvl_pd.proxy.prompt import media
from qwenvl_pd.proxy.prompt.media import (
    ImageInfo,
    MediaError,
    MediaLimits,
    content_hash,
    fetch_media,
    image_tokens,
    inspect_image,
    prepare_image,
)


def png(w: int = 48, h: int = 32, color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR declares w x h, with no pixel data at all."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IEND", b"")


PNG = png()
LOOP = MediaLimits(max_bytes=100_000, timeout_s=2.0, max_redirects=2, allow_private=True)


def run(coro):  # no pytest-asyncio in this project
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


# ---- a tiny HTTP server on loopback -----------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    log: list[tuple[str, str]] = []  # (path, Host header) of every request seen
    big_finished = threading.Event()

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        try:
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up first (the timeout tests): expected
            pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        Handler.log.append((self.path, self.headers.get("Host", "")))
        path = self.path
        if path == "/img.png":
            self._send(200, PNG, {"Content-Type": "image/png"})
        elif path == "/text":
            self._send(200, b"<html>not an image</html>", {"Content-Type": "image/png"})
        elif path.startswith("/redirect/"):
            n = int(path.rsplit("/", 1)[1])
            self._send(302, headers={"Location": f"/redirect/{n - 1}" if n else "/img.png"})
        elif path.startswith("/goto?"):
            self._send(302, headers={"Location": path[len("/goto?"):]})
        elif path == "/declared-big":
            self._send(200, b"x" * 200_000)
        elif path == "/endless":
            self._stream_endless()
        elif path == "/slow":
            time.sleep(5)
            self._send(200, PNG)
        elif path == "/drip":
            self._drip()
        else:
            self._send(404, b"nope")

    def _stream_endless(self) -> None:
        # no Content-Length: the body ends when the connection closes; 64 MiB if nobody stops us
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for _ in range(1024):
                self.wfile.write(b"y" * 65536)
            Handler.big_finished.set()
        except OSError:
            pass

    def _drip(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "40")
        self.end_headers()
        try:
            for _ in range(40):
                self.wfile.write(b"z")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.block_on_close = False  # do not wait for the deliberately slow handlers
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def log(server):
    Handler.log.clear()
    return Handler.log


# ---- data: URLs -------------------------------------------------------------------------------

def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_data_url_roundtrip():
    assert run(fetch_media(data_url(PNG), MediaLimits())) == PNG
    unpadded = data_url(PNG).rstrip("=")
    assert run(fetch_media(unpadded, MediaLimits())) == PNG
    assert run(fetch_media(data_url(b"\0\1", "video/mp4"), MediaLimits(), kind="video")) == b"\0\1"


@pytest.mark.parametrize("url, message", [
    ("data:image/png;base64,@@@@", "not valid base64"),
    ("data:image/png;base64,", "empty"),
    ("data:text/plain;base64,aGk=", "not an image type"),
    ("data:;base64,aGk=", "not an image type"),
    ("data:image/png,rawbytes", "base64-encoded"),
    ("data:image/png;base64", "no ','"),
])
def test_bad_data_urls(url, message):
    with pytest.raises(MediaError, match=message):
        run(fetch_media(url, MediaLimits()))


def test_data_url_over_the_byte_cap():
    with pytest.raises(MediaError, match="100-byte limit"):
        run(fetch_media(data_url(b"x" * 101), MediaLimits(max_bytes=100)))
    with pytest.raises(MediaError, match="not an video type"):
        run(fetch_media(data_url(PNG), MediaLimits(), kind="video"))


def test_unsupported_scheme():
    with pytest.raises(MediaError, match="unsupported URL scheme 'ftp'"):
        run(fetch_media("ftp://example.com/x.png", MediaLimits()))


# ---- http(s) ----------------------------------------------------------------------------------

def test_http_image(server, log):
    assert run(fetch_media(f"{server}/img.png", LOOP)) == PNG
    assert [p for p, _ in log] == ["/img.png"]


def test_loopback_refused_before_connecting(server, log):
    with pytest.raises(MediaError, match="loopback address"):
        run(fetch_media(f"{server}/img.png", MediaLimits()))
    assert log == []


def test_localhost_name_refused_before_connecting(server, log):
    port = server.rsplit(":", 1)[1]
    with pytest.raises(MediaError, match="loopback"):
        run(fetch_media(f"http://localhost:{port}/img.png", MediaLimits()))
    assert log == []


def test_redirects_followed_up_to_the_cap(server, log):
    assert run(fetch_media(f"{server}/redirect/1", LOOP)) == PNG  # 2 redirects, cap 2
    assert [p for p, _ in log] == ["/redirect/1", "/redirect/0", "/img.png"]


def test_redirect_chain_longer_than_cap(server, log):
    with pytest.raises(MediaError, match="too many redirects"):
        run(fetch_media(f"{server}/redirect/5", LOOP))
    assert len(log) == LOOP.max_redirects + 1


def test_connection_is_pinned_and_each_hop_resolved(server, log):
    port = int(server.rsplit(":", 1)[1])
    calls = []

    async def resolver(host, p):  # names that exist only here, all on loopback
        calls.append((host, p))
        return ["127.0.0.1"]

    url = f"http://first.test:{port}/goto?http://second.test:{port}/img.png"
    assert run(fetch_media(url, LOOP, resolver=resolver)) == PNG
    assert calls == [("first.test", port), ("second.test", port)]
    assert [h for _, h in log] == [f"first.test:{port}", f"second.test:{port}"]  # original Host kept


def test_redirect_to_a_private_address_is_refused(server, log, monkeypatch):
    # the first host counts as public here; its redirect into loopback must still be refused
    real = media.check_url_host

    async def check(host, allow_private, port, resolver):
        return ["127.0.0.1"] if host == "public.test" else await real(host, False, port, resolver)

    monkeypatch.setattr(media, "check_url_host", check)
    port = server.rsplit(":", 1)[1]
    with pytest.raises(MediaError, match="loopback"):
        run(fetch_media(f"http://public.test:{port}/goto?{server}/img.png", LOOP))
    assert [p for p, _ in log] == [f"/goto?{server}/img.png"]


def test_redirect_to_file_is_refused(server, log, tmp_path):
    limits = MediaLimits(**{**LOOP.__dict__, "allowed_local_media_path": str(tmp_path)})
    (tmp_path / "a.png").write_bytes(PNG)
    with pytest.raises(MediaError, match="non-HTTP"):
        run(fetch_media(f"{server}/goto?file://{tmp_path}/a.png", limits))


def test_declared_oversized_body(server, log):
    with pytest.raises(MediaError, match="100000-byte limit .*Content-Length 200000"):
        run(fetch_media(f"{server}/declared-big", LOOP))


def test_streamed_body_aborts_at_the_cap(server, log):
    Handler.big_finished.clear()
    start = time.monotonic()
    with pytest.raises(MediaError, match="100000-byte limit"):
        run(fetch_media(f"{server}/endless", LOOP))
    assert time.monotonic() - start < 5
    assert not Handler.big_finished.wait(0.5)  # the server never got to write all 64 MiB


def test_slow_response_times_out(server, log):
    start = time.monotonic()
    with pytest.raises(MediaError, match="longer than 0.5 s"):
        run(fetch_media(f"{server}/slow", MediaLimits(timeout_s=0.5, allow_private=True)))
    assert time.monotonic() - start < 3  # the server answers only after 5 s


def test_total_timeout_covers_a_dripping_body(server, log):
    # every read returns within 0.1 s; only a deadline on the whole fetch stops this
    with pytest.raises(MediaError, match="longer than 0.5 s"):
        run(fetch_media(f"{server}/drip", MediaLimits(timeout_s=0.5, allow_private=True)))


def test_http_error_status(server, log):
    with pytest.raises(MediaError, match="HTTP 404"):
        run(fetch_media(f"{server}/missing", LOOP))


def test_non_image_body_is_refused_by_inspection(server, log):
    data = run(fetch_media(f"{server}/text", LOOP))
    with pytest.raises(MediaError, match="not a supported image"):
        inspect_image(data, LOOP.max_image_pixels)
    with pytest.raises(MediaError, match="not a supported image"):
        run(prepare_image(f"{server}/text", LOOP, VisionPreprocessConfig()))


def test_prepare_image_over_http(server, log):
    got = run(prepare_image(f"{server}/img.png", LOOP, VisionPreprocessConfig()))
    assert (got.data, got.info, got.content_hash) == (PNG, ImageInfo(48, 32, "PNG"), content_hash(PNG))
    # 32x48 is scaled up to 56x84 (min_pixels), i.e. 4x6 patches of 14, 6 merged tokens
    assert (got.grid_thw, got.num_tokens) == ((1, 4, 6), 6)


# ---- file:// ----------------------------------------------------------------------------------

@pytest.fixture
def media_dir(tmp_path):
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(png(color=(0, 0, 0)))
    os.symlink(tmp_path / "secret.png", root / "escape.png")
    os.symlink(root / "sub" / "a.png", root / "inside.png")
    return root


def file_limits(root, **kw) -> MediaLimits:
    return MediaLimits(allowed_local_media_path=str(root), **kw)


def test_file_inside_allowed_dir(media_dir):
    assert run(fetch_media(f"file://{media_dir}/sub/a.png", file_limits(media_dir))) == PNG
    assert run(fetch_media(f"file://{media_dir}/inside.png", file_limits(media_dir))) == PNG
    assert run(fetch_media(f"file://localhost{media_dir}/sub/a%2Epng", file_limits(media_dir))) == PNG


@pytest.mark.parametrize("rel", ["../secret.png", "escape.png", "sub/../../secret.png"])
def test_file_outside_allowed_dir(media_dir, rel):
    with pytest.raises(MediaError, match="outside the allowed"):
        run(fetch_media(f"file://{media_dir}/{rel}", file_limits(media_dir)))


def test_file_urls_disabled_by_default(media_dir):
    with pytest.raises(MediaError, match="disabled"):
        run(fetch_media(f"file://{media_dir}/sub/a.png", MediaLimits()))


def test_file_errors(media_dir):
    limits = file_limits(media_dir)
    with pytest.raises(MediaError, match="regular file"):
        run(fetch_media(f"file://{media_dir}/sub", limits))
    os.mkfifo(media_dir / "fifo")  # would block a plain open() forever
    with pytest.raises(MediaError, match="regular file"):
        run(fetch_media(f"file://{media_dir}/fifo", limits))
    with pytest.raises(MediaError, match="cannot read"):
        run(fetch_media(f"file://{media_dir}/none.png", limits))
    with pytest.raises(MediaError, match="local path"):
        run(fetch_media(f"file://otherhost{media_dir}/sub/a.png", limits))
    with pytest.raises(MediaError, match="NUL byte"):
        run(fetch_media(f"file://{media_dir}/sub/a.png%00.jpg", limits))
    with pytest.raises(MediaError, match="10-byte limit"):
        run(fetch_media(f"file://{media_dir}/sub/a.png", file_limits(media_dir, max_bytes=10)))


# ---- inspection -------------------------------------------------------------------------------

@pytest.fixture
def no_decoding(monkeypatch):
    """Any pixel decoding during the test fails it."""
    def refuse(self):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_inspect_reads_the_header_only(no_decoding):
    assert inspect_image(PNG, 10_000) == ImageInfo(48, 32, "PNG")
    assert inspect_image(png_header_only(640, 480), 10**6) == ImageInfo(640, 480, "PNG")


@pytest.mark.parametrize("w, h", [(100_000, 100_000), (10_000, 10_000)])
def test_decompression_bomb_refused_without_decoding(no_decoding, w, h):
    with pytest.raises(MediaError, match="decompression bomb"):
        inspect_image(png_header_only(w, h), 8192 * 8192)


def test_inspect_refuses_non_images_and_unlisted_formats():
    with pytest.raises(MediaError, match="not a supported image"):
        inspect_image(b"GIF89a-but-not-really", 10**6)
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, "ICO")
    with pytest.raises(MediaError, match="not a supported image"):
        inspect_image(ico.getvalue(), 10**6)


def test_exif_rotation_swaps_sides_like_the_processor(no_decoding):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    buf = io.BytesIO()
    Image.new("RGB", (60, 40)).save(buf, "JPEG", exif=exif.tobytes())
    info = inspect_image(buf.getvalue(), 10**6)
    assert info == ImageInfo(40, 60, "JPEG")


def test_exif_size_matches_decoded_image():
    exif = Image.Exif()
    exif[0x0112] = 8
    buf = io.BytesIO()
    Image.new("RGB", (90, 30)).save(buf, "WEBP", exif=exif.tobytes())
    info = inspect_image(buf.getvalue(), 10**6)
    assert (info.width, info.height) == load_image(buf.getvalue()).size == (30, 90)


@pytest.mark.parametrize("w, h", [(48, 32), (1000, 700), (3000, 200), (20, 20)])
def test_image_tokens_match_the_processor(w, h):
    cfg = VisionPreprocessConfig()
    grid, n = image_tokens(w, h, cfg)
    _, want = process_image(png(w, h), cfg)
    assert grid == want and n == want[0] * want[1] * want[2] // 4


def test_image_tokens_refuses_extreme_aspect():
    with pytest.raises(MediaError, match="aspect ratio"):
        image_tokens(5000, 10, VisionPreprocessConfig())


def test_content_hash():
    assert content_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
