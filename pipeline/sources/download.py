"""Resumable HTTP downloads with retries, sha256 verification and a local cache.

``download(url, dest)`` writes to ``dest.part`` and moves it onto ``dest`` only once the body is
complete and verified, so ``dest`` never exists half-written. A sidecar ``dest.sha256`` (in
``sha256sum`` format) records the digest of a finished download; while it matches the file (and
the pinned sha256, if any), later calls return at once without touching the network; otherwise the
file is downloaded again. A partial file is resumed only with ``If-Range`` and the validator
(ETag or Last-Modified) of the response it came from; an HTML page instead of the file is an
error that leaves nothing behind.
"""

from __future__ import annotations

import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.io import sha256_file

logger = logging.getLogger(__name__)

USER_AGENT = "wbc-pipeline/0.1 (+urllib)"
MAX_BACKOFF_S = 60.0
READ_CHUNK = 1 << 16
RETRY_STATUSES = frozenset({408, 429})


class DownloadError(PipelineError, RuntimeError):
    """A download failed; ``str(error)`` is one line naming the URL and the reason."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the expected sha256."""


class _TransientError(Exception):
    """A failure of one attempt that another attempt may not hit (the reason is ``str(self)``)."""


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    timeout: float = 60.0,
    retries: int = 5,
    backoff: float = 1.0,
    progress: bool = True,
) -> str:
    """Download url to dest and return its sha256.

    Transient failures (connection errors, timeouts, cut connections, HTTP 5xx/408/429) are
    retried up to ``retries`` times, waiting ``backoff * 2**attempt`` seconds (capped) and
    resuming from the bytes already received. Other HTTP errors raise DownloadError at once; a
    body that does not match ``sha256`` raises ChecksumError and is deleted.
    """
    dest = Path(dest)
    expected = sha256.lower() if sha256 else None
    cached = _cached_digest(dest, expected)
    if cached is not None:
        logger.debug("using cached %s (sha256 %s)", dest, cached)
        return cached

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _fetch_with_retries(url, part, timeout=timeout, retries=retries, backoff=backoff,
                        progress=progress)

    digest = sha256_file(part)
    _validator_file(part).unlink(missing_ok=True)
    if expected is not None and digest != expected:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"cannot download {url}: sha256 mismatch (expected {expected}, got {digest})"
        )
    if expected is None:
        logger.info("downloaded %s, sha256 %s (pin it to verify later downloads)", url, digest)
    sidecar = _sidecar(dest)
    sidecar_tmp = sidecar.with_name(sidecar.name + ".tmp")
    sidecar_tmp.write_text(f"{digest}  {dest.name}\n", encoding="utf-8")
    os.replace(sidecar_tmp, sidecar)
    os.replace(part, dest)
    return digest


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _cached_digest(dest: Path, expected: str | None) -> str | None:
    """The sha256 of a finished earlier download at ``dest``, or None if it must be fetched."""
    sidecar = _sidecar(dest)
    if not (dest.is_file() and sidecar.is_file()):
        return None
    recorded = sidecar.read_text(encoding="utf-8").partition(" ")[0].strip().lower()
    if (expected is None or recorded == expected) and sha256_file(dest) == recorded:
        return recorded
    logger.info("cached %s does not match its expected sha256; downloading it again", dest)
    return None


def _fetch_with_retries(
    url: str, part: Path, *, timeout: float, retries: int, backoff: float, progress: bool
) -> None:
    """Complete ``part`` with the body of ``url``, retrying transient failures."""
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout=timeout, progress=progress)
            return
        except (ValueError, http.client.InvalidURL) as error:
            raise DownloadError(f"cannot download {url}: {_one_line(error)}") from error
        except (_TransientError, http.client.HTTPException, OSError) as error:
            reason = _reason(error)
            if isinstance(error, urllib.error.HTTPError) and not _is_transient(error.code):
                raise DownloadError(f"cannot download {url}: {reason}") from error
            if attempt == retries:
                raise DownloadError(
                    f"cannot download {url}: {reason} (gave up after {retries + 1} attempts)"
                ) from error
        delay = min(backoff * 2**attempt, MAX_BACKOFF_S)
        logger.warning("download of %s failed (%s); retry %d of %d in %.1f s",
                       url, reason, attempt + 1, retries, delay)
        time.sleep(delay)


