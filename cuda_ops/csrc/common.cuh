// Shared helpers of the meshpar CUDA kernels: dtype codes, float conversion, 16-byte vectors, error codes.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

// dtype codes passed from Python (cuda_ops/_dtypes.py): 0 float32, 1 bfloat16, 2 float16, 3 float64
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }

// V elements of T in one aligned 16-byte (or smaller) access
template <typename T, int V> struct alignas(sizeof(T) * V) Vec { T v[V]; };

template <typename T> constexpr int vec16() { return 16 / (int)sizeof(T); }

inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

inline int grid_for(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  int dev = 0, sms = 132;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  int64_t cap = (int64_t)sms * 32;  // grid-stride loops beyond this
  if (blocks > cap) blocks = cap;
  return blocks < 1 ? 1 : (int)blocks;
}

// Every launcher returns this: 0 on success, a cudaError_t code otherwise (-1 for a bad argument).
inline int launch_status() { return (int)cudaGetLastError(); }

#define MESHPAR_DISPATCH(dtype, T, ...)                         \
  switch (dtype) {                                              \
    case kF32: { using T = float; __VA_ARGS__; break; }         \
    case kBF16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    case kF16: { using T = __half; __VA_ARGS__; break; }        \
    case kF64: { using T = double; __VA_ARGS__; break; }        \
    default: return -1;                                         \
  }
