// Argument checks shared by the CPU (multicrop_resize.cpp) and CUDA (multicrop_resize_cuda.cu)
// kernels of the multi-crop resize op.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace srel_fast_multicrop {

inline void check_args(const at::Tensor& big, const at::Tensor& small, const at::Tensor& boxes,
                const std::optional<at::Tensor>& flip, const std::optional<at::Tensor>& shift, const char* name) {
  TORCH_CHECK(big.dim() == 4 && small.dim() == 4, name, ": expected 4-D tensors");
  TORCH_CHECK(big.size(0) == small.size(0) && big.size(1) == small.size(1), name, ": N/C mismatch");
  TORCH_CHECK(big.device() == small.device() && boxes.device() == big.device(), name, ": device mismatch");
  TORCH_CHECK(big.scalar_type() == small.scalar_type(), name, ": dtype mismatch");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(0) == big.size(0) && boxes.size(1) == 4 && boxes.is_contiguous(), name,
              ": boxes must be contiguous (N, 4)");
  const auto want = big.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(boxes.scalar_type() == want, name, ": boxes must be ", want, " for ", big.scalar_type(), " data");
  if (flip.has_value()) {
    TORCH_CHECK(flip->scalar_type() == at::kInt && flip->is_contiguous() && flip->numel() == big.size(0) &&
                    flip->device() == big.device(),
                name, ": flip must be contiguous int32 (N,) on the data's device");
  }
  if (shift.has_value()) {
    TORCH_CHECK(shift->scalar_type() == at::kInt && shift->is_contiguous() && shift->numel() == 2 * big.size(0) &&
                    shift->device() == big.device(),
                name, ": shift must be contiguous int32 (N, 2) on the data's device");
  }
}

}  // namespace srel_fast_multicrop
