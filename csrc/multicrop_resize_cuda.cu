// Multi-crop resize: CUDA kernels of srel_fast::_ext_multicrop_resize_fwd / _bwd
// (schema and CPU kernels in multicrop_resize.cpp; exact sampling definition in
// kernels/multicrop_resize.py). Arithmetic in at::opmath_type (float; double
// for double), scale h / out_len by round-to-nearest division.
//
// Forward: one block per (image n, 8 output rows, chunk of columns), one
// thread per output column j. The per-image parameters (box, flip, shift,
// both Axis structs) come from the block index once; the thread inverts roll
// and flip of its column and computes the column tap once, then loops over
// its rows (one uniform row tap each) and the C channels: four loads and one
// blend per output element, no integer division per element, 32-bit offsets
// where the tensors allow.
//
// Backward: a separable gather, no atomics, deterministic. One block per
// (image n, channel c, tile of up to 8 input rows [ya, yb)):
//   tables: the block computes once, in shared memory, the taps of every
//     resized column and of the resized rows i that can touch the tile (an
//     analytic candidate range; taps with the forward arithmetic).
//   pass 1: for each of those rows, thread jr adds w_y * grad[n, c, row(i),
//     col(jr)] into the shared-memory tile T[y - ya][jr] (resized column jr,
//     un-flipped and un-rolled). Each thread owns its columns of T: no races,
//     fixed order.
//   pass 2: every input column x of the crop sums w_x * T[.][jr] over the
//     resized columns jr whose column taps touch x (candidate range, table
//     lookups), for all tile rows at once.
// Work per grad_x element is about the number of taps that touch it. Every
// element of grad_x is written exactly once (0 outside the crop), in its own
// dtype. Output widths whose tile and tables do not fit in 48 KB of shared
// memory (about 2700 float columns) use a generic per-element gather.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "multicrop_resize_check.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

