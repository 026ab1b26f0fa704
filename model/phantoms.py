"""Simulated whole-body scans for the four Dscint classes: 99mTc-MDP bone scans and 131I scans.

Why: the paper's images are private, so the node trains and is tested on phantoms. They have to
look like what a GE camera sends (1024 x 256 counts, 2.26 mm pixels, a few million counts, Poisson
noise) and must not be trivially separable, or a model that learns them proves nothing.

How: anatomy is a list of primitives in body coordinates (cm; x to the patient's left, y down from
the vertex): capsules and ellipsoids whose projection is sqrt(1 - r^2), so a bone shaft looks like a
projected cylinder and the skull like a projected shell. Each primitive has a depth between the
anterior (0) and posterior (1) body surface, which sets its attenuation in each view. One pass
renders the anterior and the posterior views (the posterior is then mirrored, as a camera displays
it); a Gaussian camera blur and Poisson noise at a realistic count level follow.

Everything is drawn from a seed through numpy Generators: the same (label, seed, difficulty) gives
the same arrays on every machine.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

import numpy as np

from model.classes import CLASS_NAMES, INPUT_COLS, INPUT_ROWS

GENERATOR_VERSION = 1
PIXEL_MM = 2.26
# Paper Table 1: normal, bone metastasis, arthritis, thyroid carcinoma (patients).
PAPER_PROPORTIONS: tuple[float, ...] = (0.30, 0.20, 0.24, 0.26)
TC99M_MDP = "Tc-99m MDP"
I131 = "I-131"

_PIX_CM = PIXEL_MM / 10.0
_REF_HEIGHT = 175.0  # the body coordinates below are for a 175 cm adult
_PIVOT_Y = 87.5  # tilt pivot: mid-body
_MU_TC = 0.085  # effective (broad-beam) attenuation of 140 keV in tissue, 1/cm
_MU_I = 0.07  # the same at 364 keV
_AXIAL = ("spine", "rib", "pelvis", "skull", "sternum", "scapula", "clavicle", "femur_prox",
          "humerus_prox")


@dataclass(frozen=True)
class PhantomPatient:
    """Demographics and body geometry of one simulated patient (all fake, drawn from the seed)."""

    patient_id: str
    patient_name: str  # "PHANTOM^<syllables>": never a real person
    sex: str  # "M" / "F"
    age: int
    height_cm: float
    weight_kg: float
    birth_date: str  # YYYYMMDD, consistent with age at the study date
    build: float  # soft-tissue width factor (1 = average BMI)
    frame: float  # skeletal width factor
    arm_pose: str  # "side", "chest" or "head"
    tilt_deg: float  # small rotation in the image plane
    shift_cols: float  # lateral offset on the table (pixels)
    top_row: float  # image row of the vertex
    bone_uptake: float  # bone-to-soft-tissue factor (falls with age)
    soft_uptake: float  # soft-tissue retention factor


@dataclass(frozen=True, eq=False)
class PhantomStudy:
    """One study: both views as a camera would send them, plus what was simulated.

    eq=False: field-wise equality would compare arrays and raise; compare the arrays explicitly.
    """

    label: str
    seed: int
    patient: PhantomPatient
    anterior: np.ndarray  # uint16 (1024, 256)
    posterior: np.ndarray  # uint16 (1024, 256), displayed mirrored (patient right on image right)
    radiopharmaceutical: str
    details: dict[str, object]
    study_datetime: datetime = datetime(2018, 1, 1, 9, 0, 0)


class _Seg(NamedTuple):
    """Capsule from (x0, y0) to (x1, y1), radius r0 -> r1; uncapped = flat ends."""

    x0: float
    y0: float
    x1: float
    y1: float
    r0: float
    r1: float
    amp: float
    depth: float
    thick: float
    region: str = ""
    capped: bool = True


class _Ell(NamedTuple):
    """Projected ellipsoid with semi-axes a (along angle) and b."""

    x: float
    y: float
    a: float
    b: float
    angle: float
    amp: float
    depth: float
    thick: float
    region: str = ""


_Prim = _Seg | _Ell


class _Joint(NamedTuple):
    """A joint arthritis can involve: centre, size (cm), depth, thickness, base uptake."""

    x: float
    y: float
    size: float
    depth: float
    thick: float
    amp: float


@dataclass
class _Scene:
    """Primitives of one study before rendering; local to one generate_study call."""

    bone: list[_Prim] = field(default_factory=list)  # scaled by the patient's bone uptake
    organ: list[_Prim] = field(default_factory=list)  # summed, attenuated
    soft: list[_Prim] = field(default_factory=list)  # body outline, max-combined
    hosts: dict[str, list[_Prim]] = field(default_factory=dict)  # lesion sites by region
    joints: dict[tuple[str, int], list[_Joint]] = field(default_factory=dict)
    gains: dict[str, float] = field(default_factory=dict)  # per-region uptake multipliers
    detector: list[_Seg] = field(default_factory=list)  # collimator artefacts, no attenuation

    def add_bone(self, p: _Prim, host: str | None = None) -> None:
        """Bone primitive; `host` makes it a candidate site for metastases."""
        self.bone.append(p)
        if host:
            self.hosts.setdefault(host, []).append(p)

    def add_joint(self, name: str, side: int, j: _Joint) -> None:
        """Register a joint for the arthritis and degeneration models."""
        self.joints.setdefault((name, side), []).append(j)


@dataclass(frozen=True)
class _Body:
    """Landmarks (reference cm) that the anatomy builders share."""

    frame: float
    build: float
    sex: str
    pelvis_w: float
    chest_t: float  # AP thickness of the chest, cm
    abd_t: float
    pelv_t: float
    shoulder: dict[int, tuple[float, float]]
    elbow: dict[int, tuple[float, float]]
    wrist: dict[int, tuple[float, float]]
    hand_dir: dict[int, tuple[float, float]]
    knee: dict[int, tuple[float, float]]
    ankle: dict[int, tuple[float, float]]
    hip: dict[int, tuple[float, float]]


# ---------------------------------------------------------------------------------------------
# patient


def _syllable_name(rng: np.random.Generator) -> str:
    """A pronounceable made-up given name (2-3 syllables)."""
    cons = "BDFGKLMNPRSTVZ"
    vows = "AEIOU"
    n = int(rng.integers(2, 4))
    return "".join(cons[int(rng.integers(len(cons)))] + vows[int(rng.integers(len(vows)))]
                   for _ in range(n))


def _patient_id(label: str, seed: int) -> str:
    """Stable 12-digit ID from (seed, label) that does not reveal the label."""
    h = hashlib.sha256(f"dscint-phantom/{seed}/{label}".encode()).hexdigest()
    return f"PH{int(h[:15], 16) % 10**12:012d}"


_AGE = {"normal": (52, 13), "bone_metastasis": (63, 10), "arthritis": (58, 12),
        "thyroid_carcinoma": (46, 12)}
_FEMALE = {"normal": 0.5, "bone_metastasis": 0.45, "arthritis": 0.6, "thyroid_carcinoma": 0.75}


def _sample_patient(rng: np.random.Generator, label: str, seed: int, when: datetime
                    ) -> PhantomPatient:
    """Demographics, habitus, position on the table and tracer kinetics."""
    sex = "F" if rng.random() < _FEMALE[label] else "M"
    mu, sd = _AGE[label]
    age = int(np.clip(round(rng.normal(mu, sd)), 28, 87))
    height = float(np.clip(rng.normal(172 if sex == "M" else 160, 7), 145, 198))
    bmi = float(np.clip(rng.normal(24.5, 3.8), 16.5, 40))
    weight = bmi * (height / 100) ** 2
    pose_u = rng.random()
    pose = "side" if pose_u < 0.8 else ("chest" if pose_u < 0.92 else "head")
    body_px = height / _PIX_CM
    lo = 0.17 * body_px + 8 if pose == "head" else 35.0  # raised hands need room above the head
    top = min(float(rng.uniform(lo, lo + 75)), INPUT_ROWS - 12 - body_px)
    bone = float(np.clip(1.35 - 0.011 * (age - 30) + rng.normal(0, 0.15), 0.5, 1.8))
    soft = float(np.exp(rng.normal(0.15, 0.2)) * (1 + 0.006 * (age - 50)))
    birth = when - timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    return PhantomPatient(
        patient_id=_patient_id(label, seed), patient_name=f"PHANTOM^{_syllable_name(rng)}",
        sex=sex, age=age, height_cm=round(height, 1), weight_kg=round(weight, 1),
        birth_date=birth.strftime("%Y%m%d"), build=float(np.sqrt(bmi / 24.5)),
        frame=float(rng.normal(1.0, 0.035) * (1.03 if sex == "M" else 0.96)), arm_pose=pose,
        tilt_deg=float(np.clip(rng.normal(0, 1.3), -3.5, 3.5)),
        shift_cols=float(np.clip(rng.normal(0, 5), -14, 14)), top_row=top,
        bone_uptake=bone, soft_uptake=soft)


def _direction(side: int, angle_deg: float) -> tuple[float, float]:
    """Unit vector at `angle_deg` from straight down, positive = away from the midline."""
    a = math.radians(angle_deg)
    return side * math.sin(a), math.cos(a)


def _body(p: PhantomPatient, rng: np.random.Generator) -> _Body:
    """Landmarks for this patient's frame, build and pose."""
    f, b = p.frame, p.build
    shoulders = 17.6 * f * (1.03 if p.sex == "M" else 0.95)
    pelvis_w = f * (1.0 if p.sex == "M" else 1.07)
    shoulder, elbow, wrist, hdir, knee, ankle, hip = {}, {}, {}, {}, {}, {}, {}
    need = math.degrees(math.asin(min(0.9, max(0.0, (15.5 * b + 3.5 * b - shoulders) / 31))))
    spread_k = float(rng.uniform(-1.5, 2.0))
    spread_a = float(rng.uniform(-2.5, 4.5))
    for side in (-1, 1):
        s = (side * shoulders, 31.5)
        if p.arm_pose == "side":
            ah = max(float(rng.uniform(2, 10)), need + float(rng.uniform(0, 3)))
            af, lf, lh = ah + float(rng.uniform(-6, 8)), 25.0, 18.0
        elif p.arm_pose == "chest":
            ah = max(float(rng.uniform(10, 22)), need)
            af, lf, lh = -float(rng.uniform(105, 150)), 19.0, 13.0
        else:
            ah = float(rng.uniform(150, 168))
            af, lf, lh = float(rng.uniform(205, 245)), 23.0, 15.0
        dh, dfa = _direction(side, ah), _direction(side, af)
        e = (s[0] + 30.5 * dh[0], s[1] + 30.5 * dh[1])
        w = (e[0] + lf * dfa[0], e[1] + lf * dfa[1])
        shoulder[side], elbow[side], wrist[side] = s, e, w
        hdir[side] = (dfa[0] * lh, dfa[1] * lh)
        hip[side] = (side * 9.3 * pelvis_w, 85.5)
        knee[side] = (side * (9.4 * pelvis_w + spread_k), 121.0)
        ankle[side] = (side * (8.4 * pelvis_w + spread_a), 164.0)
    return _Body(frame=f, build=b, sex=p.sex, pelvis_w=pelvis_w, chest_t=21 * b ** 0.8,
                 abd_t=20 * b ** 1.3, pelv_t=21 * b, shoulder=shoulder, elbow=elbow,
                 wrist=wrist, hand_dir=hdir, knee=knee, ankle=ankle, hip=hip)


