"""The search page's web policies, free of any HTTP framework so that each server applies the same ones.

- Host names: a browser sends the name in its address bar as the Host header, so a page that
  rebinds its own DNS name to 127.0.0.1 (DNS rebinding) still sends its own name. Answering only
  the names the server was bound for keeps such a page from reading the API and the photos.
- Response types: an indexed file is served only as the image its content is, never by its name's
  suffix, so a GIF/HTML polyglot named `.html` is never HTML on the page's origin.
- Security headers on every response: no type sniffing, a Content-Security-Policy (the page runs
  only its own inline script and style, by nonce; everything else runs nothing), no embedding by
  other sites.
- A thumbnail cache, bounded in bytes and keyed by the file's path, mtime and size.
"""

import os
import secrets
import threading
from collections import OrderedDict
from pathlib import Path

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
ANY_HOST = "*"

# Pillow's format name -> the type a browser shows; anything else is not served as it is.
WEB_IMAGE_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "ICO": "image/x-icon",
    "AVIF": "image/avif",
}

# For everything but the page: JSON and images need no script, style or frame.
RESOURCE_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'; sandbox"


def host_name(host: str) -> str:
    """The name part of a Host header or host argument, lower case, without port or trailing dot:
    "LocalHost:8000" -> "localhost", "[::1]:8000" -> "[::1]", "::1" -> "[::1]"."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    if host.count(":") > 1:  # a bare IPv6 address, as given to --host
        return f"[{host}]"
    return host.split(":", 1)[0].rstrip(".")


def allowed_host_names(bound_host: str, extra: str | list[str] | tuple[str, ...] = ()) -> frozenset[str]:
    """The Host names a server bound to `bound_host` answers: the loopback names, the bound host and
    `extra` (a list, or one comma-separated string; "*" allows any name)."""
    if isinstance(extra, str):
        extra = extra.split(",")
    names = [*LOOPBACK_HOSTS, bound_host, *extra]
    return frozenset(host_name(name) for name in names if name.strip())


def host_refusal(host_header: str | None, allowed: frozenset[str]) -> str | None:
    """Why a request with this Host header is refused, or None when it is to be answered."""
    if ANY_HOST in allowed:
        return None
    if not host_header:
        return "a Host header is required"
    name = host_name(host_header)
    if name not in allowed:
        return f"host {name!r} is not served here; start the server with --allowed_hosts {name} to serve it"
    return None


def web_image_type(image_format: str | None) -> str | None:
    """The Content-Type for an image of Pillow's `image_format`, or None for one not served as it is."""
    return WEB_IMAGE_TYPES.get(image_format or "")


def new_nonce() -> str:
    """A fresh nonce for one response of the page."""
    return secrets.token_urlsafe(18)


def page_policy(nonce: str) -> str:
    """The page's Content-Security-Policy: its own inline script and style (by `nonce`), images and
    API calls from the same origin, nothing else."""
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )


def add_nonce(page: str, nonce: str) -> str:
    """The page with `nonce` on its inline <script> and <style> elements."""
    return page.replace("<script>", f'<script nonce="{nonce}">').replace(
        "<style>", f'<style nonce="{nonce}">'
    )


def security_headers(nonce: str | None = None) -> dict[str, str]:
    """Headers for every response; `nonce` for the page, None for everything else."""
    return {
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": page_policy(nonce) if nonce else RESOURCE_POLICY,
        "Cross-Origin-Resource-Policy": "same-origin",  # another site's <img> cannot load the photos
        "Referrer-Policy": "no-referrer",
    }


FileKey = tuple[str, int, int]  # (path, mtime in ns, size)


def file_key(path: Path) -> FileKey:
    """What identifies a file's current content for the cache: a rewritten file gets a new key."""
    status = os.stat(path)
    return str(path), status.st_mtime_ns, status.st_size


class ThumbnailCache:
    """The most recently used thumbnails, at most `max_bytes` of them in all; safe across threads."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.total_bytes = 0
        self._entries: OrderedDict[FileKey, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: FileKey) -> bytes | None:
        """The cached thumbnail, now the most recently used, or None."""
        with self._lock:
            thumbnail = self._entries.get(key)
            if thumbnail is not None:
                self._entries.move_to_end(key)
            return thumbnail

    def put(self, key: FileKey, thumbnail: bytes) -> None:
        """Keep `thumbnail`, dropping the least recently used ones beyond the byte budget."""
        if len(thumbnail) > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            self.total_bytes += len(thumbnail) - (len(old) if old is not None else 0)
            self._entries[key] = thumbnail
            while self.total_bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.total_bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._entries)
