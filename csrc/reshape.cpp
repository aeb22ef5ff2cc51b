// Bi-Level reshape (SPEC section 6) on the CPU: one row per task, O(n) selection for the
// quantile instead of a sort. The op schema lives in oar_kernels/_ops.py; this file only
// registers CPU implementations for it.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

namespace oar {
namespace {

// Same constant as oar_kernels.reshape.EPS: keeps 1/(theta + eps) and the mass division finite.
constexpr double kEps = 1e-8;
// oar_kernels.reshape.MAX_BETA: beyond it a row's float32 weight mass could overflow.
constexpr double kMaxBeta = 1e6;
// Scores a thread must have to be worth starting (~50 us of work).
constexpr int64_t kMinElementsPerThread = 32768;

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

// u = (c - c_min) / spread with c = log1p(x). A division, not a multiplication by 1 / spread:
// that reciprocal overflows for a subnormal spread. The clamp keeps u in [0, 1], which the
// bit-pattern selection relies on, whatever the last-place rounding.
OAR_SIMD_CLONES
void unit_scores(const float* x, float* u, int64_t n, float c_min, float spread) {
  for (int64_t i = 0; i < n; ++i) {
    u[i] = std::min(std::max((log1p_nonneg(x[i]) - c_min) / spread, 0.0f), 1.0f);
  }
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

// Bits of the smallest u above `value`, or INT32_MAX if there is none. Bits are >= 0, so
// b - value - 1 is >= 0 exactly when b > value and wraps past INT32_MAX as unsigned otherwise:
// an unsigned min (which vectorises) picks the answer.
OAR_SIMD_CLONES
int32_t smallest_above(const int32_t* bits, int64_t n, int32_t value) {
  uint32_t best = std::numeric_limits<uint32_t>::max();
  const uint32_t shift = static_cast<uint32_t>(value) + 1u;
  for (int64_t i = 0; i < n; ++i) best = std::min(best, static_cast<uint32_t>(bits[i]) - shift);
  return best > static_cast<uint32_t>(std::numeric_limits<int32_t>::max())
             ? std::numeric_limits<int32_t>::max()
             : static_cast<int32_t>(best + shift);
}

// Writes w(u) into u and returns the sum: float lanes (which vectorise) over blocks of
// kBlock elements, the block sums added in double. Float lanes over a whole row drifted by
// 1e-4 of the mass on rows of millions of tokens.
OAR_SIMD_CLONES
double bilevel_in_place(float* u, int64_t n, float theta, float beta, float floor_w) {
  constexpr int kLanes = 16;
  constexpr int64_t kBlock = 4096;
  const float inv_low = 1.0f / (theta + static_cast<float>(kEps));
  const float slope = beta / (1.0f - theta + static_cast<float>(kEps));
  double mass = 0.0;
  int64_t i = 0;
  while (i + kLanes <= n) {
    float lanes[kLanes] = {};
    const int64_t block_end = std::min(n - kLanes + 1, i + kBlock);
    for (; i < block_end; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float v = u[i + l];
        const float damped = std::max(v * inv_low, floor_w);
        const float boosted = 1.0f + slope * (v - theta);
        u[i + l] = v < theta ? damped : boosted;
        lanes[l] += u[i + l];
      }
    }
    for (float lane : lanes) mass += lane;
  }
  for (; i < n; ++i) {
    const float v = u[i];
    u[i] = v < theta ? std::max(v * inv_low, floor_w) : 1.0f + slope * (v - theta);
    mass += u[i];
  }
  return mass;
}

// Packs the scored elements of a row: x[k] = max(score, 0) and cols[k] = its column, for the
// k-th scored element. Returns how many; sets *non_finite if a scored score is NaN or Inf.
// Stores past the count are scratch, so x and cols need T + 8 slots.
int64_t compact_scalar(const float* scores, const bool* mask, int64_t T, int64_t t, int64_t n,
                       float* x, int32_t* cols, int32_t* non_finite) {
  // Branch-free: the writes of an unscored element are overwritten by the next one.
  for (; t < T; ++t) {
    const float s = scores[t];
    const bool m = mask[t];
    *non_finite |= m & ((float_to_bits(s) & 0x7f800000) == 0x7f800000);
    x[n] = std::max(s, 0.0f);
    cols[n] = static_cast<int32_t>(t);
    n += m;
  }
  return n;
}

// Keeps the bits within [low, high] at the front of `bits` (branch-free); returns how many.
int64_t keep_in_range_scalar(int32_t* bits, int64_t i, int64_t kept, int64_t n, int32_t low,
                             int32_t high) {
  for (; i < n; ++i) {
    const int32_t b = bits[i];
    bits[kept] = b;
    kept += (b >= low) & (b <= high);
  }
  return kept;
}

#if defined(__GNUC__) && defined(__x86_64__)
// Eight lanes at a time: the mask byte of 8 columns indexes a table of lane permutations that
// moves the scored lanes to the front (a left-pack), so packing costs no branch per element.
struct LeftPackTable {
  alignas(32) int32_t perm[256][8];
  LeftPackTable() {
    for (int bits = 0; bits < 256; ++bits) {
      int k = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (bits & (1 << lane)) perm[bits][k++] = lane;
      while (k < 8) perm[bits][k++] = 0;
    }
  }
};
const LeftPackTable kLeftPack;

__attribute__((target("avx2,popcnt")))
int64_t compact_avx2(const float* scores, const bool* mask, int64_t T, float* x, int32_t* cols,
                     int32_t* non_finite) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256i exponent = _mm256_set1_epi32(0x7f800000);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t n = 0;
  int64_t t = 0;
  int bad = 0;
  for (; t + 8 <= T; t += 8) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask + t));
    const int bits = _mm_movemask_epi8(_mm_cmpgt_epi8(bytes, _mm_setzero_si128())) & 0xff;
    if (bits == 0) continue;
    const __m256 s = _mm256_loadu_ps(scores + t);
    const __m256i s_bits = _mm256_castps_si256(s);
    const __m256i inf_or_nan = _mm256_cmpeq_epi32(_mm256_and_si256(s_bits, exponent), exponent);
    bad |= _mm256_movemask_ps(_mm256_castsi256_ps(inf_or_nan)) & bits;
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLeftPack.perm[bits]));
    _mm256_storeu_ps(x + n, _mm256_permutevar8x32_ps(_mm256_max_ps(s, zero), perm));
    const __m256i col = _mm256_add_epi32(lanes, _mm256_set1_epi32(static_cast<int32_t>(t)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cols + n), _mm256_permutevar8x32_epi32(col, perm));
    n += __builtin_popcount(bits);
  }
  *non_finite |= bad;
  return compact_scalar(scores, mask, T, t, n, x, cols, non_finite);
}

