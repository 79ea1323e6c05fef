"""NIAH heatmaps (matplotlib, Agg backend): depth x length per method, gkamradt's red -> yellow -> green.

Every heatmap uses the same colour scale, 0 (red) to 1 (green), so methods compare by colour. Cells with no
result are grey. Each plotting function returns the matrices it drew and, per method, the pixel centre of every
cell in the saved PNG, so a test can read the image back and check each cell's colour against its score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap, Normalize  # noqa: E402

# Red -> yellow -> green as in gkamradt's NIAH figures.
NIAH_CMAP = LinearSegmentedColormap.from_list("niah", ["#E8475F", "#F2C14E", "#1BC28B"]).with_extremes(
    bad="#BDBDBD"
)
NORM = Normalize(vmin=0.0, vmax=1.0)
DPI = 100


@dataclass(frozen=True)
class Heatmap:
    """One saved PNG.

    Attributes:
        path: the PNG file.
        matrices: method -> ``(len(depths), len(lengths))`` scores drawn (NaN = no result).
        cell_centers: method -> ``(len(depths), len(lengths), 2)`` pixel ``(x, y)`` of each cell's centre in the
            PNG, y counted from the top row of pixels.
        size: ``(width, height)`` of the PNG in pixels.
    """

    path: Path
    matrices: dict[str, np.ndarray]
    cell_centers: dict[str, np.ndarray]
    size: tuple[int, int]


def score_color(score: float) -> tuple[float, float, float]:
    """The RGB (0..1) a cell of ``score`` is painted with."""
    return tuple(NIAH_CMAP(NORM(score))[:3]) if not math.isnan(score) else tuple(NIAH_CMAP.get_bad()[:3])


def plot_method(matrix: np.ndarray, method: str, depths: list[float], lengths: list[int], path: Path,
                title: str = "") -> Heatmap:
    """Save one method's heatmap: rows are depths (0 at the top), columns are lengths."""
    return plot_side_by_side({method: matrix}, depths, lengths, path, title)


def plot_side_by_side(matrices: dict[str, np.ndarray], depths: list[float], lengths: list[int], path: Path,
                      title: str = "") -> Heatmap:
    """Save the methods' heatmaps side by side in one PNG with one shared colour bar."""
    if not matrices:
        raise ValueError("nothing to plot: no method")
    shape = (len(depths), len(lengths))
    for method, matrix in matrices.items():
        if np.shape(matrix) != shape:
            raise ValueError(f"{method}: matrix shape {np.shape(matrix)} is not (depths, lengths) = {shape}")
    count = len(matrices)
    panel_w, panel_h = 0.55 * len(lengths) + 1.6, 0.4 * len(depths) + 1.4
    fig, axes = plt.subplots(1, count, figsize=(panel_w * count + 1.2, panel_h), dpi=DPI, squeeze=False,
                             layout="constrained")
    images = []
    for ax, (method, matrix) in zip(axes[0], matrices.items()):
        images.append(ax.imshow(np.asarray(matrix, dtype=float), cmap=NIAH_CMAP, norm=NORM, aspect="auto",
                                interpolation="nearest"))
        ax.set_title(method)
        ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if ax is axes[0][0]:
            ax.set_ylabel("needle depth")
    fig.colorbar(images[0], ax=list(axes[0]), fraction=0.05, pad=0.02, label="score")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.canvas.draw()
    width, height = fig.canvas.get_width_height()
    centers = {}
    for ax, method in zip(axes[0], matrices):
        cols, rows = np.meshgrid(np.arange(len(lengths)), np.arange(len(depths)))
        xy = ax.transData.transform(np.stack([cols.ravel(), rows.ravel()], axis=1).astype(float))
        xy[:, 1] = height - xy[:, 1]  # display y grows upwards; image rows grow downwards
        centers[method] = xy.reshape(len(depths), len(lengths), 2)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    drawn = {m: np.asarray(x, dtype=float) for m, x in matrices.items()}
    return Heatmap(path, drawn, centers, (width, height))


def _length_label(tokens: int) -> str:
    return f"{tokens / 1000:g}k" if tokens >= 1000 and tokens % 100 == 0 else str(tokens)
