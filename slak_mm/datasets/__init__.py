"""Built-in synthetic data in real ADE20K / COCO formats (read by mmseg's ADE20KDataset and mmdet's CocoDataset)."""
from .synthetic import DEMO_CLASSES, SEG_CLASSES, make_ade20k, make_coco

__all__ = ['DEMO_CLASSES', 'SEG_CLASSES', 'make_ade20k', 'make_coco']
