"""regionmed-fast: region-aware medical CLIP (RegionMed-CLIP) with fused kernels.

Public ops live in :mod:`regionmed_fast.ops`, modules in :mod:`regionmed_fast.nn`.
"""
__version__ = "0.1.0"
