"""The SCP's listener: a new connection costs an association slot and threads only once it has
said something DICOM.

Why: pynetdicom starts an Association thread per accepted socket, and that thread counts
against [node].max_associations before the peer has said a word, so a few connect+close from
any host kept cameras out for acse_timeout, and every idle socket cost threads. Here the accept
thread only accepts. One gate thread holds every new connection in a selector, TLS handshake
included (non-blocking), until its A-ASSOCIATE-RQ has arrived whole; it then screens the caller
(allowlist, association limit, answering A-ASSOCIATE-RJ itself) and hands the socket to
pynetdicom. Connections that close, stay silent past the first-PDU timeout or send anything
else are dropped and counted. Per-address caps and a connection rate bound what one host can
hold, and every log line about a peer goes through `PeerLog`, so a flood cannot flood the log.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, cast

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from node import tls
from node.config import Config
from node.dicom.status import ASSOCIATION_REJECT_REASONS

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ = 0x01
HEADER = 6  # PDU type, reserved, 4-byte length
MIN_RQ_LENGTH = 68  # protocol version .. reserved: the fixed fields of an A-ASSOCIATE-RQ
MAX_RQ_LENGTH = 1 << 20  # no real A-ASSOCIATE-RQ comes near a MiB
READ_LIMIT = 64 * 1024  # a longer request is handed over once this much of it has arrived
CALLING_AE = slice(26, 42)  # PS3.8 Table 9-11
# A-ASSOCIATE-RJ (result, source, diagnostic) the gate answers itself (PS3.8 Table 9-21)
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)
CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
TICK = 1.0  # seconds between housekeeping rounds of the gate (log flush, statistics)
MAX_TRACKED_PEERS = 4096  # addresses with a log budget or rate bucket, at most

Screen = Callable[[str, str], bool]  # (calling AE, address) -> refused (and logged)


@dataclass(frozen=True)
class GateLimits:
    """What the gate allows: timeouts and caps from [node]."""

    first_pdu_timeout: float = 5.0
    max_pending: int = 256
    max_per_address: int = 10
    rate_per_address: float = 200.0  # new connections per second; 0 = no limit
    max_associations: int = 10
    network_timeout: float | None = 60.0
    stats_seconds: float = 60.0

    @classmethod
    def from_config(cls, cfg: Config) -> GateLimits:
        """The limits of this node; the first PDU never gets longer than acse_timeout."""
        n = cfg.node
        return cls(first_pdu_timeout=min(n.first_pdu_timeout, n.acse_timeout),
                   max_pending=n.max_pending_connections,
                   max_per_address=n.max_connections_per_address,
                   rate_per_address=n.max_connection_rate_per_address,
                   max_associations=n.max_associations, network_timeout=n.network_timeout,
                   stats_seconds=n.log_window_seconds)


# --- log lines about peers ----------------------------------------------------------------


@dataclass
class _Budget:
    start: float
    lines: int = 0
    held: int = 0


class PeerLog:
    """At most `lines` log lines per (kind, peer address) per `window` seconds; what is held
    back is counted and reported once the window has closed (`flush`). Thread-safe: the gate,
    the accept thread and pynetdicom's association threads all log through one."""

    def __init__(self, lines: int = 5, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 max_peers: int = MAX_TRACKED_PEERS) -> None:
        """`lines` per `window` seconds for each (kind, address), `max_peers` budgets at once."""
        self.lines, self.window, self.max_peers, self._clock = lines, window, max_peers, clock
        self._lock = threading.Lock()
        self._budgets: dict[tuple[str, str], _Budget] = {}
        self._overflow = 0  # lines held back because too many addresses were tracked

    def log(self, logger: logging.Logger, level: int, kind: str, peer: str, msg: str,
            *args: object) -> bool:
        """Log `msg % args` unless this peer's budget for `kind` is spent; True when logged."""
        now = self._clock()
        held = 0
        with self._lock:
            key = (kind, peer)
            budget = self._budgets.get(key)
            if budget is not None and now - budget.start >= self.window:
                held, budget = budget.held, None  # closed before flush() came by: say so here
            if budget is None:
                if key not in self._budgets and len(self._budgets) >= self.max_peers:
                    self._overflow += 1
                    return False
                budget = self._budgets[key] = _Budget(now)
            if budget.lines >= self.lines:
                budget.held += 1
                return False
            budget.lines += 1
        if held:
            msg, args = msg + " (and %d earlier such lines held back)", (*args, held)
        logger.log(level, msg, *args)
        return True

    def flush(self) -> None:
        """Report what closed windows held back, and forget them (bounded memory)."""
        now = self._clock()
        with self._lock:
            closed = [(k, b) for k, b in self._budgets.items() if now - b.start >= self.window]
            for key, _ in closed:
                del self._budgets[key]
            overflow, self._overflow = self._overflow, 0
        for (kind, peer), budget in closed:
            if budget.held:
                log.warning("%s from %s: %d more such lines held back in the last %.0f s "
                            "([node].log_lines_per_address)", kind, peer, budget.held,
                            self.window)
        if overflow:
            log.warning("%d log lines about further addresses held back (more than %d "
                        "addresses at once)", overflow, self.max_peers)


