// Fused exact scan of an IVF index's probed lists on a CPU (loaded by lmmem/kernels/ivf_scan.py;
// the plain-torch statement of the same search is lmmem/memories/knn_scan.py, and the tests hold
// both to a float64 brute force).
//
// Why native: the torch scan spends more than half its time around its matrix products, in
// tensor operations over each list's (queries x keys) distance table (add the norms, compare with
// the bound, nonzero, gather, top-k). Here each table row is read once: distance, comparison and
// the append of a survivor in one loop, while the products stay BLAS matmuls over all the
// queries that probe a list.
//
// Selection: each query keeps a pool of at most `cap` candidates, all nearer than its bound tau
// (+inf at first). When the pool is full, nth_element keeps its k nearest and tau becomes the
// k-th distance: tau only falls and always bounds the k-th nearest key seen so far from above,
// so every key that belongs to the final top-k is appended when it is scanned. The order of the
// lists therefore does not change the result (up to which of several keys tied at the k-th
// distance is kept), only how many keys are appended: lists go nearest-first on average, so
// that tau falls early. A candidate is one 64-bit integer (distance bits over position), so the
// selection and the final sort compare integers.
//
// Distances: |q - c|^2 + |x - c|^2 - 2 (q - c).(x - c), c the list's centroid, in fp32, as the
// torch scan computes them (see its docstring for why the residual form).
//
// Two ops: ivf_scan multiplies in fp32 (sgemm); ivf_scan_screened multiplies in bf16 and re-checks
// in fp32 what the bf16 distances cannot rule out (see "The screened scan" below), for CPUs with
// bf16 matrix units. Both return the same neighbours and distances, to the rounding of a sum.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

