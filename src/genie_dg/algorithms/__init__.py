"""Pluggable DG methods; each is one file here plus one ``conf/algorithm/<name>.yaml``."""

from genie_dg.algorithms.base import AlgorithmOutput, DGAlgorithm, DomainBatch
from genie_dg.algorithms.coral import CORAL, coral_distance
from genie_dg.algorithms.erm import ERM

__all__ = ["CORAL", "ERM", "AlgorithmOutput", "DGAlgorithm", "DomainBatch", "coral_distance"]
