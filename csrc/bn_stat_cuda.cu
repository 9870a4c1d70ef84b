// BatchNorm statistics matching: CUDA kernels of srel_fast_ext::bn_stat_fwd /
// bn_stat_bwd (schemas and CPU kernels in bn_stat.cpp). Canonical views:
//   x: (G, B, C, L) contiguous  channel-first  (NCHW, (N, C, L))
//   x: (G, R, C)    contiguous  channel-last   (NHWC, (N, C))
//
// Forward: grid (channel blocks, splits of the reduced extent, groups) so a
// reduction over N*H*W fills the GPU even for few channels. Each thread keeps
// a Welford state (count, mean, M2) in float32; states are combined with
// Chan's parallel formula across threads (warp shuffles / shared memory) and
// then across splits (a few ATen ops on the (G, S, C) partials). No
// E[x^2] - E[x]^2 anywhere, so |mean| >> std costs no precision.
// With y given, the same read of x also writes y = x * scale[c] + bias[c].
// Backward: one grid-stride elementwise pass
//   dx = (x - m[g,c]) * b[g,c] + a[g,c]  (+ dy * scale[c]).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

namespace {

struct Welford {
  float n, mean, m2;
};

__device__ __forceinline__ void welford_add(Welford& w, float v) {
  w.n += 1.f;
  const float d = v - w.mean;
  w.mean += d / w.n;
  w.m2 += d * (v - w.mean);
}

__device__ __forceinline__ Welford chan_merge(const Welford& a, const Welford& b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float d = b.mean - a.mean;
  const float fb = b.n / n;
  Welford r;
  r.n = n;
  r.mean = a.mean + d * fb;
  r.m2 = a.m2 + b.m2 + d * d * a.n * fb;
  return r;
}

__device__ __forceinline__ Welford warp_reduce(Welford w) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Welford o;
    o.n = __shfl_down_sync(0xffffffffu, w.n, off);
    o.mean = __shfl_down_sync(0xffffffffu, w.mean, off);
    o.m2 = __shfl_down_sync(0xffffffffu, w.m2, off);
    w = chan_merge(w, o);
  }
  return w;
}

constexpr int ROWS_TY = 8;    // channel-last: threads along rows
constexpr int COLS_TX = 32;   // channel-last: threads along channels
constexpr int PLANE_THREADS = 256;

// channel-last: block (32 channels x 8 row lanes), grid (ceil(C/32), S, G).
template <typename scalar_t>
__global__ void stat_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                 const float* __restrict__ scale, const float* __restrict__ bias,
                                 float* __restrict__ part, int64_t R, int64_t C, int64_t rows_per_split, int S,
                                 int64_t part_stride, bool write_y) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * COLS_TX + tx;
  const int s = blockIdx.y;
  const int64_t g = blockIdx.z;
  const int64_t r0 = static_cast<int64_t>(s) * rows_per_split;
  const int64_t r1 = min(R, r0 + rows_per_split);
  Welford w{0.f, 0.f, 0.f};
  if (c < C) {
    const float sc = write_y ? scale[c] : 0.f;
    const float bi = write_y ? bias[c] : 0.f;
    for (int64_t r = r0 + ty; r < r1; r += ROWS_TY) {
      const int64_t off = (g * R + r) * C + c;
      const float v = static_cast<float>(x[off]);
      welford_add(w, v);
      if (write_y) y[off] = static_cast<scalar_t>(v * sc + bi);
    }
  }
  __shared__ Welford sh[ROWS_TY][COLS_TX];
  sh[ty][tx] = w;
  __syncthreads();
  if (ty == 0 && c < C) {
    Welford acc = sh[0][tx];
#pragma unroll
    for (int k = 1; k < ROWS_TY; ++k) acc = chan_merge(acc, sh[k][tx]);
    const int64_t o = (g * S + s) * C + c;
    part[o] = acc.n;
    part[part_stride + o] = acc.mean;
    part[2 * part_stride + o] = acc.m2;
  }
}

