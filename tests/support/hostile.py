"""Hostile and broken C-STORE input: a corpus generator and a sender that puts each input's
bytes on the wire exactly as built.

Why: a node on a hospital network receives whatever a misconfigured camera, a half-copied file
or an attacker sends, and must answer every one without falling over. Each `HostileInput` is a
Part-10 file whose file meta is intact (so a sender can pick a presentation context) and whose
dataset bytes are broken in one way, with what the node should do about it:

- REFUSE: a specific failure status (0xA9xx or 0xCxxx, never the 0xA700 of an unexpected
  error), the reason in the log, a copy in quarantine;
- ACCEPT: valid but odd (8-bit, 12-bit, signed, MONOCHROME1, big endian, implicit VR,
  deflated, odd length with padding): stored like any other instance;
- EITHER: randomly garbled bytes: any answer will do, as long as there is one (and a refusal
  follows the REFUSE rules);
- IGNORE: valid DICOM that is not an input (a CT image, a Secondary Capture of another
  modality): Success, and nothing kept, classified or quarantined (a study-level route from
  PACS carries such objects beside the bone scan);
- NOT_NEGOTIATED: an unknown transfer syntax or a SOP class that is no standard storage class:
  the association refuses the presentation context, so nothing can be sent at all.

Where exactly one status is right, `HostileInput.status` names it: codestream bombs (a frame's
JPEG 2000, JPEG or JPEG-LS header declaring 16384 x 16384 or 4096 tiles in a 64 x 64 DICOM
header) answer 0xC015, codestreams that disagree with the header or cannot be read (wrong
component count, truncated headers, broken RLE segment tables) 0xC210, and the size bombs (a
deflated body inflating to 512 MiB, an instance over the default [admission].max_instance_mb)
0xC015.

`corpus(seed)` is the fixed catalogue. `truncated`, `garbled`, `header_mutation`, `vr_swap`
and `pixel_length` take parameters, so hypothesis (tests) or a seeded RNG (the soak) explore
them. Nothing here touches the network except `send_inputs`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import random
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom import config as pydicom_config
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import get_encoder
from pydicom.tag import BaseTag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from model.phantom_dicom import DicomLayout, study_datasets
from model.phantoms import generate_study
from node.dicom.codes import NM_IMAGE_STORAGE, SC_IMAGE_STORAGE
from node.dicom.status import Status
from node.export.scu import Destination

CT_IMAGE_STORAGE = str(CTImageStorage)
UNKNOWN_TRANSFER_SYNTAX = "1.2.840.10008.1.2.4.999"
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.8.498.99.1"  # no standard storage class
# Header fields a mutation may hit, and the VRs a swap may give an element.
PIXEL_FIELDS = ("Rows", "Columns", "NumberOfFrames", "BitsAllocated", "BitsStored", "HighBit",
                "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
                "RescaleSlope", "RescaleIntercept")
SWAP_KEYWORDS = ("Rows", "Columns", "NumberOfFrames", "BitsAllocated", "StudyInstanceUID",
                 "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
                 "PhotometricInterpretation", "PixelData", "ImageID")
MUTATION_VALUES: tuple[int | str, ...] = (0, 1, 7, 9, 15, 16, 17, 32, 255, 65535, -1, 2**31,
                                          "abc", "1e300", "NaN", "")
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT",
                      "UV"})
SWAP_VRS = ("US", "SS", "UL", "FD", "FL", "LO", "CS", "UI", "OB", "OW", "UN", "DS", "IS", "UT")


class Expect(StrEnum):
    """What the node should answer."""

    REFUSE = "refuse"
    ACCEPT = "accept"
    EITHER = "either"
    IGNORE = "ignore"
    NOT_NEGOTIATED = "not_negotiated"


@dataclass(frozen=True)
class HostileInput:
    """One input: the file meta a sender uses, the dataset bytes it sends, the expectation."""

    name: str
    sop_class: str
    sop_uid: str  # the C-STORE request's Affected SOP Instance UID
    transfer_syntax: str
    body: bytes
    expect: Expect
    status: int | None = None  # the one right answer, where there is exactly one

    def part10(self) -> bytes:
        """Preamble, 'DICM', file meta (always valid) and the body as built."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(self.sop_class)
        meta.MediaStorageSOPInstanceUID = UID(self.sop_uid)
        meta.TransferSyntaxUID = UID(self.transfer_syntax)
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        with _no_value_validation():
            write_file_meta_info(fp, meta, enforce_standard=True)
        return b"\0" * 128 + b"DICM" + fp.getvalue() + self.body

    def write(self, directory: Path) -> Path:
        """Save as a Part-10 file named after the input (for a sender or a human)."""
        directory.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)[:80]
        path = directory / f"{safe}.dcm"
        path.write_bytes(self.part10())
        return path


@contextlib.contextmanager
def _no_value_validation() -> Iterator[None]:
    """Build invalid values on purpose without pydicom warning about each (and quoting it)."""
    settings = pydicom_config.settings
    before = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():  # e.g. an unknown character set: intended here
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = before


def uid_for(*parts: object) -> str:
    """A deterministic UID for one input (same seed and name, same UID)."""
    return str(generate_uid(entropy_srcs=["dscint-hostile", *map(str, parts)]))


