// Bi-Level reshape (SPEC section 6) on the CPU: one row per task, O(n) selection for the
// quantile instead of a sort. The op schema lives in oar_kernels/_ops.py; this file only
// registers CPU implementations for it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
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

// Writes one row of weights. Returns false when a scored element is not finite.
bool bilevel_row(const float* scores, const bool* mask, float* out, int64_t T,
                 const ReshapeParams& p, std::vector<float>& u, std::vector<float>& select) {
  u.clear();
  for (int64_t t = 0; t < T; ++t) {
    if (!mask[t]) continue;
    const float x = scores[t];
    if (!std::isfinite(x)) return false;
    u.push_back(std::log1p(std::max(x, 0.0f)));
  }
  const int64_t n = static_cast<int64_t>(u.size());
  if (n == 0) {
    std::fill(out, out + T, 1.0f);
    return true;
  }
  const auto [min_it, max_it] = std::minmax_element(u.begin(), u.end());
  const float c_min = *min_it;
  const float range = *max_it - c_min;
  const float r = range > 0.0f ? range : 1.0f;
  for (auto& v : u) v = (v - c_min) / r;

  // numpy's default ("linear") quantile: interpolate between order statistics lo and lo+1.
  const double h = static_cast<double>(n - 1) * p.tau;
  const int64_t lo = std::min<int64_t>(static_cast<int64_t>(std::floor(h)), n - 1);
  select.assign(u.begin(), u.end());
  std::nth_element(select.begin(), select.begin() + lo, select.end());
  const double v_lo = select[lo];
  const double v_hi =
      lo + 1 < n ? *std::min_element(select.begin() + lo + 1, select.end()) : v_lo;
  const double theta = v_lo + (h - static_cast<double>(lo)) * (v_hi - v_lo);

  double mass = 0.0;
  for (auto& v : u) {
    const double w = v < theta ? std::max(v / (theta + kEps), p.floor)
                               : 1.0 + p.beta * (v - theta) / (1.0 - theta + kEps);
    v = static_cast<float>(w);
    mass += w;
  }
  const double scale = p.preserve_mass ? static_cast<double>(n) / (mass + kEps) : 1.0;
  int64_t k = 0;
  for (int64_t t = 0; t < T; ++t) {
    out[t] = mask[t] ? static_cast<float>(u[k++] * scale) : 1.0f;
  }
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
  const ReshapeParams params{tau, beta, floor, preserve_mass};
  const float* s = scores_f.const_data_ptr<float>();
  const bool* m = mask_b.const_data_ptr<bool>();
  float* o = dst.mutable_data_ptr<float>();
  std::atomic<bool> all_finite{true};
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> u, select;
    u.reserve(T);
    select.reserve(T);
    for (int64_t b = begin; b < end; ++b) {
      if (!bilevel_row(s + b * T, m + b * T, o + b * T, T, params, u, select)) {
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
