// Arithmetic shared by lmmem's native CPU ops (mbpa_adapt.cpp, row_lse.cpp; built by
// lmmem/kernels/ivf_scan.py, whose build digest covers this header).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace lmmem_native {

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

}  // namespace lmmem_native
