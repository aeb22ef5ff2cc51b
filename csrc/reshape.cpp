// Bi-Level reshape (SPEC section 6) on the CPU: one row per task, O(n) selection for the
// quantile instead of a sort. The op schema lives in oar_kernels/_ops.py; this file only
// registers CPU implementations for it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

namespace oar {
namespace {

// Same constant as oar_kernels.reshape.EPS: keeps 1/(theta + eps) and the mass division finite.
constexpr double kEps = 1e-8;

struct ReshapeParams {
  double tau;
  double beta;
  double floor;
  bool preserve_mass;
};

// The hot loops below are written branch-free so the compiler vectorises them; on x86-64
// GCC also emits an AVX2 clone chosen at load time (the baseline build is SSE2 only).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define OAR_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define OAR_SIMD_CLONES
#endif

inline float bits_to_float(int32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// log(y) for finite y >= 1 without libm, so loops calling it vectorise: y = 2^e * m with
// m in [sqrt(1/2), sqrt(2)), log m = 2 atanh((m - 1) / (m + 1)) by its odd series. ~2 ulp.
inline float log_at_least_one(float y) {
  const int32_t bits = float_to_bits(y);
  int32_t e = (bits >> 23) - 127;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  e += high;
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  const float tail = s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
  const float ef = static_cast<float>(e);
  // ln 2 split in two so e * ln2 keeps full precision.
  return ef * 0.693145752f + (2.0f * s + (2.0f * s * tail + ef * 1.42860677e-06f));
}

// log1p(x) for finite x >= 0 by Goldberg's identity: full relative accuracy for tiny x.
inline float log1p_nonneg(float x) {
  const float y = 1.0f + x;
  const float d = y - 1.0f;
  const float scaled = log_at_least_one(y) * (x / (d == 0.0f ? 1.0f : d));
  return d == 0.0f ? x : scaled;
}

OAR_SIMD_CLONES
void unit_scores(const float* x, float* u, int64_t n, float c_min, float spread) {
  for (int64_t i = 0; i < n; ++i) u[i] = (log1p_nonneg(x[i]) - c_min) / spread;
}

OAR_SIMD_CLONES
int32_t count_at_most(const int32_t* bits, int64_t n, int32_t limit) {
  int32_t count = 0;  // int32 lanes vectorise twice as wide as int64; rows are < 2^31
  for (int64_t i = 0; i < n; ++i) count += bits[i] <= limit;
  return count;
}

// Extremes of non-negative floats through their int32 bits (an integer min/max vectorises).
OAR_SIMD_CLONES
void bits_extremes(const int32_t* bits, int64_t n, int32_t* lowest, int32_t* highest) {
  int32_t lo = std::numeric_limits<int32_t>::max(), hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, bits[i]);
    hi = std::max(hi, bits[i]);
  }
  *lowest = lo;
  *highest = hi;
}

// How many u are <= bits_of_value, and the bits of the smallest u above it (INT32_MAX if none).
OAR_SIMD_CLONES
void next_above(const int32_t* bits, int64_t n, int32_t value, int32_t* at_most, int32_t* above) {
  int32_t count = 0;
  int32_t best = std::numeric_limits<int32_t>::max();
  for (int64_t i = 0; i < n; ++i) {
    count += bits[i] <= value;
    best = std::min(best, bits[i] > value ? bits[i] : std::numeric_limits<int32_t>::max());
  }
  *at_most = count;
  *above = best;
}

// Writes w(u) into u and returns the sum, in float lanes (as the Triton kernel sums).
OAR_SIMD_CLONES
float bilevel_in_place(float* u, int64_t n, float theta, float beta, float floor_w) {
  constexpr int kLanes = 16;
  float lanes[kLanes] = {};
  const float inv_low = 1.0f / (theta + static_cast<float>(kEps));
  const float slope = beta / (1.0f - theta + static_cast<float>(kEps));
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = u[i + l];
      const float damped = std::max(v * inv_low, floor_w);
      const float boosted = 1.0f + slope * (v - theta);
      u[i + l] = v < theta ? damped : boosted;
      lanes[l] += u[i + l];
    }
  }
  float mass = 0.0f;
  for (; i < n; ++i) {
    const float v = u[i];
    u[i] = v < theta ? std::max(v * inv_low, floor_w) : 1.0f + slope * (v - theta);
    mass += u[i];
  }
  for (float lane : lanes) mass += lane;
  return mass;
}