def base_dataset(seed: int = 0, shrink: int = 8) -> Dataset:
    """A valid single-frame NM object: a phantom's anterior view, every `shrink`-th pixel
    (small, so thousands of inputs stay cheap; the node accepts any geometry)."""
    ds = study_datasets(generate_study("normal", seed=seed), DicomLayout.PER_VIEW)[0]
    rows, cols = int(ds.Rows), int(ds.Columns)
    pixels = np.frombuffer(ds.PixelData, dtype="<u2").reshape(rows, cols)[::shrink, ::shrink]
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.CountsAccumulated = int(pixels.sum())
    return ds


def fresh(base: Dataset, seed: int, name: str, same_study: bool = False) -> Dataset:
    """A copy of `base` with its own SOP (and study, series) UIDs."""
    ds = copy.deepcopy(base)
    ds.SOPInstanceUID = uid_for(seed, name, "sop")
    if not same_study:
        ds.StudyInstanceUID = uid_for(seed, name, "study")
        ds.SeriesInstanceUID = uid_for(seed, name, "series")
    return ds


def encode(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The dataset's bytes in a transfer syntax (deflated when asked), values as they are."""
    fp = DicomBytesIO()
    fp.is_little_endian = transfer_syntax != ExplicitVRBigEndian
    fp.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    with _no_value_validation():
        write_dataset(fp, ds)
    data = fp.getvalue()
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = packer.compress(data) + packer.flush()
    return data


def make_input(name: str, ds: Dataset, expect: Expect,
               transfer_syntax: str = ExplicitVRLittleEndian, body: bytes | None = None,
               sop_uid: str | None = None, sop_class: str | None = None,
               status: int | None = None) -> HostileInput:
    """Wrap a dataset (or raw body bytes) with the file meta that announces it."""
    sop = sop_uid if sop_uid is not None else str(ds.get("SOPInstanceUID", "") or "")
    klass = sop_class if sop_class is not None else str(ds.get("SOPClassUID", "") or
                                                        NM_IMAGE_STORAGE)
    data = body if body is not None else encode(ds, transfer_syntax)
    return HostileInput(name, klass, sop, transfer_syntax, data, expect, status)


def _set(ds: Dataset, keyword: str, vr: str, value: Any) -> Dataset:
    """Replace an element, VR included, without validation."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    if isinstance(value, str):  # text goes in raw: pydicom would convert (and refuse) it
        data = value.encode("latin-1", "replace")
        data += (b"\0" if vr == "UI" else b" ") * (len(data) % 2)
        ds[tag] = RawDataElement(BaseTag(tag), vr, len(data), data, 0, False, True)
    else:
        ds[tag] = DataElement(tag, vr, value, validation_mode=pydicom_config.IGNORE)
    return ds


def _pixels(ds: Dataset) -> np.ndarray:
    return np.frombuffer(ds.PixelData, dtype="<u2").reshape(int(ds.Rows), int(ds.Columns))


# --- parametrised builders (hypothesis and the soak explore these) ------------------------


def truncated(base: Dataset, seed: int, keep: int) -> HostileInput:
    """The dataset cut after `keep` bytes (a half-copied file, a dropped connection)."""
    ds = fresh(base, seed, f"truncated-{keep}")
    body = encode(ds)
    keep = max(0, min(keep, len(body) - 1))
    return make_input(f"truncated@{keep}", ds, Expect.REFUSE, body=body[:keep])


def garbled(base: Dataset, seed: int, flips: Sequence[tuple[int, int]]) -> HostileInput:
    """Bytes overwritten at (position, value) pairs, positions taken modulo the header size
    (pixel flips would only make a valid noisy image)."""
    ds = fresh(base, seed, f"garbled-{list(flips)}")
    body = bytearray(encode(ds))
    header = max(len(body) - len(ds.PixelData) - 12, 1)
    for pos, value in flips:
        body[pos % header] = value & 0xFF
    return make_input(f"garbled{len(flips)}@{seed}", ds, Expect.EITHER, body=bytes(body))


def header_mutation(base: Dataset, seed: int, keyword: str, value: int | str) -> HostileInput:
    """One Image Pixel attribute set to an arbitrary (often absurd) value."""
    ds = fresh(base, seed, f"mutation-{keyword}-{value!r}")
    vr = {"PhotometricInterpretation": "CS", "NumberOfFrames": "IS", "RescaleSlope": "DS",
          "RescaleIntercept": "DS"}.get(keyword, "US")
    if vr == "US" and not (isinstance(value, int) and 0 <= value < 2**16):
        vr = "LO"  # what a confused writer would do with a value US cannot hold
    text = str(value)[:64] if vr in ("LO", "CS", "IS", "DS") else value
    _set(ds, keyword, vr, text)
    return make_input(f"mutation:{keyword}={str(value)[:24]!r}", ds, Expect.EITHER)


def vr_swap(base: Dataset, seed: int, keyword: str, vr: str) -> HostileInput:
    """An element's value bytes kept, its VR replaced: the reader must reinterpret them."""
    ds = fresh(base, seed, f"vr-{keyword}-{vr}")
    body = encode(ds)
    elem = ds[keyword]
    head = struct.pack("<HH", elem.tag.group, elem.tag.element) + elem.VR.encode("ascii")
    at = body.find(head)
    if at < 0:  # cannot happen for the keywords above; keep the input valid then
        return make_input(f"vr:{keyword}->{vr} (not found)", ds, Expect.EITHER, body=body)
    long_form = elem.VR in LONG_VRS
    length = struct.unpack_from("<I" if long_form else "<H", body, at + (8 if long_form else 6))[0]
    start = at + (12 if long_form else 8)
    value = body[start:start + length]
    body = body[:at] + _element(elem.tag, vr, value) + body[start + length:]
    return make_input(f"vr:{keyword}->{vr}", ds, Expect.EITHER, body=body)


def _element(tag: int, vr: str, value: bytes) -> bytes:
    """One explicit VR little-endian element; a value too long for a short VR goes as UN."""
    if len(value) % 2:
        value += b"\0"
    if vr not in LONG_VRS and len(value) > 0xFFFF:
        vr = "UN"
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr in LONG_VRS:
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def pixel_length(base: Dataset, seed: int, n_bytes: int) -> HostileInput:
    """Pixel Data of the wrong length for the header (short, long or empty)."""
    ds = fresh(base, seed, f"pixlen-{n_bytes}")
    data = bytes(ds.PixelData)
    expected = len(data)
    if n_bytes in (expected, expected + 1):
        n_bytes = expected + 2
    ds.PixelData = (data * (n_bytes // max(expected, 1) + 1))[:n_bytes]
    return make_input(f"pixel-length:{n_bytes}", ds, Expect.REFUSE)


def dimensions(base: Dataset, seed: int, rows: int, cols: int, frames: int) -> HostileInput:
    """Rows, Columns and Number of Frames claiming another geometry than the data has:
    memory bombs when large (refused before anything is allocated)."""
    ds = fresh(base, seed, f"dims-{rows}-{cols}-{frames}")
    same = min(rows, cols, frames) > 0 and rows * cols * frames == int(ds.Rows) * int(ds.Columns)
    _set(ds, "Rows", "US", rows & 0xFFFF)
    _set(ds, "Columns", "US", cols & 0xFFFF)
    _set(ds, "NumberOfFrames", "IS", str(frames))
    return make_input(f"dims:{rows}x{cols}x{frames}", ds, Expect.ACCEPT if same else Expect.REFUSE)


# --- codestreams and size bombs (parametrised too) --------------------------------------------

FRAME_SIZE = 64  # Rows and Columns of the DICOM header in the codestream cases
BOMB_SIZE = 16384  # what a bomb's codestream declares instead
INFLATED_BOMB_BYTES = 512 * 2**20
OVERSIZE_BYTES = 65 * 2**20  # just over the default [admission].max_instance_mb (64 MiB)
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_SOF_CODES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}


def square_image(base: Dataset, seed: int, name: str, bits: int = 16) -> Dataset:
    """A native FRAME_SIZE x FRAME_SIZE copy of `base` (its counts tiled), 8- or 16-bit."""
    ds = fresh(base, seed, name)
    px = np.resize(_pixels(base), (FRAME_SIZE, FRAME_SIZE))
    ds.Rows = ds.Columns = FRAME_SIZE
    if bits == 8:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = np.clip(px, 0, 255).astype(np.uint8).tobytes()
    else:
        ds.PixelData = px.astype("<u2").tobytes()
    return ds


def encoded_frame(ds: Dataset, transfer_syntax: str, colour: bool = False) -> bytes:
    """The native frame of `ds` encoded: Pillow for JPEG baseline (8-bit, or 3 components when
    `colour`), pydicom's installed encoders otherwise (RLE, pylibjpeg-openjpeg, pyjpegls).
    Deterministic: same pixels, same bytes."""
    if transfer_syntax == JPEGBaseline8Bit:
        grey = np.frombuffer(ds.PixelData, np.uint8).reshape(int(ds.Rows), int(ds.Columns))
        image = Image.fromarray(np.stack([grey] * 3, -1) if colour else grey)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()
    return bytes(get_encoder(transfer_syntax).encode(ds, index=0))


def encapsulated(ds: Dataset, frames: Sequence[bytes]) -> Dataset:
    """`ds` with these encoded frames as its Pixel Data (Number of Frames to match)."""
    ds.NumberOfFrames = len(frames)
    ds.EnergyWindowVector = [1] * len(frames)
    ds.DetectorVector = list(range(1, len(frames) + 1))
    ds.PixelData = encapsulate(list(frames))
    ds["PixelData"].VR = "OB"
    return ds


def with_siz(stream: bytes, rows: int, cols: int, components: int = 1, precision: int = 16,
             tile: int | None = None) -> bytes:
    """A JPEG 2000 codestream (SOC first) whose SIZ declares rows x cols, `components`
    components of `precision` bits and square tiles of `tile` (None: one tile)."""
    (old_length,) = struct.unpack_from(">H", stream, 4)
    siz = struct.pack(">HHHIIIIIIIIH", 0xFF51, 38 + 3 * components, 0, cols, rows, 0, 0,
                      tile or cols, tile or rows, 0, 0, components)
    siz += bytes([precision - 1, 1, 1]) * components
    return stream[:2] + siz + stream[4 + old_length:]


def jp2_wrapped(stream: bytes, rows: int, cols: int) -> bytes:
    """A codestream inside a JP2 file (signature, ftyp, jp2h with an ihdr of rows x cols, then
    jp2c): the ihdr may say one size and the codestream another."""
    ihdr = _box(b"ihdr", struct.pack(">IIHBBBB", rows, cols, 1, 15, 7, 0, 0))
    colr = _box(b"colr", bytes([1, 0, 0]) + struct.pack(">I", 17))
    return (JP2_SIGNATURE + _box(b"ftyp", b"jp2 " + bytes(4) + b"jp2 ")
            + _box(b"jp2h", ihdr + colr) + _box(b"jp2c", stream))


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def with_sof(stream: bytes, rows: int, cols: int, marker: int | None = None) -> bytes:
    """A JPEG or JPEG-LS stream whose first frame header (SOFn or SOF55) declares rows x cols,
    and is another SOF marker when `marker` is given."""
    data = bytearray(stream)
    pos = 2
    while data[pos + 1] not in _SOF_CODES:
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    struct.pack_into(">HH", data, pos + 5, rows, cols)
    if marker is not None:
        data[pos + 1] = marker
    return bytes(data)


def with_rle_header(frame: bytes, count: int, offsets: Sequence[int]) -> bytes:
    """An RLE frame whose 64-byte header says `count` segments at `offsets`."""
    padded = [*offsets, *([0] * (15 - len(offsets)))][:15]
    return struct.pack("<16I", count, *padded) + frame[64:]


def codestream_input(base: Dataset, seed: int, label: str, transfer_syntax: str,
                     frames: Sequence[bytes], status: int | None, bits: int = 16
                     ) -> HostileInput:
    """A FRAME_SIZE x FRAME_SIZE DICOM header around these encoded frames; refused with
    `status`, or stored when None."""
    ds = encapsulated(square_image(base, seed, f"codestream-{label}", bits), frames)
    expect = Expect.ACCEPT if status is None else Expect.REFUSE
    return make_input(f"codestream:{label}", ds, expect, transfer_syntax=transfer_syntax,
                      status=status)


def _streams(base: Dataset, seed: int) -> dict[str, bytes]:
    """Genuine encodings of one FRAME_SIZE x FRAME_SIZE image, the bombs' raw material."""
    grey16 = square_image(base, seed, "streams")
    grey8 = square_image(base, seed, "streams-8", bits=8)
    return {"j2k": encoded_frame(grey16, JPEG2000Lossless),
            "jls": encoded_frame(grey16, JPEGLSLossless),
            "rle": encoded_frame(grey16, RLELossless),
            "jpeg": encoded_frame(grey8, JPEGBaseline8Bit),
            "jpeg-rgb": encoded_frame(grey8, JPEGBaseline8Bit, colour=True)}


def codestream_bombs(base: Dataset, seed: int) -> list[HostileInput]:
    """Frames whose own header declares far more than the 64 x 64 DICOM header around them:
    refused 0xC015 before any decoder allocates (RLE declares no size: its segment table,
    pointing outside the frame or at 15 segments, is refused 0xC210)."""
    s, big = _streams(base, seed), BOMB_SIZE
    j2k_bomb = with_siz(s["j2k"], big, big)
    cases = [("J2K declares 16384x16384", JPEG2000Lossless, [j2k_bomb], 16),
             ("J2K in a JP2 box declares 16384x16384", JPEG2000Lossless,
              [jp2_wrapped(j2k_bomb, FRAME_SIZE, FRAME_SIZE)], 16),
             ("J2K with 4096 tiles of 1x1", JPEG2000Lossless,
              [with_siz(s["j2k"], FRAME_SIZE, FRAME_SIZE, tile=1)], 16),
             ("J2K bomb in frame 2 of 2", JPEG2000Lossless, [s["j2k"], j2k_bomb], 16),
             ("JPEG baseline declares 16384x16384", JPEGBaseline8Bit,
              [with_sof(s["jpeg"], big, big)], 8),
             ("JPEG lossless SOF3 declares 16384x16384", JPEGLosslessSV1,
              [with_sof(s["jpeg"], big, big, marker=0xC3)], 8),
             ("JPEG-LS declares 16384x16384", JPEGLSLossless, [with_sof(s["jls"], big, big)], 16)]
    out = [codestream_input(base, seed, label, ts, frames, Status.TOO_LARGE, bits)
           for label, ts, frames, bits in cases]
    for label, rle in (("RLE header declares 15 segments", with_rle_header(
                            s["rle"], 15, [64 + i for i in range(15)])),
                       ("RLE segment offset outside the frame", with_rle_header(
                            s["rle"], 2, [64, 0xFFFFFFF0]))):
        out.append(codestream_input(base, seed, label, RLELossless, [rle],
                                    Status.CANNOT_DECODE))
    return out


def _codestream_cases(base: Dataset, seed: int) -> Iterator[HostileInput]:
    """Codestream bombs, codestreams that disagree with the DICOM header or cannot be read
    (0xC210), and the genuine encodings they were made from (stored)."""
    s, d = _streams(base, seed), FRAME_SIZE
    yield from codestream_bombs(base, seed)
    bad = Status.CANNOT_DECODE
    for label, ts, frames, bits in (
            ("J2K declares 4096x4096", JPEG2000Lossless, [with_siz(s["j2k"], 4096, 4096)], 16),
            ("J2K has 3 components", JPEG2000Lossless, [with_siz(s["j2k"], d, d, 3)], 16),
            ("J2K precision 24 bits", JPEG2000Lossless,
             [with_siz(s["j2k"], d, d, precision=24)], 16),
            ("J2K truncated in SIZ", JPEG2000Lossless, [s["j2k"][:20]], 16),
            ("JPEG has 3 components", JPEGBaseline8Bit, [s["jpeg-rgb"]], 8),
            ("JPEG truncated before SOF", JPEGBaseline8Bit, [s["jpeg"][:10]], 8),
            ("JPEG-LS truncated in SOF55", JPEGLSLossless, [s["jls"][:8]], 16),
            ("JPEG-LS stream under JPEG lossless", JPEGLosslessSV1, [s["jls"]], 16),
            ("RLE header truncated", RLELossless, [s["rle"][:40]], 16),
            ("RLE offsets decrease", RLELossless, [with_rle_header(s["rle"], 2, [64, 40])], 16)):
        yield codestream_input(base, seed, label, ts, frames, bad, bits)
    ds = encapsulated(square_image(base, seed, "codestream-two-declared"), [s["j2k"]])
    ds.NumberOfFrames, ds.EnergyWindowVector, ds.DetectorVector = 2, [1, 1], [1, 2]
    yield make_input("codestream:2 frames declared, 1 encapsulated", ds, Expect.REFUSE,
                     transfer_syntax=JPEG2000Lossless, status=bad)
    for label, ts, key, bits in (("genuine J2K", JPEG2000Lossless, "j2k", 16),
                                 ("genuine JPEG-LS", JPEGLSLossless, "jls", 16),
                                 ("genuine RLE", RLELossless, "rle", 16),
                                 ("genuine JPEG baseline", JPEGBaseline8Bit, "jpeg", 8)):
        yield codestream_input(base, seed, label, ts, [s[key]], None, bits)


def deflate_bomb(base: Dataset, seed: int, inflated_bytes: int = INFLATED_BOMB_BYTES
                 ) -> HostileInput:
    """A deflated body of about 0.5 MB that inflates to `inflated_bytes`: a valid header whose
    Pixel Data claims (and holds) all of them in zeros. Inflated whole, it would cost the
    receiver that much memory; the bounded inflate refuses it 0xC015."""
    ds = fresh(base, seed, f"deflate-bomb-{inflated_bytes}")
    del ds.PixelData
    head = encode(ds) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 0)
    length = inflated_bytes - len(head)
    head = head[:-4] + struct.pack("<I", length - length % 2)
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts, chunk, left = [packer.compress(head)], bytes(2**20), length - length % 2
    while left > 0:
        parts.append(packer.compress(chunk[:min(left, len(chunk))]))
        left -= len(chunk)
    parts.append(packer.flush())
    return make_input(f"size:deflated body inflating to {inflated_bytes // 2**20} MiB", ds,
                      Expect.REFUSE, transfer_syntax=DeflatedExplicitVRLittleEndian,
                      body=b"".join(parts), status=Status.TOO_LARGE)


def oversize(base: Dataset, seed: int, n_bytes: int = OVERSIZE_BYTES) -> HostileInput:
    """A valid instance padded with a private element to `n_bytes` encoded: over the default
    [admission].max_instance_mb, refused 0xC015 before it is parsed."""
    ds = fresh(base, seed, f"oversize-{n_bytes}")
    ds.add_new(0x00190010, "LO", "DSCINT HOSTILE")
    ds.add_new(0x00191000, "OB", b"")
    filler = max(0, n_bytes - len(encode(ds)))
    ds[0x00191000].value = bytes(filler + filler % 2)
    return make_input(f"size:encoded instance of {n_bytes // 2**20} MiB", ds, Expect.REFUSE,
                      status=Status.TOO_LARGE)


def _size_cases(base: Dataset, seed: int) -> Iterator[HostileInput]:
    """What only the encoded-size cap and the bounded inflate stop."""
    yield deflate_bomb(base, seed)
    yield oversize(base, seed)


# --- the fixed catalogue ------------------------------------------------------------------


def _odd(base: Dataset, seed: int) -> Iterator[HostileInput]:
    """Valid but unusual: the node should store these."""
    px = _pixels(base)
    ds = fresh(base, seed, "8-bit")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.clip(px, 0, 255).astype(np.uint8).tobytes()
    yield make_input("odd:8-bit", ds, Expect.ACCEPT)
    ds = fresh(base, seed, "8-bit-odd-length")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    odd = np.clip(px[:, :-1], 0, 255).astype(np.uint8)
    ds.Rows, ds.Columns = odd.shape
    ds.PixelData = odd.tobytes() + (b"\0" if odd.size % 2 else b"")
    yield make_input("odd:8-bit odd length padded", ds, Expect.ACCEPT)
    ds = fresh(base, seed, "12-bit")
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelData = np.clip(px, 0, 4095).astype("<u2").tobytes()
    yield make_input("odd:12-bit in 16", ds, Expect.ACCEPT)
    ds = fresh(base, seed, "signed")
    ds.PixelRepresentation = 1
    ds.PixelData = (px.astype(np.int32) - 100).clip(-32768, 32767).astype("<i2").tobytes()
    yield make_input("odd:signed 16-bit", ds, Expect.ACCEPT)
    ds = fresh(base, seed, "monochrome1")
    ds.PhotometricInterpretation = "MONOCHROME1"
    yield make_input("odd:MONOCHROME1", ds, Expect.ACCEPT)
    ds = fresh(base, seed, "rescale")
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-3"
    yield make_input("odd:rescale slope/intercept", ds, Expect.ACCEPT)
    ds = fresh(base, seed, "private")
    ds.add_new(0x00191010, "LO", "VENDOR DATA")
    ds.add_new(0x00191011, "OB", bytes(range(256)))
    yield make_input("odd:private elements", ds, Expect.ACCEPT)
    for ts, label in ((ImplicitVRLittleEndian, "implicit VR"),
                      (DeflatedExplicitVRLittleEndian, "deflated"),
                      (ExplicitVRBigEndian, "big endian")):
        ds = fresh(base, seed, label)
        if ts == ExplicitVRBigEndian:
            ds.PixelData = px.astype(">u2").tobytes()
        yield make_input(f"odd:{label}", ds, Expect.ACCEPT, transfer_syntax=ts)


def _pixel_cases(base: Dataset, seed: int) -> Iterator[HostileInput]:
    """Missing, short, float, colour, 1- and 32-bit and mis-encapsulated pixel data."""
    ds = fresh(base, seed, "no-pixels")
    del ds.PixelData
    yield make_input("pixels:missing", ds, Expect.REFUSE)
    yield pixel_length(base, seed, 0)
    yield pixel_length(base, seed, len(base.PixelData) // 2)
    yield pixel_length(base, seed, len(base.PixelData) * 2)
    ds = fresh(base, seed, "float")
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.FloatPixelData = _pixels(base).astype("<f4").tobytes()
    yield make_input("pixels:float (Float Pixel Data)", ds, Expect.REFUSE)
    ds = fresh(base, seed, "int32")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.PixelData = _pixels(base).astype("<u4").tobytes()
    yield make_input("pixels:32-bit integers", ds, Expect.REFUSE)
    ds = fresh(base, seed, "1-bit")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.PixelData = np.packbits(_pixels(base) > 10).tobytes()
    yield make_input("pixels:1-bit", ds, Expect.REFUSE)
    ds = fresh(base, seed, "rgb")
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.repeat(np.clip(_pixels(base), 0, 255).astype(np.uint8), 3).tobytes()
    yield make_input("pixels:colour RGB", ds, Expect.REFUSE)
    for ts in (JPEG2000Lossless, JPEGBaseline8Bit, RLELossless):
        ds = fresh(base, seed, f"native-as-{ts}")
        yield make_input(f"pixels:native data under {ts.name}", ds, Expect.REFUSE,
                         transfer_syntax=ts)
    ds = fresh(base, seed, "garbage-j2k")
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])
    ds["PixelData"].VR = "OB"
    yield make_input("pixels:undecodable JPEG 2000", ds, Expect.REFUSE,
                     transfer_syntax=JPEG2000Lossless)


