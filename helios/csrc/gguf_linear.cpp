// Linear layers of a few rows over GGUF's 32-weight blocks (Q4_1 and Q8_0), in float32.
//
// Why: a decode step of a few rows reads every weight once and does little with it, so its
// time is the weights' bytes. The default model's file holds its layers as Q4_1 (5 bits a
// weight: 4-bit codes, a float16 scale and minimum per 32) and its LM head as Q8_0; the loader
// dequantizes them to float32 (4 bytes a weight) for every other path. These kernels read the blocks instead and dequantize
// each one in registers, exactly as the loader did (a block's value is scale * code + minimum,
// the same float32 operations), then multiply it with the rows in float32: the same weights and
// arithmetic as the float32 path, up to the order of the sums.
//
// pack: a float32 weight [N, K] -> its blocks, when every block of 32 along K is exactly such a
// block (found by trying the float16 scales next to (max - min) / 15, or max|w| / 127, and
// checking all 32 values); empty tensors when any block is not (then the caller keeps oneDNN).
// linear: x [M, K] float32 -> [M, N], rows in groups of up to 8 (each block decoded once per
// group, the group's sums in registers).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

#include "vec8.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

using helios::hsum;
using helios::load8;
using helios::vec8;

constexpr int64_t kBlock = 32;

// `guess` rounded to float16, then the float16 values one step above and below it: the stored scale
// is one of them (0 where a step leaves the finite float16 values, and 0 fits only a block of zeros).
inline std::array<float, 3> half_candidates(float guess) {
  const uint16_t bits = c10::Half(guess).x;
  std::array<float, 3> out{};
  const int steps[3] = {0, 1, -1};
  for (int i = 0; i < 3; ++i) {
    c10::Half h;
    h.x = static_cast<uint16_t>(bits + steps[i]);
    out[i] = (h.x & 0x7C00) == 0x7C00 ? 0.f : static_cast<float>(h);
  }
  return out;
}

// One Q4_1 block: value j is scale * code_j + minimum, codes 0..15 (the minimum has code 0).
bool fit_q4_1(const float* w, uint8_t* codes, float* scale, float* minimum) {
  float lo = w[0], hi = w[0];
  for (int j = 1; j < kBlock; ++j) lo = std::min(lo, w[j]), hi = std::max(hi, w[j]);
  for (float d : half_candidates((hi - lo) / 15.f)) {
    if (hi > lo && !(d > 0.f)) continue;
    uint8_t q[kBlock];
    bool exact = true;
    for (int j = 0; j < kBlock && exact; ++j) {
      const float code = d > 0.f ? std::nearbyint((w[j] - lo) / d) : 0.f;
      q[j] = static_cast<uint8_t>(code);
      exact = code >= 0.f && code <= 15.f && d * code + lo == w[j];
    }
    if (exact) {
      for (int j = 0; j < 16; ++j) codes[j] = static_cast<uint8_t>(q[j] | (q[j + 16] << 4));  // GGUF's order
      *scale = d, *minimum = lo;
      return true;
    }
  }
  return false;
}

// One Q8_0 block: value j is scale * code_j, codes -127..127.
bool fit_q8_0(const float* w, int8_t* codes, float* scale) {
  float amax = 0.f;
  for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::abs(w[j]));
  for (float d : half_candidates(amax / 127.f)) {
    if (amax > 0.f && !(d > 0.f)) continue;
    bool exact = true;
    for (int j = 0; j < kBlock && exact; ++j) {
      const float code = d > 0.f ? std::nearbyint(w[j] / d) : 0.f;
      codes[j] = static_cast<int8_t>(code);
      exact = code >= -128.f && code <= 127.f && d * code == w[j];
    }
    if (exact) {
      *scale = d;
      return true;
    }
  }
  return false;
}

