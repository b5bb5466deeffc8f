r"""CIFAR-10 from a local copy in its standard Python (pickle) format; never downloads."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.utils import check_random_state

from diffem._validation import check_int
from diffem.datasets._common import _Unpackable, to_unit_range

__all__ = ["CIFAR10", "load_cifar10"]

CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
TRAIN_FILES = tuple(f"data_batch_{k}" for k in range(1, 6))
TEST_FILES = ("test_batch",)
FOLDER = "cifar-10-batches-py"
N_PIXELS = 3 * 32 * 32


@dataclass(repr=False)
class CIFAR10(_Unpackable):
    """CIFAR-10 images and labels.

    Unpacks as ``X, target``.

    Attributes
    ----------
    X : ndarray of shape ``(n_samples, 3072)``, float32
        Images flattened channel-first (``3*32*32``: the red plane, then green, then blue, each
        row-major), in :math:`[-1, 1]`.
    target : ndarray of shape ``(n_samples,)``, int64
        Labels in ``0..9``; their names are ``class_names[target]``.
    image_shape : tuple of int
        ``(3, 32, 32)``.
    class_names : tuple of str
        The ten class names.
    """

    X: np.ndarray
    target: np.ndarray
    image_shape: tuple[int, int, int] = (3, 32, 32)
    class_names: tuple[str, ...] = CLASSES

    _unpack = ("X", "target")

    def __repr__(self) -> str:
        return f"CIFAR10(n_samples={self.X.shape[0]}, image_shape={self.image_shape})"


def _read_batch(handle: io.BufferedIOBase, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = pickle.load(handle, encoding="bytes")
    except Exception as error:  # any unpickling failure means a malformed file
        raise ValueError(
            f"{name} is not a CIFAR-10 batch (cannot be unpickled): {error}"
        ) from error
    if not isinstance(batch, dict):
        raise ValueError(f"{name} is not a CIFAR-10 batch: expected a dict, got {type(batch)}.")
    keys = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in keys or "labels" not in keys:
        raise ValueError(
            f"{name} is not a CIFAR-10 batch: expected keys b'data' and b'labels', "
            f"got {sorted(map(str, batch))}."
        )
    data = np.asarray(keys["data"])
    labels = np.asarray(keys["labels"])
    if data.ndim != 2 or data.shape[1] != N_PIXELS or data.dtype != np.uint8:
        raise ValueError(
            f"{name}: b'data' must be a uint8 array of shape (N, {N_PIXELS}), "
            f"got {data.dtype} {data.shape}."
        )
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{name}: b'labels' must be {data.shape[0]} integers, got {labels.dtype} "
            f"{labels.shape}."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{name}: labels must be in 0..9.")
    return data, labels.astype(np.int64)


def _find_folder(path: Path, files: tuple[str, ...]) -> Path:
    for folder in (path, path / FOLDER):
        if all((folder / f).is_file() for f in files):
            return folder
    missing = [f for f in files if not (path / f).is_file()]
    raise FileNotFoundError(
        f"CIFAR-10 batches {missing} not found in {path} (nor in {path / FOLDER}). Download "
        "'cifar-10-python.tar.gz' from the CIFAR-10 page yourself and pass the archive or the "
        f"extracted '{FOLDER}' folder; diffem never downloads data."
    )


def load_cifar10(
    path: str | os.PathLike[str],
    *,
    train: bool = True,
    subset: int | None = None,
    random_state: int | np.random.RandomState | None = None,
) -> CIFAR10:
    r"""CIFAR-10 (Krizhevsky, 2009) read from a local copy in the standard Python format.

    The "CIFAR-10 python version" is a folder ``cifar-10-batches-py`` holding the training
    batches ``data_batch_1`` ... ``data_batch_5`` (10000 images each) and ``test_batch``,
    each a pickled dict with ``b"data"``, a uint8 array ``(N, 3072)`` of images flattened as
    ``3*32*32``, and ``b"labels"``, a list of ``N`` integers in ``0..9``. Pixels are scaled
    from :math:`[0, 255]` to :math:`[-1, 1]` by :math:`x = 2 v / 255 - 1`.

    Nothing is downloaded. The files are unpickled, so load only copies you trust.

    Parameters
    ----------
    path : path-like
        The ``cifar-10-batches-py`` folder, a folder containing it, or the
        ``cifar-10-python.tar.gz`` archive itself (read without extracting).
    train : bool, default True
        The five training batches (50000 images) if True, the test batch (10000) otherwise.
    subset : int, optional
        Keep only this many images: the first ones in file order if ``random_state`` is None,
        otherwise a random subset (without replacement, in random order).
    random_state : int, ``numpy.random.RandomState`` or None
        Seeds the random subset.

    Returns
    -------
    CIFAR10
        ``X`` ``(n, 3072)`` float32, ``target`` ``(n,)`` int64, ``image_shape = (3, 32, 32)``
        and ``class_names``; unpacks as ``X, target``.

    Raises
    ------
    FileNotFoundError
        If ``path`` or one of the needed batch files does not exist.
    ValueError
        If a batch file is not a CIFAR-10 batch (unpicklable, missing keys, wrong shapes or
        dtypes), or ``subset`` is invalid.

    References
    ----------
    .. [1] A. Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", technical
       report, University of Toronto, 2009.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"CIFAR-10 path {path} does not exist.")
    files = TRAIN_FILES if train else TEST_FILES
    batches = []
    if path.is_file():
        try:
            archive = tarfile.open(path, "r:*")
        except tarfile.TarError as error:
            raise ValueError(f"{path} is neither a folder nor a readable tar archive.") from error
        with archive:
            members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
            missing = [f for f in files if f not in members]
            if missing:
                raise FileNotFoundError(f"CIFAR-10 batches {missing} not found in {path}.")
            for f in files:
                handle = archive.extractfile(members[f])
                assert handle is not None
                batches.append(_read_batch(handle, f))
    else:
        folder = _find_folder(path, files)
        for f in files:
            with open(folder / f, "rb") as handle:
                batches.append(_read_batch(handle, str(folder / f)))
    data = np.concatenate([b[0] for b in batches])
    target = np.concatenate([b[1] for b in batches])
    if subset is not None:
        subset = check_int(subset, "subset", 1)
        if subset > len(data):
            raise ValueError(f"subset must be at most {len(data)}, got {subset}.")
        if random_state is None:
            index: Any = slice(0, subset)
        else:
            index = check_random_state(random_state).choice(len(data), subset, replace=False)
        data, target = data[index], target[index]
    return CIFAR10(X=to_unit_range(data, 255.0), target=target)