def _geometry_cases(base: Dataset, seed: int) -> Iterator[HostileInput]:
    """Wrong and absurd dimensions, memory bombs among them."""
    r, c = int(base.Rows), int(base.Columns)
    for rows, cols, frames in ((r + 1, c, 1), (r, c * 2, 1), (0, c, 1), (r, 0, 1), (r, c, 2),
                               (r, c, 0), (65535, 65535, 1), (4096, 4096, 64),
                               (4096, 4096, 2**31 - 1)):
        yield dimensions(base, seed, rows, cols, frames)
    for value in ("-1", "abc", "1e9", ""):
        ds = fresh(base, seed, f"frames-{value}")
        _set(ds, "NumberOfFrames", "IS", value)
        expect = Expect.EITHER if value == "" else Expect.REFUSE
        yield make_input(f"frames:{value!r}", ds, expect)


def _uid_cases(base: Dataset, seed: int) -> Iterator[HostileInput]:
    """Missing, invalid and inconsistent UIDs (path traversal among them)."""
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
        ds = fresh(base, seed, f"missing-{keyword}")
        sop = str(ds.SOPInstanceUID)
        delattr(ds, keyword)
        yield make_input(f"uid:{keyword} missing", ds, Expect.REFUSE, sop_uid=sop,
                         sop_class=NM_IMAGE_STORAGE)
    for label, bad in (("too long", "1." + "2" * 70), ("traversal", "../../../etc/passwd"),
                       ("empty component", "1.2..3"), ("NUL", "1.2.3\0.4"),
                       ("letters", "1.2.abc")):
        ds = fresh(base, seed, f"bad-study-{label}")
        _set(ds, "StudyInstanceUID", "UI", bad)
        yield make_input(f"uid:Study Instance UID {label}", ds, Expect.REFUSE)
    ds = fresh(base, seed, "sop-mismatch")
    yield make_input("uid:request SOP UID differs from dataset", ds, Expect.REFUSE,
                     sop_uid=uid_for(seed, "another sop"))
    ds = fresh(base, seed, "class-mismatch")
    yield make_input("uid:request SOP class differs from dataset", ds, Expect.REFUSE,
                     sop_class=SC_IMAGE_STORAGE)
    ds = fresh(base, seed, "ct-modality")
    ds.SOPClassUID = SC_IMAGE_STORAGE
    ds.Modality = "CT"
    yield make_input("identity:Secondary Capture with Modality CT", ds, Expect.IGNORE)