__attribute__((target("avx2,popcnt")))
int64_t keep_in_range_avx2(int32_t* bits, int64_t n, int32_t low, int32_t high) {
  const __m256i below = _mm256_set1_epi32(low - 1), above = _mm256_set1_epi32(high);
  int64_t kept = 0, i = 0;
  // Writes land at or before the lanes being read, so packing in place is safe.
  for (; i + 8 <= n; i += 8) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + i));
    const __m256i out = _mm256_or_si256(_mm256_cmpgt_epi32(below, b), _mm256_cmpgt_epi32(b, above));
    const int keep = ~_mm256_movemask_ps(_mm256_castsi256_ps(out)) & 0xff;
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLeftPack.perm[keep]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits + kept), _mm256_permutevar8x32_epi32(b, perm));
    kept += __builtin_popcount(keep);
  }
  return keep_in_range_scalar(bits, i, kept, n, low, high);
}

// OAR_KERNELS_CPU_BASELINE=1 forces the portable loops (tests cover them on AVX2 machines).
const bool kHasAvx2 = std::getenv("OAR_KERNELS_CPU_BASELINE") == nullptr &&
                      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");

int64_t keep_in_range(int32_t* bits, int64_t n, int32_t low, int32_t high) {
  return kHasAvx2 ? keep_in_range_avx2(bits, n, low, high)
                  : keep_in_range_scalar(bits, 0, 0, n, low, high);
}

