"""mome_rec: Mixture-of-Masked-Experts (MoME) multi-task ranking on TorchRec."""

__version__ = "0.1.0"