# ---------------------------------------------------------------------------------------------
# anatomy (99mTc-MDP)


def _skull(sc: _Scene) -> None:
    """Calvarium as a projected shell (bright rim), face and mandible bright anteriorly."""
    sc.add_bone(_Ell(0, 11.8, 7.7, 10.2, 0, 2.6, 0.5, 18, "skull"), host="skull")
    sc.add_bone(_Ell(0, 11.7, 7.0, 9.4, 0, -2.6 * 0.91, 0.5, 18, "skull"))
    sc.add_bone(_Ell(0, 15.6, 3.9, 3.3, 0, 1.5, 0.12, 18, "skull"))  # maxilla / nasal
    sc.add_bone(_Ell(0, 17.0, 5.2, 1.3, 0, 0.7, 0.5, 18, "skull"))  # skull base
    pts = [(-5.3, 16.8), (-4.4, 20.6), (0.0, 22.2), (4.4, 20.6), (5.3, 16.8)]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        sc.add_bone(_Seg(x0, y0, x1, y1, 0.8, 0.8, 1.2, 0.3, 18, "skull"))


def _spine(sc: _Scene, bd: _Body) -> None:
    """Cervical, thoracic and lumbar vertebrae, sacrum and SI joints."""
    for i in range(6):
        sc.add_bone(_Ell(0, 21.7 + 1.55 * i, 1.3, 0.95, 0, 1.6, 0.6, 12, "spine"), host="spine")
    for i in range(12):
        y = 31.6 + 2.22 * i
        sc.add_bone(_Ell(0, y, 1.7 + 0.07 * i, 1.2 + 0.04 * i, 0, 2.0, 0.73, bd.chest_t,
                         "spine"), host="spine")
    for i in range(5):
        y = 58.6 + 3.25 * i
        t = bd.abd_t
        sc.add_bone(_Ell(0, y, 2.5 + 0.1 * i, 1.75, 0, 2.1, 0.64, t, "spine"), host="spine")
        sc.add_bone(_Ell(0, y, 3.6 + 0.2 * i, 0.55, 0, 0.5, 0.8, t, "spine"))  # processes
        for side in (-1, 1):
            sc.add_joint("facet", side, _Joint(side * 1.7, y + 1.3, 0.9, 0.8, t, 1.2))
    pw, t = bd.pelvis_w, bd.pelv_t
    sc.add_bone(_Ell(0, 77.8, 4.6 * pw, 4.6, 0, 1.0, 0.84, t, "pelvis"), host="pelvis")
    sc.add_bone(_Seg(0, 80, 0, 87.5, 3.4 * pw, 0.7, 0.7, 0.86, t, "pelvis"), host="pelvis")
    for side in (-1, 1):
        sc.add_bone(_Seg(side * 4.3 * pw, 74.5, side * 3.5 * pw, 82.5, 1.0, 0.9, 2.0, 0.82, t,
                         "pelvis"))
        sc.add_joint("si", side, _Joint(side * 3.9 * pw, 78.5, 1.6, 0.82, t, 2.0))


def _pelvis(sc: _Scene, bd: _Body) -> None:
    """Iliac wings with crests, acetabula, pubis and ischium."""
    pw, t = bd.pelvis_w, bd.pelv_t
    for s in (-1, 1):
        sc.add_bone(_Ell(s * 9.3 * pw, 77.0, 5.4 * pw, 6.2, -s * 0.35, 0.45, 0.5, t, "pelvis"),
                    host="pelvis")
        crest = [(4.6, 72.8), (8.0, 70.4), (12.4, 71.6), (14.6, 75.6)]
        for (x0, y0), (x1, y1) in itertools.pairwise(crest):
            sc.add_bone(_Seg(s * x0 * pw, y0, s * x1 * pw, y1, 0.9, 0.9, 0.9, 0.5, t, "pelvis"))
        hx, hy = bd.hip[s]
        sc.add_bone(_Ell(hx, hy, 2.4, 2.4, 0, 2.0, 0.5, t, "pelvis"), host="pelvis")
        sc.add_joint("hip", s, _Joint(hx, hy, 2.6, 0.5, t, 2.0))
        sc.add_bone(_Seg(s * 7.6 * pw, 86.4, s * 1.4, 87.9, 0.8, 0.75, 0.9, 0.15, t, "pelvis"),
                    host="pelvis")
        sc.add_bone(_Seg(s * 1.4, 89.4, s * 4.6 * pw, 92.2, 0.7, 0.8, 0.75, 0.4, t, "pelvis"))
        sc.add_bone(_Seg(s * 4.6 * pw, 92.2, s * 7.6 * pw, 89.6, 0.9, 1.0, 0.9, 0.6, t,
                         "pelvis"), host="pelvis")
    sc.add_bone(_Ell(0, 88.9, 1.2, 1.6, 0, 1.2, 0.12, t, "pelvis"))


