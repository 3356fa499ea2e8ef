"""https fetches stay pinned to the checked address while TLS still verifies the URL's hostname.

A self-signed certificate for images.test (made with the openssl CLI) is served on 127.0.0.1; the
fetch resolves images.test through a test resolver and must present that name as SNI and check the
certificate against it, not against the IP it connects to.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qwenvl_pd.proxy.prompt import media
from qwenvl_pd.proxy.prompt.media import MediaError, MediaLimits, fetch_media

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
LIMITS = MediaLimits(timeout_s=5.0, allow_private=True)
PNG = b"\x89PNG\r\n\x1a\n-pretend"  # only the bytes matter here


class Handler(BaseHTTPRequestHandler):
    log: list[tuple[str, str]] = []

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        Handler.log.append((self.path, self.headers.get("Host", "")))
        self.send_response(200)
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=images.test", "-addext", "subjectAltName=DNS:images.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1], str(cert)
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def trust(monkeypatch, tls_server):
    """The fetch's client trusts the test certificate (and nothing else changes)."""
    ctx = ssl.create_default_context(cafile=tls_server[1])
    monkeypatch.setattr(media.httpx, "AsyncClient", functools.partial(media.httpx.AsyncClient, verify=ctx))
    return tls_server[0]


async def loopback(host, port):
    return ["127.0.0.1"]


def fetch(url):
    return asyncio.run(asyncio.wait_for(fetch_media(url, LIMITS, resolver=loopback), 30))


def test_https_pinned_with_sni_and_hostname_check(trust):
    Handler.log.clear()
    assert fetch(f"https://images.test:{trust}/img.png") == PNG
    assert Handler.log == [("/img.png", f"images.test:{trust}")]


def test_https_certificate_for_another_name_is_refused(trust):
    with pytest.raises(MediaError, match="Hostname mismatch.*other.test"):
        fetch(f"https://other.test:{trust}/img.png")
