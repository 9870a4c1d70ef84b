// Multi-crop resize: CUDA kernels of srel_fast_ext::multicrop_fwd / multicrop_bwd
// (schema and CPU kernels in multicrop.cpp; exact sampling definition in
// kernels/multicrop_resize.py).
//
// Forward: one thread per output element (n, c, i, j), enumerated in the
// output's memory order (NCHW or channels_last) so that stores coalesce; the
// thread inverts roll and flip, computes the two row/column taps of its image's
// box and blends four loads of x. Crop + resize + flip + roll in one pass.
//
// Backward: one thread per grad_x element (n, c, y, x), same memory order, a
// gather: elements outside the crop region write 0; the others walk the short
// analytic candidate ranges of resized rows/columns (about 2 * Ho / h + 3
// each), recompute every candidate's taps with the forward arithmetic and sum
// w_y * w_x * grad over the taps that hit (y, x). No atomics, deterministic,
// grad_x written once in its own dtype (no fp32 staging buffer).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "multicrop_check.h"

#include <optional>

namespace {

template <typename T>
__device__ __forceinline__ T dmin(T a, T b) { return a < b ? a : b; }
template <typename T>
__device__ __forceinline__ T dmax(T a, T b) { return a > b ? a : b; }

template <typename acc_t>
struct Axis {
  acc_t t, s, lo, hi, b;
  int64_t top_idx, bot_idx;
};

template <typename acc_t>
__device__ __forceinline__ Axis<acc_t> make_axis(acc_t t, acc_t h, int64_t out_len, int64_t in_len) {
  Axis<acc_t> a;
  a.t = t;
  a.s = h / static_cast<acc_t>(out_len);
  const acc_t last = static_cast<acc_t>(in_len - 1);
  a.lo = dmin(dmax(t, acc_t(0)), last);
  a.hi = dmin(dmax(t + dmax(h, acc_t(1)) - acc_t(1), a.lo), last);
  a.b = floor(t);
  a.top_idx = static_cast<int64_t>(ceil(a.hi));
  a.bot_idx = static_cast<int64_t>(floor(a.lo));
  return a;
}

template <typename acc_t>
__device__ __forceinline__ void tap(const Axis<acc_t>& a, int64_t i, int64_t& i0, int64_t& i1, acc_t& lam) {
  acc_t u = a.s * (static_cast<acc_t>(i) + acc_t(0.5)) - acc_t(0.5);
  u = dmax(u, acc_t(0));
  const acc_t r = dmin(dmax((a.t - a.b) + u, a.lo - a.b), a.hi - a.b);
  const acc_t f = floor(r);
  lam = r - f;
  i0 = static_cast<int64_t>(a.b + f);
  i1 = dmin(i0 + 1, a.top_idx);
}

// resized indices [first, last] whose taps can touch input index y (y inside the crop)
template <typename acc_t>
__device__ __forceinline__ void candidates(const Axis<acc_t>& a, int64_t y, int64_t out_len, int64_t& first,
                                           int64_t& last) {
  const acc_t yf = static_cast<acc_t>(y);
  acc_t lo_f = ((yf - acc_t(1) - a.t) + acc_t(0.5)) / a.s - acc_t(0.5);
  acc_t hi_f = ((yf + acc_t(1) - a.t) + acc_t(0.5)) / a.s - acc_t(0.5);
  lo_f = dmin(dmax(lo_f, acc_t(-1)), static_cast<acc_t>(out_len + 1));
  hi_f = dmin(dmax(hi_f, acc_t(-1)), static_cast<acc_t>(out_len + 1));
  first = static_cast<int64_t>(floor(lo_f));
  last = static_cast<int64_t>(ceil(hi_f));
  if (y <= static_cast<int64_t>(floor(a.lo)) + 1) first = 0;
  if (y >= static_cast<int64_t>(floor(a.hi))) last = out_len - 1;
  first = dmax(first, int64_t(0));
  last = dmin(last, out_len - 1);
}

__device__ __forceinline__ int64_t wrap(int64_t v, int64_t m) { return ((v % m) + m) % m; }

template <typename scalar_t, bool CL>
__global__ void multicrop_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                     const at::opmath_type<scalar_t>* __restrict__ boxes, const int* __restrict__ flip,
                                     const int* __restrict__ shift, int64_t C, int64_t H, int64_t W, int64_t Ho,
                                     int64_t Wo, int64_t sxn, int64_t sxc, int64_t sxh, int64_t sxw, int64_t son,
                                     int64_t soc, int64_t soh, int64_t sow, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, i, j, r;
    if (CL) {
      c = e % C; r = e / C; j = r % Wo; r /= Wo; i = r % Ho; n = r / Ho;
    } else {
      j = e % Wo; r = e / Wo; i = r % Ho; r /= Ho; c = r % C; n = r / C;
    }
    const int64_t sh = shift ? wrap(shift[n * 2], Ho) : 0;
    const int64_t sw = shift ? wrap(shift[n * 2 + 1], Wo) : 0;
    const int64_t ir = wrap(i - sh, Ho);
    int64_t jr = wrap(j - sw, Wo);
    if (flip && flip[n] != 0) jr = Wo - 1 - jr;
    const Axis<acc_t> ay = make_axis<acc_t>(boxes[n * 4 + 0], boxes[n * 4 + 2], Ho, H);
    const Axis<acc_t> ax = make_axis<acc_t>(boxes[n * 4 + 1], boxes[n * 4 + 3], Wo, W);
    int64_t y0, y1, x0, x1;
    acc_t ly, lx;
    tap(ay, ir, y0, y1, ly);
    tap(ax, jr, x0, x1, lx);
    const scalar_t* p = x + n * sxn + c * sxc;
    const acc_t v00 = static_cast<acc_t>(p[y0 * sxh + x0 * sxw]);
    const acc_t v01 = static_cast<acc_t>(p[y0 * sxh + x1 * sxw]);
    const acc_t v10 = static_cast<acc_t>(p[y1 * sxh + x0 * sxw]);
    const acc_t v11 = static_cast<acc_t>(p[y1 * sxh + x1 * sxw]);
    const acc_t wx0 = acc_t(1) - lx;
    const acc_t v = (acc_t(1) - ly) * (wx0 * v00 + lx * v01) + ly * (wx0 * v10 + lx * v11);
    out[n * son + c * soc + i * soh + j * sow] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, bool CL>
__global__ void multicrop_bwd_kernel(const scalar_t* __restrict__ g, scalar_t* __restrict__ gx,
                                     const at::opmath_type<scalar_t>* __restrict__ boxes, const int* __restrict__ flip,
                                     const int* __restrict__ shift, int64_t C, int64_t H, int64_t W, int64_t Ho,
                                     int64_t Wo, int64_t sgn, int64_t sgc, int64_t sgh, int64_t sgw, int64_t sxn,
                                     int64_t sxc, int64_t sxh, int64_t sxw, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, y, x, r;
    if (CL) {
      c = e % C; r = e / C; x = r % W; r /= W; y = r % H; n = r / H;
    } else {
      x = e % W; r = e / W; y = r % H; r /= H; c = r % C; n = r / C;
    }
    scalar_t* o = gx + n * sxn + c * sxc + y * sxh + x * sxw;
    const Axis<acc_t> ay = make_axis<acc_t>(boxes[n * 4 + 0], boxes[n * 4 + 2], Ho, H);
    const Axis<acc_t> ax = make_axis<acc_t>(boxes[n * 4 + 1], boxes[n * 4 + 3], Wo, W);
    if (y < ay.bot_idx || y > ay.top_idx || x < ax.bot_idx || x > ax.top_idx) {
      *o = scalar_t(0);
      continue;
    }
    const int64_t sh = shift ? wrap(shift[n * 2], Ho) : 0;
    const int64_t sw = shift ? wrap(shift[n * 2 + 1], Wo) : 0;
    const bool fl = flip && flip[n] != 0;
    int64_t fi, li, fj, lj;
    candidates(ay, y, Ho, fi, li);
    candidates(ax, x, Wo, fj, lj);
    const scalar_t* gb = g + n * sgn + c * sgc;
    acc_t acc = 0;
    for (int64_t i = fi; i <= li; ++i) {
      int64_t i0, i1;
      acc_t lam;
      tap(ay, i, i0, i1, lam);
      const acc_t wy = (i0 == y ? acc_t(1) - lam : acc_t(0)) + (i1 == y ? lam : acc_t(0));
      if (wy == acc_t(0)) continue;
      int64_t row = i + sh;
      row = row >= Ho ? row - Ho : row;
      const scalar_t* gr = gb + row * sgh;
      acc_t racc = 0;
      for (int64_t j = fj; j <= lj; ++j) {
        int64_t j0, j1;
        acc_t lmx;
        tap(ax, j, j0, j1, lmx);
        const acc_t wx = (j0 == x ? acc_t(1) - lmx : acc_t(0)) + (j1 == x ? lmx : acc_t(0));
        if (wx == acc_t(0)) continue;
        int64_t col = (fl ? Wo - 1 - j : j) + sw;
        col = col >= Wo ? col - Wo : col;
        racc += wx * static_cast<acc_t>(gr[col * sgw]);
      }
      acc += wy * racc;
    }
    *o = static_cast<scalar_t>(acc);
  }
}

