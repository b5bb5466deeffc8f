r"""Data sets for experiments and tests, all generated or bundled locally (no downloads).

- :func:`make_manifold` — the low-dimensional manifold experiment of Rozet et al. (2024):
  latents on a random smooth curve in :math:`\mathbb{R}^5`, each seen through its own random
  :math:`2 \times 5` projection.
- :func:`make_range_sensors` — sources from a clustered prior located by three noisy range
  sensors each (a nonlinear operator), the running example of Akyildiz's lecture notes.
- :func:`load_digits_corrupted` — scikit-learn's bundled 8x8 digits with random missing
  pixels and noise.
- :func:`load_image_patches` — patches of scikit-learn's bundled sample photographs.
- :func:`load_cifar10` — CIFAR-10 read from a local copy in its standard Python format.

Loaders return small dataclasses whose fields are documented on each class; they also unpack
like tuples (``X, Y, operator = make_manifold()``).
"""

from diffem.datasets.cifar import CIFAR10, load_cifar10
from diffem.datasets.images import (
    CorruptedImages,
    ImagePatches,
    load_digits_corrupted,
    load_image_patches,
)
from diffem.datasets.manifold import ManifoldData, make_manifold
from diffem.datasets.range_sensors import RangeSensorData, make_range_sensors

__all__ = [
    "CIFAR10",
    "CorruptedImages",
    "ImagePatches",
    "ManifoldData",
    "RangeSensorData",
    "load_cifar10",
    "load_digits_corrupted",
    "load_image_patches",
    "make_manifold",
    "make_range_sensors",
]
