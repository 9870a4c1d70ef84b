// BatchNorm statistics matching: CPU kernels (at::parallel_for / OpenMP) and
// the schema of the srel_fast::_ext_bn_stat_loss_* ops (their CUDA kernels are in
// bn_stat_loss_cuda.cu). Called from kernels/bn_stat_loss.py with canonical views:
//
//   x: (G, B, C, L) contiguous   channel-first ("cf": NCHW, (N, C, L))
//   x: (G, R, C)    contiguous   channel-last  ("cl": NHWC, (N, C), R = B*H*W)
//
// _ext_bn_stat_loss_fwd(x, shift, scale, bias, y) -> (mean, var), float32 (G, C):
//   one read of x; if y.numel() > 0 also writes y = x * scale[c] + bias[c]
//   (eval-mode BatchNorm) in x's dtype into y (same canonical shape).
//   Numerics: per (group, channel) sums of (x - shift[c]) and (x - shift[c])^2
//   accumulated in float64 (shift = the running mean), so there is no
//   cancellation even when |mean| >> std.
// _ext_bn_stat_loss_bwd(x, dy, scale, m, a, b, dx): one elementwise pass
//   dx = (x - m[g,c]) * b[g,c] + a[g,c]  (+ dy * scale[c] if dy.numel() > 0).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

void check_inputs(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3 || x.dim() == 4, "bn_stat: expected a canonical 3-D or 4-D view, got ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous(), "bn_stat: canonical view must be contiguous");
}

// The inner loops are written so that the compiler vectorises them, and are compiled once per
// x86 ISA level (target_clones: the loader picks the widest the CPU has), because the package is
// built without -march. Scalar code with c10's bf16 conversions ran about 20x slower than a copy of
// the same bytes; these loops are what the CPU default fast path (bf16, channels_last) spends its
// BN time in. bf16 travels as its raw 16 bits (Bf16), converted with shifts and a select that
// vectorise; other dtypes go through c10's conversions.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SREL_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SREL_ISA_CLONES
#endif
#define SREL_INLINE inline __attribute__((always_inline))

struct Bf16 {
  uint16_t bits;
};

template <typename T>
SREL_INLINE float load(const T v) {
  return static_cast<float>(v);
}
template <>
SREL_INLINE float load<Bf16>(const Bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
template <typename T>
SREL_INLINE T store(const float f) {
  return static_cast<T>(f);
}
template <>
SREL_INLINE Bf16 store<Bf16>(const float f) {  // round to nearest even, NaN stays NaN (as c10::BFloat16)
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return Bf16{static_cast<uint16_t>(f != f ? 0x7fc0u : rounded)};
}

constexpr int kLanes = 16;  // independent float64 partial sums per plane, so the sum vectorises

// (one plane of L elements): sums of (x - k) and (x - k)^2 in float64; y = x * sc + bi if y.
template <typename T, bool kWriteY>
SREL_INLINE void plane_stats_loop(const T* __restrict p, T* __restrict y, int64_t L, float k, float sc, float bi,
                                  double* s1, double* s2) {
  double a1[kLanes] = {0.0}, a2[kLanes] = {0.0};
  int64_t l = 0;
  for (; l + kLanes <= L; l += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float v = load<T>(p[l + j]);
      const double d = static_cast<double>(v - k);
      a1[j] += d;
      a2[j] += d * d;
      if (kWriteY) y[l + j] = store<T>(v * sc + bi);
    }
  }
  for (; l < L; ++l) {
    const float v = load<T>(p[l]);
    const double d = static_cast<double>(v - k);
    a1[0] += d;
    a2[0] += d * d;
    if (kWriteY) y[l] = store<T>(v * sc + bi);
  }
  double t1 = 0.0, t2 = 0.0;
  for (int j = 0; j < kLanes; ++j) {
    t1 += a1[j];
    t2 += a2[j];
  }
  *s1 += t1;
  *s2 += t2;
}
template <typename T>
SREL_INLINE void plane_stats_impl(const T* p, T* y, int64_t L, float k, float sc, float bi, double* s1, double* s2) {
  if (y)
    plane_stats_loop<T, true>(p, y, L, k, sc, bi, s1, s2);
  else
    plane_stats_loop<T, false>(p, y, L, k, sc, bi, s1, s2);
}