def _thorax(sc: _Scene, bd: _Body) -> None:
    """Sternum, clavicles, SC and AC joints, scapulae."""
    t = bd.chest_t
    sc.add_bone(_Ell(0, 32.9, 2.6, 2.1, 0, 1.6, 0.05, t, "sternum"), host="sternum")
    sc.add_bone(_Seg(0, 35.2, 0, 47.0, 1.5, 1.25, 1.5, 0.05, t, "sternum"), host="sternum")
    sc.add_bone(_Ell(0, 48.4, 0.8, 1.2, 0, 0.9, 0.05, t, "sternum"))
    for s in (-1, 1):
        sx, sy = bd.shoulder[s]
        sc.add_bone(_Ell(s * 2.6, 31.2, 1.1, 1.0, 0, 2.0, 0.1, t, "sternum"))
        sc.add_joint("sc", s, _Joint(s * 2.6, 31.2, 1.1, 0.1, t, 2.0))
        mid = (s * 9.5 * bd.frame, 30.6)
        ac = (sx - s * 0.2, sy - 2.8)
        sc.add_bone(_Seg(s * 2.9, 31.0, mid[0], mid[1], 0.75, 0.75, 1.3, 0.18, t, "clavicle"),
                    host="clavicle")
        sc.add_bone(_Seg(mid[0], mid[1], ac[0], ac[1], 0.75, 0.7, 1.3, 0.3, t, "clavicle"))
        sc.add_bone(_Ell(ac[0], ac[1], 1.2, 0.9, 0, 1.5, 0.45, t, "scapula"))
        sc.add_joint("ac", s, _Joint(ac[0], ac[1], 1.1, 0.45, t, 1.5))
        k = abs(sx) / 17.6  # the scapula scales with the shoulder width
        sc.add_bone(_Ell(s * 15.6 * k, 31.6, 1.1, 1.8, 0, 1.6, 0.85, t, "scapula"),
                    host="scapula")
        sc.add_bone(_Seg(s * 16.2 * k, 29.4, s * 8.6 * k, 32.6, 0.8, 0.6, 0.8, 0.9, t,
                         "scapula"), host="scapula")
        sc.add_bone(_Seg(s * 8.6 * k, 31.2, s * 9.6 * k, 45.4, 0.6, 0.6, 0.45, 0.9, t, "scapula"))
        sc.add_bone(_Seg(s * 15.0 * k, 33.2, s * 10.2 * k, 45.8, 0.8, 0.7, 0.55, 0.88, t,
                         "scapula"), host="scapula")
        sc.add_bone(_Ell(s * 10.3 * k, 45.6, 1.0, 0.9, 0, 0.7, 0.9, t, "scapula"))
        sc.add_bone(_Ell(s * 12.1 * k, 38.4, 3.3 * k, 6.6, s * 0.12, 0.5, 0.9, t, "scapula"),
                    host="scapula")


_RIB_W = (6.5, 9.5, 11.5, 12.8, 13.6, 14.1, 14.3, 14.2, 13.9, 13.2, 10.5, 8.2)


def _rib_polyline(i: int, w: float, y0: float) -> list[tuple[float, float, float]]:
    """Points (x, y, depth) of rib i (0-based) on one side, posterior origin to anterior end."""
    drop = 2.4 + 0.42 * i
    pts = [(2.3, y0, 0.88), (0.45 * w, y0 + 0.22 * drop, 0.85),
           (0.85 * w, y0 + drop * 0.68, 0.7), (w, y0 + drop, 0.5)]
    if i >= 10:  # floating ribs: no anterior part
        return pts[:3]
    ant = 2.0 + 1.25 * i
    xe = 3.6 if i == 0 else (0.42 * w if i < 7 else 0.7 * w)
    pts += [(0.93 * w, y0 + drop + 0.45 * ant, 0.3), (max(xe, 0.6 * w), y0 + drop + 0.85 * ant,
                                                       0.15), (xe, y0 + drop + ant, 0.08)]
    return pts


def _ribs(sc: _Scene, bd: _Body) -> None:
    """Twelve pairs: posterior arcs near-horizontal, anterior arcs sloping down medially."""
    wf = bd.frame * bd.build ** 0.25
    for i in range(12):
        y0 = 31.8 + 2.22 * i
        pts = _rib_polyline(i, _RIB_W[i] * wf, y0)
        for s in (-1, 1):
            for (x0, ya, d0), (x1, yb, d1) in itertools.pairwise(pts):
                dep = 0.5 * (d0 + d1)
                sc.add_bone(_Seg(s * x0, ya, s * x1, yb, 0.6, 0.6, 0.6 if dep > 0.45 else 0.5,
                                 dep, bd.chest_t, "rib"), host="rib")


def _arm(sc: _Scene, bd: _Body, s: int) -> None:
    """Humerus, radius/ulna and hand of one side for its pose."""
    (sx, sy), (ex, ey), (wx, wy) = bd.shoulder[s], bd.elbow[s], bd.wrist[s]
    hx, hy = bd.hand_dir[s]
    t = 9.0
    sc.add_bone(_Ell(sx, sy, 2.3, 2.3, 0, 1.7, 0.5, t, "humerus_prox"), host="humerus_prox")
    sc.add_joint("shoulder", s, _Joint(sx - s * 0.8, sy, 2.5, 0.5, t, 1.7))
    mx, my = sx + 0.45 * (ex - sx), sy + 0.45 * (ey - sy)
    sc.add_bone(_Seg(sx, sy, mx, my, 1.3, 1.2, 0.95, 0.5, t, "humerus_prox"),
                host="humerus_prox")
    sc.add_bone(_Seg(mx, my, ex, ey, 1.2, 1.1, 0.9, 0.5, t, "long"))
    sc.add_bone(_Ell(ex, ey, 1.9, 1.4, math.atan2(ey - sy, ex - sx) + math.pi / 2, 1.0, 0.5, t,
                     "long"))
    sc.add_joint("elbow", s, _Joint(ex, ey, 1.9, 0.5, t, 1.3))
    ln = math.hypot(wx - ex, wy - ey)
    nx, ny = -(wy - ey) / ln, (wx - ex) / ln
    for k, r in ((-0.75, 0.55), (0.75, 0.5)):
        sc.add_bone(_Seg(ex + k * nx, ey + k * ny, wx + 1.2 * k * nx, wy + 1.2 * k * ny, r, r,
                         0.8, 0.5, 7, "long"))
    hl = math.hypot(hx, hy)
    ux, uy = hx / hl, hy / hl
    cx, cy = wx + 1.6 * ux, wy + 1.6 * uy
    sc.add_bone(_Ell(cx, cy, 1.8, 2.2, math.atan2(uy, ux) + math.pi / 2, 1.1, 0.5, 5, "hand"))
    sc.add_joint("wrist", s, _Joint(cx, cy, 2.2, 0.5, 5, 1.1))
    _hand_rays(sc, s, cx + 1.2 * ux, cy + 1.2 * uy, ux, uy, hl)


def _hand_rays(sc: _Scene, s: int, bx: float, by: float, ux: float, uy: float, hl: float
               ) -> None:
    """Metacarpals and fingers fanning out from the carpus; MCP/PIP joints for arthritis."""
    nx, ny = -uy, ux
    scale = hl / 18.0
    for k in range(5):
        off = (k - 2) * 0.95 * scale
        thumb = k == (0 if s > 0 else 4)
        ang = (0.55 if thumb else 0.06 * (k - 2)) * (1 if (k - 2) >= 0 else -1)
        dx = ux * math.cos(ang) - nx * math.sin(ang)
        dy = uy * math.cos(ang) - ny * math.sin(ang)
        px, py = bx + off * nx, by + off * ny
        lm = (4.5 if thumb else 6.0) * scale
        mx, my = px + lm * dx, py + lm * dy
        sc.add_bone(_Seg(px, py, mx, my, 0.38, 0.33, 0.75, 0.5, 4, "hand"))
        lf = (3.5 if thumb else 6.0) * scale
        fx, fy = mx + lf * dx, my + lf * dy
        sc.add_bone(_Seg(mx, my, fx, fy, 0.3, 0.25, 0.55, 0.5, 3, "hand"))
        sc.add_joint("hand", s, _Joint(mx, my, 0.7, 0.5, 4, 0.9))
        sc.add_joint("hand", s, _Joint(mx + 0.45 * lf * dx, my + 0.45 * lf * dy, 0.55, 0.5, 3,
                                       0.7))


