"""Association-level events: what pynetdicom refused (the association, or presentation
contexts), and what each association's C-STOREs came to, said in the log, so an admin on our
side knows what a sender stored, what was ignored and why anything was refused.

One line per association, whatever it proposed or sent (a study-level route of 120 CT images,
presentation states and SRs is one line, not one per refused context or ignored instance),
bounded in length, and rate-limited per peer address through the listener's `PeerLog`. The
C-STORE handler tallies each answer in `Tallies`; the line is written when the connection
closes, and the ignored counts are then recorded in one transaction. These handlers never
raise and never change an outcome."""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext

from node.dicom.admission import Ignored
from node.dicom.codes import sop_class_keyword
from node.dicom.identity import is_valid_uid, shown_uid
from node.dicom.status import ASSOCIATION_REJECT_REASONS, CONTEXT_RESULTS
from node.receive.listener import PeerLog

log = logging.getLogger(__name__)

ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03  # PS3.8 Table 9-18: its transfer syntaxes say nothing
MAX_NAMED = 6  # contexts named per refusal reason; the rest are counted
MAX_SYNTAXES = 3  # transfer syntaxes named per context
MAX_SUMMARY = 600  # characters of the refused-context summary
MAX_LINE = 1000  # characters of the whole per-association line
MAX_TALLIED = 1024  # associations tallied at once; a tally never closed ages out
STORED = "stored"  # tally kinds: an input kept,
REFUSED = "refused"  # one refused by admission ("refused 0xA900": status appended),
REFUSED_BY_SITE = "refused_by_site"  # one of [admission].refuse_sop_classes (0x0122),
# or an Ignored value; these last two are what the database counts (per SOP class)
RECORDED_KINDS = frozenset({REFUSED_BY_SITE, *(k.value for k in Ignored)})

# (SOP class UID, kind) -> instances: what one association's ignored C-STOREs are recorded as
IgnoredCounts = Mapping[tuple[str, str], int]
Recorder = Callable[[IgnoredCounts, str], None]  # (counts, calling AE); may raise


@dataclass
class Tally:
    """One association's C-STORE answers: (kind, SOP class UID) -> count (kinds above)."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)

    def ignored(self) -> dict[tuple[str, str], int]:
        """(SOP class UID, kind) -> count of what the database records: instances answered
        Success and not kept, and those refused by [admission].refuse_sop_classes."""
        return {(uid, kind): n for (kind, uid), n in self.counts.items()
                if kind in RECORDED_KINDS}


class Tallies:
    """Per-association tallies, keyed by the association, filled by the C-STORE handler and
    taken when the connection closes. Thread-safe and bounded (`MAX_TALLIED`)."""

    def __init__(self, record: Recorder | None = None, limit: int = MAX_TALLIED) -> None:
        """`record` stores an association's ignored counts (storage.intake.count_ignored)."""
        self.record = record
        self._limit = limit
        self._lock = threading.Lock()
        self._open: OrderedDict[int, Tally] = OrderedDict()

    def count(self, assoc: object, kind: str, sop_class: str) -> None:
        """One C-STORE answered on `assoc`."""
        with self._lock:
            tally = self._open.get(id(assoc))
            if tally is None:
                tally = self._open[id(assoc)] = Tally()
                while len(self._open) > self._limit:
                    self._open.popitem(last=False)
            tally.counts[(kind, sop_class)] += 1

    def take(self, assoc: object) -> Tally:
        """The association's tally (empty when it stored nothing), forgotten here."""
        with self._lock:
            return self._open.pop(id(assoc), None) or Tally()


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


def handle_closed(event: Event, tallies: Tallies, peer_log: PeerLog) -> None:
    """The association's one line: presentation contexts refused at negotiation (the sender
    cannot store those at all), then what its C-STOREs were answered, by SOP class; and the
    ignored counts recorded. Nothing for an association that was rejected, or that only
    echoed. Never raises."""
    try:
        tally = tallies.take(event.assoc)
        if getattr(event.assoc, "is_rejected", False):
            return
        refused = list(getattr(event.assoc, "rejected_contexts", []))
        caller, address = _requestor(event)
        if refused or tally.counts:
            proposed = len(refused) + len(getattr(event.assoc, "accepted_contexts", []))
            level = logging.WARNING if refused or _any_refused(tally) else logging.INFO
            kind = "refused presentation contexts" if refused else "association summaries"
            peer_log.log(log, level, kind, address, "association from AE %s at %s: %s",
                         caller, address, describe_association(refused, proposed, tally))
        ignored = tally.ignored()
        if ignored and tallies.record is not None:
            tallies.record(ignored, caller)
    except Exception:  # logging and counting must not disturb the association's end
        log.exception("could not summarise an association")


def describe_association(refused: Sequence[PresentationContext], proposed: int,
                         tally: Tally) -> str:
    """'refused presentation contexts ...; stored 2: NuclearMedicineImageStorage 2; ignored
    (not an input) 120: CTImageStorage 120; ignored (the node's own objects) 1: ...; refused
    1: NuclearMedicineImageStorage 0xA900 1', at most MAX_LINE characters."""
    parts = [describe_refused(refused, proposed)] if refused else []
    groups: dict[str, Counter[str]] = {}
    for (kind, uid), n in tally.counts.items():
        label = kind.split(" ")[0]
        detail = kind[len(label):].strip()
        key = sop_class_keyword(uid) + (f" {detail}" if detail else "")
        groups.setdefault(label, Counter())[key] += n
    for label, title in ((STORED, "stored"), (Ignored.NOT_INPUT.value, "ignored (not an input)"),
                         (Ignored.OWN_OBJECT.value, "ignored (the node's own objects)"),
                         (REFUSED_BY_SITE, "refused ([admission].refuse_sop_classes)"),
                         (REFUSED, "refused")):
        if label in groups:
            parts.append(f"{title} {sum(groups[label].values())}: " + _named(groups[label]))
    text = "; ".join(parts)
    return text if len(text) <= MAX_LINE else text[:MAX_LINE - 3] + "..."


def _named(counts: Counter[str]) -> str:
    shown = counts.most_common(MAX_NAMED)
    rest = sum(counts.values()) - sum(n for _, n in shown)
    return ", ".join(f"{k} {n}" for k, n in shown) + (f" and {rest} more" if rest else "")


def _any_refused(tally: Tally) -> bool:
    return any(kind.startswith(REFUSED) for kind, _ in tally.counts)  # by site, too


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