// Writes one row of weights. Returns false when a scored element is not finite.
bool bilevel_row(const float* scores, const bool* mask, float* out, int64_t T,
                 const ReshapeParams& p, std::vector<float>& x, std::vector<float>& u,
                 std::vector<int32_t>& cols) {
  // Compact the scored, clamped scores and their columns (branch-free: the writes of an
  // unscored element are overwritten by the next one).
  int64_t n = 0;
  int32_t non_finite = 0;
  for (int64_t t = 0; t < T; ++t) {
    const float s = scores[t];
    const bool m = mask[t];
    non_finite |= m & ((float_to_bits(s) & 0x7f800000) == 0x7f800000);
    x[n] = std::max(s, 0.0f);
    cols[n] = static_cast<int32_t>(t);
    n += m;
  }
  if (non_finite) return false;
  std::fill(out, out + T, 1.0f);
  if (n == 0) return true;
  int32_t bits_min = 0, bits_max = 0;
  bits_extremes(reinterpret_cast<const int32_t*>(x.data()), n, &bits_min, &bits_max);
  const float x_min = bits_to_float(bits_min);
  const float x_max = bits_to_float(bits_max);
  // log1p is monotone, so the extremes of c = log1p(x) come from those of x.
  const float c_min = log1p_nonneg(x_min);
  const float range = log1p_nonneg(x_max) - c_min;
  unit_scores(x.data(), u.data(), n, c_min, range > 0.0f ? range : 1.0f);

  // numpy's default ("linear") quantile between order statistics lo and lo + 1. u lies in
  // [0, 1], where floats order like their int32 bits: bisect on bits, counting each time.
  const double h = static_cast<double>(n - 1) * p.tau;
  const int64_t lo = std::min<int64_t>(static_cast<int64_t>(h), n - 1);
  const auto* bits = reinterpret_cast<const int32_t*>(u.data());
  int32_t bits_lo = 0, bits_hi = 0x3f800000;
  while (bits_lo < bits_hi) {
    const int32_t mid = bits_lo + (bits_hi - bits_lo) / 2;
    if (count_at_most(bits, n, mid) >= lo + 1) bits_hi = mid; else bits_lo = mid + 1;
  }
  const float v_lo = bits_to_float(bits_lo);
  int32_t at_most = 0;
  int32_t above = 0;
  next_above(bits, n, bits_lo, &at_most, &above);
  const bool repeats = at_most > lo + 1 || above == std::numeric_limits<int32_t>::max();
  const float v_hi = repeats ? v_lo : bits_to_float(above);
  const float theta = static_cast<float>(v_lo + (h - static_cast<double>(lo)) * (v_hi - v_lo));

  const float mass = bilevel_in_place(u.data(), n, theta, static_cast<float>(p.beta),
                                      static_cast<float>(p.floor));
  const float scale = p.preserve_mass ? static_cast<float>(n / (mass + kEps)) : 1.0f;
  for (int64_t k = 0; k < n; ++k) out[cols[k]] = u[k] * scale;
  return true;
}

void bilevel_weights_into_cpu(const at::Tensor& scores, const at::Tensor& score_mask, double tau,
                              double beta, double floor, bool preserve_mass, at::Tensor& out) {
  TORCH_CHECK_VALUE(scores.dim() == 2, "scores must be [B, T], got ", scores.sizes());
  TORCH_CHECK_VALUE(score_mask.sizes() == scores.sizes(), "score_mask must match scores ",
                    scores.sizes(), ", got ", score_mask.sizes());
  TORCH_CHECK_VALUE(out.sizes() == scores.sizes() && out.scalar_type() == at::kFloat,
                    "out must be a float32 tensor of shape ", scores.sizes());
  const auto scores_f = scores.to(at::kFloat).contiguous();
  const auto mask_b = score_mask.to(at::kBool).contiguous();
  const bool out_contiguous = out.is_contiguous();
  at::Tensor dst = out_contiguous ? out : at::empty_like(out, at::MemoryFormat::Contiguous);

  const int64_t B = scores_f.size(0);
  const int64_t T = scores_f.size(1);
  TORCH_CHECK_VALUE(T < std::numeric_limits<int32_t>::max(), "rows must be shorter than 2^31");
  const ReshapeParams params{tau, beta, floor, preserve_mass};
  const float* s = scores_f.const_data_ptr<float>();
  const bool* m = mask_b.const_data_ptr<bool>();
  float* o = dst.mutable_data_ptr<float>();
  std::atomic<bool> all_finite{true};
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x(T + 1), u(T + 1);
    std::vector<int32_t> cols(T + 1);
    for (int64_t b = begin; b < end; ++b) {
      if (!bilevel_row(s + b * T, m + b * T, o + b * T, T, params, x, u, cols)) {
        all_finite.store(false, std::memory_order_relaxed);
      }
    }
  });
  TORCH_CHECK_VALUE(all_finite.load(), "scores must be finite where score_mask is set");
  if (!out_contiguous) out.copy_(dst);
}

at::Tensor bilevel_weights_cpu(const at::Tensor& scores, const at::Tensor& score_mask, double tau,
                               double beta, double floor, bool preserve_mass) {
  at::Tensor out = at::empty(scores.sizes(), scores.options().dtype(at::kFloat));
  bilevel_weights_into_cpu(scores, score_mask, tau, beta, floor, preserve_mass, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(oar, CPU, m) {
  m.impl("bilevel_weights", &bilevel_weights_cpu);
  m.impl("bilevel_weights_into", &bilevel_weights_into_cpu);
}

}  // namespace oar