def _leg(sc: _Scene, bd: _Body, s: int) -> None:
    """Femur, knee, tibia/fibula, ankle and foot of one side."""
    (hx, hy), (kx, ky), (ax, ay) = bd.hip[s], bd.knee[s], bd.ankle[s]
    tt = 16 * bd.build ** 0.5
    gx = hx + s * 4.2
    sc.add_bone(_Seg(hx + s * 0.5, hy + 0.4, gx - s * 0.6, hy + 2.2, 1.5, 1.5, 1.2, 0.5, tt,
                     "femur_prox"), host="femur_prox")
    sc.add_bone(_Ell(gx, hy + 2.0, 1.7, 2.2, 0, 1.4, 0.5, tt, "femur_prox"), host="femur_prox")
    mx, my = gx - s * 0.4 + 0.4 * (kx - gx), hy + 3.5 + 0.4 * (ky - 5 - hy - 3.5)
    sc.add_bone(_Seg(gx - s * 0.4, hy + 3.5, mx, my, 1.6, 1.55, 1.15, 0.5, tt, "femur_prox"),
                host="femur_prox")
    sc.add_bone(_Seg(mx, my, kx, ky - 5, 1.55, 1.5, 0.95, 0.5, tt, "long"))
    for m in (-1, 1):
        sc.add_bone(_Ell(kx + m * 1.9, ky - 1.8, 1.9, 2.3, 0, 1.5, 0.55, 12, "long"))
        sc.add_bone(_Ell(kx + m * 1.9, ky + 1.4, 1.9, 1.6, 0, 1.3, 0.5, 12, "long"))
        sc.add_joint("knee", s, _Joint(kx + m * 1.9, ky, 1.9, 0.5, 12, 1.5))
    sc.add_bone(_Ell(kx, ky - 3.6, 1.9, 2.3, 0, 1.0, 0.05, 12, "long"))  # patella
    sc.add_bone(_Seg(kx - s * 0.3, ky + 3, ax, ay - 2, 1.5, 1.1, 0.85, 0.3, 10, "long"))
    fx = kx + s * 3.2
    sc.add_bone(_Ell(fx, ky + 3.2, 1.0, 1.0, 0, 0.8, 0.6, 10, "long"))
    sc.add_bone(_Seg(fx, ky + 4, ax + s * 2.6, ay - 1, 0.5, 0.5, 0.55, 0.6, 10, "long"))
    sc.add_bone(_Ell(ax, ay, 2.3, 1.7, 0, 1.5, 0.5, 9, "long"))
    sc.add_bone(_Ell(ax + s * 2.8, ay + 0.4, 0.9, 1.4, 0, 1.1, 0.6, 9, "long"))
    sc.add_joint("ankle", s, _Joint(ax + s * 0.6, ay, 2.2, 0.5, 9, 1.5))
    _foot(sc, s, ax, ay)


def _foot(sc: _Scene, s: int, ax: float, ay: float) -> None:
    """Foreshortened foot (toes point at the anterior detector): tarsus and metatarsals."""
    sc.add_bone(_Ell(ax + s * 0.5, ay + 3.6, 2.5, 2.8, 0, 1.4, 0.5, 8, "foot"))
    sc.add_bone(_Ell(ax + s * 1.2, ay + 7.2, 2.8, 2.6, s * 0.3, 0.8, 0.5, 6, "foot"))
    for k in range(5):
        x0 = ax + s * (-0.6 + 0.8 * k)
        x1 = ax + s * (0.8 + 1.05 * k)
        y1 = ay + 12.0 - 0.5 * k
        sc.add_bone(_Seg(x0, ay + 6.0, x1, y1, 0.45, 0.4, 0.5, 0.5, 6, "foot"))
        sc.add_joint("foot", s, _Joint(x1, y1, 0.6, 0.5, 5, 0.7))


def _soft_tissue(sc: _Scene, bd: _Body, level: float) -> None:
    """Body outline: truncated slabs for the trunk, capsules for limbs (max-combined)."""
    b, m = bd.build, (1.04 if bd.sex == "M" else 0.94)
    hp = 1.0 if bd.sex == "M" else 1.08
    sc.soft.append(_Ell(0, 12.2, 8.4, 11.2, 0, 0.5 * level, 0.5, 18, "soft"))
    sc.soft.append(_Seg(0, 20, 0, 30, 5.8 * b, 6.6 * b, 0.72 * level, 0.5, 12, "soft", False))
    torso = [(28.5, 10 * b), (33.0, 18.5 * b * m), (50, 17 * b), (62, 15.5 * b * b),
             (80, 17.5 * b * hp), (92, 16.0 * b * hp)]
    for (y0, r0), (y1, r1) in itertools.pairwise(torso):
        sc.soft.append(_Seg(0, y0, 0, y1, r0, r1, level, 0.5, 22, "soft", False))
    for s in (-1, 1):
        sx, sy = bd.shoulder[s]
        (ex, ey), (wx, wy) = bd.elbow[s], bd.wrist[s]
        hx, hy = bd.hand_dir[s]
        sc.soft.append(_Ell(sx, sy, 5.6 * b, 5.4, 0, 0.72 * level, 0.5, 12, "soft"))
        sc.soft.append(_Seg(sx, sy, ex, ey, 5.4 * b, 4.2 * b, 0.66 * level, 0.5, 9, "soft"))
        sc.soft.append(_Seg(ex, ey, wx, wy, 4.2 * b, 2.7 * b, 0.6 * level, 0.5, 8, "soft"))
        sc.soft.append(_Seg(wx, wy, wx + 0.75 * hx, wy + 0.75 * hy, 3.6, 3.0, 0.45 * level, 0.5,
                            4, "soft"))
        (kx, ky), (ax, ay) = bd.knee[s], bd.ankle[s]
        sc.soft.append(_Seg(s * 8.6 * bd.pelvis_w, 88, kx, ky, 8.6 * b, 5.6 * b ** 0.5,
                            0.95 * level, 0.5, 16, "soft"))
        cx, cy = kx + 0.35 * (ax - kx) + s * 0.4, ky + 0.35 * (ay - ky)
        sc.soft.append(_Seg(kx, ky, cx, cy, 5.0 * b ** 0.5, 5.4 * b ** 0.5, 0.82 * level, 0.5,
                            11, "soft"))
        sc.soft.append(_Seg(cx, cy, ax, ay, 5.4 * b ** 0.5, 3.3, 0.8 * level, 0.5, 10, "soft"))
        sc.soft.append(_Seg(ax, ay + 2, ax + s * 1.6, ay + 10, 3.8, 3.4, 0.8 * level, 0.5, 8,
                            "soft"))


def _mdp_organs(sc: _Scene, bd: _Body, rng: np.random.Generator) -> dict[str, object]:
    """Kidneys (posterior) and bladder (anterior), with their normal variation."""
    t = bd.abd_t
    kid = float(np.exp(rng.normal(0, 0.35)))
    info: dict[str, object] = {"kidney_uptake": round(kid, 3)}
    variant = rng.random()
    for s, y in ((-1, 61.0), (1, 58.6)):
        amp = 1.2 * kid * float(rng.uniform(0.8, 1.2))
        size = 1.0
        if variant < 0.03 and s == -1:
            info["kidney_variant"] = "absent right kidney"
            continue
        if 0.03 <= variant < 0.08 and s == 1:
            info["kidney_variant"] = "left hydronephrosis"
            size, amp = 1.25, amp * 1.6
            sc.organ.append(_Ell(s * 5.4, y + 0.5, 1.5, 2.0, 0, amp * 1.8, 0.7, t, "kidney"))
        if 0.08 <= variant < 0.12 and s == -1:
            info["kidney_variant"] = "ptotic right kidney"
            y += 9
        sc.organ.append(_Ell(s * 6.0, y, 2.9 * size, 5.4 * size, s * 0.28, amp, 0.75, t,
                             "kidney"))
    bs = float(rng.uniform(0.6, 1.35))
    bamp = float(np.exp(rng.normal(np.log(7.0), 0.6)))
    sc.organ.append(_Ell(float(rng.normal(0, 0.6)), 84.5 - 1.5 * bs, 4.8 * bs, 3.8 * bs, 0,
                         bamp, 0.3, bd.pelv_t, "bladder"))
    info["bladder_uptake"] = round(bamp, 3)
    return info


def _mdp_scene(bd: _Body, p: PhantomPatient, rng: np.random.Generator) -> tuple[_Scene,
                                                                                 dict[str, object]]:
    """Normal 99mTc-MDP distribution of this patient."""
    sc = _Scene()
    _skull(sc)
    _spine(sc, bd)
    _pelvis(sc, bd)
    _thorax(sc, bd)
    _ribs(sc, bd)
    for s in (-1, 1):
        _arm(sc, bd, s)
        _leg(sc, bd, s)
    _soft_tissue(sc, bd, p.soft_uptake)
    info = _mdp_organs(sc, bd, rng)
    return sc, info


# ---------------------------------------------------------------------------------------------
# disease and confounders


