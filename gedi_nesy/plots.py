"""PNG figures for reports: confusion matrices, image grids, accuracy-vs-data-size panels and
training curves.

Each figure is a ``matplotlib.figure.Figure`` drawn on its own ``FigureCanvasAgg``, so no global
backend is selected and importing this module changes no matplotlib state. Files are written
atomically: to a temporary file in the target folder, then moved over the target with
``os.replace``, so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gedi_nesy.files import atomic_write


def _as_array(x: Any) -> np.ndarray:
    """Returns ``x`` as a float numpy array; a torch tensor is detached and moved to the CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
    return np.asarray(x, dtype=np.float64)


def _new_figure(width: float, height: float) -> Figure:
    """A figure attached to its own Agg canvas (no pyplot, no global backend)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_atomic(fig: Figure, path: str | os.PathLike[str], dpi: int) -> Path:
    """Writes ``fig`` as a PNG through :func:`gedi_nesy.files.atomic_write` (a temporary file
    next to ``path``, then a rename), creating the folder first."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(target, lambda f: fig.savefig(f, format="png", dpi=dpi))


def save_confusion_png(
    matrix: Any,
    path: str | os.PathLike[str],
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Saves a confusion matrix: counts written in each cell, colour = row-normalised share.

    Args:
        matrix: confusion matrix M, shape (R, C), rows = true, cols = predicted.
        path: output PNG file; its folder is created if missing.
        row_labels: R tick labels for the true values; default 0..R-1.
        col_labels: C tick labels for the predicted values; default 0..C-1.
        title: figure title.

    Returns:
        The path written.
    """
    m = _as_array(matrix)  # (R, C)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"matrix must be a non-empty 2-D array, got shape {m.shape}")
    rows = [str(i) for i in range(m.shape[0])] if row_labels is None else list(row_labels)
    cols = [str(j) for j in range(m.shape[1])] if col_labels is None else list(col_labels)
    if len(rows) != m.shape[0] or len(cols) != m.shape[1]:
        raise ValueError(
            f"got {len(rows)} row and {len(cols)} column labels for a matrix of shape {m.shape}; "
            "pass one label per row and per column"
        )
    support = m.sum(axis=1, keepdims=True)  # (R, 1)
    shares = np.divide(m, support, out=np.zeros_like(m), where=support > 0)  # (R, C)
    fig = _new_figure(0.5 * m.shape[1] + 2.0, 0.5 * m.shape[0] + 1.5)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of row")
    for (i, j), count in np.ndenumerate(m):
        text = f"{count:.0f}" if float(count).is_integer() else f"{count:.2g}"
        colour = "white" if shares[i, j] > 0.5 else "black"
        ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=7)
    ax.set_xticks(range(m.shape[1]), cols)
    ax.set_yticks(range(m.shape[0]), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save_atomic(fig, path, dpi=120)


def _tile(images: np.ndarray, nrow: int, pad: int) -> np.ndarray:
    """Tiles images (N, H, W) into one grey canvas with ``nrow`` images per row."""
    n, h, w = images.shape
    n_rows = -(-n // nrow)  # ceil(N / nrow)
    grid = np.ones((n_rows * (h + pad) + pad, nrow * (w + pad) + pad))  # (GH, GW), white padding
    for idx, img in enumerate(images):  # img: (H, W)
        r, c = divmod(idx, nrow)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = img
    return grid


def save_image_grid(
    images: Any,
    path: str | os.PathLike[str],
    *,
    nrow: int = 8,
    pad: int = 2,
    scale: int = 2,
) -> Path:
    """Saves grey images (e.g. data or SGLD samples) as one PNG grid, one pixel per pixel.

    Values are mapped from [-1, 1] to [0, 1]; values outside [-1, 1] are clipped.

    Args:
        images: images, shape (N, 1, H, W), values in [-1, 1].
        path: output PNG file; its folder is created if missing.
        nrow: number of images per row of the grid.
        pad: white padding between images, in pixels.
        scale: each pixel is drawn as a scale x scale block.

    Returns:
        The path written.
    """
    x = _as_array(images)  # (N, 1, H, W)
    if x.ndim != 4 or x.shape[0] == 0 or x.shape[1] != 1:
        raise ValueError(
            f"images must have shape (N, 1, H, W) with N >= 1, got {x.shape}; "
            "pass single-channel images"
        )
    if not np.isfinite(x).all():
        raise ValueError("images contain NaN or inf; check the sampler before saving")
    if nrow < 1 or pad < 0 or scale < 1:
        raise ValueError(f"need nrow >= 1, pad >= 0, scale >= 1, got {nrow}, {pad}, {scale}")
    grey = np.clip((x[:, 0] + 1.0) / 2.0, 0.0, 1.0)  # (N, H, W) in [0, 1]
    grid = _tile(grey, min(nrow, x.shape[0]), pad)  # (GH, GW)
    grid = np.kron(grid, np.ones((scale, scale)))  # (GH * scale, GW * scale)
    dpi = 100
    fig = Figure(figsize=(grid.shape[1] / dpi, grid.shape[0] / dpi))
    FigureCanvasAgg(fig)
    fig.figimage(grid, cmap="gray", vmin=0.0, vmax=1.0, origin="upper")
    return _save_atomic(fig, path, dpi=dpi)


def _check_panels(
    x: np.ndarray,
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    errs: Mapping[str, Mapping[str, Sequence[float]]],
) -> None:
    """Raises ValueError unless ``x`` (P,) is non-empty, every panel has a line and every error
    bar belongs to a line drawn."""
    if x.ndim != 1 or x.size == 0 or not panels or not all(panels.values()):
        raise ValueError("need a non-empty 1-D xs and at least one line in every panel")
    for panel, bars in errs.items():
        unknown = sorted(set(bars) - set(panels.get(panel, {})))
        if panel not in panels or unknown:
            raise ValueError(
                f"error bars for {unknown or sorted(bars)} in panel {panel!r} have no line; give "
                "error bars only for lines drawn, under the same panel title and name"
            )


def save_panels_png(
    xs: Sequence[float],
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike[str],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    yerr_panels: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    logx: bool = False,
) -> Path:
    """Saves side-by-side panels of lines over shared x values and a shared y axis; a method
    keeps one colour in every panel (e.g. raw and matched accuracy against data size).

    Args:
        xs: x values, length P.
        panels: panel title -> (method name -> y values, each of length P).
        path: output PNG file; its folder is created if missing.
        xlabel: x-axis label.
        ylabel: y-axis label (left panel).
        title: figure title.
        yerr_panels: panel title -> (method name -> error-bar half widths, length P); a subset
            of ``panels`` and of each panel's names.
        logx: draw the x axis on a log scale (for data sizes such as 100 ... 30,000).

    Returns:
        The path written.
    """
    x = _as_array(xs)  # (P,)
    errs = {} if yerr_panels is None else {k: dict(v) for k, v in yerr_panels.items()}
    _check_panels(x, panels, errs)
    names = list(dict.fromkeys(name for lines in panels.values() for name in lines))
    palette = colormaps["tab10" if len(names) <= 10 else "tab20"]
    fig = _new_figure(6.0 if len(panels) == 1 else 4.5 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (panel, lines) in zip(axes, panels.items()):
        for name, ys in lines.items():
            y = _as_array(ys)  # (P,)
            yerr = errs.get(panel, {}).get(name)
            yerr = None if yerr is None else _as_array(yerr)  # (P,)
            if y.shape != x.shape or (yerr is not None and yerr.shape != x.shape):
                raise ValueError(f"series {name!r} does not have {x.size} values like xs")
            color = palette(names.index(name) % palette.N)
            ax.errorbar(x, y, yerr=yerr, marker="o", capsize=3, label=name, color=color)
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(panel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _save_atomic(fig, path, dpi=120)


def save_curves_png(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    path: str | os.PathLike[str],
    *,
    xlabel: str = "step",
    title: str = "",
    log_y: bool = False,
) -> Path:
    """Saves training curves as small multiples: one panel per logged value (its own y axis),
    one line per run in it; a run keeps one colour in every panel.

    Args:
        panels: value name -> (run label -> (x values, y values), two sequences of one length).
        path: output PNG file; its folder is created if missing.
        xlabel: x-axis label.
        title: figure title.
        log_y: draw every y axis on a log scale (a panel with a value <= 0 stays linear).

    Returns:
        The path written.

    Raises:
        ValueError: no panel, a panel without a line, or a line whose x and y differ in length.
    """
    if not panels or not all(panels.values()):
        raise ValueError("need at least one panel, and at least one line in every panel")
    runs = list(dict.fromkeys(run for lines in panels.values() for run in lines))
    palette = colormaps["tab10" if len(runs) <= 10 else "tab20"]
    colors = {run: palette(i % palette.N) for i, run in enumerate(runs)}
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    legend_cols = min(len(runs), 2 * cols)  # about two run names fit under a panel
    legend_rows = -(-len(runs) // legend_cols) if len(runs) > 1 else 0
    fig = _new_figure(4.0 * cols, 2.8 * rows + 0.3 * legend_rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, lines) in zip(axes, panels.items()):
        for run, (xs, ys) in lines.items():
            x, y = _as_array(xs), _as_array(ys)  # (P,), (P,)
            if x.shape != y.shape or x.ndim != 1:
                raise ValueError(
                    f"run {run!r} in panel {name!r}: {x.size} x values, {y.size} y values"
                )
            ax.plot(x, y, color=colors[run], linewidth=1.0)
        if log_y and all((_as_array(ys) > 0).all() for _, ys in lines.values()):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if legend_rows:
        handles = [Line2D([], [], color=colors[run]) for run in runs]
        fig.legend(handles, runs, loc="outside lower center", ncols=legend_cols, fontsize="small")
    if title:
        fig.suptitle(title)
    return _save_atomic(fig, path, dpi=110)
