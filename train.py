"""Train a domain-generalization model: ``python train.py dataset=pacs optimizer=genie``."""

import signal
import sys
from pathlib import Path

import hydra
from dotenv import load_dotenv
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from genie_dg.conf import CONFIG_DIR
from genie_dg.errors import UserInputError
from genie_dg.pipeline import train
from genie_dg.resolvers import register_resolvers
from genie_dg.run_dir import discard_failed_start

# Secrets (WANDB_API_KEY) reach wandb through the environment, never through the config.
load_dotenv(override=False)
# Before Hydra composes: the configs use ${run_key:}, ${optuna_space:} and ${cwd:}.
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        # What a sweeper (hparams_search=optuna) optimises: training-domain validation accuracy,
        # never the target domain's.
        summary = train(cfg)
        # None: another process is training this run (a sweep started beside this one).
        return None if summary is None else summary["source_acc"]
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        # A start that failed before training leaves no run directory behind (nor does a
        # multirun job's: the sweep then stops at that job with this status, as it always has).
        runtime = HydraConfig.get().runtime
        discard_failed_start(Path(runtime.output_dir), HydraConfig.get().job.name)
        raise SystemExit(2) from None
    except SIGTERMException:
        # Lightning's SIGTERM exit is a bare SystemExit (status 0); a scheduler must see a run
        # cut short (the shell's 128 + signal), not a finished one.
        raise SystemExit(128 + signal.SIGTERM) from None


if __name__ == "__main__":
    main()
