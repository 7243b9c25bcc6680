"""Intensity statistics per channel for ``data inspect``: over all voxels and over the
foreground (label > 0) of labelled cases.

Mean and standard deviation are exact (float64 sums over every voxel). Percentiles (0.5, 50,
99.5) come from a sample: up to ``SAMPLE_PER_CASE`` voxels of each case and channel, drawn
with a generator seeded by the case index, so the numbers do not depend on the reading order
and a file gives the same statistics every time.
"""
from __future__ import annotations

import numpy as np

PERCENTILES = (0.5, 50.0, 99.5)
SAMPLE_PER_CASE = 100_000


class _Running:
    def __init__(self):
        self.n, self.total, self.squares = 0, 0.0, 0.0
        self.lo, self.hi = np.inf, -np.inf
        self.samples: list[np.ndarray] = []

    def add(self, values: np.ndarray, rng: np.random.Generator) -> None:
        if values.size == 0:
            return
        v = values.astype(np.float64, copy=False)
        self.n += v.size
        self.total += float(v.sum())
        self.squares += float(np.square(v).sum())
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        self.samples.append(v if v.size <= SAMPLE_PER_CASE else rng.choice(v, SAMPLE_PER_CASE, replace=False))

    def summary(self) -> dict | None:
        if not self.n:
            return None
        mean = self.total / self.n
        std = float(np.sqrt(max(self.squares / self.n - mean * mean, 0.0)))
        sample = np.concatenate(self.samples)
        pct = np.percentile(sample, PERCENTILES)
        return {"voxels": self.n, "mean": mean, "std": std, "min": self.lo, "max": self.hi,
                **{f"p{p:g}": float(v) for p, v in zip(PERCENTILES, pct)}, "percentiles_from": int(sample.size)}


class IntensityStats:
    """Accumulate ``add(index, image [C, D, H, W], label or None)``; ``summary()`` per channel."""

    def __init__(self):
        self.all: list[_Running] = []
        self.fg: list[_Running] = []

    def add(self, index: int, image: np.ndarray, label: np.ndarray | None) -> None:
        while len(self.all) < image.shape[0]:
            self.all.append(_Running())
            self.fg.append(_Running())
        mask = None if label is None else label.reshape(-1) > 0
        for c, ch in enumerate(image):
            flat = np.asarray(ch).reshape(-1)
            rng = np.random.default_rng([index, c])
            self.all[c].add(flat, rng)
            if mask is not None:
                self.fg[c].add(flat[mask], rng)

    def summary(self) -> list[dict]:
        return [{"channel": c, "all": a.summary(), "foreground": f.summary()} for c, (a, f) in enumerate(zip(self.all, self.fg))]


def format_summary(rows: list[dict]) -> list[str]:
    """Lines for ``inspect``'s table."""
    head = "".join(f"{h:<11}" for h in ("mean", "std", "p0.5", "p50", "p99.5", "min", "max"))
    lines = [f"intensity   ch  {'of':<11} {head}"]
    for row in rows:
        for kind in ("all", "foreground"):
            s = row[kind]
            if s is None:
                continue
            values = "".join(f"{s[k]:<11.4g}" for k in ("mean", "std", "p0.5", "p50", "p99.5", "min", "max"))
            lines.append(f"            {row['channel']:<3} {kind:<11} {values}")
    return lines
