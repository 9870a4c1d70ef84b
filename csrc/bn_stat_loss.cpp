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
#include <vector>

namespace {

void check_inputs(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3 || x.dim() == 4, "bn_stat: expected a canonical 3-D or 4-D view, got ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous(), "bn_stat: canonical view must be contiguous");
}

template <typename scalar_t>
void fwd_cf(const scalar_t* x, scalar_t* y, const float* shift, const float* scale, const float* bias,
            float* mean, float* var, int64_t G, int64_t B, int64_t C, int64_t L) {
  const double M = static_cast<double>(B * L);
  at::parallel_for(0, G * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gc = begin; gc < end; ++gc) {
      const int64_t g = gc / C, c = gc % C;
      const float k = shift[c];
      const float sc = y ? scale[c] : 0.f, bi = y ? bias[c] : 0.f;
      double s1 = 0.0, s2 = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t off = ((g * B + b) * C + c) * L;
        const scalar_t* p = x + off;
        // float partials over one plane (bounded length), then float64
        double p1 = 0.0, p2 = 0.0;
        for (int64_t l = 0; l < L; ++l) {
          const float v = static_cast<float>(p[l]);
          const double d = static_cast<double>(v - k);
          p1 += d;
          p2 += d * d;
        }
        s1 += p1;
        s2 += p2;
        if (y) {
          scalar_t* q = y + off;
          for (int64_t l = 0; l < L; ++l) q[l] = static_cast<scalar_t>(static_cast<float>(p[l]) * sc + bi);
        }
      }
      const double m1 = s1 / M;
      mean[gc] = static_cast<float>(k + m1);
      var[gc] = static_cast<float>(std::max(s2 / M - m1 * m1, 0.0));
    }
  });
}

template <typename scalar_t>
void fwd_cl(const scalar_t* x, scalar_t* y, const float* shift, const float* scale, const float* bias,
            float* mean, float* var, int64_t G, int64_t R, int64_t C) {
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
        const scalar_t* p = x + off;
        for (int64_t c = 0; c < C; ++c) {
          const double d = static_cast<double>(static_cast<float>(p[c]) - shift[c]);
          s1[c] += d;
          s2[c] += d * d;
        }
        if (y) {
          scalar_t* q = y + off;
          for (int64_t c = 0; c < C; ++c) q[c] = static_cast<scalar_t>(static_cast<float>(p[c]) * scale[c] + bias[c]);
        }
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
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = write_y ? y.data_ptr<scalar_t>() : nullptr;
    const float* sp = write_y ? scale.const_data_ptr<float>() : nullptr;
    const float* bp = write_y ? bias.const_data_ptr<float>() : nullptr;
    if (cf)
      fwd_cf<scalar_t>(xp, yp, shift.const_data_ptr<float>(), sp, bp, mean.data_ptr<float>(), var.data_ptr<float>(), G,
                       x.size(1), C, x.size(3));
    else
      fwd_cl<scalar_t>(xp, yp, shift.const_data_ptr<float>(), sp, bp, mean.data_ptr<float>(), var.data_ptr<float>(), G,
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
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dyp = has_dy ? dy.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const float* sp = has_dy ? scale.const_data_ptr<float>() : nullptr;
    const float* mp = m.const_data_ptr<float>();
    const float* ap = a.const_data_ptr<float>();
    const float* bp = b.const_data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cf ? L : C));
    at::parallel_for(0, G * P, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t g = t / P;
        if (cf) {
          const int64_t c = t % C;
          const int64_t gc = g * C + c;
          const float mm = mp[gc], aa = ap[gc], bb = bp[gc], ss = has_dy ? sp[c] : 0.f;
          const int64_t off = t * L;
          for (int64_t l = 0; l < L; ++l) {
            float r = (static_cast<float>(xp[off + l]) - mm) * bb + aa;
            if (has_dy) r += static_cast<float>(dyp[off + l]) * ss;
            dxp[off + l] = static_cast<scalar_t>(r);
          }
        } else {
          const int64_t off = t * C;
          const float* mg = mp + g * C;
          const float* ag = ap + g * C;
          const float* bg = bp + g * C;
          for (int64_t c = 0; c < C; ++c) {
            float r = (static_cast<float>(xp[off + c]) - mg[c]) * bg[c] + ag[c];
            if (has_dy) r += static_cast<float>(dyp[off + c]) * sp[c];
            dxp[off + c] = static_cast<scalar_t>(r);
          }
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