def _structure_cases(base: Dataset, seed: int) -> Iterator[HostileInput]:
    """Not DICOM, lying lengths, deep nesting, the wrong encoding for the context."""
    rng = random.Random(seed)
    ds = fresh(base, seed, "noise")
    noise = bytes(rng.getrandbits(8) for _ in range(4096))
    yield make_input("structure:random bytes", ds, Expect.REFUSE, body=noise)
    yield make_input("structure:empty dataset", ds, Expect.REFUSE, body=b"")
    ds = fresh(base, seed, "lying-length")
    lie = struct.pack("<HH2sHI", 0x0019, 0x1010, b"OB", 0, 0xFFFFFFF0) + bytes(64)
    body = encode(ds)
    cut = body.find(struct.pack("<HH", 0x7FE0, 0x0010))
    yield make_input("structure:element claims 4 GiB, swallowing Pixel Data", ds,
                     Expect.REFUSE, body=body[:cut] + lie + body[cut:])
    # at the very end the image is intact and pydicom keeps the bytes that are there
    yield make_input("structure:last element claims 4 GiB", ds, Expect.EITHER,
                     body=body + lie)
    ds = fresh(base, seed, "deep")
    yield make_input("structure:sequences nested 5000 deep", ds, Expect.REFUSE,
                     body=encode(ds) + _nested_sequences(5000))
    ds = fresh(base, seed, "open-sequence")
    open_seq = struct.pack("<HH2sHI", 0x0019, 0x1020, b"SQ", 0, 0xFFFFFFFF) + \
        struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + bytes(32)
    yield make_input("structure:sequence never closed", ds, Expect.REFUSE,
                     body=encode(ds) + open_seq)
    ds = fresh(base, seed, "implicit-as-explicit")
    # pydicom recognises implicit VR whatever the context says, and reads it correctly
    yield make_input("structure:implicit VR body announced as explicit", ds, Expect.EITHER,
                     body=encode(ds, ImplicitVRLittleEndian))
    ds = fresh(base, seed, "little-as-big")
    yield make_input("structure:little endian body announced as big endian", ds, Expect.REFUSE,
                     transfer_syntax=ExplicitVRBigEndian, body=encode(ds))
    ds = fresh(base, seed, "not-deflated")
    yield make_input("structure:plain body announced as deflated", ds, Expect.REFUSE,
                     transfer_syntax=DeflatedExplicitVRLittleEndian, body=encode(ds))