namespace {

template <typename T>
__device__ __forceinline__ T dmin(T a, T b) { return a < b ? a : b; }
template <typename T>
__device__ __forceinline__ T dmax(T a, T b) { return a > b ? a : b; }

// a / b rounded to nearest (div.rn), for the scale h / out_len: a 1-ulp error
// in it shifts every sample of a 224-wide row. Explicit, so that it stays
// exact even under --use_fast_math.
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// 1 / s for the candidate ranges only, where a relative error of 1e-7 is
// plenty: no division instruction at all (no approximate division in the
// PTX, no slow-path call per use). The exponent-flip estimate (relative error
// < 13%) and three Newton steps (0.13 -> 2e-2 -> 3e-4 -> 1e-7); double: two
// more Newton steps in double. s == 0 (h == 0) gives inf or NaN, which
// candidates() clamps.
__device__ __forceinline__ float approx_inv(float s) {
  float r = __int_as_float(0x7EF311C3 - __float_as_int(s));
  r = r * (2.f - s * r);
  r = r * (2.f - s * r);
  r = r * (2.f - s * r);
  return r;
}
__device__ __forceinline__ double approx_inv(double s) {
  double r = approx_inv(static_cast<float>(s));
  r = r * (2.0 - s * r);
  r = r * (2.0 - s * r);
  return r;
}

template <typename acc_t>
struct Axis {
  acc_t t, s, lo, hi, b;
  acc_t inv_s;  // 1 / s, for the candidate ranges only
  int top_idx;  // ceil(hi): last index that can be read
  int bot_idx;  // floor(lo): first index that can be read
  int hi_floor;  // floor(hi)
};

template <typename acc_t>
__device__ __forceinline__ Axis<acc_t> make_axis(acc_t t, acc_t h, int out_len, int in_len) {
  Axis<acc_t> a;
  a.t = t;
  a.s = div_rn(h, static_cast<acc_t>(out_len));
  a.inv_s = approx_inv(a.s);  // inf or NaN for h == 0: handled by the clamps in candidates()
  const acc_t last = static_cast<acc_t>(in_len - 1);
  a.lo = dmin(dmax(t, acc_t(0)), last);
  a.hi = dmin(dmax(t + dmax(h, acc_t(1)) - acc_t(1), a.lo), last);
  a.b = floor(t);
  a.top_idx = static_cast<int>(ceil(a.hi));
  a.bot_idx = static_cast<int>(floor(a.lo));
  a.hi_floor = static_cast<int>(floor(a.hi));
  return a;
}

// taps of resized index i (the forward arithmetic of the docstring)
template <typename acc_t>
__device__ __forceinline__ void tap(const Axis<acc_t>& a, int i, int& i0, int& i1, acc_t& lam) {
  acc_t u = a.s * (static_cast<acc_t>(i) + acc_t(0.5)) - acc_t(0.5);
  u = dmax(u, acc_t(0));
  const acc_t r = dmin(dmax((a.t - a.b) + u, a.lo - a.b), a.hi - a.b);
  const acc_t f = floor(r);
  lam = r - f;
  // b + r lies in [lo, hi], so i0 is in [bot_idx, top_idx]; the clamp only
  // keeps absurd boxes (float spacing over a pixel) inside the image
  i0 = dmin(dmax(static_cast<int>(a.b + f), a.bot_idx), a.top_idx);
  i1 = dmin(i0 + 1, a.top_idx);
}

// Resized indices [first, last] whose taps can touch input index y (y inside
// the crop): a superset, widened to the border for clamped samples; the
// callers recompute each candidate's taps. Both ends are nondecreasing in y,
// so [first(ya), last(yb)] covers every y in [ya, yb].
template <typename acc_t>
__device__ __forceinline__ void candidates(const Axis<acc_t>& a, int y, int out_len, int& first, int& last) {
  const acc_t yf = static_cast<acc_t>(y);
  // a relative error of a few ulp cannot matter: a candidate is only missed
  // if an end is off by a whole index
  acc_t lo_f = ((yf - acc_t(1) - a.t) + acc_t(0.5)) * a.inv_s - acc_t(0.5);
  acc_t hi_f = ((yf + acc_t(1) - a.t) + acc_t(0.5)) * a.inv_s - acc_t(0.5);
  // the comparisons also map NaN (h == 0) to -1
  lo_f = dmin(dmax(lo_f, acc_t(-1)), static_cast<acc_t>(out_len + 1));
  hi_f = dmin(dmax(hi_f, acc_t(-1)), static_cast<acc_t>(out_len + 1));
  first = static_cast<int>(floor(lo_f));
  last = static_cast<int>(ceil(hi_f));
  if (y <= a.bot_idx + 1) first = 0;
  if (y >= a.hi_floor) last = out_len - 1;
  first = dmax(first, 0);
  last = dmin(last, out_len - 1);
}

// v mod m in [0, m) (m < 2^30, checked on the host, so v % m + m cannot overflow)
__device__ __forceinline__ int wrap(int v, int m) { return ((v % m) + m) % m; }

template <typename acc_t>
struct Image {
  Axis<acc_t> ay, ax;
  int sh, sw;  // roll in [0, Ho), [0, Wo)
  bool fl;
};

template <typename acc_t>
__device__ __forceinline__ Image<acc_t> image_params(const acc_t* __restrict__ boxes, const int* __restrict__ flip,
                                                     const int* __restrict__ shift, int n, int H, int W, int Ho,
                                                     int Wo) {
  Image<acc_t> im;
  const acc_t* bx = boxes + 4 * static_cast<int64_t>(n);
  im.ay = make_axis<acc_t>(bx[0], bx[2], Ho, H);
  im.ax = make_axis<acc_t>(bx[1], bx[3], Wo, W);
  im.sh = shift ? wrap(shift[2 * static_cast<int64_t>(n)], Ho) : 0;
  im.sw = shift ? wrap(shift[2 * static_cast<int64_t>(n) + 1], Wo) : 0;
  im.fl = flip && flip[n] != 0;
  return im;
}

// ---------------------------------------------------------------- forward
constexpr int kFwdRows = 8;  // output rows per block: amortises the per-image and per-column setup

// grid: N * nI * nJ blocks, block id = (n * nI + row chunk) * nJ + column chunk;
// thread = output column j, rows [i0, i0 + kFwdRows), all channels.
template <typename scalar_t, typename idx_t>
__global__ void __launch_bounds__(256) multicrop_fwd_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ out, const at::opmath_type<scalar_t>* __restrict__ boxes,
    const int* __restrict__ flip, const int* __restrict__ shift, int C, int H, int W, int Ho, int Wo, int nI, int nJ,
    int64_t sxn, idx_t sxc, idx_t sxh, idx_t sxw, int64_t son, idx_t soc, idx_t soh, idx_t sow) {
  using acc_t = at::opmath_type<scalar_t>;
  const int chunk = static_cast<int>(blockIdx.x % static_cast<unsigned>(nJ));
  const unsigned nr = blockIdx.x / static_cast<unsigned>(nJ);
  const int i0 = static_cast<int>(nr % static_cast<unsigned>(nI)) * kFwdRows;
  const int n = static_cast<int>(nr / static_cast<unsigned>(nI));
  const int i1 = dmin(i0 + kFwdRows, Ho);
  const int j = chunk * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
  if (j >= Wo) return;  // no barrier in this kernel
  const Image<acc_t> im = image_params(boxes, flip, shift, n, H, W, Ho, Wo);
  int jr = j - im.sw;  // final column j: un-roll, then un-flip
  if (jr < 0) jr += Wo;
  if (im.fl) jr = Wo - 1 - jr;
  int x0, x1;
  acc_t lx;
  tap(im.ax, jr, x0, x1, lx);
  const idx_t col0 = x0 * sxw, col1 = x1 * sxw;
  const acc_t wx0 = acc_t(1) - lx;
  const scalar_t* xn = x + n * sxn;
  scalar_t* on = out + n * son + j * sow;
  for (int i = i0; i < i1; ++i) {
    int ir = i - im.sh;  // final row i shows resized row (i - sh) mod Ho
    if (ir < 0) ir += Ho;
    int y0, y1;
    acc_t ly;
    tap(im.ay, ir, y0, y1, ly);
    const idx_t r0 = y0 * sxh, r1 = y1 * sxh;
    const acc_t wy0 = acc_t(1) - ly;
    const scalar_t* p = xn;
    scalar_t* o = on + i * soh;
#pragma unroll 4
    for (int c = 0; c < C; ++c) {
      const acc_t v00 = static_cast<acc_t>(p[r0 + col0]);
      const acc_t v01 = static_cast<acc_t>(p[r0 + col1]);
      const acc_t v10 = static_cast<acc_t>(p[r1 + col0]);
      const acc_t v11 = static_cast<acc_t>(p[r1 + col1]);
      *o = static_cast<scalar_t>(wy0 * (wx0 * v00 + lx * v01) + ly * (wx0 * v10 + lx * v11));
      p += sxc;
      o += soc;
    }
  }
}

