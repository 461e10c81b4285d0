"""Time optimizer steps: GENIE's ``step()`` alone on timm ResNets, and every configured
optimizer end to end on the default experiment's network.

Not a test. Two tables:

1. ``step()`` alone: GENIE's implementations against torch's Adam/AdamW/SGD and against the
   authors' per-tensor loop (:class:`AuthorsLoopGENIE`), all in one run. Gradients are random
   (seeded) and alternate between two sets, so the moving averages see a non-zero variance as in
   training. Timing is interleaved: every round times one step of every optimizer in turn, so a
   change of load on a shared machine hits all rows alike, and the ratios stay comparable.
   Columns: median milliseconds per step, ratio to Adam(foreach) and to Adam(fused), how many
   times faster than the authors' loop, and optimizer-state bytes per parameter (sum of
   ``nbytes`` of the tensors in ``optimizer.state`` divided by the number of parameter
   elements). ``--device cuda`` times on a GPU (synchronising around each step).
2. End to end: ``optimizer.step(closure)`` where the closure zeroes the gradients and runs the
   forward and backward pass, as Lightning's automatic optimization does, so the extra passes
   of SAM, GAM and FAD and the Hessian-vector products of AdaHessian and GAM are included.
   Each optimizer is built from its Hydra config (``genie_dg/conf/optimizer/<name>.yaml`` with the
   default dataset's tuned values) over the default experiment's network (the backbone
   config, one input channel, 10 classes) on one batch of the default experiment's size
   (batch_size per domain x 5 training domains) of random 28x28 images: timings do not
   depend on pixel values. Columns: median milliseconds per step, ratio to Adam, the part of
   the step outside the closure (the update itself, for one-pass optimizers), backward passes.

Example::

    python benchmarks/optimizer_step.py                      # both tables, GENIE(compiled=True) included
    python benchmarks/optimizer_step.py --models resnet18 resnet50 --repeats 10
    python benchmarks/optimizer_step.py --skip-end-to-end --models resnet50 --device cuda
    python benchmarks/optimizer_step.py --skip-step-only --e2e-optimizers adam sam fad
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
import traceback

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from genie_dg.conf import CONFIG_DIR
from genie_dg.models import Classifier
from genie_dg.optim import GENIE, differentiates_gradient
from genie_dg.pipeline import instantiate_or_explain

END_TO_END_OPTIMIZERS = ("adam", "adamw", "sgd", "yogi", "adabelief", "adahessian", "sam", "gam", "fad", "genie")
AUTHORS = "authors' per-tensor loop"


def build_params(name: str, seed: int, grad_sets: int, device: str):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    grads = [[(torch.randn(p.shape, generator=gen) * 1e-2).to(device) for p in params] for _ in range(grad_sets)]
    return params, grads


def state_bytes_per_param(opt: torch.optim.Optimizer, params) -> float:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total / sum(p.numel() for p in params)


class AuthorsLoopGENIE(torch.optim.Optimizer):
    """Not the project's optimizer: GENIE's reference update (``docs/genie.md``) written as the
    authors' code (paper appendix D.3) is written, as the speed baseline of the issue's targets:
    a Python loop over tensors, out-of-place tensor expressions, and a normal and a uniform draw
    from the global generator for every tensor at every step. Its t = 1 guard is ours."""

    def __init__(self, params, lr=0.015, beta=0.95, p=0.4, eps=1e-8):
        super().__init__(params, dict(lr=lr, beta=beta, p=p, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, beta, p, eps = group["lr"], group["beta"], group["p"], group["eps"]
            for param in group["params"]:
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(param)
                    state["s"] = torch.zeros_like(param)
                state["step"] += 1
                t, g = state["step"], param.grad
                state["m"] = m = beta * state["m"] + (1 - beta) * g
                state["s"] = s = beta * state["s"] + (1 - beta) * g * g
                c = 1 - beta**t
                rho = (1 - beta) * (1 + beta**t) / ((1 + beta) * c)
                m_hat, s_hat = m / c, s / c
                var = (s_hat - m_hat**2) / (1 - rho) if t > 1 else torch.full_like(m, eps)
                var = torch.where((var > 0) & torch.isfinite(var), var, eps)
                lam = torch.tanh(torch.clamp(1 / var, max=10))
                var_mean = rho * var
                var_mean = torch.where(var_mean > 0, var_mean, eps)
                psi = (m_hat**2 + eps) / (m_hat**2 + eps + var_mean)
                d = m_hat * psi * lam
                scale = (lam * m_hat.abs() * psi).sum() / lam.sum().clamp(min=1e-30)
                noise = (1 - lam) * scale * torch.randn_like(param)
                keep = (torch.rand_like(param) > p).to(param.dtype) / (1 - p)
                param.sub_(lr * (d + noise) * keep)


class MaskDraw:
    """Not an optimizer: the eager GENIE mask's uniform draw alone, one per parameter tensor."""

    def __init__(self, params):
        self.params = params
        self.generator = torch.Generator(device=params[0].device).manual_seed(0)
        self.state = {}

    def step(self):
        for q in self.params:
            torch.rand(q.shape, generator=self.generator, device=q.device)