def _nested_sequences(depth: int) -> bytes:
    """`depth` undefined-length sequences, each in the previous one's only item."""
    opening = struct.pack("<HH2sHI", 0x0019, 0x1030, b"SQ", 0, 0xFFFFFFFF) + \
        struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return opening * depth + closing * depth


def _negotiation_cases(base: Dataset, seed: int) -> Iterator[HostileInput]:
    """What the association itself must refuse."""
    ds = fresh(base, seed, "unknown-ts")
    yield make_input("negotiation:unknown transfer syntax", ds, Expect.NOT_NEGOTIATED,
                     transfer_syntax=UNKNOWN_TRANSFER_SYNTAX)
    ds = fresh(base, seed, "private-class")
    ds.SOPClassUID = PRIVATE_SOP_CLASS
    yield make_input("negotiation:private SOP class", ds, Expect.NOT_NEGOTIATED)
    ds = fresh(base, seed, "ct-class")
    ds.SOPClassUID = CT_IMAGE_STORAGE
    yield make_input("ignored:CT Image Storage", ds, Expect.IGNORE)


def _applicability_cases(base: Dataset, seed: int) -> Iterator[HostileInput]:
    """Valid NM images that are not whole-body planar views, and headers the applicability
    gate must read without failing. Under the default `[admission].not_applicable = "store"`
    each is stored (Success) and never classified; "refuse" would answer 0xC016."""
    for image_type, (frames, rows, cols) in (("DYNAMIC", (24, 64, 64)),
                                             ("STATIC", (1, 256, 256)),
                                             ("TOMO", (32, 64, 64))):
        ds = fresh(base, seed, f"applicability-{image_type}")
        ds.ImageType = ["ORIGINAL", "PRIMARY", image_type, "EMISSION"]
        ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
        ds.PixelData = np.zeros((frames, rows, cols), "<u2").tobytes()
        yield make_input(f"applicability:{image_type} {frames}x{rows}x{cols}", ds, Expect.ACCEPT)
    ds = fresh(base, seed, "applicability-image-type-garbage")
    _set(ds, "ImageType", "CS", "\\\x01\xff" * 30)
    yield make_input("applicability:Image Type garbage", ds, Expect.ACCEPT)
    ds = fresh(base, seed, "applicability-spacing-garbage")
    _set(ds, "PixelSpacing", "DS", "abc\\-1e999")
    yield make_input("applicability:Pixel Spacing not numbers", ds, Expect.ACCEPT)


