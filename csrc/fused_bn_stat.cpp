// Fused frozen BatchNorm + its weighted BN statistics loss as ONE autograd op in C++
// (srel_fast::_ext_fused_bn_stat_loss), for eager recovery on the extension's backends.
//
//   (y, loss) = _ext_fused_bn_stat_loss(x, running_mean, running_var, scale, shift, groups, weight)
//   y    = x * scale[c] + shift[c]                  (eval BatchNorm, x's dtype and memory format)
//   loss = weight * sum_g ( ||mean_g - rm|| + ||var_g - rv|| )      (float32 scalar)
//
// Same numbers as kernels/fused_bn_stat.py's _FusedLossEager (its Python twin, used by the
// torch and triton backends): the statistics and the backward pass are the
// _ext_bn_stat_loss_fwd / _bwd kernels, called through the dispatcher so that this file
// serves CPU and CUDA tensors alike. Why C++: recovery calls this once per BN layer and
// step, forward and backward; as a Python autograd.Function each call cost about 0.2 ms
// of Python (layout views, the loss's small ops, the Function machinery), 20 layers x 2
// passes = most of what the CPU default path spent over the model's own forward and
// backward. Here the backward never enters Python.
//
// Gradient: d loss / d x = (x - mean[g,c]) * b[g,c] + a[g,c] + dy * scale[c], with
// a = g * weight * (mean - rm) / (||mean - rm|| M) and b = 2 g * weight * (var - rv) / (||var - rv|| M)
// (0 where a norm is 0: torch's subgradient), M the elements per (group, channel),
// g the incoming gradient of the loss. scale and shift are constants (frozen BN).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <vector>
#include <tuple>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (0, 2, ..., dim - 1, 1): the channel dim moved last.
std::vector<int64_t> last_channel_order(int64_t dim) {
  std::vector<int64_t> perm{0};
  for (int64_t d = 2; d < dim; ++d) perm.push_back(d);
  perm.push_back(1);
  return perm;
}

// A zero-copy canonical view as the kernels take it (kernels/bn_stat_loss.py: canon):
// channel-first (G, B, C, L) or channel-last (G, B*L, C); empty when x is neither.
at::Tensor canonical(const at::Tensor& x, int64_t G, bool* channel_first) {
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / std::max<int64_t>(1, N * C);
  if (L > 1 && x.is_contiguous()) {
    *channel_first = true;
    return x.view({G, N / G, C, L});
  }
  at::Tensor xp = x.permute(last_channel_order(x.dim()));
  if (xp.is_contiguous()) {
    *channel_first = false;
    return xp.view({G, N / G * L, C});
  }
  return at::Tensor();
}

// View of t in the layout `channel_first` (a copy only when t's own layout differs).
at::Tensor in_layout(const at::Tensor& t, int64_t G, bool channel_first) {
  bool cf = false;
  at::Tensor v = canonical(t, G, &cf);
  if (v.defined() && cf == channel_first) return v;
  const int64_t N = t.size(0), C = t.size(1), L = t.numel() / std::max<int64_t>(1, N * C);
  if (channel_first) return t.contiguous().view({G, N / G, C, L});
  return t.permute(last_channel_order(t.dim())).contiguous().view({G, N / G * L, C});
}

std::tuple<at::Tensor, at::Tensor> call_fwd(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                                            const at::Tensor& bias, const at::Tensor& y) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("srel_fast::_ext_bn_stat_loss_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&)>();
  return op.call(x, shift, scale, bias, y);
}

void call_bwd(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& scale, const at::Tensor& m,
              const at::Tensor& a, const at::Tensor& b, const at::Tensor& dx) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("srel_fast::_ext_bn_stat_loss_bwd", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  op.call(x, dy, scale, m, a, b, dx);
}

// The loss and d loss / d (mean, var), already divided as the backward pass wants them
// (a0 = weight (mean - rm) / (||mean - rm|| M), b0 = 2 weight (var - rv) / (||var - rv|| M)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_terms(const at::Tensor& mean, const at::Tensor& var,
                                                          const at::Tensor& rm, const at::Tensor& rv, double weight,
                                                          double count) {
  const at::Tensor d_mean = mean - rm, d_var = var - rv;
  const at::Tensor n_mean = at::linalg_vector_norm(d_mean, 2, {-1}, /*keepdim=*/true);
  const at::Tensor n_var = at::linalg_vector_norm(d_var, 2, {-1}, /*keepdim=*/true);
  at::Tensor loss = (n_mean.sum() + n_var.sum()) * weight;
  at::Tensor a0 = d_mean * at::where(n_mean > 0, at::reciprocal(n_mean) * (weight / count), 0.0);
  at::Tensor b0 = d_var * at::where(n_var > 0, at::reciprocal(n_var) * (2.0 * weight / count), 0.0);
  return {loss, a0, b0};
}

