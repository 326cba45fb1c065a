"""download(): caching, resuming, retries and checksums against a local HTTP server."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.sources import download as download_module
from pipeline.sources.download import ChecksumError, DownloadError, download, sha256_file

PAYLOAD = bytes(range(256)) * 400  # 100 KiB, several read chunks
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class FileServer(ThreadingHTTPServer):
    """Serves PAYLOAD at every path, with switches for the failures under test."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), PayloadHandler)
        self.ranges: list[str | None] = []  # the Range header of every request, in order
        self.cut_first_after: int | None = None  # first request: send this many bytes, hang up
        self.stall_first_s = 0.0  # first request: wait this long after the headers
        self.errors: list[int] = []  # statuses to answer before serving (popped in order)
        self.not_found = False
        self.ignore_range = False
        self.etag: str | None = '"v1"'  # sent with every answer; If-Range is honoured
        self.payload = PAYLOAD
        self.content_type = "application/octet-stream"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/data.bin"


class PayloadHandler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:
        server = self.server
        server.ranges.append(self.headers.get("Range"))
        first = len(server.ranges) == 1
        if server.not_found:
            self.send_error(404)
            return
        if server.errors:
            self.send_error(server.errors.pop(0))
            return
        start, payload = 0, server.payload
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if_range = self.headers.get("If-Range")
        if match and not server.ignore_range and if_range in (None, server.etag):
            start = int(match[1])
            if start >= len(payload):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(payload)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        else:
            self.send_response(200)
        body = payload[start:]
        if server.etag:
            self.send_header("ETag", server.etag)
        self.send_header("Content-Type", server.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if first and server.stall_first_s:
            time.sleep(server.stall_first_s)
        if first and server.cut_first_after is not None:
            body = body[: server.cut_first_after]
        with contextlib.suppress(ConnectionError):  # the timeout test's client hangs up first
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""


@pytest.fixture
def server() -> Iterator[FileServer]:
    httpd = FileServer()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the backoff delays instead of sleeping."""
    delays: list[float] = []
    monkeypatch.setattr(download_module.time, "sleep", delays.append)
    return delays


def fetch(url: str, dest: Path, **kwargs: object) -> str:
    kwargs = {"progress": False, "timeout": 5.0, "backoff": 0.0, **kwargs}
    return download(url, dest, **kwargs)  # type: ignore[arg-type]


def leftovers(dest: Path) -> list[str]:
    return sorted(path.name for path in dest.parent.iterdir())


def test_full_download(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "data.bin"
    digest = fetch(server.url, dest, sha256=PAYLOAD_SHA256.upper())
    assert digest == PAYLOAD_SHA256 == sha256_file(dest)
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(dest) == ["data.bin", "data.bin.sha256"]
    assert server.ranges == [None]


def test_without_checksum_the_digest_is_returned_recorded_and_logged(
    server: FileServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dest = tmp_path / "data.bin"
    with caplog.at_level(logging.INFO, logger="pipeline.sources.download"):
        assert fetch(server.url, dest) == PAYLOAD_SHA256
    assert (tmp_path / "data.bin.sha256").read_text().split() == [PAYLOAD_SHA256, "data.bin"]
    assert PAYLOAD_SHA256 in caplog.text


def test_cache_hit_makes_no_request(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    fetch(server.url, dest)
    assert fetch(server.url, dest, sha256=PAYLOAD_SHA256) == PAYLOAD_SHA256
    assert fetch("http://127.0.0.1:9/never-contacted", dest) == PAYLOAD_SHA256
    assert len(server.ranges) == 1


def test_cached_file_with_other_bytes_is_downloaded_again(
    server: FileServer, tmp_path: Path
) -> None:
    dest = tmp_path / "data.bin"
    fetch(server.url, dest)
    dest.write_bytes(b"tampered")
    assert fetch(server.url, dest) == PAYLOAD_SHA256
    assert dest.read_bytes() == PAYLOAD
    assert len(server.ranges) == 2


def test_resume_after_cut_connection(
    server: FileServer, tmp_path: Path, no_sleep: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    server.cut_first_after = 30_000
    dest = tmp_path / "data.bin"
    assert fetch(server.url, dest, sha256=PAYLOAD_SHA256, backoff=0.5) == PAYLOAD_SHA256
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges == [None, "bytes=30000-"]
    assert no_sleep == [0.5]
    assert "retry 1 of 5" in caplog.text
    assert leftovers(dest) == ["data.bin", "data.bin.sha256"]


def test_timeout_is_retried(server: FileServer, tmp_path: Path) -> None:
    server.stall_first_s = 1.0
    dest = tmp_path / "data.bin"
    assert fetch(server.url, dest, timeout=0.2) == PAYLOAD_SHA256
    assert len(server.ranges) == 2


def test_checksum_mismatch_leaves_nothing(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    with pytest.raises(ChecksumError, match=f"expected {'0' * 64}, got {PAYLOAD_SHA256}"):
        fetch(server.url, dest, sha256="0" * 64)
    assert leftovers(dest) == []


def test_404_fails_at_once(server: FileServer, tmp_path: Path, no_sleep: list[float]) -> None:
    server.not_found = True
    with pytest.raises(DownloadError) as raised:
        fetch(server.url, tmp_path / "data.bin")
    assert str(raised.value) == f"cannot download {server.url}: HTTP 404 Not Found"
    assert len(server.ranges) == 1
    assert no_sleep == []
    assert leftovers(tmp_path / "data.bin") == []


def test_server_errors_are_retried_with_exponential_backoff(
    server: FileServer, tmp_path: Path, no_sleep: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    server.errors = [500, 503, 429]
    assert fetch(server.url, tmp_path / "data.bin", backoff=1.0) == PAYLOAD_SHA256
    assert no_sleep == [1.0, 2.0, 4.0]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert "HTTP 500" in warnings[0].getMessage()


def test_server_errors_exhaust_the_retries(
    server: FileServer, tmp_path: Path, no_sleep: list[float]
) -> None:
    server.errors = [500] * 3
    with pytest.raises(DownloadError, match="HTTP 500 .*gave up after 3 attempts"):
        fetch(server.url, tmp_path / "data.bin", retries=2)
    assert len(server.ranges) == 3


def _partial(dest: Path, content: bytes, validator: str | None = '"v1"') -> None:
    """A partial download left by an earlier run, with the validator of its response."""
    dest.with_name("data.bin.part").write_bytes(content)
    if validator:
        dest.with_name("data.bin.part.validator").write_text(validator)


def test_server_ignoring_range_restarts_from_zero(server: FileServer, tmp_path: Path) -> None:
    server.ignore_range = True
    dest = tmp_path / "data.bin"
    _partial(dest, b"stale bytes from another attempt")
    assert fetch(server.url, dest) == PAYLOAD_SHA256
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges == ["bytes=32-"]
    assert leftovers(dest) == ["data.bin", "data.bin.sha256"]


def test_part_without_validator_is_never_resumed(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    _partial(dest, b"poison" * 100, validator=None)
    assert fetch(server.url, dest) == PAYLOAD_SHA256
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges == [None]


def test_part_of_changed_content_is_not_spliced(server: FileServer, tmp_path: Path) -> None:
    """The file changed on the server since the partial download: If-Range gets it whole."""
    dest = tmp_path / "data.bin"
    _partial(dest, b"old version " * 100, validator='"v0"')
    assert fetch(server.url, dest) == PAYLOAD_SHA256
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges == ["bytes=1200-"]


def test_html_page_is_an_error_and_leaves_nothing(
    server: FileServer, tmp_path: Path, no_sleep: list[float]
) -> None:
    server.content_type = "text/html; charset=utf-8"
    server.payload = b"<html><body>Please log in</body></html>"
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError) as raised:
        fetch(server.url, dest)
    assert str(raised.value) == (f"cannot download {server.url}: the server sent an HTML page, "
                                 "not the file (a login, error or moved page?)")
    assert leftovers(dest) == [] and no_sleep == []


def test_cached_file_failing_its_pin_is_downloaded_again(server: FileServer, tmp_path: Path
                                                         ) -> None:
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"poisoned")
    dest.with_name("data.bin.sha256").write_text(
        f"{hashlib.sha256(b'poisoned').hexdigest()}  data.bin\n")
    assert fetch(server.url, dest, sha256=PAYLOAD_SHA256) == PAYLOAD_SHA256
    assert dest.read_bytes() == PAYLOAD and len(server.ranges) == 1


def test_complete_part_answered_with_416_is_kept(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    _partial(dest, PAYLOAD)
    assert fetch(server.url, dest) == PAYLOAD_SHA256
    assert server.ranges == [f"bytes={len(PAYLOAD)}-"]


def test_oversized_part_answered_with_416_restarts(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    _partial(dest, PAYLOAD + b"junk")
    assert fetch(server.url, dest) == PAYLOAD_SHA256
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges == [f"bytes={len(PAYLOAD) + 4}-", None]


def test_unreachable_server_fails_after_the_retries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data.bin"
    with pytest.raises(DownloadError, match="gave up after 3 attempts") as raised:
        fetch(url, tmp_path / "data.bin", retries=2)
    message = str(raised.value)
    assert message.startswith(f"cannot download {url}: ")
    assert "\n" not in message
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 2
    assert leftovers(tmp_path / "data.bin") == []
