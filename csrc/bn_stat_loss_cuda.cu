// BatchNorm statistics matching: CUDA kernels of srel_fast::_ext_bn_stat_loss_fwd /
// _ext_bn_stat_loss_bwd (schemas and CPU kernels in bn_stat_loss.cpp). Canonical views:
//   x: (G, B, C, L) contiguous  channel-first  (NCHW, (N, C, L))
//   x: (G, R, C)    contiguous  channel-last   (NHWC, (N, C))
//
// Forward (one read of x, optional y = x * scale[c] + bias[c] written in the
// same pass). Statistics are Welford states (count, mean, M2) combined with
// Chan's formula: no E[x^2] - E[x]^2 anywhere, so |mean| >> std costs no
// precision. Accumulation in float (double for double input).
//  * channel-first: a block reduces one (group, channel) over a split of the
//    flattened (B, L) extent, walked in vectors of V elements (16-byte loads
//    when L % V == 0 and the pointers are aligned, 8-byte or scalar loads
//    otherwise). One 32-bit multiply-shift divmod per vector finds (plane,
//    offset), so small maps (7x7, 14x14) keep every lane busy and no
//    division sits in the element loop. Each thread keeps V independent
//    Welford lanes (one per vector element) sharing one count, so the
//    reciprocal 1/n is computed once per vector, not per element.
//  * channel-last: a block owns TX column vectors (V channels each, 16-byte
//    loads when C % V == 0) x TY row lanes; rows are split over blocks; the
//    TY lanes are merged with a shared-memory tree.
//  Grid: >= 16 blocks per SM where the work allows (SM count from the device
//  properties); per-(group, split, channel) partials are merged by a small
//  finalize kernel in double.
// Backward: one elementwise pass, 16-byte vectors (scalar fallback)
//   dx = (x - m[g,c]) * b[g,c] + a[g,c]  (+ dy * scale[c]),
// 32-bit multiply-shift index math below 2^31 elements, 64-bit above.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace {

constexpr int kThreads = 256;
// Elements per (group, split, channel) partial: float counts stay exact integers.
constexpr int64_t kMaxPartialCount = int64_t{1} << 23;

// 1 / n for a Welford count n (an exact integer >= 1), used as
// mean += (x - mean) * (1 / n). float: no division instruction (an IEEE
// division's out-of-line slow path, never needed for such n, forces register
// saves around its calls; an approximate one would not survive a PTX check):
// the exponent-flip estimate (relative error < 13%) refined by three Newton
// steps and a final residual correction: the correctly rounded 1 / n for
// every n <= 2^23, within 1 ulp up to 2^24 (checked exhaustively, with and
// without FMA contraction; counts stay below 2^24, see kMaxPartialCount).
// Welford's accuracy does not hinge on the last bit. double: IEEE division.
__device__ __forceinline__ float inv_count(float n) {
  float r = __int_as_float(0x7EF311C3 - __float_as_int(n));
  r = r * (2.f - n * r);
  r = r * (2.f - n * r);
  r = r * (2.f - n * r);
  return __fmaf_rn(r, __fmaf_rn(-n, r, 1.f), r);
}
__device__ __forceinline__ double inv_count(double n) { return __ddiv_rn(1.0, n); }

// ---------------------------------------------------------------- vectors
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Loads and stores go through a raw word of the pack's size (uint4 for 16
// bytes): loads with __ldg (x is never written by the kernel that reads it:
// outputs are fresh tensors), stores with an explicit st.global.v4/v2 (a Pack
// stored as a struct, or as a plain uint4, was split into 4-byte STGs by the
// compiler in some kernels; __stwb gives STG.STRONG).
template <int BYTES> struct RawOf;
template <> struct RawOf<16> { using type = uint4; };
template <> struct RawOf<8> { using type = uint2; };
template <> struct RawOf<4> { using type = unsigned int; };
template <> struct RawOf<2> { using type = unsigned short; };

__device__ __forceinline__ void st_raw(uint4* p, uint4 v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}
__device__ __forceinline__ void st_raw(uint2* p, uint2 v) {
  asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(v.x), "r"(v.y) : "memory");
}
__device__ __forceinline__ void st_raw(unsigned int* p, unsigned int v) { *p = v; }
__device__ __forceinline__ void st_raw(unsigned short* p, unsigned short v) { *p = v; }

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  using Raw = typename RawOf<sizeof(Pack<T, V>)>::type;
  const Raw raw = __ldg(reinterpret_cast<const Raw*>(p));
  Pack<T, V> r;
  memcpy(&r, &raw, sizeof(r));
  return r;
}

template <int V, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  using Raw = typename RawOf<sizeof(Pack<T, V>)>::type;
  Raw raw;
  memcpy(&raw, &v, sizeof(raw));
  st_raw(reinterpret_cast<Raw*>(p), raw);
}

