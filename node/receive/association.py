"""Association-level events: what pynetdicom refused (the association, or presentation
contexts) said in the log, so an admin on our side knows why a sender cannot store. These
handlers only log; they never raise and never change the outcome."""

from __future__ import annotations

import logging

from pydicom.uid import UID
from pynetdicom.events import Event

from node.dicom.identity import is_valid_uid, shown_uid
from node.dicom.status import ASSOCIATION_REJECT_REASONS, CONTEXT_RESULTS

log = logging.getLogger(__name__)


def _requestor(event: Event) -> tuple[str, str]:
    try:
        return str(event.assoc.requestor.ae_title).strip(), str(event.assoc.requestor.address)
    except AttributeError:
        return "?", "?"


def handle_rejected(event: Event) -> None:
    """Log associations pynetdicom itself refuses (mostly the association limit), with why.
    Never raises."""
    try:
        caller, address = _requestor(event)
        rj = getattr(event.assoc.acceptor, "primitive", None)
        key = (getattr(rj, "result", None), getattr(rj, "result_source", None),
               getattr(rj, "diagnostic", None))
        reason = ASSOCIATION_REJECT_REASONS.get(
            key, f"result {key[0]}, source {key[1]}, reason {key[2]}")
        log.warning("refused association from AE %s at %s: %s", caller, address, reason)
    except Exception:  # logging must not disturb the association
        log.exception("could not describe a refused association")


def handle_accepted(event: Event) -> None:
    """Log presentation contexts refused at negotiation: the sender cannot store those at
    all, and without this line nobody on our side would know why. Never raises."""
    try:
        caller, address = _requestor(event)
        for cx in getattr(event.assoc, "rejected_contexts", []):
            abstract = str(cx.abstract_syntax or "")
            name = UID(abstract).name if is_valid_uid(abstract) else shown_uid(abstract)
            syntaxes = ", ".join(shown_uid(ts) for ts in cx.transfer_syntax) or "none"
            log.warning("association from AE %s at %s: refused presentation context %s with "
                        "transfer syntax(es) %s: %s", caller, address, name, syntaxes,
                        CONTEXT_RESULTS.get(cx.result or 0, f"result {cx.result}"))
    except Exception:  # logging must not disturb the association
        log.exception("could not describe refused presentation contexts")
