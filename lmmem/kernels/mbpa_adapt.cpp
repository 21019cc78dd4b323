// MbPA's restricted variant on a CPU, one query start to end, and its candidate selection (loaded
// by lmmem/kernels/mbpa_native.py; the plain-torch statements of the same computations are
// select_neighbours in lmmem/memories/mbpa.py, then restricted_target_log_probs and _top_n in
// lmmem/memories/mbpa_restricted.py, and the tests hold each pair together).
//
// Why native: per query the restricted adaptation works on a (|C|, K) table (~160 x 32 floats, in
// L1) for a few steps. The torch statement runs each step as ~10 batched tensor operations over a
// group of queries, and chooses the neighbours and builds the candidates, their logits and the
// final score with ~50 more (distances, masks, top-k, comparisons, argsorts, gathers, small
// matmuls), each a pass through memory; on small models those passes cost more than the
// arithmetic. Here one query runs from its products with the memory to its score on its own
// table: its K nearest neighbours (read in place, not gathered), the top-n of its logits, its
// candidates and slots, the candidates' logits for its neighbours, the Gram matrix, the steps,
// and the adapted log-probability of its target. (Measured: docs/results/knn-lm.md.)
//
// The table is the torch statement's transposed: candidates are rows and the K neighbours columns
// (padded to KP, a multiple of 16), so every softmax over the candidates is a column reduction,
// vertical across vector lanes, and the products run as broadcast-FMAs on KP/16 vector registers
// per row. The same formulas in the same precisions (the table in fp32, the per-key normalisers
// in fp64); sums run in another order, so results agree to fp32 rounding.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "native_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using lmmem_native::exp_nonpositive;

constexpr int64_t LANES = 16;
typedef float Vec __attribute__((vector_size(LANES * sizeof(float))));  // LANES floats (one AVX-512 register)

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, const Vec& v) { std::memcpy(p, &v, sizeof v); }

// The indices of the n largest entries of row (V floats) into out[0, n), unordered: the set
// torch.topk gives (up to which of several entries tied at the n-th value is kept). Columns are
// dealt into `classes` interleaved slices as in the torch statement (_top_n in
// lmmem/memories/mbpa.py); the n-th largest of the V / classes column maxima across slices, t0, is
// at most the row's n-th largest value (n distinct columns reach it), so the row's entries >= t0
// hold the answer: one vectorised pass finds them (a few hundred of 30,000), then a selection.
// The entries of row >= t0 as (value, column) pairs into pool, in column order. With AVX-512 each
// 16 columns are one comparison and, where any passes, two compressions into hit_v / hit_i (V + 16
// entries each); a branch per column costs more where hits are scattered over the row.
void entries_at_least(const float* row, int64_t V, float t0, std::vector<float>& hit_v, std::vector<int32_t>& hit_i,
                      std::vector<std::pair<float, int64_t>>& pool) {
  pool.clear();
  int64_t j = 0;
#if defined(__AVX512F__)
  int64_t count = 0;
  float* pv = hit_v.data();
  int32_t* pi = hit_i.data();
  const __m512 t = _mm512_set1_ps(t0);
  const __m512i step = _mm512_set1_epi32(16);
  __m512i ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; j + 16 <= V; j += 16, ids = _mm512_add_epi32(ids, step)) {
    const __m512 x = _mm512_loadu_ps(row + j);
    const __mmask16 k = _mm512_cmp_ps_mask(x, t, _CMP_GE_OQ);  // ordered: a NaN passes no threshold
    if (k) {
      _mm512_storeu_ps(pv + count, _mm512_maskz_compress_ps(k, x));
      _mm512_storeu_si512(pi + count, _mm512_maskz_compress_epi32(k, ids));
      count += __builtin_popcount(k);
    }
  }
  for (int64_t c = 0; c < count; ++c) pool.push_back({pv[c], pi[c]});
#else
  (void)hit_v;
  (void)hit_i;
  constexpr int64_t L = 64;
  for (; j + L <= V; j += L) {
    int hits = 0;  // an integer count of a comparison vectorises
    for (int64_t t = 0; t < L; ++t) hits += row[j + t] >= t0;
    if (hits)
      for (int64_t t = 0; t < L; ++t)
        if (row[j + t] >= t0) pool.push_back({row[j + t], j + t});
  }
#endif
  for (; j < V; ++j)
    if (row[j] >= t0) pool.push_back({row[j], j});
}

