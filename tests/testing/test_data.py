"""Data helpers: bundled digits, the MNIST split from a folder, clear errors without it."""

import gzip

import numpy as np
import pytest

from jaxcomp.testing.data import batches, find_mnist_dir, load_digits, load_mnist_t10k


def test_digits_split_shapes_ranges_and_stratification():
    data = load_digits()
    assert data.x_train.shape == (1438, 8, 8, 1) and data.x_eval.shape == (359, 8, 8, 1)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert data.num_classes == 10 and data.input_shape == (8, 8, 1)
    assert set(np.bincount(data.y_eval)) <= {35, 36, 37}  # about 20% of every class
    assert len(set(map(bytes, data.x_eval)) & set(map(bytes, data.x_train))) < 5


def test_digits_split_is_deterministic_per_seed():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert (a.y_train == b.y_train).all() and not (a.y_train == c.y_train).all()


def test_missing_mnist_folder_says_where_to_get_the_files(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXCOMP_MNIST_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        load_mnist_t10k(tmp_path)


def _write_idx(folder, n):
    images = np.arange(n * 784, dtype=np.uint8).reshape(n, 784) % 251
    labels = (np.arange(n) % 10).astype(np.uint8)
    header = (0x803).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.tobytes())
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write((0x801).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes())
    return images, labels


def test_mnist_reader_splits_first_n_train_and_rest_eval(tmp_path):
    images, labels = _write_idx(tmp_path, 30)
    data = load_mnist_t10k(tmp_path, n_train=20)
    assert data.x_train.shape == (20, 28, 28, 1) and data.x_eval.shape == (10, 28, 28, 1)
    np.testing.assert_allclose(data.x_eval[0].ravel(), images[20] / 255.0, rtol=1e-6)
    assert (data.y_train == labels[:20]).all()


def test_real_mnist_split_when_available():
    try:
        find_mnist_dir()
    except FileNotFoundError:
        pytest.skip("the MNIST test split is not on this machine")
    data = load_mnist_t10k()
    assert data.x_train.shape == (8000, 28, 28, 1) and data.x_eval.shape == (2000, 28, 28, 1)
    counts = np.bincount(np.concatenate([data.y_train, data.y_eval]))
    assert counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_batches_shuffled_drop_the_remainder_ordered_keep_it():
    x, y = np.arange(10), np.arange(10)
    shuffled = list(batches(x, y, 4, seed=0))
    assert len(shuffled) == 2 and all(len(b[0]) == 4 for b in shuffled)
    ordered = list(batches(x, y, 4))
    assert [len(b[0]) for b in ordered] == [4, 4, 2]
