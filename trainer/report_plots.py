"""The report's pictures: the Dice/latency trade-off and a side-by-side of predictions."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_tradeoff(rows, path: Path) -> None:
    """Dice vs CPU latency, one point per (stage, artifact), marker area by file size."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = np.array([r.size_bytes for r in rows], dtype=float)
    area = 40 + 600 * sizes / sizes.max()
    for r, a in zip(rows, area):
        ax.scatter(r.latency_ms, r.dice, s=a, alpha=0.6, marker="o" if r.kind == "pytorch" else "s")
        ax.annotate(f"{r.stage}\n{r.kind}", (r.latency_ms, r.dice), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("CPU latency, batch 1, 1 thread (ms, log)")
    ax.set_ylabel("validation Dice (mean foreground)")
    ax.set_title("Compression trade-off (marker area ~ file size; circle: PyTorch, square: artifact)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _middle_slice(volume) -> np.ndarray:
    array = volume.numpy() if hasattr(volume, "numpy") else np.asarray(volume)
    return array[array.shape[0] // 2] if array.ndim == 3 else array


def plot_qualitative(first, last, first_name: str, last_name: str, path: Path, count: int = 3) -> None:
    """Rows of validation images: image, ground truth, first stage and last stage predictions."""
    run, batches, first_preds = first
    _, _, last_preds = last
    picks = []
    for b, (batch, p0, p1) in enumerate(zip(batches, first_preds, last_preds)):
        for i in range(batch["image"].shape[0]):
            picks.append((float((batch["label"][i] > 0).float().mean()), batch["image"][i, 0], batch["label"][i], p0[i], p1[i]))
    picks = sorted(picks, key=lambda t: -t[0])[:count]  # slices with the most foreground
    fig, axes = plt.subplots(len(picks), 4, figsize=(10, 2.6 * len(picks)), squeeze=False)
    titles = ["image", "ground truth", f"{first_name}", f"{last_name}"]
    k = max(run.num_classes - 1, 1)
    for row, (_, image, label, p0, p1) in zip(axes, picks):
        row[0].imshow(_middle_slice(image), cmap="gray")
        for ax, seg in zip(row[1:], (label, p0, p1)):
            ax.imshow(_middle_slice(seg), cmap="tab10", vmin=0, vmax=max(k, 9), interpolation="nearest")
        for ax, title in zip(row, titles):
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_per_class(rows, path: Path) -> None:
    """Dice of every foreground class, one bar per (stage, artifact): a class that compression
    lost shows as a missing bar, whatever the mean does."""
    names = list(rows[0].per_class_dice)
    if not names:
        return
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names) + 0.35 * len(rows)), 4))
    width = 0.8 / len(rows)
    x = np.arange(len(names))
    for i, r in enumerate(rows):
        values = [r.per_class_dice.get(n, np.nan) for n in names]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width, label=f"{r.stage} {r.kind}",
               hatch="" if r.kind == "pytorch" else "//", edgecolor="white", linewidth=0.3)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("validation Dice")
    ax.set_title("Dice per class at every stage (hatched: exported artifact)", fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
