"""The network: a timm image backbone (``backbones``), a head that may fuse patient metadata
(``heads``) and the LightningModule joining them (``module``)."""
from cxr_lightning.models.backbones import BACKBONE_NAMES, Backbone, create_backbone
from cxr_lightning.models.heads import HEADS, create_head

__all__ = ["BACKBONE_NAMES", "HEADS", "Backbone", "create_backbone", "create_head"]
