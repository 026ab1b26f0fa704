"""An in-process PACS stand-in: a C-STORE SCP that keeps what it receives (demo and tests).

It stores each object as received and records when it answered, so the demo can measure "last
instance in -> SR acknowledged". It can be told to refuse (a status) to play a broken PACS.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO

from pydicom import Dataset, dcmread
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from node.dicom.codes import SR_STORAGE_CLASSES, VERIFICATION

log = logging.getLogger(__name__)

SR_CLASSES = SR_STORAGE_CLASSES


@dataclass
class Received:
    """One object the stand-in acknowledged."""

    dataset: Dataset
    raw: bytes
    calling_ae: str
    acknowledged_at: float  # time.time()


@dataclass
class PacsStandIn:
    """Start with `start()`, read `received`, stop with `stop()`."""

    ae_title: str = "PACS"
    host: str = "127.0.0.1"
    port: int = 0
    refuse_status: int | None = None
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadedAssociationServer | None = None

    def start(self) -> int:
        """Listen (port 0 = the OS picks one); returns the port."""
        ae = AE(ae_title=self.ae_title)
        for uid in SR_CLASSES:
            ae.add_supported_context(uid)
        ae.add_supported_context(VERIFICATION)
        server = ae.start_server((self.host, self.port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                                               (evt.EVT_C_ECHO, lambda e: 0x0000)])
        if server is None:  # only None when block=True
            raise RuntimeError("PACS stand-in did not start")
        self._server = server
        self.port = int(server.server_address[1])
        return self.port

    def stop(self) -> None:
        """Shut the listener down."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: Event) -> int:
        if self.refuse_status is not None:
            return self.refuse_status
        try:
            raw = bytes(event.encoded_dataset())
            ds = dcmread(BytesIO(raw))
        except Exception:  # a stand-in must answer, whatever arrives
            log.exception("PACS stand-in could not read an object")
            return 0xC000
        with self._lock:
            self.received.append(Received(ds, raw, event.assoc.requestor.ae_title, time.time()))
        return 0x0000

    def by_study(self) -> dict[str, list[Received]]:
        """Received objects grouped by Study Instance UID."""
        out: dict[str, list[Received]] = {}
        with self._lock:
            for r in self.received:
                out.setdefault(str(r.dataset.StudyInstanceUID), []).append(r)
        return out

    def wait_for(self, n: int, timeout: float) -> bool:
        """Poll until n objects arrived or timeout (seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= n:
                    return True
            time.sleep(0.05)
        return False
