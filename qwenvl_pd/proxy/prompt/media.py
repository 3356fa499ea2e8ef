"""Fetch and inspect the images of a request, without ever decoding their pixels in the proxy.

Prefill gets the encoded bytes (about 60x smaller than pixel tensors) and decodes them itself;
the proxy only needs the size, which the image header carries, to count placeholder tokens with
the model's own smart-resize. Every source is bounded: bytes, time, redirects, addresses, paths.
Failures raise MediaError (a ValueError); the caller turns it into a 400 naming the part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import os
import stat
import urllib.parse
import warnings
from dataclasses import dataclass

import httpx
from PIL import Image, UnidentifiedImageError

from qwenvl_pd.model.grid import Grid, image_grid, num_vision_tokens
from qwenvl_pd.model.vision_config import VisionPreprocessConfig
from qwenvl_pd.proxy.prompt.netguard import BlockedAddressError, Resolver, check_url_host, getaddrinfo_resolver

__all__ = ["MediaError", "MediaLimits", "ImageInfo", "PreparedImage", "fetch_media", "inspect_image",
           "content_hash", "image_tokens", "prepare_image", "IMAGE_FORMATS"]

# the formats cameras and browsers produce; other PIL parsers are attack surface for no gain
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_REDIRECTS = (301, 302, 303, 307, 308)
_ORIENTATION = 0x0112


class MediaError(ValueError):
    """The media cannot be used; the message says why, for the client."""


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0  # the whole fetch, every redirect hop included
    max_redirects: int = 3
    allow_private: bool = False
    allowed_local_media_path: str | None = None  # file:// URLs are refused unless set
    max_image_pixels: int = 8192 * 8192  # header-declared width * height (of a video frame too)
    max_video_frames: int = 100_000  # frames a video's stream declares or holds


@dataclass(frozen=True)
class ImageInfo:
    width: int  # after EXIF rotation, as the processor will see it
    height: int
    format: str


@dataclass(frozen=True)
class PreparedImage:
    data: bytes
    info: ImageInfo
    content_hash: str
    grid_thw: Grid
    num_tokens: int


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- sources ---------------------------------------------------------------------------------

def _from_data_url(url: str, limits: MediaLimits, kind: str) -> bytes:
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise MediaError("malformed data URL: no ',' before the payload")
    mime, *params = (p.strip().lower() for p in header.split(";"))
    if "base64" not in params:
        raise MediaError("data URLs must be base64-encoded (data:<type>;base64,<data>)")
    if not mime.startswith(f"{kind}/"):
        raise MediaError(f"data URL media type {mime or '(none)'!r} is not an {kind} type ({kind}/...)")
    if len(payload) * 3 // 4 > limits.max_bytes + 3:  # refuse before decoding a huge payload
        raise MediaError(f"{kind} is larger than the {limits.max_bytes}-byte limit")
    payload = "".join(payload.split())
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("data URL payload is not valid base64") from None
    if not data:
        raise MediaError("data URL payload is empty")
    if len(data) > limits.max_bytes:
        raise MediaError(f"{kind} is larger than the {limits.max_bytes}-byte limit")
    return data


def _read_regular_file(path: str, max_bytes: int) -> bytes:
    # O_NONBLOCK: opening a FIFO must not hang; fstat then refuses it along with directories
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise MediaError("local media must be a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > max_bytes:
            raise MediaError(f"file is larger than the {max_bytes}-byte limit")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew after fstat
        raise MediaError(f"file is larger than the {max_bytes}-byte limit")
    return data


async def _from_file_url(url: str, limits: MediaLimits) -> bytes:
    if not limits.allowed_local_media_path:
        raise MediaError("file:// URLs are disabled (the server has no --allowed-local-media-path)")
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError("file:// URLs must name a local path (file:///path)")
    root = os.path.realpath(limits.allowed_local_media_path)
    raw = urllib.parse.unquote(parts.path)
    if "\0" in raw:  # the OS would refuse it with a ValueError, not an OSError
        raise MediaError("file:// path contains a NUL byte")
    # realpath resolves symlinks and '..', so a link inside the root cannot lead outside it
    path = os.path.realpath(raw)
    if os.path.commonpath([path, root]) != root:
        raise MediaError("file:// path is outside the allowed local media directory")
    try:
        return await asyncio.to_thread(_read_regular_file, path, limits.max_bytes)
    except OSError as e:
        raise MediaError(f"cannot read local media file: {e.strerror or e}") from None


async def read_capped(chunks, declared: str, limit: int, error) -> bytes:
    """Collect an async byte stream, refusing (error(message)) past `limit` bytes, early when
    the declared Content-Length already says so."""
    if declared.isdigit() and int(declared) > limit:
        raise error(f"larger than the {limit}-byte limit (Content-Length {declared})")
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > limit:
            raise error(f"larger than the {limit}-byte limit")
    return bytes(buf)


async def _read_capped(resp: httpx.Response, max_bytes: int) -> bytes:
    # raw bytes: we asked for identity encoding, and decompressing here would defeat the cap
    return await read_capped(resp.aiter_raw(), resp.headers.get("content-length", ""), max_bytes,
                             lambda m: MediaError(f"media is {m}"))


async def _http_hop(client: httpx.AsyncClient, url: httpx.URL, limits: MediaLimits,
                    resolver: Resolver) -> tuple[httpx.URL | None, bytes]:
    """One request to a checked, pinned address: (next URL, b"") on a redirect, else (None, body)."""
    if url.scheme not in ("http", "https") or not url.host:
        raise MediaError(f"redirect to a non-HTTP URL is refused: {url}")
    port = url.port or (443 if url.scheme == "https" else 80)
    addrs = await check_url_host(url.host, limits.allow_private, port, resolver)
    # connect to the address we checked, not to whatever a second DNS lookup would say
    pinned = url.copy_with(host=addrs[0])
    headers = {"Host": url.netloc.decode("ascii"), "Accept-Encoding": "identity"}
    ext = {"sni_hostname": url.host} if url.scheme == "https" else {}
    request = client.build_request("GET", pinned, headers=headers, extensions=ext)
    resp = await client.send(request, stream=True, follow_redirects=False)
    try:
        if resp.status_code in _REDIRECTS and "location" in resp.headers:
            return url.join(resp.headers["location"]), b""
        if resp.status_code != 200:
            raise MediaError(f"fetching {url} failed: HTTP {resp.status_code}")
        return None, await _read_capped(resp, limits.max_bytes)
    finally:
        await resp.aclose()


async def _from_http(url: str, limits: MediaLimits, resolver: Resolver) -> bytes:
    # one client per fetch: a pooled connection pinned for one host must not serve another
    async with httpx.AsyncClient(trust_env=False, timeout=limits.timeout_s) as client:
        target: httpx.URL | None = httpx.URL(url)
        for _ in range(limits.max_redirects + 1):
            target, body = await _http_hop(client, target, limits, resolver)
            if target is None:
                return body
    raise MediaError(f"too many redirects (more than {limits.max_redirects})")


async def fetch_media(url: str, limits: MediaLimits, kind: str = "image",
                      resolver: Resolver = getaddrinfo_resolver) -> bytes:
    """The bytes behind a data:, http(s): or file:// URL, within limits. Raises MediaError."""
    scheme = url.split(":", 1)[0].lower()
    try:
        if scheme == "data":
            return _from_data_url(url, limits, kind)
        if scheme == "file":
            return await asyncio.wait_for(_from_file_url(url, limits), limits.timeout_s)
        if scheme in ("http", "https"):
            return await asyncio.wait_for(_from_http(url, limits, resolver), limits.timeout_s)
    except asyncio.TimeoutError:
        raise MediaError(f"fetching the {kind} took longer than {limits.timeout_s} s") from None
    except BlockedAddressError as e:
        raise MediaError(str(e)) from None
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise MediaError(f"fetching the {kind} failed: {type(e).__name__}: {e}") from None
    raise MediaError(f"unsupported URL scheme {scheme!r}")


