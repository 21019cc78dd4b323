// MbPA's restricted adaptation on a CPU, fused per query, and its candidate selection (loaded by
// lmmem/kernels/mbpa_native.py; the plain-torch statements of the same computations are
// restricted_steps and _top_n in lmmem/memories/mbpa.py, and the tests hold each pair together).
//
// Why native: per query the adaptation works on a (K, |C|) table (32 x ~160 floats, in L1) for a
// few steps, but the torch version runs each step as ~10 batched tensor operations over a whole
// group of queries (amax, softmax, log, exp, sigmoid, mul, scatter, add ...), each a pass through
// memory, which on small models cost more than the arithmetic. Here each query's steps run start
// to end on its own table. (Measured: docs/results/knn-lm.md, "MbPA's restricted adaptation".)
//
// The same formulas as the torch version, in the same precisions (the (K, |C|) work in fp32, the
// per-key normalisers in fp64); sums run in another order, so results agree to fp32 rounding.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t LANES = 16;
typedef float Vec __attribute__((vector_size(LANES * sizeof(float))));  // LANES floats (one AVX-512 register)

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, const Vec& v) { std::memcpy(p, &v, sizeof v); }

// e^x for x <= 0 (a softmax's shifted logits), vectorisable: Cephes' expf (range reduction by
// ln 2, a degree-6 polynomial, the exponent set in the bits); within 2 ulp of expf. x is clamped
// at -87: below it (and at -inf, an inactive candidate) the result is e^-87 = 1.6e-38 instead of
// a smaller number or 0, an absolute difference no sum of probabilities here can see. (No select
// on the result: with one, GCC does not vectorise the loop; the build's -fno-trapping-math lets it
// vectorise the clamp before the float-to-int conversion.)
inline float exp_nonpositive(float x0) {
  const float x = std::max(x0, -87.0f);
  // nearest integer to x / ln 2 (x <= 0: truncating y - 0.5 rounds)
  const int32_t ni = static_cast<int32_t>(x * 1.44269504088896341f - 0.5f);
  const float n = static_cast<float>(ni);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// One query's adaptation: A (K, S) from its z0 (K, S), Gram matrix G (K, K), weights w (K), the
// slot of each neighbour's own word (K) and the log-normaliser of each key's base logits (K).
// The work runs on copies padded to P columns (a multiple of LANES: no loop tails; the padding's
// z0 is -inf, so its columns stay apart from the real ones and take ~1e-38 of probability each).
void adapt_one(const float* z0, const float* G, const float* w, const int64_t* slot, const double* key_lse,
               int64_t K, int64_t S, int64_t P, int64_t steps, float lr, float keep, float* A_out,
               std::vector<float>& z0p, std::vector<float>& z, std::vector<float>& A, std::vector<double>& log_rest) {
  std::vector<float> row_max(K), row_inv(K), row_scale(K);
  for (int64_t k = 0; k < K; ++k) {
    std::memcpy(z0p.data() + k * P, z0 + k * S, S * sizeof(float));
    std::fill(z0p.data() + k * P + S, z0p.data() + (k + 1) * P, -std::numeric_limits<float>::infinity());
  }
  for (int64_t s = 0; s < steps; ++s) {
    if (s == 0) {
      std::copy(z0p.begin(), z0p.end(), z.begin());
    } else {
      // z = z0 + G A, LANES columns of ROWS rows at a time in vector registers: ROWS independent
      // FMA chains sharing each load of A (one chain would wait on the FMA latency at every term).
      // Written with GCC/Clang vector types: the auto-vectoriser picked the wrong loop here.
      constexpr int64_t ROWS = 4;
      int64_t k = 0;
      for (; k + ROWS <= K; k += ROWS)  // full blocks: ROWS a compile-time constant, acc in registers
        for (int64_t j = 0; j < P; j += LANES) {
          Vec acc[ROWS];
          for (int64_t r = 0; r < ROWS; ++r) acc[r] = load(z0p.data() + (k + r) * P + j);
          for (int64_t i = 0; i < K; ++i) {
            const Vec a = load(A.data() + i * P + j);
            for (int64_t r = 0; r < ROWS; ++r) acc[r] += G[(k + r) * K + i] * a;
          }
          for (int64_t r = 0; r < ROWS; ++r) store(z.data() + (k + r) * P + j, acc[r]);
        }
      for (; k < K; ++k)
        for (int64_t j = 0; j < P; j += LANES) {
          Vec acc = load(z0p.data() + k * P + j);
          for (int64_t i = 0; i < K; ++i) acc += G[k * K + i] * load(A.data() + i * P + j);
          store(z.data() + k * P + j, acc);
        }
    }
    // three passes over the rows, so that the scalar fp64 chain of one row (log, exp, a division:
    // hundreds of cycles of latency) does not hold up the vector work of the next
    for (int64_t k = 0; k < K; ++k) {  // 1. e^(z - max) in place, and the row's max and sum
      float* zk = z.data() + k * P;
      // max and sum in LANES partial results: without -ffast-math a float reduction over one
      // accumulator does not vectorise, and neither would the exponentials beside it
      float mx[LANES], acc[LANES] = {};
      for (int64_t t = 0; t < LANES; ++t) mx[t] = zk[t];
      for (int64_t j = LANES; j < P; j += LANES)
        for (int64_t t = 0; t < LANES; ++t) mx[t] = std::max(mx[t], zk[j + t]);
      float m = mx[0];
      for (int64_t t = 1; t < LANES; ++t) m = std::max(m, mx[t]);
      for (int64_t j = 0; j < P; j += LANES)
        for (int64_t t = 0; t < LANES; ++t) {
          const float e = exp_nonpositive(zk[j + t] - m);
          zk[j + t] = e;
          acc[t] += e;
        }
      float sum = 0.f;
      for (int64_t t = 0; t < LANES; ++t) sum += acc[t];
      row_max[k] = m;
      row_inv[k] = 1.0f / sum;  // the largest p: e^0 / sum
    }
    for (int64_t k = 0; k < K; ++k) {  // 2. each row's scale: -η w_k σ_k / sum
      // log Σ_C e^z = max z − log max p, the candidates' share of the full normaliser as in the torch version
      const double lse_c = static_cast<double>(row_max[k]) - std::log(static_cast<double>(row_inv[k]));
      if (s == 0) {
        const double frac = std::exp(lse_c - key_lse[k]);
        log_rest[k] = key_lse[k] + std::log(std::max(1.0 - frac, 0.0));
      }
      const float sigma = static_cast<float>(1.0 / (1.0 + std::exp(log_rest[k] - lse_c)));
      row_scale[k] = (-lr * w[k] * sigma) * row_inv[k];
    }
    for (int64_t k = 0; k < K; ++k) {  // 3. A ← (1 − ηα) A + η w_k (onehot − p_k)
      const float* zk = z.data() + k * P;
      const float scale = row_scale[k];
      float* Ak = A.data() + k * P;
      if (s == 0)
        for (int64_t j = 0; j < P; ++j) Ak[j] = zk[j] * scale;
      else
        for (int64_t j = 0; j < P; ++j) Ak[j] = zk[j] * scale + keep * Ak[j];
      Ak[slot[k]] += lr * w[k];
    }
  }
  for (int64_t k = 0; k < K; ++k) std::memcpy(A_out + k * S, A.data() + k * P, S * sizeof(float));
}

}  // namespace

