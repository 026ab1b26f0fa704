"""Transfer syntaxes the SCP accepts: native ones plus every compressed one we can decode."""

from __future__ import annotations

from pydicom.uid import AllTransferSyntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.dicom_io import transfer_syntax_decodable


def accepted_transfer_syntaxes() -> list[str]:
    """Explicit VR Little Endian first (preferred), Implicit next, then the rest we decode."""
    first = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
    rest = [str(u) for u in AllTransferSyntaxes if str(u) not in first]
    return [u for u in first + rest if transfer_syntax_decodable(u)]
