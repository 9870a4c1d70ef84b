"""srel_fast.kernels: fused kernels for SRe2L-style recovery, importable on their own.

    from srel_fast.kernels import bn_stat_loss, multicrop_resize

Importing this package pulls in nothing of the srel-fast pipeline: only torch
(and triton, lazily, when a triton backend runs).
"""
from ._backend import BACKENDS, resolve_backend
from .bn_stat_loss import bn_stat_loss, bn_stat_loss_reference, bn_stat_moments  # bn_stat
from .fused_bn import (BNStatMatching, FusedBatchNormStat, bn_stat_matching, fused_batch_norm_moments,  # bn_stat
                       fused_batch_norm_stat)
from .multicrop_resize import multicrop_resize, multicrop_resize_reference, multicrop_resize_torch  # multicrop
from .crop_sampler import sample_crop_boxes, sample_flip_shift  # multicrop

__all__ = ["BACKENDS", "resolve_backend"]
__all__ += ["bn_stat_loss", "bn_stat_loss_reference", "bn_stat_moments",
            "fused_batch_norm_stat", "fused_batch_norm_moments", "FusedBatchNormStat", "BNStatMatching", "bn_stat_matching"]  # bn_stat
__all__ += ["multicrop_resize", "multicrop_resize_reference", "multicrop_resize_torch",
            "sample_crop_boxes", "sample_flip_shift"]  # multicrop
