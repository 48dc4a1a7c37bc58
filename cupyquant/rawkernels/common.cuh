// Shared helpers for cupyquant's kernels: integer types, the three float formats
// (float32, float16, bfloat16 carried as raw 16-bit words) and exact conversions.
//
// No CUDA headers are included, so NVRTC compiles these files with no toolkit headers
// on the include path. Conversions use PTX `cvt` with explicit rounding (.rn), which is
// what NumPy's reference does (round to nearest even).
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

__device__ __forceinline__ float half_bits_to_float(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ u16 float_to_half_bits(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

__device__ __forceinline__ float bf16_bits_to_float(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ u16 float_to_bf16_bits(float f) {
  u16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));  // NaN -> canonical 0x7FFF
  return h;
}

// A float format: its storage word and exact widen / round-to-nearest-even narrow.
struct Float32 {
  typedef float storage;
  static constexpr int kBytes = 4;
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
};
struct Float16 {
  typedef u16 storage;
  static constexpr int kBytes = 2;
  __device__ __forceinline__ static float to_float(u16 v) { return half_bits_to_float(v); }
  __device__ __forceinline__ static u16 from_float(float v) { return float_to_half_bits(v); }
};
struct BFloat16 {
  typedef u16 storage;
  static constexpr int kBytes = 2;
  __device__ __forceinline__ static float to_float(u16 v) { return bf16_bits_to_float(v); }
  __device__ __forceinline__ static u16 from_float(float v) { return float_to_bf16_bits(v); }
};

// Load 8 consecutive elements as floats; `full` says all 8 are in range and the address
// is 16-byte aligned (the caller guarantees alignment for full vectors). Out-of-range
// elements read as 0.0f, which is how a short last block is padded.
template <class Fmt>
__device__ __forceinline__ void load8(const typename Fmt::storage* __restrict__ src, i64 start, i64 n, float (&v)[8]) {
  if (start + 8 <= n) {
    if constexpr (Fmt::kBytes == 4) {
      const float4 a = *reinterpret_cast<const float4*>(src + start);
      const float4 b = *reinterpret_cast<const float4*>(src + start + 4);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
      v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 w = *reinterpret_cast<const uint4*>(src + start);
      const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[2 * i] = Fmt::to_float((u16)(words[i] & 0xFFFFu));  // little endian: even element low
        v[2 * i + 1] = Fmt::to_float((u16)(words[i] >> 16));
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = (start + i < n) ? Fmt::to_float(src[start + i]) : 0.0f;
  }
}

// Store 8 floats rounded to Fmt at dst[start..start+8), bounds-checked against n.
template <class Fmt>
__device__ __forceinline__ void store8(typename Fmt::storage* __restrict__ dst, i64 start, i64 n, const float (&v)[8]) {
  if (start + 8 <= n) {
    if constexpr (Fmt::kBytes == 4) {
      *reinterpret_cast<float4*>(dst + start) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(dst + start + 4) = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      u32 w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        w[i] = (u32)Fmt::from_float(v[2 * i]) | ((u32)Fmt::from_float(v[2 * i + 1]) << 16);
      *reinterpret_cast<uint4*>(dst + start) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (start + i < n) dst[start + i] = Fmt::from_float(v[i]);
  }
}