namespace {

// A candidate as one integer: the bits of its distance (>= 0, so they order as the floats do) over
// its list-order position (< 2^32, checked). Integers compare by distance, then position.
using Key = uint64_t;

inline Key pack(float d, int64_t pos) {
  uint32_t bits;
  d = std::max(d, 0.f);  // a rounding below 0 is a distance of 0 (the torch scan clamps the same)
  std::memcpy(&bits, &d, sizeof bits);
  return (static_cast<Key>(bits) << 32) | static_cast<uint32_t>(pos);
}

inline float distance_of(Key key) {
  const uint32_t bits = static_cast<uint32_t>(key >> 32);
  float d;
  std::memcpy(&d, &bits, sizeof d);
  return d;
}

constexpr int64_t QUERY_ROWS = 512;  // queries of one list multiplied at a time (256-2,048 measured alike)
constexpr int64_t LANES = 16;  // distances compared with tau at a time

// The k nearest of a full pool stay; tau becomes the k-th distance.
void shrink(Key* pool, int64_t& count, float& tau, int64_t k) {
  std::nth_element(pool, pool + (k - 1), pool + count);
  tau = distance_of(pool[k - 1]);
  count = k;
}

// The (query, list) pairs of queries [q0, q1) grouped by list (a counting sort): list l's queries
// are who[first[l]:first[l + 1]]. `order` holds the lists that some query probes and that hold
// keys, in the order of their mean probe rank: nearest-first for most of their queries, so that
// tau falls early and fewer keys are appended (the result does not depend on the order).
struct Plan {
  std::vector<int64_t> first, who, order;
  int64_t longest = 1;  // keys in the longest list
};

Plan plan_lists(const int64_t* probed, int64_t nprobe, const int64_t* starts, int64_t nlist, int64_t q0, int64_t q1) {
  Plan p;
  p.first.assign(nlist + 1, 0);
  for (int64_t i = q0; i < q1; ++i)
    for (int64_t s = 0; s < nprobe; ++s) p.first[probed[i * nprobe + s] + 1]++;
  for (int64_t l = 0; l < nlist; ++l) p.first[l + 1] += p.first[l];
  p.who.resize(p.first[nlist]);
  std::vector<int64_t> fill(p.first.begin(), p.first.end() - 1);
  for (int64_t i = q0; i < q1; ++i)
    for (int64_t s = 0; s < nprobe; ++s) p.who[fill[probed[i * nprobe + s]]++] = i;
  for (int64_t l = 0; l < nlist; ++l) p.longest = std::max(p.longest, starts[l + 1] - starts[l]);
  std::vector<double> rank(nlist, 0.0);
  for (int64_t i = q0; i < q1; ++i)
    for (int64_t s = 0; s < nprobe; ++s) rank[probed[i * nprobe + s]] += s;
  const std::vector<int64_t>& first = p.first;
  for (int64_t l = 0; l < nlist; ++l)
    if (first[l] < first[l + 1] && starts[l] < starts[l + 1]) p.order.push_back(l);
  std::sort(p.order.begin(), p.order.end(), [&](int64_t x, int64_t y) {
    return rank[x] * (first[y + 1] - first[y]) < rank[y] * (first[x + 1] - first[x]);  // rank[x]/nx < rank[y]/ny
  });
  return p;
}

// out = q - c; returns |q - c|^2, summed in LANES partial sums (a vectorised reduction without
// -ffast-math; the same order wherever a query's distance to a list is computed).
inline float centre(const float* q, const float* c, float* out, int64_t dim) {
  float sq[LANES] = {};
  int64_t j = 0;
  for (; j + LANES <= dim; j += LANES)
    for (int64_t t = 0; t < LANES; ++t) {
      const float v = q[j + t] - c[j + t];
      out[j + t] = v;
      sq[t] += v * v;
    }
  for (; j < dim; ++j) {
    const float v = q[j] - c[j];
    out[j] = v;
    sq[0] += v * v;
  }
  float total = 0.f;
  for (int64_t t = 0; t < LANES; ++t) total += sq[t];
  return total;
}

// Queries [q0, q1) over every list they probe, each list once, its queries QUERY_ROWS at a time.
void scan_queries(const float* q, const int64_t* probed, int64_t nprobe, const float* centroids,
                  const at::Tensor& residuals, const float* norms, const int64_t* starts, int64_t nlist,
                  int64_t dim, int64_t k, int64_t cap, Key* pools, int64_t* counts, float* taus,
                  int64_t q0, int64_t q1) {
  const Plan plan = plan_lists(probed, nprobe, starts, nlist, q0, q1);
  const std::vector<int64_t>& first = plan.first;
  const std::vector<int64_t>& who = plan.who;
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor qc = at::empty({QUERY_ROWS, dim}, opts);
  at::Tensor table = at::empty({QUERY_ROWS * plan.longest}, opts);
  std::vector<float> qn(QUERY_ROWS);
  for (const int64_t l : plan.order) {
    const int64_t a = starts[l], size = starts[l + 1] - a;
    const at::Tensor keys_t = residuals.narrow(0, a, size).t();
    const float* c = centroids + l * dim;
    const float* xn = norms + a;
    for (int64_t at_ = first[l]; at_ < first[l + 1]; at_ += QUERY_ROWS) {
      const int64_t m = std::min(QUERY_ROWS, first[l + 1] - at_);
      float* qcp = qc.data_ptr<float>();
      for (int64_t r = 0; r < m; ++r) qn[r] = centre(q + who[at_ + r] * dim, c, qcp + r * dim, dim);
      at::Tensor prod = at::from_blob(table.data_ptr<float>(), {m, size}, opts);
      at::mm_out(prod, qc.narrow(0, 0, m), keys_t);  // (q - c).(x - c) for the m queries and the list's keys
      const float* p = prod.data_ptr<float>();
      for (int64_t r = 0; r < m; ++r) {
        const int64_t i = who[at_ + r];
        Key* pool = pools + (i - q0) * cap;
        int64_t& count = counts[i];
        float tau = taus[i];
        const float base = qn[r];
        const float* row = p + r * size;
        int64_t j0 = 0;
        for (; j0 + LANES <= size; j0 += LANES) {
          float d[LANES];
          int within = 0;  // most blocks hold no key within tau: one vectorised compare decides
          for (int64_t t = 0; t < LANES; ++t) {
            d[t] = base + xn[j0 + t] - 2.f * row[j0 + t];
            within += d[t] < tau;
          }
          if (within == 0) continue;
          for (int64_t t = 0; t < LANES; ++t)
            if (d[t] < tau) {
              pool[count++] = pack(d[t], a + j0 + t);
              if (count == cap) shrink(pool, count, tau, k);
            }
        }
        for (; j0 < size; ++j0) {
          const float d = base + xn[j0] - 2.f * row[j0];
          if (d < tau) {
            pool[count++] = pack(d, a + j0);
            if (count == cap) shrink(pool, count, tau, k);
          }
        }
        taus[i] = tau;
      }
    }
  }
}


// ---- The screened scan: bf16 products, a rigorous bound, exact fp32 distances for what it cannot rule out ----
//
// Why: the fp32 products are ~70% of the scan's time, and CPUs with bf16 matrix units (AMX) multiply
// bf16 several times faster, accumulating in fp32 (MKL's cblas_gemm_bf16bf16f32). A bf16 distance
// is not the exact one, so it only screens: with q~, r~ the bf16 roundings of q - c and x - c,
//   |q.r - q~.r~| <= |q - c| |r - r~| + |q - q~| |r~|      (Cauchy-Schwarz on q.(r - r~) + (q - q~).r~)
// and the fp32 sums of both products and the two additions of the distance add at most a few
// units of rounding (the terms with u and gamma below), so every key's bf16 distance d~ brackets
// its fp32 distance d: d~ - b <= d <= d~ + b. Phase 1 keeps, per query, the keys whose lower
// bound is within tau~, the k-th smallest upper bound seen so far (>= the true k-th distance,
// so every true neighbour is kept). Phase 2 computes the fp32 distance of each key left (about
// 1.2 k a query, grouped by list so each list's keys are read once) and takes the exact top-k.
// The result is the fp32 scan's, up to the rounding of a product summed in another order.

extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                                       const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                                       float* c, int ldc) __attribute__((weak));  // MKL's, in torch's MKL builds
constexpr int CBLAS_ROW_MAJOR = 101, CBLAS_NO_TRANS = 111, CBLAS_TRANS = 112;
constexpr float UNIT = 0x1p-24f;  // fp32's unit roundoff
constexpr float SAFETY = 1e-3f;  // relative slack for the second-order terms and the rounding of the bound itself