def patient_conflict(base: Dataset, seed: int) -> list[HostileInput]:
    """A study UID reused for a different patient: the first is stored, the second refused
    (two patients' images must never merge into one study)."""
    first = fresh(base, seed, "conflict-first")
    second = fresh(base, seed, "conflict-second", same_study=True)
    second.StudyInstanceUID = first.StudyInstanceUID
    second.SeriesInstanceUID = uid_for(seed, "conflict-second-series")
    second.PatientID = f"{first.PatientID}X"
    second.PatientName = "OTHER^PATIENT"
    return [make_input("conflict:first patient", first, Expect.ACCEPT),
            make_input("conflict:same study UID, another patient", second, Expect.REFUSE)]


def identity_cases(base: Dataset, seed: int) -> list[HostileInput]:
    """Identity rules, in sending order: an instance without patient attributes may not join
    a study that has a patient (0xC002), and a stored SOP Instance UID may not reappear under
    another study (0xC003); each first instance is stored."""
    owner = fresh(base, seed, "identity-owner")
    anonymous = fresh(base, seed, "identity-anonymous", same_study=True)
    anonymous.StudyInstanceUID = owner.StudyInstanceUID
    for keyword in ("PatientID", "PatientName", "PatientBirthDate"):
        setattr(anonymous, keyword, "")
    moved = fresh(base, seed, "identity-moved")
    moved.SOPInstanceUID = owner.SOPInstanceUID
    return [make_input("identity:study with a patient", owner, Expect.ACCEPT),
            make_input("identity:anonymous instance joining it", anonymous, Expect.REFUSE,
                       status=Status.NO_PATIENT_IDENTITY),
            make_input("identity:stored SOP under another study", moved, Expect.REFUSE,
                       status=Status.SOP_IN_OTHER_STUDY)]