int64_t compact(const float* scores, const bool* mask, int64_t T, float* x, int32_t* cols,
                int32_t* non_finite) {
  if (kHasAvx2) return compact_avx2(scores, mask, T, x, cols, non_finite);
  return compact_scalar(scores, mask, T, 0, 0, x, cols, non_finite);
}
#else
int64_t keep_in_range(int32_t* bits, int64_t n, int32_t low, int32_t high) {
  return keep_in_range_scalar(bits, 0, 0, n, low, high);
}

int64_t compact(const float* scores, const bool* mask, int64_t T, float* x, int32_t* cols,
                int32_t* non_finite) {
  return compact_scalar(scores, mask, T, 0, 0, x, cols, non_finite);
}
#endif

// The rank-th smallest (1-based) of n bit patterns of floats in [0, 1], exactly: bisection on
// the bits, counting each time. Once at most a quarter of the candidates lies in the range
// still open, they are cut down to it, so later passes touch a fraction of the row.
int32_t select_bits(const int32_t* bits, int64_t n, int64_t rank, int32_t* work) {
  std::copy(bits, bits + n, work);
  int32_t low = 0, high = 0x3f800000;
  int64_t candidates = n, below_low = 0, up_to_high = n;
  while (low < high) {
    const int32_t mid = low + (high - low) / 2;
    const int64_t count = count_at_most(work, candidates, mid);
    if (count >= rank) {
      high = mid;
      up_to_high = count;
    } else {
      low = mid + 1;
      below_low = count;
    }
    if (4 * (up_to_high - below_low) <= candidates) {
      candidates = keep_in_range(work, candidates, low, high);
      rank -= below_low;
      up_to_high -= below_low;
      below_low = 0;
    }
  }
  return low;
}

// Writes one row of weights. Returns false when a scored element is not finite.
bool bilevel_row(const float* scores, const bool* mask, float* out, int64_t T,
                 const ReshapeParams& p, std::vector<float>& x, std::vector<float>& u,
                 std::vector<int32_t>& cols) {
  int32_t non_finite = 0;
  const int64_t n = compact(scores, mask, T, x.data(), cols.data(), &non_finite);
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
  // x is spent once u exists: reuse it as the selection's scratch.
  const int32_t bits_lo = select_bits(bits, n, lo + 1, reinterpret_cast<int32_t*>(x.data()));
  const float v_lo = bits_to_float(bits_lo);
  const int32_t at_most = count_at_most(bits, n, bits_lo);
  const int32_t above = smallest_above(bits, n, bits_lo);
  const bool repeats = at_most > lo + 1 || above == std::numeric_limits<int32_t>::max();
  const float v_hi = repeats ? v_lo : bits_to_float(above);
  const float theta = static_cast<float>(v_lo + (h - static_cast<double>(lo)) * (v_hi - v_lo));

  const double mass = bilevel_in_place(u.data(), n, theta, static_cast<float>(p.beta),
                                      static_cast<float>(p.floor));
  const float scale = p.preserve_mass ? static_cast<float>(n / (mass + kEps)) : 1.0f;
  for (int64_t k = 0; k < n; ++k) out[cols[k]] = u[k] * scale;
  return true;
}

