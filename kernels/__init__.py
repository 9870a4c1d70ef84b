"""srel_fast.kernels: fused kernels for SRe2L-style recovery, importable on their own.

    from srel_fast.kernels import bn_stat_loss, multicrop_resize

Importing this package pulls in nothing of the srel-fast pipeline: only torch
(and triton, lazily, when a triton backend runs).

One op per module, each with its plain-PyTorch reference beside it, and one
stem per op through every layer (op key, Triton module, C++/CUDA files, test,
benchmark):

- ``bn_stat_loss``: bn_stat_loss.py, bn_stat_loss_triton.py, csrc/bn_stat_loss.cpp,
  csrc/bn_stat_loss_cuda.cu, tests/test_bn_stat_loss.py, bench/bench_bn_stat_loss.py;
- ``fused_bn_stat`` (eval BN + bn_stat_loss in one read, run by the bn_stat_loss
  kernels): fused_bn_stat.py, csrc/fused_bn_stat.cpp (a frozen layer and its loss as one
  C++ autograd op, for every device), tests/test_fused_bn_stat.py, bench/bench_fused_bn_stat.py;
- ``multicrop_resize``: multicrop_resize.py, multicrop_resize_triton.py,
  csrc/multicrop_resize.cpp, csrc/multicrop_resize_cuda.cu, tests/test_multicrop_resize.py,
  bench/bench_multicrop_resize.py; its random crop boxes, flips and rolls come from
  crop_sampler.py (tests/test_crop_sampler.py).
"""
from ._backend import BACKENDS, resolve_backend
from .bn_stat_loss import bn_stat_loss, bn_stat_loss_reference, bn_stat_moments
from .fused_bn_stat import (FusedBNMatching, FusedBNStat, fused_bn_matching, fused_bn_moments, fused_bn_stat,
                            fused_bn_stat_reference)
from .multicrop_resize import multicrop_resize, multicrop_resize_reference, multicrop_resize_torch
from .crop_sampler import crop_boxes_from_uniforms, draw_crop_uniforms, sample_crop_boxes, sample_flip_shift

__all__ = ["BACKENDS", "resolve_backend"]
__all__ += ["bn_stat_loss", "bn_stat_loss_reference", "bn_stat_moments"]
__all__ += ["fused_bn_stat", "fused_bn_moments", "fused_bn_stat_reference", "FusedBNStat", "FusedBNMatching", "fused_bn_matching"]
__all__ += ["multicrop_resize", "multicrop_resize_reference", "multicrop_resize_torch",
            "sample_crop_boxes", "sample_flip_shift", "draw_crop_uniforms", "crop_boxes_from_uniforms"]
