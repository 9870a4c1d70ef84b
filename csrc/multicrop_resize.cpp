// Multi-crop resize (per-image crop + bilinear resize + flip + roll): the
// schema of the srel_fast::_ext_multicrop_resize_* ops and their CPU kernels
// (at::parallel_for / OpenMP). CUDA kernels: multicrop_resize_cuda.cu. Called from
// kernels/multicrop_resize.py, which documents the exact sampling definition:
//
//   _ext_multicrop_resize_fwd(x, boxes, flip?, shift?, out)    out (N, C, Ho, Wo) preallocated
//   _ext_multicrop_resize_bwd(grad, boxes, flip?, shift?, gx)  gx  (N, C, H, W)  preallocated,
//                                                  fully written (0 outside the crop)
//
// x / out / grad / gx: any strides (NCHW or channels_last); float32, float16,
// bfloat16, float64. boxes: (N, 4) contiguous, float32 (float64 for float64
// data) as (top, left, height, width); flip (N,) int32; shift (N, 2) int32.
// Arithmetic in at::opmath_type (float; double for double).
//
// Backward: gather, no atomics. Per image the forward taps are listed per
// input row and per input column (CSR: output index, weight); then for each
// (n, c, input row y) one output-width row T = sum_i w_y(i) grad[n, c, i, :]
// is formed and every input column x reduces T over its column taps.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "multicrop_resize_check.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

template <typename acc_t>
struct Axis {
  acc_t t, s, lo, hi, b;
  int64_t top_idx;  // ceil(hi): last index that can be read
  int64_t bot_idx;  // floor(lo): first index that can be read
};

template <typename acc_t>
inline Axis<acc_t> make_axis(acc_t t, acc_t h, int64_t out_len, int64_t in_len) {
  Axis<acc_t> a;
  a.t = t;
  a.s = h / static_cast<acc_t>(out_len);
  const acc_t last = static_cast<acc_t>(in_len - 1);
  a.lo = std::min(std::max(t, acc_t(0)), last);
  a.hi = std::min(std::max(t + std::max(h, acc_t(1)) - acc_t(1), a.lo), last);
  a.b = std::floor(t);
  a.top_idx = static_cast<int64_t>(std::ceil(a.hi));
  a.bot_idx = static_cast<int64_t>(std::floor(a.lo));
  return a;
}

template <typename acc_t>
inline void tap(const Axis<acc_t>& a, int64_t i, int64_t& i0, int64_t& i1, acc_t& lam) {
  acc_t u = a.s * (static_cast<acc_t>(i) + acc_t(0.5)) - acc_t(0.5);
  u = std::max(u, acc_t(0));
  const acc_t r = std::min(std::max((a.t - a.b) + u, a.lo - a.b), a.hi - a.b);
  const acc_t f = std::floor(r);
  lam = r - f;
  i0 = static_cast<int64_t>(a.b + f);
  i1 = std::min(i0 + 1, a.top_idx);
}

inline int64_t wrap(int64_t v, int64_t m) { return ((v % m) + m) % m; }

struct Params {
  int64_t N, C, H, W, Ho, Wo;
};

using srel_fast_multicrop::check_args;