# --- pieces of the gate -------------------------------------------------------------------


class ReplaySSLSocket(ssl.SSLSocket):
    """An SSLSocket that first gives back the bytes the gate already read (the A-ASSOCIATE-RQ,
    which TLS cannot peek), and counts them as pending so pynetdicom's readiness check sees
    them. Installed as the server context's `sslsocket_class`."""

    replay: bytes = b""

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        """The replayed bytes first, then the connection's."""
        if self.replay and not flags:
            out, self.replay = self.replay[:buflen], self.replay[buflen:]
            return out
        return super().recv(buflen, flags)

    def pending(self) -> int:
        """Decrypted bytes waiting, replayed ones included."""
        return len(self.replay) + super().pending()


def _burst(rate: float) -> float:
    """A rate's bucket size: a second's worth, and at least one connection."""
    return max(1.0, rate)


@dataclass
class _Bucket:
    """Token bucket of new connections for one address."""

    tokens: float
    stamp: float

    def take(self, now: float, rate: float) -> bool:
        self.tokens = min(_burst(rate), self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass
class GateStats:
    """Connections the gate saw, by outcome (reset after each statistics line)."""

    accepted: int = 0
    handed_over: int = 0
    closed: int = 0  # closed without sending a whole A-ASSOCIATE-RQ
    silent: int = 0  # nothing (or not enough) within the first-PDU timeout
    garbage: int = 0  # first bytes are not an A-ASSOCIATE-RQ
    tls_failed: int = 0
    over_rate: int = 0
    over_address_cap: int = 0
    evicted: int = 0  # the oldest waiting one, when max_pending was reached
    busy: int = 0  # A-ASSOCIATE-RJ: max_associations reached
    caller_refused: int = 0  # A-ASSOCIATE-RJ: not in the allowlist

    def turned_away(self) -> int:
        """Every connection that did not reach pynetdicom."""
        return sum(getattr(self, f.name) for f in fields(self)
                   if f.name not in ("accepted", "handed_over"))

    def line(self) -> str:
        """'accepted 12, handed over 2, closed 10' (zero counts left out)."""
        return ", ".join(f"{f.name.replace('_', ' ')} {getattr(self, f.name)}"
                         for f in fields(self) if getattr(self, f.name))


@dataclass(eq=False)
class _Waiting:
    """A connection that has not yet sent its A-ASSOCIATE-RQ."""

    sock: socket.socket
    address: Any
    accepted: float  # time.monotonic() at accept
    deadline: float
    tls: bool
    handshaken: bool = False
    buf: bytearray = field(default_factory=bytearray)  # what TLS has given us so far
    seen: int = 0  # bytes peeked last time (plain TCP)
    need: int = HEADER

    @property
    def host(self) -> str:
        return str(self.address[0]) if isinstance(self.address, tuple) else str(self.address)


def judge_first_pdu(head: bytes) -> int | str:
    """The number of bytes to wait for (int), or why these bytes are no A-ASSOCIATE-RQ."""
    if head and head[0] != A_ASSOCIATE_RQ:
        return f"first bytes are not an A-ASSOCIATE-RQ (PDU type 0x{head[0]:02X})"
    if len(head) < HEADER:
        return HEADER
    length = int.from_bytes(head[2:HEADER], "big")
    if not MIN_RQ_LENGTH <= length <= MAX_RQ_LENGTH:
        return f"malformed A-ASSOCIATE-RQ (PDU length {length})"
    return min(HEADER + length, READ_LIMIT)


def calling_ae(head: bytes) -> str:
    """The calling AE title of an A-ASSOCIATE-RQ, printable characters only."""
    text = bytes(head[CALLING_AE]).decode("ascii", "replace").strip()
    return "".join(c if c.isprintable() else "?" for c in text)


def reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return bytes((0x03, 0x00, 0, 0, 0, 4, 0x00, result, source, diagnostic))


def _close(sock: socket.socket) -> None:
    sock.close()


# --- the gate -----------------------------------------------------------------------------


class Gate:
    """One thread, one selector: every connection waits here until its A-ASSOCIATE-RQ is in."""

    def __init__(self, server: GateServer, limits: GateLimits, peer_log: PeerLog,
                 screen: Screen | None, ssl_context: ssl.SSLContext | None) -> None:
        """A gate for `server`; `screen` refuses callers (the allowlist), if any."""
        self._server, self._limits, self._peer_log = server, limits, peer_log
        self._screen, self._ssl = screen, ssl_context
        if ssl_context is not None:
            ssl_context.sslsocket_class = ReplaySSLSocket
        self._selector = selectors.DefaultSelector()
        self._inbox: queue.SimpleQueue[tuple[socket.socket, Any, float]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._waiting: dict[socket.socket, _Waiting] = {}  # oldest first
        self._per_host: Counter[str] = Counter()
        self._buckets: dict[str, _Bucket] = {}
        self.stats = GateStats()
        self.totals = GateStats()  # since start, for tests and monitoring
        self._stop = threading.Event()
        self._next_tick = self._next_stats = 0.0
        self._thread = threading.Thread(target=self._run, name="dicom-gate", daemon=True)

    # called from other threads

    def start(self) -> None:
        """Start the gate thread."""
        self._thread.start()

    def submit(self, sock: socket.socket, address: Any) -> None:
        """A freshly accepted connection (from the accept thread)."""
        self._inbox.put((sock, address, time.monotonic()))
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the gate; connections still waiting are closed."""
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway), or stopped
            self._wake_w.send(b"\0")

    # the gate thread

    def _run(self) -> None:
        self._next_tick = time.monotonic() + TICK
        self._next_stats = time.monotonic() + self._limits.stats_seconds
        try:
            while not self._stop.is_set():
                self._round()
        finally:
            self._close_all()

    def _round(self) -> None:
        """Wait for the next event or deadline, then act on what is due."""
        oldest = next(iter(self._waiting.values())).deadline if self._waiting else self._next_tick
        timeout = min(self._next_tick, oldest) - time.monotonic()
        for key, _ in self._selector.select(max(0.0, timeout)):
            if key.data is None:
                self._drain_wake()
            else:
                self._guarded(self._step, key.data)
        self._admit_inbox()
        self._expire()
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + TICK
            self._peer_log.flush()
            self._prune(now)
        if now >= self._next_stats:
            self._next_stats = now + self._limits.stats_seconds
            self._report()

    def _guarded(self, step: Callable[[_Waiting], None], w: _Waiting) -> None:
        """One step for one connection; whatever goes wrong in it (a screen that raises, a
        bug) costs that connection, never the gate every other caller waits in."""
        try:
            step(w)
        except Exception:
            log.exception("listener: unexpected error on a connection from %s; closed", w.host)
            self._forget(w)
            _close(w.sock)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:  # drained (BlockingIOError)
            pass

    def _count(self, name: str) -> None:
        for stats in (self.stats, self.totals):
            setattr(stats, name, getattr(stats, name) + 1)

    # admission

    def _admit_inbox(self) -> None:
        while True:
            try:
                sock, address, accepted_at = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._count("accepted")
            w = _Waiting(sock, address, accepted_at,
                         accepted_at + self._limits.first_pdu_timeout, tls=self._ssl is not None)
            self._guarded(self._admit, w)

    def _admit(self, w: _Waiting) -> None:
        """Refuse the connection (rate, per-address cap) or start waiting for its request."""
        refusal = self._refusal(w.host, w.accepted)
        if refusal is not None:
            _close(w.sock)
            self._peer_log.log(log, logging.WARNING, "refused connections", w.host,
                               "refused connection from %s: %s", w.host, refusal)
            return
        if len(self._waiting) >= self._limits.max_pending:
            self._count("evicted")
            self._drop(next(iter(self._waiting.values())), "dropped to make room: too many "
                       "connections waiting for their A-ASSOCIATE-RQ "
                       "([node].max_pending_connections)")
        w.sock.setblocking(False)
        if self._ssl is not None:
            w.sock = self._ssl.wrap_socket(w.sock, server_side=True,
                                           do_handshake_on_connect=False)
        else:
            _set_lowat(w.sock, HEADER)
        self._waiting[w.sock] = w
        self._per_host[w.host] += 1
        self._selector.register(w.sock, selectors.EVENT_READ, w)

    def _refusal(self, host: str, now: float) -> str | None:
        """Why this address may not open another connection now, or None."""
        rate = self._limits.rate_per_address
        if rate > 0:
            bucket = self._buckets.setdefault(host, _Bucket(_burst(rate), now))
            if not bucket.take(now, rate):
                self._count("over_rate")
                return (f"more than {rate:g} new connections per second from this address "
                        "([node].max_connection_rate_per_address)")
        cap = self._limits.max_per_address
        if self._per_host[host] >= cap or \
                self._per_host[host] + self._server.associations(host) >= cap:
            self._count("over_address_cap")
            return f"{cap} connections open from this address " \
                   "([node].max_connections_per_address)"
        return None

    def _forget(self, w: _Waiting) -> None:
        """No longer waiting (dropped, refused or handed over)."""
        if self._waiting.pop(w.sock, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):  # never registered, or closed
            self._selector.unregister(w.sock)
        self._per_host[w.host] -= 1
        if self._per_host[w.host] <= 0:
            del self._per_host[w.host]

    # progress of one connection

    def _step(self, w: _Waiting) -> None:
        if w.tls and not w.handshaken and not self._handshake(w):
            return
        if w.tls:
            self._read_tls(w)
        else:
            self._read_plain(w)

    def _handshake(self, w: _Waiting) -> bool:
        """One non-blocking handshake step; True once it is done."""
        sock = cast(ssl.SSLSocket, w.sock)
        try:
            sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
            self._wait_for(w, exc)
            return False
        except (ssl.SSLError, OSError) as exc:
            self._count("tls_failed")
            self._forget(w)
            _close(w.sock)
            self._peer_log.log(log, logging.WARNING, "refused TLS connections", w.host,
                               "refused TLS connection from %s: %s", w.host,
                               tls.describe_failure(exc))
            return False
        w.handshaken = True
        self._selector.modify(sock, selectors.EVENT_READ, w)
        self._peer_log.log(log, logging.INFO, "TLS connections", w.host,
                           "TLS %s from %s, client certificate: %s", sock.version(), w.host,
                           tls.peer_name(sock))
        return True

    def _read_tls(self, w: _Waiting) -> None:
        sock = cast(ssl.SSLSocket, w.sock)
        while True:
            verdict = judge_first_pdu(bytes(w.buf))
            if isinstance(verdict, str):
                self._garbage(w, verdict)
                return
            if len(w.buf) >= HEADER and len(w.buf) >= verdict:
                self._complete(w, bytes(w.buf))
                return
            try:
                chunk = sock.recv(verdict - len(w.buf))
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
                self._wait_for(w, exc)
                return
            except OSError:  # a reset, or a broken TLS record: the peer broke off
                chunk = b""
            if not chunk:
                self._closed(w, len(w.buf))
                return
            w.buf += chunk

    def _wait_for(self, w: _Waiting, exc: ssl.SSLError) -> None:
        """TLS wants to read (or, rarely, write) before it can go on."""
        wants_read = isinstance(exc, ssl.SSLWantReadError)
        self._selector.modify(w.sock, selectors.EVENT_READ if wants_read
                              else selectors.EVENT_WRITE, w)

    def _read_plain(self, w: _Waiting) -> None:
        """Peek (nothing is consumed: pynetdicom reads the request itself)."""
        try:
            head = w.sock.recv(max(w.need, HEADER), socket.MSG_PEEK)
        except OSError:  # reset by the peer
            head = b""
        verdict = judge_first_pdu(head)
        if isinstance(verdict, str):
            self._garbage(w, verdict)
        elif len(head) >= HEADER and len(head) >= verdict:
            self._complete(w, head)
        elif len(head) <= w.seen:
            # readable with fewer bytes than SO_RCVLOWAT asks for: the peer has closed
            self._closed(w, len(head))
        else:
            w.seen, w.need = len(head), verdict
            _set_lowat(w.sock, verdict)

    # outcomes

    def _drop(self, w: _Waiting, why: str, level: int = logging.WARNING,
              kind: str = "dropped connections") -> None:
        self._forget(w)
        _close(w.sock)
        self._peer_log.log(log, level, kind, w.host, "dropped connection from %s: %s", w.host,
                           why)

    def _closed(self, w: _Waiting, got: int) -> None:
        self._count("closed")
        if got:
            self._drop(w, f"closed after {got} bytes, before its A-ASSOCIATE-RQ was complete")
        else:
            # port probes and health checks do this: the least worrying kind, logged apart
            self._drop(w, "closed without sending anything", logging.INFO, "closed connections")

    def _garbage(self, w: _Waiting, why: str) -> None:
        self._count("garbage")
        self._drop(w, why)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._waiting:
            w = next(iter(self._waiting.values()))
            if w.deadline > now:
                return
            self._count("silent")
            if w.tls and not w.handshaken:
                self._forget(w)
                _close(w.sock)
                self._peer_log.log(log, logging.WARNING, "refused TLS connections", w.host,
                                   "refused TLS connection from %s: handshake timed out",
                                   w.host)
            else:
                got = len(w.buf) if w.tls else w.seen
                self._drop(w, f"no whole A-ASSOCIATE-RQ within "
                              f"{self._limits.first_pdu_timeout:g} s ({got} bytes)")

    def _complete(self, w: _Waiting, head: bytes) -> None:
        """The A-ASSOCIATE-RQ is in: refuse the caller here, or hand the socket over."""
        caller = calling_ae(head)
        if self._screen is not None and self._screen(caller, w.host):
            self._count("caller_refused")
            self._reject(w, head, CALLING_AE_NOT_RECOGNISED)
            return
        if self._server.associations() >= self._limits.max_associations:
            self._count("busy")
            self._peer_log.log(log, logging.WARNING, "refused associations", w.host,
                               "refused association from AE %s at %s: %s", caller, w.host,
                               ASSOCIATION_REJECT_REASONS[LOCAL_LIMIT_EXCEEDED])
            self._reject(w, head, LOCAL_LIMIT_EXCEEDED)
            return
        self._forget(w)
        sock = w.sock
        if w.tls:
            cast(ReplaySSLSocket, sock).replay = bytes(w.buf)
        else:
            _set_lowat(sock, 1)
        sock.setblocking(True)
        sock.settimeout(self._limits.network_timeout)  # a stalled peer cannot block a read
        self._count("handed_over")
        self._server.hand_over(sock, w.address)

    def _reject(self, w: _Waiting, head: bytes, reason: tuple[int, int, int]) -> None:
        """Answer A-ASSOCIATE-RJ and close (the request read first: unread bytes would turn
        our close into a reset that can overtake the answer)."""
        self._forget(w)
        try:
            if not w.tls:
                w.sock.recv(len(head))
            w.sock.send(reject_pdu(*reason))
        except OSError:  # the peer is gone or not reading: the close says enough
            pass
        _close(w.sock)

    # housekeeping

    def _prune(self, now: float) -> None:
        """Forget rate buckets that have refilled (bounded memory under many addresses)."""
        rate = self._limits.rate_per_address
        full = [h for h, b in self._buckets.items()
                if b.tokens + (now - b.stamp) * rate >= _burst(rate)]
        for host in full:
            del self._buckets[host]
        if len(self._buckets) > MAX_TRACKED_PEERS:
            self._buckets.clear()  # under a flood from that many addresses, start afresh

    def _report(self) -> None:
        """One line about what the gate turned away, when it turned anything away."""
        stats, self.stats = self.stats, GateStats()
        if stats.turned_away():
            log.info("connections in the last %.0f s: %s", self._limits.stats_seconds,
                     stats.line())

    def _close_all(self) -> None:
        for w in list(self._waiting.values()):
            self._forget(w)
            _close(w.sock)
        while True:
            try:
                _close(self._inbox.get_nowait()[0])
            except queue.Empty:
                break
        self._selector.close()
        _close(self._wake_r)
        _close(self._wake_w)


def _set_lowat(sock: socket.socket, nbytes: int) -> None:
    """Readable for the selector only once `nbytes` have arrived or the peer closed (Linux
    honours this in poll/epoll): a peer trickling its request costs no wake-ups, and a wake-up
    without the bytes asked for means the peer has closed."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, nbytes))


# --- the server ---------------------------------------------------------------------------


class GateServer(ThreadedAssociationServer):
    """pynetdicom's server with the gate in front: the accept thread accepts and nothing else,
    no thread starts before an A-ASSOCIATE-RQ is in."""

    # the kernel's queue of connections not yet accepted (socketserver's 5 overflows under a
    # burst, and a SYN dropped there costs the next camera a one-second retransmission)
    request_queue_size = 256
    GC_SECONDS = 60.0  # pynetdicom collects cycles of dead associations: at most this often

    def __init__(self, *args: Any, limits: GateLimits, peer_log: PeerLog,
                 screen: Screen | None = None, **kwargs: Any) -> None:
        """As ThreadedAssociationServer, plus the gate's limits, log budget and screen."""
        super().__init__(*args, **kwargs)
        self.gate = Gate(self, limits, peer_log, screen, self.ssl_context)
        self._collected = time.monotonic()

    def service_actions(self) -> None:
        """pynetdicom runs gc.collect() every 60th accept loop: under a connection flood that
        is many full collections a second. Here: once a minute at most."""
        now = time.monotonic()
        if now - self._collected >= self.GC_SECONDS:
            self._collected = now
            gc.collect()

    def start(self) -> None:
        """The gate thread and the accept thread, both daemons."""
        self.gate.start()
        threading.Thread(target=self.serve_forever, name="dicom-accept", daemon=True).start()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept; no TLS wrapping or handshake here (the gate does both)."""
        listener = cast(socket.socket, self.socket)
        return cast(tuple[socket.socket, tuple[str, int]], listener.accept())

    def process_request(self, request: Any, client_address: Any) -> None:
        """Into the gate: no thread for a connection that has said nothing yet."""
        self.gate.submit(request, client_address)

    def hand_over(self, sock: socket.socket, address: Any) -> None:
        """The connection with its A-ASSOCIATE-RQ in, to pynetdicom (its Association thread
        starts here; creating it does no I/O)."""
        self.finish_request(sock, address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log (socketserver would print to stderr)."""
        log.exception("association set-up failed for %s", client_address)

    def associations(self, host: str | None = None) -> int:
        """Associations running now (those from `host` only, when given)."""
        return sum(1 for a in self.active_associations
                   if host is None or a.requestor.address == host)

    def shutdown(self) -> None:
        """Stop accepting, then stop the gate (associations under way go on)."""
        super().shutdown()
        self.gate.stop()


def start_server(ae: AE, address: tuple[str, int], handlers: Sequence[Any],
                 ssl_context: ssl.SSLContext | None, limits: GateLimits, peer_log: PeerLog,
                 screen: Screen | None = None) -> GateServer:
    """The SCP behind the gate, serving in background threads, plain TCP or TLS."""
    server = cast(GateServer, ae.make_server(
        address, ssl_context=ssl_context, evt_handlers=list(handlers), server_class=GateServer,
        limits=limits, peer_log=peer_log, screen=screen))
    server.start()
    ae._servers.append(server)  # as start_server does: shutdown() removes it from there
    return server