// V consecutive floats (16-byte aligned for V >= 4, 8-byte for V == 2).
template <int V, typename acc_t>
__device__ __forceinline__ void load_floats(const float* __restrict__ p, acc_t (&o)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V / 4; ++i) {
      const float4 t = __ldg(reinterpret_cast<const float4*>(p) + i);
      o[4 * i + 0] = t.x;
      o[4 * i + 1] = t.y;
      o[4 * i + 2] = t.z;
      o[4 * i + 3] = t.w;
    }
  } else if constexpr (V == 2) {
    const float2 t = __ldg(reinterpret_cast<const float2*>(p));
    o[0] = t.x;
    o[1] = t.y;
  } else {
    static_assert(V == 1, "vector width");
    o[0] = __ldg(p);
  }
}

// ---------------------------------------------------------------- index math
// 32-bit multiply-shift division (ATen's IntDivider: dividend and divisor <= INT32_MAX).
struct Div32 {
  using index_t = uint32_t;
  at::cuda::detail::IntDivider<uint32_t> d;
  explicit Div32(int64_t v) : d(static_cast<uint32_t>(v)) {}
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return d.div(n); }
  __device__ __forceinline__ at::cuda::detail::DivMod<uint32_t> divmod(uint32_t n) const { return d.divmod(n); }
};

// Plain 64-bit division, for tensors past 32-bit indexing.
struct Div64 {
  using index_t = uint64_t;
  uint64_t d;
  explicit Div64(int64_t v) : d(static_cast<uint64_t>(v)) {}
  __device__ __forceinline__ uint64_t div(uint64_t n) const { return n / d; }
  __device__ __forceinline__ at::cuda::detail::DivMod<uint64_t> divmod(uint64_t n) const {
    const uint64_t q = n / d;
    return at::cuda::detail::DivMod<uint64_t>(q, n - q * d);
  }
};

// ---------------------------------------------------------------- Welford / Chan
template <typename acc_t>
struct Welford {
  acc_t n, mean, m2;
};

template <typename acc_t>
__device__ __forceinline__ void welford_add(Welford<acc_t>& w, acc_t v) {
  w.n += acc_t(1);
  const acc_t d = v - w.mean;
  w.mean += d * inv_count(w.n);
  w.m2 += d * (v - w.mean);
}

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> chan_merge(const Welford<acc_t>& a, const Welford<acc_t>& b) {
  const acc_t n = a.n + b.n;
  if (n == acc_t(0)) return a;
  const acc_t d = b.mean - a.mean;
  const acc_t fb = b.n * inv_count(n);
  return Welford<acc_t>{n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.n * fb};
}

// K independent Welford lanes fed in lockstep (one value each per add), so
// they share one count and one exact reciprocal per add.
template <typename acc_t, int K>
struct Lanes {
  acc_t n;
  acc_t mean[K], m2[K];

  __device__ __forceinline__ Lanes() : n(0) {
#pragma unroll
    for (int k = 0; k < K; ++k) mean[k] = m2[k] = acc_t(0);
  }

  __device__ __forceinline__ void add(const acc_t (&v)[K]) {
    n += acc_t(1);
    const acc_t inv = inv_count(n);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const acc_t d = v[k] - mean[k];
      mean[k] += d * inv;
      m2[k] += d * (v[k] - mean[k]);
    }
  }

  __device__ __forceinline__ Welford<acc_t> merged() const {
    Welford<acc_t> w{n, mean[0], m2[0]};
#pragma unroll
    for (int k = 1; k < K; ++k) w = chan_merge(w, Welford<acc_t>{n, mean[k], m2[k]});
    return w;
  }
};

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> warp_reduce(Welford<acc_t> w) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Welford<acc_t> o;
    o.n = __shfl_down_sync(0xffffffffu, w.n, off);
    o.mean = __shfl_down_sync(0xffffffffu, w.mean, off);
    o.m2 = __shfl_down_sync(0xffffffffu, w.m2, off);
    w = chan_merge(w, o);
  }
  return w;
}

// Whole-block merge (blockDim.x == kThreads); the result is valid in thread 0.
template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> block_reduce(Welford<acc_t> w) {
  __shared__ Welford<acc_t> sh[kThreads / 32];
  w = warp_reduce(w);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = w;
  __syncthreads();
  if (warp == 0) {
    w = lane < kThreads / 32 ? sh[lane] : Welford<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
    w = warp_reduce(w);
  }
  return w;
}

