"""Triton kernels and their pure-PyTorch twins (installed as zotune.kernels)."""
