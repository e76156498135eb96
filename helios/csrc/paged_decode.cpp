// One-token (decode) attention that reads K/V from the paged cache in place.
//
// For each (row, kv head) the kernel walks the row's block table once for K (scores of the
// kv head's query heads) and once for V (their weighted sum), in float32, with an exact
// softmax over the row's context (or its last `window` positions). The PyTorch path gathers
// every row's whole context out of the cache first (a copy per layer per step, written and
// read again); on a 2-core CPU that copy was the largest part of decode attention.
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
#include <cmath>
#include <vector>

namespace {

// DIM > 0: head_dim known at compile time (the inner loops unroll into vector FMAs); 0: `dim`.
template <typename T, int64_t DIM>
void decode_rows(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* lens,
                 T* out, int64_t rows, int64_t heads, int64_t kv_heads, int64_t runtime_dim, int64_t head_stride,
                 int64_t block_size, int64_t max_blocks, int64_t window, float scale) {
  const int64_t group = heads / kv_heads;
  const int64_t dim = DIM > 0 ? DIM : runtime_dim;
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), total(group), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / kv_heads, g = item % kv_heads;
      const int64_t len = lens[r];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      const int64_t* table = tables + r * max_blocks;
      const T* q_row = q + (r * heads + g * group) * dim;
      for (int64_t i = 0; i < group * dim; ++i) qf[i] = static_cast<float>(q_row[i]) * scale;
      scores.resize(group * n);  // every entry is written below
      const T* k_head = k_cache + g * head_stride;
      for (int64_t t = first; t < len; ++t) {
        const T* key = k_head + (table[t / block_size] * block_size + t % block_size) * dim;
        for (int64_t h = 0; h < group; ++h) {
          const float* qh = qf.data() + h * dim;
          float s = 0.f;
          for (int64_t d = 0; d < dim; ++d) s += qh[d] * static_cast<float>(key[d]);
          scores[h * n + (t - first)] = s;
        }
      }
      std::fill(total.begin(), total.end(), 0.f);
      for (int64_t h = 0; h < group; ++h) {
        float* sh = scores.data() + h * n;
        const float peak = n ? *std::max_element(sh, sh + n) : 0.f;
        for (int64_t t = 0; t < n; ++t) {
          sh[t] = std::exp(sh[t] - peak);
          total[h] += sh[t];
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const T* v_head = v_cache + g * head_stride;
      for (int64_t t = first; t < len; ++t) {
        const T* value = v_head + (table[t / block_size] * block_size + t % block_size) * dim;
        for (int64_t h = 0; h < group; ++h) {
          const float p = scores[h * n + (t - first)];
          float* ah = acc.data() + h * dim;
          for (int64_t d = 0; d < dim; ++d) ah[d] += p * static_cast<float>(value[d]);
        }
      }
      T* o = out + (r * heads + g * group) * dim;
      for (int64_t h = 0; h < group; ++h) {
        const float inv = total[h] > 0.f ? 1.f / total[h] : 0.f;
        for (int64_t d = 0; d < dim; ++d) o[h * dim + d] = static_cast<T>(acc[h * dim + d] * inv);
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
