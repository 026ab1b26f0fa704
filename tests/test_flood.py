"""The listener under connection floods, through real sockets: connections that have not sent
an A-ASSOCIATE-RQ hold no association slot and no thread, per-address caps and a connection
rate bound one host, TLS clients that never speak hold nothing either, and refusals make one
rate-limited log line per association.

Attackers connect from other loopback addresses (127.0.1.x, 127.0.2.x: Linux routes all of
127/8 to lo), so the allowed camera at 127.0.0.1 is a different host to the node's limits.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.events import Event

from node.config import ConfigError, config_from_dict
from node.demo.pacs_standin import PacsStandIn
from node.receive.listener import GateLimits, PeerLog, _Bucket, start_server
from node.service.node import Node
from tests.support.net import free_port
from tests.support.nodeproc import NodeProc, process_tree, write_config
from tests.support.nodes import node_config
from tests.support.pki import Pki, client_ctx
from tests.support.wait import wait_for

CALLER = "TEST_CAMERA"
VERIFICATION = "1.2.840.10008.1.1"
NODE_AE = "DSCINT"


# --- clients -------------------------------------------------------------------------------


def timed_echo(port: int, source: str = "127.0.0.1", calling: str = CALLER,
               tls_ctx: ssl.SSLContext | None = None) -> tuple[int | None, float]:
    """C-ECHO from `source`: (status or None, seconds from connect to answer)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(VERIFICATION)
    t0 = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, bind_address=(source, 0),
                         tls_args=(tls_ctx, "localhost") if tls_ctx else None)
    if not assoc.is_established:
        return None, time.monotonic() - t0
    try:
        rsp = assoc.send_c_echo()
        return (int(rsp.Status) if "Status" in rsp else None), time.monotonic() - t0
    finally:
        assoc.release()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection from `source` that says nothing (yet)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(source, 0))
    return sock


def closed_by_node(sock: socket.socket) -> bool:
    """True when the node has closed the connection (EOF, reset, or TLS cut short); waits up
    to the socket's timeout for it."""
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


def reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def associate_rq(calling: str, length: int | None = None) -> bytes:
    """A minimal A-ASSOCIATE-RQ head: the fixed fields, no items (enough for the gate)."""
    body = struct.pack(">HH16s16s32s", 1, 0, NODE_AE.ljust(16).encode(),
                       calling.ljust(16).encode(), bytes(32))
    return struct.pack(">BBI", 0x01, 0, len(body) if length is None else length) + body


def messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# --- the flood, against a node in its own process ------------------------------------------


@dataclass
class Flood:
    """Attackers in one thread: `idle` connections that never speak, reopened as the node
    drops them, and `rate` connect+close a second, from addresses other than the camera's."""

    port: int
    idle: int = 200
    rate: float = 10.0
    idle_sources: list[str] = field(default_factory=lambda: [f"127.0.1.{i}" for i in range(1, 41)])
    churn_sources: list[str] = field(default_factory=lambda: [f"127.0.2.{i}" for i in range(1, 21)])
    opened: int = 0
    dropped_by_node: int = 0
    churned: int = 0
    held: list[int] = field(default_factory=list)  # idle connections held, per sample
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Flood:
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)
        self._thread.start()
        wait_for(lambda: self.opened >= self.idle, 30, f"{self.idle} idle connections open")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)

    def _open(self, sel: selectors.BaseSelector) -> None:
        sock = socket.socket()
        sock.bind((self.idle_sources[self.opened % len(self.idle_sources)], 0))
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", self.port))
        sel.register(sock, selectors.EVENT_READ)
        self.opened += 1

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        next_churn = time.monotonic()
        try:
            while not self._stop.is_set():
                while len(sel.get_map()) < self.idle:
                    self._open(sel)
                for key, _ in sel.select(0.02):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    sel.unregister(sock)
                    sock.close()  # the node closed it (or refused it): open another
                    self.dropped_by_node += 1
                self.held.append(len(sel.get_map()))
                while time.monotonic() >= next_churn:
                    next_churn += 1.0 / self.rate
                    source = self.churn_sources[self.churned % len(self.churn_sources)]
                    with socket.create_connection(("127.0.0.1", self.port), timeout=5,
                                                  source_address=(source, 0)):
                        self.churned += 1
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            sel.close()


def proc_threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line for {pid}")


