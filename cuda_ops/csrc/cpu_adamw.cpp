// AdamW step on flat float32 CPU buffers: one pass over (param, grad, exp_avg, exp_avg_sq), optional
// bf16 copy-out of the new param. OpenMP over contiguous blocks; the inner loop is branch-free so
// g++ -O3 -march=native vectorizes it (AVX2 / AVX-512).
//
// The arithmetic follows torch.optim.AdamW (single-tensor path) operation by operation, in float32:
//   p  = p * (1 - lr*wd)
//   m  = m + (1-b1) * (g - m)                 (torch: exp_avg.lerp_(grad, 1-b1))
//   v  = v * b2 + (1-b2) * g * g              (torch: exp_avg_sq.mul_(b2).addcmul_(g, g, 1-b2))
//   p  = p + (-step_size) * m / (sqrt(v) / bc2_sqrt + eps)
// step_size = lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t) are computed by the caller in double
// and passed as float, as torch does. Built with -ffp-contract=off so no FMA changes the rounding, and
// -fno-math-errno so sqrt vectorizes (only errno is affected, never a value).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <omp.h>

namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays a quiet NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint16_t r = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return nan ? static_cast<uint16_t>(0x7fc0u) : r;  // torch's canonical bf16 NaN
}

template <bool GradBF16, bool OutBF16>
// ``out`` may alias ``gv`` element for element (the chunk manager writes the new bf16 parameters over the
// bf16 gradients they were computed from): each element's gradient is read before its output is written,
// so those two pointers are not __restrict; ``omp simd`` still vectorizes the loop.
void step_block(float* __restrict p, const void* gv, float* __restrict m, float* __restrict v,
                uint16_t* out, int64_t lo, int64_t hi, float decay, float one_m_b1, float b2,
                float one_m_b2, float neg_step, float bc2s, float eps) {
  const float* gf = static_cast<const float*>(gv);
  const uint16_t* gh = static_cast<const uint16_t*>(gv);
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    float g = GradBF16 ? bf16_to_f32(gh[i]) : gf[i];
    float pi = p[i];
    pi = pi * decay;  // decay == 1 when weight_decay == 0: exact, so no branch in the loop
    float mi = m[i];
    mi = mi + one_m_b1 * (g - mi);
    float vi = v[i] * b2;
    vi = vi + (g * g) * one_m_b2;
    float denom = std::sqrt(vi) / bc2s + eps;
    pi = pi + neg_step * (mi / denom);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (OutBF16) out[i] = f32_to_bf16(pi);
  }
}

template <bool GradBF16, bool OutBF16>
void run(float* p, const void* g, float* m, float* v, uint16_t* out, int64_t n, float decay, float one_m_b1,
         float b2, float one_m_b2, float neg_step, float bc2s, float eps) {
  const int64_t block = 1 << 14;  // 16K elements: 64 KB per stream, cache-friendly, many blocks per thread
  const int64_t nblocks = (n + block - 1) / block;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t lo = b * block;
    const int64_t hi = lo + block < n ? lo + block : n;
    step_block<GradBF16, OutBF16>(p, g, m, v, out, lo, hi, decay, one_m_b1, b2, one_m_b2, neg_step, bc2s, eps);
  }
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 on a bad argument. grad_is_bf16: grad holds bf16 (uint16) values.
// bf16_out may be null. nthreads <= 0: OpenMP's default.
int meshpar_adamw_f32(float* param, const void* grad, float* exp_avg, float* exp_avg_sq, uint16_t* bf16_out,
                      int64_t n, int grad_is_bf16, float decay, float one_m_b1, float beta2, float one_m_b2,
                      float neg_step_size, float bc2_sqrt, float eps, int nthreads) {
  if (n < 0 || (n > 0 && (!param || !grad || !exp_avg || !exp_avg_sq))) return 1;
  if (nthreads > 0) omp_set_num_threads(nthreads);
  if (grad_is_bf16) {
    if (bf16_out)
      run<true, true>(param, grad, exp_avg, exp_avg_sq, bf16_out, n, decay, one_m_b1, beta2, one_m_b2,
                      neg_step_size, bc2_sqrt, eps);
    else
      run<true, false>(param, grad, exp_avg, exp_avg_sq, nullptr, n, decay, one_m_b1, beta2, one_m_b2,
                       neg_step_size, bc2_sqrt, eps);
  } else {
    if (bf16_out)
      run<false, true>(param, grad, exp_avg, exp_avg_sq, bf16_out, n, decay, one_m_b1, beta2, one_m_b2,
                       neg_step_size, bc2_sqrt, eps);
    else
      run<false, false>(param, grad, exp_avg, exp_avg_sq, nullptr, n, decay, one_m_b1, beta2, one_m_b2,
                        neg_step_size, bc2_sqrt, eps);
  }
  return 0;
}

int meshpar_omp_max_threads() { return omp_get_max_threads(); }

}  // extern "C"