struct Cand {
  float lower, upper;  // bounds on the fp32 distance (phase 2: lower holds the fp32 distance)
  uint32_t pos, list;  // list-order position, and the list that holds it
};

inline bool by_upper(const Cand& x, const Cand& y) { return x.upper < y.upper; }

// tau~ becomes the k-th smallest upper bound; the keys whose lower bound exceeds it are dropped.
void shrink_screened(std::vector<Cand>& pool, float& tau, int64_t k) {
  std::nth_element(pool.begin(), pool.begin() + (k - 1), pool.end(), by_upper);
  tau = pool[k - 1].upper;
  pool.erase(std::partition(pool.begin() + k, pool.end(), [tau](const Cand& c) { return c.lower <= tau; }),
             pool.end());
}

// An fp32 dot product in LANES partial sums.
inline float dot(const float* x, const float* y, int64_t dim) {
  float acc[LANES] = {};
  int64_t j = 0;
  for (; j + LANES <= dim; j += LANES)
    for (int64_t t = 0; t < LANES; ++t) acc[t] += x[j + t] * y[j + t];
  for (; j < dim; ++j) acc[0] += x[j] * y[j];
  float total = 0.f;
  for (int64_t t = 0; t < LANES; ++t) total += acc[t];
  return total;
}

// Four dot products of x with the rows y0..y3 at once: four independent FMA chains sharing x's
// loads; each sums in the same LANES partial sums as dot() (the same rounding for the same pair).
inline void dot4(const float* x, const float* y0, const float* y1, const float* y2, const float* y3, int64_t dim,
                 float* out) {
  float a0[LANES] = {}, a1[LANES] = {}, a2[LANES] = {}, a3[LANES] = {};
  int64_t j = 0;
  for (; j + LANES <= dim; j += LANES)
    for (int64_t t = 0; t < LANES; ++t) {
      const float v = x[j + t];
      a0[t] += v * y0[j + t];
      a1[t] += v * y1[j + t];
      a2[t] += v * y2[j + t];
      a3[t] += v * y3[j + t];
    }
  for (; j < dim; ++j) {
    a0[0] += x[j] * y0[j];
    a1[0] += x[j] * y1[j];
    a2[0] += x[j] * y2[j];
    a3[0] += x[j] * y3[j];
  }
  float* acc[4] = {a0, a1, a2, a3};
  for (int r = 0; r < 4; ++r) {
    float total = 0.f;
    for (int64_t t = 0; t < LANES; ++t) total += acc[r][t];
    out[r] = total;
  }
}