// (one row of C channels, channel-last): s1[c] += x - shift[c], s2[c] += (x - shift[c])^2; y likewise.
template <typename T>
SREL_INLINE void row_stats_impl(const T* __restrict p, T* __restrict y, int64_t C, const float* __restrict shift,
                                const float* __restrict scale, const float* __restrict bias, double* __restrict s1,
                                double* __restrict s2) {
  if (y) {
    for (int64_t c = 0; c < C; ++c) {
      const float v = load<T>(p[c]);
      const double d = static_cast<double>(v - shift[c]);
      s1[c] += d;
      s2[c] += d * d;
      y[c] = store<T>(v * scale[c] + bias[c]);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const double d = static_cast<double>(load<T>(p[c]) - shift[c]);
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

// dx = (x - m) * b + a (+ dy * s): per plane (cf, scalar coefficients) or per row (cl, per channel).
template <typename T>
SREL_INLINE void plane_bwd_impl(const T* __restrict x, const T* __restrict dy, T* __restrict dx, int64_t L, float m,
                                float a, float b, float s) {
  if (dy) {
    for (int64_t l = 0; l < L; ++l) dx[l] = store<T>((load<T>(x[l]) - m) * b + a + load<T>(dy[l]) * s);
  } else {
    for (int64_t l = 0; l < L; ++l) dx[l] = store<T>((load<T>(x[l]) - m) * b + a);
  }
}
template <typename T>
SREL_INLINE void row_bwd_impl(const T* __restrict x, const T* __restrict dy, T* __restrict dx, int64_t C,
                              const float* __restrict m, const float* __restrict a, const float* __restrict b,
                              const float* __restrict s) {
  if (dy) {
    for (int64_t c = 0; c < C; ++c) dx[c] = store<T>((load<T>(x[c]) - m[c]) * b[c] + a[c] + load<T>(dy[c]) * s[c]);
  } else {
    for (int64_t c = 0; c < C; ++c) dx[c] = store<T>((load<T>(x[c]) - m[c]) * b[c] + a[c]);
  }
}

// One ISA-cloned entry per (loop, dtype); the templates above are inlined into each clone.
#define SREL_DEFINE_LOOPS(T)                                                                                    \
  SREL_ISA_CLONES void plane_stats(const T* p, T* y, int64_t L, float k, float sc, float bi, double* s1,       \
                                   double* s2) {                                                               \
    plane_stats_impl<T>(p, y, L, k, sc, bi, s1, s2);                                                           \
  }                                                                                                             \
  SREL_ISA_CLONES void row_stats(const T* p, T* y, int64_t C, const float* shift, const float* scale,          \
                                 const float* bias, double* s1, double* s2) {                                  \
    row_stats_impl<T>(p, y, C, shift, scale, bias, s1, s2);                                                    \
  }                                                                                                             \
  SREL_ISA_CLONES void plane_bwd(const T* x, const T* dy, T* dx, int64_t L, float m, float a, float b, float s) { \
    plane_bwd_impl<T>(x, dy, dx, L, m, a, b, s);                                                               \
  }                                                                                                             \
  SREL_ISA_CLONES void row_bwd(const T* x, const T* dy, T* dx, int64_t C, const float* m, const float* a,       \
                               const float* b, const float* s) {                                               \
    row_bwd_impl<T>(x, dy, dx, C, m, a, b, s);                                                                 \
  }
SREL_DEFINE_LOOPS(float)
SREL_DEFINE_LOOPS(double)
SREL_DEFINE_LOOPS(Bf16)
SREL_DEFINE_LOOPS(at::Half)
#undef SREL_DEFINE_LOOPS

// The loops' element type for a tensor dtype (bf16 as raw bits).
template <typename scalar_t>
struct Elem {
  using type = scalar_t;
};
template <>
struct Elem<at::BFloat16> {
  using type = Bf16;
};

template <typename T>
void fwd_cf(const T* x, T* y, const float* shift, const float* scale, const float* bias, float* mean, float* var,
            int64_t G, int64_t B, int64_t C, int64_t L) {
  const double M = static_cast<double>(B * L);
  at::parallel_for(0, G * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gc = begin; gc < end; ++gc) {
      const int64_t g = gc / C, c = gc % C;
      const float k = shift[c];
      const float sc = y ? scale[c] : 0.f, bi = y ? bias[c] : 0.f;
      double s1 = 0.0, s2 = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t off = ((g * B + b) * C + c) * L;
        plane_stats(x + off, y ? y + off : nullptr, L, k, sc, bi, &s1, &s2);
      }
      const double m1 = s1 / M;
      mean[gc] = static_cast<float>(k + m1);
      var[gc] = static_cast<float>(std::max(s2 / M - m1 * m1, 0.0));
    }
  });
}

