"""A test-only callback: every DDP rank writes a digest of its parameters and optimizer state."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lightning import Callback


class ReplicaDigest(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, pl_module) -> None:
        digest = hashlib.sha256()
        # The algorithm's buffers too (GroupDRO's q, ...): replicas must agree on them as well.
        tensors = [*pl_module.network.state_dict().values(), *pl_module.algorithm.buffers()]
        for tensor in tensors:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        optimizer_state = trainer.optimizers[0].state_dict()
        for key in sorted(optimizer_state.get("generator_states", {})):
            digest.update(optimizer_state["generator_states"][key].numpy().tobytes())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.txt").write_text(
            f"{digest.hexdigest()} {trainer.global_step} {trainer.world_size}\n"
        )
