"""The DICOM receiver (C-ECHO/C-STORE SCP), in its own process by default.

Why a process of its own: admitting an instance (parse, checks, durable write, queue row) and
classifying a study (decode, inference, SR build and encode) are both CPU-bound Python. In one
process they take turns on one GIL, so a study being classified slows every C-STORE of a
camera sending at the same moment. In two processes they run on two cores. The receiver
process never loads torch or the model.

Parent and child talk over pipes, nothing else: the parent writes the validated configuration
(JSON, one line) to the child's stdin and keeps stdin open; the child answers
``listening <port>`` once its socket is bound, ``complete <study UID>`` whenever a study
becomes complete and ``stored <status> <seconds> <calling AE>`` for every C-STORE answered
(the parent counts them for /metrics: one registry in one process, see `StoreTimer`), on
stdout. Closing the child's stdin asks it to stop (it finishes the
associations in progress); if the parent dies, the kernel kills the child (PR_SET_PDEATHSIG),
so no receiver outlives its node and a restarted node can bind the port at once. A receiver
that exits on its own is restarted on the same port by the parent's supervisor thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from node.config import Config, config_from_dict, config_to_dict, with_overrides
from node.logs import setup_logging
from node.receive.server import open_file_store, receive_to_files, start_scp
from node.runtime import libc_function, release_library_pages, tune_malloc
from storage.db import Database
from storage.filestore import FileStore, receiver_name

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds for a receiver process to bind its port
STOP_TIMEOUT = 60.0  # seconds for associations in progress to finish on stop
NOTHING_IN_PROGRESS_TIMEOUT = 2.0  # stopping a receiver that never listened
RESTART_BACKOFF = (1.0, 30.0)  # first and largest delay before restarting a dead receiver
BIND_RETRY_SECONDS = 5.0  # a killed receiver's socket may take a moment to go
# the child's entry point: imported, not run as __main__, so its logger is the module's
CHILD_ENTRY = "import sys; from node.receive.process import serve_child; " \
              "sys.exit(serve_child(sys.stdin, sys.stdout))"
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001  # DIMSE command fields
TIMED_AT_ONCE = 1024  # C-STOREs timed at once; an aborted association's entries age out

# (DIMSE status, calling AE, seconds from the whole request received to the answer sent)
StoreObserver = Callable[[int, str, float], None]


class StoreTimer:
    """Times every C-STORE from the request received in full to the answer sent, and hands
    status, calling AE and seconds to `observe`. Bound to pynetdicom's notification events
    (EVT_DIMSE_RECV/EVT_DIMSE_SENT) beside the handlers, which stay as they are."""

    def __init__(self, observe: StoreObserver) -> None:
        self._observe = observe
        self._started: OrderedDict[tuple[int, int], float] = OrderedDict()
        self._lock = threading.Lock()

    def bind(self, server: ThreadedAssociationServer) -> None:
        """Listen to the server's DIMSE traffic from now on."""
        server.bind(evt.EVT_DIMSE_RECV, self.received)
        server.bind(evt.EVT_DIMSE_SENT, self.sent)

    def received(self, event: Event) -> None:
        """A C-STORE request is in: its clock starts."""
        cs = event.message.command_set
        if getattr(cs, "CommandField", None) != C_STORE_RQ:
            return
        with self._lock:
            self._started[(id(event.assoc), int(cs.MessageID))] = time.monotonic()
            while len(self._started) > TIMED_AT_ONCE:
                self._started.popitem(last=False)

    def sent(self, event: Event) -> None:
        """Its answer is out: observed with the status and the calling AE."""
        cs = event.message.command_set
        if getattr(cs, "CommandField", None) != C_STORE_RSP:
            return
        with self._lock:
            start = self._started.pop((id(event.assoc), int(cs.MessageIDBeingRespondedTo)), None)
        if start is not None:
            self._observe(int(cs.Status), str(event.assoc.requestor.ae_title).strip(),
                          time.monotonic() - start)


def stored_line(status: int, calling_ae: str, seconds: float) -> str:
    """The child's message for one C-STORE answered; the AE title comes from the network, so
    anything but printable ASCII (a newline would forge a message) becomes '?'."""
    ae = "".join(c if c.isascii() and c.isprintable() else "?" for c in calling_ae)
    return f"stored {status} {seconds:.6f} {ae}\n"


class ReceiverStartError(RuntimeError):
    """The receiver process exited before it could listen (bad TLS file, port taken, ...)."""