// A (q, K, S) of restricted MbPA for q queries: z0 (q, K, S) fp32 (-inf on inactive slots),
// G (q, K, K) fp32, weights (q, K) fp32, slot (q, K) int64, key_lse (q, K) fp64.
at::Tensor restricted_adapt(const at::Tensor& z0, const at::Tensor& G, const at::Tensor& weights,
                            const at::Tensor& slot, const at::Tensor& key_lse, double lr, double alpha,
                            int64_t steps) {
  TORCH_CHECK(z0.dim() == 3 && z0.scalar_type() == at::kFloat && z0.is_contiguous(), "z0: contiguous (q, K, S) float32");
  const int64_t q = z0.size(0), K = z0.size(1), S = z0.size(2);
  TORCH_CHECK(G.scalar_type() == at::kFloat && G.is_contiguous() && G.sizes() == at::IntArrayRef({q, K, K}),
              "G: contiguous (q, K, K) float32");
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.is_contiguous() && weights.sizes() == at::IntArrayRef({q, K}),
              "weights: contiguous (q, K) float32");
  TORCH_CHECK(slot.scalar_type() == at::kLong && slot.is_contiguous() && slot.sizes() == at::IntArrayRef({q, K}),
              "slot: contiguous (q, K) int64");
  TORCH_CHECK(key_lse.scalar_type() == at::kDouble && key_lse.is_contiguous() && key_lse.sizes() == at::IntArrayRef({q, K}),
              "key_lse: contiguous (q, K) float64");
  TORCH_CHECK(steps >= 1 && S >= 1, "at least one step and one candidate");
  at::Tensor A = at::empty({q, K, S}, z0.options());
  const float* z0p_in = z0.data_ptr<float>();
  const float* Gp = G.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  const int64_t* sp = slot.data_ptr<int64_t>();
  const double* lp = key_lse.data_ptr<double>();
  float* Ap = A.data_ptr<float>();
  for (int64_t i = 0; i < q * K; ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < S, "slot out of range");
  const float lrf = static_cast<float>(lr), keep = static_cast<float>(1.0 - lr * alpha);
  const int64_t P = (S + LANES - 1) / LANES * LANES;
  at::parallel_for(0, q, 1, [&](int64_t a, int64_t e) {
    std::vector<float> z0p(K * P), z(K * P), work(K * P);
    std::vector<double> log_rest(K);
    for (int64_t i = a; i < e; ++i)
      adapt_one(z0p_in + i * K * S, Gp + i * K * K, wp + i * K, sp + i * K, lp + i * K, K, S, P, steps, lrf, keep,
                Ap + i * K * S, z0p, z, work, log_rest);
  });
  return A;
}

