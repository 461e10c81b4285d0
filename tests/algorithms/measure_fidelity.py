"""Prints the numbers docs/fidelity.md quotes, on the tiny examples of test_fidelity.py.

- IRM: the largest weight difference after 4 Adam steps between DomainBed's ``IRM.update``
  (Adam rebuilt at the anneal step) and this project's IRM, with the reset switch on (the
  default) and off.
- MIRO: the penalty at identical weights with the oracle normalised as the trained featurizer
  (the default) and on its stored statistics (the behaviour before), with and without
  ``backbone.freeze_bn``.

Run: ``.venv/bin/python tests/algorithms/measure_fidelity.py`` (a script, not a test).
"""

from __future__ import annotations

import math

# Run as a script, Python puts this file's folder first on sys.path: test_fidelity is beside it.
import test_fidelity as tiny

from genie_dg.algorithms.irm import IRM
from genie_dg.algorithms.miro import MIRO


def irm_reset() -> None:
    reference = tiny._domainbed_irm_trajectory(100.0, anneal_iters=2, steps=4)
    for reset in (True, False):
        irm = IRM(2, 2, 3, irm_lambda=100.0, irm_penalty_anneal_iters=2, reset_optimizer_on_anneal=reset)
        difference = (tiny._project_trajectory(irm, steps=4) - reference).abs().max().item()
        print(f"IRM, 4 Adam steps, reset_optimizer_on_anneal={reset}: max |w - w_DomainBed| = {difference:.2e}")


def miro_oracle() -> None:
    minimum = 5 * math.log(0.1) / 2
    for freeze_bn in (False, True):
        algorithm, network, _ = tiny._miro(freeze_bn)
        matched = algorithm.training_loss(network, tiny._image_batches()).metrics["miro_penalty"].item()
        # The behaviour before: the oracle always on its stored statistics.
        algorithm._oracle_features = lambda x, featurizer, a=algorithm: MIRO._oracle_features(a, x, None)
        stored = algorithm.training_loss(network, tiny._image_batches()).metrics["miro_penalty"].item()
        print(
            f"MIRO, identical weights, backbone.freeze_bn={freeze_bn}: penalty {matched:.3f} "
            f"(oracle on stored statistics: {stored:.3f}; minimum 5 ln(0.1) / 2 = {minimum:.3f})"
        )


if __name__ == "__main__":
    irm_reset()
    miro_oracle()
