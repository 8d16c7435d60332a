// The dense soft ZLPR loss and its gradient in two passes per row (docs/guides/losses.md,
// "A native kernel"). Built on first use by kexue.native; the eager path in
// kexue/losses/zlpr.py (_DenseZLPR) computes the same plain sums and is the tests' reference.
//
// Per row of scores s (n) and targets t in [0, 1] (or bool labels, read as 0/1):
//   e_i = exp(s_i),  p_i = t'_i / e_i,  q_i = (1 - t)'_i e_i,  A = sum_i p_i,  B = sum_i q_i,
//   loss = log1p(A) + log1p(B),  dL/ds_i = q_i / (1 + B) - p_i / (1 + A),
// where t'_i = t_i if t_i > lo else 0 and (1 - t)'_i = 1 - t_i if 1 - t_i > hi else 0 (the
// eps snapping of the eager path, with the same thresholds). A row whose plain sums are not
// exact (bound > 0: A or B not below bound; bound = 0: a score outside (-limit, limit)) makes
// the call report itself not fast: the caller then takes the eager path, which handles such
// rows exactly.
#include "kernels.h"
#include "vector_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

using at::vec::Vectorized;

namespace {

using kexue::lane_sum;
using kexue::vec_exp;

// p and q of one full vector of e and t
template <typename T>
inline void terms(const Vectorized<T>& e, const Vectorized<T>& t, const Vectorized<T>& lo,
                  const Vectorized<T>& hi, Vectorized<T>& p, Vectorized<T>& q) {
  using V = Vectorized<T>;
  const V zero(T(0)), u = V(T(1)) - t;
  p = V::blendv(zero, t, t > lo) / e;
  q = V::blendv(zero, u, u > hi) * e;
}

template <typename T>
inline void terms(T e, T t, T lo, T hi, T& p, T& q) {
  const T u = T(1) - t;
  p = (t > lo ? t : T(0)) / e;
  q = (u > hi ? u : T(0)) * e;
}

// Whether every score of the row lies in (-limit, limit) (NaN: no).
template <typename T>
bool in_range(const T* s, int64_t n, T limit) {
  using V = Vectorized<T>;
  constexpr int64_t kW = V::size();
  const int64_t full = n - n % kW;
  V low(limit), high(-limit);
  for (int64_t i = 0; i < full; i += kW) {
    const V x = V::loadu(s + i);
    low = at::vec::minimum(low, x);  // propagates NaN
    high = at::vec::maximum(high, x);
  }
  T lo_buf[kW], hi_buf[kW];
  low.store(lo_buf);
  high.store(hi_buf);
  for (int64_t i = 0; i < kW; ++i)
    if (!(lo_buf[i] > -limit && hi_buf[i] < limit)) return false;
  for (int64_t i = full; i < n; ++i)
    if (!(s[i] > -limit && s[i] < limit)) return false;
  return true;
}

// Returns whether the row's plain sums are exact.
template <typename T>
bool row(const T* s, const T* t, int64_t n, T lo, T hi, T bound, T limit, T* e, T* loss,
         T* grad) {
  using V = Vectorized<T>;
  constexpr int64_t kW = V::size();
  const int64_t full = n - n % kW;
  if (bound <= 0 && !in_range(s, n, limit)) return false;
  vec_exp(n, s, e);
  const V v_lo(lo), v_hi(hi);
  V acc_a(T(0)), acc_b(T(0)), p, q;
  for (int64_t i = 0; i < full; i += kW) {
    terms(V::loadu(e + i), V::loadu(t + i), v_lo, v_hi, p, q);
    acc_a = acc_a + p;
    acc_b = acc_b + q;
  }
  T a = lane_sum(acc_a), b = lane_sum(acc_b);
  for (int64_t i = full; i < n; ++i) {
    T pi, qi;
    terms(e[i], t[i], lo, hi, pi, qi);
    a += pi;
    b += qi;
  }
  if (bound > 0 && !(a < bound && b < bound)) return false;
  *loss = std::log1p(a) + std::log1p(b);
  if (grad == nullptr) return true;
  const T ia = T(1) / (T(1) + a), ib = T(1) / (T(1) + b);
  const V v_ia(ia), v_ib(ib);
  for (int64_t i = 0; i < full; i += kW) {
    terms(V::loadu(e + i), V::loadu(t + i), v_lo, v_hi, p, q);
    (q * v_ib - p * v_ia).store(grad + i);
  }
  for (int64_t i = full; i < n; ++i) {
    T pi, qi;
    terms(e[i], t[i], lo, hi, pi, qi);
    grad[i] = qi * ib - pi * ia;
  }
  return true;
}

}  // namespace

// Contiguous CPU float32/float64 s (B, n); t of s's dtype, or bool (hard labels, read as 0/1
// into a row buffer).
std::vector<at::Tensor> zlpr(const at::Tensor& s, const at::Tensor& t, double lo, double hi,
                             double bound, double limit, bool with_grad) {
  TORCH_CHECK(s.dim() == 2 && t.sizes() == s.sizes(), "bad shapes");
  TORCH_CHECK(s.is_contiguous() && t.is_contiguous(), "inputs must be contiguous");
  const bool hard = t.scalar_type() == at::kBool;
  TORCH_CHECK(hard || t.scalar_type() == s.scalar_type(), "t must be bool or of s's dtype");
  const int64_t rows = s.size(0), n = s.size(1);
  auto loss = at::empty({rows}, s.options());
  // the gradient's buffer holds exp(s) until the second pass overwrites it
  auto grad = at::empty({rows, n}, s.options());
  std::atomic<bool> fast{true};
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "zlpr", [&] {
    using T = scalar_t;
    const T* s_p = s.data_ptr<T>();
    const T* t_p = hard ? nullptr : t.data_ptr<T>();
    const bool* tb_p = hard ? t.data_ptr<bool>() : nullptr;
    T *loss_p = loss.data_ptr<T>(), *grad_p = grad.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, n));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> labels(hard ? n : 0);
      for (int64_t r = begin; r < end && fast.load(std::memory_order_relaxed); ++r) {
        const T* t_row = t_p + r * n;
        if (hard) {
          const bool* b = tb_p + r * n;
          for (int64_t i = 0; i < n; ++i) labels[i] = b[i] ? T(1) : T(0);
          t_row = labels.data();
        }
        T* g = grad_p + r * n;
        if (!row<T>(s_p + r * n, t_row, n, T(lo), T(hi), T(bound), T(limit), g, loss_p + r,
                    with_grad ? g : nullptr))
          fast.store(false, std::memory_order_relaxed);
      }
    });
  });
  return {loss, with_grad ? grad : at::Tensor(), at::scalar_tensor(fast.load(), at::kBool)};
}
