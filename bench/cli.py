"""`srel-fast bench ...`: the benchmark suite's entry point (source checkout only).

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
    files = [os.path.join(HERE, f) for f in KERNEL_BENCHES if os.path.exists(os.path.join(HERE, f))]
    if not files:
        print("srel-fast bench kernels: no kernel benchmark files found in bench/ "
              f"({', '.join(KERNEL_BENCHES)}).", file=sys.stderr)
        return 2
    import pytest

    # rootdir/ini of the checkout; the kernel benches live outside testpaths, so name them.
    return int(pytest.main([*files, "-p", "no:cacheprovider", "-o", "addopts=", *argv]))


def _loader(argv: list[str]) -> int:
    try:
        from bench import bench_loader
    except ImportError as exc:
        if getattr(exc, "name", None) in ("bench.bench_loader", "bench_loader"):
            print("srel-fast bench loader: bench/bench_loader.py is not present in this checkout.", file=sys.stderr)
            return 2
        raise
    return int(bench_loader.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    root = os.path.dirname(HERE)
    if root not in sys.path:
        sys.path.insert(0, root)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "recover-step":
        from bench import recover_step

        return int(recover_step.main(rest) or 0)
    if cmd == "kernels":
        return _kernels(rest)
    if cmd == "loader":
        return _loader(rest)
    print(f"srel-fast bench: unknown benchmark {cmd!r}; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