// ---------------------------------------------------------------- backward, separable gather
constexpr int kTileRows = 8;

// Dynamic shared memory of the tiled backward: the tile T (tyr x Wo), the
// column-tap table (Wo entries) and one chunk of the row-tap table (bd entries).
inline int64_t bwd_smem_bytes(int64_t tyr, int64_t Wo, int64_t bd, int64_t acc_size) {
  return (tyr * Wo + Wo + 2 * bd) * acc_size + (2 * Wo + 3 * bd) * 4;
}

// grid: N * C * nT blocks, block id = (n * nT + tile) * C + c (channel fastest:
// blocks running together share the grad rows of one image).
template <typename scalar_t, typename idx_t>
__global__ void __launch_bounds__(256, 3) multicrop_bwd_kernel(
    const scalar_t* __restrict__ g, scalar_t* __restrict__ gx, const at::opmath_type<scalar_t>* __restrict__ boxes,
    const int* __restrict__ flip, const int* __restrict__ shift, int C, int H, int W, int Ho, int Wo, int tyr, int nT,
    int64_t sgn, idx_t sgc, idx_t sgh, idx_t sgw, int64_t sxn, idx_t sxc, idx_t sxh, idx_t sxw) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = threadIdx.x, bd = blockDim.x;
  // layout of bwd_smem_bytes(): acc_t arrays first (alignment), then ints
  acc_t* T = reinterpret_cast<acc_t*>(smem_raw);  // T[y * Wo + jr], y < tyr
  acc_t* c_lam = T + tyr * Wo;                      // column taps of resized column jr
  acc_t* r_w0 = c_lam + Wo;                         // row-tap chunk: weights on the two tile rows
  acc_t* r_w1 = r_w0 + bd;
  int* c_x0 = reinterpret_cast<int*>(r_w1 + bd);
  int* c_x1 = c_x0 + Wo;
  int* r_row = c_x1 + Wo;  // final grad row, or -1 when the candidate misses the tile
  int* r_t0 = r_row + bd;  // offset (tile row of the tap) * Wo in T, or -1
  int* r_t1 = r_t0 + bd;

  const int c = static_cast<int>(blockIdx.x % static_cast<unsigned>(C));
  const unsigned nt = blockIdx.x / static_cast<unsigned>(C);
  const int tile = static_cast<int>(nt % static_cast<unsigned>(nT));
  const int n = static_cast<int>(nt / static_cast<unsigned>(nT));
  const int ya = tile * tyr;
  const int rows = dmin(tyr, H - ya);  // tile rows [ya, ya + rows)
  const Image<acc_t> im = image_params(boxes, flip, shift, n, H, W, Ho, Wo);
  // tile rows inside the crop: [ra, rb] (uniform over the block)
  const int ra = dmax(ya, im.ay.bot_idx), rb = dmin(ya + rows - 1, im.ay.top_idx);
  const bool rows_in = ra <= rb;

  // each thread zeroes, and in pass 1 only touches, its own columns of T
  for (int jr = tid; jr < Wo; jr += bd) {
    for (int y = 0; y < tyr; ++y) T[y * Wo + jr] = acc_t(0);
    if (rows_in) {
      int x0, x1;
      acc_t lam;
      tap(im.ax, jr, x0, x1, lam);
      c_x0[jr] = x0;
      c_x1[jr] = x1;
      c_lam[jr] = lam;
    }
  }

  // pass 1: T[y][jr] = sum over candidate rows i of w_y(i) * grad[row(i), col(jr)]
  if (rows_in) {
    int i_first, i_last, unused;
    candidates(im.ay, ra, Ho, i_first, unused);
    candidates(im.ay, rb, Ho, unused, i_last);
    const scalar_t* gb = g + n * sgn + c * sgc;
    for (int base = i_first; base <= i_last; base += bd) {  // uniform; one chunk unless upsampling > bd / 8
      const int cnt = dmin(bd, i_last - base + 1);
      __syncthreads();  // the previous chunk is consumed
      if (tid < cnt) {  // row-tap table: one candidate row per thread
        const int i = base + tid;
        int y0, y1;
        acc_t ly;
        tap(im.ay, i, y0, y1, ly);
        const bool in0 = y0 >= ya && y0 < ya + rows && ly != acc_t(1);
        const bool in1 = y1 >= ya && y1 < ya + rows && ly != acc_t(0);
        int row = i + im.sh;  // resized row i is shown at final row (i + sh) mod Ho
        if (row >= Ho) row -= Ho;
        r_row[tid] = in0 || in1 ? row : -1;
        r_t0[tid] = in0 ? (y0 - ya) * Wo : -1;
        r_t1[tid] = in1 ? (y1 - ya) * Wo : -1;
        r_w0[tid] = acc_t(1) - ly;
        r_w1[tid] = ly;
      }
      __syncthreads();
      for (int jr = tid; jr < Wo; jr += bd) {
        int col = (im.fl ? Wo - 1 - jr : jr) + im.sw;  // resized column jr: flip, then roll
        if (col >= Wo) col -= Wo;
        const scalar_t* gc = gb + col * sgw;
#pragma unroll 4
        for (int k = 0; k < cnt; ++k) {
          const int row = r_row[k];
          if (row < 0) continue;
          const acc_t v = static_cast<acc_t>(gc[row * sgh]);
          const int t0 = r_t0[k], t1 = r_t1[k];
          if (t0 >= 0) T[t0 + jr] += r_w0[k] * v;
          if (t1 >= 0) T[t1 + jr] += r_w1[k] * v;
        }
      }
    }
  }
  __syncthreads();

  // pass 2: grad_x[ya + y][x] = sum over candidate columns jr of w_x(jr) * T[y][jr]
  scalar_t* ob = gx + n * sxn + c * sxc + ya * sxh;
  for (int x = tid; x < W; x += bd) {
    acc_t acc[kTileRows];
#pragma unroll
    for (int y = 0; y < kTileRows; ++y) acc[y] = acc_t(0);
    if (rows_in && x >= im.ax.bot_idx && x <= im.ax.top_idx) {
      int j_first, j_last;
      candidates(im.ax, x, Wo, j_first, j_last);
      for (int jr = j_first; jr <= j_last; ++jr) {
        const acc_t lx = c_lam[jr];
        const acc_t w = (c_x0[jr] == x ? acc_t(1) - lx : acc_t(0)) + (c_x1[jr] == x ? lx : acc_t(0));
        if (w == acc_t(0)) continue;
#pragma unroll
        for (int y = 0; y < kTileRows; ++y)
          if (y < rows) acc[y] += w * T[y * Wo + jr];
      }
    }
#pragma unroll
    for (int y = 0; y < kTileRows; ++y)
      if (y < rows) ob[y * sxh + x * sxw] = static_cast<scalar_t>(acc[y]);
  }
}