// x rounded to bf16 (to nearest even) into bits; returns |x - bf16(x)|, summed in LANES partial
// sums. Written on the bits so that it vectorises (x is finite: a difference of finite fp32 values).
inline float to_bf16(const float* x, uint16_t* bits, int64_t dim) {
  float e[LANES] = {};
  int64_t j = 0;
  auto one = [&](int64_t at, int64_t lane) {
    uint32_t u;
    std::memcpy(&u, x + at, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    float back;
    std::memcpy(&back, &rounded, sizeof back);
    bits[at] = static_cast<uint16_t>(rounded >> 16);
    const float diff = x[at] - back;  // exact
    e[lane] += diff * diff;
  };
  for (; j + LANES <= dim; j += LANES)
    for (int64_t t = 0; t < LANES; ++t) one(j + t, t);
  for (; j < dim; ++j) one(j, 0);
  float total = 0.f;
  for (int64_t t = 0; t < LANES; ++t) total += e[t];
  return std::sqrt(total);
}

struct Screen {
  const float* q;
  const int64_t* probed;
  int64_t nprobe;
  const float* centroids;
  const float* residuals;
  const uint16_t* residuals_bf16;
  const float* norms;
  const float* rerr;   // |r - r~| of each key
  const float* rwide;  // |r~| + |r - r~| of each key (>= |r| and >= |r~|)
  const int64_t* starts;
  int64_t nlist, dim, k;
};

// Phase 1 for queries [q0, q1): each query's pool of keys that its tau~ cannot rule out.
void screen_queries(const Screen& s, std::vector<std::vector<Cand>>& pools, std::vector<int64_t>& caps,
                    float* taus, int64_t q0, int64_t q1) {
  const Plan plan = plan_lists(s.probed, s.nprobe, s.starts, s.nlist, q0, q1);
  const int64_t dim = s.dim;
  std::vector<float> qc(QUERY_ROWS * dim), table(QUERY_ROWS * plan.longest), qn(QUERY_ROWS), eq(QUERY_ROWS);
  std::vector<uint16_t> qb(QUERY_ROWS * dim);
  const float gamma = 2.f * dim * UNIT;  // bounds the rounding of an fp32 sum of dim products, in any order
  for (const int64_t l : plan.order) {
    const int64_t a = s.starts[l], size = s.starts[l + 1] - a;
    const float* c = s.centroids + l * dim;
    const float *xn = s.norms + a, *er = s.rerr + a, *wr = s.rwide + a;
    for (int64_t at_ = plan.first[l]; at_ < plan.first[l + 1]; at_ += QUERY_ROWS) {
      const int64_t m = std::min(QUERY_ROWS, plan.first[l + 1] - at_);
      for (int64_t r = 0; r < m; ++r) {
        float* out = qc.data() + r * dim;
        uint16_t* bits = qb.data() + r * dim;
        qn[r] = centre(s.q + plan.who[at_ + r] * dim, c, out, dim);
        eq[r] = to_bf16(out, bits, dim);
      }
      cblas_gemm_bf16bf16f32(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, m, size, dim, 1.f, qb.data(), dim,
                             s.residuals_bf16 + a * dim, dim, 0.f, table.data(), size);
      for (int64_t r = 0; r < m; ++r) {
        const int64_t i = plan.who[at_ + r];
        std::vector<Cand>& pool = pools[i - q0];
        float tau = taus[i];
        const float base = qn[r], qnorm = std::sqrt(base), span = qnorm + eq[r];
        // b = (1 + SAFETY) [2 |q| e_r + (2 e_q + 4 (gamma + u) span) w_r + 2u |r|^2 + 2u |q|^2]
        const float ca = (1.f + SAFETY) * 2.f * qnorm, cw = (1.f + SAFETY) * (2.f * eq[r] + 4.f * (gamma + UNIT) * span),
                    cx = (1.f + SAFETY) * 2.f * UNIT, c0 = (1.f + SAFETY) * 2.f * UNIT * base + 1e-30f;
        const float* row = table.data() + r * size;
        auto keep = [&](float d, float b, int64_t j) {
          pool.push_back({d - b, d + b, static_cast<uint32_t>(a + j), static_cast<uint32_t>(l)});
          if (static_cast<int64_t>(pool.size()) >= caps[i - q0]) {
            shrink_screened(pool, tau, s.k);
            if (static_cast<int64_t>(pool.size()) * 2 > caps[i - q0]) caps[i - q0] *= 2;  // mostly survivors: grow
          }
        };
        int64_t j0 = 0;
        for (; j0 + LANES <= size; j0 += LANES) {
          float d[LANES], b[LANES];
          int within = 0;  // most blocks hold no key that tau~ cannot rule out: one vectorised compare decides
          for (int64_t t = 0; t < LANES; ++t) {
            d[t] = base + xn[j0 + t] - 2.f * row[j0 + t];
            b[t] = ca * er[j0 + t] + cw * wr[j0 + t] + cx * xn[j0 + t] + c0;
            within += d[t] - b[t] <= tau;
          }
          if (within == 0) continue;
          for (int64_t t = 0; t < LANES; ++t)
            if (d[t] - b[t] <= tau) keep(d[t], b[t], j0 + t);
        }
        for (; j0 < size; ++j0) {
          const float d = base + xn[j0] - 2.f * row[j0], b = ca * er[j0] + cw * wr[j0] + cx * xn[j0] + c0;
          if (d - b <= tau) keep(d, b, j0);
        }
        taus[i] = tau;
      }
    }
  }
}

// Phase 2 for queries [q0, q1): the fp32 distance of every key left in their pools (into `lower`),
// list by list, each query's q - c computed once per list as in phase 1.
void recheck(const Screen& s, std::vector<std::vector<Cand>>& pools, int64_t q0, int64_t q1) {
  const int64_t dim = s.dim;
  std::vector<int64_t> first(s.nlist + 1, 0);
  std::vector<std::pair<int64_t, int64_t>> where;  // (query, index in its pool), grouped by list
  for (int64_t i = q0; i < q1; ++i)
    for (const Cand& c : pools[i - q0]) first[c.list + 1]++;
  for (int64_t l = 0; l < s.nlist; ++l) first[l + 1] += first[l];
  where.resize(first[s.nlist]);
  std::vector<int64_t> fill(first.begin(), first.end() - 1);
  for (int64_t i = q0; i < q1; ++i)
    for (int64_t j = 0; j < static_cast<int64_t>(pools[i - q0].size()); ++j)
      where[fill[pools[i - q0][j].list]++] = {i, j};
  std::vector<float> qc(dim);
  for (int64_t l = 0; l < s.nlist; ++l) {
    const float* c = s.centroids + l * dim;
    for (int64_t e = first[l]; e < first[l + 1];) {
      const int64_t i = where[e].first;  // entries are in query order within a list: one run per query
      int64_t end = e;
      while (end < first[l + 1] && where[end].first == i) ++end;
      const float qn = centre(s.q + i * dim, c, qc.data(), dim);
      std::vector<Cand>& pool = pools[i - q0];
      for (; e + 4 <= end; e += 4) {
        Cand* x[4] = {&pool[where[e].second], &pool[where[e + 1].second], &pool[where[e + 2].second],
                      &pool[where[e + 3].second]};
        float p[4];
        dot4(qc.data(), s.residuals + x[0]->pos * dim, s.residuals + x[1]->pos * dim, s.residuals + x[2]->pos * dim,
             s.residuals + x[3]->pos * dim, dim, p);
        for (int t = 0; t < 4; ++t) x[t]->lower = qn + s.norms[x[t]->pos] - 2.f * p[t];
      }
      for (; e < end; ++e) {
        Cand& x = pool[where[e].second];
        x.lower = qn + s.norms[x.pos] - 2.f * dot(qc.data(), s.residuals + x.pos * dim, dim);
      }
    }
  }
}

void check_layout(const at::Tensor& queries, const at::Tensor& probed, const at::Tensor& centroids,
                  const at::Tensor& residuals, const at::Tensor& norms, const at::Tensor& starts, int64_t k,
                  int64_t cap) {
  TORCH_CHECK(queries.dim() == 2 && queries.scalar_type() == at::kFloat && queries.is_contiguous(),
              "queries: contiguous (n, dim) float32");
  TORCH_CHECK(probed.dim() == 2 && probed.scalar_type() == at::kLong && probed.is_contiguous() &&
              probed.size(0) == queries.size(0), "probed: contiguous (n, nprobe) int64");
  TORCH_CHECK(residuals.dim() == 2 && residuals.scalar_type() == at::kFloat && residuals.is_contiguous() &&
              residuals.size(1) == queries.size(1), "residuals: contiguous (count, dim) float32");
  TORCH_CHECK(centroids.scalar_type() == at::kFloat && centroids.is_contiguous() &&
              centroids.size(1) == queries.size(1), "centroids: contiguous (nlist, dim) float32");
  TORCH_CHECK(norms.scalar_type() == at::kFloat && norms.is_contiguous() && norms.size(0) == residuals.size(0),
              "norms: contiguous (count,) float32");
  TORCH_CHECK(starts.scalar_type() == at::kLong && starts.is_contiguous() && starts.size(0) == centroids.size(0) + 1,
              "starts: contiguous (nlist + 1,) int64");
  TORCH_CHECK(k >= 1 && cap > k, "k must be at least 1, and the pool size cap above k");
  TORCH_CHECK(residuals.size(0) < (int64_t(1) << 32), "the scan packs positions in 32 bits: at most 2^32 - 1 keys");
}

}  // namespace