// ---------------------------------------------------------------- forward, channel-first
// Grid: G * S * C blocks, block id = (g * S + s) * C + c (channel fastest, so
// blocks running together read neighbouring planes). Block (g, s, c) walks the
// vectors [s * per_split, (s + 1) * per_split) of the channel's flattened
// (B, L / V) extent; vector q sits at plane q / (L / V), offset (q % (L / V)) * V.
template <typename scalar_t, int V, bool WY, typename Div>
__global__ void __launch_bounds__(kThreads) stat_planes_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const float* __restrict__ scale,
    const float* __restrict__ bias, at::opmath_type<scalar_t>* __restrict__ part, int C, int S, int64_t L,
    int64_t CL, int64_t BCL, typename Div::index_t nvec, typename Div::index_t per_split, Div div_lv, int64_t P) {
  using acc_t = at::opmath_type<scalar_t>;
  using I = typename Div::index_t;
  const unsigned bid = blockIdx.x;
  const int c = static_cast<int>(bid % static_cast<unsigned>(C));
  const unsigned gs = bid / static_cast<unsigned>(C);
  const int s = static_cast<int>(gs % static_cast<unsigned>(S));
  const int64_t g = gs / static_cast<unsigned>(S);
  const int64_t base = g * BCL + c * L;
  const scalar_t* xc = x + base;
  scalar_t* yc = WY ? y + base : nullptr;
  const acc_t sc = WY ? static_cast<acc_t>(scale[c]) : acc_t(0);
  const acc_t bi = WY ? static_cast<acc_t>(bias[c]) : acc_t(0);
  const I q0 = static_cast<I>(s) * per_split;
  const I q1 = nvec - q0 < per_split ? nvec : q0 + per_split;

  // element offset (from the channel's first element) of vector q
  auto offset = [&](I q) -> int64_t {
    const auto pm = div_lv.divmod(q);
    return static_cast<int64_t>(pm.div) * CL + static_cast<int64_t>(pm.mod) * V;
  };

  Welford<acc_t> w;
  I q = q0 + threadIdx.x;
  if constexpr (V > 1) {
    Lanes<acc_t, V> st;
    auto add = [&](const Pack<scalar_t, V>& p) {
      acc_t v[V];
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = static_cast<acc_t>(p.v[k]);
      st.add(v);
    };
    auto write = [&](const Pack<scalar_t, V>& p, int64_t o) {
      Pack<scalar_t, V> r;
#pragma unroll
      for (int k = 0; k < V; ++k) r.v[k] = static_cast<scalar_t>(static_cast<acc_t>(p.v[k]) * sc + bi);
      store_pack<V>(yc + o, r);
    };
    // two vectors in flight per thread (both loads before any store)
    for (; q + kThreads < q1; q += 2 * kThreads) {
      const int64_t o0 = offset(q), o1 = offset(q + kThreads);
      const Pack<scalar_t, V> p0 = load_pack<V>(xc + o0);
      const Pack<scalar_t, V> p1 = load_pack<V>(xc + o1);
      add(p0);
      add(p1);
      if constexpr (WY) {
        write(p0, o0);
        write(p1, o1);
      }
    }
    if (q < q1) {
      const int64_t o = offset(q);
      const Pack<scalar_t, V> p = load_pack<V>(xc + o);
      add(p);
      if constexpr (WY) write(p, o);
    }
    w = st.merged();
  } else {
    // scalar fallback: four loads in flight, four lanes; leftovers in a tail state
    Lanes<acc_t, 4> st;
    Welford<acc_t> tail{acc_t(0), acc_t(0), acc_t(0)};
    for (; q + 3 * kThreads < q1; q += 4 * kThreads) {
      int64_t o[4];
      acc_t v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) o[u] = offset(q + u * kThreads);
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = static_cast<acc_t>(xc[o[u]]);
      st.add(v);
      if constexpr (WY) {
#pragma unroll
        for (int u = 0; u < 4; ++u) yc[o[u]] = static_cast<scalar_t>(v[u] * sc + bi);
      }
    }
    for (; q < q1; q += kThreads) {
      const int64_t o = offset(q);
      const acc_t v = static_cast<acc_t>(xc[o]);
      welford_add(tail, v);
      if constexpr (WY) yc[o] = static_cast<scalar_t>(v * sc + bi);
    }
    w = chan_merge(st.merged(), tail);
  }
  w = block_reduce(w);
  if (threadIdx.x == 0) {
    part[bid] = w.n;
    part[P + bid] = w.mean;
    part[2 * P + bid] = w.m2;
  }
}