// ---------------------------------------------------------------- backward, generic gather
// For output widths whose tile does not fit in shared memory: one thread per
// grad_x element (64-bit indices), every (candidate row, candidate column)
// pair recomputed. Same arithmetic and results up to summation order.
template <typename scalar_t>
__global__ void __launch_bounds__(256) multicrop_bwd_generic_kernel(
    const scalar_t* __restrict__ g, scalar_t* __restrict__ gx, const at::opmath_type<scalar_t>* __restrict__ boxes,
    const int* __restrict__ flip, const int* __restrict__ shift, int C, int H, int W, int Ho, int Wo, int64_t sgn,
    int64_t sgc, int64_t sgh, int64_t sgw, int64_t sxn, int64_t sxc, int64_t sxh, int64_t sxw, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t r = e;
    const int x = static_cast<int>(r % W);
    r /= W;
    const int y = static_cast<int>(r % H);
    r /= H;
    const int c = static_cast<int>(r % C);
    const int n = static_cast<int>(r / C);
    scalar_t* o = gx + n * sxn + c * sxc + y * sxh + x * sxw;
    const Image<acc_t> im = image_params(boxes, flip, shift, n, H, W, Ho, Wo);
    if (y < im.ay.bot_idx || y > im.ay.top_idx || x < im.ax.bot_idx || x > im.ax.top_idx) {
      *o = scalar_t(0);
      continue;
    }
    int fi, li, fj, lj;
    candidates(im.ay, y, Ho, fi, li);
    candidates(im.ax, x, Wo, fj, lj);
    const scalar_t* gb = g + n * sgn + c * sgc;
    acc_t acc = 0;
    for (int i = fi; i <= li; ++i) {
      int i0, i1;
      acc_t lam;
      tap(im.ay, i, i0, i1, lam);
      const acc_t wy = (i0 == y ? acc_t(1) - lam : acc_t(0)) + (i1 == y ? lam : acc_t(0));
      if (wy == acc_t(0)) continue;
      int row = i + im.sh;
      if (row >= Ho) row -= Ho;
      const scalar_t* gr = gb + row * sgh;
      acc_t racc = 0;
      for (int j = fj; j <= lj; ++j) {
        int j0, j1;
        acc_t lmx;
        tap(im.ax, j, j0, j1, lmx);
        const acc_t wx = (j0 == x ? acc_t(1) - lmx : acc_t(0)) + (j1 == x ? lmx : acc_t(0));
        if (wx == acc_t(0)) continue;
        int col = (im.fl ? Wo - 1 - j : j) + im.sw;
        if (col >= Wo) col -= Wo;
        racc += wx * static_cast<acc_t>(gr[col * sgw]);
      }
      acc += wy * racc;
    }
    *o = static_cast<scalar_t>(acc);
  }
}