def configs(compile_genie: bool, device: str):
    fast = "foreach" if device != "cpu" else "single-tensor"
    yield f"GENIE (foreach=None: {fast}, all on)", lambda ps: GENIE(ps, seed=0)
    if device == "cpu":
        yield "GENIE (foreach=True, all on)", lambda ps: GENIE(ps, seed=0, foreach=True)
    else:
        yield "GENIE (foreach=False, all on)", lambda ps: GENIE(ps, seed=0, foreach=False)
    if compile_genie:
        yield "GENIE (compiled=True, all on)", lambda ps: GENIE(ps, seed=0, compiled=True)
    yield "GENIE (noise+mask off)", lambda ps: GENIE(ps, seed=0, noise=False, mask=False)
    yield AUTHORS, AuthorsLoopGENIE
    yield "Adam(foreach=True)", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)
    yield "Adam(fused=True)", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)
    yield "AdamW(foreach=True)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)
    yield "SGD(momentum=0.9, foreach=True)", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True)
    yield "torch.rand per tensor (eager mask draw only)", MaskDraw


CLOCK = time.perf_counter


def _timed_step(opt, params, grads, device: str) -> float:
    for p, g in zip(params, grads):
        p.grad = g
    if device != "cpu":
        torch.cuda.synchronize()
    start = CLOCK()
    opt.step()
    if device != "cpu":
        torch.cuda.synchronize()
    return CLOCK() - start