def _point_on(p: _Prim, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """A random point inside a host primitive and the local bone direction (radians)."""
    if isinstance(p, _Seg):
        t = float(rng.random())
        x = p.x0 + t * (p.x1 - p.x0)
        y = p.y0 + t * (p.y1 - p.y0)
        r = p.r0 + t * (p.r1 - p.r0)
        ang = math.atan2(p.y1 - p.y0, p.x1 - p.x0)
        j = float(rng.uniform(-0.4, 0.4)) * r
        return x - j * math.sin(ang), y + j * math.cos(ang), ang, r
    rr = 0.75 * math.sqrt(float(rng.random()))
    th = float(rng.uniform(0, 2 * math.pi))
    u, v = rr * p.a * math.cos(th), rr * p.b * math.sin(th)
    ca, sa = math.cos(p.angle), math.sin(p.angle)
    return p.x + u * ca - v * sa, p.y + u * sa + v * ca, p.angle, min(p.a, p.b)


_MET_REGIONS = {"spine": 0.34, "rib": 0.22, "pelvis": 0.2, "femur_prox": 0.08,
                "humerus_prox": 0.04, "skull": 0.05, "sternum": 0.03, "scapula": 0.03,
                "clavicle": 0.01}


def _focal_bone_lesion(sc: _Scene, rng: np.random.Generator, region: str, contrast: float,
                       size: float) -> None:
    """One hot focus on a bone of `region`, elongated along the bone (e.g. along a rib)."""
    hosts = sc.hosts[region]
    host = hosts[int(rng.integers(len(hosts)))]
    x, y, ang, r = _point_on(host, rng)
    a = size * float(rng.uniform(1.0, 1.8)) if region == "rib" else size
    b = min(size, max(r * 1.1, 0.5)) if region == "rib" else size * float(rng.uniform(0.7, 1.0))
    base = min(max(abs(host.amp), 1.2), 2.2)  # a rib lesion can be as hot as a vertebral one
    sc.bone.append(_Ell(x, y, a, b, ang, base * contrast, host.depth, host.thick, "lesion"))


def _metastases(sc: _Scene, rng: np.random.Generator, d: float) -> dict[str, object]:
    """Multiple asymmetric hot foci, axial predominance; solitary, typical or superscan."""
    u = rng.random()
    p_sol, p_sup = 0.06 + 0.22 * d, 0.07
    if u < p_sol:
        pattern, n = "solitary", int(rng.integers(1, 3))
    elif u < p_sol + p_sup:
        pattern, n = "superscan", int(rng.integers(25, 60))
    elif u < 0.55:
        pattern, n = "few", int(rng.integers(3, 8))
    else:
        pattern, n = "multiple", int(rng.integers(8, 30 - int(12 * d)))
    regions = list(_MET_REGIONS)
    probs = np.array([_MET_REGIONS[r] for r in regions])
    chosen = rng.choice(len(regions), size=n, p=probs / probs.sum())
    c_mean = 3.3 - 2.0 * d
    for k in chosen:
        contrast = c_mean * float(np.exp(rng.normal(0, 0.35)))
        size = float(rng.uniform(0.7, 1.9)) * (1.15 - 0.3 * d)
        _focal_bone_lesion(sc, rng, regions[int(k)], contrast, size)
    if pattern == "superscan":
        g = float(rng.uniform(1.6, 2.6))
        sc.gains.update({r: g for r in _AXIAL})
        sc.gains.update({"kidney": 0.15, "soft": 0.6, "bladder": 0.35})
    if rng.random() < 0.08:  # a lytic (cold) vertebra
        host = sc.hosts["spine"][int(rng.integers(len(sc.hosts["spine"])))]
        if isinstance(host, _Ell):
            sc.bone.append(host._replace(amp=-0.7 * host.amp, region="lesion"))
    counts = {r: int(np.sum(chosen == i)) for i, r in enumerate(regions) if np.any(chosen == i)}
    return {"pattern": pattern, "lesion_count": n, "lesion_regions": counts,
            "lesion_contrast_mean": round(c_mean, 3)}


_ARTHRITIS = {
    "osteoarthritis": {"knee": 0.85, "hip": 0.35, "hand": 0.35, "shoulder": 0.35, "foot": 0.3,
                       "facet": 0.35, "ankle": 0.15, "ac": 0.25, "wrist": 0.1},
    "rheumatoid": {"hand": 0.8, "wrist": 0.85, "foot": 0.6, "knee": 0.55, "shoulder": 0.45,
                   "elbow": 0.4, "ankle": 0.5, "hip": 0.2},
    "spondyloarthritis": {"si": 0.9, "facet": 0.6, "knee": 0.3, "ankle": 0.3, "hip": 0.3,
                          "sc": 0.3},
}


def _joint_uptake(sc: _Scene, rng: np.random.Generator, name: str, side: int, factor: float,
                  medial_bias: bool) -> None:
    """Periarticular uptake: extra activity on both sides of one joint."""
    for j in sc.joints.get((name, side), []):
        if name == "hand" and rng.random() < 0.35:
            continue
        f = factor * float(rng.uniform(0.75, 1.2))
        if name == "knee" and medial_bias and (j.x * side) < (_knee_centre(sc, side) * side):
            f *= 1.5
        sc.bone.append(_Ell(j.x + float(rng.normal(0, 0.15)), j.y + float(rng.normal(0, 0.2)),
                            j.size * float(rng.uniform(0.9, 1.3)), j.size * float(
                                rng.uniform(0.8, 1.2)), 0, j.amp * f, j.depth, j.thick,
                            "arthritis"))


def _knee_centre(sc: _Scene, side: int) -> float:
    """Mean x of the knee joint points of one side (medial vs lateral compartment)."""
    js = sc.joints.get(("knee", side), [])
    return sum(j.x for j in js) / max(len(js), 1)


def _arthritis(sc: _Scene, rng: np.random.Generator, d: float) -> dict[str, object]:
    """Periarticular uptake, often bilateral/symmetric; mild cases are close to normal."""
    kinds = list(_ARTHRITIS)
    kind = kinds[int(rng.choice(3, p=[0.55, 0.3, 0.15]))]
    f_mean = 1.7 - 1.0 * d
    involved: list[str] = []
    for name, prob in _ARTHRITIS[kind].items():
        if rng.random() >= prob:
            continue
        bilateral = rng.random() < (0.8 if kind == "rheumatoid" else 0.6)
        sides = (-1, 1) if bilateral else (int(rng.choice([-1, 1])),)
        for s in sides:
            f = f_mean * float(np.exp(rng.normal(0, 0.3)))
            _joint_uptake(sc, rng, name, s, f, medial_bias=kind == "osteoarthritis")
            involved.append(f"{name}_{'L' if s > 0 else 'R'}")
    if not involved:  # at least one joint: the class must be visible somewhere
        s = int(rng.choice([-1, 1]))
        _joint_uptake(sc, rng, "knee", s, f_mean, medial_bias=True)
        involved.append(f"knee_{'L' if s > 0 else 'R'}")
    return {"pattern": kind, "joints": involved, "joint_factor_mean": round(f_mean, 3)}


def _degeneration(sc: _Scene, rng: np.random.Generator, age: int, d: float) -> list[str]:
    """Age-related mild joint and spine uptake, present in every class (the hard confounder)."""
    out: list[str] = []
    p = min(0.9, max(0.0, (age - 35) / 45) * (0.4 + 0.6 * d))
    for name in ("knee", "shoulder", "facet", "hand", "foot"):
        if rng.random() < p * (0.6 if name == "knee" else 0.3):
            for s in (-1, 1) if rng.random() < 0.5 else (int(rng.choice([-1, 1])),):
                f = float(rng.uniform(0.15, 0.3 + 0.6 * d))
                _joint_uptake(sc, rng, name, s, f, medial_bias=True)
                out.append(f"degenerative {name}")
    return out


def _confounders(sc: _Scene, bd: _Body, rng: np.random.Generator, age: int, d: float
                 ) -> list[str]:
    """Injection site, urine contamination, old rib fractures, spine osteophytes."""
    out = _degeneration(sc, rng, age, d)
    if rng.random() < 0.12 + 0.33 * d:
        s = int(rng.choice([-1, 1]))
        (ex, ey), (wx, wy) = bd.elbow[s], bd.wrist[s]
        t = float(rng.choice([0.05, 0.1, 0.85, 0.95]))
        x, y = ex + t * (wx - ex), ey + t * (wy - ey)
        amp = float(np.exp(rng.uniform(np.log(2), np.log(40))))
        sc.organ.append(_Ell(x, y, float(rng.uniform(0.6, 1.6)), float(rng.uniform(0.6, 1.6)),
                             0, amp, 0.2, 8, "artefact"))
        if rng.random() < 0.3:  # lymphatic uptake in the axilla
            sx, sy = bd.shoulder[s]
            sc.organ.append(_Ell(sx - s * 4, sy + 5, 0.9, 0.9, 0, 0.15 * amp, 0.5, bd.chest_t,
                                 "artefact"))
        out.append("injection site")
    if rng.random() < 0.04 + 0.16 * d:
        for _ in range(int(rng.integers(1, 4))):
            x = float(rng.normal(0, 5.0))
            y = float(rng.uniform(88, 105))
            sc.organ.append(_Ell(x, y, float(rng.uniform(0.4, 1.6)), float(rng.uniform(0.4, 2.2)),
                                 float(rng.uniform(0, 3.1)), float(rng.uniform(2, 25)), 0.1,
                                 bd.pelv_t, "artefact"))
        out.append("urinary contamination")
    if rng.random() < 0.03 + 0.1 * d:
        i0 = int(rng.integers(3, 9))
        s = int(rng.choice([-1, 1]))
        for i in range(i0, i0 + int(rng.integers(2, 4))):
            pts = _rib_polyline(i, _RIB_W[i] * bd.frame, 31.8 + 2.22 * i)
            x, y, dep = pts[min(3, len(pts) - 1)]
            sc.bone.append(_Ell(s * x, y, 0.7, 0.55, 0, float(rng.uniform(1.0, 2.0)), dep,
                                bd.chest_t, "fracture"))
        out.append("healed rib fractures")
    if rng.random() < min(0.8, max(0.0, (age - 40) / 40)) * (0.3 + 0.5 * d):
        for _ in range(int(rng.integers(1, 3))):
            i = int(rng.integers(2, 5))
            s = int(rng.choice([-1, 1]))
            sc.bone.append(_Ell(s * float(rng.uniform(2.0, 3.2)), 58.6 + 3.25 * i + 1.6, 0.8, 0.7,
                                0, float(rng.uniform(0.8, 1.8 + 1.5 * d)), 0.64, bd.abd_t,
                                "osteophyte"))
        out.append("lumbar osteophytes")
    return out


# ---------------------------------------------------------------------------------------------
# 131I whole-body scan


def _iodine_scene(bd: _Body, p: PhantomPatient, rng: np.random.Generator, d: float
                  ) -> tuple[_Scene, dict[str, object]]:
    """Post-thyroidectomy 131I scan: remnant, salivary glands, gut, bladder; no skeleton."""
    sc = _Scene()
    _soft_tissue(sc, bd, 0.25 * p.soft_uptake * float(rng.uniform(0.6, 1.4)))
    t, g = bd.abd_t, rng.uniform
    n_rem = int(rng.integers(1, 4))
    hot = float(np.exp(rng.uniform(np.log(4), np.log(250 * (1.2 - 0.6 * d)))))
    for _ in range(n_rem):
        sc.organ.append(_Ell(float(rng.normal(0, 1.3)), float(rng.normal(28.6, 1.0)),
                             float(g(0.5, 1.3)), float(g(0.5, 1.5)), 0, hot * float(g(0.3, 1.0)),
                             0.3, 12, "remnant"))
    for s in (-1, 1):
        sc.organ.append(_Ell(s * 5.6, 15.8, 1.6, 2.4, 0, float(g(0.3, 3)), 0.5, 16, "salivary"))
        sc.organ.append(_Ell(s * 3.9, 20.3, 1.2, 1.1, 0, float(g(0.2, 2)), 0.4, 14, "salivary"))
    sc.organ.append(_Ell(0, 14.8, 1.4, 2.4, 0, float(g(0.3, 3)), 0.2, 16, "nasal"))
    sc.organ.append(_Seg(0, 24, 0.6, 52, 0.6, 0.6, float(g(0, 0.8)), 0.6, bd.chest_t, "esoph"))
    sc.organ.append(_Ell(6.5, 57, 4.5, 3.2, -0.5, float(g(0.8, 6)), 0.3, t, "stomach"))
    sc.organ.append(_Ell(-8, 55.5, 9, 6, 0.3, float(g(0.1, 0.8)), 0.45, t, "liver"))
    _colon(sc, rng, t)
    sc.organ.append(_Ell(0, 84, 4.0 * float(g(0.7, 1.3)), 3.4, 0, float(g(3, 30)), 0.3,
                         bd.pelv_t, "bladder"))
    info: dict[str, object] = {"remnant_uptake": round(hot, 2), "remnant_foci": n_rem}
    extra: list[str] = []
    if p.sex == "F" and rng.random() < 0.15:
        for s in (-1, 1):
            sc.organ.append(_Ell(s * 9.5, 45, 6, 5, 0, float(g(0.3, 1.2)), 0.05, 8, "breast"))
        extra.append("breast uptake")
    if rng.random() < 0.2:
        for _ in range(int(rng.integers(1, 4))):
            x = float(rng.choice([-1, 1])) * float(g(2.5, 6)) if rng.random() < 0.6 else float(
                rng.normal(0, 1.5))
            y = float(g(25, 33)) if abs(x) > 2 else float(g(34, 46))
            sc.organ.append(_Ell(x, y, 0.7, 0.7, 0, hot * float(g(0.05, 0.4)), 0.4, 14, "node"))
        extra.append("nodal metastases")
    if rng.random() < 0.1:
        for s in (-1, 1):
            sc.organ.append(_Ell(s * 7.5, 45, 6.0, 10.5, 0, float(g(0.3, 1.5)), 0.5,
                                 bd.chest_t, "lung"))
        extra.append("diffuse lung metastases")
    if rng.random() < 0.1:
        skel, _ = _mdp_scene(bd, p, rng)
        for _ in range(int(rng.integers(1, 5))):
            regions = ["spine", "pelvis", "rib", "femur_prox", "skull"]
            host = skel.hosts[regions[int(rng.integers(len(regions)))]]
            x, y, _a, _r = _point_on(host[int(rng.integers(len(host)))], rng)
            sc.organ.append(_Ell(x, y, 1.2, 1.2, 0, hot * float(g(0.05, 0.3)), 0.6, t, "bone"))
        extra.append("bone metastases")
    info["findings"] = extra
    return sc, info


_COLON = ((-9.5, 81.0), (-10.5, 64.0), (-4.0, 61.5), (4.0, 63.5), (10.5, 62.0), (11.0, 78.0),
          (6.0, 84.5), (1.0, 83.0))


def _colon(sc: _Scene, rng: np.random.Generator, thick: float) -> None:
    """Patchy activity along the large bowel (excreted iodine): blobs, some segments empty."""
    level = float(np.exp(rng.normal(np.log(0.8), 0.7)))
    jitter = rng.normal(0, 1.2, (len(_COLON), 2))
    pts = [(x + float(j[0]), y + float(j[1])) for (x, y), j in zip(_COLON, jitter, strict=True)]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if rng.random() < 0.35:
            continue
        for t in np.linspace(0, 1, 4, endpoint=False) + float(rng.uniform(0, 0.25)):
            amp = level * float(rng.gamma(1.5, 0.7))
            sc.organ.append(_Ell(x0 + float(t) * (x1 - x0), y0 + float(t) * (y1 - y0),
                                 float(rng.uniform(1.2, 2.4)), float(rng.uniform(1.2, 2.4)),
                                 float(rng.uniform(0, 3.1)), amp, 0.4, thick, "colon"))


def _star_artefact(sc: _Scene, threshold: float, tilt: float) -> None:
    """Septal penetration of the high-energy collimator: 6-ray stars around very hot foci."""
    hot = [o for o in sc.organ if isinstance(o, _Ell) and o.amp > threshold]
    for o in hot:
        for k in range(3):
            a = math.radians(60 * k + 90) - tilt
            ln = 9 + 4 * math.log(o.amp / threshold + 1)
            dx, dy = ln * math.cos(a), ln * math.sin(a)
            sc.detector.append(_Seg(o.x - dx, o.y - dy, o.x + dx, o.y + dy, 0.35, 0.35,
                                    0.012 * o.amp, 0.5, 1, "star"))


# ---------------------------------------------------------------------------------------------
# rendering


_SUB = 2  # primitives are rendered on a half-resolution grid, then blurred and upsampled
_LOW_ROWS, _LOW_COLS = INPUT_ROWS // _SUB, INPUT_COLS // _SUB


@dataclass(frozen=True)
class _Geometry:
    """Body cm -> render-grid pixels: scale, tilt about mid-body, offsets."""

    scale: float  # render pixels per reference cm
    cos: float
    sin: float
    cx: float
    cy: float

    @classmethod
    def of(cls, p: PhantomPatient) -> _Geometry:
        """Geometry of a patient on the table, on the half-resolution render grid.

        Full-resolution pixel f (centre at f) maps to render coordinate (f - 0.5) / 2.
        """
        s = p.height_cm / _REF_HEIGHT / _PIX_CM
        a = math.radians(p.tilt_deg)
        cx, cy = INPUT_COLS / 2 + p.shift_cols, p.top_row + s * _PIVOT_Y
        return cls(s / _SUB, math.cos(a), math.sin(a), (cx - 0.5) / _SUB, (cy - 0.5) / _SUB)

    def pt(self, x: float, y: float) -> tuple[float, float]:
        """(col, row) of a body point in the anterior view."""
        u, v = x * self.scale, (y - _PIVOT_Y) * self.scale
        return self.cx + self.cos * u - self.sin * v, self.cy + self.sin * u + self.cos * v


_Patch = tuple[slice, slice, np.ndarray]


def _profile(q: np.ndarray, smooth: bool) -> np.ndarray:
    """Projection profile: sqrt(1-q) for a solid (bone, organ); 1-q for softer body edges."""
    v = np.maximum(np.float32(1.0) - q, np.float32(0.0))
    return v if smooth else np.sqrt(v)


def _seg_patch(c0: float, r0: float, c1: float, r1: float, rad0: float, rad1: float,
               capped: bool, smooth: bool, rows: np.ndarray, cols: np.ndarray) -> _Patch | None:
    """Projected tapered cylinder inside its bounding box (None when off the grid)."""
    pad = max(rad0, rad1) + 1.0
    top, bot = max(int(min(r0, r1) - pad), 0), min(int(max(r0, r1) + pad) + 1, rows.size)
    left, right = max(int(min(c0, c1) - pad), 0), min(int(max(c0, c1) + pad) + 1, cols.size)
    if top >= bot or left >= right:
        return None
    yy = (rows[top:bot] - np.float32(r0))[:, None]
    xx = (cols[left:right] - np.float32(c0))[None, :]
    vx, vy = c1 - c0, r1 - r0
    l2 = vx * vx + vy * vy
    if l2 < 1e-9:
        q = (xx * xx + yy * yy) * np.float32(1.0 / (rad0 * rad0))
    else:
        t = (xx * np.float32(vx) + yy * np.float32(vy)) * np.float32(1.0 / l2)
        tc = np.clip(t, 0.0, 1.0)
        ex, ey = xx - tc * np.float32(vx), yy - tc * np.float32(vy)
        if rad0 == rad1:
            q = (ex * ex + ey * ey) * np.float32(1.0 / (rad0 * rad0))
        else:
            rad = np.float32(rad0) + tc * np.float32(rad1 - rad0)
            q = (ex * ex + ey * ey) / (rad * rad)
        if not capped:
            q = np.where((t < 0) | (t > 1), np.float32(2.0), q)
    return slice(top, bot), slice(left, right), _profile(q, smooth)


def _ell_patch(cx: float, cy: float, a: float, b: float, ang: float, smooth: bool,
               rows: np.ndarray, cols: np.ndarray) -> _Patch | None:
    """Projected ellipsoid inside its bounding box (None when off the grid)."""
    ca, sa = math.cos(ang), math.sin(ang)
    hx, hy = math.hypot(a * ca, b * sa) + 1.0, math.hypot(a * sa, b * ca) + 1.0
    top, bot = max(int(cy - hy), 0), min(int(cy + hy) + 1, rows.size)
    left, right = max(int(cx - hx), 0), min(int(cx + hx) + 1, cols.size)
    if top >= bot or left >= right:
        return None
    yy = (rows[top:bot] - np.float32(cy))[:, None]
    xx = (cols[left:right] - np.float32(cx))[None, :]
    u = (xx * np.float32(ca / a) + yy * np.float32(sa / a))
    w = (yy * np.float32(ca / b) - xx * np.float32(sa / b))
    return slice(top, bot), slice(left, right), _profile(u * u + w * w, smooth)


def _patch(p: _Prim, g: _Geometry, rows: np.ndarray, cols: np.ndarray, smooth: bool = False
           ) -> _Patch | None:
    """Rasterise one primitive (minimum radius 0.6 render px so small bones are not lost)."""
    if isinstance(p, _Seg):
        c0, r0 = g.pt(p.x0, p.y0)
        c1, r1 = g.pt(p.x1, p.y1)
        return _seg_patch(c0, r0, c1, r1, max(p.r0 * g.scale, 0.6), max(p.r1 * g.scale, 0.6),
                          p.capped, smooth, rows, cols)
    c, r = g.pt(p.x, p.y)
    return _ell_patch(c, r, max(p.a * g.scale, 0.6), max(p.b * g.scale, 0.6),
                      p.angle + math.atan2(g.sin, g.cos), smooth, rows, cols)


def _smooth_field(rng: np.random.Generator, amount: float, shape: tuple[int, int]
                  ) -> np.ndarray:
    """1 + smooth random variation (bilinear from a 24 x 6 grid): patchy soft-tissue uptake."""
    grid = rng.normal(0.0, amount, (24, 6)).astype(np.float32)
    ry = np.linspace(0, 23, shape[0])
    rx = np.linspace(0, 5, shape[1])
    my = np.maximum(0, 1 - np.abs(ry[:, None] - np.arange(24)[None])).astype(np.float32)
    mx = np.maximum(0, 1 - np.abs(rx[:, None] - np.arange(6)[None])).astype(np.float32)
    return np.clip(1.0 + my @ grid @ mx.T, 0.5, 1.6)


def _render(sc: _Scene, g: _Geometry, mu: float, bone_gain: float, rng: np.random.Generator
            ) -> np.ndarray:
    """Expected activity (2, rows, cols) on the render grid: anterior, posterior (unmirrored)."""
    rows = np.arange(_LOW_ROWS, dtype=np.float32)
    cols = np.arange(_LOW_COLS, dtype=np.float32)
    views = np.zeros((2, _LOW_ROWS, _LOW_COLS), np.float32)
    for group, gain0 in ((sc.bone, bone_gain), (sc.organ, 1.0)):
        for p in group:
            amp = p.amp * gain0 * sc.gains.get(p.region, 1.0)
            got = _patch(p, g, rows, cols) if amp != 0 else None
            if got is None:
                continue
            rs, cs, v = got
            w = np.array([math.exp(-mu * p.depth * p.thick),
                          math.exp(-mu * (1 - p.depth) * p.thick)], np.float32) * amp
            views[:, rs, cs] += w[:, None, None] * v
    soft = np.zeros((_LOW_ROWS, _LOW_COLS), np.float32)
    sg = sc.gains.get("soft", 1.0)
    for p in sc.soft:
        got = _patch(p, g, rows, cols, smooth=True)
        if got is not None:
            rs, cs, v = got
            np.maximum(soft[rs, cs], np.float32(p.amp * sg) * v, out=soft[rs, cs])
    views += (soft * _smooth_field(rng, 0.18, soft.shape))[None]
    for p in sc.detector:  # ray angles are mirror-symmetric, so both detectors get the same
        got = _patch(p, g, rows, cols)
        if got is not None:
            rs, cs, v = got
            views[:, rs, cs] += np.float32(p.amp) * v
    return views


def _blur_axis(img: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    """Correlate the last two axes' `axis` (1 rows, 2 cols) with kernel k, edges replicated."""
    r = (k.size - 1) // 2
    n = img.shape[axis]
    pad = [(0, 0)] * img.ndim
    pad[axis] = (r, r)
    p = np.pad(img, pad, mode="edge")
    sl = [slice(None)] * img.ndim
    sl[axis] = slice(0, n)
    out = k[0] * p[tuple(sl)]
    for i in range(1, k.size):
        sl[axis] = slice(i, i + n)
        out += k[i] * p[tuple(sl)]
    return out


def _gauss_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of the last two axes (edge-replicated), float32."""
    r = max(1, math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    return _blur_axis(_blur_axis(img, k, 1), k, 2)


def _upsample2(img: np.ndarray) -> np.ndarray:
    """Bilinear x2 upsampling of the last two axes, pixel centres aligned (f = 2h + 0.5)."""
    def rows(a: np.ndarray) -> np.ndarray:
        q = np.float32(0.25) * a
        out = np.empty((*a.shape[:-2], 2 * a.shape[-2], a.shape[-1]), np.float32)
        out[..., 0::2, :] = a - q
        out[..., 1::2, :] = out[..., 0::2, :]
        out[..., 2::2, :] += q[..., :-1, :]
        out[..., 1:-1:2, :] += q[..., 1:, :]
        out[..., 0, :] += q[..., 0, :]
        out[..., -1, :] += q[..., -1, :]
        return out
    return np.swapaxes(rows(np.swapaxes(rows(img), -1, -2)), -1, -2)


def _camera(views: np.ndarray, fwhm_px: float) -> np.ndarray:
    """Camera blur of FWHM `fwhm_px` (full-resolution pixels), then upsampling to 1024 x 256.

    The bilinear upsampling itself blurs by about 0.82 px (variance 2/3 px^2); the Gaussian on the
    render grid supplies the rest.
    """
    var_full = (fwhm_px / 2.3548) ** 2
    sigma_low = math.sqrt(max(var_full - 2.0 / 3.0, 0.05)) / _SUB
    return _upsample2(_gauss_blur(views, sigma_low))


def _poisson_counts(lam: np.ndarray, background: float, fov: tuple[int, int, int, int],
                    rng: np.random.Generator) -> np.ndarray:
    """Poisson counts of `lam` plus a uniform background inside the detector field of view.

    The background is drawn as one Poisson total spread uniformly (a Poisson process), which is
    exact and far cheaper than sampling every low-count pixel.
    """
    r0, r1, c0, c1 = fov
    out = np.zeros(lam.shape, np.int64)
    sub = lam[r0:r1, c0:c1]
    mask = sub > 0.02
    o = out[r0:r1, c0:c1]
    o[mask] = rng.poisson(sub[mask])
    n_bg = int(rng.poisson(background * o.size))
    if n_bg:
        idx = rng.integers(0, o.size, n_bg)
        o += np.bincount(idx, minlength=o.size).reshape(o.shape)
    return np.clip(out, 0, 65535).astype(np.uint16)


def _field_of_view(p: PhantomPatient, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Rows scanned (vertex or raised hands minus a margin to below the feet), detector columns."""
    body_px = p.height_cm / _PIX_CM
    first = p.top_row - (0.17 * body_px if p.arm_pose == "head" else 0.0)
    top = int(max(0.0, first - rng.uniform(15, 45)))
    bot = int(min(INPUT_ROWS, p.top_row + body_px + rng.uniform(10, 40)))
    c0 = int(rng.integers(8, 18))
    return top, bot, c0, min(INPUT_COLS, c0 + 230)


def _to_counts(views: np.ndarray, p: PhantomPatient, fwhm: float, total: float,
               background: float, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """Blur, mirror the posterior view, scale to `total` anterior counts, add Poisson noise."""
    lam = _camera(views, fwhm)
    lam *= np.float32(total / max(float(lam[0].sum()), 1e-6))
    fov = _field_of_view(p, rng)
    a = _poisson_counts(lam[0], background, fov, rng)
    b = _poisson_counts(lam[1][:, ::-1], background, fov, rng)
    info: dict[str, object] = {
        "fov_rows": [fov[0], fov[1]], "fov_cols": [fov[2], fov[3]],
        "camera_fwhm_px": round(fwhm, 2), "background_per_px": round(background, 3),
        "expected_counts_anterior": round(float(lam[0].sum())),
        "expected_counts_posterior": round(float(lam[1].sum()))}
    return a, b, info


# ---------------------------------------------------------------------------------------------
# public API


def _streams(label: str, seed: int) -> list[np.random.Generator]:
    """Independent streams (patient, anatomy, disease, noise) so parts do not shift each other."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    ss = np.random.SeedSequence([GENERATOR_VERSION, seed, CLASS_NAMES.index(label)])
    return [np.random.default_rng(s) for s in ss.spawn(4)]


def generate_study(label: str, seed: int, difficulty: float = 0.5) -> PhantomStudy:
    """One simulated study (anterior + posterior) of class `label`, fully determined by the seed.

    difficulty 0 gives florid disease and few confounders; 1 gives subtle disease (a solitary
    metastasis, mild arthritis) and many confounders.
    """
    if label not in CLASS_NAMES:
        raise ValueError(f"unknown class {label!r}; expected one of {', '.join(CLASS_NAMES)}")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    r_pat, r_anat, r_dis, r_noise = _streams(label, seed)
    when = datetime(2017, 1, 2, 8, 0) + timedelta(days=int(r_pat.integers(0, 730)),
                                                  minutes=int(r_pat.integers(0, 540)))
    patient = _sample_patient(r_pat, label, seed, when)
    bd = _body(patient, r_anat)
    details: dict[str, object] = {"difficulty": difficulty, "generator_version": GENERATOR_VERSION,
                                  "simulated": True}
    if label == "thyroid_carcinoma":
        sc, info = _iodine_scene(bd, patient, r_dis, difficulty)
        _star_artefact(sc, threshold=20.0, tilt=math.radians(patient.tilt_deg))
        tracer, mu, bone_gain = I131, _MU_I, 0.0
        fwhm = float(r_noise.uniform(4.0, 6.0))
        total = float(np.clip(np.exp(r_noise.normal(np.log(3.5e5), 0.45)), 8e4, 1.5e6))
        background = float(r_noise.uniform(0.05, 0.25))
    else:
        sc, info = _mdp_scene(bd, patient, r_anat)
        if label == "bone_metastasis":
            info.update(_metastases(sc, r_dis, difficulty))
        elif label == "arthritis":
            info.update(_arthritis(sc, r_dis, difficulty))
        info["confounders"] = _confounders(sc, bd, r_dis, patient.age, difficulty)
        tracer, mu, bone_gain = TC99M_MDP, _MU_TC, patient.bone_uptake
        fwhm = float(r_noise.uniform(2.6, 3.6))
        total = float(np.clip(np.exp(r_noise.normal(np.log(2.8e6), 0.3)), 1e6, 6e6))
        background = float(r_noise.uniform(0.08, 0.3))
    details.update(info)
    views = _render(sc, _Geometry.of(patient), mu, bone_gain, r_anat)
    a, b, cinfo = _to_counts(views, patient, fwhm, total, background, r_noise)
    details.update(cinfo)
    return PhantomStudy(label=label, seed=seed, patient=patient, anterior=a, posterior=b,
                        radiopharmaceutical=tracer, details=details, study_datetime=when)


def class_counts(n_patients: int, proportions: Sequence[float]) -> list[int]:
    """Patients per class by largest remainder, so the counts sum to n_patients exactly."""
    if len(proportions) != len(CLASS_NAMES) or any(p < 0 for p in proportions):
        raise ValueError(f"proportions must be {len(CLASS_NAMES)} non-negative numbers")
    total = float(sum(proportions))
    if total <= 0:
        raise ValueError("proportions must not all be zero")
    raw = [n_patients * p / total for p in proportions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: n_patients - sum(counts)]:
        counts[i] += 1
    return counts


def generate_dataset(n_patients: int, seed: int, difficulty: float = 0.5,
                     proportions: tuple[float, ...] | None = None) -> list[PhantomStudy]:
    """One study per patient, classes in `proportions` (default paper Table 1), shuffled.

    Study seeds are distinct and patient IDs unique, so a patient-level split is sound.
    """
    if n_patients < 0:
        raise ValueError("n_patients must be >= 0")
    counts = class_counts(n_patients, proportions or PAPER_PROPORTIONS)
    labels = [lab for lab, n in zip(CLASS_NAMES, counts, strict=True) for _ in range(n)]
    rng = np.random.default_rng(np.random.SeedSequence([GENERATOR_VERSION, seed, 7919]))
    order = rng.permutation(len(labels))
    seeds = rng.choice(2**40, size=len(labels), replace=False)
    studies: list[PhantomStudy] = []
    seen: set[str] = set()
    for i, j in enumerate(order):
        s = int(seeds[i])
        while _patient_id(labels[j], s) in seen:  # 12-digit IDs: collisions are ~never, but
            s += 2**40  # a split by patient must never merge two of them
        seen.add(_patient_id(labels[j], s))
        studies.append(generate_study(labels[j], s, difficulty))
    return studies