def _is_transient(status: int) -> bool:
    """Whether an HTTP error status is worth retrying (server errors, timeouts, rate limits)."""
    return status >= 500 or status in RETRY_STATUSES


def _validator_file(part: Path) -> Path:
    return part.with_name(part.name + ".validator")


def _validator(headers: Message) -> str | None:
    """A strong ETag, else Last-Modified: what ``If-Range`` needs to resume safely."""
    etag = headers.get("ETag", "")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified") or None


def _resume_offset(part: Path) -> int:
    """Bytes of ``part`` that may be resumed: none unless a validator says what they are of."""
    if not part.exists():
        return 0
    if not _validator_file(part).is_file():
        logger.info("discarding %s: nothing proves it holds the same content", part)
        part.unlink()
        return 0
    return part.stat().st_size


def _fetch_once(url: str, part: Path, *, timeout: float, progress: bool) -> None:
    """One attempt: append the rest of the body to ``part`` (or restart it); raise on failure.

    A resume sends ``If-Range`` with the validator of the first response, so a changed file
    comes back whole (200) instead of being spliced onto bytes of the old one.
    """
    offset = _resume_offset(part)
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = _validator_file(part).read_text(encoding="utf-8")
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not offset:
            raise
        total = _content_range(error.headers)[1]
        error.close()
        if total == offset:
            return  # the part already holds the whole body
        logger.info("server rejected resuming %s at byte %d; restarting from zero", url, offset)
        part.unlink()
        _fetch_once(url, part, timeout=timeout, progress=progress)
        return

    with response:
        if response.headers.get_content_type() == "text/html":
            _discard(part)
            raise DownloadError(f"cannot download {url}: the server sent an HTML page, not the "
                                "file (a login, error or moved page?)")
        if response.status == 206:
            start = _content_range(response.headers)[0]
            if start != offset:
                _discard(part)
                raise _TransientError(f"server resumed at byte {start}, not {offset}")
            mode = "ab"
        else:
            if offset:
                logger.info("server sent %s whole (changed, or no range support); restarting "
                            "from zero", url)
            offset, mode = 0, "wb"
            _record_validator(part, response.headers)
        _write_body(response, part, mode, offset, progress)


def _record_validator(part: Path, headers: Message) -> None:
    validator = _validator(headers)
    if validator is None:
        _validator_file(part).unlink(missing_ok=True)
    else:
        _validator_file(part).write_text(validator, encoding="utf-8")


def _discard(part: Path) -> None:
    """Remove a partial download and its validator."""
    part.unlink(missing_ok=True)
    _validator_file(part).unlink(missing_ok=True)


def _write_body(response: http.client.HTTPResponse, part: Path, mode: str, offset: int,
                progress: bool) -> None:
    length = response.headers.get("Content-Length", "")
    remaining = int(length) if length.isdigit() else None
    received = 0
    with (
        open(part, mode) as out,
        tqdm(total=None if remaining is None else offset + remaining, initial=offset,
             unit="B", unit_scale=True, unit_divisor=1024, desc=part.name.removesuffix(".part"),
             disable=not progress, leave=False) as bar,
    ):
        while chunk := response.read(READ_CHUNK):
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    if remaining is not None and received < remaining:
        raise _TransientError(f"connection closed after {received} of {remaining} bytes")


def _content_range(headers: Message) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``Content-Range: bytes a-b/total``; None where unknown."""
    unit, _, spec = headers.get("Content-Range", "").partition(" ")
    if unit != "bytes":
        return None, None
    span, _, total = spec.partition("/")
    start = span.partition("-")[0]
    return (int(start) if start.isdigit() else None, int(total) if total.isdigit() else None)


def _reason(error: BaseException) -> str:
    """A one-line description of why an attempt failed."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return _one_line(error.reason)
    return _one_line(error)


def _one_line(error: object) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
