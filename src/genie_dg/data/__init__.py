"""Multi-domain datasets and the DataModule that splits them for domain generalization."""

from genie_dg.data.datamodule import BalancedDomainBatchSampler, EvalSet, MultiDomainDataModule
from genie_dg.data.image_folder import domain_image_folder
from genie_dg.data.mnist import colored_mnist, rotated_mnist
from genie_dg.data.multidomain import DomainSubset, MultiDomainDataset

__all__ = [
    "BalancedDomainBatchSampler",
    "DomainSubset",
    "EvalSet",
    "MultiDomainDataModule",
    "MultiDomainDataset",
    "colored_mnist",
    "domain_image_folder",
    "rotated_mnist",
]
