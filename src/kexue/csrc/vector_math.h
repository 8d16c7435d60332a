// Vectorised exp, log and erfc over arrays, shared by kexue's kernels: MKL's vector math where
// torch exports it (its erfc about 3x faster than SLEEF's), else SLEEF through ATen's vector
// type. The MKL symbols are weak, so a torch built without MKL still loads the kernels.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

extern "C" {
void vsErfc(int, const float*, float*) __attribute__((weak));
void vdErfc(int, const double*, double*) __attribute__((weak));
void vsLn(int, const float*, float*) __attribute__((weak));
void vdLn(int, const double*, double*) __attribute__((weak));
void vsExp(int, const float*, float*) __attribute__((weak));
void vdExp(int, const double*, double*) __attribute__((weak));
}

namespace kexue {

using at::vec::Vectorized;
using SingleFn = void (*)(int, const float*, float*);
using WideFn = void (*)(int, const double*, double*);

// out[i] = f(a[i]) (in place allowed), by MKL's single or wide function where present
template <typename T, typename F>
void vec_apply(SingleFn single, WideFn wide, int64_t size, const T* a, T* out, F f) {
#ifdef KEXUE_NO_MKL  // the tests build this variant to check the SLEEF path
  single = nullptr;
  wide = nullptr;
#endif
  if constexpr (std::is_same_v<T, float>) {
    if (single != nullptr) return single(int(size), a, out);
  } else {
    if (wide != nullptr) return wide(int(size), a, out);
  }
  using V = Vectorized<T>;
  for (int64_t i = 0; i < size; i += V::size()) {
    const int64_t r = std::min<int64_t>(V::size(), size - i);
    f(V::loadu(a + i, r)).store(out + i, r);
  }
}

template <typename T>
void vec_erfc(int64_t size, const T* a, T* out) {
  vec_apply(vsErfc, vdErfc, size, a, out, [](auto v) { return v.erfc(); });
}

template <typename T>
void vec_log(int64_t size, const T* a, T* out) {
  vec_apply(vsLn, vdLn, size, a, out, [](auto v) { return v.log(); });
}

template <typename T>
void vec_exp(int64_t size, const T* a, T* out) {
  vec_apply(vsExp, vdExp, size, a, out, [](auto v) { return v.exp(); });
}

// the sum of the first count lanes of v
template <typename T>
T lane_sum(const Vectorized<T>& v, int64_t count = Vectorized<T>::size()) {
  T buf[Vectorized<T>::size()];
  v.store(buf);
  T s = 0;
  for (int64_t i = 0; i < count; ++i) s += buf[i];
  return s;
}

// a[0] + ... + a[size - 1], summed lane by lane
template <typename T>
T array_sum(const T* a, int64_t size) {
  using V = Vectorized<T>;
  V acc(T(0));
  int64_t i = 0;
  for (; i + V::size() <= size; i += V::size()) acc = acc + V::loadu(a + i);
  T s = lane_sum(acc);
  for (; i < size; ++i) s += a[i];
  return s;
}

}  // namespace kexue
