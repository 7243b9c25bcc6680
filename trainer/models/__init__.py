"""Segmentation networks. Any ``nn.Module`` named by ``class_path`` in a recipe works too."""
from trainer.models.unet import UNet

__all__ = ["UNet"]
