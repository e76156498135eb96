// One-token (decode) attention that reads K/V from the paged cache in place.
//
// For each (row, kv head) the kernel walks the row's block table once, block by block: the
// scores of the kv head's query heads against the block's keys, then their weighted sum of the
// block's values, with an online softmax (each head's running maximum and sum; what was summed
// under an older maximum is rescaled), in float32. The PyTorch path gathers every row's whole
// context out of the cache first (a copy per layer per step, written and read again); on a
// 2-core CPU that copy was the largest part of decode attention.
//
// Why it is written this way (bench/results/README.md, "Decode attention, block by block"):
// - a block's keys and values are read together and its scores stay in L1;
// - four keys per dot-product loop: four independent FMA chains instead of one.
// Prefetching the next block (blocks lie anywhere in the cache) measured no faster: not done.
// Vectors are GCC/Clang vector extensions (AVX2 here, NEON on ARM): head_dim must be a multiple
// of 8 (helios/cpu_kernels.py falls back to SDPA otherwise).
//
// Cache layout of one layer: [kv_heads, num_blocks, block_size, head_dim], contiguous.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "vec8.h"

namespace {

using helios::hsum;
using helios::load8;
using helios::vec8;
constexpr int64_t kMaxVectors = 64;  // head_dim <= 512

// scores[j] = q . key j for keys lo..hi-1 of one block (keys are rows of `dim` = 8 * vectors)
template <typename T>
inline void block_scores(const vec8* q, const T* keys, int64_t vectors, int64_t lo, int64_t hi, float* scores) {
  const int64_t dim = vectors * 8;
  int64_t j = lo;
  for (; j + 4 <= hi; j += 4) {
    vec8 a0{}, a1{}, a2{}, a3{};
    const T* k = keys + j * dim;
    for (int64_t c = 0; c < vectors; ++c) {
      a0 += q[c] * load8(k + c * 8);
      a1 += q[c] * load8(k + dim + c * 8);
      a2 += q[c] * load8(k + 2 * dim + c * 8);
      a3 += q[c] * load8(k + 3 * dim + c * 8);
    }
    scores[j] = hsum(a0), scores[j + 1] = hsum(a1), scores[j + 2] = hsum(a2), scores[j + 3] = hsum(a3);
  }
  for (; j < hi; ++j) {
    vec8 a{};
    for (int64_t c = 0; c < vectors; ++c) a += q[c] * load8(keys + j * dim + c * 8);
    scores[j] = hsum(a);
  }
}

// DIM > 0: head_dim known at compile time (the loops over vectors unroll); 0: `runtime_dim`.
template <typename T, int64_t DIM>
void decode_rows(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* lens,
                 T* out, int64_t rows, int64_t heads, int64_t kv_heads, int64_t runtime_dim, int64_t head_stride,
                 int64_t block_size, int64_t max_blocks, int64_t window, float scale) {
  const int64_t group = heads / kv_heads;
  const int64_t dim = DIM > 0 ? DIM : runtime_dim;
  const int64_t vectors = dim / 8;
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<vec8> qv(group * vectors), acc(group * vectors);
    std::vector<float> peak(group), total(group), scores(block_size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / kv_heads, g = item % kv_heads;
      const int64_t len = lens[r];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t* table = tables + r * max_blocks;
      const T* q_row = q + (r * heads + g * group) * dim;
      for (int64_t i = 0; i < group * vectors; ++i) qv[i] = load8(q_row + i * 8) * scale;
      std::fill(acc.begin(), acc.end(), vec8{});
      std::fill(total.begin(), total.end(), 0.f);
      const T* k_head = k_cache + g * head_stride;
      const T* v_head = v_cache + g * head_stride;
      for (int64_t b = first / block_size; b * block_size < len; ++b) {
        const int64_t lo = std::max<int64_t>(first - b * block_size, 0);
        const int64_t hi = std::min(len - b * block_size, block_size);
        const T* keys = k_head + table[b] * block_size * dim;
        const T* values = v_head + table[b] * block_size * dim;
        for (int64_t h = 0; h < group; ++h) {
          float* s = scores.data();
          block_scores(qv.data() + h * vectors, keys, vectors, lo, hi, s);
          float m = s[lo];
          for (int64_t j = lo + 1; j < hi; ++j) m = std::max(m, s[j]);
          vec8* ah = acc.data() + h * vectors;
          if (b == first / block_size) {
            peak[h] = m;
          } else if (m > peak[h]) {  // rescale what was summed under the older maximum
            const float shrink = std::exp(peak[h] - m);
            total[h] *= shrink;
            for (int64_t c = 0; c < vectors; ++c) ah[c] *= shrink;
            peak[h] = m;
          }
          float sum = 0.f;
          for (int64_t j = lo; j < hi; ++j) {
            s[j] = std::exp(s[j] - peak[h]);
            sum += s[j];
          }
          total[h] += sum;
          std::array<vec8, kMaxVectors> local;  // this head's sum, in registers when DIM is known
          for (int64_t c = 0; c < vectors; ++c) local[c] = ah[c];
          for (int64_t j = lo; j < hi; ++j) {
            const T* value = values + j * dim;
            for (int64_t c = 0; c < vectors; ++c) local[c] += s[j] * load8(value + c * 8);
          }
          for (int64_t c = 0; c < vectors; ++c) ah[c] = local[c];
        }
      }
      T* o = out + (r * heads + g * group) * dim;
      for (int64_t h = 0; h < group; ++h) {
        const float inv = total[h] > 0.f ? 1.f / total[h] : 0.f;
        for (int64_t c = 0; c < vectors; ++c)
          for (int i = 0; i < 8; ++i) o[h * dim + c * 8 + i] = static_cast<T>(acc[h * vectors + c][i] * inv);
      }
    }
  });
}

// q [R, H, D]; k_cache, v_cache [Hkv, blocks, block_size, D]; tables [R, max_blocks] (int64);
// lens [R] (int64): positions 0..len-1 of each row's table are attended (the last `window` of
// them when window > 0). Returns [R, H * D] in q's dtype.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& tables, const at::Tensor& lens, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "tables and lens must be int64");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and the cache must share a dtype");
  const auto tables_c = tables.contiguous();
  const auto lens_c = lens.contiguous();
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(0);
  TORCH_CHECK(k_cache.size(3) == dim && heads % kv_heads == 0, "head counts or head_dim do not match");
  TORCH_CHECK(dim % 8 == 0 && dim / 8 <= kMaxVectors, "head_dim must be a multiple of 8, at most 512");
  auto out = at::empty({rows, heads * dim}, q.options());
  const int64_t head_stride = k_cache.size(1) * k_cache.size(2) * dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    auto run = [&](auto kernel) {
      kernel(q.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(), v_cache.const_data_ptr<scalar_t>(),
             tables_c.const_data_ptr<int64_t>(), lens_c.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(),
             rows, heads, kv_heads, dim, head_stride, k_cache.size(2), tables_c.size(1), window,
             static_cast<float>(scale));
    };
    if (dim == 64) run(decode_rows<scalar_t, 64>);
    else if (dim == 128) run(decode_rows<scalar_t, 128>);
    else if (dim == 256) run(decode_rows<scalar_t, 256>);
    else run(decode_rows<scalar_t, 0>);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(helios, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor lens, int window, float scale) -> Tensor");
  m.impl("paged_decode", c10::DispatchKey::CPU, TORCH_FN(paged_decode));
}