// The k nearest keys of each query among its probed lists, by exact distance: (dists (n, k) fp32
// ascending, positions (n, k) int64 in list order), (+inf, -1) where the probed lists hold fewer.
std::tuple<at::Tensor, at::Tensor> ivf_scan(const at::Tensor& queries, const at::Tensor& probed,
                                            const at::Tensor& centroids, const at::Tensor& residuals,
                                            const at::Tensor& norms, const at::Tensor& starts, int64_t k,
                                            int64_t cap) {
  check_layout(queries, probed, centroids, residuals, norms, starts, k, cap);
  const int64_t n = queries.size(0), dim = queries.size(1), nprobe = probed.size(1), nlist = centroids.size(0);
  at::Tensor out_d = at::full({n, k}, std::numeric_limits<float>::infinity(), queries.options());
  at::Tensor out_p = at::full({n, k}, -1, probed.options());
  if (n == 0) return {out_d, out_p};
  std::unique_ptr<Key[]> pools(new Key[n * cap]);  // not zeroed: a pool's first `count` entries are the ones written
  std::vector<int64_t> counts(n, 0);
  std::vector<float> taus(n, std::numeric_limits<float>::infinity());
  const float* q = queries.data_ptr<float>();
  const int64_t* pr = probed.data_ptr<int64_t>();
  const float* c = centroids.data_ptr<float>();
  const float* xn = norms.data_ptr<float>();
  const int64_t* st = starts.data_ptr<int64_t>();
  // threads take disjoint runs of queries (within one, the matmuls run single-threaded)
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t a = n * p / parts, e = n * (p + 1) / parts;
      scan_queries(q, pr, nprobe, c, residuals, xn, st, nlist, dim, k, cap, pools.get() + a * cap,
                   counts.data(), taus.data(), a, e);
    }
  });
  float* od = out_d.data_ptr<float>();
  int64_t* op = out_p.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    Key* pool = pools.get() + i * cap;
    int64_t count = counts[i];
    if (count > k) std::nth_element(pool, pool + (k - 1), pool + count);
    count = std::min(count, k);
    std::sort(pool, pool + count);
    for (int64_t j = 0; j < count; ++j) {
      od[i * k + j] = distance_of(pool[j]);
      op[i * k + j] = static_cast<int64_t>(pool[j] & 0xffffffffu);
    }
  }
  return {out_d, out_p};
}

