"""The diagnostics' figures (matplotlib's object API: no display, no global pyplot state)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from lightning.pytorch.loggers import Logger, WandbLogger
from matplotlib.figure import Figure


def save_figure(figure: Figure, path: Path, loggers: Iterable[Logger], step: int) -> Path:
    """Write ``figure`` as a PNG at ``path`` and log it as an image to every W&B logger."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=f"diagnostics/{path.stem}", images=[str(path)], step=step)
    return path


def _short_names(names: Sequence[str]) -> list[str]:
    # Parameter names share long prefixes (network.featurizer.); the rest tells the layers apart.
    prefix = os.path.commonprefix(list(names)) if len(names) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]
    return [name[len(prefix) :] for name in names]


def osgr_figure(series: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """OSGR over training, one line of (step, value) points per series (paper Fig. 4)."""
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.add_subplot()
    for label, points in series.items():
        steps, values = zip(*points)
        axes.plot(steps, values, marker="o", markersize=3, label=label)
    axes.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("training step")
    axes.set_ylabel("OSGR")
    axes.set_title("One-step generalization ratio")
    axes.legend()
    return figure


def gsnr_figure(layer_names: Sequence[str], values: Sequence[np.ndarray], step: int) -> Figure:
    """Box plot of the per-coordinate GSNR of every layer."""
    height = max(3.0, 0.16 * len(layer_names) + 1.2)
    figure = Figure(figsize=(7.0, height), layout="constrained")
    axes = figure.add_subplot()
    axes.boxplot(list(values), orientation="horizontal", showfliers=False, widths=0.6)
    axes.set_yticks(range(1, len(layer_names) + 1), _short_names(layer_names), fontsize=6)
    axes.invert_yaxis()
    # The bias-corrected GSNR can be slightly negative and spans decades.
    axes.set_xscale("symlog", linthresh=1e-3)
    axes.set_xlabel("GSNR per coordinate (bias-corrected mean^2 / var - 1/n)")
    axes.set_title(f"Per-layer GSNR distribution at step {step}")
    return figure


def balance_figure(
    steps: Sequence[int], layer_names: Sequence[str], update_magnitude: np.ndarray, gradient_change: np.ndarray
) -> Figure:
    """Two heat-maps over training, layers by steps (paper Fig. 1)."""
    height = max(3.5, 0.14 * len(layer_names) + 1.5)
    figure = Figure(figsize=(12.0, height), layout="constrained")
    panels = figure.subplots(1, 2, sharey=True)
    titles = (
        "update magnitude: RMS of the step's parameter change\nper layer, divided by the step's largest",
        "authors' variant: cumulative mean |g_t - g_(t-1)| per layer\n(sampled steps), min-max normalised per step",
    )
    # Recorded steps are evenly spaced: each column spans one spacing, centred on its step.
    half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
    for axes, matrix, title in zip(panels, (update_magnitude, gradient_change), titles):
        image = axes.imshow(
            matrix,
            aspect="auto",
            interpolation="nearest",
            vmin=0.0,
            vmax=1.0,
            cmap="viridis",
            extent=(steps[0] - half, steps[-1] + half, len(layer_names) - 0.5, -0.5),
        )
        axes.set_title(title, fontsize=9)
        axes.set_xlabel("training step")
    panels[0].set_yticks(range(len(layer_names)), _short_names(layer_names), fontsize=5)
    figure.colorbar(image, ax=panels, shrink=0.8, label="normalised magnitude")
    return figure


def feature_map_figure(
    embedding: np.ndarray,
    classes: np.ndarray,
    domains: np.ndarray,
    domain_labels: Sequence[str],
    is_target: Sequence[bool],
    method: str,
) -> Figure:
    """Two scatter plots of the same 2-D embedding: coloured by class, and by domain.

    Target domains are drawn as crosses, so the unseen data stands out among the sources.
    """
    figure = Figure(figsize=(12.0, 5.5), layout="constrained")
    by_class, by_domain = figure.subplots(1, 2)
    scatter = by_class.scatter(embedding[:, 0], embedding[:, 1], c=classes, cmap="tab10", s=6)
    by_class.legend(*scatter.legend_elements(num=None), title="class", fontsize=7, loc="best", markerscale=0.8)
    by_class.set_title(f"{method} of penultimate features, by class")
    colours = matplotlib.colormaps["tab10"].colors
    for index, (label, target) in enumerate(zip(domain_labels, is_target)):
        chosen = domains == index
        by_domain.scatter(
            embedding[chosen, 0],
            embedding[chosen, 1],
            s=14 if target else 6,
            marker="x" if target else "o",
            linewidths=0.8,
            color=colours[index % len(colours)],
            label=label,
        )
    by_domain.legend(title="domain", fontsize=7, markerscale=2)
    by_domain.set_title(f"{method} of penultimate features, by domain")
    for axes in (by_class, by_domain):
        axes.set_xticks([])
        axes.set_yticks([])
    return figure