void top_n_row(const float* row, int64_t V, int64_t n, int64_t classes, std::vector<float>& cm,
               std::vector<float>& hit_v, std::vector<int32_t>& hit_i, std::vector<std::pair<float, int64_t>>& pool,
               int64_t* out) {
  auto larger = [](const std::pair<float, int64_t>& x, const std::pair<float, int64_t>& y) { return x.first > y.first; };
  const int64_t nb = V / classes;
  float t0 = -std::numeric_limits<float>::infinity();
  if (nb >= n) {
    std::memcpy(cm.data(), row, nb * sizeof(float));
    for (int64_t t = 1; t < classes; ++t)  // an elementwise max over the slices: vectorises
      for (int64_t c = 0; c < nb; ++c) cm[c] = std::max(cm[c], row[t * nb + c]);
    std::nth_element(cm.begin(), cm.begin() + (n - 1), cm.begin() + nb, std::greater<float>());
    t0 = cm[n - 1];
  }
  entries_at_least(row, V, t0, hit_v, hit_i, pool);
  if (static_cast<int64_t>(pool.size()) < n)  // NaN entries compare false: keep the first columns
    for (int64_t c = 0; c < V && static_cast<int64_t>(pool.size()) < n; ++c)
      if (!(row[c] >= t0)) pool.push_back({-std::numeric_limits<float>::infinity(), c});
  std::nth_element(pool.begin(), pool.begin() + (n - 1), pool.end(), larger);
  for (int64_t t = 0; t < n; ++t) out[t] = pool[t].second;
}

constexpr int64_t SROWS = 4;  // table rows per register block: SROWS x NV accumulators