// float64 scores: SPEC section 6 in double, as the reference computes it. float32 holds
// neither every float64 score (1e300) nor every difference of two (1e-18 vs 1e-75 in a row,
// where the SPEC's u < theta tells them apart), so the float32 selection above cannot serve.
bool bilevel_row_double(const double* scores, const bool* mask, float* out, int64_t T,
                        const ReshapeParams& p, std::vector<double>& u, std::vector<double>& work,
                        std::vector<int64_t>& cols) {
  int64_t n = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (!mask[t]) continue;
    if (!std::isfinite(scores[t])) return false;
    u[n] = std::log1p(std::max(scores[t], 0.0));
    cols[n++] = t;
  }
  std::fill(out, out + T, 1.0f);
  if (n == 0) return true;
  const auto extremes = std::minmax_element(u.begin(), u.begin() + n);
  const double c_min = *extremes.first;
  const double spread = *extremes.second - c_min;
  for (int64_t k = 0; k < n; ++k) u[k] = (u[k] - c_min) / (spread > 0.0 ? spread : 1.0);
  // numpy's linear quantile between order statistics lo and lo + 1.
  const double h = static_cast<double>(n - 1) * p.tau;
  const int64_t lo = std::min<int64_t>(static_cast<int64_t>(h), n - 1);
  std::copy(u.begin(), u.begin() + n, work.begin());
  std::nth_element(work.begin(), work.begin() + lo, work.begin() + n);
  const double v_lo = work[lo];
  const double v_hi = lo + 1 < n ? *std::min_element(work.begin() + lo + 1, work.begin() + n) : v_lo;
  const double theta = v_lo + (h - static_cast<double>(lo)) * (v_hi - v_lo);
  double mass = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    u[k] = u[k] < theta ? std::max(u[k] / (theta + kEps), p.floor)
                        : 1.0 + p.beta * (u[k] - theta) / (1.0 - theta + kEps);
    mass += u[k];
  }
  const double scale = p.preserve_mass ? static_cast<double>(n) / (mass + kEps) : 1.0;
  for (int64_t k = 0; k < n; ++k) out[cols[k]] = static_cast<float>(u[k] * scale);
  return true;
}

// One thread's scratch and row function, for scores of type Scalar.
template <typename Scalar>
struct RowWorker;

template <>
struct RowWorker<float> {
  explicit RowWorker(int64_t T) : x(T + 8), u(T + 8), cols(T + 8) {}
  bool operator()(const float* s, const bool* m, float* o, int64_t T, const ReshapeParams& p) {
    return bilevel_row(s, m, o, T, p, x, u, cols);
  }
  std::vector<float> x, u;
  std::vector<int32_t> cols;
};

template <>
struct RowWorker<double> {
  explicit RowWorker(int64_t T) : u(T), work(T), cols(T) {}
  bool operator()(const double* s, const bool* m, float* o, int64_t T, const ReshapeParams& p) {
    return bilevel_row_double(s, m, o, T, p, u, work, cols);
  }
  std::vector<double> u, work;
  std::vector<int64_t> cols;
};

// Rows handed out one at a time to whichever thread asks next. A thread that has not
// started when the rows run out is not waited for: with another process holding a core, a
// helper may start a whole scheduler slice late (~10 ms), and an OpenMP region, which joins
// every thread, ran 10-20x slower then. Helpers hold the queue by shared_ptr, so a late one
// only finds it empty; the caller waits for the rows that were claimed, not for threads.
template <typename Scalar>
struct RowQueue {
  RowQueue(const Scalar* scores, const bool* mask, float* out, int64_t rows, int64_t cols,
           ReshapeParams params)
      : scores(scores), mask(mask), out(out), B(rows), T(cols), params(params) {}

  void work() {
    int64_t b = next.fetch_add(1);
    if (b >= B) return;
    RowWorker<Scalar> row(T);
    for (; b < B; b = next.fetch_add(1)) {
      if (!row(scores + b * T, mask + b * T, out + b * T, T, params)) {
        all_finite.store(false, std::memory_order_relaxed);
      }
      if (done.fetch_add(1) + 1 == B) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }

  void wait_until_done() {
    std::unique_lock<std::mutex> lock(mutex);
    finished.wait(lock, [this] { return done.load() == B; });
  }

  const Scalar* scores;
  const bool* mask;
  float* out;
  const int64_t B, T;
  const ReshapeParams params;
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<bool> all_finite{true};
  std::mutex mutex;
  std::condition_variable finished;
};

// Runs every row through the queue on the calling thread and torch's inter-op threads.
// Returns false when a scored element is not finite.
template <typename Scalar>
bool bilevel_rows(const Scalar* scores, const bool* mask, float* out, int64_t B, int64_t T,
                  const ReshapeParams& params) {
  auto queue = std::make_shared<RowQueue<Scalar>>(scores, mask, out, B, T, params);
  // Batches too small to pay for a helper (~50 us of work each) run on the calling thread.
  const int64_t rows_per_thread =
      std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(T, 1));
  const int64_t helpers =
      std::min<int64_t>(at::get_num_threads(), at::divup(B, rows_per_thread)) - 1;
  for (int64_t i = 0; i < helpers; ++i) at::launch([queue] { queue->work(); });
  queue->work();
  queue->wait_until_done();
  return queue->all_finite.load();
}

