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

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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

// Queries [q0, q1) over every list they probe, each list once, its queries QUERY_ROWS at a time.
void scan_queries(const float* q, const int64_t* probed, int64_t nprobe, const float* centroids,
                  const at::Tensor& residuals, const float* norms, const int64_t* starts, int64_t nlist,
                  int64_t dim, int64_t k, int64_t cap, Key* pools, int64_t* counts, float* taus,
                  int64_t q0, int64_t q1) {
  // the (query, list) pairs grouped by list: a counting sort
  std::vector<int64_t> first(nlist + 1, 0);
  for (int64_t i = q0; i < q1; ++i)
    for (int64_t s = 0; s < nprobe; ++s) first[probed[i * nprobe + s] + 1]++;
  for (int64_t l = 0; l < nlist; ++l) first[l + 1] += first[l];
  std::vector<int64_t> who(first[nlist]);
  std::vector<int64_t> fill(first.begin(), first.end() - 1);
  for (int64_t i = q0; i < q1; ++i)
    for (int64_t s = 0; s < nprobe; ++s) who[fill[probed[i * nprobe + s]]++] = i;

  int64_t longest = 0;
  for (int64_t l = 0; l < nlist; ++l) longest = std::max(longest, starts[l + 1] - starts[l]);
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor qc = at::empty({QUERY_ROWS, dim}, opts);
  at::Tensor table = at::empty({QUERY_ROWS * std::max<int64_t>(longest, 1)}, opts);
  std::vector<float> qn(QUERY_ROWS);

  // lists in the order of their mean probe rank: nearest-first for most of their queries, so that
  // tau falls early and fewer keys are appended (the result does not depend on the order)
  std::vector<double> rank(nlist, 0.0);
  for (int64_t i = q0; i < q1; ++i)
    for (int64_t s = 0; s < nprobe; ++s) rank[probed[i * nprobe + s]] += s;
  std::vector<int64_t> order;
  for (int64_t l = 0; l < nlist; ++l)
    if (first[l] < first[l + 1] && starts[l] < starts[l + 1]) order.push_back(l);
  std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return rank[x] * (first[y + 1] - first[y]) < rank[y] * (first[x + 1] - first[x]);  // rank[x]/nx < rank[y]/ny
  });
  for (const int64_t l : order) {
    const int64_t a = starts[l], size = starts[l + 1] - a;
    const at::Tensor keys_t = residuals.narrow(0, a, size).t();
    const float* c = centroids + l * dim;
    const float* xn = norms + a;
    for (int64_t at_ = first[l]; at_ < first[l + 1]; at_ += QUERY_ROWS) {
      const int64_t m = std::min(QUERY_ROWS, first[l + 1] - at_);
      float* qcp = qc.data_ptr<float>();
      for (int64_t r = 0; r < m; ++r) {
        const float* qi = q + who[at_ + r] * dim;
        float* out = qcp + r * dim;
        float sq[LANES] = {};  // LANES partial sums: a vectorised reduction without -ffast-math
        int64_t j = 0;
        for (; j + LANES <= dim; j += LANES)
          for (int64_t t = 0; t < LANES; ++t) {
            const float v = qi[j + t] - c[j + t];
            out[j + t] = v;
            sq[t] += v * v;
          }
        for (; j < dim; ++j) {
          const float v = qi[j] - c[j];
          out[j] = v;
          sq[0] += v * v;
        }
        float total = 0.f;
        for (int64_t t = 0; t < LANES; ++t) total += sq[t];
        qn[r] = total;
      }
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

}  // namespace

// The k nearest keys of each query among its probed lists, by exact distance: (dists (n, k) fp32
// ascending, positions (n, k) int64 in list order), (+inf, -1) where the probed lists hold fewer.
std::tuple<at::Tensor, at::Tensor> ivf_scan(const at::Tensor& queries, const at::Tensor& probed,
                                            const at::Tensor& centroids, const at::Tensor& residuals,
                                            const at::Tensor& norms, const at::Tensor& starts, int64_t k,
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

TORCH_LIBRARY(lmmem_ivf_scan, m) { m.def("ivf_scan", &ivf_scan); }
