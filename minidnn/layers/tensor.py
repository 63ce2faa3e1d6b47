"""Layers that reshape, rescale or normalise a tensor (the catalogue's softmax_all,
l2normalize, dropout, multiply, extract, reorg, upsample, resize_to)."""

__all__ = []
