r"""Small image data sets bundled with scikit-learn: corrupted digits and photograph patches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.utils import check_random_state

from diffem._validation import check_int, check_number
from diffem.datasets._common import _Unpackable, to_unit_range
from diffem.operators import Mask

__all__ = ["CorruptedImages", "ImagePatches", "load_digits_corrupted", "load_image_patches"]

#: ITU-R BT.601 luma weights, the usual RGB to gray conversion.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(repr=False)
class CorruptedImages(_Unpackable):
    """Clean images, their corrupted observations and the observation operator.

    Unpacks as ``X, Y, operator``.

    Attributes
    ----------
    X : ndarray of shape ``(n_samples, C*H*W)``, float32
        Clean images, flattened channel-first, in :math:`[-1, 1]`.
    Y : ndarray of shape ``(n_samples, C*H*W)``, float32
        Observations: ``X`` plus noise at the observed entries, ``fill_value`` (NaN by default)
        at the hidden ones.
    operator : diffem.operators.Mask
        Per-image masks (``True`` = observed) with the noise std.
    mask : ndarray of shape ``(n_samples, C*H*W)``, bool
        The masks as a NumPy array.
    target : ndarray of shape ``(n_samples,)``, int64
        Class labels.
    image_shape : tuple of int
        ``(C, H, W)``.
    """

    X: np.ndarray
    Y: np.ndarray
    operator: Mask
    mask: np.ndarray
    target: np.ndarray
    image_shape: tuple[int, int, int]

    _unpack = ("X", "Y", "operator")

    def __repr__(self) -> str:
        n = self.X.shape[0]
        missing = 1.0 - float(self.mask.mean())
        return (
            f"CorruptedImages(n_samples={n}, image_shape={self.image_shape}, missing={missing:.3f})"
        )


def load_digits_corrupted(
    missing: float = 0.75,
    noise_std: float = 0.05,
    random_state: int | np.random.RandomState | None = None,
    *,
    n_samples: int | None = None,
    fill_value: float = np.nan,
) -> CorruptedImages:
    r"""scikit-learn's bundled 8x8 handwritten digits, with random missing pixels and noise.

    The 1797 images of :func:`sklearn.datasets.load_digits` (integer gray levels 0-16) are
    scaled to :math:`[-1, 1]` by :math:`x = v / 8 - 1`. Each image :math:`i` gets its own mask
    :math:`m_i`: every pixel is hidden independently with probability ``missing``. The
    observed pixels are noisy,

    .. math::

        y_{ij} = x_{ij} + \sigma_y \epsilon_{ij} \quad \text{if } m_{ij} = 1, \qquad
        y_{ij} = \texttt{fill\_value} \quad \text{otherwise},

    with :math:`\epsilon_{ij} \sim \mathcal{N}(0, 1)` and :math:`\sigma_y =` ``noise_std``.
    Observations are not clipped to :math:`[-1, 1]`.

    The result plugs into the estimator either way: ``est.fit(data.Y, data.operator)``, or,
    with the default NaN fill, ``est.fit(data.Y)`` (``operator=None`` infers the mask from the
    NaNs; set the estimator's ``noise_std`` to the same value).

    Parameters
    ----------
    missing : float in [0, 1), default 0.75
        Probability that a pixel is hidden.
    noise_std : float, default 0.05
        :math:`\sigma_y`, on the :math:`[-1, 1]` scale.
    random_state : int, ``numpy.random.RandomState`` or None
        Seeds the subset, the masks and the noise.
    n_samples : int, optional
        If given, a random subset of that many images (at most 1797), in random order.
    fill_value : float, default NaN
        Value of the hidden entries of ``Y`` (e.g. 0.0). The operator ignores them.

    Returns
    -------
    CorruptedImages
        ``X``, ``Y`` ``(n, 64)`` float32, ``operator`` (:class:`~diffem.operators.Mask` with
        ``noise_std``), ``mask`` ``(n, 64)`` bool, ``target`` ``(n,)`` and ``image_shape =
        (1, 8, 8)``; unpacks as ``X, Y, operator``.

    Examples
    --------
    >>> from diffem.datasets import load_digits_corrupted
    >>> data = load_digits_corrupted(missing=0.5, random_state=0)
    >>> data.X.shape, data.image_shape
    ((1797, 64), (1, 8, 8))
    """
    from sklearn.datasets import load_digits

    missing = check_number(missing, "missing", 0.0, 1.0, high_open=True)
    noise_std = check_number(noise_std, "noise_std", 0.0)
    rng = check_random_state(random_state)
    digits = load_digits()
    X = to_unit_range(digits.data, 16.0)
    target = digits.target.astype(np.int64)
    if n_samples is not None:
        n_samples = check_int(n_samples, "n_samples", 1)
        if n_samples > len(X):
            raise ValueError(f"n_samples must be at most {len(X)}, got {n_samples}.")
        index = rng.choice(len(X), n_samples, replace=False)
        X, target = X[index], target[index]
    mask = rng.uniform(size=X.shape) >= missing
    noise = noise_std * rng.standard_normal(X.shape)
    Y = np.where(mask, X + noise, fill_value).astype(np.float32)
    operator = Mask(mask, noise_std=noise_std)
    return CorruptedImages(
        X=X, Y=Y, operator=operator, mask=mask, target=target, image_shape=(1, 8, 8)
    )


@dataclass(repr=False)
class ImagePatches(_Unpackable):
    """Patches of natural images.

    Unpacks as ``X, image_shape``.

    Attributes
    ----------
    X : ndarray of shape ``(n_patches, C*P*P)``, float32
        Patches flattened channel-first, in :math:`[-1, 1]`.
    image_shape : tuple of int
        ``(C, P, P)`` with ``C = 1`` (grayscale) or 3 (RGB).
    source : ndarray of shape ``(n_patches,)``, int64
        Index of the photograph each patch comes from.
    """

    X: np.ndarray
    image_shape: tuple[int, int, int]
    source: np.ndarray

    _unpack = ("X", "image_shape")

    def __repr__(self) -> str:
        return f"ImagePatches(n_patches={self.X.shape[0]}, image_shape={self.image_shape})"


def load_image_patches(
    patch_size: int = 8,
    n_patches: int = 10000,
    grayscale: bool = True,
    random_state: int | np.random.RandomState | None = None,
) -> ImagePatches:
    r"""Random square patches of scikit-learn's two bundled photographs.

    The photographs of :func:`sklearn.datasets.load_sample_images` (``china.jpg`` and
    ``flower.jpg``, 427x640 RGB, read from the local scikit-learn installation) form a small
    natural-image set. ``n_patches`` patches of ``patch_size x patch_size`` pixels are drawn
    uniformly at random (about half from each photograph), converted to gray if ``grayscale``
    (ITU-R BT.601 luma, :math:`0.299 R + 0.587 G + 0.114 B`), scaled from :math:`[0, 255]` to
    :math:`[-1, 1]` by :math:`x = 2 v / 255 - 1`, and flattened channel-first
    (``C*P*P``, the layout of :class:`~diffem.denoisers.UNetDenoiser`).

    Parameters
    ----------
    patch_size : int, default 8
        :math:`P`, at most 427.
    n_patches : int, default 10000
        Number of patches.
    grayscale : bool, default True
        One luma channel if True, three RGB channels otherwise.
    random_state : int, ``numpy.random.RandomState`` or None
        Seeds the patch positions.

    Returns
    -------
    ImagePatches
        ``X`` ``(n_patches, C*P*P)`` float32, ``image_shape = (C, P, P)`` and ``source``;
        unpacks as ``X, image_shape``.
    """
    from sklearn.datasets import load_sample_images

    patch_size = check_int(patch_size, "patch_size", 1)
    n_patches = check_int(n_patches, "n_patches", 1)
    rng = check_random_state(random_state)
    images = [np.asarray(image, dtype=np.float64) for image in load_sample_images().images]
    if grayscale:
        images = [image @ np.asarray(LUMA_WEIGHTS) for image in images]
        images = [image[..., None] for image in images]
    height = min(image.shape[0] for image in images)
    width = min(image.shape[1] for image in images)
    if patch_size > min(height, width):
        raise ValueError(f"patch_size must be at most {min(height, width)}, got {patch_size}.")
    source = rng.randint(len(images), size=n_patches)
    channels = images[0].shape[-1]
    X = np.empty((n_patches, channels, patch_size, patch_size), dtype=np.float64)
    for k, image in enumerate(images):
        (rows,) = np.nonzero(source == k)
        top = rng.randint(image.shape[0] - patch_size + 1, size=rows.size)
        left = rng.randint(image.shape[1] - patch_size + 1, size=rows.size)
        offsets = np.arange(patch_size)
        r = top[:, None, None] + offsets[None, :, None]
        c = left[:, None, None] + offsets[None, None, :]
        X[rows] = image[r, c].transpose(0, 3, 1, 2)  # (k, P, P, C) -> (k, C, P, P)
    X = to_unit_range(X.reshape(n_patches, -1), 255.0)
    return ImagePatches(
        X=X, image_shape=(channels, patch_size, patch_size), source=source.astype(np.int64)
    )