// ---------------------------------------------------------------- forward, channel-last
// Grid: G * S * ncb blocks, block id = (g * S + s) * ncb + cb. Thread
// (tx, ty) = (tid % TX, tid / TX) owns column vector cv = cb * TX + tx
// (channels cv * V .. cv * V + V - 1) and rows r0 + ty, r0 + ty + TY, ... of
// the split [r0, r1). A warp reads whole row segments: coalesced.
template <typename scalar_t, int V, bool WY>
__global__ void __launch_bounds__(kThreads, 4) stat_rows_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const float* __restrict__ scale,
    const float* __restrict__ bias, at::opmath_type<scalar_t>* __restrict__ part, int64_t R, int C, int ncv, int TX,
    int TY, int ncb, int S, int64_t rows_per_split, int64_t P) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int K = V > 1 ? V : 4;  // Welford lanes: one per channel (V > 1) or four row slots (V == 1)
  __shared__ acc_t s_n[kThreads];
  __shared__ acc_t s_mean[kThreads * V];
  __shared__ acc_t s_m2[kThreads * V];

  const unsigned bid = blockIdx.x;
  const int cb = static_cast<int>(bid % static_cast<unsigned>(ncb));
  const unsigned gs = bid / static_cast<unsigned>(ncb);
  const int s = static_cast<int>(gs % static_cast<unsigned>(S));
  const int64_t g = gs / static_cast<unsigned>(S);
  const int tid = threadIdx.x;
  const int tx = tid % TX, ty = tid / TX;
  const int cv = cb * TX + tx;
  const bool slot = ty < TY;  // threads past TX * TY idle
  const bool active = slot && cv < ncv;
  const int64_t r0 = static_cast<int64_t>(s) * rows_per_split;
  const int64_t r1 = R - r0 < rows_per_split ? R : r0 + rows_per_split;

  Lanes<acc_t, K> st;
  Welford<acc_t> tail{acc_t(0), acc_t(0), acc_t(0)};
  if (active) {
    const int c0 = cv * V;
    const int64_t step = static_cast<int64_t>(TY) * C;
    int64_t r = r0 + ty;
    int64_t off = (g * R + r) * C + c0;
    if constexpr (V > 1) {
      acc_t sc[V], bi[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        sc[k] = WY ? static_cast<acc_t>(scale[c0 + k]) : acc_t(0);
        bi[k] = WY ? static_cast<acc_t>(bias[c0 + k]) : acc_t(0);
      }
      auto add = [&](const Pack<scalar_t, V>& p) {
        acc_t v[V];
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = static_cast<acc_t>(p.v[k]);
        st.add(v);
      };
      auto write = [&](const Pack<scalar_t, V>& p, int64_t o) {
        Pack<scalar_t, V> q;
#pragma unroll
        for (int k = 0; k < V; ++k) q.v[k] = static_cast<scalar_t>(static_cast<acc_t>(p.v[k]) * sc[k] + bi[k]);
        store_pack<V>(y + o, q);
      };
      // two rows in flight per thread (both loads before any store)
      for (; r + TY < r1; r += 2 * TY, off += 2 * step) {
        const Pack<scalar_t, V> p0 = load_pack<V>(x + off);
        const Pack<scalar_t, V> p1 = load_pack<V>(x + off + step);
        add(p0);
        add(p1);
        if constexpr (WY) {
          write(p0, off);
          write(p1, off + step);
        }
      }
      if (r < r1) {
        const Pack<scalar_t, V> p = load_pack<V>(x + off);
        add(p);
        if constexpr (WY) write(p, off);
      }
    } else {
      const acc_t sc = WY ? static_cast<acc_t>(scale[c0]) : acc_t(0);
      const acc_t bi = WY ? static_cast<acc_t>(bias[c0]) : acc_t(0);
      for (; r + 3 * TY < r1; r += 4 * TY, off += 4 * step) {
        acc_t v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = static_cast<acc_t>(x[off + u * step]);
        st.add(v);
        if constexpr (WY) {
#pragma unroll
          for (int u = 0; u < 4; ++u) y[off + u * step] = static_cast<scalar_t>(v[u] * sc + bi);
        }
      }
      for (; r < r1; r += TY, off += step) {
        const acc_t v = static_cast<acc_t>(x[off]);
        welford_add(tail, v);
        if constexpr (WY) y[off] = static_cast<scalar_t>(v * sc + bi);
      }
    }
  }

  // Stage per-thread states (slot tid = ty * TX + tx), then merge the TY row
  // lanes of every column vector with a tree: after the step with stride h,
  // slots [0, h) of each column hold everything.
  if (slot) {
    if constexpr (V > 1) {
      s_n[tid] = st.n;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        s_mean[tid * V + k] = st.mean[k];
        s_m2[tid * V + k] = st.m2[k];
      }
    } else {
      const Welford<acc_t> w = chan_merge(st.merged(), tail);
      s_n[tid] = w.n;
      s_mean[tid] = w.mean;
      s_m2[tid] = w.m2;
    }
  }
  int h = 1;
  while (h < TY) h <<= 1;
  for (h >>= 1; h > 0; h >>= 1) {
    __syncthreads();
    if (slot && ty < h && ty + h < TY) {
      const int o = tid + h * TX;
      const acc_t na = s_n[tid], nb = s_n[o];
      const acc_t n = na + nb;
      if (nb > acc_t(0)) {
        const acc_t fb = nb * inv_count(n);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const acc_t d = s_mean[o * V + k] - s_mean[tid * V + k];
          s_mean[tid * V + k] += d * fb;
          s_m2[tid * V + k] += s_m2[o * V + k] + d * d * na * fb;
        }
      }
      s_n[tid] = n;
    }
  }
  __syncthreads();
  if (ty == 0 && cv < ncv) {
    // (g * S + s) * ncb + cb == bid, so (g * S + s) == bid / ncb (nothing kept live across the loops)
    const int64_t o = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(ncb)) * C + static_cast<int64_t>(cv) * V;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      part[o + k] = s_n[tid];
      part[P + o + k] = s_mean[tid * V + k];
      part[2 * P + o + k] = s_m2[tid * V + k];
    }
  }
}

