"""The HTTP endpoint for /metrics, /healthz and /readyz: one thread, a bounded number of connections.

An asyncio loop in one daemon thread serves every connection, so a client that holds a
connection open costs a socket and a few kilobytes, never a thread. Bounds:

* at most ``max_connections`` at once; when a new one arrives at the bound, the oldest one that
  has not yet sent its whole request is closed (a slow or idle client is dropped before a scrape
  that asks at once, so holding many connections open cannot lock Prometheus out);
* ``request_timeout_s`` to send the request head, ``write_timeout_s`` to take the answer;
* a request head of at most ``MAX_REQUEST_BYTES``; one request per connection
  (``Connection: close``), GET and HEAD only.

Connections that end badly (reset, timed out, dropped at the bound) are counted in
``stream_detector_metrics_connections_dropped_total{reason}`` and logged at DEBUG, with a
WARNING summary at most once a minute for all but plain disconnects; nothing is printed to
stderr. A port in use, or a host that cannot be bound, is a ``ConfigError`` naming the key.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST

from stream_detector.errors import ConfigError

if TYPE_CHECKING:
    from stream_detector.metrics import Metrics

log = logging.getLogger("stream_detector.metrics")

MAX_CONNECTIONS = 64
REQUEST_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 10.0
MAX_REQUEST_BYTES = 8192
# Reasons a connection was dropped (metrics.py's HTTP_DROP_REASONS):
# timeout: no whole request within request_timeout_s, or the answer not taken within
#   write_timeout_s; evicted: closed to make room at max_connections; too_large: a request head
#   over MAX_REQUEST_BYTES; bad_request: not an HTTP request line; disconnected: the client hung
#   up or reset before the answer was sent.
WARN_EVERY_S = 60.0


class MetricsServer:
    """Serves /metrics, /healthz and /readyz on one port, from one daemon thread.

    The port is bound in the constructor (``ConfigError`` if it cannot be); ``start`` serves it.
    """

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        ready: Callable[[], tuple[bool, str]],
        *,
        alive: Callable[[], tuple[bool, str]] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.metrics = metrics
        self._ready = ready
        self._alive = alive
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.write_timeout_s = write_timeout_s
        self._sock = _listen(host, port)
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_on_loop_error)
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)
        self._started = threading.Event()
        self._stopping: asyncio.Event | None = None
        # Open connections, oldest first: writer -> True once its request has been read whole.
        self._open: dict[asyncio.StreamWriter, bool] = {}
        self._evicted: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._drops: Counter[str] = Counter()  # since the last warning
        self._warned_at = 0.0

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        if self._thread.is_alive() and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
        self._sock.close()

    # -- the loop's thread -----------------------------------------------------------------

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except Exception:
            log.exception("metrics endpoint stopped")
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._connection, sock=self._sock, limit=MAX_REQUEST_BYTES)
        self._started.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for writer in list(self._open):
                writer.transport.abort()
            if self._tasks:  # let the handlers see their connections closed and finish
                await asyncio.wait(self._tasks, timeout=2)
            await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._make_room()
        self._open[writer] = False
        reason: str | None = None
        detail = ""
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.request_timeout_s)
            except asyncio.LimitOverrunError:
                reason, detail = "too_large", f"request head over {MAX_REQUEST_BYTES} bytes"
                await self._respond(writer, 431, b"request head too large\n", "text/plain", head_only=False)
                return
            except asyncio.IncompleteReadError as exc:
                reason = "evicted" if writer in self._evicted else "disconnected"
                detail = f"after {len(exc.partial)} bytes of a request"
                return
            except TimeoutError:
                reason, detail = "timeout", f"no whole request within {self.request_timeout_s:g}s"
                return
            self._open[writer] = True
            code, body, content_type, head_only = self._answer(head)
            if code == 400:
                reason, detail = "bad_request", repr(head[:80])
            await self._respond(writer, code, body, content_type, head_only)
        except TimeoutError:
            reason, detail = "timeout", f"answer not taken within {self.write_timeout_s:g}s"
        except (ConnectionError, OSError) as exc:
            reason = "evicted" if writer in self._evicted else "disconnected"
            detail = exc.strerror or type(exc).__name__
        finally:
            self._open.pop(writer, None)
            self._evicted.discard(writer)
            if reason in ("timeout", "evicted", "disconnected"):
                writer.transport.abort()
            else:
                writer.close()
            if reason is not None:
                self._dropped(reason, writer, detail)

    def _make_room(self) -> None:
        """At the bound, close the oldest connection still sending its request (or else the oldest)."""
        while len(self._open) >= self.max_connections:
            victim = next((w for w, answered in self._open.items() if not answered), None) or next(iter(self._open))
            self._open.pop(victim)
            self._evicted.add(victim)
            victim.transport.abort()

    def _answer(self, head: bytes) -> tuple[int, bytes, str, bool]:
        """(status, body, content type, HEAD request) for one request head."""
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, b"bad request\n", "text/plain", False
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return 405, b"only GET and HEAD\n", "text/plain", False
        path = target.split("?", 1)[0]
        try:
            if path == "/metrics":
                return 200, self.metrics.exposition(), CONTENT_TYPE_LATEST, method == "HEAD"
            if path == "/healthz":
                ok, why = self._alive() if self._alive is not None else (True, "ok")
                return (200 if ok else 503), (why + "\n").encode(), "text/plain", method == "HEAD"
            if path == "/readyz":
                ok, why = self._ready()
                return (200 if ok else 503), (why + "\n").encode(), "text/plain", method == "HEAD"
        except Exception:
            log.exception("metrics endpoint: %s failed", path)
            return 500, b"internal error\n", "text/plain", False
        return 404, b"not found: try /metrics, /healthz, /readyz\n", "text/plain", method == "HEAD"

    async def _respond(self, writer: asyncio.StreamWriter, code: int, body: bytes, content_type: str, head_only: bool) -> None:
        head = (
            f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        writer.write(head if head_only else head + body)
        await asyncio.wait_for(writer.drain(), self.write_timeout_s)

    def _dropped(self, reason: str, writer: asyncio.StreamWriter, detail: str) -> None:
        self.metrics.http_dropped.labels(reason).inc()
        peer = writer.get_extra_info("peername")
        log.debug("metrics endpoint: dropped connection from %s (%s: %s)", _peer(peer), reason, detail)
        if reason == "disconnected":
            return  # clients hang up for ordinary reasons (probes that only connect, timeouts)
        self._drops[reason] += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            summary = ", ".join(f"{n} {r}" for r, n in sorted(self._drops.items()))
            log.warning(
                "metrics endpoint: dropped connections (%s) since the last such message: idle or half-sent requests (over %gs), "
                "oversized requests, or more than %d connections at once",
                summary,
                self.request_timeout_s,
                self.max_connections,
            )
            self._drops.clear()
            self._warned_at = now


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or a ConfigError naming metrics.host or metrics.port."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"metrics.host: cannot resolve {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    try:
        return socket.create_server(address, family=family, backlog=128)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"metrics.port: port {port} on {host} is already in use (another process or another instance listens there); "
                "choose another metrics.port, or 0 for any free port"
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise ConfigError(f"metrics.port: not allowed to listen on port {port} ({exc.strerror}); ports below 1024 need privileges") from None
        raise ConfigError(f"metrics.host: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's own errors (an accept failing for lack of file descriptors, ...): one log line."""
    exc = context.get("exception")
    if isinstance(exc, OSError):
        log.warning("metrics endpoint: %s: %s", context.get("message", "error"), exc.strerror or exc)
    else:
        log.error("metrics endpoint: %s", context.get("message", "error"), exc_info=exc if isinstance(exc, BaseException) else None)
