"""Kernels: Triton kernels and the Python side of the CUDA ones, each beside its PyTorch reference."""