// out[r] = rows[r] . keysT + add[r] for r < R (KP floats each, KP = NV LANES): keysT is (D, KP),
// the neighbours' keys transposed. Each of the D terms is one load of keysT's row per vector and
// one broadcast per table row, shared by SROWS x NV independent FMA chains.
template <int NV>
void times_keys(const float* const rows[SROWS], const float add[SROWS], int64_t R, const float* keysT, int64_t D,
                float* out) {
  constexpr int64_t KP = NV * LANES;
  Vec acc[SROWS][NV];
  for (int64_t r = 0; r < SROWS; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec{};
  for (int64_t d = 0; d < D; ++d) {
    Vec kv[NV];
    for (int v = 0; v < NV; ++v) kv[v] = load(keysT + d * KP + v * LANES);
    for (int64_t r = 0; r < SROWS; ++r) {
      const float a = rows[r][d];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * kv[v];
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(out + r * KP + v * LANES, acc[r][v] + add[r]);
}

// A thread's working memory, sized once for the largest query (n + K candidates).
struct Work {
  std::vector<float> cm, hit_v;  // top_n_row's column maxima and entries above its threshold
  std::vector<int32_t> hit_i;
  std::vector<std::pair<float, int64_t>> pool;
  std::vector<int32_t> pos;  // V: a word's candidate slot, or -1 (reset after every query)
  std::vector<int64_t> cand, slot;
  std::vector<float> keysT, G, hq, z0, z, A, zero, buf;
  std::vector<double> log_rest;
  std::vector<uint32_t> dist_bits, mins;  // select_one's distances (C) and column minima (4K)
  std::vector<uint64_t> near;  // select_one's pool
  std::vector<const float*> keys;  // the neighbours: K rows, values, weights, log-normalisers
  std::vector<int64_t> values;
  std::vector<float> w;
  std::vector<double> key_lse;
  Work(int64_t V, int64_t n, int64_t K, int64_t D, int64_t classes, int64_t C) {
    const int64_t KP = (K + LANES - 1) / LANES * LANES, SP = (n + K + SROWS - 1) / SROWS * SROWS;
    cm.resize(std::max<int64_t>(V / classes, 1));
    hit_v.resize(V + 16);
    hit_i.resize(V + 16);
    pos.assign(V, -1);
    cand.resize(n + K);
    slot.resize(K);
    keysT.resize(D * KP);
    G.resize((K + SROWS) * KP);
    hq.resize(SROWS * KP);
    z0.resize(SP * KP);
    z.resize(SP * KP);
    A.resize(SP * KP);
    zero.assign(D, 0.f);
    dist_bits.resize(C);
    mins.resize(4 * K);
    near.reserve(C);
    buf.resize(SP + LANES);
    log_rest.resize(K);
    keys.resize(K);
    values.resize(K);
    w.resize(K);
    key_lse.resize(K);
  }
};

// The sum of x[0, m) in LANES partial sums (a single accumulator would not vectorise); x is
// readable up to the next multiple of LANES, and those entries are 0
inline float sum_padded(const float* x, int64_t m) {
  float acc[LANES] = {};
  for (int64_t j = 0; j < m; j += LANES)
    for (int64_t t = 0; t < LANES; ++t) acc[t] += x[j + t];
  float s = 0.f;
  for (int64_t t = 0; t < LANES; ++t) s += acc[t];
  return s;
}

struct Query {  // one query's inputs (pointers into the op's tensors, and its neighbours in a Work)
  const float* z;  // its base logits (V)
  int64_t target;
  const float* h;  // D
  const float* const* keys;  // K rows of D
  const int64_t* values;  // K
  const float* w;  // K
  const double* key_lse;  // K
  double lse;
};

// One query's K nearest allowed candidates among C, as mbpa.select_neighbours picks them: squared
// distances (|h|^2 + |k_j|^2) - 2 h.k_j from the products, clamped at 0, the K smallest, ties by
// the lower index, in no particular order. Fewer than K allowed: the rest are missing neighbours
// (weight 0, a zero key), which change nothing.
// How: a non-negative float orders as its bits, so each candidate becomes the 32 bits of its
// distance, or BLOCKED (above every float's bits) where it is not allowed; one vectorised pass.
// The columns are dealt into nb = 4K interleaved slices; the K-th smallest of the nb column minima,
// t0, is at least the K-th smallest distance (K distinct candidates reach it), so the candidates at
// or below t0, anywhere in the row, hold the answer: typically a few more than K of C. Among them,
// one selection on (distance bits << 32 | index) takes the K smallest with ties to the lower index:
// the same set as a selection over all C, which costs several times more.
constexpr uint32_t BLOCKED = 0xffffffffu;

void select_one(const float* prod, const bool* allowed, float hn, const float* kn, int64_t C, int64_t K, float eps,
                const float* mem_k, int64_t M, const float* chunk_k, int64_t D, const int64_t* cand_v,
                const double* cand_aux, const float* zero,
                std::vector<uint32_t>& bits, std::vector<uint32_t>& mins, std::vector<uint64_t>& pool,
                const float** keys, int64_t* values, float* w, double* key_lse) {
  uint32_t* u = bits.data();
  for (int64_t j = 0; j < C; ++j) {
    float d = (hn + kn[j]) - 2.0f * prod[j];
    d = d > 0.f ? d : 0.f;  // also -0 to +0, whose bits would sort last
    uint32_t b;
    std::memcpy(&b, &d, sizeof b);
    u[j] = allowed[j] ? b : BLOCKED;
  }
  const int64_t nb = 4 * K, slices = C / nb;
  uint32_t t0 = BLOCKED;  // one slice: select among all allowed
  if (slices >= 2) {
    uint32_t* mn = mins.data();
    std::copy(u, u + nb, mn);
    for (int64_t s = 1; s < slices; ++s)  // an elementwise minimum over the slices: vectorises
      for (int64_t c = 0; c < nb; ++c) mn[c] = std::min(mn[c], u[s * nb + c]);
    std::nth_element(mn, mn + (K - 1), mn + nb);
    t0 = mn[K - 1];
  }
  pool.clear();
  for (int64_t j = 0; j < C; ++j)
    if (u[j] <= t0 && u[j] != BLOCKED)
      pool.push_back((static_cast<uint64_t>(u[j]) << 32) | static_cast<uint64_t>(j));
  const int64_t m = std::min<int64_t>(K, static_cast<int64_t>(pool.size()));
  // the K smallest, unordered: their order changes only the order of sums downstream
  if (static_cast<int64_t>(pool.size()) > m) std::nth_element(pool.begin(), pool.begin() + m, pool.end());
  for (int64_t k = 0; k < m; ++k) {
    const int64_t j = static_cast<int64_t>(pool[k] & 0xffffffffu);
    const uint32_t b = static_cast<uint32_t>(pool[k] >> 32);
    float d;
    std::memcpy(&d, &b, sizeof d);
    keys[k] = j < M ? mem_k + j * D : chunk_k + (j - M) * D;  // read in place, not gathered
    values[k] = std::max<int64_t>(cand_v[j], 0);
    w[k] = 1.0f / (eps + d);
    key_lse[k] = cand_aux[j];
  }
  for (int64_t k = m; k < K; ++k) {
    keys[k] = zero;
    values[k] = 0;
    w[k] = 0.f;
    key_lse[k] = 0.0;
  }
}

struct Shared {  // what every query shares
  const float* W;  // V x D
  const float* bias;  // V, or nullptr
  int64_t V, D, K, n, classes, steps;
  float lr, keep;
};

// log p'(target) of one query: restricted MbPA start to end (the torch statement's steps, in
// restricted_target_log_probs, name each quantity)
template <int NV>
double score_one(const Query& q, const Shared& c, Work& ws) {
  constexpr int64_t KP = NV * LANES;
  const int64_t K = c.K, D = c.D, n = c.n;
  const float one = c.bias ? 1.0f : 0.0f;  // the bias change folds into the Gram matrix (a weight on input 1)
  // 1. candidates: the top n of the logits, then each neighbour's word that is not among them yet
  int64_t* cand = ws.cand.data();
  int32_t* pos = ws.pos.data();
  int64_t* slot = ws.slot.data();
  top_n_row(q.z, c.V, n, c.classes, ws.cm, ws.hit_v, ws.hit_i, ws.pool, cand);
  for (int64_t s = 0; s < n; ++s) pos[cand[s]] = static_cast<int32_t>(s);
  int64_t S = n;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t v = q.values[k];
    if (pos[v] >= 0) {
      slot[k] = pos[v];
    } else if (q.w[k] > 0) {  // a missing neighbour (weight 0) brings no word: its slot takes nothing
      pos[v] = static_cast<int32_t>(S);
      cand[S] = v;
      slot[k] = S++;
    } else {
      slot[k] = 0;
    }
  }
  const int64_t SP = (S + SROWS - 1) / SROWS * SROWS;
  // 2. the keys transposed (zero columns past K), the Gram matrix G = H H^T + 1, h_k . h + 1, and
  // the candidates' base logits for every neighbour, z0 (S, KP), -inf on the padding rows
  float* kT = ws.keysT.data();
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t k = 0; k < K; ++k) kT[d * KP + k] = q.keys[k][d];
    for (int64_t k = K; k < KP; ++k) kT[d * KP + k] = 0.f;
  }
  auto table = [&](auto row_of, auto add_of, int64_t count, float* out) {
    for (int64_t s = 0; s < count; s += SROWS) {
      const float* rows[SROWS];
      float add[SROWS];
      for (int64_t r = 0; r < SROWS; ++r) {
        const bool real = s + r < count;
        rows[r] = real ? row_of(s + r) : ws.zero.data();
        add[r] = real ? add_of(s + r) : 0.f;
      }
      times_keys<NV>(rows, add, std::min(SROWS, count - s), kT, D, out + s * KP);
    }
  };
  float *G = ws.G.data(), *hq = ws.hq.data(), *z0 = ws.z0.data(), *z = ws.z.data(), *A = ws.A.data();
  table([&](int64_t i) { return q.keys[i]; }, [&](int64_t) { return one; }, K, G);
  table([&](int64_t) { return q.h; }, [&](int64_t) { return one; }, 1, hq);
  table([&](int64_t s) { return c.W + cand[s] * D; }, [&](int64_t s) { return c.bias ? c.bias[cand[s]] : 0.f; }, S, z0);
  std::fill(z0 + S * KP, z0 + SP * KP, -std::numeric_limits<float>::infinity());
  // 3. the steps: z = z0 + A G (the transpose of G A), p = softmax over the candidates (columns),
  // A <- (1 - eta alpha) A + eta w_k (onehot(v_k) - sigma_k p_k)
  float sum[KP], scale[KP];
  Vec mx[NV];
  for (int64_t step = 0; step < c.steps; ++step) {
    if (step == 0) {
      std::copy(z0, z0 + SP * KP, z);
    } else {
      for (int64_t s = 0; s < SP; s += SROWS) {
        Vec acc[SROWS][NV];
        for (int64_t r = 0; r < SROWS; ++r)
          for (int v = 0; v < NV; ++v) acc[r][v] = load(z0 + (s + r) * KP + v * LANES);
        for (int64_t i = 0; i < K; ++i) {
          Vec g[NV];
          for (int v = 0; v < NV; ++v) g[v] = load(G + i * KP + v * LANES);
          for (int64_t r = 0; r < SROWS; ++r) {
            const float a = A[(s + r) * KP + i];
            for (int v = 0; v < NV; ++v) acc[r][v] += a * g[v];
          }
        }
        for (int64_t r = 0; r < SROWS; ++r)
          for (int v = 0; v < NV; ++v) store(z + (s + r) * KP + v * LANES, acc[r][v]);
      }
    }
    for (int v = 0; v < NV; ++v) mx[v] = load(z + v * LANES);
    for (int64_t s = 1; s < SP; ++s)  // the column maxima (the vector conditional: a vmaxps)
      for (int v = 0; v < NV; ++v) {
        const Vec x = load(z + s * KP + v * LANES);
        mx[v] = mx[v] > x ? mx[v] : x;
      }
    float m[KP];
    for (int v = 0; v < NV; ++v) store(m + v * LANES, mx[v]);
    for (int64_t k = 0; k < KP; ++k) sum[k] = 0.f;
    for (int64_t s = 0; s < SP; ++s)
      for (int64_t k = 0; k < KP; ++k) {
        const float e = exp_nonpositive(z[s * KP + k] - m[k]);
        z[s * KP + k] = e;
        sum[k] += e;
      }
    for (int64_t k = 0; k < KP; ++k) {  // each column's scale: -eta w_k sigma_k / sum (0 past K)
      if (k >= K) {
        scale[k] = 0.f;
        continue;
      }
      // log sum_C e^z = max z + log sum; sigma_k = the candidates' share of the full normaliser,
      // the frozen rows' mass taken from the stored log-normaliser of the key's base logits
      const double lse_c = static_cast<double>(m[k]) + std::log(static_cast<double>(sum[k]));
      if (step == 0) {
        const double frac = std::exp(lse_c - q.key_lse[k]);
        ws.log_rest[k] = q.key_lse[k] + std::log(std::max(1.0 - frac, 0.0));
      }
      const float sigma = static_cast<float>(1.0 / (1.0 + std::exp(ws.log_rest[k] - lse_c)));
      scale[k] = (-c.lr * q.w[k] * sigma) / sum[k];
    }
    for (int64_t s = 0; s < SP; ++s) {
      const float* zs = z + s * KP;
      float* As = A + s * KP;
      if (step == 0)
        for (int64_t k = 0; k < KP; ++k) As[k] = zs[k] * scale[k];
      else
        for (int64_t k = 0; k < KP; ++k) As[k] = zs[k] * scale[k] + c.keep * As[k];
    }
    for (int64_t k = 0; k < K; ++k) A[slot[k] * KP + k] += c.lr * q.w[k];
  }
  // 4. the query's adapted logits on the candidates, z_q + (h_k . h + 1) A, and its normaliser:
  // the frozen rows' mass (Z0 minus the candidates' base mass) plus the candidates' adapted mass
  float* t = ws.buf.data();
  float tmax = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < S; ++s) {
    float acc[LANES] = {};
    for (int64_t k = 0; k < KP; k += LANES)
      for (int64_t l = 0; l < LANES; ++l) acc[l] += hq[k + l] * A[s * KP + k + l];
    float delta = 0.f;
    for (int64_t l = 0; l < LANES; ++l) delta += acc[l];
    z[s] = delta;  // z's first row is free now: the deltas
    t[s] = q.z[cand[s]] + delta;
    tmax = std::max(tmax, t[s]);
  }
  const int64_t SL = (S + LANES - 1) / LANES * LANES;
  std::fill(t + S, t + SL, -std::numeric_limits<float>::infinity());
  float* base = A;  // A is free now: the candidates' base mass e^(z_q - lse_q)
  const float lse_q = static_cast<float>(q.lse);
  for (int64_t s = 0; s < S; ++s) base[s] = q.z[cand[s]] - lse_q;
  std::fill(base + S, base + SL, -std::numeric_limits<float>::infinity());
  for (int64_t s = 0; s < SL; ++s) {
    base[s] = s < S ? exp_nonpositive(std::min(base[s], 0.f)) : 0.f;
    t[s] = s < S ? exp_nonpositive(t[s] - tmax) : 0.f;
  }
  const double frac = sum_padded(base, SL);
  const double log_rest = q.lse + std::log(std::max(1.0 - frac, 0.0));
  const double lse_c = static_cast<double>(tmax) + std::log(static_cast<double>(sum_padded(t, SL)));
  const double hi = std::max(log_rest, lse_c), lo = std::min(log_rest, lse_c);
  const double logZ = hi + std::log1p(std::exp(lo - hi));  // log(e^log_rest + e^lse_c), log_rest may be -inf
  double zy = q.z[q.target];
  if (pos[q.target] >= 0) zy += z[pos[q.target]];
  for (int64_t s = 0; s < S; ++s) pos[cand[s]] = -1;
  return zy - logZ;
}

}  // namespace