template <typename T>
void fwd_cl(const T* x, T* y, const float* shift, const float* scale, const float* bias, float* mean, float* var,
            int64_t G, int64_t R, int64_t C) {
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(R, (4 * nthreads + G - 1) / G));
  const int64_t rows_per = (R + chunks - 1) / chunks;
  std::vector<double> acc(static_cast<size_t>(G * chunks * C * 2), 0.0);
  at::parallel_for(0, G * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / chunks, k = t % chunks;
      const int64_t r0 = k * rows_per, r1 = std::min(R, r0 + rows_per);
      double* s1 = acc.data() + t * C * 2;
      double* s2 = s1 + C;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = (g * R + r) * C;
        row_stats(x + off, y ? y + off : nullptr, C, shift, scale, bias, s1, s2);
      }
    }
  });
  const double M = static_cast<double>(R);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t c = 0; c < C; ++c) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t k = 0; k < chunks; ++k) {
        const double* a = acc.data() + (g * chunks + k) * C * 2;
        s1 += a[c];
        s2 += a[C + c];
      }
      const double m1 = s1 / M;
      mean[g * C + c] = static_cast<float>(shift[c] + m1);
      var[g * C + c] = static_cast<float>(std::max(s2 / M - m1 * m1, 0.0));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> bn_stat_fwd_cpu(const at::Tensor& x, const at::Tensor& shift,
                                                   const at::Tensor& scale, const at::Tensor& bias,
                                                   const at::Tensor& y) {
  check_inputs(x);
  const bool cf = x.dim() == 4;
  const int64_t G = x.size(0), C = cf ? x.size(2) : x.size(2);
  TORCH_CHECK(shift.numel() == C && shift.scalar_type() == at::kFloat && shift.is_contiguous(), "bn_stat: bad shift");
  const bool write_y = y.numel() > 0;
  if (write_y) {
    TORCH_CHECK(y.sizes() == x.sizes() && y.is_contiguous() && y.scalar_type() == x.scalar_type(), "bn_stat: bad y");
    TORCH_CHECK(scale.numel() == C && bias.numel() == C && scale.scalar_type() == at::kFloat &&
                    bias.scalar_type() == at::kFloat && scale.is_contiguous() && bias.is_contiguous(),
                "bn_stat: bad scale/bias");
  }
  auto mean = at::empty({G, C}, x.options().dtype(at::kFloat));
  auto var = at::empty({G, C}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stat_fwd_cpu", [&] {
    using T = typename Elem<scalar_t>::type;
    const T* xp = reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>());
    T* yp = write_y ? reinterpret_cast<T*>(y.data_ptr<scalar_t>()) : nullptr;
    const float* sp = write_y ? scale.const_data_ptr<float>() : nullptr;
    const float* bp = write_y ? bias.const_data_ptr<float>() : nullptr;
    if (cf)
      fwd_cf<T>(xp, yp, shift.const_data_ptr<float>(), sp, bp, mean.data_ptr<float>(), var.data_ptr<float>(), G,
                       x.size(1), C, x.size(3));
    else
      fwd_cl<T>(xp, yp, shift.const_data_ptr<float>(), sp, bp, mean.data_ptr<float>(), var.data_ptr<float>(), G,
                       x.size(1), C);
  });
  return {mean, var};
}

void bn_stat_bwd_cpu(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& scale, const at::Tensor& m,
                     const at::Tensor& a, const at::Tensor& b, const at::Tensor& dx) {
  check_inputs(x);
  const bool cf = x.dim() == 4;
  const int64_t G = x.size(0), C = x.size(2);
  const int64_t L = cf ? x.size(3) : 1;
  const int64_t P = cf ? x.size(1) * C : x.size(1);  // planes (cf) or rows (cl) per group
  const bool has_dy = dy.numel() > 0;
  TORCH_CHECK(dx.sizes() == x.sizes() && dx.is_contiguous() && dx.scalar_type() == x.scalar_type(), "bn_stat: bad dx");
  for (const auto* t : {&m, &a, &b})
    TORCH_CHECK(t->numel() == G * C && t->scalar_type() == at::kFloat && t->is_contiguous(), "bn_stat: bad coefficients");
  if (has_dy) {
    TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == x.scalar_type(), "bn_stat: bad dy");
    TORCH_CHECK(scale.numel() == C && scale.scalar_type() == at::kFloat && scale.is_contiguous(), "bn_stat: bad scale");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stat_bwd_cpu", [&] {
    using T = typename Elem<scalar_t>::type;
    const T* xp = reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>());
    const T* dyp = has_dy ? reinterpret_cast<const T*>(dy.const_data_ptr<scalar_t>()) : nullptr;
    T* dxp = reinterpret_cast<T*>(dx.data_ptr<scalar_t>());
    const float* sp = has_dy ? scale.const_data_ptr<float>() : nullptr;
    const float* mp = m.const_data_ptr<float>();
    const float* ap = a.const_data_ptr<float>();
    const float* bp = b.const_data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cf ? L : C));
    at::parallel_for(0, G * P, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t g = t / P;
        if (cf) {
          const int64_t gc = g * C + t % C, off = t * L;
          plane_bwd(xp + off, dyp ? dyp + off : nullptr, dxp + off, L, mp[gc], ap[gc], bp[gc],
                    has_dy ? sp[t % C] : 0.f);
        } else {
          const int64_t off = t * C;
          row_bwd(xp + off, dyp ? dyp + off : nullptr, dxp + off, C, mp + g * C, ap + g * C, bp + g * C, sp);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(srel_fast, m) {
  m.def("_ext_bn_stat_loss_fwd(Tensor x, Tensor shift, Tensor scale, Tensor bias, Tensor(a!) y) -> (Tensor, Tensor)");
  m.def("_ext_bn_stat_loss_bwd(Tensor x, Tensor dy, Tensor scale, Tensor m, Tensor a, Tensor b, Tensor(a!) dx) -> ()");
}

TORCH_LIBRARY_IMPL(srel_fast, CPU, m) {
  m.impl("_ext_bn_stat_loss_fwd", &bn_stat_fwd_cpu);
  m.impl("_ext_bn_stat_loss_bwd", &bn_stat_bwd_cpu);
}
