"""Triton kernels of regionmed-fast, installed as ``regionmed_fast.kernels``."""