// log p'(target) (q,) fp64 of restricted MbPA for q queries of a chunk of B streams x T positions,
// each from its products with the candidates to its score (the torch statement:
// mbpa.select_neighbours, then mbpa_restricted.restricted_target_log_probs):
// zq (R, V) fp32, rows of unit stride: base logits, query i's in row rows[i]; qpos (q,) int64: its
// position b T + t in the chunk; targets (q,) int64; hidden (B, T, D) fp32: the queries; the
// C = M + T candidates of each stream are its memory, then the chunk: mem_k (B, M, D) fp32 the
// stored keys (the chunk's keys are the queries themselves), cand_v (B, C) int64 values, cand_aux
// (B, C) fp64 log-normalisers, allowed (B, T, C) bool, prod (B, T, C) fp32 h . k, hn (B, T) and
// kn (B, C) fp32 squared norms; lse_q (q,) fp64; W (V, D) fp32
// and bias (V,) fp32 or empty: the output layer; K neighbours, eps of the weights 1 / (eps + d^2);
// n: top-n candidates; classes: top_n's slices.
at::Tensor restricted_score(const at::Tensor& zq, const at::Tensor& rows, const at::Tensor& qpos, const at::Tensor& targets,
                            const at::Tensor& hidden, const at::Tensor& mem_k, const at::Tensor& cand_v,
                            const at::Tensor& cand_aux, const at::Tensor& allowed, const at::Tensor& prod,
                            const at::Tensor& hn, const at::Tensor& kn, const at::Tensor& lse_q, const at::Tensor& W,
                            const at::Tensor& bias, int64_t K, double eps, int64_t n, int64_t classes, int64_t steps,
                            double lr, double alpha) {
  TORCH_CHECK(zq.dim() == 2 && zq.scalar_type() == at::kFloat && zq.stride(1) == 1, "zq: (R, V) float32, rows of unit stride");
  TORCH_CHECK(W.dim() == 2 && W.scalar_type() == at::kFloat && W.is_contiguous(), "W: contiguous (V, D) float32");
  const int64_t V = W.size(0), D = W.size(1), q = rows.numel();
  TORCH_CHECK(zq.size(1) == V, "zq and W disagree on V");
  TORCH_CHECK(V < (int64_t{1} << 31) - 16, "V must fit 32-bit column indices");
  TORCH_CHECK(hidden.dim() == 3 && hidden.size(2) == D, "hidden: (B, T, D)");
  TORCH_CHECK(mem_k.dim() == 3 && mem_k.size(2) == D, "mem_k: (B, M, D)");
  const int64_t B = hidden.size(0), T = hidden.size(1), M = mem_k.size(1), C = M + T;
  TORCH_CHECK(K >= 1 && K <= 4 * LANES, "K must be in [1, 64]");
  auto check = [&](const at::Tensor& t, at::ScalarType dt, at::IntArrayRef shape, const char* what) {
    TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous() && t.sizes() == shape, what);
  };
  check(rows, at::kLong, {q}, "rows: contiguous (q,) int64");
  check(qpos, at::kLong, {q}, "qpos: contiguous (q,) int64");
  check(targets, at::kLong, {q}, "targets: contiguous (q,) int64");
  check(hidden, at::kFloat, {B, T, D}, "hidden: contiguous (B, T, D) float32");
  check(mem_k, at::kFloat, {B, M, D}, "mem_k: contiguous (B, M, D) float32");
  check(cand_v, at::kLong, {B, C}, "cand_v: contiguous (B, C) int64");
  check(cand_aux, at::kDouble, {B, C}, "cand_aux: contiguous (B, C) float64");
  check(allowed, at::kBool, {B, T, C}, "allowed: contiguous (B, T, C) bool");
  check(prod, at::kFloat, {B, T, C}, "prod: contiguous (B, T, C) float32");
  check(hn, at::kFloat, {B, T}, "hn: contiguous (B, T) float32");
  check(kn, at::kFloat, {B, C}, "kn: contiguous (B, C) float32");
  check(lse_q, at::kDouble, {q}, "lse_q: contiguous (q,) float64");
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == V),
              "bias: contiguous (V,) float32 or empty");
  TORCH_CHECK(n >= 1 && n <= V && classes >= 1 && steps >= 1, "n in [1, V], classes and steps at least 1");
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = qpos.data_ptr<int64_t>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  const int64_t* vp = cand_v.data_ptr<int64_t>();
  for (int64_t i = 0; i < q; ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < zq.size(0) && pp[i] >= 0 && pp[i] < B * T && tp[i] >= 0 && tp[i] < V,
                "row, position or target out of range");
  for (int64_t i = 0; i < B * C; ++i) TORCH_CHECK(vp[i] < V, "a candidate's value is out of range");
  at::Tensor out = at::empty({q}, zq.options().dtype(at::kDouble));
  const Shared c{W.data_ptr<float>(), bias.numel() ? bias.data_ptr<float>() : nullptr, V, D, K, n, classes, steps,
                 static_cast<float>(lr), static_cast<float>(1.0 - lr * alpha)};
  const float* zp = zq.data_ptr<float>();
  const float* hp = hidden.data_ptr<float>();
  const float* mkp = mem_k.data_ptr<float>();
  const double* cap = cand_aux.data_ptr<double>();
  const bool* alp = allowed.data_ptr<bool>();
  const float* prp = prod.data_ptr<float>();
  const float* hnp = hn.data_ptr<float>();
  const float* knp = kn.data_ptr<float>();
  const double* lqp = lse_q.data_ptr<double>();
  double* op = out.data_ptr<double>();
  const int64_t zs = zq.stride(0);
  const float epsf = static_cast<float>(eps);
  const int nv = static_cast<int>((K + LANES - 1) / LANES);
  at::parallel_for(0, q, 1, [&](int64_t a, int64_t e) {
    Work ws(V, n, K, D, classes, C);
    for (int64_t i = a; i < e; ++i) {
      const int64_t p = pp[i], b = p / T;
      select_one(prp + p * C, alp + p * C, hnp[p], knp + b * C, C, K, epsf, mkp + b * M * D, M, hp + b * T * D, D,
                 vp + b * C, cap + b * C, ws.zero.data(), ws.dist_bits, ws.mins, ws.near, ws.keys.data(),
                 ws.values.data(), ws.w.data(), ws.key_lse.data());
      const Query qi{zp + rp[i] * zs, tp[i], hp + p * D, ws.keys.data(), ws.values.data(), ws.w.data(),
                     ws.key_lse.data(), lqp[i]};
      switch (nv) {
        case 1: op[i] = score_one<1>(qi, c, ws); break;
        case 2: op[i] = score_one<2>(qi, c, ws); break;
        case 3: op[i] = score_one<3>(qi, c, ws); break;
        default: op[i] = score_one<4>(qi, c, ws); break;
      }
    }
  });
  return out;
}

