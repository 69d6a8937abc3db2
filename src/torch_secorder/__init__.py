"""torch-secorder: second-order quantities of PyTorch models on torch.func."""
__version__ = "0.1.0"
