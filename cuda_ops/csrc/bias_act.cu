// Fused bias + GeLU: forward out = gelu(T(x + b)), backward dx = dy * gelu'(T(x + b)) (the bias
// gradient is dx summed over rows, done by torch). x, dy, out, dx: contiguous [rows, L]; b: [L].
// The intermediate y = T(x + b) is rounded to T as in the eager path (x + b, then F.gelu), and the
// GeLU formulas are torch's (exact erf form, or the tanh approximation; same operation order as
// ATen's CUDA GeLU kernels), computed in float (double for float64). Saves the forward's y: the backward recomputes it from x and b.
#include "common.cuh"

namespace {

template <typename A> __device__ __forceinline__ A gelu_f(A y, int tanh_approx) {
  if (tanh_approx) {
    const A kBeta = (A)(M_SQRT2 * M_2_SQRTPI * 0.5);
    const A kKappa = (A)0.044715;
    const A y_cube = y * y * y;
    const A inner = kBeta * (y + kKappa * y_cube);
    return (A)0.5 * y * ((A)1 + tanh(inner));
  }
  const A kAlpha = (A)M_SQRT1_2;
  return y * (A)0.5 * ((A)1 + erf(y * kAlpha));
}

template <typename A> __device__ __forceinline__ A gelu_grad(A dy, A y, int tanh_approx) {
  if (tanh_approx) {
    const A kBeta = (A)(M_SQRT2 * M_2_SQRTPI * 0.5);
    const A kKappa = (A)0.044715;
    const A y_sq = y * y;
    const A y_cube = y_sq * y;
    const A inner = kBeta * (y + kKappa * y_cube);
    const A t = tanh(inner);
    const A left = (A)0.5 * y;
    const A right = (A)1 + t;
    const A left_d = (A)0.5 * right;
    const A tanh_d = (A)1 - t * t;
    const A inner_d = kBeta * ((A)1 + (A)3 * kKappa * y_sq);
    const A right_d = left * tanh_d * inner_d;
    return dy * (left_d + right_d);
  }
  const A kBeta = (A)(M_2_SQRTPI * M_SQRT1_2 * 0.5);
  const A kAlpha = (A)M_SQRT1_2;
  const A cdf = (A)0.5 * ((A)1 + erf(y * kAlpha));
  const A pdf = exp((A)-0.5 * y * y) * kBeta;
  return dy * (cdf + y * pdf);
}

template <typename T, int V>
__global__ void bias_gelu_fwd_kernel(const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ out, int64_t n,
                                     int64_t L, int tanh_approx) {
  using A = typename Acc<T>::type;
  for (int64_t iv = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; iv < n / V; iv += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = iv * V;
    const int64_t col = i % L;
    const Vec<T, V> xv = *reinterpret_cast<const Vec<T, V>*>(x + i);
    const Vec<T, V> bv = *reinterpret_cast<const Vec<T, V>*>(b + col);
    Vec<T, V> ov;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A y = to_acc(from_acc<T>(to_acc(xv.v[j]) + to_acc(bv.v[j])));
      ov.v[j] = from_acc<T>(gelu_f<A>(y, tanh_approx));
    }
    *reinterpret_cast<Vec<T, V>*>(out + i) = ov;
  }
}

template <typename T, int V>
__global__ void bias_gelu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ b,
                                     T* __restrict__ dx, int64_t n, int64_t L, int tanh_approx) {
  using A = typename Acc<T>::type;
  for (int64_t iv = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; iv < n / V; iv += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = iv * V;
    const int64_t col = i % L;
    const Vec<T, V> gv = *reinterpret_cast<const Vec<T, V>*>(dy + i);
    const Vec<T, V> xv = *reinterpret_cast<const Vec<T, V>*>(x + i);
    const Vec<T, V> bv = *reinterpret_cast<const Vec<T, V>*>(b + col);
    Vec<T, V> ov;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A y = to_acc(from_acc<T>(to_acc(xv.v[j]) + to_acc(bv.v[j])));
      ov.v[j] = from_acc<T>(gelu_grad<A>(to_acc(gv.v[j]), y, tanh_approx));
    }
    *reinterpret_cast<Vec<T, V>*>(dx + i) = ov;
  }
}

template <typename T>
int launch_fwd(const void* x, const void* b, void* out, int64_t n, int64_t L, int tanh_approx, cudaStream_t s) {
  constexpr int V = vec16<T>();
  const int threads = 256;
  if (L % V == 0 && aligned16(x) && aligned16(b) && aligned16(out))
    bias_gelu_fwd_kernel<T, V><<<grid_for(n / V, threads), threads, 0, s>>>((const T*)x, (const T*)b, (T*)out, n, L,
                                                                            tanh_approx);
  else
    bias_gelu_fwd_kernel<T, 1><<<grid_for(n, threads), threads, 0, s>>>((const T*)x, (const T*)b, (T*)out, n, L,
                                                                        tanh_approx);
  return launch_status();
}

template <typename T>
int launch_bwd(const void* dy, const void* x, const void* b, void* dx, int64_t n, int64_t L, int tanh_approx,
               cudaStream_t s) {
  constexpr int V = vec16<T>();
  const int threads = 256;
  if (L % V == 0 && aligned16(dy) && aligned16(x) && aligned16(b) && aligned16(dx))
    bias_gelu_bwd_kernel<T, V><<<grid_for(n / V, threads), threads, 0, s>>>((const T*)dy, (const T*)x, (const T*)b,
                                                                            (T*)dx, n, L, tanh_approx);
  else
    bias_gelu_bwd_kernel<T, 1><<<grid_for(n, threads), threads, 0, s>>>((const T*)dy, (const T*)x, (const T*)b,
                                                                        (T*)dx, n, L, tanh_approx);
  return launch_status();
}

}  // namespace

extern "C" {

int meshpar_bias_gelu_fwd(const void* x, const void* b, void* out, int dtype, int64_t n, int64_t L, int tanh_approx,
                          void* stream) {
  if (!x || !b || !out || L < 1 || n < 0 || n % L != 0) return -1;
  if (n == 0) return 0;
  MESHPAR_DISPATCH(dtype, T, return launch_fwd<T>(x, b, out, n, L, tanh_approx, (cudaStream_t)stream));
  return -1;
}

int meshpar_bias_gelu_bwd(const void* dy, const void* x, const void* b, void* dx, int dtype, int64_t n, int64_t L,
                          int tanh_approx, void* stream) {
  if (!dy || !x || !b || !dx || L < 1 || n < 0 || n % L != 0) return -1;
  if (n == 0) return 0;
  MESHPAR_DISPATCH(dtype, T, return launch_bwd<T>(dy, x, b, dx, n, L, tanh_approx, (cudaStream_t)stream));
  return -1;
}

}  // extern "C"
