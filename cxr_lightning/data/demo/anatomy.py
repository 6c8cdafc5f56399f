"""The demo's chest geometry in unit coordinates (0..1 across the image), and its pixel grid.

Working in unit coordinates means a demo drawn at 64 px shows the same chest as one drawn at
256 px, and boxes scale to NIH's original image size.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from cxr_lightning.data.demo import streams
from cxr_lightning.errors import ConfigError


class Ellipse(NamedTuple):
    cx: float
    cy: float
    rx: float
    ry: float
    angle: float = 0.0

    def distance(self, c: Canvas) -> np.ndarray:
        """Normalised radius: < 1 inside the ellipse."""
        dx, dy = c.x - self.cx, c.y - self.cy
        if self.angle:
            cos, sin = math.cos(self.angle), math.sin(self.angle)
            dx, dy = dx * cos + dy * sin, dy * cos - dx * sin
        return np.sqrt((dx / self.rx) ** 2 + (dy / self.ry) ** 2)

    def point(self, u: float, v: float) -> tuple[float, float]:
        """The point at (u, v) in radii from the centre (u to the image right, v downward)."""
        return self.cx + u * self.rx, self.cy + v * self.ry

    def scaled(self, kx: float, ky: float, dx: float = 0.0, dy: float = 0.0) -> Ellipse:
        return self._replace(cx=self.cx + dx, cy=self.cy + dy, rx=self.rx * kx, ry=self.ry * ky)


@dataclass(frozen=True)
class Anatomy:
    """One image's chest: patient-specific build plus visit-specific positioning and exposure."""

    midline: float
    scale: float
    body: Ellipse
    lungs: tuple[Ellipse, Ellipse]  # image left (patient's right), image right
    heart: Ellipse
    gain: float
    offset: float

    def lateral(self, side: int) -> int:
        """+1 where 'outward' for this lung is the image's right, -1 where it is the left."""
        return -1 if side == 0 else 1


def chest_anatomy(seed: int, patient_id: int, follow_up: int, view: str = "PA") -> Anatomy:
    """The build is drawn per patient; position, inspiration and exposure per visit."""
    if view not in ("PA", "AP"):
        raise ConfigError(f"demo view={view!r}: expected 'PA' or 'AP'.")
    build = streams.rng(seed, streams.ANATOMY, patient_id)
    mid = 0.5 + build.normal(0, 0.015)
    s = build.uniform(0.93, 1.05)
    heart_width = build.uniform(0.95, 1.05)
    visit = streams.rng(seed, streams.VISIT, patient_id, follow_up)
    mid += visit.normal(0, 0.01)
    dy = visit.normal(0, 0.012)
    breath = 1 + visit.normal(0, 0.015)
    # A bedside AP film magnifies the heart: a real confounder of Cardiomegaly.
    heart_mag = 1.12 if view == "AP" else 1.0
    return Anatomy(
        midline=mid,
        scale=s,
        body=Ellipse(mid, 0.6 + dy, 0.44 * s, 0.62 * s),
        lungs=(
            Ellipse(mid - 0.165 * s, 0.455 + dy, 0.125 * s, 0.245 * s * breath),
            Ellipse(mid + 0.16 * s, 0.465 + dy, 0.12 * s, 0.235 * s * breath),
        ),
        heart=Ellipse(mid + 0.045 * s, 0.615 + dy, 0.11 * s * heart_width * heart_mag, 0.085 * s * heart_mag, -0.35),
        gain=visit.uniform(0.9, 1.1),
        offset=visit.uniform(-0.03, 0.03),
    )


def smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def inside(d: np.ndarray, edge: float = 0.06) -> np.ndarray:
    """Soft ellipse mask: 1 for d < 1 - edge, 0 for d > 1 + edge."""
    return smoothstep((1 + edge - d) / (2 * edge))


def bump(d: np.ndarray) -> np.ndarray:
    """Smooth blob, exactly zero outside the ellipse."""
    return np.clip(1 - d * d, 0.0, None) ** 2


def plateau(d: np.ndarray, edge: float) -> np.ndarray:
    """Flat-topped blob with a linear rim of relative width ``edge``; zero outside."""
    return np.clip((1 - d) / edge, 0.0, 1.0)


@functools.lru_cache(maxsize=64)
def _spline_matrix(cells: int, size: int) -> np.ndarray:
    """Cubic B-spline weights mapping ``cells + 4`` control values onto ``size`` samples."""
    u = (np.arange(size) + 0.5) / size * cells
    t = np.abs(u[:, None] - np.arange(-1, cells + 3)[None, :])
    w = np.where(t < 1, (4 - 6 * t**2 + 3 * t**3) / 6, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))
    return w.astype(np.float32)


def _smooth_noise(keys: tuple[int, ...], cells: int, size: int) -> np.ndarray:
    """Unit-variance smooth random field with about ``cells`` blobs across the image, the same
    function of position at every image size."""
    control = streams.rng(*keys, cells).standard_normal((cells + 4, cells + 4)).astype(np.float32)
    w = _spline_matrix(cells, size)
    norm = np.sqrt((w**2).sum(axis=1))
    # einsum, not ``@``: BLAS threads make these tiny products 100x slower on a busy machine.
    field = np.einsum("il,ml->im", np.einsum("ij,jl->il", w, control), w)
    return field / np.outer(norm, norm)


class Canvas:
    """Pixel grid of one image plus the anatomical layers (masks, lung texture) signs need."""

    def __init__(self, anatomy: Anatomy, size: int, seed: int, patient_id: int, follow_up: int) -> None:
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.x, self.y = coords[None, :], coords[:, None]
        self.size, self.anatomy = size, anatomy
        self.seed, self.patient_id, self.follow_up = seed, patient_id, follow_up

    def noise(self, stream: int, cells: int, *keys: int) -> np.ndarray:
        """This image's smooth random field of ``stream`` (and ``keys``)."""
        return _smooth_noise((self.seed, stream, self.patient_id, self.follow_up, *keys), cells, self.size)

    @functools.cached_property
    def heart(self) -> np.ndarray:
        return inside(self.anatomy.heart.distance(self), 0.08)

    @functools.cached_property
    def lungs_raw(self) -> tuple[np.ndarray, np.ndarray]:
        """The lung ellipses, ignoring the heart in front of them."""
        return tuple(inside(lung.distance(self), 0.05) for lung in self.anatomy.lungs)  # type: ignore[return-value]

    @functools.cached_property
    def lungs(self) -> tuple[np.ndarray, np.ndarray]:
        """The aerated lung each side: what the heart does not cover."""
        return tuple(m * (1 - self.heart) for m in self.lungs_raw)  # type: ignore[return-value]

    @functools.cached_property
    def lung_texture(self) -> np.ndarray:
        """Vascular markings, the texture a pneumothorax lacks."""
        return 0.035 * self.noise(streams.LUNG_TEXTURE, 22)


# Intensities on a 0..1 scale before exposure: air, soft tissue, the darkening of aerated lung.
AIR, SOFT_TISSUE, LUNG_DARK, HEART_BRIGHT = 0.05, 0.42, 0.27, 0.2