// The same checks as oar_kernels/reshape.py's check_params: the op's callers may bypass
// the Python wrappers.
void check_params(double tau, double beta, double floor) {
  TORCH_CHECK_VALUE(tau >= 0.0 && tau <= 1.0, "tau must be [0.0, 1.0], got ", tau);
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= kMaxBeta, "beta must be [0.0, ", kMaxBeta, "], got ",
                    beta);
  TORCH_CHECK_VALUE(floor >= 0.0 && floor <= 1.0, "floor must be [0.0, 1.0], got ", floor);
}

// check_finite is the Python kernels' opt-out of a host read-back; this kernel finds
// non-finite scores while packing each row, at no cost, so it always refuses them.
void bilevel_weights_into_cpu(const at::Tensor& scores, const at::Tensor& score_mask, double tau,
                              double beta, double floor, bool preserve_mass, at::Tensor& out,
                              bool /*check_finite*/) {
  TORCH_CHECK_TYPE(at::isFloatingType(scores.scalar_type()),
                   "scores must have a floating-point dtype, got ", scores.scalar_type());
  TORCH_CHECK_TYPE(!at::isFloatingType(score_mask.scalar_type()) &&
                       !at::isComplexType(score_mask.scalar_type()),
                   "score_mask must be a bool or integer tensor, got ", score_mask.scalar_type());
  TORCH_CHECK_VALUE(scores.dim() == 2, "scores must be [B, T], got ", scores.sizes());
  TORCH_CHECK_VALUE(score_mask.sizes() == scores.sizes(), "score_mask must match scores ",
                    scores.sizes(), ", got ", score_mask.sizes());
  TORCH_CHECK_VALUE(out.sizes() == scores.sizes() && out.scalar_type() == at::kFloat,
                    "out must be a float32 tensor of shape ", scores.sizes());
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes,
                    "out must not have overlapping elements (an expanded tensor)");
  check_params(tau, beta, floor);
  if (scores.numel() == 0) return;
  const auto mask_b = score_mask.to(at::kBool).contiguous();
  const bool wide = scores.scalar_type() == at::kDouble;
  const auto scores_c = (wide ? scores : scores.to(at::kFloat)).contiguous();
  const bool out_contiguous = out.is_contiguous();
  at::Tensor dst = out_contiguous ? out : at::empty_like(out, at::MemoryFormat::Contiguous);

  const int64_t B = scores_c.size(0);
  const int64_t T = scores_c.size(1);
  TORCH_CHECK_VALUE(T < std::numeric_limits<int32_t>::max(), "rows must be shorter than 2^31");
  const ReshapeParams params{tau, beta, floor, preserve_mass};
  const bool* m = mask_b.const_data_ptr<bool>();
  float* o = dst.mutable_data_ptr<float>();
  const bool all_finite =
      wide ? bilevel_rows(scores_c.const_data_ptr<double>(), m, o, B, T, params)
           : bilevel_rows(scores_c.const_data_ptr<float>(), m, o, B, T, params);
  TORCH_CHECK_VALUE(all_finite, "scores must be finite where score_mask is set");
  if (!out_contiguous) out.copy_(dst);
}

at::Tensor bilevel_weights_cpu(const at::Tensor& scores, const at::Tensor& score_mask, double tau,
                               double beta, double floor, bool preserve_mass, bool check_finite) {
  at::Tensor out = at::empty(scores.sizes(), scores.options().dtype(at::kFloat),
                            at::MemoryFormat::Contiguous);
  bilevel_weights_into_cpu(scores, score_mask, tau, beta, floor, preserve_mass, out, check_finite);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(oar, CPU, m) {
  m.impl("bilevel_weights", &bilevel_weights_cpu);
  m.impl("bilevel_weights_into", &bilevel_weights_into_cpu);
}

}  // namespace oar