// ---------------------------------------------------------------- forward, merge of the partials
// One block per (g, c): its S partials (S reaches 16 x SMs for channels-last data) are
// reduced by all threads of the block, in double: first the count and the sum of
// count x mean, then (Chan) the sum of M2 + count x (mean - mu)^2 about the merged mean.
// One thread per (g, c) looping over S serially was latency-bound: ~240 us per call
// at S = 2112 on an H200 (ResNet-18, channels_last), 4.8 ms per recovery iteration.
constexpr int kFinThreads = 256;

template <typename part_t>
__global__ void __launch_bounds__(kFinThreads) stat_finalize_kernel(const part_t* __restrict__ part,
                                                                   float* __restrict__ mean,
                                                                   float* __restrict__ var, int64_t C, int64_t S,
                                                                   int64_t P) {
  const int64_t i = blockIdx.x;  // g * C + c
  const int64_t g = i / C, c = i - g * C;
  const part_t* pn = part + g * S * C + c;
  const int tid = threadIdx.x;
  __shared__ double s_n[kFinThreads];
  __shared__ double s_v[kFinThreads];
  double n = 0.0, sum = 0.0;
  for (int64_t s = tid; s < S; s += kFinThreads) {
    const double k = static_cast<double>(pn[s * C]);
    n += k;
    sum += k * static_cast<double>(pn[P + s * C]);
  }
  s_n[tid] = n;
  s_v[tid] = sum;
  __syncthreads();
  for (int w = kFinThreads / 2; w > 0; w >>= 1) {
    if (tid < w) {
      s_n[tid] += s_n[tid + w];
      s_v[tid] += s_v[tid + w];
    }
    __syncthreads();
  }
  const double ntot = s_n[0];
  const double mu = s_v[0] / ntot;
  __syncthreads();  // every thread has read s_v[0] before it is reused
  double m2 = 0.0;
  for (int64_t s = tid; s < S; s += kFinThreads) {
    const double d = static_cast<double>(pn[P + s * C]) - mu;
    m2 += static_cast<double>(pn[2 * P + s * C]) + static_cast<double>(pn[s * C]) * d * d;
  }
  s_v[tid] = m2;
  __syncthreads();
  for (int w = kFinThreads / 2; w > 0; w >>= 1) {
    if (tid < w) s_v[tid] += s_v[tid + w];
    __syncthreads();
  }
  if (tid == 0) {
    mean[i] = static_cast<float>(mu);
    var[i] = static_cast<float>(s_v[0] / ntot);
  }
}

// ---------------------------------------------------------------- backward
// Channel-first: vector iv (elements iv * V ..) lies in plane p = iv / (L / V)
// (L % V == 0), channel p % C, group p / (B * C).
template <typename scalar_t, int V, typename Div>
__global__ void __launch_bounds__(kThreads) bwd_planes_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, const float* __restrict__ scale,
    const float* __restrict__ m, const float* __restrict__ a, const float* __restrict__ b, scalar_t* __restrict__ dx,
    typename Div::index_t nvec, Div div_lv, Div div_c, Div div_bc, int64_t C, bool has_dy) {
  using acc_t = at::opmath_type<scalar_t>;
  using I = typename Div::index_t;
  const I stride = static_cast<I>(gridDim.x) * kThreads;
  for (I iv = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; iv < nvec; iv += stride) {
    const I p = div_lv.div(iv);
    const I c = div_c.divmod(p).mod;
    const int64_t k = static_cast<int64_t>(div_bc.div(p)) * C + static_cast<int64_t>(c);
    const acc_t mm = __ldg(m + k), bb = __ldg(b + k), aa = __ldg(a + k);
    const int64_t o = static_cast<int64_t>(iv) * V;
    const Pack<scalar_t, V> xv = load_pack<V>(x + o);
    Pack<scalar_t, V> r;
    if (has_dy) {
      const Pack<scalar_t, V> dv = load_pack<V>(dy + o);
      const acc_t ss = __ldg(scale + c);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc_t t = (static_cast<acc_t>(xv.v[j]) - mm) * bb + aa;
        t += static_cast<acc_t>(dv.v[j]) * ss;
        r.v[j] = static_cast<scalar_t>(t);
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) r.v[j] = static_cast<scalar_t>((static_cast<acc_t>(xv.v[j]) - mm) * bb + aa);
    }
    store_pack<V>(dx + o, r);
  }
}