// The same search as ivf_scan, its products in bf16 (the screened scan above); the same outputs.
std::tuple<at::Tensor, at::Tensor> ivf_scan_screened(const at::Tensor& queries, const at::Tensor& probed,
                                                     const at::Tensor& centroids, const at::Tensor& residuals,
                                                     const at::Tensor& residuals_bf16, const at::Tensor& norms,
                                                     const at::Tensor& rerr, const at::Tensor& rwide,
                                                     const at::Tensor& starts, int64_t k, int64_t cap) {
  check_layout(queries, probed, centroids, residuals, norms, starts, k, cap);
  TORCH_CHECK(cblas_gemm_bf16bf16f32 != nullptr, "this torch build has no MKL bf16 GEMM (has_bf16_gemm() is false)");
  TORCH_CHECK(residuals_bf16.scalar_type() == at::kBFloat16 && residuals_bf16.is_contiguous() &&
              residuals_bf16.sizes() == residuals.sizes(), "residuals_bf16: contiguous bfloat16, the residuals' shape");
  for (const at::Tensor* t : {&rerr, &rwide})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->size(0) == residuals.size(0),
                "rerr, rwide: contiguous (count,) float32");
  TORCH_CHECK(queries.size(1) < (int64_t(1) << 31) && residuals.size(0) < (int64_t(1) << 31),
              "the bf16 GEMM takes 32-bit sizes");
  const int64_t n = queries.size(0);
  at::Tensor out_d = at::full({n, k}, std::numeric_limits<float>::infinity(), queries.options());
  at::Tensor out_p = at::full({n, k}, -1, probed.options());
  if (n == 0) return {out_d, out_p};
  const Screen s{queries.data_ptr<float>(), probed.data_ptr<int64_t>(), probed.size(1), centroids.data_ptr<float>(),
                 residuals.data_ptr<float>(), reinterpret_cast<const uint16_t*>(residuals_bf16.data_ptr()),
                 norms.data_ptr<float>(), rerr.data_ptr<float>(), rwide.data_ptr<float>(), starts.data_ptr<int64_t>(),
                 centroids.size(0), queries.size(1), k};
  float* od = out_d.data_ptr<float>();
  int64_t* op = out_p.data_ptr<int64_t>();
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t a = n * p / parts, e = n * (p + 1) / parts;
      std::vector<std::vector<Cand>> pools(e - a);
      std::vector<int64_t> caps(e - a, cap);
      std::vector<float> taus(n, std::numeric_limits<float>::infinity());
      for (auto& pool : pools) pool.reserve(cap);
      screen_queries(s, pools, caps, taus.data(), a, e);
      for (int64_t i = a; i < e; ++i)
        if (static_cast<int64_t>(pools[i - a].size()) > k) shrink_screened(pools[i - a], taus[i], k);
      recheck(s, pools, a, e);
      for (int64_t i = a; i < e; ++i) {
        std::vector<Cand>& pool = pools[i - a];
        for (Cand& c : pool) c.lower = std::max(c.lower, 0.f);  // as pack(): a rounding below 0 is a distance of 0
        const int64_t count = std::min<int64_t>(k, pool.size());
        auto nearer = [](const Cand& x, const Cand& y) { return x.lower < y.lower || (x.lower == y.lower && x.pos < y.pos); };
        std::sort(pool.begin(), pool.end(), nearer);  // ~1.3 k entries: faster than a partial heap sort
        for (int64_t j = 0; j < count; ++j) {
          od[i * k + j] = pool[j].lower;
          op[i * k + j] = pool[j].pos;
        }
      }
    }
  });
  return {out_d, out_p};
}

// Whether ivf_scan_screened can run: the torch library this op loads with exports MKL's bf16 GEMM.
bool has_bf16_gemm() { return cblas_gemm_bf16bf16f32 != nullptr; }

TORCH_LIBRARY(lmmem_ivf_scan, m) {
  m.def("ivf_scan", &ivf_scan);
  m.def("ivf_scan_screened", &ivf_scan_screened);
  m.def("has_bf16_gemm", &has_bf16_gemm);
}
