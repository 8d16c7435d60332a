// kexue's native CPU kernels (kexue.native builds them; docs/guides/*.md explain each).
#pragma once

#include <ATen/ATen.h>

#include <vector>

// (loss (B,), each row's gradient (B, n) or an undefined tensor): the probit head's
// cross-entropy over centred scores mu (B, n) on nodes y and log-weights log_w (B, M).
std::vector<at::Tensor> probit_cross_entropy(const at::Tensor& mu, const at::Tensor& y,
                                             const at::Tensor& log_w, const at::Tensor& target,
                                             bool with_grad);

// (loss (B,), each row's gradient (B, n) or an undefined tensor, whether every row took the
// plain sums): the soft ZLPR loss of scores s (B, n) with float targets t.
std::vector<at::Tensor> zlpr(const at::Tensor& s, const at::Tensor& t, double lo, double hi,
                             double bound, double limit, bool with_grad);