def phi_bearing(base: Dataset, seed: int, name: str, patient_id: str) -> list[HostileInput]:
    """The patient's own name and ID where they do not belong: a node that quotes values in
    its log would leak them (the PHI test greps for them)."""
    cases = []
    for keyword, vr, value in (("StudyInstanceUID", "UI", name), ("SeriesInstanceUID", "UI",
                                                                   patient_id),
                               ("Rows", "LO", patient_id), ("Modality", "CS", name),
                               ("PhotometricInterpretation", "CS", name),
                               ("NumberOfFrames", "IS", patient_id),
                               ("SpecificCharacterSet", "CS", name),
                               ("RescaleSlope", "DS", name), ("PatientBirthDate", "DA", name),
                               ("StudyDate", "DA", patient_id), ("PatientSex", "CS", name),
                               ("AccessionNumber", "SH", name * 2),
                               ("StudyTime", "TM", name), ("PatientAge", "AS", patient_id)):
        ds = fresh(base, seed, f"phi-{keyword}")
        _set(ds, keyword, vr, value)
        cases.append(make_input(f"phi:{keyword}", ds, Expect.EITHER))
    ds = fresh(base, seed, "phi-sop-request")
    cases.append(make_input("phi:request SOP UID", ds, Expect.REFUSE, sop_uid=name))
    return cases


