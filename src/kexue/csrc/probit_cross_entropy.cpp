// The probit head's loss and its gradient in one pass per row (docs/guides/distributions.md,
// "A native kernel for the probit head"). Built on first use by kexue.native;
// the eager path in maximum.py computes the same quantities and is the reference for tests.
//
// Per row of centred scores mu (n), nodes y (M), log-weights log w (M) and target t:
//   x_kl = y_k - mu_l,  log Phi(x) = log(erfc(-x / sqrt 2)) - log 2,
//   u_kl = log Phi(x_kl) + x_kl^2 / 2   (log h = c - u, c = -log sqrt(2 pi)),
//   h'_kl = exp(-min(u_kl, limit)),  log P_k = sum_l log Phi(x_kl),
//   W_k = exp(log w_k + log P_k - top),  m_l = sum_k W_k h'_kl,  S = sum_l m_l,
//   loss = log S - log m_t, with log m_t taken in log space from the unclamped u_kt.
// The gradient (normal noise: (log phi)' = -x) is
//   g_j = sum_k h'_kj (first_k + square_k h'_kj) - mu_j m_j / S + [j = t] sum_k pi_kt d_kt,
//   first_k = pi_kt e^c - (W_k / S)(H_k e^c - y_k),  square_k = (W_k / S) e^c,
//   d_kt = -x_kt - h_kt,  H_k = sum_l h'_kl,
// projected onto the vectors that sum to zero.
#include "kernels.h"
#include "vector_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

using at::vec::Vectorized;

namespace {

using kexue::array_sum;
using kexue::lane_sum;
using kexue::vec_erfc;
using kexue::vec_exp;
using kexue::vec_log;

// Buffers of one thread: three M x n blocks (x, u, h, one after another) and a few vectors.
// Grow-only and kept per thread across calls, like the eager path's scratch buffer: fresh
// ones would be paged in anew each call (14 MB at n = 50,000).
template <typename T>
struct Workspace {
  std::vector<T> blocks, mass, u_t, log_p, h_sum, weight, post, first, square;
  static Workspace& of_this_thread(int64_t m, int64_t n) {
    thread_local Workspace ws;
    ws.blocks.resize(std::max<size_t>(ws.blocks.size(), 3 * m * n));
    ws.mass.resize(std::max<size_t>(ws.mass.size(), n));
    for (auto* v : {&ws.u_t, &ws.log_p, &ws.h_sum, &ws.weight, &ws.post, &ws.first, &ws.square})
      v->resize(std::max<size_t>(v->size(), m));
    return ws;
  }
};

template <typename T>
void row(const T* mu, const T* y, const T* log_w, int64_t t, int64_t m, int64_t n, T limit,
         Workspace<T>& ws, T* loss, T* grad) {
  using V = Vectorized<T>;
  constexpr int64_t kW = V::size();
  const T ln2 = std::log(T(2));
  const T shift = -T(0.5) * std::log(T(2) * T(M_PI));  // c of log h = c - u
  const V neg_sqrt_half(-std::sqrt(T(0.5))), half(T(0.5)), v_ln2(ln2), v_limit(limit);
  T *xs = ws.blocks.data(), *us = xs + m * n, *hs = us + m * n;

  // x, and erfc(-x / sqrt 2) then its log in bulk
  for (int64_t k = 0; k < m; ++k) {
    const V yk(y[k]);
    for (int64_t l = 0; l < n; l += kW) {
      const int64_t r = std::min<int64_t>(kW, n - l);
      const V x = yk - V::loadu(mu + l, r);
      x.store(xs + k * n + l, r);
      (x * neg_sqrt_half).store(us + k * n + l, r);
    }
  }
  vec_erfc(m * n, us, us);
  vec_log(m * n, us, us);
  // u = log Phi + x^2 / 2, log P_k, and -min(u, limit) into h before one exp
  for (int64_t k = 0; k < m; ++k) {
    V acc(T(0));
    T tail = 0;
    for (int64_t l = 0; l < n; l += kW) {
      const int64_t r = std::min<int64_t>(kW, n - l);
      const V x = V::loadu(xs + k * n + l, r);
      const V lc = V::loadu(us + k * n + l, r) - v_ln2;
      const V u = at::vec::fmadd(half * x, x, lc);
      u.store(us + k * n + l, r);
      at::vec::minimum(u, v_limit).neg().store(hs + k * n + l, r);
      if (r == kW) acc = acc + lc; else tail += lane_sum(lc, r);
    }
    ws.log_p[k] = lane_sum(acc) + tail + log_w[k];  // log w_k + log P_k
    ws.u_t[k] = us[k * n + t];
  }
  vec_exp(m * n, hs, hs);
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < m; ++k) top = std::max(top, ws.log_p[k]);
  for (int64_t k = 0; k < m; ++k) ws.weight[k] = std::exp(ws.log_p[k] - top);
  // m_l = sum_k W_k h'_kl and H_k = sum_l h'_kl
  for (int64_t l = 0; l < n; l += kW) {
    const int64_t r = std::min<int64_t>(kW, n - l);
    V acc(T(0));
    for (int64_t k = 0; k < m; ++k)
      acc = at::vec::fmadd(V(ws.weight[k]), V::loadu(hs + k * n + l, r), acc);
    acc.store(ws.mass.data() + l, r);
  }
  for (int64_t k = 0; k < m; ++k) ws.h_sum[k] = array_sum(hs + k * n, n);
  const T total = array_sum(ws.mass.data(), n);
  // the target's log mass in log space on the M nodes: exact where its h' underflows
  T top_t = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < m; ++k) {
    ws.post[k] = shift - ws.u_t[k] + ws.log_p[k];
    top_t = std::max(top_t, ws.post[k]);
  }
  T mass_t = 0;
  for (int64_t k = 0; k < m; ++k) {
    ws.post[k] = std::exp(ws.post[k] - top_t);
    mass_t += ws.post[k];
  }
  *loss = std::log(total / mass_t) + (top - top_t) + shift;
  if (grad == nullptr) return;

  const T scale = std::exp(shift), inv_total = T(1) / total, inv_t = T(1) / mass_t;
  const T mu_t = mu[t];
  T target_term = 0;
  for (int64_t k = 0; k < m; ++k) {
    const T w_s = ws.weight[k] * inv_total, pi = ws.post[k] * inv_t;
    ws.first[k] = pi * scale - w_s * (ws.h_sum[k] * scale - y[k]);
    ws.square[k] = w_s * scale;
    target_term += pi * (mu_t - y[k] - std::exp(shift - ws.u_t[k]));  // pi_kt (-x_kt - h_kt)
  }
  const V v_inv_total(inv_total);
  V acc_sum(T(0));
  T tail_sum = 0;
  for (int64_t l = 0; l < n; l += kW) {
    const int64_t r = std::min<int64_t>(kW, n - l);
    V acc(T(0));
    for (int64_t k = 0; k < m; ++k) {
      const V h = V::loadu(hs + k * n + l, r);
      acc = at::vec::fmadd(h, at::vec::fmadd(V(ws.square[k]), h, V(ws.first[k])), acc);
    }
    acc = acc - V::loadu(mu + l, r) * V::loadu(ws.mass.data() + l, r) * v_inv_total;
    acc.store(grad + l, r);
    if (r == kW) acc_sum = acc_sum + acc; else tail_sum += lane_sum(acc, r);
  }
  grad[t] += target_term;
  // the exact loss is unchanged by mu + c: its gradient sums to zero over the classes
  const V mean((lane_sum(acc_sum) + tail_sum + target_term) / T(n));
  for (int64_t l = 0; l < n; l += kW) {
    const int64_t r = std::min<int64_t>(kW, n - l);
    (V::loadu(grad + l, r) - mean).store(grad + l, r);
  }
}

}  // namespace

