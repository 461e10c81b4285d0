"""One command that checks the GPU side of genie-dg and measures it against DomainBed's table.

    python scripts/gpu_check.py                  # on one CUDA GPU: about 7 minutes (--budget-s)
    python scripts/gpu_check.py --tiny           # on the CPU in about a minute: the same steps, tiny

Four parts, in this order, each recorded even when another fails:

1. **ResNet-50 images/s**: timm ``resnet50`` (ImageNet's 1,000-class head) trained on synthetic
   224 px images (batch 128), one forward, cross-entropy, backward and optimizer step per batch,
   ``bf16`` autocast, channels-last, for Adam (fused on CUDA) and GENIE (compiled on CUDA), each
   from its ``genie_dg/conf/optimizer`` config. The first step (GENIE's compilation) is timed apart.
2. **One-GPU DDP**: ``python train.py trainer=ddp trainer.devices=1`` (NCCL; gloo with
   ``--tiny``) on the DomainBed RotatedMNIST experiment with GENIE, ``bf16-mixed``, a short run.
3. **DomainBed's protocol** (``experiment=domainbed_rotated_mnist``: all 70,000 digits, DomainBed's
   MNIST network, 64 digits per domain, 5,000 steps, validation every 100, training-domain
   validation), ERM with Adam (lr 1e-3) and with GENIE (its digit defaults, compiled on CUDA),
   ``trainer.precision=bf16-mixed``, one trial, target by target (rot0, rot75, rot15, rot60,
   rot30, rot45) for as long as the next pair is predicted to fit in ``--budget-s`` (from the
   slowest pair so far, or ``--pair-estimate-s`` before the first).
4. The report: ``<out>/gpu_check.json`` (everything, rewritten after every part, so a cut-short
   check keeps what it finished) and ``<out>/gpu_check.txt`` (a short table beside DomainBed's
   published ERM numbers). Exit status 1 when a part failed.

``--tiny`` keeps every step and shrinks it: a few training steps on the bundled 5,000 digits,
ResNet-50 at 32 px with a batch of 2 in float32, GENIE eager, the DDP run on gloo; ``tests/test_gpu_check.py``
runs it. Its accuracies mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "domainbed_rotated_mnist"
# Extreme angles first: the hardest targets, and the ones a short check should not miss.
TARGET_ORDER = ("rot0", "rot75", "rot15", "rot60", "rot30", "rot45")
OPTIMIZERS = ("adam", "genie")
# DomainBed's published ERM accuracies (%, its README and paper, training-domain validation,
# mean of 3 trials of a 20-draw random search).
DOMAINBED_ERM = {
    "rotated_mnist": {"rot0": 95.9, "rot15": 98.9, "rot30": 98.8, "rot45": 98.9, "rot60": 98.9, "rot75": 96.4},
    "colored_mnist": {"plus90": 71.7, "plus80": 72.9, "minus90": 10.0},
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="run every part on the CPU, shrunk to about a minute")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default logs/gpu_check/<UTC time>)")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="wall-clock budget of the whole check (default 420; tiny: none)"
    )
    parser.add_argument(
        "--pair-estimate-s",
        type=float,
        default=150.0,
        help="predicted seconds of the first Adam+GENIE pair of DomainBed runs, before one is measured",
    )
    parser.add_argument(
        "--targets", nargs="+", default=None, choices=TARGET_ORDER, help="DomainBed targets, in order (default: all)"
    )
    parser.add_argument(
        "--skip", nargs="+", default=(), choices=("resnet50", "ddp", "domainbed"), help="parts to leave out"
    )
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = float("inf") if args.tiny else 420.0
    if args.targets is None:
        args.targets = ["rot0"] if args.tiny else list(TARGET_ORDER)
    if args.out is None:
        args.out = ROOT / "logs" / "gpu_check" / datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    return args


class Check:
    """The shared state of one check: where it writes, what it found, and how much time is left."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tiny: bool = args.tiny
        self.cuda = torch.cuda.is_available() and not args.tiny
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        self.report: dict[str, Any] = {
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "tiny": self.tiny,
            "budget_s": None if args.budget_s == float("inf") else args.budget_s,
            "environment": environment(self.cuda),
            "resnet50": [],
            "ddp": None,
            "domainbed": [],
            "domainbed_published_erm": DOMAINBED_ERM["rotated_mnist"],
            "failed_parts": [],
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.report["wall_s"] = round(self.elapsed(), 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=2) + "\n")

    def part(self, name: str, body: Callable[[], None]) -> None:
        """Run one part; a failure is recorded (with its traceback in the JSON) and the check goes on."""
        if name in self.args.skip:
            return
        print(f"== {name} ({self.elapsed():.0f} s into the check)", flush=True)
        try:
            body()
        except Exception as err:  # noqa: BLE001 - a part's failure must not cost the other parts
            self.report["failed_parts"].append(
                {"part": name, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            )
            print(f"   {name} failed: {type(err).__name__}: {err}", flush=True)
        self.save()


def environment(cuda: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
        "cuda": torch.version.cuda if cuda else None,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def compose_train_config(overrides: Sequence[str], output_dir: Path):
    """The composed ``train.py`` config, with every path pointed into this check's folder."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from genie_dg.conf import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.data_dir = os.environ.get("DATA_DIR", str(ROOT / "data"))
        cfg.paths.log_dir = str(output_dir.parent)
        cfg.paths.output_dir = str(output_dir)
    return cfg


def tiny_run_overrides(steps: int = 4) -> list[str]:
    """A few steps on the bundled digits with one validation batch: seconds on a CPU."""
    return [
        "dataset.dataset.source=bundled",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "dataset.batch_size=4",
        "dataset.eval_batch_size=64",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
    ]


# ---------------------------------------------------------------------------------------------
# 1. ResNet-50 images/s on synthetic data
# ---------------------------------------------------------------------------------------------


def resnet50_throughput(check: Check) -> None:
    import timm
    import torch.nn.functional as F

    from genie_dg.pipeline import instantiate_or_explain

    device = torch.device("cuda" if check.cuda else "cpu")
    # bf16 autocast on a CPU without bf16 units is many times slower than float32: tiny runs float32.
    size, batch, warmup, timed = (32, 2, 0, 1) if check.tiny else (224, 128, 5, 20)
    for name in OPTIMIZERS:
        torch.manual_seed(0)
        model = timm.create_model("resnet50", num_classes=1000).to(device, memory_format=torch.channels_last)
        overrides = [f"optimizer={name}"]
        if name == "genie":
            overrides.append(f"optimizer.compiled={str(check.cuda).lower()}")
        elif check.cuda:
            overrides.append("+optimizer.fused=true")
        optimizer = instantiate_or_explain(compose_train_config(overrides, check.out / "resnet50").optimizer)(
            model.parameters()
        )
        images = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
        labels = torch.randint(0, 1000, (batch,), device=device)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=check.cuda):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def timed_steps(n: int) -> float:
            if check.cuda:
                torch.cuda.synchronize()
            begin = time.perf_counter()
            for _ in range(n):
                step()
            if check.cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - begin

        first = timed_steps(1)
        timed_steps(warmup)
        seconds = timed_steps(timed)
        row = {
            "optimizer": name,
            "compiled": name == "genie" and check.cuda,
            "image_size": size,
            "batch": batch,
            "precision": "bf16 autocast" if check.cuda else "float32",
            "first_step_s": round(first, 2),
            "timed_steps": timed,
            "images_per_s": round(batch * timed / seconds, 1),
        }
        if check.cuda:
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        check.report["resnet50"].append(row)
        print(f"   resnet50 {name}: {row['images_per_s']} images/s (first step {row['first_step_s']} s)", flush=True)
        del model, optimizer
        if check.cuda:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# 2. A one-GPU DDP run, as a user starts it
# ---------------------------------------------------------------------------------------------


def ddp_run(check: Check) -> None:
    run_dir = check.out / "ddp"
    overrides = [
        f"experiment={EXPERIMENT}",
        "optimizer=genie",
        "trainer=ddp",
        "trainer.devices=1",
        "trainer.precision=bf16-mixed",
        "logger=csv",
        "~callbacks.rich_progress_bar",
        f"hydra.run.dir={run_dir}",
    ]
    if check.tiny:
        overrides += ["trainer.accelerator=cpu", *tiny_run_overrides()]
    else:
        overrides += ["trainer.max_steps=300", "trainer.val_check_interval=300", "dataset.eval_batch_size=4096"]
    command = [sys.executable, str(ROOT / "train.py"), *overrides]
    begin = time.perf_counter()
    # A hung process group (NCCL) must not eat the whole check: 300 s is several times the expected run.
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900 if check.tiny else 300)
    wall = time.perf_counter() - begin
    (check.out / "ddp.log").write_text(finished.stdout + finished.stderr)
    result: dict[str, Any] = {
        "command": "python train.py " + " ".join(overrides),
        "returncode": finished.returncode,
        "wall_s": round(wall, 1),
    }
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        result.update(source_acc=summary["source_acc"], target_acc=summary["target_acc"])
    check.report["ddp"] = result
    if finished.returncode != 0:
        raise RuntimeError(f"train.py exited with {finished.returncode}; see {check.out / 'ddp.log'}")
    print(f"   ddp: {wall:.0f} s, target accuracy {result.get('target_acc')}", flush=True)


# ---------------------------------------------------------------------------------------------
# 3. DomainBed's protocol, Adam and GENIE, as many targets as fit
# ---------------------------------------------------------------------------------------------


def domainbed_run(check: Check, target: str, optimizer: str, compiled: bool) -> dict[str, Any]:
    from genie_dg.pipeline import train

    run_dir = check.out / "domainbed" / f"{target}_{optimizer}{'' if compiled or optimizer != 'genie' else '_eager'}"
    overrides = [
        f"experiment={EXPERIMENT}",
        f"dataset.test_domains=[{target}]",
        f"optimizer={optimizer}",
        "trainer.precision=bf16-mixed",
        "logger=csv",
        "~callbacks.rich_progress_bar",
        f"trainer={'gpu' if check.cuda else 'cpu'}",
    ]
    if optimizer == "genie":
        overrides.append(f"optimizer.compiled={str(compiled).lower()}")
    overrides += tiny_run_overrides() if check.tiny else ["dataset.eval_batch_size=4096"]
    begin = time.perf_counter()
    summary = train(compose_train_config(overrides, run_dir))
    return {
        "target": target,
        "optimizer": optimizer,
        "compiled": compiled if optimizer == "genie" else None,
        "steps": 4 if check.tiny else 5000,
        "source_acc": summary["source_acc"],
        "target_acc": summary["target_acc"],
        "wall_s": round(time.perf_counter() - begin, 1),
        "overrides": overrides,
    }


def domainbed_protocol(check: Check) -> None:
    pair_seconds: list[float] = []
    for target in check.args.targets:
        left = check.args.budget_s - check.elapsed()
        # The slowest pair so far predicts the next (the first GENIE run also compiles, so this errs long).
        predicted = max(pair_seconds, default=check.args.pair_estimate_s)
        if predicted > left:
            check.report["domainbed_stopped"] = (
                f"before {target}: {left:.0f} s left, a pair is predicted to take {predicted:.0f} s"
            )
            print(f"   stopping: {check.report['domainbed_stopped']}", flush=True)
            break
        begin = time.perf_counter()
        for optimizer in OPTIMIZERS:
            compiled = optimizer == "genie" and check.cuda
            try:
                row = domainbed_run(check, target, optimizer, compiled)
            except Exception as err:  # noqa: BLE001 - recorded; GENIE retries eager so the pair still compares
                check.report["failed_parts"].append(
                    {
                        "part": f"domainbed {target} {optimizer} compiled={compiled}",
                        "error": f"{type(err).__name__}: {err}",
                        "traceback": traceback.format_exc(),
                    }
                )
                if not compiled:
                    check.save()
                    continue
                row = domainbed_run(check, target, optimizer, compiled=False)
            check.report["domainbed"].append(row)
            check.save()
            print(
                f"   {target} {optimizer}: target {100 * row['target_acc']:.1f}% in {row['wall_s']:.0f} s", flush=True
            )
        pair_seconds.append(time.perf_counter() - begin)


# ---------------------------------------------------------------------------------------------
# 4. The text table
# ---------------------------------------------------------------------------------------------


def text_report(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"genie-dg GPU check{' (--tiny: accuracies meaningless)' if report['tiny'] else ''}: {env['device']}, "
        f"torch {env['torch']}, commit {env['git_commit']}, {report['wall_s']:.0f} s",
        "",
        "DomainBed RotatedMNIST, ERM, training-domain validation, target accuracy (%):",
        f"{'target':<8}{'DomainBed ERM':>15}{'Adam (ours)':>14}{'GENIE (ours)':>15}{'Adam s':>9}{'GENIE s':>9}",
    ]
    runs = {(row["target"], row["optimizer"]): row for row in report["domainbed"]}

    def cell(row: dict[str, Any] | None, key: str, width: int, scale: float) -> str:
        return f"{scale * row[key]:>{width}.1f}" if row else f"{'-':>{width}}"

    for target in TARGET_ORDER:
        adam, genie = runs.get((target, "adam")), runs.get((target, "genie"))
        if adam is None and genie is None:
            continue
        lines.append(
            f"{target:<8}{report['domainbed_published_erm'][target]:>15.1f}"
            + cell(adam, "target_acc", 14, 100)
            + cell(genie, "target_acc", 15, 100)
            + cell(adam, "wall_s", 9, 1)
            + cell(genie, "wall_s", 9, 1)
        )
    if report.get("domainbed_stopped"):
        lines.append(f"(stopped {report['domainbed_stopped']})")
    lines += ["", "ResNet-50 training on synthetic images:"]
    for row in report["resnet50"]:
        lines.append(
            f"  {row['optimizer']:<6}{' compiled' if row['compiled'] else '':<10}{row['image_size']} px, batch "
            f"{row['batch']}, {row['precision']}: {row['images_per_s']:.1f} images/s (first step {row['first_step_s']} s)"
        )
    ddp = report["ddp"]
    if ddp is not None:
        accuracy = f", target accuracy {100 * ddp['target_acc']:.1f}%" if "target_acc" in ddp else ""
        lines += [
            "",
            f"One-device DDP run (GENIE, bf16-mixed): exit {ddp['returncode']}, {ddp['wall_s']:.0f} s{accuracy}",
        ]
    for failure in report["failed_parts"]:
        lines.append(f"FAILED {failure['part']}: {failure['error']}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    check = Check(parse_args(argv))
    print(f"gpu check: {check.report['environment']['device']} -> {check.out}", flush=True)
    if not check.cuda and not check.tiny:
        print("error: no CUDA device is visible; run with --tiny to check the CPU path", file=sys.stderr)
        return 2
    check.part("resnet50", lambda: resnet50_throughput(check))
    check.part("ddp", lambda: ddp_run(check))
    check.part("domainbed", lambda: domainbed_protocol(check))
    check.save()
    table = text_report(check.report)
    (check.out / "gpu_check.txt").write_text(table)
    print(table, end="")
    print(f"wrote {check.out / 'gpu_check.json'} and {check.out / 'gpu_check.txt'}")
    return 1 if check.report["failed_parts"] else 0


if __name__ == "__main__":
    sys.exit(main())