// ---------------------------------------------------------------- host
void check_args(const at::Tensor& big, const at::Tensor& small, const at::Tensor& boxes,
                const std::optional<at::Tensor>& flip, const std::optional<at::Tensor>& shift, const char* name) {
  TORCH_CHECK(big.is_cuda() && small.is_cuda() && boxes.is_cuda(), name, ": expected CUDA tensors");
  srel_fast_multicrop::check_args(big, small, boxes, flip, shift, name);
  // sizes as int (indices and i + shift stay below 2^31); strides may be 0 (expanded) but not negative
  for (const at::Tensor* t : {&big, &small}) {
    for (int d = 0; d < 4; ++d) {
      TORCH_CHECK(t->size(d) < (int64_t{1} << 30), name, ": dimension too large");
      TORCH_CHECK(t->stride(d) >= 0, name, ": negative strides are not supported");
    }
  }
}

const int* opt_int_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<int>() : nullptr; }

// Largest element offset inside one image (dims 1..3): 32-bit offsets when it fits.
int64_t image_extent(const at::Tensor& t) {
  int64_t e = 0;
  for (int d = 1; d < 4; ++d) e += (t.size(d) - 1) * t.stride(d);
  return e;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// threads per block: the row length rounded up to whole warps, 32..256
int block_for(int64_t len) {
  return static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, cdiv(len, 32) * 32)));
}

