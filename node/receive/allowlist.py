"""Who may associate: the calling-AE allowlist with optional host pinning.

The listener's gate asks `refused_caller` as soon as an A-ASSOCIATE-RQ is in and answers the
refusal itself (no thread is started for it); `check_caller` asks the same on pynetdicom's
EVT_REQUESTED, for a request that reached pynetdicom all the same."""

from __future__ import annotations

import logging

from pynetdicom.events import Event

from node.config import CallerRule
from node.receive.listener import PeerLog

log = logging.getLogger(__name__)


def refused_caller(rules: tuple[CallerRule, ...], peer_log: PeerLog, calling: str,
                   address: str) -> bool:
    """True (and logged, rate-limited per address) when the allowlist refuses this caller;
    False when it is listed or there is no allowlist."""
    if not rules or any(rule.allows(calling, address) for rule in rules):
        return False
    why = ("AE title allowed only from another host" if any(r.ae_title == calling for r in rules)
           else "AE title not listed")
    shown = "".join(c if c.isprintable() else "?" for c in calling)
    peer_log.log(log, logging.WARNING, "refused associations", address,
                 "refused association from AE %s at %s: not in [node].allowed_callers (%s)",
                 shown, address, why)
    return True


def check_caller(rules: tuple[CallerRule, ...], peer_log: PeerLog, event: Event) -> None:
    """Calling-AE allowlist with optional host pinning; refusals are logged with why."""
    if not rules:
        return
    primitive = event.assoc.requestor.primitive
    calling = str(getattr(primitive, "calling_ae_title", "")).strip()
    if refused_caller(rules, peer_log, calling, str(event.assoc.requestor.address)):
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
