"""Time optimizer steps: GENIE's ``step()`` alone on timm ResNets, and every configured
optimizer end to end on the default experiment's network.

Not a test. Two tables:

1. ``step()`` alone (GENIE against torch's Adam/AdamW/SGD). Gradients are random (seeded) and
   alternate between two sets, so the moving averages see a non-zero variance as in training.
   Columns: median milliseconds per step, ratio to Adam(foreach) and to Adam(fused), and
   optimizer-state bytes per parameter (sum of ``nbytes`` of the tensors in
   ``optimizer.state`` divided by the number of parameter elements).
2. End to end: ``optimizer.step(closure)`` where the closure zeroes the gradients and runs the
   forward and backward pass, as Lightning's automatic optimization does, so the extra passes
   of SAM, GAM and FAD and the Hessian-vector products of AdaHessian and GAM are included.
   Each optimizer is built from its Hydra config (``conf/optimizer/<name>.yaml`` with the
   default dataset's tuned values) over the default experiment's network (the backbone
   config, one input channel, 10 classes) on one batch of the default experiment's size
   (batch_size per domain x 5 training domains) of random 28x28 images: timings do not
   depend on pixel values. Columns: median milliseconds per step, ratio to Adam, backward
   passes per step.

Example::

    python benchmarks/optimizer_step.py                      # both tables, GENIE(compiled=True) included
    python benchmarks/optimizer_step.py --models resnet18 resnet50 --repeats 10
    python benchmarks/optimizer_step.py --skip-step-only --e2e-optimizers adam sam fad
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
import traceback

from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from genie_dg.models import Classifier
from genie_dg.optim import GENIE, differentiates_gradient
from genie_dg.pipeline import instantiate_or_explain

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
END_TO_END_OPTIMIZERS = ("adam", "adamw", "sgd", "yogi", "adabelief", "adahessian", "sam", "gam", "fad", "genie")


def build_params(name: str, seed: int, grad_sets: int):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(p.shape, generator=gen) * 1e-2 for p in params] for _ in range(grad_sets)]
    return params, grads


def state_bytes_per_param(opt: torch.optim.Optimizer, params) -> float:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total / sum(p.numel() for p in params)


def time_steps(step, params, grads, repeats: int, warmup: int):
    def set_grads(k):
        for p, g in zip(params, grads[k % len(grads)]):
            p.grad = g

    t0 = time.perf_counter()
    for k in range(warmup):
        set_grads(k)
        step()
    warm = time.perf_counter() - t0
    times = []
    for k in range(warmup, warmup + repeats):
        set_grads(k)
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, warm


class MaskDraw:
    """Not an optimizer: the eager GENIE mask's uniform draw alone, one per parameter tensor."""

    def __init__(self, params):
        self.shapes = [p.shape for p in params]
        self.generator = torch.Generator().manual_seed(0)
        self.state = {}

    def step(self):
        for shape in self.shapes:
            torch.rand(shape, generator=self.generator)


def configs(compile_genie: bool):
    yield "GENIE (foreach, all on)", lambda ps: GENIE(ps, seed=0), False
    yield "GENIE (single-tensor, all on)", lambda ps: GENIE(ps, seed=0, foreach=False), False
    if compile_genie:
        yield "GENIE (compiled=True, all on)", lambda ps: GENIE(ps, seed=0, compiled=True), True
    yield "GENIE (noise+mask off)", lambda ps: GENIE(ps, seed=0, noise=False, mask=False), False
    yield "Adam(foreach=True)", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True), False
    yield "Adam(fused=True)", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), False
    yield "AdamW(foreach=True)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), False
    yield "SGD(momentum=0.9, foreach=True)", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True), False
    yield "torch.rand per tensor (eager mask draw only)", MaskDraw, False


