"""Data sets for tests, benchmarks and examples; nothing is ever downloaded.

* `load_digits()`: scikit-learn's bundled 8x8 digits (1,797 images), the embedded default.
* `load_mnist_t10k()`: the official MNIST test split read from a local folder (by default
  `../shared/data/mnist-t10k` next to the project), 8,000 images to train and 2,000 to evaluate.

Images come as float32 NHWC arrays scaled to [0, 1], labels as int32.
"""

from __future__ import annotations

import gzip
import os
import pathlib
from typing import NamedTuple

import numpy as np

__all__ = ["Dataset", "MNIST_ENV_VAR", "batches", "find_mnist_dir", "load_digits", "load_mnist_t10k"]

MNIST_ENV_VAR = "JAXCOMP_MNIST_DIR"
_MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
_MNIST_HELP = (
    "The MNIST test split was not found. Put the public files t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz (from http://yann.lecun.com/exdb/mnist/ or any mirror of the "
    f"official MNIST files) in a folder and pass it as `path=` or set ${MNIST_ENV_VAR}; "
    "jaxcomp never downloads data."
)


class Dataset(NamedTuple):
    """A train/eval split of images (N, H, W, C) float32 in [0, 1] and int32 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_eval.max())) + 1


def load_digits(eval_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits as a shuffled, stratified train/eval split.

    Args:
      eval_fraction: fraction of each class held out for evaluation.
      seed: seed of the shuffle.

    Returns:
      A `Dataset` of (N, 8, 8, 1) images.

    Raises:
      ImportError: if scikit-learn is not installed (it ships with the `examples` and `test`
        extras: `pip install 'jaxcomp[examples]'`).

    Example:
        >>> data = load_digits()
        >>> data.x_train.shape, data.x_eval.shape
        ((1438, 8, 8, 1), (359, 8, 8, 1))
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits needs scikit-learn: pip install 'jaxcomp[examples]'"
        ) from e
    bunch = sk_load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[..., None]
    labels = bunch.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    eval_idx = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        eval_idx.extend(idx[: int(round(eval_fraction * len(idx)))])
    is_eval = np.zeros(len(labels), bool)
    is_eval[eval_idx] = True
    train = rng.permutation(np.flatnonzero(~is_eval))
    evals = rng.permutation(np.flatnonzero(is_eval))
    return Dataset(images[train], labels[train], images[evals], labels[evals])


def find_mnist_dir(path: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The folder that holds the MNIST test split files.

    Looks at `path`, then `$JAXCOMP_MNIST_DIR`, then `shared/data/mnist-t10k` beside the current
    directory or any of its parents and beside the jaxcomp source tree.

    Raises:
      FileNotFoundError: with instructions, when no folder holds both files.
    """
    if path is not None:
        candidates = [pathlib.Path(path)]
    else:
        candidates = []
        if os.environ.get(MNIST_ENV_VAR):
            candidates.append(pathlib.Path(os.environ[MNIST_ENV_VAR]))
        roots = [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]
        roots += list(pathlib.Path(__file__).resolve().parents)
        for root in roots:
            candidates.append(root / "shared" / "data" / "mnist-t10k")
    for candidate in candidates:
        if all((candidate / name).is_file() for name in _MNIST_FILES):
            return candidate
    looked = ", ".join(str(c) for c in candidates[:4])
    raise FileNotFoundError(f"{_MNIST_HELP} Looked in: {looked}")


def _read_idx(file: pathlib.Path, magic: int, header: int) -> np.ndarray:
    with gzip.open(file, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{file} is not an IDX file of the expected kind (magic {found:#x})")
    return np.frombuffer(raw, np.uint8, offset=header)


def load_mnist_t10k(path: str | os.PathLike[str] | None = None, n_train: int = 8000) -> Dataset:
    """The MNIST test split, the first `n_train` images to train and the rest to evaluate.

    This repository's convention is 8,000 train / 2,000 eval images.

    Args:
      path: the folder with `t10k-images-idx3-ubyte.gz` and `t10k-labels-idx1-ubyte.gz`;
        by default found by `find_mnist_dir`.
      n_train: images used for training; the remaining ones are the evaluation set.

    Returns:
      A `Dataset` of (N, 28, 28, 1) images.

    Raises:
      FileNotFoundError: when the files are missing, saying where to get them.

    Example:
        >>> data = load_mnist_t10k()  # doctest: +SKIP
        >>> data.x_train.shape  # doctest: +SKIP
        (8000, 28, 28, 1)
    """
    folder = find_mnist_dir(path)
    images = _read_idx(folder / _MNIST_FILES[0], 0x00000803, 16).reshape(-1, 28, 28, 1)
    labels = _read_idx(folder / _MNIST_FILES[1], 0x00000801, 8).astype(np.int32)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels")
    if not 0 < n_train < len(labels):
        raise ValueError(f"n_train must be in (0, {len(labels)}), got {n_train}")
    x = images.astype(np.float32) / 255.0
    return Dataset(x[:n_train], labels[:n_train], x[n_train:], labels[n_train:])


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int | None = None):
    """Yields `(x, y)` minibatches; shuffled with `seed`, in order when `seed` is None.

    The last incomplete batch is dropped when shuffling (fixed shapes, one compile) and kept
    otherwise (evaluation sees every example).
    """
    n = len(x)
    if seed is None:
        for start in range(0, n, batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    order = np.random.default_rng(seed).permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]
