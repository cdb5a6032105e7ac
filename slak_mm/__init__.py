"""slak_mm: SLaK large-kernel ConvNets for OpenMMLab."""
__version__ = "0.1.0"