// (codes, scales, minimums) of `weight` as Q4_1 (kind 0: codes [N, K/2] uint8, minimums [N, K/32]) or
// Q8_0 (kind 1: codes [N, K] int8, minimums empty); all empty when a block does not fit.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gguf_pack(const at::Tensor& weight, int64_t kind) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "weight must be a 2-D float32 tensor");
  TORCH_CHECK(kind == 0 || kind == 1, "kind is 0 (Q4_1) or 1 (Q8_0)");
  const auto w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1), blocks = k / kBlock;
  auto empty = at::empty({0}, w.options());
  if (k % kBlock != 0 || n == 0) return {empty.to(at::kByte), empty, empty};
  auto codes = at::empty({n, kind == 0 ? k / 2 : k}, w.options().dtype(kind == 0 ? at::kByte : at::kChar));
  auto scales = at::empty({n, blocks}, w.options());
  auto minimums = at::empty({kind == 0 ? n : 0, blocks}, w.options());
  std::atomic<bool> fits{true};
  const float* src = w.const_data_ptr<float>();
  uint8_t* code_bytes = static_cast<uint8_t*>(codes.mutable_data_ptr());
  float* scale_data = scales.mutable_data_ptr<float>();
  float* minimum_data = minimums.mutable_data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end && fits.load(std::memory_order_relaxed); ++row)
      for (int64_t b = 0; b < blocks; ++b) {
        const float* block = src + row * k + b * kBlock;
        const int64_t i = row * blocks + b;
        const bool ok = kind == 0 ? fit_q4_1(block, code_bytes + i * 16, scale_data + i, minimum_data + i)
                                  : fit_q8_0(block, reinterpret_cast<int8_t*>(code_bytes) + i * kBlock,
                                             scale_data + i);
        if (!ok) {
          fits = false;
          break;
        }
      }
  });
  if (!fits) return {empty.to(at::kByte), empty, empty};
  return {codes, scales, minimums};
}

// A block's codes -> floats. With AVX2 and FMA: one vpmovzxbd/vpmovsxbd and one vcvtdq2ps per 8
// values (GCC 12 turns the same thing written with vector extensions into one lane at a time).
// Elsewhere a plain loop.
#if defined(__AVX2__) && defined(__FMA__)
inline vec8 q4_values(__m128i codes8, __m256 d, __m256 m) {  // the low 8 bytes of codes8
  return (vec8)_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes8)), d, m);
}

inline void decode_q4_1(const uint8_t* codes, float scale, float minimum, vec8* w) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i mask = _mm_set1_epi8(15);
  const __m128i low = _mm_and_si128(bytes, mask), high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m256 d = _mm256_set1_ps(scale), m = _mm256_set1_ps(minimum);
  w[0] = q4_values(low, d, m), w[1] = q4_values(_mm_unpackhi_epi64(low, low), d, m);  // values 0-15
  w[2] = q4_values(high, d, m), w[3] = q4_values(_mm_unpackhi_epi64(high, high), d, m);  // values 16-31
}

inline void decode_q8_0(const int8_t* codes, float scale, vec8* w) {
  const __m256 d = _mm256_set1_ps(scale);
  for (int c = 0; c < 4; ++c) {
    const __m128i part = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + c * 8));
    w[c] = (vec8)_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part)), d);
  }
}
#else
inline void decode_q4_1(const uint8_t* codes, float scale, float minimum, vec8* w) {
  for (int j = 0; j < 16; ++j) {
    w[j / 8][j % 8] = static_cast<float>(codes[j] & 15) * scale + minimum;
    w[2 + j / 8][j % 8] = static_cast<float>(codes[j] >> 4) * scale + minimum;
  }
}

inline void decode_q8_0(const int8_t* codes, float scale, vec8* w) {
  for (int j = 0; j < kBlock; ++j) w[j / 8][j % 8] = static_cast<float>(codes[j]) * scale;
}
#endif

// Decode block b of output row n into w[0..3] (the block's 32 values, 8 per vector).
struct Q4_1Blocks {
  const uint8_t* codes;
  const float* scales;
  const float* minimums;
  int64_t blocks;
  inline void operator()(int64_t n, int64_t b, vec8* w) const {
    const int64_t i = n * blocks + b;
    decode_q4_1(codes + i * 16, scales[i], minimums[i], w);
  }
};

struct Q8_0Blocks {
  const int8_t* codes;
  const float* scales;
  int64_t blocks;
  inline void operator()(int64_t n, int64_t b, vec8* w) const {
    const int64_t i = n * blocks + b;
    decode_q8_0(codes + i * kBlock, scales[i], w);
  }
};