def cpu_seconds(pid: int) -> float:
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Served:
    node: NodeProc
    receiver_pid: int
    max_associations: int

    def log_text(self) -> str:
        return self.node.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, untrained_model: Path) -> Iterator[Served]:
    """A node as deployed (receiver in a process of its own), allowlist on, first-PDU timeout
    2 s, log budgets of 3 lines per 8 s per address."""
    tmp = tmp_path_factory.mktemp("flood")
    pacs = PacsStandIn(ae_title="TEST_PACS")
    pacs.start()
    port = free_port()
    cfg = write_config(tmp / "config.toml", {
        "node": {"ae_title": NODE_AE, "port": port,
                 "allowed_callers": [CALLER, "SOAK_PROBE"],  # NodeProc's start-up probe
                 "max_associations": 4, "first_pdu_timeout": 2.0,
                 "log_lines_per_address": 3, "log_window_seconds": 8.0},
        "pacs": {"ae_title": "TEST_PACS", "host": "127.0.0.1", "port": pacs.port},
        "storage": {"root": str(tmp / "node")}, "model": {"path": str(untrained_model)},
        "logging": {"level": "INFO"}})
    node = NodeProc(cfg, port, tmp / "node.log")
    node.start()
    try:
        wait_for(lambda: "listening on" in node.log_path.read_text(errors="replace"), 30,
                 "the receiver to log that it listens")
        tree = process_tree(node.pid)
        assert len(tree) == 2, "the node receives in a process of its own"
        yield Served(node, tree[1], 4)
    finally:
        node.stop()
        pacs.stop()


@pytest.mark.slow
def test_allowed_echo_answered_within_a_second_during_a_flood(served: Served) -> None:
    """200 idle sockets held (reopened as the node drops them after 2 s) and 10 connect+close
    a second: every C-ECHO of the allowed camera is answered within 1 s, the receiver's thread
    count stays where it was, its CPU stays low."""
    port, pid = served.node.port, served.receiver_pid
    baseline_threads = proc_threads(pid)
    latencies: list[float] = []
    threads: list[int] = []
    done = threading.Event()

    def sample_threads() -> None:
        while not done.wait(0.05):
            threads.append(proc_threads(pid))

    sampler = threading.Thread(target=sample_threads, name="thread-sampler", daemon=True)
    with Flood(port) as flood:
        sampler.start()
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        try:
            while time.monotonic() - t0 < 10.0:
                status, seconds = timed_echo(port)
                assert status == 0, f"C-ECHO failed during the flood after {seconds:.2f} s"
                latencies.append(seconds)
                time.sleep(0.2)
            cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        finally:
            done.set()
            sampler.join()
        held = sorted(flood.held)[len(flood.held) // 2]  # median, sampled after the drops
    print(f"\nflood: {flood.opened} idle connections opened ({flood.dropped_by_node} dropped "
          f"by the node), {flood.churned} connect+close, median {held} idle held; "
          f"{len(latencies)} C-ECHOs, max latency {max(latencies) * 1000:.0f} ms, median "
          f"{sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms; receiver threads "
          f"{baseline_threads} before, max {max(threads)} during; receiver CPU {cpu:.0%} "
          f"of a core")
    assert max(latencies) < 1.0
    assert held >= 190  # the attack really holds its sockets open
    assert flood.dropped_by_node >= 200  # the node dropped the silent ones (2 s timeout)
    assert max(threads) <= baseline_threads + 2 * served.max_associations
    assert cpu < 0.5
    text = served.log_text()
    assert "dropped connection from 127.0.1." in text
    assert "no whole A-ASSOCIATE-RQ within 2 s" in text
    wait_for(lambda: "connections in the last 8 s:" in served.log_text(), 20,
             "the listener's statistics line")


def _hundred_contexts() -> AE:
    ae = AE(ae_title=CALLER)
    for cx in StoragePresentationContexts[:99]:
        ae.add_requested_context(cx.abstract_syntax)
    ae.add_requested_context(VERIFICATION)
    return ae


def test_refused_contexts_make_one_line_per_association_rate_limited(served: Served) -> None:
    """A storescu proposing 100 classes: one summary line per association (not one per
    refused context), at most 3 per address per window, then one line counting the rest."""
    for _ in range(6):
        assoc = _hundred_contexts().associate("127.0.0.1", served.node.port, ae_title=NODE_AE,
                                              bind_address=("127.0.0.9", 0))
        assert assoc.is_established
        assoc.release()
    wait_for(lambda: "refused presentation contexts from 127.0.0.9: 3 more such lines held "
             "back" in served.log_text(), 30, "the held-back lines to be counted")
    lines = [line for line in served.log_text().splitlines()
             if "127.0.0.9" in line and "presentation context" in line]
    summaries = [line for line in lines if "association from AE TEST_CAMERA at 127.0.0.9: "
                 "refused presentation contexts (" in line]
    assert len(summaries) == 3, lines
    assert len(lines) == 4, lines  # three summaries and the count of the held-back ones
    assert all(len(line) < 800 for line in summaries), max(map(len, summaries))
    assert "abstract syntax (SOP class) not supported" in summaries[0]
    assert " more" in summaries[0]  # the list is cut, the rest counted


def test_a_caller_off_the_allowlist_is_refused_at_the_gate(served: Served) -> None:
    """An A-ASSOCIATE-RQ from an unlisted AE is answered A-ASSOCIATE-RJ (permanent, calling AE
    not recognised) by the gate; a peer that resets right after asking gets nothing and costs
    nothing."""
    ae = AE(ae_title="EVIL_CAM")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", served.node.port, ae_title=NODE_AE,
                         bind_address=("127.0.0.10", 0))
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    for _ in range(20):  # the answer goes to a peer that is gone (or going)
        sock = connect(served.node.port, "127.0.0.11")
        sock.sendall(associate_rq("EVIL_CAM"))
        reset(sock)
    assert timed_echo(served.node.port)[0] == 0
    text = served.log_text()
    assert "refused association from AE EVIL_CAM at 127.0.0.10: not in " \
           "[node].allowed_callers (AE title not listed)" in text
    assert "unexpected error" not in text