// The same as plain loops over the (G, C) moments: on the CPU the dozen small ATen ops
// above cost more than a small layer's statistics kernel (about 30 us against 4 us).
// Norms accumulated in double, then rounded to float like the ops' results.
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_terms_cpu(const at::Tensor& mean, const at::Tensor& var,
                                                              const at::Tensor& rm, const at::Tensor& rv,
                                                              double weight, double count) {
  const int64_t G = mean.size(0), C = mean.size(1);
  at::Tensor a0 = at::empty_like(mean), b0 = at::empty_like(var);
  const float *m = mean.const_data_ptr<float>(), *v = var.const_data_ptr<float>();
  const float *pm = rm.const_data_ptr<float>(), *pv = rv.const_data_ptr<float>();
  float *pa = a0.data_ptr<float>(), *pb = b0.data_ptr<float>();
  float total = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    double sm = 0.0, sv = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const float dm = m[g * C + c] - pm[c], dv = v[g * C + c] - pv[c];
      sm += static_cast<double>(dm) * dm;
      sv += static_cast<double>(dv) * dv;
    }
    const float nm = static_cast<float>(std::sqrt(sm)), nv = static_cast<float>(std::sqrt(sv));
    total += nm + nv;
    const float km = nm > 0.f ? static_cast<float>(weight / count) / nm : 0.f;
    const float kv = nv > 0.f ? static_cast<float>(2.0 * weight / count) / nv : 0.f;
    for (int64_t c = 0; c < C; ++c) {
      pa[g * C + c] = (m[g * C + c] - pm[c]) * km;
      pb[g * C + c] = (v[g * C + c] - pv[c]) * kv;
    }
  }
  at::Tensor loss = at::scalar_tensor(static_cast<float>(total * weight), mean.options());
  return {loss, a0, b0};
}

class FusedBNStatLoss : public torch::autograd::Function<FusedBNStatLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& running_mean,
                               const at::Tensor& running_var, const at::Tensor& scale, const at::Tensor& shift,
                               int64_t groups, double weight) {
    TORCH_CHECK(x.dim() >= 2, "fused_bn_stat: expected an input of shape (N, C, ...), got ", x.sizes());
    const int64_t N = x.size(0), C = x.size(1);
    TORCH_CHECK(groups >= 1 && N % groups == 0, "fused_bn_stat: batch ", N, " is not divisible into ", groups,
                " groups");
    TORCH_CHECK(x.numel() > 0, "fused_bn_stat: empty input");
    bool cf = false;
    at::Tensor xc = canonical(x, groups, &cf);
    at::Tensor xs = x;
    if (!xc.defined()) {  // neither layout: the kernels read a channel-first copy
      xs = x.contiguous();
      xc = canonical(xs, groups, &cf);
    }
    at::Tensor y = at::empty_like(xs);
    bool ycf = false;
    at::Tensor yc = canonical(y, groups, &ycf);
    const at::Tensor rm = running_mean.to(at::kFloat).contiguous();
    const at::Tensor rv = running_var.to(at::kFloat);
    auto [mean, var] = call_fwd(xc, rm, scale, shift, yc);
    const double count = static_cast<double>(xc.numel() / (groups * C));
    at::Tensor loss, a0, b0;
    if (x.is_cpu())
      std::tie(loss, a0, b0) = loss_terms_cpu(mean, var, rm, rv.contiguous(), weight, count);
    else
      std::tie(loss, a0, b0) = loss_terms(mean, var, rm, rv, weight, count);
    ctx->save_for_backward({xs, mean, scale, a0, b0});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["channel_first"] = cf;
    return {y, loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &scale = saved[2], &a0 = saved[3], &b0 = saved[4];
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const bool cf = ctx->saved_data["channel_first"].toBool();
    const at::Tensor& grad_y = grads[0];
    at::Tensor a, b;
    if (!grads[1].defined()) {  // the loss unused: only dy flows
      a = at::zeros_like(a0);
      b = at::zeros_like(b0);
    } else if (x.is_cpu()) {  // one scalar multiply each, without the ops' overhead
      const float g = grads[1].item<float>();
      a = at::empty_like(a0);
      b = at::empty_like(b0);
      const float *pa0 = a0.const_data_ptr<float>(), *pb0 = b0.const_data_ptr<float>();
      float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
      for (int64_t i = 0; i < a0.numel(); ++i) {
        pa[i] = pa0[i] * g;
        pb[i] = pb0[i] * g;
      }
    } else {
      const at::Tensor g = grads[1].to(at::kFloat);
      a = a0 * g;
      b = b0 * g;
    }
    bool xcf = false;
    const at::Tensor xc = canonical(x, groups, &xcf);
    at::Tensor dx = at::empty_like(x);
    bool dcf = false;
    at::Tensor dxc = canonical(dx, groups, &dcf);
    TORCH_INTERNAL_ASSERT(xcf == cf && dcf == cf);
    const at::Tensor none = x.new_empty({0});
    at::Tensor dyc = grad_y.defined() ? in_layout(grad_y.to(x.scalar_type()), groups, cf) : none;
    call_bwd(xc, dyc, grad_y.defined() ? scale : none.to(at::kFloat), mean, a, b, dxc);
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> fused_bn_stat_loss(const at::Tensor& x, const at::Tensor& running_mean,
                                                      const at::Tensor& running_var, const at::Tensor& scale,
                                                      const at::Tensor& shift, int64_t groups, double weight) {
  auto out = FusedBNStatLoss::apply(x, running_mean, running_var, scale, shift, groups, weight);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(srel_fast, m) {
  m.def("_ext_fused_bn_stat_loss(Tensor x, Tensor running_mean, Tensor running_var, Tensor scale, Tensor shift, "
        "int groups, float weight) -> (Tensor, Tensor)");
}

// One registration for every device: the function is its own autograd (a C++ Function
// node) and reaches the device kernels through the dispatcher.
TORCH_LIBRARY_IMPL(srel_fast, CompositeImplicitAutograd, m) {
  m.impl("_ext_fused_bn_stat_loss", &fused_bn_stat_loss);
}