// channel-first: block of 256 threads, grid (C, S, G); a block reduces one
// channel over a range of the flattened (B, L) extent.
template <typename scalar_t>
__global__ void stat_planes_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                   const float* __restrict__ scale, const float* __restrict__ bias,
                                   float* __restrict__ part, int64_t B, int64_t C, int64_t L, int64_t per_split,
                                   int S, int64_t part_stride, bool write_y) {
  const int64_t c = blockIdx.x;
  const int s = blockIdx.y;
  const int64_t g = blockIdx.z;
  const int64_t BL = B * L;
  const int64_t j0 = static_cast<int64_t>(s) * per_split;
  const int64_t j1 = min(BL, j0 + per_split);
  const int64_t base = g * B * C * L + c * L;
  const float sc = write_y ? scale[c] : 0.f;
  const float bi = write_y ? bias[c] : 0.f;
  Welford w{0.f, 0.f, 0.f};
  // Walk the range plane by plane (no division per element): [j0, j1) covers
  // planes b0..b1, each a contiguous run of L elements.
  int64_t b = j0 / L;
  int64_t l0 = j0 - b * L;
  for (int64_t j = j0; j < j1; ++b, l0 = 0) {
    const int64_t len = min(L - l0, j1 - j);
    const int64_t off = base + b * C * L + l0;
    for (int64_t l = threadIdx.x; l < len; l += blockDim.x) {
      const float v = static_cast<float>(x[off + l]);
      welford_add(w, v);
      if (write_y) y[off + l] = static_cast<scalar_t>(v * sc + bi);
    }
    j += len;
  }
  w = warp_reduce(w);
  __shared__ Welford sh[PLANE_THREADS / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = w;
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x / 32;
    w = lane < nw ? sh[lane] : Welford{0.f, 0.f, 0.f};
    w = warp_reduce(w);
    if (lane == 0) {
      const int64_t o = (g * S + s) * C + c;
      part[o] = w.n;
      part[part_stride + o] = w.mean;
      part[2 * part_stride + o] = w.m2;
    }
  }
}

template <typename scalar_t>
__global__ void bwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                           const float* __restrict__ scale, const float* __restrict__ m, const float* __restrict__ a,
                           const float* __restrict__ b, scalar_t* __restrict__ dx, int64_t total, int64_t C, int64_t L,
                           int64_t per_group, bool has_dy) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t c = (i / L) % C;
    const int64_t idx = (i / per_group) * C + c;
    float r = (static_cast<float>(x[i]) - m[idx]) * b[idx] + a[idx];
    if (has_dy) r += static_cast<float>(dy[i]) * scale[c];
    dx[i] = static_cast<scalar_t>(r);
  }
}

// Same with 32-bit indices and multiply-shift division (at::cuda::detail::IntDivider)
// for tensors under 2^31 elements: integer division would otherwise dominate.
template <typename scalar_t>
__global__ void bwd_kernel32(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                             const float* __restrict__ scale, const float* __restrict__ m, const float* __restrict__ a,
                             const float* __restrict__ b, scalar_t* __restrict__ dx, uint32_t total, uint32_t C,
                             at::cuda::detail::IntDivider<uint32_t> divL, at::cuda::detail::IntDivider<uint32_t> divC,
                             at::cuda::detail::IntDivider<uint32_t> divG, bool has_dy) {
  const uint32_t stride = gridDim.x * blockDim.x;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const uint32_t c = divC.divmod(divL.div(i)).mod;
    const uint32_t idx = divG.div(i) * C + c;
    float r = (static_cast<float>(x[i]) - m[idx]) * b[idx] + a[idx];
    if (has_dy) r += static_cast<float>(dy[i]) * scale[c];
    dx[i] = static_cast<scalar_t>(r);
  }
}

