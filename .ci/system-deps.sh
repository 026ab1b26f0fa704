#!/usr/bin/env bash
# System tools the interop tests drive: DCMTK (modality/PACS), Orthanc (PACS), dicom3tools
# (dciodvfy); Debian's chromium for the web page test (tests/test_web.py drives it with
# Playwright: no browser download). Idempotent and quick when present; a machine without apt-get gets a warning
# and the interop tests skip with the reason.
set -uo pipefail

# dsrdump stands for DCMTK: pynetdicom puts Python storescu/storescp/echoscu in the venv, so
# an activated venv would make `command -v storescu` succeed without DCMTK.
if command -v dsrdump >/dev/null && command -v dciodvfy >/dev/null \
    && { command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ]; } \
    && [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "warning: apt-get not found; install dcmtk, orthanc, dicom3tools and chromium by" \
         "hand, or the interop and browser tests skip" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then
        SUDO="sudo"
    else
        echo "warning: not root and no sudo; cannot install dcmtk, orthanc, dicom3tools," \
             "chromium; the interop and browser tests skip" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
# orthanc's maintainer scripts start a system service; policy-rc.d 101 keeps it from starting
# (the tests start their own Orthanc on free ports).
POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
cleanup() {
    if [ "$ADDED_POLICY" -eq 1 ]; then
        $SUDO rm -f "$POLICY"
    fi
}
trap cleanup EXIT
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null && $SUDO chmod +x "$POLICY" \
        && ADDED_POLICY=1
fi
status=0
$SUDO apt-get update -qq || status=$?
if [ "$status" -eq 0 ]; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        dcmtk orthanc dicom3tools chromium >/dev/null || status=$?
fi
if [ "$status" -ne 0 ]; then
    echo "warning: installing dcmtk, orthanc, dicom3tools, chromium failed (exit $status);" \
         "the interop and browser tests skip" >&2
fi
exit 0
