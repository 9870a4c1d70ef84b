"""Write a class-balanced Fashion-MNIST training subset (idx .gz files) and the
test split (whole, or TEST_PER_CLASS images per class) into OUT, for
SREL_FAST_FASHION_MNIST=OUT (CPU-sized runs). Subsets are drawn with
numpy.random.default_rng(SEED), per class, and kept in the original order.

    python docs/results/make_subset.py OUT PER_CLASS [SEED [TEST_PER_CLASS]]
"""
import gzip
import os
import shutil
import sys

import numpy as np

SRC = "/usr/share/datasets/fashion-mnist"


def read(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return data[: 4 + 4 * ndim], np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write(path, header, arr):
    header = bytearray(header)
    header[4:8] = len(arr).to_bytes(4, "big")
    with gzip.open(path, "wb") as f:
        f.write(bytes(header) + arr.tobytes())


def subset(prefix, out, per_class, seed):
    hi, images = read(f"{SRC}/{prefix}-images-idx3-ubyte.gz")
    hl, labels = read(f"{SRC}/{prefix}-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)]))
    write(f"{out}/{prefix}-images-idx3-ubyte.gz", hi, images[idx])
    write(f"{out}/{prefix}-labels-idx1-ubyte.gz", hl, labels[idx])


def main(out, per_class, seed=0, test_per_class=None):
    os.makedirs(out, exist_ok=True)
    subset("train", out, per_class, seed)
    if test_per_class is None:
        for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
            shutil.copy(f"{SRC}/{name}", f"{out}/{name}")
    else:
        subset("t10k", out, test_per_class, seed)


if __name__ == "__main__":
    a = sys.argv
    main(a[1], int(a[2]), int(a[3]) if len(a) > 3 else 0, int(a[4]) if len(a) > 4 else None)
