"""Access control on real associations: the calling-AE allowlist (with host pinning), the
association limit and timeouts from config, DICOM over TLS for the SCP and the export SCU (with
and without client certificates, against certificates made here with the openssl CLI), and no
patient name or ID in any log record or on stderr during a whole flow."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt

from model.classes import CLASS_NAMES
from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.config import Config, ConfigError, config_from_dict, load_config
from node.demo.modality import echo, send_paths
from node.demo.pacs_standin import SR_CLASSES, VERIFICATION, PacsStandIn
from node.export.scu import Destination
from node.service.node import Node
from storage.reports import study_summaries
from tests.support import hostile
from tests.support.nodes import node_config, wait_study
from tests.support.pki import Pki, client_ctx
from tests.support.wait import wait_for

CALLER = "TEST_CAMERA"


def _tls_echo(port: int, ctx: ssl.SSLContext, calling_ae: str = CALLER) -> int | None:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="DSCINT", tls_args=(ctx, "localhost"))
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()


def _tls_cfg(tmp: Path, model: Path, pacs_port: int, pki: Pki, **tls: object) -> Config:
    section: dict[str, object] = {"enabled": True, "cert_file": str(pki.crt("server")),
                                  "key_file": str(pki.key("server")), **tls}
    return node_config(tmp / "node", model, pacs_port, tls=section,
                       node={"acse_timeout": 2.0})


def _messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# --- allowlist, limits, timeouts -----------------------------------------------------------


def test_allowlist_refusals_are_logged_with_the_reason(
        tmp_path: Path, untrained_model: Path, pacs: PacsStandIn,
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      node={"allowed_callers": ["GOOD_CAM@127.0.0.1", "FAR_CAM@10.9.9.9"]})
    with Node(cfg) as n, caplog.at_level(logging.WARNING, logger="node"):
        dest = Destination("DSCINT", "127.0.0.1", n.port)
        assert echo(dest, "GOOD_CAM") == 0
        assert echo(dest, "EVIL_CAM") is None
        assert echo(dest, "FAR_CAM") is None
    text = _messages(caplog)
    assert "refused association from AE EVIL_CAM at 127.0.0.1: not in [node].allowed_callers " \
           "(AE title not listed)" in text
    assert "refused association from AE FAR_CAM at 127.0.0.1: not in [node].allowed_callers " \
           "(AE title allowed only from another host)" in text
    assert "GOOD_CAM" not in text


def test_association_limit_rejects_the_extra_one(tmp_path: Path, untrained_model: Path,
                                                 pacs: PacsStandIn,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      node={"max_associations": 1})
    with Node(cfg) as n, caplog.at_level(logging.WARNING, logger="node"):
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(VERIFICATION)
        held = ae.associate("127.0.0.1", n.port, ae_title="DSCINT")
        assert held.is_established
        try:
            extra = AE(ae_title="EXTRA")
            extra.add_requested_context(VERIFICATION)
            second = extra.associate("127.0.0.1", n.port, ae_title="DSCINT")
            assert second.is_rejected
            rj = second.acceptor.primitive
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        finally:
            held.release()
        # the released association's thread winds down, then a new caller gets its place
        wait_for(lambda: echo(Destination("DSCINT", "127.0.0.1", n.port), CALLER) == 0, 5,
                 "C-ECHO to succeed once the held association is released", interval=0.1)
    assert "refused association from AE EXTRA at 127.0.0.1: too many simultaneous " \
           "associations ([node].max_associations)" in _messages(caplog)


def test_silent_client_is_dropped_after_the_acse_timeout(tmp_path: Path,
                                                         untrained_model: Path,
                                                         pacs: PacsStandIn) -> None:
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      node={"acse_timeout": 1.0})
    with Node(cfg) as n, socket.create_connection(("127.0.0.1", n.port), timeout=10) as sock:
        t0 = time.monotonic()
        assert sock.recv(1) == b""  # the node closed the connection
        assert time.monotonic() - t0 < 8


def test_unknown_transfer_syntax_context_refused_and_logged(
        tmp_path: Path, untrained_model: Path, pacs: PacsStandIn,
        caplog: pytest.LogCaptureFixture) -> None:
    with Node(node_config(tmp_path / "node", untrained_model, pacs.port)) as n, \
            caplog.at_level(logging.WARNING, logger="node"):
        ae = AE(ae_title="ODD_CAM")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.20", hostile.UNKNOWN_TRANSFER_SYNTAX)
        ae.add_requested_context(VERIFICATION)
        assoc = ae.associate("127.0.0.1", n.port, ae_title="DSCINT")
        assert assoc.is_established
        assoc.release()
    assert "refused presentation context Nuclear Medicine Image Storage with transfer " \
           f"syntax(es) {hostile.UNKNOWN_TRANSFER_SYNTAX}: transfer syntaxes not supported" \
           in _messages(caplog)


# --- TLS -----------------------------------------------------------------------------------


def test_tls_config_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"\[tls\].cert_file"):
        config_from_dict({"tls": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"require_client_cert"):
        config_from_dict({"tls": {"enabled": True, "cert_file": "a", "key_file": "b",
                                  "require_client_cert": True}})
    with pytest.raises(ConfigError, match=r"\[pacs\].tls_cert_file"):
        config_from_dict({"pacs": {"tls": True, "tls_cert_file": "a"}})


def test_missing_certificate_stops_start_up_naming_the_key(tmp_path: Path,
                                                           untrained_model: Path) -> None:
    cfg = node_config(tmp_path / "node", untrained_model, 104,
                      tls={"enabled": True, "cert_file": str(tmp_path / "none.crt"),
                           "key_file": str(tmp_path / "none.key")})
    with pytest.raises(ConfigError, match=r"\[tls\].cert_file: file not found"):
        Node(cfg)


def test_tls_scp_serves_tls_clients_and_logs_plain_ones(
        tmp_path: Path, untrained_model: Path, pacs: PacsStandIn, pki: Pki,
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = _tls_cfg(tmp_path, untrained_model, pacs.port, pki)
    study = write_study(generate_study("normal", seed=21), tmp_path / "s", DicomLayout.MULTIFRAME)
    with Node(cfg) as n, caplog.at_level(logging.INFO, logger="node"):
        assert _tls_echo(n.port, client_ctx(pki)) == 0
        ae = AE(ae_title=CALLER)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", n.port, ae_title="DSCINT",
                             tls_args=(client_ctx(pki), "localhost"))
        assert assoc.is_established
        assert assoc.send_c_store(study[0]).Status == 0
        assoc.release()
        assert echo(Destination("DSCINT", "127.0.0.1", n.port), CALLER) is None  # plain TCP
        assert _tls_echo(n.port, client_ctx(pki, ca="rogue-ca")) is None  # distrusts us
        wait_for(lambda: _messages(caplog).count("refused TLS connection from 127.0.0.1") >= 2,
                 10, "both refused TLS connections to be logged")
    text = _messages(caplog)
    assert "TLS TLSv1.3 from 127.0.0.1, client certificate: none" in text
    assert text.count("refused TLS connection from 127.0.0.1") >= 2


def test_tls_client_certificates_required(tmp_path: Path, untrained_model: Path,
                                          pacs: PacsStandIn, pki: Pki,
                                          caplog: pytest.LogCaptureFixture) -> None:
    cfg = _tls_cfg(tmp_path, untrained_model, pacs.port, pki, ca_file=str(pki.crt("ca")),
                   require_client_cert=True)
    with Node(cfg) as n, caplog.at_level(logging.INFO, logger="node"):
        assert _tls_echo(n.port, client_ctx(pki, cert="client")) == 0
        assert _tls_echo(n.port, client_ctx(pki)) is None
        assert _tls_echo(n.port, client_ctx(pki, cert="rogue")) is None
        wait_for(lambda: _messages(caplog).count("refused TLS connection") >= 2, 10,
                 "both refused TLS connections to be logged")
    text = _messages(caplog)
    assert "client certificate: client" in text
    refusals = [m for m in text.splitlines() if "refused TLS connection" in m]
    assert len(refusals) == 2, refusals
    assert any("CERTIFICATE" in m.upper() for m in refusals), refusals


def test_silent_tls_client_does_not_block_others(tmp_path: Path, untrained_model: Path,
                                                 pacs: PacsStandIn, pki: Pki,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    cfg = _tls_cfg(tmp_path, untrained_model, pacs.port, pki)
    with Node(cfg) as n, caplog.at_level(logging.WARNING, logger="node"), \
            socket.create_connection(("127.0.0.1", n.port), timeout=10):
        # connected, and never says a word; the listener's accept queue is first in, first
        # out, so the node accepts this one (and starts its handshake) before the echo's
        t0 = time.monotonic()
        assert _tls_echo(n.port, client_ctx(pki)) == 0
        assert time.monotonic() - t0 < 1.5  # not behind the silent one's 2 s timeout
        wait_for(lambda: "handshake timed out" in _messages(caplog), 6,
                 "the silent client's handshake to time out", interval=0.1)
    assert "refused TLS connection from 127.0.0.1: handshake timed out" in _messages(caplog)


class TlsPacs(PacsStandIn):
    """The PACS stand-in behind TLS (optionally demanding a client certificate)."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        super().__init__(ae_title="TLS_PACS")
        self.ctx = ctx

    def start(self) -> int:
        ae = AE(ae_title=self.ae_title)
        for uid in SR_CLASSES:
            ae.add_supported_context(uid)
        server = ae.start_server((self.host, 0), block=False, ssl_context=self.ctx,
                                 evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        assert server is not None
        self._server = server
        self.port = int(server.server_address[1])
        return self.port


def _pacs_ctx(pki: Pki, cert: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.crt(cert)), str(pki.key(cert)))
    ctx.load_verify_locations(cafile=str(pki.crt("ca")))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@pytest.mark.parametrize("pacs_cert, delivered", [("server", True), ("wrong-name", False)])
