"""Backbones (timm) and the classifier network."""

from genie_dg.models.backbone import Classifier, create_backbone

__all__ = ["Classifier", "create_backbone"]
