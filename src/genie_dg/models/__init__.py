"""Backbones (timm, DomainBed's MNIST network) and the classifier network."""

from genie_dg.models.backbone import Classifier, create_backbone
from genie_dg.models.mnist_cnn import MnistCNN

__all__ = ["Classifier", "MnistCNN", "create_backbone"]
