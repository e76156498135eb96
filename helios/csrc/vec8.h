// Eight floats in one vector (GCC/Clang vector extensions: AVX2 on x86-64, two NEON registers on
// ARM), shared by Helios's CPU kernels.
#pragma once

#include <cstring>

namespace helios {

typedef float vec8 __attribute__((vector_size(32)));

// p[0..7] as floats (bfloat16 and half converted one by one; float copied in one load)
template <typename T>
inline vec8 load8(const T* p) {
  vec8 v;
  for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}

template <>
inline vec8 load8<float>(const float* p) {
  vec8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float hsum(vec8 v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

}  // namespace helios