// Indices (q, n) of the n largest entries of each row of z (q, V) fp32, unordered: the set
// torch.topk gives (up to which of several entries tied at the n-th value is kept). Columns are
// dealt into `classes` interleaved slices as in the torch statement (_top_n in
// lmmem/memories/mbpa.py); the n-th largest of the V / classes column maxima across slices, t0, is
// at most the row's n-th largest value (n distinct columns reach it), so the row's entries >= t0
// hold the answer: one vectorised pass finds them (a few hundred of 30,000), then a selection.
at::Tensor top_n(const at::Tensor& z, int64_t n, int64_t classes) {
  TORCH_CHECK(z.dim() == 2 && z.scalar_type() == at::kFloat && z.is_contiguous(), "z: contiguous (q, V) float32");
  const int64_t q = z.size(0), V = z.size(1);
  TORCH_CHECK(n >= 1 && n <= V && classes >= 1, "n must be in [1, V], classes at least 1");
  at::Tensor out = at::empty({q, n}, z.options().dtype(at::kLong));
  const float* zp = z.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t nb = V / classes;
  at::parallel_for(0, q, 1, [&](int64_t a, int64_t e) {
    std::vector<float> cm(std::max<int64_t>(nb, 1));
    std::vector<std::pair<float, int64_t>> pool;
    auto larger = [](const std::pair<float, int64_t>& x, const std::pair<float, int64_t>& y) { return x.first > y.first; };
    for (int64_t i = a; i < e; ++i) {
      const float* row = zp + i * V;
      pool.clear();
      float t0 = -std::numeric_limits<float>::infinity();
      if (nb >= n) {
        std::memcpy(cm.data(), row, nb * sizeof(float));
        for (int64_t t = 1; t < classes; ++t)  // an elementwise max over the slices: vectorises
          for (int64_t c = 0; c < nb; ++c) cm[c] = std::max(cm[c], row[t * nb + c]);
        std::nth_element(cm.begin(), cm.begin() + (n - 1), cm.begin() + nb, std::greater<float>());
        t0 = cm[n - 1];
      }
      constexpr int64_t L = 64;
      int64_t j = 0;
      for (; j + L <= V; j += L) {
        int hits = 0;  // an integer count of a comparison vectorises
        for (int64_t t = 0; t < L; ++t) hits += row[j + t] >= t0;
        if (hits)
          for (int64_t t = 0; t < L; ++t)
            if (row[j + t] >= t0) pool.push_back({row[j + t], j + t});
      }
      for (; j < V; ++j)
        if (row[j] >= t0) pool.push_back({row[j], j});
      if (static_cast<int64_t>(pool.size()) < n)  // NaN entries compare false: keep the first columns
        for (int64_t c = 0; c < V && static_cast<int64_t>(pool.size()) < n; ++c)
          if (!(row[c] >= t0)) pool.push_back({-std::numeric_limits<float>::infinity(), c});
      std::nth_element(pool.begin(), pool.begin() + (n - 1), pool.end(), larger);
      for (int64_t t = 0; t < n; ++t) op[i * n + t] = pool[t].second;
    }
  });
  return out;
}

TORCH_LIBRARY(lmmem_mbpa, m) {
  m.def("restricted_adapt", &restricted_adapt);
  m.def("top_n", &top_n);
}