// Indices (q, n) of the n largest entries of each row of z (q, V) fp32, unordered (top_n_row).
at::Tensor top_n(const at::Tensor& z, int64_t n, int64_t classes) {
  TORCH_CHECK(z.dim() == 2 && z.scalar_type() == at::kFloat && z.is_contiguous(), "z: contiguous (q, V) float32");
  const int64_t q = z.size(0), V = z.size(1);
  TORCH_CHECK(n >= 1 && n <= V && classes >= 1, "n must be in [1, V], classes at least 1");
  TORCH_CHECK(V < (int64_t{1} << 31) - 16, "V must fit 32-bit column indices");
  at::Tensor out = at::empty({q, n}, z.options().dtype(at::kLong));
  const float* zp = z.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, q, 1, [&](int64_t a, int64_t e) {
    std::vector<float> cm(std::max<int64_t>(V / classes, 1)), hit_v(V + 16);
    std::vector<int32_t> hit_i(V + 16);
    std::vector<std::pair<float, int64_t>> pool;
    for (int64_t i = a; i < e; ++i) top_n_row(zp + i * V, V, n, classes, cm, hit_v, hit_i, pool, op + i * n);
  });
  return out;
}

TORCH_LIBRARY(lmmem_mbpa, m) {
  m.def("restricted_score", &restricted_score);
  m.def("top_n", &top_n);
}