int target_blocks(const at::Tensor& x) {
  const auto* prop = at::cuda::getDeviceProperties(x.get_device());
  return 4 * prop->multiProcessorCount;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::tuple<at::Tensor, at::Tensor> bn_stat_fwd_cuda(const at::Tensor& x, const at::Tensor& shift,
                                                    const at::Tensor& scale, const at::Tensor& bias,
                                                    const at::Tensor& y) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && (x.dim() == 3 || x.dim() == 4), "bn_stat: bad x");
  const c10::cuda::CUDAGuard guard(x.device());
  const bool cf = x.dim() == 4;
  const int64_t G = x.size(0), C = x.size(2);
  const bool write_y = y.numel() > 0;
  if (write_y) {
    TORCH_CHECK(y.sizes() == x.sizes() && y.is_contiguous() && y.scalar_type() == x.scalar_type(), "bn_stat: bad y");
    TORCH_CHECK(scale.numel() == C && bias.numel() == C && scale.scalar_type() == at::kFloat &&
                    bias.scalar_type() == at::kFloat && scale.is_cuda() && bias.is_cuda(),
                "bn_stat: bad scale/bias");
  }
  const int target = target_blocks(x);
  auto stream = at::cuda::getCurrentCUDAStream();
  int64_t S;
  at::Tensor part;
  if (!cf) {
    const int64_t R = x.size(1);
    const int64_t nc = cdiv(C, COLS_TX);
    S = std::max<int64_t>(1, std::min<int64_t>(cdiv(R, 4 * ROWS_TY), cdiv(target, nc * G)));
    S = std::min<int64_t>(S, 65535);
    const int64_t rows_per_split = cdiv(R, S);
    S = cdiv(R, rows_per_split);
    part = at::empty({3, G, S, C}, x.options().dtype(at::kFloat));
    const dim3 grid(static_cast<unsigned>(nc), static_cast<unsigned>(S), static_cast<unsigned>(G));
    const dim3 block(COLS_TX, ROWS_TY);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stat_fwd_cuda_rows", [&] {
      stat_rows_kernel<scalar_t><<<grid, block, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), write_y ? y.data_ptr<scalar_t>() : nullptr,
          write_y ? scale.const_data_ptr<float>() : nullptr, write_y ? bias.const_data_ptr<float>() : nullptr,
          part.data_ptr<float>(), R, C, rows_per_split, static_cast<int>(S), G * S * C, write_y);
    });
  } else {
    const int64_t B = x.size(1), L = x.size(3), BL = B * L;
    S = std::max<int64_t>(1, std::min<int64_t>(cdiv(BL, 4 * PLANE_THREADS), cdiv(target, C * G)));
    S = std::min<int64_t>(S, 65535);
    const int64_t per_split = cdiv(BL, S);
    S = cdiv(BL, per_split);
    part = at::empty({3, G, S, C}, x.options().dtype(at::kFloat));
    TORCH_CHECK(C <= 2147483647 && G <= 65535, "bn_stat: too many channels/groups for the grid");
    const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(S), static_cast<unsigned>(G));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stat_fwd_cuda_planes", [&] {
      stat_planes_kernel<scalar_t><<<grid, PLANE_THREADS, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), write_y ? y.data_ptr<scalar_t>() : nullptr,
          write_y ? scale.const_data_ptr<float>() : nullptr, write_y ? bias.const_data_ptr<float>() : nullptr,
          part.data_ptr<float>(), B, C, L, per_split, static_cast<int>(S), G * S * C, write_y);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Chan merge of the (G, S, C) partials.
  auto cnt = part[0], mu_s = part[1], m2_s = part[2];
  auto n = cnt.sum(1);
  auto mean = (cnt * mu_s).sum(1) / n;
  auto var = (m2_s + cnt * (mu_s - mean.unsqueeze(1)).square()).sum(1) / n;
  (void)shift;  // Welford needs no shift
  return {mean, var};
}

void bn_stat_bwd_cuda(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& scale, const at::Tensor& m,
                      const at::Tensor& a, const at::Tensor& b, const at::Tensor& dx) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && (x.dim() == 3 || x.dim() == 4), "bn_stat: bad x");
  const c10::cuda::CUDAGuard guard(x.device());
  const bool cf = x.dim() == 4;
  const int64_t G = x.size(0), C = x.size(2), L = cf ? x.size(3) : 1;
  const int64_t total = x.numel();
  const bool has_dy = dy.numel() > 0;
  TORCH_CHECK(dx.sizes() == x.sizes() && dx.is_contiguous() && dx.scalar_type() == x.scalar_type(), "bn_stat: bad dx");
  if (has_dy)
    TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == x.scalar_type() &&
                    scale.numel() == C,
                "bn_stat: bad dy/scale");
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(cdiv(total, threads), 32LL * target_blocks(x));
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool small = total < (int64_t{1} << 31);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stat_bwd_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dyp = has_dy ? dy.const_data_ptr<scalar_t>() : nullptr;
    const float* sp = has_dy ? scale.const_data_ptr<float>() : nullptr;
    if (small) {
      using Div = at::cuda::detail::IntDivider<uint32_t>;
      bwd_kernel32<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
          xp, dyp, sp, m.const_data_ptr<float>(), a.const_data_ptr<float>(), b.const_data_ptr<float>(),
          dx.data_ptr<scalar_t>(), static_cast<uint32_t>(total), static_cast<uint32_t>(C),
          Div(static_cast<uint32_t>(L)), Div(static_cast<uint32_t>(C)), Div(static_cast<uint32_t>(total / G)), has_dy);
    } else {
      bwd_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
          xp, dyp, sp, m.const_data_ptr<float>(), a.const_data_ptr<float>(), b.const_data_ptr<float>(),
          dx.data_ptr<scalar_t>(), total, C, L, total / G, has_dy);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(srel_fast_ext, CUDA, m) {
  m.impl("bn_stat_fwd", &bn_stat_fwd_cuda);
  m.impl("bn_stat_bwd", &bn_stat_bwd_cuda);
}
