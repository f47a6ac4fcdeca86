"""coredi_kernels: fused Triton ops for DiT/SiT training, usable on their own (needs only torch and triton)."""
__version__ = "0.1.0"
