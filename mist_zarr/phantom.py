"""Synthetic CT-like phantoms with features at known positions (demo, tests, benchmarks)."""

from __future__ import annotations

import numpy as np

__all__ = ["ct_phantom"]

# (centre z, y, x as fractions of the extent, semi-axes as fractions, HU)
_ELLIPSOIDS = (
    ((0.5, 0.5, 0.5), (0.45, 0.40, 0.46), 40.0),  # soft tissue body
    ((0.5, 0.5, 0.5), (0.42, 0.36, 0.42), -60.0),  # fat ring inside -> body 40 - 60 = -20
    ((0.5, 0.45, 0.32), (0.30, 0.18, 0.10), -780.0),  # right lung
    ((0.5, 0.45, 0.68), (0.30, 0.18, 0.10), -780.0),  # left lung
    ((0.5, 0.72, 0.5), (0.45, 0.06, 0.06), 700.0),  # spine
    ((0.5, 0.45, 0.5), (0.20, 0.08, 0.07), 60.0),  # heart
)


def ct_phantom(shape: tuple[int, int, int] = (32, 512, 512), *, seed: int = 0,
               noise: float = 12.0) -> np.ndarray:
    """int16 HU volume ``(z, y, x)``: body, lungs, spine, heart, air -1000, plus noise."""
    zz, yy, xx = np.meshgrid(*(np.linspace(0, 1, n, endpoint=False) + 0.5 / n for n in shape),
                             indexing="ij", sparse=True)
    vol = np.full(shape, -1000.0)
    for (cz, cy, cx), (az, ay, ax), hu in _ELLIPSOIDS:
        inside = ((zz - cz) / az) ** 2 + ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1
        vol = np.where(inside, vol + hu + (1000.0 if hu == 40.0 else 0.0), vol)
    rng = np.random.default_rng(seed)
    vol += rng.normal(0.0, noise, shape)
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