# ---- inspection ------------------------------------------------------------------------------

def _orientation(img: Image.Image) -> int | None:
    try:
        # the base class reads header metadata only; PngImageFile.getexif would decode the pixels
        return Image.Image.getexif(img).get(_ORIENTATION)
    except Exception:  # noqa: BLE001 - a broken EXIF block just means "no rotation"
        return None


def inspect_image(data: bytes, max_pixels_decoded: int) -> ImageInfo:
    """Size and format from the header alone; refuses non-images and decompression bombs
    (declared width * height over the cap) before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise MediaError("image declares too many pixels (decompression bomb)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise MediaError(f"the data is not a supported image ({', '.join(IMAGE_FORMATS)})") from None
    with img:
        width, height = img.size
        if width * height > max_pixels_decoded:
            raise MediaError(f"image is {width}x{height} = {width * height} pixels; the limit is "
                             f"{max_pixels_decoded} (decompression bomb guard)")
        if width <= 0 or height <= 0:
            raise MediaError(f"image is empty ({width}x{height})")
        # prefill applies the EXIF rotation before resizing, so 90-degree turns swap the sides
        if _orientation(img) in (5, 6, 7, 8):
            width, height = height, width
        return ImageInfo(width, height, img.format or "")


def image_tokens(width: int, height: int, cfg: VisionPreprocessConfig) -> tuple[Grid, int]:
    """(grid_thw, placeholder count) of an image of this size, by the model's own smart-resize."""
    try:
        grid = image_grid(height, width, cfg)
    except ValueError as e:  # e.g. aspect ratio over 200
        raise MediaError(str(e)) from None
    return grid, num_vision_tokens(grid, cfg.merge_size)


async def prepare_image(url: str, limits: MediaLimits, cfg: VisionPreprocessConfig,
                        resolver: Resolver = getaddrinfo_resolver) -> PreparedImage:
    """Fetch, inspect, hash and size one image part: everything prefill's MediaItem needs."""
    data = await fetch_media(url, limits, "image", resolver)
    info = inspect_image(data, limits.max_image_pixels)
    grid, n = image_tokens(info.width, info.height, cfg)
    return PreparedImage(data, info, content_hash(data), grid, n)