@dataclass
class ReceiverProcess:
    """Parent side: starts the receiver process, relays its completions, restarts it if it
    dies, stops it on request. `port` is the port it listens on once `start()` returned."""

    cfg: Config
    on_complete: Callable[[], None]
    port: int = 0
    restarts: int = 0
    on_stored: StoreObserver | None = None  # each C-STORE answered by the child (metrics)
    entry: str = CHILD_ENTRY  # the child's `python -c` program (tests give a misbehaving one)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _ready: threading.Event = field(default_factory=threading.Event, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    _listening: threading.Event = field(default_factory=threading.Event, repr=False)
    _failure: str | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # launch vs stop

    def start(self, timeout: float = START_TIMEOUT) -> ReceiverProcess:
        """Launch and wait until it listens; ReceiverStartError if it cannot."""
        self._thread = threading.Thread(target=self._supervise, name="receiver-supervisor",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop(timeout=NOTHING_IN_PROGRESS_TIMEOUT)  # no association to finish yet
            raise ReceiverStartError(f"receiver process did not listen within {timeout:.0f} s")
        if self._failure is not None:
            self.stop(timeout=NOTHING_IN_PROGRESS_TIMEOUT)
            raise ReceiverStartError(self._failure)
        return self

    @property
    def pid(self) -> int | None:
        """The running receiver's process id, for monitoring."""
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        """True while a receiver process listens (from its `listening` line until its
        stdout closes; Popen.poll would answer None while the supervisor waits on it)."""
        return self._listening.is_set()

    def _launch(self) -> subprocess.Popen[bytes]:
        """One receiver process, spawned from the supervisor thread (the kernel's parent-death
        signal follows the thread that forked, and this one lives until stop)."""
        cfg = with_overrides(self.cfg, node={"port": self.port}) if self.port else self.cfg
        proc = subprocess.Popen([sys.executable, "-c", self.entry],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdin is not None
        message = {"config": config_to_dict(cfg), "base_dir": str(cfg.base_dir),
                   "parent_pid": os.getpid()}
        proc.stdin.write(json.dumps(message).encode() + b"\n")
        proc.stdin.flush()
        self._proc = proc
        return proc

    def _supervise(self) -> None:
        """Run the receiver until stop; restart it (same port, growing delay) if it dies."""
        delay = RESTART_BACKOFF[0]
        while True:
            with self._lock:  # a stop() from now on sees this process and stops it
                if self._stopping.is_set():
                    return
                proc = self._launch()
            started = time.monotonic()
            assert proc.stdout is not None
            for line in proc.stdout:
                self._on_line(line.decode("ascii", "replace").split())
            self._listening.clear()  # stdout closed: the process has ended (or is ending)
            code = proc.wait()
            if self._stopping.is_set():
                return
            if not self._ready.is_set():  # never listened: a configuration problem, not a crash
                self._failure = f"receiver process exited with code {code} before listening"
                self._ready.set()
                return
            if time.monotonic() - started > 60:
                delay = RESTART_BACKOFF[0]
            log.error("receiver process exited with code %s; restarting it on port %d in %.0f s",
                      code, self.port, delay)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, RESTART_BACKOFF[1])
            self.restarts += 1

    def _on_line(self, words: list[str]) -> None:
        """One message from the receiver."""
        if len(words) == 2 and words[0] == "listening" and words[1].isdigit():
            self.port = int(words[1])
            self._listening.set()
            self._ready.set()
        elif words and words[0] == "complete":
            self.on_complete()
        elif len(words) >= 3 and words[0] == "stored" and self.on_stored is not None:
            try:
                status, seconds = int(words[1]), float(words[2])
            except ValueError:
                log.warning("receiver process sent a malformed 'stored' line: ignored")
                return
            self.on_stored(status, " ".join(words[3:]), seconds)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Ask the receiver to stop (it finishes associations in progress), then wait."""
        with self._lock:  # no launch after this; one in progress has finished
            self._stopping.set()
            proc = self._proc
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):  # already gone
                proc.stdin.close()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("receiver process did not stop within %.0f s; killing it", timeout)
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=10)


# --------------------------------------------------------------------------------------------
# child side: serve_child (started by ReceiverProcess only, see CHILD_ENTRY)


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to kill us when the parent dies (Linux); exit now if it already has."""
    prctl = libc_function("prctl")
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        raise SystemExit(3)


def _bind(cfg: Config, files: FileStore, db: Database, out: IO[str]
          ) -> ThreadedAssociationServer:
    """Start the SCP, retrying for a few seconds while the port is taken: the receiver of a
    node killed a moment ago may still be on its way out. Longer, it is someone else's port."""
    lock = threading.Lock()

    def tell_parent(study_uid: str) -> None:
        with lock:
            out.write(f"complete {study_uid}\n")
            out.flush()

    def count_store(status: int, calling_ae: str, seconds: float) -> None:
        with lock:
            out.write(stored_line(status, calling_ae, seconds))
            out.flush()

    deadline = time.monotonic() + BIND_RETRY_SECONDS
    while True:
        try:
            server = start_scp(cfg, files, db, tell_parent)
            StoreTimer(count_store).bind(server)
            return server
        except OSError as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("cannot bind port %d yet (%s); retrying", cfg.node.port, exc.strerror)
            time.sleep(0.5)


def serve_child(inp: IO[str], out: IO[str]) -> int:
    """The receiver process: read the configuration, serve until stdin closes."""
    message: dict[str, Any] = json.loads(inp.readline())
    _die_with_parent(int(message["parent_pid"]))
    cfg = config_from_dict(message["config"], base_dir=Path(message["base_dir"]))
    setup_logging(cfg.logging.level)
    tune_malloc()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the parent decides: it closes stdin
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent too
    files = open_file_store(cfg)
    own = receiver_name()  # receivers sharing the store (other machines too) keep apart
    files.clear_receiving(own)  # a receiver killed mid-transfer left its datasets there
    receive_to_files(files.receiving_dir(own))
    db = Database(cfg.database_url)
    try:
        server = _bind(cfg, files, db, out)
    except OSError as exc:
        log.error("receiver cannot listen on %s:%d: %s", cfg.node.bind_address, cfg.node.port,
                  exc.strerror or exc)
        return 2
    port = int(server.server_address[1])
    out.write(f"listening {port}\n")
    out.flush()
    release_library_pages()  # start-up code of numpy, pydicom, sqlite: not needed again
    log.info("receiver process %d listening on %s:%d", os.getpid(), cfg.node.bind_address, port)
    inp.read()  # blocks until the parent closes stdin (or dies)
    server.shutdown()
    _finish_associations(server, STOP_TIMEOUT)
    db.dispose()
    return 0


def _finish_associations(server: ThreadedAssociationServer, timeout: float) -> None:
    """Let associations in progress end on their own (a C-STORE is answered) before exit."""
    deadline = time.monotonic() + timeout
    while server.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)