void multicrop_fwd_cuda(const at::Tensor& x, const at::Tensor& boxes, const std::optional<at::Tensor>& flip,
                        const std::optional<at::Tensor>& shift, at::Tensor out) {
  check_args(x, out, boxes, flip, shift, "_ext_multicrop_resize_fwd");
  if (out.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ho = out.size(2), Wo = out.size(3);
  TORCH_CHECK(H > 0 && W > 0, "_ext_multicrop_resize_fwd: empty input image");
  const int threads = block_for(Wo);
  const int64_t nJ = cdiv(Wo, threads);
  const int64_t nI = cdiv(Ho, kFwdRows);
  const int64_t blocks = N * nI * nJ;
  TORCH_CHECK(blocks <= INT32_MAX, "_ext_multicrop_resize_fwd: too many output rows");
  const bool small = image_extent(x) <= INT32_MAX && image_extent(out) <= INT32_MAX;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multicrop_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto idx_tag) {
      using idx_t = decltype(idx_tag);
      multicrop_fwd_kernel<scalar_t, idx_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), boxes.const_data_ptr<acc_t>(), opt_int_ptr(flip),
          opt_int_ptr(shift), static_cast<int>(C), static_cast<int>(H), static_cast<int>(W), static_cast<int>(Ho),
          static_cast<int>(Wo), static_cast<int>(nI), static_cast<int>(nJ), x.stride(0),
          static_cast<idx_t>(x.stride(1)), static_cast<idx_t>(x.stride(2)), static_cast<idx_t>(x.stride(3)),
          out.stride(0), static_cast<idx_t>(out.stride(1)), static_cast<idx_t>(out.stride(2)),
          static_cast<idx_t>(out.stride(3)));
    };
    if (small) launch(int32_t{0});
    else launch(int64_t{0});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void multicrop_bwd_cuda(const at::Tensor& grad, const at::Tensor& boxes, const std::optional<at::Tensor>& flip,
                        const std::optional<at::Tensor>& shift, at::Tensor grad_x) {
  check_args(grad_x, grad, boxes, flip, shift, "_ext_multicrop_resize_bwd");
  const int64_t total = grad_x.numel();
  if (total == 0) return;
  c10::cuda::CUDAGuard guard(grad.device());
  if (grad.numel() == 0) {  // empty output: no taps, zero gradient (and no modulo by Ho = 0)
    grad_x.zero_();
    return;
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t N = grad_x.size(0), C = grad_x.size(1), H = grad_x.size(2), W = grad_x.size(3);
  const int64_t Ho = grad.size(2), Wo = grad.size(3);
  const int64_t acc_size = grad.scalar_type() == at::kDouble ? 8 : 4;
  const int threads = block_for(std::max(W, Wo));
  // tile rows: up to 8, as many as fit 48 KB of shared memory with the tap tables
  const int64_t smem_cap = 48 * 1024;
  int64_t tyr = std::min<int64_t>(kTileRows, H);
  while (tyr > 1 && bwd_smem_bytes(tyr, Wo, threads, acc_size) > smem_cap) tyr /= 2;
  const bool tiled = bwd_smem_bytes(tyr, Wo, threads, acc_size) <= smem_cap;
  const bool small = image_extent(grad) <= INT32_MAX && image_extent(grad_x) <= INT32_MAX;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "multicrop_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (tiled) {
      const int64_t nT = cdiv(H, tyr);
      const int64_t blocks = N * nT * C;
      TORCH_CHECK(blocks <= INT32_MAX, "_ext_multicrop_resize_bwd: too many row tiles");
      const size_t smem = static_cast<size_t>(bwd_smem_bytes(tyr, Wo, threads, acc_size));
      auto launch = [&](auto idx_tag) {
        using idx_t = decltype(idx_tag);
        multicrop_bwd_kernel<scalar_t, idx_t><<<static_cast<unsigned>(blocks), threads, smem, stream>>>(
            grad.const_data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), boxes.const_data_ptr<acc_t>(),
            opt_int_ptr(flip), opt_int_ptr(shift), static_cast<int>(C), static_cast<int>(H), static_cast<int>(W),
            static_cast<int>(Ho), static_cast<int>(Wo), static_cast<int>(tyr), static_cast<int>(nT), grad.stride(0),
            static_cast<idx_t>(grad.stride(1)), static_cast<idx_t>(grad.stride(2)),
            static_cast<idx_t>(grad.stride(3)), grad_x.stride(0), static_cast<idx_t>(grad_x.stride(1)),
            static_cast<idx_t>(grad_x.stride(2)), static_cast<idx_t>(grad_x.stride(3)));
      };
      if (small) launch(int32_t{0});
      else launch(int64_t{0});
    } else {
      const int64_t blocks = std::min<int64_t>(cdiv(total, 256), int64_t{1} << 30);
      multicrop_bwd_generic_kernel<scalar_t><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), boxes.const_data_ptr<acc_t>(),
          opt_int_ptr(flip), opt_int_ptr(shift), static_cast<int>(C), static_cast<int>(H), static_cast<int>(W),
          static_cast<int>(Ho), static_cast<int>(Wo), grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
          grad_x.stride(0), grad_x.stride(1), grad_x.stride(2), grad_x.stride(3), total);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(srel_fast, CUDA, m) {
  m.impl("_ext_multicrop_resize_fwd", &multicrop_fwd_cuda);
  m.impl("_ext_multicrop_resize_bwd", &multicrop_bwd_cuda);
}
