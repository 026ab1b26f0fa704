"""Who may associate: the calling-AE allowlist with optional host pinning."""

from __future__ import annotations

import logging

from pynetdicom.events import Event

from node.config import CallerRule

log = logging.getLogger(__name__)


def check_caller(rules: tuple[CallerRule, ...], event: Event) -> None:
    """Calling-AE allowlist with optional host pinning; refusals are logged with why."""
    if not rules:
        return
    primitive = event.assoc.requestor.primitive
    calling = str(getattr(primitive, "calling_ae_title", "")).strip()
    address = str(event.assoc.requestor.address)
    if any(rule.allows(calling, address) for rule in rules):
        return
    why = ("AE title allowed only from another host" if any(r.ae_title == calling for r in rules)
           else "AE title not listed")
    log.warning("refused association from AE %s at %s: not in [node].allowed_callers (%s)",
                calling, address, why)
    event.assoc.acse.send_reject(0x01, 0x01, 0x03)
