"""Time ``tanh`` in inductor's CPU code against eager ``torch.tanh``: why compiled GENIE computes
``lam = tanh(...)`` with :func:`genie_dg.optim.genie.tanh_nonnegative` (Cephes' polynomial and
``exp``) instead of ``torch.tanh``.

Not a test. Each row writes ``f(x)`` into a preallocated tensor of ``--numel`` float32 values
drawn from [0, 10] (the range of GENIE's ``1 / var`` after its cap) and reports the median
milliseconds per call and the ratio to eager ``torch.tanh`` measured in the same run. Compiled
rows compile once, untimed (warm-up calls).

Example::

    python benchmarks/compiled_tanh.py
    python benchmarks/compiled_tanh.py --numel 11689512 --repeats 50 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from genie_dg.optim.genie.formulas import tanh_nonnegative


def _into(f):
    def write(x: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(f(x))

    return write


def rows() -> list[tuple[str, object]]:
    return [
        ("eager torch.tanh", lambda x, out: torch.tanh(x, out=out)),
        ("compiled torch.tanh (inductor: Sleef)", torch.compile(_into(torch.tanh))),
        ("compiled tanh_nonnegative (Cephes)", torch.compile(_into(tanh_nonnegative))),
        ("compiled torch.exp", torch.compile(_into(torch.exp))),
        ("eager torch.exp", lambda x, out: torch.exp(x, out=out)),
    ]


def median_ms(f, x: torch.Tensor, out: torch.Tensor, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        f(x, out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(x, out)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=11_689_512, help="elements (default: resnet18's parameters)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (includes compilation)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(args.numel, generator=generator) * 10
    out = torch.empty_like(x)
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {args.numel:,} float32 values, median of {args.repeats}"
    )
    print("| function | median ms | x eager torch.tanh |")
    print("|---|---|---|")
    baseline = None
    for name, f in rows():
        ms = median_ms(f, x, out, args.repeats, args.warmup)
        baseline = baseline or ms
        print(f"| {name} | {ms:.2f} | {ms / baseline:.2f} |")


if __name__ == "__main__":
    main()