def test_sr_export_over_mutual_tls(tmp_path: Path, untrained_model: Path, pki: Pki,
                                   pacs_cert: str, delivered: bool) -> None:
    tls_pacs = TlsPacs(_pacs_ctx(pki, pacs_cert))
    port = tls_pacs.start()
    try:
        cfg = node_config(tmp_path / "node", untrained_model, port,
                          pacs={"ae_title": "TLS_PACS", "tls": True,
                                "tls_ca_file": str(pki.crt("ca")),
                                "tls_server_name": "localhost",
                                "tls_cert_file": str(pki.crt("client")),
                                "tls_key_file": str(pki.key("client"))},
                          export={"max_attempts": 2, "backoff_base_seconds": 0.1})
        paths = write_study(generate_study("arthritis", seed=22), tmp_path / "s",
                            DicomLayout.MULTIFRAME)
        with Node(cfg) as n:
            assert send_paths(paths, Destination("DSCINT", "127.0.0.1", n.port), CALLER) == [0]
            if delivered:
                assert tls_pacs.wait_for(1, timeout=30)
                return
            uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
            row = wait_study(n.db, uid, "export dead-lettered", export_state="dead")
            assert "TLS handshake failed" in (row.last_error or "")
            assert not tls_pacs.received
    finally:
        tls_pacs.stop()