// Channel-last: vector iv is row iv / (C / V) (C % V == 0), channels
// (iv % (C / V)) * V ..; group row / R. Coefficients as float vectors.
template <typename scalar_t, int V, typename Div>
__global__ void __launch_bounds__(kThreads) bwd_rows_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, const float* __restrict__ scale,
    const float* __restrict__ m, const float* __restrict__ a, const float* __restrict__ b, scalar_t* __restrict__ dx,
    typename Div::index_t nvec, Div div_ncv, Div div_r, int64_t C, bool has_dy) {
  using acc_t = at::opmath_type<scalar_t>;
  using I = typename Div::index_t;
  const I stride = static_cast<I>(gridDim.x) * kThreads;
  for (I iv = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; iv < nvec; iv += stride) {
    const auto rc = div_ncv.divmod(iv);
    const int64_t c0 = static_cast<int64_t>(rc.mod) * V;
    const int64_t k0 = static_cast<int64_t>(div_r.div(rc.div)) * C + c0;
    const int64_t o = static_cast<int64_t>(iv) * V;
    const Pack<scalar_t, V> xv = load_pack<V>(x + o);
    acc_t mm[V], aa[V], bb[V];
    load_floats<V>(m + k0, mm);
    load_floats<V>(b + k0, bb);
    load_floats<V>(a + k0, aa);
    Pack<scalar_t, V> r;
    if (has_dy) {
      const Pack<scalar_t, V> dv = load_pack<V>(dy + o);
      acc_t ss[V];
      load_floats<V>(scale + c0, ss);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc_t t = (static_cast<acc_t>(xv.v[j]) - mm[j]) * bb[j] + aa[j];
        t += static_cast<acc_t>(dv.v[j]) * ss[j];
        r.v[j] = static_cast<scalar_t>(t);
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        r.v[j] = static_cast<scalar_t>((static_cast<acc_t>(xv.v[j]) - mm[j]) * bb[j] + aa[j]);
    }
    store_pack<V>(dx + o, r);
  }
}

// ---------------------------------------------------------------- host
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count(const at::Tensor& x) { return at::cuda::getDeviceProperties(x.get_device())->multiProcessorCount; }

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Widest vector (16 bytes, else 8 bytes, else scalar) that divides `len` and
// whose size every pointer is aligned to.
int pick_vec(int64_t len, int64_t elem_size, std::initializer_list<const void*> ptrs) {
  for (int64_t v = 16 / elem_size; v > 1 && v * elem_size >= 8; v /= 2) {
    bool ok = len % v == 0;
    for (const void* p : ptrs) ok = ok && (p == nullptr || aligned(p, v * elem_size));
    if (ok) return static_cast<int>(v);
  }
  return 1;
}

// Calls f(std::integral_constant<int, V>) for the widths instantiated for
// scalar_t: 16-byte, 8-byte (when wider than one element) and scalar.
template <typename scalar_t, typename F>
void with_vec(int v, F&& f) {
  constexpr int VM = static_cast<int>(16 / sizeof(scalar_t));
  constexpr int VH = VM / 2 > 1 ? VM / 2 : 1;
  if (v == VM) f(std::integral_constant<int, VM>{});
  else if (v == VH) f(std::integral_constant<int, VH>{});
  else f(std::integral_constant<int, 1>{});
}