# --- one node in the test's process per test -----------------------------------------------


@pytest.fixture
def node_for(tmp_path: Path, untrained_model: Path, pacs: PacsStandIn
             ) -> Iterator[Callable[..., Node]]:
    """Start a Node with these [node] (and other) overrides; stopped after the test."""
    nodes: list[Node] = []

    def start(node: dict[str, object], **sections: dict[str, object]) -> Node:
        cfg = node_config(tmp_path / f"node{len(nodes)}", untrained_model, pacs.port,
                          node=node, **sections)
        n = Node(cfg)
        n.start()
        nodes.append(n)
        return n

    yield start
    for n in nodes:
        n.stop()


def test_silent_client_holds_no_slot_and_is_dropped_after_the_first_pdu_timeout(
        node_for: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    n = node_for({"max_associations": 1, "first_pdu_timeout": 1.0})
    with caplog.at_level(logging.INFO, logger="node"), connect(n.port) as silent:
        t0 = time.monotonic()
        status, seconds = timed_echo(n.port)
        assert status == 0  # the one slot is free: the silent socket does not hold it
        assert seconds < 1.0
        assert closed_by_node(silent)
        assert 0.8 < time.monotonic() - t0 < 5.0
        wait_for(lambda: "no whole A-ASSOCIATE-RQ within 1 s (0 bytes)" in messages(caplog), 5,
                 "the drop to be logged")
    assert "dropped connection from 127.0.0.1: no whole A-ASSOCIATE-RQ within 1 s" \
           in messages(caplog)


def test_per_address_cap(node_for: Callable[..., Node],
                         caplog: pytest.LogCaptureFixture) -> None:
    n = node_for({"max_connections_per_address": 3, "first_pdu_timeout": 10.0})
    with caplog.at_level(logging.INFO, logger="node"):
        held = [connect(n.port, "127.0.0.7") for _ in range(3)]
        extra = connect(n.port, "127.0.0.7")
        t0 = time.monotonic()
        assert closed_by_node(extra)
        assert time.monotonic() - t0 < 5.0  # at once, not after the 10 s timeout
        extra.close()
        assert timed_echo(n.port)[0] == 0  # another address is not affected
        assert timed_echo(n.port, "127.0.0.7")[0] is None  # this one is at its cap
        for sock in held:
            sock.close()
        wait_for(lambda: timed_echo(n.port, "127.0.0.7")[0] == 0, 10,
                 "the address to be allowed again once its connections are closed")
    assert "refused connection from 127.0.0.7: 3 connections open from this address " \
           "([node].max_connections_per_address)" in messages(caplog)


def test_connection_rate_per_address(node_for: Callable[..., Node],
                                     caplog: pytest.LogCaptureFixture) -> None:
    n = node_for({"max_connection_rate_per_address": 5.0})
    with caplog.at_level(logging.INFO, logger="node"):
        for _ in range(12):
            connect(n.port, "127.0.0.8").close()
        wait_for(lambda: "more than 5 new connections per second" in messages(caplog), 5,
                 "the rate refusal to be logged")
        wait_for(lambda: timed_echo(n.port, "127.0.0.8")[0] == 0, 10,
                 "the address to be allowed again once its bucket refilled", interval=0.3)
    assert "refused connection from 127.0.0.8: more than 5 new connections per second from " \
           "this address ([node].max_connection_rate_per_address)" in messages(caplog)


def test_garbage_first_bytes_are_dropped_at_once(node_for: Callable[..., Node],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    n = node_for({"max_associations": 1, "first_pdu_timeout": 10.0})
    not_rq = "first bytes are not an A-ASSOCIATE-RQ"
    cases = [(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", f"{not_rq} (PDU type 0x47)"),
             (b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x00\x00\x00", f"{not_rq} (PDU type 0x04)"),
             (associate_rq(CALLER, length=8), "malformed A-ASSOCIATE-RQ (PDU length 8)"),
             (associate_rq(CALLER, length=1 << 30),
              "malformed A-ASSOCIATE-RQ (PDU length 1073741824)")]
    with caplog.at_level(logging.INFO, logger="node"):
        for data, _ in cases:
            with connect(n.port, "127.0.0.12") as sock:
                sock.sendall(data)
                t0 = time.monotonic()
                assert closed_by_node(sock)
                assert time.monotonic() - t0 < 5.0
        with connect(n.port, "127.0.0.13") as sock:  # half a request, then gone
            sock.sendall(associate_rq(CALLER)[:40])
            sock.shutdown(socket.SHUT_WR)
            assert closed_by_node(sock)
        reset(connect(n.port, "127.0.0.14"))  # a reset before a word
        assert timed_echo(n.port)[0] == 0
        wait_for(lambda: "dropped connection from 127.0.0.14: closed without sending "
                 "anything" in messages(caplog), 5, "the reset connection to be counted")
    text = messages(caplog)
    for _, why in cases:
        assert f"dropped connection from 127.0.0.12: {why}" in text, why
    assert "dropped connection from 127.0.0.13: closed after 40 bytes, before its " \
           "A-ASSOCIATE-RQ was complete" in text


def test_pending_cap_drops_the_oldest_waiting_connection(
        node_for: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    n = node_for({"max_pending_connections": 3, "first_pdu_timeout": 10.0})
    with caplog.at_level(logging.INFO, logger="node"):
        waiting = [connect(n.port, f"127.0.3.{i}") for i in range(1, 4)]
        t0 = time.monotonic()
        assert timed_echo(n.port)[0] == 0  # its connection pushes the oldest out
        assert closed_by_node(waiting[0])
        assert time.monotonic() - t0 < 5.0
        for sock in waiting:
            sock.close()
    assert "dropped connection from 127.0.3.1: dropped to make room: too many connections " \
           "waiting for their A-ASSOCIATE-RQ ([node].max_pending_connections)" in messages(caplog)


def test_tls_silent_clients_hold_no_slot(node_for: Callable[..., Node], pki: Pki,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """With TLS: a client that never starts the handshake, and one that completes it and then
    says nothing, hold no slot (max_associations 1) and are dropped after the first-PDU
    timeout; the handshakes never block the accept loop."""
    n = node_for({"max_associations": 1, "first_pdu_timeout": 1.5},
                 tls={"enabled": True, "cert_file": str(pki.crt("server")),
                      "key_file": str(pki.key("server"))})
    ctx = client_ctx(pki)
    with caplog.at_level(logging.INFO, logger="node"), connect(n.port, "127.0.0.15") as raw, \
            connect(n.port, "127.0.0.16") as plain:
        quiet = ctx.wrap_socket(plain, server_hostname="localhost")  # handshake done
        status, seconds = timed_echo(n.port, tls_ctx=ctx)
        assert status == 0 and seconds < 1.0
        assert closed_by_node(raw)
        assert closed_by_node(quiet)
        late = ctx.wrap_socket(connect(n.port, "127.0.0.17"), server_hostname="localhost")
        wait_for(lambda: "TLS TLSv1.3 from 127.0.0.17" in messages(caplog), 5,
                 "the node to finish the handshake")
        reset(late)  # handshaken, then a reset instead of a request
        wait_for(lambda: "dropped connection from 127.0.0.17: closed without sending anything"
                 in messages(caplog), 5, "the reset to be seen")
        assert timed_echo(n.port, tls_ctx=ctx)[0] == 0
    text = messages(caplog)
    assert "refused TLS connection from 127.0.0.15: handshake timed out" in text
    assert "dropped connection from 127.0.0.16: no whole A-ASSOCIATE-RQ within 1.5 s" in text
    assert "TLS TLSv1.3 from 127.0.0.16, client certificate: none" in text


# --- the pieces ----------------------------------------------------------------------------


def test_a_screen_that_raises_costs_only_that_connection(
        caplog: pytest.LogCaptureFixture) -> None:
    """Whatever goes wrong with one connection closes that connection; the gate serves on."""
    def screen(calling: str, address: str) -> bool:
        if calling == "BOOM":
            raise RuntimeError("a bug in a screen")
        return False

    ae = AE(ae_title=NODE_AE)
    ae.add_supported_context(VERIFICATION)
    server = start_server(ae, ("127.0.0.1", 0), [(evt.EVT_C_ECHO, _echo_ok)], None,
                          GateLimits(first_pdu_timeout=5.0), PeerLog(), screen)
    port = int(server.server_address[1])
    try:
        with caplog.at_level(logging.INFO, logger="node"):
            assert timed_echo(port, calling="BOOM")[0] is None
            assert timed_echo(port)[0] == 0
    finally:
        server.shutdown()
        server.gate.stop()  # twice: a no-op
    assert "listener: unexpected error on a connection from 127.0.0.1; closed" \
           in messages(caplog)
    assert server.gate.totals.handed_over == 1


def _echo_ok(event: Event) -> int:
    return 0


def test_peer_log_budget_window_and_held_back_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    peer_log = PeerLog(lines=2, window=10.0, clock=lambda: now[0], max_peers=2)
    logger = logging.getLogger("node.test_flood")
    with caplog.at_level(logging.INFO):
        said = [peer_log.log(logger, logging.WARNING, "k", "10.0.0.1", "line %d", i)
                for i in range(5)]
        assert said == [True, True, False, False, False]
        assert peer_log.log(logger, logging.WARNING, "k", "10.0.0.2", "other")
        assert not peer_log.log(logger, logging.WARNING, "k", "10.0.0.3", "a third address")
        now[0] = 10.0  # the windows close: what they held back is said once
        peer_log.flush()
        assert peer_log.log(logger, logging.WARNING, "k", "10.0.0.1", "line again")
        now[0] = 25.0  # closed without a flush: the next line carries the count
        for _ in range(3):
            peer_log.log(logger, logging.WARNING, "k", "10.0.0.1", "line x")
        now[0] = 40.0
        assert peer_log.log(logger, logging.WARNING, "k", "10.0.0.1", "after")
    text = messages(caplog)
    assert "k from 10.0.0.1: 3 more such lines held back in the last 10 s" in text
    assert "1 log lines about further addresses held back (more than 2 addresses" in text
    assert "after (and 1 earlier such lines held back)" in text
    assert "line 2" not in text


def test_rate_bucket_allows_one_connection_even_below_one_a_second() -> None:
    bucket = _Bucket(1.0, 0.0)
    assert bucket.take(0.0, 0.5)  # a rate below 1/s still lets one through
    assert not bucket.take(1.0, 0.5)
    assert bucket.take(3.0, 0.5)
    burst = _Bucket(20.0, 0.0)
    assert sum(burst.take(0.0, 20.0) for _ in range(30)) == 20  # bursts of a second's worth


@pytest.mark.parametrize("key, value", [
    ("first_pdu_timeout", 0.0), ("max_pending_connections", 0),
    ("max_connections_per_address", 0), ("max_connection_rate_per_address", -1.0),
    ("log_lines_per_address", 0), ("log_window_seconds", 0.0)])
def test_listener_keys_are_validated(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"\[node\]\.{key}"):
        config_from_dict({"node": {key: value}})


def test_first_pdu_wait_never_exceeds_the_acse_timeout() -> None:
    cfg = config_from_dict({"node": {"first_pdu_timeout": 5.0, "acse_timeout": 1.5}})
    assert GateLimits.from_config(cfg).first_pdu_timeout == 1.5
