"""An in-process PACS stand-in: a C-STORE SCP that keeps what it receives (demo and tests).

It accepts what the node sends (the SR, the result image, the PDF report), stores each object
as received and records when it answered, so the demo can measure "last instance in -> SR
acknowledged". SRs are counted apart (`srs`, `by_study`, `wait_for` count SRs unless told
otherwise): "one SR per study" stays what the demo and the tests check. It can be told to
refuse (a status, for every object or per SOP class) or not to accept a SOP class at all, to
play a broken or limited PACS.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from io import BytesIO

from pydicom import Dataset, dcmread
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from node.dicom.codes import (
    ENCAPSULATED_PDF_STORAGE,
    SC_IMAGE_STORAGE,
    SR_STORAGE_CLASSES,
    VERIFICATION,
)

log = logging.getLogger(__name__)

SR_CLASSES = SR_STORAGE_CLASSES
RESULT_CLASSES: tuple[str, ...] = (*SR_STORAGE_CLASSES, SC_IMAGE_STORAGE,
                                   ENCAPSULATED_PDF_STORAGE)


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
    # SOP class -> status: refuse only those (e.g. a PACS that takes SR but not SC)
    refuse_classes: dict[str, int] = field(default_factory=dict)
    # SOP classes whose presentation contexts are accepted (a PACS without PDF support: leave
    # it out, and the node's C-STORE of it cannot even start)
    accepted_classes: tuple[str, ...] = RESULT_CLASSES
    received: list[Received] = field(default_factory=list)  # every object, in arrival order
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadedAssociationServer | None = None

    def start(self) -> int:
        """Listen (port 0 = the OS picks one); returns the port."""
        ae = AE(ae_title=self.ae_title)
        for uid in self.accepted_classes:
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
        refused = self.refuse_classes.get(str(event.context.abstract_syntax))
        if refused is not None:
            return refused
        try:
            raw = bytes(event.encoded_dataset())
            ds = dcmread(BytesIO(raw))
        except Exception:  # a stand-in must answer, whatever arrives
            log.exception("PACS stand-in could not read an object")
            return 0xC000
        with self._lock:
            self.received.append(Received(ds, raw, event.assoc.requestor.ae_title, time.time()))
        return 0x0000

    def objects(self, sop_classes: Collection[str] | None = None) -> list[Received]:
        """Received objects of these SOP classes (None: all), in arrival order."""
        with self._lock:
            return [r for r in self.received
                    if sop_classes is None or str(r.dataset.SOPClassUID) in sop_classes]

    @property
    def srs(self) -> list[Received]:
        """The SRs received, in arrival order."""
        return self.objects(SR_CLASSES)

    def by_study(self, sop_classes: Collection[str] | None = SR_CLASSES
                 ) -> dict[str, list[Received]]:
        """Received SRs (or objects of `sop_classes`; None: all) by Study Instance UID."""
        out: dict[str, list[Received]] = {}
        for r in self.objects(sop_classes):
            out.setdefault(str(r.dataset.StudyInstanceUID), []).append(r)
        return out

    def wait_for(self, n: int, timeout: float,
                 sop_classes: Collection[str] | None = SR_CLASSES) -> bool:
        """Poll until n SRs (or objects of `sop_classes`; None: any) arrived or timeout
        (seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.objects(sop_classes)) >= n:
                return True
            time.sleep(0.05)
        return False
