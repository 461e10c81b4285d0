"""Time the compiled GENIE mask's hash in inductor's CPU code: the 64-bit mixer GENIE used before
(one round of a 32-bit xor-shift-multiply mixer computed in int64) against the int32 Feistel hash
it uses now (:func:`genie_dg.optim.genie.compiled.hash_bits`), and no mask at all.

Not a test. Each row is a compiled ``out = where(hash(j, key) >= threshold, x * 1.5, 0)`` over
``--numel`` float32 values; median CPU milliseconds per call (``time.process_time``, one
thread, so the number does not include time spent waiting for a core on a shared machine),
timed interleaved. Run it once per instruction set: ``ATEN_CPU_CAPABILITY`` selects the one
inductor generates code for.

Example::

    ATEN_CPU_CAPABILITY=avx512 python benchmarks/compiled_mask_hash.py
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/compiled_mask_hash.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from genie_dg.optim.genie.compiled import hash_bits

_M32 = 0xFFFFFFFF
_MIX = (0x7FEB352D, 0x1B873593)


def int64_hash_bits(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The previous hash: ``(index xor key_high) + key_low`` through one xor-shift-multiply round
    in int64 (multipliers below 2**31, so no product overflows), top 24 of 32 bits."""
    x = (((index & _M32) ^ ((key >> 32) & _M32)) + (key & _M32)) & _M32
    x = x ^ (x >> 16)
    x = (x * _MIX[0]) & _M32
    x = x ^ (x >> 15)
    x = (x * _MIX[1]) & _M32
    return (x ^ (x >> 16)) >> 8


def masked_int64(x, out, key, threshold):
    index = torch.arange(x.numel(), dtype=torch.int64)
    out.copy_(torch.where(int64_hash_bits(index, key) >= threshold, x * 1.5, 0.0))


def masked_int32(x, out, key, threshold):
    index = torch.arange(x.numel(), dtype=torch.int32)
    out.copy_(torch.where(hash_bits(index, key) >= threshold, x * 1.5, 0.0))


def unmasked(x, out, key, threshold):
    out.copy_(x * 1.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=1 << 22)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, out = torch.randn(args.numel), torch.empty(args.numel)
    key = torch.tensor(123456789123)
    thresholds = {torch.int64: torch.tensor(6710886), torch.int32: torch.tensor(6710886, dtype=torch.int32)}
    rows = {
        "int64 xor-shift-multiply (before)": (torch.compile(masked_int64), thresholds[torch.int64]),
        "int32 Feistel (now)": (torch.compile(masked_int32), thresholds[torch.int32]),
        "no mask": (torch.compile(unmasked), thresholds[torch.int64]),
    }
    times = {name: [] for name in rows}
    for k in range(args.repeats + 3):
        for name, (f, threshold) in rows.items():
            start = time.process_time()
            f(x, out, key, threshold)
            if k >= 3:  # the first calls compile
                times[name].append(time.process_time() - start)
    print(f"# torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.numel:,} values, one thread")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