// out[r, n] = x[r] . w[n] (+ bias[n]) for ROWS rows from `x`; ACC sums per row (more chains for fewer rows).
template <int ROWS, typename Blocks>
void rows_times_blocks(const float* x, int64_t k, const Blocks& decode, int64_t n_begin, int64_t n_end,
                       const float* bias, float* out, int64_t out_stride) {
  constexpr int ACC = ROWS <= 2 ? 4 : ROWS <= 4 ? 2 : 1;
  const int64_t blocks = k / kBlock;
  for (int64_t n = n_begin; n < n_end; ++n) {
    vec8 acc[ROWS][ACC] = {};
    for (int64_t b = 0; b < blocks; ++b) {
      vec8 w[4];
      decode(n, b, w);
      for (int r = 0; r < ROWS; ++r) {
        const float* xr = x + r * k + b * kBlock;
        for (int c = 0; c < 4; ++c) acc[r][c % ACC] += w[c] * load8(xr + c * 8);
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      vec8 sum = acc[r][0];
      for (int a = 1; a < ACC; ++a) sum += acc[r][a];
      out[r * out_stride + n] = hsum(sum) + (bias ? bias[n] : 0.f);
    }
  }
}

template <typename Blocks>
void blocks_linear(const float* x, int64_t m, int64_t k, int64_t n, const Blocks& decode, const float* bias,
                   float* out) {
  at::parallel_for(0, n, 16, [&](int64_t n_begin, int64_t n_end) {
    for (int64_t r = 0; r < m; r += 8) {
      const float* xr = x + r * k;
      float* o = out + r * n;
      switch (std::min<int64_t>(8, m - r)) {
        case 1: rows_times_blocks<1>(xr, k, decode, n_begin, n_end, bias, o, n); break;
        case 2: rows_times_blocks<2>(xr, k, decode, n_begin, n_end, bias, o, n); break;
        case 3: rows_times_blocks<3>(xr, k, decode, n_begin, n_end, bias, o, n); break;
        case 4: rows_times_blocks<4>(xr, k, decode, n_begin, n_end, bias, o, n); break;
        case 5: rows_times_blocks<5>(xr, k, decode, n_begin, n_end, bias, o, n); break;
        case 6: rows_times_blocks<6>(xr, k, decode, n_begin, n_end, bias, o, n); break;
        case 7: rows_times_blocks<7>(xr, k, decode, n_begin, n_end, bias, o, n); break;
        default: rows_times_blocks<8>(xr, k, decode, n_begin, n_end, bias, o, n); break;
      }
    }
  });
}

// x [M, K] float32; codes, scales, minimums from gguf_pack (minimums empty: Q8_0); bias [N] or none.
at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const at::Tensor& minimums, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a 2-D float32 tensor");
  const auto xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), n = scales.size(0), blocks = scales.size(1);
  TORCH_CHECK(blocks * kBlock == k, "x has ", k, " columns; the weight has ", blocks * kBlock);
  const float* bias_data = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n && bias->scalar_type() == at::kFloat, "bias must be float32 [N]");
    bias_data = bias->const_data_ptr<float>();
  }
  auto out = at::empty({m, n}, xc.options());
  if (m == 0) return out;
  if (minimums.numel() > 0) {
    blocks_linear(xc.const_data_ptr<float>(), m, k, n,
                  Q4_1Blocks{codes.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(),
                             minimums.const_data_ptr<float>(), blocks},
                  bias_data, out.mutable_data_ptr<float>());
  } else {
    blocks_linear(xc.const_data_ptr<float>(), m, k, n,
                  Q8_0Blocks{codes.const_data_ptr<int8_t>(), scales.const_data_ptr<float>(), blocks}, bias_data,
                  out.mutable_data_ptr<float>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(helios, m) {
  m.def("gguf_pack(Tensor weight, int kind) -> (Tensor, Tensor, Tensor)");
  m.def("gguf_linear(Tensor x, Tensor codes, Tensor scales, Tensor minimums, Tensor? bias) -> Tensor");
  m.impl("gguf_pack", c10::DispatchKey::CPU, TORCH_FN(gguf_pack));
  m.impl("gguf_linear", c10::DispatchKey::CPU, TORCH_FN(gguf_linear));
}