std::tuple<at::Tensor, at::Tensor> bn_stat_fwd_cuda(const at::Tensor& x, const at::Tensor& shift,
                                                    const at::Tensor& scale, const at::Tensor& bias,
                                                    const at::Tensor& y) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && (x.dim() == 3 || x.dim() == 4), "bn_stat: bad x");
  const c10::cuda::CUDAGuard guard(x.device());
  const bool cf = x.dim() == 4;
  const int64_t G = x.size(0), C = x.size(2);
  const bool write_y = y.numel() > 0;
  if (write_y) {
    TORCH_CHECK(y.sizes() == x.sizes() && y.is_contiguous() && y.scalar_type() == x.scalar_type() &&
                    y.device() == x.device(),
                "bn_stat: bad y");
    TORCH_CHECK(scale.numel() == C && bias.numel() == C && scale.scalar_type() == at::kFloat &&
                    bias.scalar_type() == at::kFloat && scale.is_contiguous() && bias.is_contiguous() &&
                    scale.device() == x.device() && bias.device() == x.device(),
                "bn_stat: bad scale/bias");
  }
  (void)shift;  // Welford needs no shift
  auto mean = at::empty({G, C}, x.options().dtype(at::kFloat));
  auto var = at::empty({G, C}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {  // empty reduction: 0 / 0, as the CPU kernel
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    var.fill_(std::numeric_limits<float>::quiet_NaN());
    return {mean, var};
  }
  TORCH_CHECK(C <= INT32_MAX && G <= INT32_MAX, "bn_stat: too many channels/groups");
  const int64_t target = 16 * static_cast<int64_t>(sm_count(x));  // >= 16 blocks per SM where the work allows
  const int64_t esz = x.element_size();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto stream = at::cuda::getCurrentCUDAStream();
  const void* yptr = write_y ? y.data_ptr() : nullptr;
  int64_t S;
  at::Tensor part;

  if (cf) {
    const int64_t B = x.size(1), L = x.size(3), BL = B * L;
    int V = pick_vec(L, esz, {x.data_ptr(), yptr});
    // 32-bit divmod needs dividends and divisor <= INT32_MAX (vectors past the end included);
    // past that (one channel of one group over 2^31 vectors) the scalar 64-bit variant
    const bool use64 = BL / V + 4 * kThreads > INT32_MAX;
    if (use64) V = 1;
    const int64_t nvec = BL / V;
    // each block at least four vectors (or one 4-element round) per thread
    S = std::max<int64_t>(1, std::min<int64_t>(cdiv(target, G * C), nvec / (4 * kThreads)));
    S = std::max<int64_t>(S, cdiv(BL, kMaxPartialCount));
    const int64_t per_split = cdiv(nvec, S);
    S = cdiv(nvec, per_split);
    TORCH_CHECK(G * C * S <= INT32_MAX, "bn_stat: grid too large");
    const int64_t P = G * S * C;
    part = at::empty({3, P}, x.options().dtype(acc_dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stat_fwd_cuda_planes", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_vec<scalar_t>(V, [&](auto vc) {
        constexpr int VV = decltype(vc)::value;
        auto launch = [&](auto div, auto wy) {
          using D = decltype(div);
          using I = typename D::index_t;
          stat_planes_kernel<scalar_t, VV, decltype(wy)::value, D><<<static_cast<unsigned>(P), kThreads, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), write_y ? y.data_ptr<scalar_t>() : nullptr,
              write_y ? scale.const_data_ptr<float>() : nullptr, write_y ? bias.const_data_ptr<float>() : nullptr,
              part.data_ptr<acc_t>(), static_cast<int>(C), static_cast<int>(S), L, C * L, B * C * L,
              static_cast<I>(nvec), static_cast<I>(per_split), div, P);
        };
        if (!use64) {
          if (write_y) launch(Div32(L / VV), std::true_type{});
          else launch(Div32(L / VV), std::false_type{});
        } else if constexpr (VV == 1) {
          if (write_y) launch(Div64(L), std::true_type{});
          else launch(Div64(L), std::false_type{});
        }
      });
    });
  } else {
    const int64_t R = x.size(1);
    const int V = pick_vec(C, esz, {x.data_ptr(), yptr});
    const int64_t ncv = C / V;
    const int TX = static_cast<int>(std::min<int64_t>(ncv, 32));
    const int TY = kThreads / TX;
    const int64_t ncb = cdiv(ncv, TX);
    // each row lane at least four rows
    S = std::max<int64_t>(1, std::min<int64_t>(cdiv(target, G * ncb), R / (4 * TY)));
    S = std::max<int64_t>(S, cdiv(R, kMaxPartialCount));
    const int64_t rows_per_split = cdiv(R, S);
    S = cdiv(R, rows_per_split);
    TORCH_CHECK(G * S * ncb <= INT32_MAX, "bn_stat: grid too large");
    const int64_t P = G * S * C;
    part = at::empty({3, P}, x.options().dtype(acc_dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stat_fwd_cuda_rows", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_vec<scalar_t>(V, [&](auto vc) {
        constexpr int VV = decltype(vc)::value;
        auto launch = [&](auto wy) {
          stat_rows_kernel<scalar_t, VV, decltype(wy)::value>
              <<<static_cast<unsigned>(G * S * ncb), kThreads, 0, stream>>>(
                  x.const_data_ptr<scalar_t>(), write_y ? y.data_ptr<scalar_t>() : nullptr,
                  write_y ? scale.const_data_ptr<float>() : nullptr, write_y ? bias.const_data_ptr<float>() : nullptr,
                  part.data_ptr<acc_t>(), R, static_cast<int>(C), static_cast<int>(ncv), TX, TY,
                  static_cast<int>(ncb), static_cast<int>(S), rows_per_split, P);
        };
        if (write_y) launch(std::true_type{});
        else launch(std::false_type{});
      });
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t GC = G * C;
  TORCH_CHECK(GC <= INT32_MAX, "bn_stat: too many channels x groups");
  AT_DISPATCH_FLOATING_TYPES(part.scalar_type(), "bn_stat_fwd_cuda_finalize", [&] {
    stat_finalize_kernel<scalar_t><<<static_cast<unsigned>(GC), kFinThreads, 0, stream>>>(
        part.const_data_ptr<scalar_t>(), mean.data_ptr<float>(), var.data_ptr<float>(), C, S, G * S * C);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, var};
}

void bn_stat_bwd_cuda(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& scale, const at::Tensor& m,
                      const at::Tensor& a, const at::Tensor& b, const at::Tensor& dx) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && (x.dim() == 3 || x.dim() == 4), "bn_stat: bad x");
  const c10::cuda::CUDAGuard guard(x.device());
  const bool cf = x.dim() == 4;
  const int64_t G = x.size(0), C = x.size(2);
  const int64_t total = x.numel();
  const bool has_dy = dy.numel() > 0;
  TORCH_CHECK(dx.sizes() == x.sizes() && dx.is_contiguous() && dx.scalar_type() == x.scalar_type() &&
                  dx.device() == x.device(),
              "bn_stat: bad dx");
  for (const auto* t : {&m, &a, &b})
    TORCH_CHECK(t->numel() == G * C && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->device() == x.device(),
                "bn_stat: bad coefficients");
  if (has_dy)
    TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == x.scalar_type() &&
                    dy.device() == x.device() && scale.numel() == C && scale.scalar_type() == at::kFloat &&
                    scale.is_contiguous() && scale.device() == x.device(),
                "bn_stat: bad dy/scale");
  if (total == 0) return;
  const int64_t esz = x.element_size();
  const bool use64 = total > INT32_MAX;  // 32-bit index math below 2^31 elements
  const void* dyp = has_dy ? dy.data_ptr() : nullptr;
  int V;
  if (cf) {
    V = pick_vec(x.size(3), esz, {x.data_ptr(), dyp, dx.data_ptr()});
  } else {
    // vectors of channels also read m, a, b (and scale) as float vectors
    V = pick_vec(C, esz, {x.data_ptr(), dyp, dx.data_ptr()});
    for (const void* p : {m.data_ptr(), a.data_ptr(), b.data_ptr(), has_dy ? scale.data_ptr() : nullptr})
      if (p != nullptr && !aligned(p, 16)) V = 1;
  }
  if (use64 && V != 16 / esz) V = 1;  // 64-bit variants: 16-byte and scalar only
  const int64_t nvec = total / V;
  const int64_t blocks = std::min<int64_t>(cdiv(nvec, kThreads), 32LL * sm_count(x));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stat_bwd_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dp = has_dy ? dy.const_data_ptr<scalar_t>() : nullptr;
    const float* sp = has_dy ? scale.const_data_ptr<float>() : nullptr;
    const float *mp = m.const_data_ptr<float>(), *ap = a.const_data_ptr<float>(), *bp = b.const_data_ptr<float>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    with_vec<scalar_t>(V, [&](auto vc) {
      constexpr int VV = decltype(vc)::value;
      auto launch = [&](auto div_tag) {
        using D = decltype(div_tag);
        using I = typename D::index_t;
        if (cf) {
          const int64_t L = x.size(3), B = x.size(1);
          bwd_planes_kernel<scalar_t, VV, D><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
              xp, dp, sp, mp, ap, bp, dxp, static_cast<I>(nvec), D(L / VV), D(C), D(B * C), C, has_dy);
        } else {
          bwd_rows_kernel<scalar_t, VV, D><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
              xp, dp, sp, mp, ap, bp, dxp, static_cast<I>(nvec), D(C / VV), D(x.size(1)), C, has_dy);
        }
      };
      if (!use64) {
        launch(Div32(1));
      } else if constexpr (VV == 1 || VV * sizeof(scalar_t) == 16) {
        launch(Div64(1));
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(srel_fast, CUDA, m) {
  m.impl("_ext_bn_stat_loss_fwd", &bn_stat_fwd_cuda);
  m.impl("_ext_bn_stat_loss_bwd", &bn_stat_bwd_cuda);
}
