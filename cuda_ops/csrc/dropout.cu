// Layout-independent hash dropout, optionally fused with a bias before and a residual after:
//   out = [res +] dropout([x + bias])      (bias broadcast along the last dim)
// The keep decision of an element is murmur3's finaliser chained over (seed, site, global coordinate
// of every dim), exactly meshpar/ops/dropout.py's uniform(): keep <=> (h >> 8) * 2^-24 >= p, i.e.
// (h >> 8) >= ceil(p * 2^24). The mask is never stored: the backward recomputes it.
// Rounding follows the torch path step by step: y = T(x + b); d = T(acc(y * m) * scale); out = T(res + d).
#include "common.cuh"

namespace {

constexpr int kMaxDims = 8;

struct Coords {
  int64_t size[kMaxDims];
  int64_t off[kMaxDims];
  const int64_t* pos[kMaxDims];  // global positions of each index along a dim (zigzag), or null
};

__device__ __forceinline__ uint32_t fmix(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

__device__ __forceinline__ uint32_t combine(uint32_t h, uint32_t v) { return fmix((h * 0x01000193u) ^ v); }

__device__ __forceinline__ uint32_t gcoord(const Coords& c, int d, int64_t i) {
  return (uint32_t)(c.pos[d] != nullptr ? c.pos[d][i] : c.off[d] + i);
}

template <typename T, int V>
__global__ void hash_dropout_kernel(const T* __restrict__ x, const T* __restrict__ bias, const T* __restrict__ res,
                                    T* __restrict__ out, int64_t n, Coords c, int nd, uint32_t h0, uint32_t thr,
                                    double scale_d) {
  using A = typename Acc<T>::type;
  const A scale = (A)scale_d;
  const int64_t L = c.size[nd - 1];
  const int64_t nvec = n / V;
  for (int64_t iv = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; iv < nvec;
       iv += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = iv * V;
    int64_t r = i / L;
    const int64_t col = i - r * L;  // V divides L, so the V elements share a row
    int64_t coord[kMaxDims];
#pragma unroll
    for (int d = kMaxDims - 1; d >= 0; --d) {
      if (d < nd - 1) {
        const int64_t q = r / c.size[d];
        coord[d] = r - q * c.size[d];
        r = q;
      }
    }
    uint32_t h = h0;
#pragma unroll
    for (int d = 0; d < kMaxDims; ++d)
      if (d < nd - 1) h = combine(h, gcoord(c, d, coord[d]));
    Vec<T, V> xv = *reinterpret_cast<const Vec<T, V>*>(x + i);
    Vec<T, V> bv, rv, ov;
    if (bias) bv = *reinterpret_cast<const Vec<T, V>*>(bias + col);
    if (res) rv = *reinterpret_cast<const Vec<T, V>*>(res + i);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const uint32_t hh = combine(h, gcoord(c, nd - 1, col + j));
      const A keep = (hh >> 8) >= thr ? (A)1 : (A)0;
      T y = xv.v[j];
      if (bias) y = from_acc<T>(to_acc(y) + to_acc(bv.v[j]));
      const T masked = from_acc<T>(to_acc(y) * keep);
      T o = from_acc<T>(to_acc(masked) * scale);
      if (res) o = from_acc<T>(to_acc(rv.v[j]) + to_acc(o));
      ov.v[j] = o;
    }
    *reinterpret_cast<Vec<T, V>*>(out + i) = ov;
  }
}

template <typename T>
int launch(const void* x, const void* bias, const void* res, void* out, int64_t n, const Coords& c, int nd, uint32_t h0,
           uint32_t thr, double scale, cudaStream_t stream) {
  constexpr int V16 = vec16<T>();
  const int64_t L = c.size[nd - 1];
  const bool vec = L % V16 == 0 && aligned16(x) && aligned16(bias) && aligned16(res) && aligned16(out);
  const int threads = 256;
  if (vec) {
    hash_dropout_kernel<T, V16><<<grid_for(n / V16, threads), threads, 0, stream>>>(
        (const T*)x, (const T*)bias, (const T*)res, (T*)out, n, c, nd, h0, thr, scale);
  } else {
    hash_dropout_kernel<T, 1><<<grid_for(n, threads), threads, 0, stream>>>(
        (const T*)x, (const T*)bias, (const T*)res, (T*)out, n, c, nd, h0, thr, scale);
  }
  return launch_status();
}

}  // namespace

extern "C" int meshpar_hash_dropout(const void* x, const void* bias, const void* res, void* out, int dtype, int64_t n,
                                    const int64_t* sizes, const int64_t* offsets, const int64_t* const* pos, int nd,
                                    uint32_t h0, uint32_t thr, double scale, void* stream) {
  if (nd < 1 || nd > kMaxDims || n < 0 || !x || !out || !sizes || !offsets || !pos) return -1;
  if (n == 0) return 0;
  Coords c;
  for (int d = 0; d < kMaxDims; ++d) {
    c.size[d] = d < nd ? sizes[d] : 1;
    c.off[d] = d < nd ? offsets[d] : 0;
    c.pos[d] = d < nd ? pos[d] : nullptr;
    if (c.size[d] < 1) return -1;
  }
  cudaStream_t s = (cudaStream_t)stream;
  MESHPAR_DISPATCH(dtype, T, return launch<T>(x, bias, res, out, n, c, nd, h0, thr, scale, s));
  return -1;
}