def run_model(name: str, args) -> list[tuple]:
    params, grads = build_params(name, args.seed, grad_sets=2)
    n = sum(p.numel() for p in params)
    rows = []
    for label, make, compiled in configs(not args.no_compile):
        with torch.no_grad():
            snapshot = [p.detach().clone() for p in params]
        opt = make(params)
        note = ""
        try:
            ms, warm = time_steps(opt.step, params, grads, args.repeats, args.warmup)
            if compiled:
                note = f"warm-up incl. compile {warm:.1f} s"
            rows.append((label, ms, state_bytes_per_param(opt, params), note))
        except Exception as exc:  # report and continue (e.g. no C++ compiler for inductor)
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            rows.append((label, float("nan"), float("nan"), "FAILED " + msg[:200]))
            if args.verbose:
                traceback.print_exc()
        del opt
        with torch.no_grad():
            for p, v in zip(params, snapshot):
                p.copy_(v)
        gc.collect()
        print(f"  {name}: {label}: {rows[-1][1]:.1f} ms {rows[-1][3]}", flush=True)
    return [(name, n, *r) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18"], help="timm model names (e.g. resnet18 resnet50)")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per optimizer")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (includes compilation)")
    ap.add_argument("--no-compile", action="store_true", help="skip GENIE(compiled=True) (its first step compiles: 80 s for resnet18 here with a cold inductor cache)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    ap.add_argument("--skip-step-only", action="store_true", help="skip the step()-only table")
    ap.add_argument("--skip-end-to-end", action="store_true", help="skip the end-to-end table")
    ap.add_argument(
        "--e2e-optimizers", nargs="+", default=list(END_TO_END_OPTIMIZERS), help="conf/optimizer names to time"
    )
    ap.add_argument("--e2e-repeats", type=int, default=5, help="timed end-to-end steps per optimizer")
    ap.add_argument("--e2e-warmup", type=int, default=1, help="untimed end-to-end steps first")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, repeats={args.repeats}, warmup={args.warmup}"
    )
    if not args.skip_step_only:
        print_step_only_table(args)
    if not args.skip_end_to_end:
        print_end_to_end_table(args)


def print_step_only_table(args) -> None:
    rows = []
    for name in args.models:
        rows += run_model(name, args)

    print()
    print("| model | params | optimizer | median ms/step | x Adam(foreach) | x Adam(fused) | state B/param | note |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        mine = [r for r in rows if r[0] == name]
        ref_foreach = next(r[3] for r in mine if r[2] == "Adam(foreach=True)")
        ref_fused = next(r[3] for r in mine if r[2] == "Adam(fused=True)")
        for _, n, label, ms, bpp, note in mine:
            print(
                f"| {name} | {n / 1e6:.1f}M | {label} | {ms:.1f} | {ms / ref_foreach:.2f} | "
                f"{ms / ref_fused:.2f} | {bpp:.1f} | {note} |"
            )


def time_end_to_end(name: str, args) -> tuple[float, float]:
    """Median ms of ``optimizer.step(closure)`` and backward passes per step for one config."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"optimizer={name}"])
    torch.manual_seed(args.seed)
    network = Classifier(instantiate(cfg.backbone, in_chans=1), num_classes=10).train()
    batch = cfg.dataset.batch_size * 5
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    optimizer = instantiate_or_explain(cfg.optimizer)(network.parameters())
    create_graph = differentiates_gradient(optimizer)
    passes = 0

    def closure() -> torch.Tensor:
        nonlocal passes
        passes += 1
        optimizer.zero_grad()
        loss = F.cross_entropy(network(x), y)
        loss.backward(create_graph=create_graph)
        return loss

    times = []
    for k in range(args.e2e_warmup + args.e2e_repeats):
        passes = 0
        start = time.perf_counter()
        optimizer.step(closure)
        if k >= args.e2e_warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, passes


def print_end_to_end_table(args) -> None:
    rows = []
    for name in args.e2e_optimizers:
        ms, passes = time_end_to_end(name, args)
        rows.append((name, ms, passes))
        print(f"  end to end: {name}: {ms:.0f} ms, {passes} passes", flush=True)
    print()
    print("| optimizer (config) | median ms/step | x adam | forward/backward passes per step |")
    print("|---|---|---|---|")
    reference = next((ms for name, ms, _ in rows if name == "adam"), float("nan"))
    for name, ms, passes in rows:
        print(f"| {name} | {ms:.0f} | {ms / reference:.2f} | {passes} |")


if __name__ == "__main__":
    main()
