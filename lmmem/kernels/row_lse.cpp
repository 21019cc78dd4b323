// The log-normaliser of every row of a table of logits on a CPU, log sum_j e^{z_ij}, optionally
// after adding a bias to every row in place (loaded by lmmem/kernels/row_lse.py; its torch
// statement is the chunked loop of target_log_probs_from_logits in lmmem/output_layers/base.py,
// and the tests hold the two together).
//
// Why native: the torch statement takes a row's maximum, subtracts it, exponentiates, sums and
// takes the log as five tensor operations over chunks of rows, each a pass over the chunk, and a
// linear head's bias is one more pass over the whole (N, V) table before them (addmm copies it into
// the output). Here each row is read from memory once, its bias added and its maximum taken in
// the same pass, then summed from the core's cache. The evaluation's memories need these
// normalisers for every scored position (MbPA reads the full logits; a Hugging Face model returns
// them), so on a small model this work is a large share of an evaluation.
//
// Same formula, m + log sum e^{z - m} with m the row's maximum (0 where it is not finite, as
// torch.logsumexp), the sum in fp32 over 16 lanes and the log in fp64: it agrees with the torch
// statement to fp32 rounding. e^x is exp_nonpositive (native_math.h, within 2 ulp of expf; a NaN
// stays NaN); a row whose maximum is not finite runs the scalar formula with std::exp instead,
// giving torch's +inf, -inf (a row of -inf) or NaN.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "native_math.h"

namespace {

constexpr int64_t LANES = 16;

// log sum e^x of one row of V floats, adding bias (or nothing) to it first
double row_lse_one(float* x, const float* bias, int64_t V) {
  float mx[LANES];
  for (int64_t l = 0; l < LANES; ++l) mx[l] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + LANES <= V; j += LANES)  // the bias and the maximum in one pass
    for (int64_t l = 0; l < LANES; ++l) {
      float v = x[j + l];
      if (bias) x[j + l] = v = v + bias[j + l];
      mx[l] = std::max(mx[l], v);
    }
  for (; j < V; ++j) {
    float v = x[j];
    if (bias) x[j] = v = v + bias[j];
    mx[0] = std::max(mx[0], v);
  }
  float m = mx[0];
  for (int64_t l = 1; l < LANES; ++l) m = std::max(m, mx[l]);
  if (!std::isfinite(m)) {  // torch's result for such a row: the formula with m = 0, exactly
    double s = 0.0;
    for (int64_t i = 0; i < V; ++i) s += std::exp(static_cast<double>(x[i]));
    return std::log(s);
  }
  float acc[LANES] = {};
  j = 0;
  for (; j + LANES <= V; j += LANES)
    for (int64_t l = 0; l < LANES; ++l) acc[l] += lmmem_native::exp_nonpositive(x[j + l] - m);
  double s = 0.0;
  for (; j < V; ++j) s += std::exp(static_cast<double>(x[j] - m));
  for (int64_t l = 0; l < LANES; ++l) s += acc[l];
  return static_cast<double>(m) + std::log(s);
}

}  // namespace

// lse (N,) fp32 of z (N, V) fp32 (rows of unit stride, any row stride); bias (V,) fp32 or empty:
// added to every row of z in place first.
at::Tensor row_lse(const at::Tensor& z, const at::Tensor& bias) {
  TORCH_CHECK(z.dim() == 2 && z.scalar_type() == at::kFloat && z.stride(1) == 1, "z: (N, V) float32, rows of unit stride");
  const int64_t N = z.size(0), V = z.size(1);
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == V),
              "bias: contiguous (V,) float32 or empty");
  at::Tensor out = at::empty({N}, z.options());
  float* zp = z.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t zs = z.stride(0);
  at::parallel_for(0, N, 1, [&](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i) op[i] = static_cast<float>(row_lse_one(zp + i * zs, bp, V));
  });
  return out;
}

TORCH_LIBRARY(lmmem_rows, m) { m.def("row_lse", &row_lse); }
