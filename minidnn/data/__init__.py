"""Data that ships with minidnn (see README.md in this folder for its source and licence)."""
import os

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))


def load_digits():
    """The 8x8 handwritten digits (UCI, CC BY 4.0): images float32 (1797, 1, 8, 8) scaled to
    [0, 1], labels int64 (1797,)."""
    with np.load(os.path.join(_HERE, "digits.npz"), allow_pickle=False) as z:
        images, labels = z["images"], z["labels"]
    return (images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8), labels.astype(np.int64)
