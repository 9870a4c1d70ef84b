"""Write a class-balanced Fashion-MNIST training subset (idx .gz files) and the
test split (whole, or TEST_PER_CLASS images per class) into OUT, for
SREL_FAST_FASHION_MNIST=OUT (CPU-sized runs). Subsets are drawn with
numpy.random.default_rng(SEED), per class, and kept in the original order.
The source is srel_fast.data's Fashion-MNIST folder.

    python scripts/make_subset.py OUT PER_CLASS [SEED [TEST_PER_CLASS]]
"""
import gzip
import os
import shutil
import sys

import numpy as np

from srel_fast.data import FASHION_MNIST_DIR, read_idx


def write_idx(path, arr):
    """An unsigned-byte idx file (gzip), the format read_idx reads."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


def subset(prefix, out, per_class, seed):
    images = read_idx(os.path.join(FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte.gz"))
    rng = np.random.default_rng(seed)
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)]))
    write_idx(f"{out}/{prefix}-images-idx3-ubyte.gz", images[idx])
    write_idx(f"{out}/{prefix}-labels-idx1-ubyte.gz", labels[idx])


def main(out, per_class, seed=0, test_per_class=None):
    os.makedirs(out, exist_ok=True)
    subset("train", out, per_class, seed)
    if test_per_class is None:
        for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
            shutil.copy(os.path.join(FASHION_MNIST_DIR, name), f"{out}/{name}")
    else:
        subset("t10k", out, test_per_class, seed)


if __name__ == "__main__":
    a = sys.argv
    main(a[1], int(a[2]), int(a[3]) if len(a) > 3 else 0, int(a[4]) if len(a) > 4 else None)