// Contiguous CPU float32/float64 mu (B, n), y and log_w (B, M), int64 target (B,).
std::vector<at::Tensor> probit_cross_entropy(const at::Tensor& mu, const at::Tensor& y,
                                             const at::Tensor& log_w, const at::Tensor& target,
                                             bool with_grad) {
  TORCH_CHECK(mu.dim() == 2 && y.dim() == 2 && log_w.sizes() == y.sizes(), "bad shapes");
  TORCH_CHECK(mu.is_contiguous() && y.is_contiguous() && log_w.is_contiguous() &&
                  target.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.numel() == mu.size(0), "bad target");
  const int64_t rows = mu.size(0), n = mu.size(1), m = y.size(1);
  TORCH_CHECK(y.size(0) == rows && n > 0 && m > 0, "bad shapes");
  auto loss = at::empty({rows}, mu.options());
  auto grad = with_grad ? at::empty({rows, n}, mu.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "probit_cross_entropy", [&] {
    using T = scalar_t;
    const T limit = -std::log(std::numeric_limits<T>::min());  // exp(-limit): smallest normal
    const T *mu_p = mu.data_ptr<T>(), *y_p = y.data_ptr<T>(), *w_p = log_w.data_ptr<T>();
    const int64_t* t_p = target.data_ptr<int64_t>();
    T* loss_p = loss.data_ptr<T>();
    T* grad_p = with_grad ? grad.data_ptr<T>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (m * n));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      Workspace<T>& ws = Workspace<T>::of_this_thread(m, n);
      for (int64_t b = begin; b < end; ++b)
        row<T>(mu_p + b * n, y_p + b * m, w_p + b * m, t_p[b], m, n, limit, ws, loss_p + b,
               grad_p ? grad_p + b * n : nullptr);
    });
  });
  return {loss, grad};
}