template <typename scalar_t>
void fwd_cpu_impl(const at::Tensor& x, const at::Tensor& boxes, const int* flip, const int* shift, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = out.size(2), Wo = out.size(3);
  const int64_t sxn = x.stride(0), sxc = x.stride(1), sxh = x.stride(2), sxw = x.stride(3);
  const int64_t son = out.stride(0), soc = out.stride(1), soh = out.stride(2), sow = out.stride(3);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const acc_t* bx = boxes.data_ptr<acc_t>();

  // column taps per image, indexed by the final column
  std::vector<int64_t> cx0(N * Wo), cx1(N * Wo);
  std::vector<acc_t> clx(N * Wo);
  for (int64_t n = 0; n < N; ++n) {
    const Axis<acc_t> ax = make_axis<acc_t>(bx[n * 4 + 1], bx[n * 4 + 3], Wo, W);
    const int64_t sw = shift ? wrap(shift[n * 2 + 1], Wo) : 0;
    const bool fl = flip && flip[n] != 0;
    for (int64_t j = 0; j < Wo; ++j) {
      int64_t jr = wrap(j - sw, Wo);
      if (fl) jr = Wo - 1 - jr;
      tap(ax, jr, cx0[n * Wo + j], cx1[n * Wo + j], clx[n * Wo + j]);
    }
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C * Wo));
  at::parallel_for(0, N * Ho, grain, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / Ho, i = idx % Ho;
      const Axis<acc_t> ay = make_axis<acc_t>(bx[n * 4 + 0], bx[n * 4 + 2], Ho, H);
      const int64_t sh = shift ? wrap(shift[n * 2 + 0], Ho) : 0;
      int64_t y0, y1;
      acc_t ly;
      tap(ay, wrap(i - sh, Ho), y0, y1, ly);
      const acc_t wy0 = acc_t(1) - ly, wy1 = ly;
      const int64_t* X0 = cx0.data() + n * Wo;
      const int64_t* X1 = cx1.data() + n * Wo;
      const acc_t* LX = clx.data() + n * Wo;
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* r0 = xp + n * sxn + c * sxc + y0 * sxh;
        const scalar_t* r1 = xp + n * sxn + c * sxc + y1 * sxh;
        scalar_t* o = op + n * son + c * soc + i * soh;
        for (int64_t j = 0; j < Wo; ++j) {
          const acc_t lx = LX[j];
          const acc_t wx0 = acc_t(1) - lx;
          const int64_t a0 = X0[j] * sxw, a1 = X1[j] * sxw;
          const acc_t v = wy0 * (wx0 * static_cast<acc_t>(r0[a0]) + lx * static_cast<acc_t>(r0[a1])) +
                          wy1 * (wx0 * static_cast<acc_t>(r1[a0]) + lx * static_cast<acc_t>(r1[a1]));
          o[j * sow] = static_cast<scalar_t>(v);
        }
      }
    }
  });
}

// CSR of taps per input index along one axis for one image: for each input
// index y the (final output index, weight) pairs of the forward taps on y.
template <typename acc_t>
void build_csr(const Axis<acc_t>& a, int64_t out_len, int64_t in_len, int64_t shift, bool flip, int64_t* ptr,
               int64_t* idx, acc_t* w) {
  std::fill(ptr, ptr + in_len + 1, 0);
  std::vector<int64_t> i0(out_len), i1(out_len);
  std::vector<acc_t> lam(out_len);
  for (int64_t i = 0; i < out_len; ++i) {
    tap(a, i, i0[i], i1[i], lam[i]);
    ptr[i0[i] + 1]++;
    ptr[i1[i] + 1]++;
  }
  for (int64_t y = 0; y < in_len; ++y) ptr[y + 1] += ptr[y];
  std::vector<int64_t> fill(ptr, ptr + in_len);
  for (int64_t i = 0; i < out_len; ++i) {
    // resized index i is shown at final index: flip (columns only) then roll
    const int64_t f = wrap((flip ? out_len - 1 - i : i) + shift, out_len);
    int64_t k = fill[i0[i]]++;
    idx[k] = f;
    w[k] = acc_t(1) - lam[i];
    k = fill[i1[i]]++;
    idx[k] = f;
    w[k] = lam[i];
  }
}