void check_args(const at::Tensor& big, const at::Tensor& small, const at::Tensor& boxes,
                const std::optional<at::Tensor>& flip, const std::optional<at::Tensor>& shift, const char* name) {
  TORCH_CHECK(big.is_cuda() && small.is_cuda() && boxes.is_cuda(), name, ": expected CUDA tensors");
  srel_fast_multicrop::check_args(big, small, boxes, flip, shift, name);
}

const int* opt_int_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<int>() : nullptr; }

bool channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

int64_t num_blocks(int64_t total, int threads) {
  const int64_t b = (total + threads - 1) / threads;
  return b < (int64_t(1) << 30) ? b : (int64_t(1) << 30);
}

void multicrop_fwd_cuda(const at::Tensor& x, const at::Tensor& boxes, const std::optional<at::Tensor>& flip,
                        const std::optional<at::Tensor>& shift, at::Tensor out) {
  check_args(x, out, boxes, flip, shift, "multicrop_fwd");
  const int64_t total = out.numel();
  if (total == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = 256;
  const bool cl = channels_last(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multicrop_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<num_blocks(total, threads), threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), boxes.data_ptr<acc_t>(), opt_int_ptr(flip),
          opt_int_ptr(shift), x.size(1), x.size(2), x.size(3), out.size(2), out.size(3), x.stride(0), x.stride(1),
          x.stride(2), x.stride(3), out.stride(0), out.stride(1), out.stride(2), out.stride(3), total);
    };
    if (cl) launch(multicrop_fwd_kernel<scalar_t, true>);
    else launch(multicrop_fwd_kernel<scalar_t, false>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void multicrop_bwd_cuda(const at::Tensor& grad, const at::Tensor& boxes, const std::optional<at::Tensor>& flip,
                        const std::optional<at::Tensor>& shift, at::Tensor grad_x) {
  check_args(grad_x, grad, boxes, flip, shift, "multicrop_bwd");
  const int64_t total = grad_x.numel();
  if (total == 0) return;
  c10::cuda::CUDAGuard guard(grad.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = 256;
  const bool cl = channels_last(grad_x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "multicrop_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<num_blocks(total, threads), threads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), boxes.data_ptr<acc_t>(), opt_int_ptr(flip),
          opt_int_ptr(shift), grad_x.size(1), grad_x.size(2), grad_x.size(3), grad.size(2), grad.size(3),
          grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3), grad_x.stride(0), grad_x.stride(1),
          grad_x.stride(2), grad_x.stride(3), total);
    };
    if (cl) launch(multicrop_bwd_kernel<scalar_t, true>);
    else launch(multicrop_bwd_kernel<scalar_t, false>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(srel_fast_ext, CUDA, m) {
  m.impl("multicrop_fwd", &multicrop_fwd_cuda);
  m.impl("multicrop_bwd", &multicrop_bwd_cuda);
}