# --- no PHI in logs ------------------------------------------------------------------------


class _Everything(logging.Handler):
    """Keeps every record, formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def every_record() -> Iterator[_Everything]:
    """All log records at DEBUG, from every logger, while the block runs.

    Levels left on named loggers by earlier tests (the CLI quiets pynetdicom and pydicom) are
    reset first, so what is silenced inside the block is what the node itself silences."""
    handler, root = _Everything(), logging.getLogger()
    named = [lg for lg in logging.root.manager.loggerDict.values()
             if isinstance(lg, logging.Logger)]
    before = root.level, {lg: lg.level for lg in named}
    for lg in named:
        lg.setLevel(logging.NOTSET)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(before[0])
        for lg, level in before[1].items():
            lg.setLevel(level)


def test_no_patient_name_or_id_in_any_log_line(tmp_path: Path, untrained_model: Path,
                                                pacs: PacsStandIn,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    studies = [generate_study(CLASS_NAMES[i], seed=40 + i) for i in range(3)]
    phi = [v for s in studies for v in (str(s.patient.patient_name), s.patient.patient_id)]
    files = [write_study(s, tmp_path / f"s{i}", list(DicomLayout)[i])
             for i, s in enumerate(studies)]
    base = hostile.base_dataset(41)
    odd = hostile.phi_bearing(base, 41, *phi[:2])  # the first patient's name and ID misplaced
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      logging={"level": "DEBUG"}, completion={"quiet_seconds": 0.5})
    capfd.readouterr()  # inputs are built (pydicom complains about them here): now listen
    with every_record() as records, Node(cfg) as n:
        dest = Destination("DSCINT", "127.0.0.1", n.port)
        for paths in files:
            assert send_paths(paths, dest, CALLER) == [0] * len(paths)
        answers = hostile.send_inputs(odd, dest, CALLER, tmp_path / "odd")
        assert all(a is not None for a in answers)
        uids = {str(dcmread(p[0], stop_before_pixels=True).StudyInstanceUID) for p in files}
        wait_for(lambda: uids <= set(pacs.by_study()), 60, "an SR for each study at PACS",
                 interval=0.1)

        def all_finished() -> bool:  # the accepted odd inputs complete by silence too
            rows = study_summaries(n.db)
            return bool(rows) and all(r.state in ("classified", "failed", "not_applicable")
                                      and r.export_state in (None, "done", "dead")
                                      for r in rows)

        wait_for(all_finished, 60, "every study, odd inputs included, classified and exported")
    captured = capfd.readouterr()
    text = "\n".join(records.lines) + captured.out + captured.err
    assert len(records.lines) > 100  # DEBUG really was on
    leaks = [v for v in phi if v in text]
    assert not leaks, [line for line in text.splitlines() if any(v in line for v in leaks)][:5]


def test_shipped_config_tls_and_health_sections_equal_defaults() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "config.toml")
    assert cfg.tls == Config().tls and cfg.health == Config().health
    assert cfg.pacs == Config().pacs and cfg.storage == Config().storage