template <typename scalar_t>
void bwd_cpu_impl(const at::Tensor& g, const at::Tensor& boxes, const int* flip, const int* shift, at::Tensor& gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = gx.size(0), C = gx.size(1), H = gx.size(2), W = gx.size(3);
  const int64_t Ho = g.size(2), Wo = g.size(3);
  const int64_t sgn = g.stride(0), sgc = g.stride(1), sgh = g.stride(2), sgw = g.stride(3);
  const int64_t sxn = gx.stride(0), sxc = gx.stride(1), sxh = gx.stride(2), sxw = gx.stride(3);
  const scalar_t* gp = g.data_ptr<scalar_t>();
  scalar_t* xp = gx.data_ptr<scalar_t>();
  const acc_t* bx = boxes.data_ptr<acc_t>();

  std::vector<int64_t> rptr(N * (H + 1)), ridx(N * 2 * Ho), cptr(N * (W + 1)), cidx(N * 2 * Wo);
  std::vector<acc_t> rw(N * 2 * Ho), cw(N * 2 * Wo);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const Axis<acc_t> ay = make_axis<acc_t>(bx[n * 4 + 0], bx[n * 4 + 2], Ho, H);
      const Axis<acc_t> ax = make_axis<acc_t>(bx[n * 4 + 1], bx[n * 4 + 3], Wo, W);
      const int64_t sh = shift ? shift[n * 2 + 0] : 0, sw = shift ? shift[n * 2 + 1] : 0;
      build_csr(ay, Ho, H, sh, false, rptr.data() + n * (H + 1), ridx.data() + n * 2 * Ho, rw.data() + n * 2 * Ho);
      build_csr(ax, Wo, W, sw, flip && flip[n] != 0, cptr.data() + n * (W + 1), cidx.data() + n * 2 * Wo,
                cw.data() + n * 2 * Wo);
    }
  });
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, W + Wo));
  at::parallel_for(0, N * C * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> T(Wo);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t y = idx % H, c = (idx / H) % C, n = idx / (H * C);
      scalar_t* o = xp + n * sxn + c * sxc + y * sxh;
      const int64_t* rp = rptr.data() + n * (H + 1);
      if (rp[y] == rp[y + 1]) {
        for (int64_t x = 0; x < W; ++x) o[x * sxw] = scalar_t(0);
        continue;
      }
      std::fill(T.begin(), T.end(), acc_t(0));
      const scalar_t* gb = gp + n * sgn + c * sgc;
      for (int64_t k = rp[y]; k < rp[y + 1]; ++k) {
        const acc_t wy = rw[n * 2 * Ho + k];
        if (wy == acc_t(0)) continue;
        const scalar_t* gr = gb + ridx[n * 2 * Ho + k] * sgh;
        for (int64_t j = 0; j < Wo; ++j) T[j] += wy * static_cast<acc_t>(gr[j * sgw]);
      }
      const int64_t* cp = cptr.data() + n * (W + 1);
      const int64_t* ci = cidx.data() + n * 2 * Wo;
      const acc_t* cwp = cw.data() + n * 2 * Wo;
      for (int64_t x = 0; x < W; ++x) {
        acc_t s = 0;
        for (int64_t k = cp[x]; k < cp[x + 1]; ++k) s += cwp[k] * T[ci[k]];
        o[x * sxw] = static_cast<scalar_t>(s);
      }
    }
  });
}

const int* opt_int_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<int>() : nullptr; }

void multicrop_fwd_cpu(const at::Tensor& x, const at::Tensor& boxes, const std::optional<at::Tensor>& flip,
                       const std::optional<at::Tensor>& shift, at::Tensor out) {
  check_args(x, out, boxes, flip, shift, "_ext_multicrop_resize_fwd");
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multicrop_fwd_cpu", [&] {
    fwd_cpu_impl<scalar_t>(x, boxes, opt_int_ptr(flip), opt_int_ptr(shift), out);
  });
}

void multicrop_bwd_cpu(const at::Tensor& grad, const at::Tensor& boxes, const std::optional<at::Tensor>& flip,
                       const std::optional<at::Tensor>& shift, at::Tensor grad_x) {
  check_args(grad_x, grad, boxes, flip, shift, "_ext_multicrop_resize_bwd");
  if (grad_x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "multicrop_bwd_cpu", [&] {
    bwd_cpu_impl<scalar_t>(grad, boxes, opt_int_ptr(flip), opt_int_ptr(shift), grad_x);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(srel_fast, m) {
  m.def("_ext_multicrop_resize_fwd(Tensor x, Tensor boxes, Tensor? flip, Tensor? shift, Tensor(a!) out) -> ()");
  m.def("_ext_multicrop_resize_bwd(Tensor grad, Tensor boxes, Tensor? flip, Tensor? shift, Tensor(a!) grad_x) -> ()");
}

TORCH_LIBRARY_IMPL(srel_fast, CPU, m) {
  m.impl("_ext_multicrop_resize_fwd", &multicrop_fwd_cpu);
  m.impl("_ext_multicrop_resize_bwd", &multicrop_bwd_cpu);
}
