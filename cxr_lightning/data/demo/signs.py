"""Signs of the 14 findings, painted on the demo chest where each belongs.

Each factory draws the sign's geometry and returns a ``Paint``: the additive change to the image,
exactly zero outside the sign, so the finding's box is where it is nonzero.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cxr_lightning.data.demo import streams
from cxr_lightning.data.demo.anatomy import (
    HEART_BRIGHT,
    LUNG_DARK,
    Anatomy,
    Canvas,
    Ellipse,
    bump,
    inside,
    plateau,
    smoothstep,
)
from cxr_lightning.errors import ConfigError
from cxr_lightning.labels import FINDINGS

Paint = Callable[[Canvas], np.ndarray]


@dataclass
class SignRandom:
    place: np.random.Generator  # per patient: a persisting finding stays where it was
    visit: np.random.Generator  # per visit: small jitter and strength
    finding: int  # key of the sign's textures, drawn at paint time and the same at every size

    def texture(self, c: Canvas, cells: int) -> np.ndarray:
        return c.noise(streams.SIGN_TEXTURE, cells, self.finding)


def _lung_spot(
    a: Anatomy, r: SignRandom, side: int, u: tuple[float, float], v: tuple[float, float]
) -> tuple[float, float]:
    """A point of lung ``side`` at (u outward, v downward) in radii, drawn per patient, jittered per visit."""
    lung = a.lungs[side]
    lat = a.lateral(side)
    x, y = lung.point(lat * r.place.uniform(*u), r.place.uniform(*v))
    return x + r.visit.normal(0, 0.006), y + r.visit.normal(0, 0.006)


def _atelectasis(a: Anatomy, r: SignRandom) -> Paint:
    # Plate-like linear opacity in a lower zone.
    side = int(r.place.integers(2))
    x, y = _lung_spot(a, r, side, (0.0, 0.45), (0.1, 0.5))
    lung = a.lungs[side]
    length, thickness = lung.rx * r.place.uniform(0.45, 0.65), lung.ry * r.place.uniform(0.06, 0.1)
    band = Ellipse(x, y, length, thickness, r.place.uniform(-0.4, 0.4))
    amp = 0.34 * r.visit.uniform(0.85, 1.1)
    return lambda c: amp * plateau(band.distance(c), 0.5) * c.lungs[side]


def _cardiomegaly(a: Anatomy, r: SignRandom) -> Paint:
    # The heart is wider (and a little taller): brightness gained where lung was.
    big = a.heart.scaled(r.place.uniform(1.3, 1.45) * r.visit.uniform(0.97, 1.03), 1.12)

    def paint(c: Canvas) -> np.ndarray:
        grown = inside(big.distance(c), 0.08) - c.heart
        return grown * (HEART_BRIGHT + (LUNG_DARK - c.lung_texture) * (c.lungs_raw[0] + c.lungs_raw[1]))

    return paint


def _effusion(a: Anatomy, r: SignRandom) -> Paint:
    # Fluid fills the lung base with a meniscus rising laterally and blunts the angle.
    side = int(r.place.integers(2))
    lung, lat = a.lungs[side], a.lateral(side)
    level = r.place.uniform(0.35, 0.65) + r.visit.normal(0, 0.04)
    amp = 0.36 * r.visit.uniform(0.85, 1.1)

    def paint(c: Canvas) -> np.ndarray:
        outward = np.clip(lat * (c.x - lung.cx) / lung.rx, 0, 1)
        surface = lung.cy + lung.ry * (level - 0.4 * outward**2)
        return amp * smoothstep((c.y - surface) / 0.015) * c.lungs[side]

    return paint


def _infiltration(a: Anatomy, r: SignRandom) -> Paint:
    # Patchy, ill-defined opacity in a mid or upper zone.
    side = int(r.place.integers(2))
    x, y = _lung_spot(a, r, side, (-0.3, 0.3), (-0.55, 0.1))
    lung = a.lungs[side]
    region = Ellipse(x, y, lung.rx * r.place.uniform(0.5, 0.7), lung.ry * r.place.uniform(0.3, 0.42))
    amp = 0.28 * r.visit.uniform(0.85, 1.1)

    def paint(c: Canvas) -> np.ndarray:
        # A faint haze everywhere in the region, denser in patches.
        patches = np.clip(0.3 + 0.6 * r.texture(c, 14), 0, 1)
        return amp * (0.35 + 0.65 * patches) * bump(region.distance(c)) * c.lungs[side]

    return paint


def _mass(a: Anatomy, r: SignRandom) -> Paint:
    # A large, lobulated, well-defined blob.
    side = int(r.place.integers(2))
    x, y = _lung_spot(a, r, side, (-0.5, 0.5), (-0.5, 0.45))
    radius = r.place.uniform(0.045, 0.07) * a.scale
    phases = r.place.uniform(0, 2 * np.pi, 2)
    amp = 0.36 * r.visit.uniform(0.85, 1.1)

    def paint(c: Canvas) -> np.ndarray:
        d = np.broadcast_to(Ellipse(x, y, radius, radius).distance(c), (c.size, c.size))
        near = d < 1.15  # the lobulated edge reaches 1 + 0.08 + 0.05; skip the angle elsewhere
        theta = np.arctan2(*np.broadcast_arrays(c.y - y, c.x - x))[near]
        lobulation = 1 + 0.08 * np.sin(2 * theta + phases[0]) + 0.05 * np.sin(3 * theta + phases[1])
        blob = np.zeros((c.size, c.size), np.float32)
        blob[near] = plateau(d[near] / lobulation, 0.3)
        return amp * blob

    return paint


def _nodule(a: Anatomy, r: SignRandom) -> Paint:
    # A small, bright, round spot.
    side = int(r.place.integers(2))
    x, y = _lung_spot(a, r, side, (-0.55, 0.55), (-0.6, 0.5))
    spot = Ellipse(x, y, *(2 * (r.place.uniform(0.022, 0.03) * a.scale,)))
    amp = 0.45 * r.visit.uniform(0.85, 1.1)
    return lambda c: amp * plateau(spot.distance(c), 0.4)


def _pneumonia(a: Anatomy, r: SignRandom) -> Paint:
    # Dense, confluent lower-zone opacity crossed by dark air bronchograms.
    side = int(r.place.integers(2))
    x, y = _lung_spot(a, r, side, (-0.25, 0.25), (0.15, 0.5))
    lung = a.lungs[side]
    region = Ellipse(x, y, lung.rx * r.place.uniform(0.55, 0.7), lung.ry * r.place.uniform(0.3, 0.4))
    tilt = r.place.uniform(-0.6, 0.6)
    amp = 0.32 * r.visit.uniform(0.85, 1.1)

    def paint(c: Canvas) -> np.ndarray:
        density = np.clip(0.8 + 0.3 * r.texture(c, 6), 0, 1)
        along = (c.x - x) * math.cos(tilt) + (c.y - y) * math.sin(tilt)
        bronchi = np.clip(np.cos(2 * np.pi * along / 0.035), 0, 1) ** 12
        return amp * (density - 0.45 * bronchi) * np.sqrt(bump(region.distance(c))) * c.lungs[side]

    return paint


def _pneumothorax(a: Anatomy, r: SignRandom) -> Paint:
    # The lung edge falls away from the chest wall at the apex and side, leaving a dark rim
    # without vascular markings, bounded by a thin bright pleural line.
    side = int(r.place.integers(2))
    lung, lat = a.lungs[side], a.lateral(side)
    f = r.place.uniform(0.2, 0.32) * r.visit.uniform(0.9, 1.1)
    collapsed = lung.scaled(1 - f, 1 - 0.5 * f, dx=-lat * 0.9 * f * lung.rx, dy=0.5 * f * lung.ry)
    upper = lung.cy + 0.35 * lung.ry

    def paint(c: Canvas) -> np.ndarray:
        d = collapsed.distance(c)
        keep = smoothstep((upper - c.y) / (0.2 * lung.ry)) * c.lungs[side]
        rim = (1 - inside(d, 0.03)) * keep
        line = smoothstep(1 - np.abs(d - 1.0) / 0.04) * keep
        return -rim * (c.lung_texture + 0.09) + 0.2 * line

    return paint


def _consolidation(a: Anatomy, r: SignRandom) -> Paint:
    # Homogeneous, sharply marginated opacity.
    side = int(r.place.integers(2))
    x, y = _lung_spot(a, r, side, (-0.3, 0.3), (-0.4, 0.5))
    lung = a.lungs[side]
    rx, ry = lung.rx * r.place.uniform(0.35, 0.5), lung.ry * r.place.uniform(0.2, 0.3)
    region = Ellipse(x, y, rx, ry, r.place.uniform(-0.5, 0.5))
    amp = 0.34 * r.visit.uniform(0.85, 1.1)
    return lambda c: amp * inside(region.distance(c), 0.05) * c.lungs[side]


def _edema(a: Anatomy, r: SignRandom) -> Paint:
    # Bilateral perihilar haze ("bat wings").
    wings = [
        Ellipse(*lung.point(-a.lateral(side) * 0.35, 0.05), lung.rx * 0.85, lung.ry * 0.6)
        for side, lung in enumerate(a.lungs)
    ]
    amp = 0.22 * r.visit.uniform(0.85, 1.1)

    def paint(c: Canvas) -> np.ndarray:
        haze = sum(bump(w.distance(c)) * m for w, m in zip(wings, c.lungs))
        return amp * haze * (0.8 + 0.2 * r.texture(c, 30))

    return paint


def _emphysema(a: Anatomy, r: SignRandom) -> Paint:
    # Hyperinflated, hyperlucent lungs with flattened diaphragms and sparse markings.
    k = r.place.uniform(1.08, 1.14)
    big = [lung.scaled(1.05, k, dy=(k - 1) * lung.ry) for lung in a.lungs]

    def paint(c: Canvas) -> np.ndarray:
        grown = sum(inside(b.distance(c), 0.05) for b in big) * (1 - c.heart)
        old = c.lungs[0] + c.lungs[1]
        return -(LUNG_DARK - c.lung_texture) * (grown - old) - 0.07 * grown - 0.6 * c.lung_texture * old

    return paint


def _fibrosis(a: Anatomy, r: SignRandom) -> Paint:
    # Reticular net of fine lines in a lower, peripheral zone.
    side = int(r.place.integers(2))
    lung = a.lungs[side]
    zone = Ellipse(*lung.point(a.lateral(side) * 0.35, 0.35), lung.rx * 0.6, lung.ry * 0.45)
    angles = r.place.uniform(0, np.pi, 2)
    period = r.place.uniform(0.025, 0.035)
    amp = 0.22 * r.visit.uniform(0.85, 1.1)

    def paint(c: Canvas) -> np.ndarray:
        waves = (np.cos(2 * np.pi * (c.x * math.cos(t) + c.y * math.sin(t)) / period) for t in angles)
        lines = sum(np.clip(w, 0, 1) ** 6 for w in waves)
        return amp * np.clip(lines, 0, 1) * bump(zone.distance(c)) * c.lungs[side]

    return paint


def _pleural_thickening(a: Anatomy, r: SignRandom) -> Paint:
    # A bright band along the inner chest wall, at the apex (cap) or the side.
    side = int(r.place.integers(2))
    lung, lat = a.lungs[side], a.lateral(side)
    apical = r.place.random() < 0.5
    amp = 0.28 * r.visit.uniform(0.85, 1.1)

    def paint(c: Canvas) -> np.ndarray:
        d = lung.distance(c)
        band = smoothstep((d - 0.84) / 0.04) * smoothstep((1.0 - d) / 0.03)
        if apical:
            where = smoothstep((lung.cy - 0.55 * lung.ry - c.y) / (0.1 * lung.ry))
        else:
            where = smoothstep((lat * (c.x - lung.cx) / lung.rx - 0.45) / 0.1) * smoothstep(
                (0.6 * lung.ry - np.abs(c.y - lung.cy)) / (0.1 * lung.ry)
            )
        return amp * band * where * (1 - c.heart)

    return paint


def _hernia(a: Anatomy, r: SignRandom) -> Paint:
    # Hiatal hernia: a round retrocardiac opacity at the lower mediastinum with an air cap.
    x, y = a.midline + 0.015 * a.scale + r.visit.normal(0, 0.004), a.heart.cy + 0.55 * a.heart.ry
    sac = Ellipse(x, y, r.place.uniform(0.05, 0.065) * a.scale, r.place.uniform(0.035, 0.045) * a.scale)
    amp = 0.3 * r.visit.uniform(0.85, 1.1)

    def paint(c: Canvas) -> np.ndarray:
        inner = inside(sac.distance(c), 0.12)
        gas = inside(sac.scaled(0.75, 0.75).distance(c), 0.1) * smoothstep((y - 0.25 * sac.ry - c.y) / 0.006)
        return amp * inner - 0.6 * amp * gas

    return paint


SIGNS: dict[str, Callable[[Anatomy, SignRandom], Paint]] = {
    "Atelectasis": _atelectasis,
    "Cardiomegaly": _cardiomegaly,
    "Effusion": _effusion,
    "Infiltration": _infiltration,
    "Mass": _mass,
    "Nodule": _nodule,
    "Pneumonia": _pneumonia,
    "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation,
    "Edema": _edema,
    "Emphysema": _emphysema,
    "Fibrosis": _fibrosis,
    "Pleural_Thickening": _pleural_thickening,
    "Hernia": _hernia,
}
assert tuple(SIGNS) == FINDINGS


def sign(finding: str, anatomy: Anatomy, seed: int, patient_id: int, follow_up: int) -> Paint:
    if finding not in SIGNS:
        raise ConfigError(f"unknown finding {finding!r}; expected one of {list(FINDINGS)}.")
    k = FINDINGS.index(finding) + 1
    random = SignRandom(
        place=streams.rng(seed, streams.PLACE, patient_id, k),
        visit=streams.rng(seed, streams.JITTER, patient_id, follow_up, k),
        finding=k,
    )
    return SIGNS[finding](anatomy, random)
