"""Association-level events: what pynetdicom refused (the association, or presentation
contexts) said in the log, so an admin on our side knows why a sender cannot store.

One line per association, whatever it proposed (a storescu offering 100 SOP classes used to
write a line per refused context), bounded in length, and rate-limited per peer address through
the listener's `PeerLog`. These handlers only log; they never raise and never change the
outcome."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydicom.uid import UID
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext

from node.dicom.identity import is_valid_uid, shown_uid
from node.dicom.status import ASSOCIATION_REJECT_REASONS, CONTEXT_RESULTS
from node.receive.listener import PeerLog

log = logging.getLogger(__name__)

ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03  # PS3.8 Table 9-18: its transfer syntaxes say nothing
MAX_NAMED = 6  # contexts named per refusal reason; the rest are counted
MAX_SYNTAXES = 3  # transfer syntaxes named per context
MAX_SUMMARY = 600  # characters of the refused-context summary


def _requestor(event: Event) -> tuple[str, str]:
    try:
        return str(event.assoc.requestor.ae_title).strip(), str(event.assoc.requestor.address)
    except AttributeError:
        return "?", "?"


def handle_rejected(event: Event, peer_log: PeerLog) -> None:
    """Log associations pynetdicom itself refuses, with why. Never raises."""
    try:
        caller, address = _requestor(event)
        rj = getattr(event.assoc.acceptor, "primitive", None)
        key = (getattr(rj, "result", None), getattr(rj, "result_source", None),
               getattr(rj, "diagnostic", None))
        reason = ASSOCIATION_REJECT_REASONS.get(
            key, f"result {key[0]}, source {key[1]}, reason {key[2]}")
        peer_log.log(log, logging.WARNING, "refused associations", address,
                     "refused association from AE %s at %s: %s", caller, address, reason)
    except Exception:  # logging must not disturb the association
        log.exception("could not describe a refused association")


def handle_accepted(event: Event, peer_log: PeerLog) -> None:
    """One line for the presentation contexts refused at negotiation: the sender cannot store
    those at all, and without it nobody on our side would know why. Never raises."""
    try:
        refused = list(getattr(event.assoc, "rejected_contexts", []))
        if not refused:
            return
        caller, address = _requestor(event)
        proposed = len(refused) + len(getattr(event.assoc, "accepted_contexts", []))
        peer_log.log(log, logging.WARNING, "refused presentation contexts", address,
                     "association from AE %s at %s: %s", caller, address,
                     describe_refused(refused, proposed))
    except Exception:  # logging must not disturb the association
        log.exception("could not describe refused presentation contexts")


def describe_refused(refused: Sequence[PresentationContext], proposed: int) -> str:
    """'refused presentation context X with transfer syntax(es) T: why (1 of 3)', or for
    several, grouped by why, the first few named: at most MAX_SUMMARY characters."""
    if len(refused) == 1:
        cx = refused[0]
        return f"refused presentation context {_context(cx)}: {_reason(cx)} " \
               f"(1 of {proposed})"
    groups: dict[str, list[str]] = {}
    for cx in refused:
        groups.setdefault(_reason(cx), []).append(_context(cx))
    parts = []
    for reason, items in groups.items():
        named = list(dict.fromkeys(items))[:MAX_NAMED]
        rest = len(items) - len(named)
        parts.append(f"{reason} ({len(items)}): {', '.join(named)}"
                     + (f" and {rest} more" if rest else ""))
    text = f"refused presentation contexts ({len(refused)} of {proposed}): " + "; ".join(parts)
    return text if len(text) <= MAX_SUMMARY else text[:MAX_SUMMARY - 3] + "..."


def _reason(cx: PresentationContext) -> str:
    return CONTEXT_RESULTS.get(cx.result or 0, f"result {cx.result}")


def _context(cx: PresentationContext) -> str:
    """The SOP class by name (a UID we cannot vouch for is never echoed), with its transfer
    syntaxes where they were the problem."""
    abstract = str(cx.abstract_syntax or "")
    name = UID(abstract).name if is_valid_uid(abstract) else shown_uid(abstract)
    if cx.result == ABSTRACT_SYNTAX_NOT_SUPPORTED:
        return name
    syntaxes = [shown_uid(ts) for ts in cx.transfer_syntax]
    shown = ", ".join(syntaxes[:MAX_SYNTAXES]) or "none"
    if len(syntaxes) > MAX_SYNTAXES:
        shown += f" and {len(syntaxes) - MAX_SYNTAXES} more"
    return f"{name} with transfer syntax(es) {shown}"