def run_model(name: str, args) -> list[tuple]:
    """Interleaved timing of every config on one model's parameters (shared: GENIE's cost does
    not depend on the parameter values, each optimizer keeps its own state)."""
    params, grads = build_params(name, args.seed, grad_sets=2, device=args.device)
    n = sum(p.numel() for p in params)
    live, rows = [], {}
    for label, make in configs(not args.no_compile, args.device):
        try:
            opt = make(params)
            start = time.perf_counter()
            for k in range(args.warmup):
                _timed_step(opt, params, grads[k % 2], args.device)
            note = f"warm-up incl. compile {time.perf_counter() - start:.1f} s" if "compiled" in label else ""
            live.append((label, opt, note, []))
        except Exception as exc:  # report and continue (e.g. no C++ compiler for inductor)
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            rows[label] = (float("nan"), float("nan"), "FAILED " + msg[:200])
            if args.verbose:
                traceback.print_exc()
    for k in range(args.repeats):
        for _, opt, _, times in live:
            times.append(_timed_step(opt, params, grads[k % 2], args.device))
    for label, opt, note, times in live:
        rows[label] = (statistics.median(times) * 1e3, state_bytes_per_param(opt, params), note)
        print(f"  {name}: {label}: {rows[label][0]:.1f} ms {note}", flush=True)
    del live
    gc.collect()
    order = [label for label, _ in configs(not args.no_compile, args.device)]
    return [(name, n, label, *rows[label]) for label in order if label in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18"], help="timm model names (e.g. resnet18 resnet50)")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per optimizer")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (includes compilation)")
    ap.add_argument(
        "--no-compile",
        action="store_true",
        help="skip GENIE(compiled=True) (its first step compiles: 80 s for resnet18 here with a cold inductor cache)",
    )
    ap.add_argument("--device", default="cpu", help="device of the step-only table's parameters (cpu, cuda)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time steps in CPU seconds of this process (time.process_time) instead of wall time: on a "
        "shared machine it leaves out the time spent waiting for a core; with --threads 1 it equals wall "
        "time on an idle machine",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    ap.add_argument("--skip-step-only", action="store_true", help="skip the step()-only table")
    ap.add_argument("--skip-end-to-end", action="store_true", help="skip the end-to-end table")
    ap.add_argument(
        "--e2e-optimizers", nargs="+", default=list(END_TO_END_OPTIMIZERS), help="genie_dg/conf/optimizer names to time"
    )
    ap.add_argument("--e2e-repeats", type=int, default=5, help="timed end-to-end steps per optimizer")
    ap.add_argument("--e2e-warmup", type=int, default=1, help="untimed end-to-end steps first")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time

    device = torch.cuda.get_device_name() if args.device != "cpu" else platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, {device}, "
        f"{torch.get_num_threads()} threads, repeats={args.repeats}, warmup={args.warmup}, "
        f"{'CPU' if args.cpu_time else 'wall'} time"
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
    print(
        "| model | params | optimizer | median ms/step | x Adam(foreach) | x Adam(fused) "
        "| x faster than authors' loop | state B/param | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        mine = {r[2]: r for r in rows if r[0] == name}
        ref_foreach, ref_fused = mine["Adam(foreach=True)"][3], mine["Adam(fused=True)"][3]
        authors = mine[AUTHORS][3] if AUTHORS in mine else float("nan")
        for _, n, label, ms, bpp, note in mine.values():
            print(
                f"| {name} | {n / 1e6:.1f}M | {label} | {ms:.1f} | {ms / ref_foreach:.2f} | "
                f"{ms / ref_fused:.2f} | {authors / ms:.2f} | {bpp:.1f} | {note} |"
            )


def time_end_to_end(name: str, args) -> tuple[float, float, float]:
    """Median ms of ``optimizer.step(closure)``, median ms of it spent outside the closure
    (forward and backward passes excluded), and backward passes per step, for one config."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"optimizer={name}"])
    torch.manual_seed(args.seed)
    network = Classifier(instantiate_or_explain(cfg.backbone, in_chans=1), num_classes=10).train()
    batch = cfg.dataset.batch_size * 5
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    optimizer = instantiate_or_explain(cfg.optimizer)(network.parameters())
    create_graph = differentiates_gradient(optimizer)
    passes, in_closure = 0, 0.0

    def closure() -> torch.Tensor:
        nonlocal passes, in_closure
        passes += 1
        start = CLOCK()
        optimizer.zero_grad()
        loss = F.cross_entropy(network(x), y)
        loss.backward(create_graph=create_graph)
        in_closure += CLOCK() - start
        return loss

    times, outside = [], []
    for k in range(args.e2e_warmup + args.e2e_repeats):
        passes, in_closure = 0, 0.0
        start = CLOCK()
        optimizer.step(closure)
        if k >= args.e2e_warmup:
            times.append(CLOCK() - start)
            outside.append(times[-1] - in_closure)
    return statistics.median(times) * 1e3, statistics.median(outside) * 1e3, passes


def print_end_to_end_table(args) -> None:
    rows = []
    for name in args.e2e_optimizers:
        ms, update_ms, passes = time_end_to_end(name, args)
        rows.append((name, ms, update_ms, passes))
        print(
            f"  end to end: {name}: {ms:.0f} ms ({update_ms:.0f} ms outside the closure), {passes} passes", flush=True
        )
    print()
    print(
        "| optimizer (config) | median ms/step | x adam | ms outside forward/backward | share of the step | passes per step |"
    )
    print("|---|---|---|---|---|---|")
    reference = next((ms for name, ms, _, _ in rows if name == "adam"), float("nan"))
    for name, ms, update_ms, passes in rows:
        print(f"| {name} | {ms:.0f} | {ms / reference:.2f} | {update_ms:.1f} | {update_ms / ms:.0%} | {passes} |")


if __name__ == "__main__":
    main()
