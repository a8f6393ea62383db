// Ring attention's per-step bookkeeping, one launch each (fp32 accumulators):
//
// meshpar_ring_merge: merge a block's (o, l) into the running (out_acc, lse_acc), in place:
//     L = logaddexp(lse_acc, l);  out_acc = out_acc * exp(lse_acc - L) + o * exp(l - L);  lse_acc = L
//   out_acc [B, H, S, D] fp32 and lse_acc [B, H, S] fp32 may be strided views (the ring merges into
//   query-row slices); o [B, H, S, D] (fp32/bf16/fp16) is contiguous; l [B, H, S] fp32 strided.
//   One warp per (b, h, s) row: every lane reads lse_acc before lane 0 writes it (__syncwarp).
//
// meshpar_ring_grad_acc: dq_acc += d_q; dk_acc += sum_r d_k[:, h*rep + r]; dv_acc likewise.
//   dq_acc [B, H, Sq, D], dk_acc/dv_acc [B, Hkv, Sk, D] fp32 strided views (last stride 1);
//   d_q [B, H, Sq, D], d_k/d_v [B, Hkv*rep, Sk, D] contiguous (fp32/bf16/fp16). The GQA sum is
//   done in fp32. One warp per row; rows of dq first, then rows of dk/dv.
#include "common.cuh"

namespace {

__device__ __forceinline__ float logaddexp_f(float a, float b) {  // as torch.logaddexp
  if (isinf(a) && a == b) return a;
  const float m = fmaxf(a, b);
  return m + log1pf(expf(-fabsf(a - b)));
}

template <typename T>
__global__ void merge_kernel(float* __restrict__ out_acc, float* __restrict__ lse_acc, const T* __restrict__ o,
                             const float* __restrict__ l, int64_t H, int64_t S, int D, int64_t rows, int64_t osb,
                             int64_t osh, int64_t oss, int64_t lsb, int64_t lsh, int64_t lss, int64_t bsb, int64_t bsh,
                             int64_t bss) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t row = warp; row < rows; row += nwarps) {
    const int64_t s = row % S, bh = row / S, h = bh % H, b = bh / H;
    float* acc = out_acc + b * osb + h * osh + s * oss;
    float* la = lse_acc + b * lsb + h * lsh + s * lss;
    const float a = *la;
    const float lb = l[b * bsb + h * bsh + s * bss];
    const float L = logaddexp_f(a, lb);
    const float fa = expf(a - L), fb = expf(lb - L);
    const T* orow = o + row * (int64_t)D;
    for (int d = lane; d < D; d += 32) acc[d] = acc[d] * fa + to_acc(orow[d]) * fb;
    __syncwarp();
    if (lane == 0) *la = L;
  }
}

template <typename T>
__global__ void grad_acc_kernel(float* __restrict__ dq_acc, const T* __restrict__ d_q, float* __restrict__ dk_acc,
                                float* __restrict__ dv_acc, const T* __restrict__ d_k, const T* __restrict__ d_v,
                                int64_t H, int64_t Hkv, int64_t Sq, int64_t Sk, int D, int rep, int64_t q_rows,
                                int64_t kv_rows, int64_t qsb, int64_t qsh,
                                int64_t qss, int64_t ksb, int64_t ksh, int64_t kss, int64_t vsb, int64_t vsh,
                                int64_t vss) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t row = warp; row < q_rows + kv_rows; row += nwarps) {
    if (row < q_rows) {
      const int64_t s = row % Sq, bh = row / Sq, h = bh % H, b = bh / H;
      float* acc = dq_acc + b * qsb + h * qsh + s * qss;
      const T* src = d_q + row * (int64_t)D;
      for (int d = lane; d < D; d += 32) acc[d] += to_acc(src[d]);
    } else {
      const int64_t r = row - q_rows;
      const int64_t s = r % Sk, bh = r / Sk, hk = bh % Hkv, b = bh / Hkv;
      float* ak = dk_acc + b * ksb + hk * ksh + s * kss;
      float* av = dv_acc + b * vsb + hk * vsh + s * vss;
      const int64_t base = ((b * H + hk * rep) * Sk + s) * (int64_t)D;  // head hk*rep of d_k/d_v
      for (int d = lane; d < D; d += 32) {
        float sk = 0.f, sv = 0.f;
        for (int j = 0; j < rep; ++j) {
          sk += to_acc(d_k[base + (int64_t)j * Sk * D + d]);
          sv += to_acc(d_v[base + (int64_t)j * Sk * D + d]);
        }
        ak[d] += sk;
        av[d] += sv;
      }
    }
  }
}

}  // namespace

extern "C" {

// shape = {B, H, S}; ostr/lstr/bstr = strides (elements) of out_acc/lse_acc/l over (B, H, S).
int meshpar_ring_merge(float* out_acc, float* lse_acc, const void* o, const float* l, int dtype, int D,
                       const int64_t* shape, const int64_t* ostr, const int64_t* lstr, const int64_t* bstr,
                       void* stream) {
  if (!out_acc || !lse_acc || !o || !l || !shape || !ostr || !lstr || !bstr || D < 1) return -1;
  const int64_t rows = shape[0] * shape[1] * shape[2];
  if (rows == 0) return 0;
  const int threads = 256;
  const int grid = grid_for(rows * 32, threads);
  cudaStream_t s = (cudaStream_t)stream;
  if (dtype == kF64) return -1;
  MESHPAR_DISPATCH(dtype, T,
                   merge_kernel<T><<<grid, threads, 0, s>>>(out_acc, lse_acc, (const T*)o, l, shape[1], shape[2], D,
                                                            rows, ostr[0], ostr[1], ostr[2], lstr[0], lstr[1],
                                                            lstr[2], bstr[0], bstr[1], bstr[2]));
  return launch_status();
}

// shape = {B, H, Hkv, Sq, Sk, D}; strides = {dq_acc (B, H, S), dk_acc (B, Hkv, S), dv_acc (B, Hkv, S)}.
int meshpar_ring_grad_acc(float* dq_acc, const void* d_q, float* dk_acc, float* dv_acc, const void* d_k,
                          const void* d_v, int rep, int dtype, const int64_t* shape, const int64_t* strides,
                          void* stream) {
  if (!dq_acc || !d_q || !dk_acc || !dv_acc || !d_k || !d_v || !shape || !strides || rep < 1) return -1;
  const int64_t B = shape[0], H = shape[1], Hkv = shape[2], Sq = shape[3], Sk = shape[4];
  const int D = (int)shape[5];
  if (H != Hkv * rep || D < 1) return -1;
  const int64_t q_rows = B * H * Sq, kv_rows = B * Hkv * Sk;
  if (q_rows + kv_rows == 0) return 0;
  const int threads = 256;
  const int grid = grid_for((q_rows + kv_rows) * 32, threads);
  cudaStream_t s = (cudaStream_t)stream;
  if (dtype == kF64) return -1;
  MESHPAR_DISPATCH(dtype, T,
                   grad_acc_kernel<T><<<grid, threads, 0, s>>>(
                       dq_acc, (const T*)d_q, dk_acc, dv_acc, (const T*)d_k, (const T*)d_v, H, Hkv, Sq, Sk, D, rep,
                       q_rows, kv_rows, strides[0], strides[1], strides[2], strides[3], strides[4],
                       strides[5], strides[6], strides[7], strides[8]));
  return launch_status();
}

}  // extern "C"