CATALOGUE: tuple[Callable[[Dataset, int], Iterator[HostileInput]], ...] = (
    _odd, _pixel_cases, _geometry_cases, _uid_cases, _structure_cases, _negotiation_cases,
    _applicability_cases, _codestream_cases, _size_cases)


def corpus(base: Dataset, seed: int = 0) -> list[HostileInput]:
    """The fixed catalogue, plus the patient conflict and identity sequences (sent in this
    order)."""
    out = [case for family in CATALOGUE for case in family(base, seed)]
    return out + patient_conflict(base, seed) + identity_cases(base, seed)


def random_inputs(base: Dataset, seed: int, n: int) -> list[HostileInput]:
    """`n` inputs from the parametrised builders, drawn with a seeded RNG (the soak)."""
    rng = random.Random(seed)
    size = len(encode(base))
    makers: list[Callable[[int], HostileInput]] = [
        lambda i: truncated(base, seed * 100_003 + i, rng.randrange(size)),
        lambda i: garbled(base, seed * 100_003 + i,
                          [(rng.randrange(1 << 16), rng.randrange(256))
                           for _ in range(rng.randint(1, 8))]),
        lambda i: header_mutation(base, seed * 100_003 + i, rng.choice(PIXEL_FIELDS),
                                  rng.choice(MUTATION_VALUES)),
        lambda i: vr_swap(base, seed * 100_003 + i, rng.choice(SWAP_KEYWORDS),
                          rng.choice(SWAP_VRS)),
        lambda i: pixel_length(base, seed * 100_003 + i, rng.randrange(2 * len(base.PixelData))),
        lambda i: dimensions(base, seed * 100_003 + i, rng.choice([0, 1, 127, 4096, 65535]),
                             rng.choice([0, 1, 31, 4096, 65535]), rng.choice([1, 2, 64, 65])),
    ]
    out = []
    for i in range(n):
        case = rng.choice(makers)(i)
        out.append(replace(case, name=f"random#{i}:{case.name}"))
    return out


# --- sending -------------------------------------------------------------------------------


@contextlib.contextmanager
def raw_sending() -> Iterator[None]:
    """Make pynetdicom send a file's dataset bytes as stored (not decoded and re-encoded),
    so broken bytes reach the node broken. Process-wide switch, restored on exit."""
    before = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = before


def send_input(case: HostileInput, dest: Destination, calling_ae: str, workdir: Path,
               timeout: float = 30.0) -> int | None:
    """One association, one C-STORE of the input's bytes (inside `raw_sending()`); the
    status, or None when nothing could be sent (context refused, connection lost)."""
    path = case.write(workdir)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(case.sop_class, case.transfer_syntax)
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                             tls_args=dest.tls_args)
        if not assoc.is_established:
            return None
        try:
            rsp = assoc.send_c_store(path)
        except (ValueError, AttributeError, RuntimeError):  # no accepted context, say
            return None
        finally:
            assoc.release()
    finally:
        path.unlink(missing_ok=True)
    status = getattr(rsp, "Status", None)
    return int(status) if status is not None else None


def send_inputs(cases: Sequence[HostileInput], dest: Destination, calling_ae: str,
                workdir: Path) -> list[int | None]:
    """Each input on its own association (a refusal never spoils the next one)."""
    with raw_sending():
        return [send_input(c, dest, calling_ae, workdir) for c in cases]
