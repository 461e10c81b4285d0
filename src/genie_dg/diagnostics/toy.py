"""Optimization paths on a 2-D loss with one minimum per source domain (paper Fig. 5).

The paper gives neither code nor formula for its landscape; this one is ours. Each of the
three source domains d has a Gaussian well at its own minimum ``c_d`` with widths ``w_d``:

    L_d(theta) = 1 - exp(-1/2 * sum_i ((theta_i - c_d,i) / w_d,i)^2)
    L(theta)   = (1/3) * sum_d L_d(theta)

so ``L_d`` is minimal (0) exactly at ``c_d``; the wells are narrow enough for their
separation that the average loss ``L`` has one local minimum near each ``c_d``. Each step sees one source domain, drawn at random with a fixed seed (the same
sequence for every optimizer), and follows the gradient of its ``L_d``, as a step on that
domain's minibatch would: the spread of gradients from step to step is the disagreement
between domains, which GENIE's per-coordinate GSNR measures and SGD, Adam and SAM ignore.

Every optimizer starts at ``(-1, 3)`` and makes 30 steps. SAM is written out here (ascend by
``rho`` along the normalised gradient, take the gradient there, step from the original point
with it); SGD, Adam and GENIE are the library optimizers. Same seed, same figure.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from genie_dg.optim import GENIE

DOMAIN_MINIMA = ((-2.0, 0.0), (2.0, 0.5), (0.5, -2.0))
DOMAIN_WIDTHS = ((1.0, 1.4), (1.3, 1.0), (1.4, 1.1))
START = (-1.0, 3.0)
STEPS = 30
# Step sizes that make 30 steps cover a visible distance on this landscape.
LEARNING_RATES = {"SGD": 2.0, "Adam": 0.15, "SAM": 2.0, "GENIE": 2.0}
SAM_RHO = 0.3


def domain_loss(theta: Tensor, domain: int) -> Tensor:
    """``L_d(theta)`` for ``theta`` of shape (..., 2)."""
    centre = torch.tensor(DOMAIN_MINIMA[domain], dtype=theta.dtype)
    width = torch.tensor(DOMAIN_WIDTHS[domain], dtype=theta.dtype)
    return 1.0 - torch.exp(-0.5 * (((theta - centre) / width) ** 2).sum(-1))


def average_loss(theta: Tensor) -> Tensor:
    """``L(theta)``, the mean over source domains."""
    return torch.stack([domain_loss(theta, d) for d in range(len(DOMAIN_MINIMA))]).mean(0)


def domain_sequence(steps: int, seed: int) -> list[int]:
    """The source domain each step sees."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(len(DOMAIN_MINIMA), (steps,), generator=generator).tolist()


def _gradient(theta: Tensor, domain: int) -> Tensor:
    point = theta.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(domain_loss(point, domain), point)
    return gradient


def _optimizer_path(make: Callable[[list[Tensor]], torch.optim.Optimizer], domains: Sequence[int]) -> Tensor:
    theta = torch.tensor(START, dtype=torch.float64, requires_grad=True)
    optimizer = make([theta])
    path = [theta.detach().clone()]
    for domain in domains:
        theta.grad = _gradient(theta, domain)
        optimizer.step()
        path.append(theta.detach().clone())
    return torch.stack(path)


def _sam_path(lr: float, rho: float, domains: Sequence[int]) -> Tensor:
    theta = torch.tensor(START, dtype=torch.float64)
    path = [theta.clone()]
    for domain in domains:
        gradient = _gradient(theta, domain)
        ascent = rho * gradient / gradient.norm().clamp_min(1e-12)
        theta = theta - lr * _gradient(theta + ascent, domain)
        path.append(theta.clone())
    return torch.stack(path)


def optimization_paths(steps: int = STEPS, seed: int = 0) -> dict[str, Tensor]:
    """``{optimizer: (steps + 1) x 2 path}`` from ``START``, all on the same domain sequence."""
    domains = domain_sequence(steps, seed)
    return {
        "SGD": _optimizer_path(lambda p: torch.optim.SGD(p, lr=LEARNING_RATES["SGD"]), domains),
        "Adam": _optimizer_path(lambda p: torch.optim.Adam(p, lr=LEARNING_RATES["Adam"]), domains),
        "SAM": _sam_path(LEARNING_RATES["SAM"], SAM_RHO, domains),
        "GENIE": _optimizer_path(lambda p: GENIE(p, lr=LEARNING_RATES["GENIE"], seed=seed), domains),
    }


def landscape_figure(paths: dict[str, Tensor]) -> Figure:
    """Contours of ``L`` with each domain's minimum and every optimizer's path."""
    xs = np.linspace(-4.0, 4.0, 241)
    ys = np.linspace(-4.0, 4.0, 241)
    grid = torch.tensor(np.stack(np.meshgrid(xs, ys), axis=-1))
    figure = Figure(figsize=(6.5, 6.0), layout="constrained")
    axes = figure.add_subplot()
    contours = axes.contourf(xs, ys, average_loss(grid).numpy(), levels=20, cmap="Greys_r", alpha=0.8)
    figure.colorbar(contours, ax=axes, label="mean loss over source domains")
    for index, (cx, cy) in enumerate(DOMAIN_MINIMA):
        axes.plot(cx, cy, marker="X", markersize=11, color="crimson", linestyle="none")
        axes.annotate(f"domain {index + 1}", (cx, cy), textcoords="offset points", xytext=(6, 6), color="crimson")
    for name, path in paths.items():
        axes.plot(path[:, 0], path[:, 1], marker="o", markersize=2.5, linewidth=1.4, label=name)
    axes.plot(*START, marker="*", markersize=14, color="gold", markeredgecolor="black", linestyle="none", label="start")
    axes.set_xlim(xs[0], xs[-1])
    axes.set_ylim(ys[0], ys[-1])
    axes.set_xlabel("theta 1")
    axes.set_ylabel("theta 2")
    axes.set_title(f"{len(next(iter(paths.values()))) - 1} steps, one random source domain per step")
    axes.legend(loc="lower right", fontsize=8)
    return figure


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m genie_dg.toy",
        description="Paths of SGD, Adam, SAM and GENIE on a 2-D loss with one minimum per source domain.",
    )
    parser.add_argument("--out", type=Path, default=Path("toy_landscape.png"), help="PNG file to write")
    parser.add_argument("--steps", type=int, default=STEPS, help="steps per optimizer (default %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the domain sequence and GENIE (default %(default)s)"
    )
    args = parser.parse_args(argv)
    paths = optimization_paths(args.steps, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    landscape_figure(paths).savefig(args.out, dpi=120)
    for name, path in paths.items():
        end = path[-1]
        print(f"{name:>5}: ends at ({end[0]:+.3f}, {end[1]:+.3f}), mean loss {float(average_loss(end)):.4f}")
    print(f"figure: {args.out}")
    return 0
