"""`srel-fast bench ...`: the benchmark suite's entry point (srel_fast.bench, shipped with the package).

    srel-fast bench recover-step [--config convnet4-64|resnet18-224|resnet50-224] [...]
    srel-fast bench kernels [pytest args]     kernel micro-benchmarks (pytest-benchmark)
    srel-fast bench loader [...]              data-loader benchmark
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_BENCHES = ("bench_bn_stat_loss.py", "bench_fused_bn_stat.py", "bench_multicrop_resize.py")
COMMANDS = ("recover-step", "kernels", "loader")


def _usage() -> str:
    return __doc__.strip()


def _kernels(argv: list[str]) -> int:
    import pytest

    # the kernel benches live outside the test suite's testpaths, so name them.
    return int(pytest.main([*(os.path.join(HERE, f) for f in KERNEL_BENCHES), "-p", "no:cacheprovider",
                            "-o", "addopts=", *argv]))


def _loader(argv: list[str]) -> int:
    from . import bench_loader

    return int(bench_loader.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "recover-step":
        from .recover_step import cli as recover_step

        return int(recover_step.main(rest) or 0)
    if cmd == "kernels":
        return _kernels(rest)
    if cmd == "loader":
        return _loader(rest)
    print(f"srel-fast bench: unknown benchmark {cmd!r}; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
