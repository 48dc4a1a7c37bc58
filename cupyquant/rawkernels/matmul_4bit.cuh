// Helpers shared by the fused 4-bit matrix-product kernels (gemv_4bit.cu, gemm_4bit.cu,
// gemm_4bit_wgmma.cu).
//
// The weight W (N, K) arrives in the bitsandbytes layout: flattened row-major, two codes a
// byte (flat element 2j in the high nibble of byte j), one scale per BLOCKSIZE consecutive
// flat elements. The scale is a float32 absmax, or, when nested (double quantized),
//   absmax[b] = code2[qabsmax[b]] * nested_absmax[b / 256] + offset
// with two float32 roundings, exactly as cupyquant/_reference.py::unnest_absmax.
#pragma once
#include "common.cuh"

// The two activation formats the tensor cores take, tagged for the mma / multiply variants.
struct MmaHalf : Float16 {
  static constexpr bool kIsHalf = true;
};
struct MmaBFloat16 : BFloat16 {
  static constexpr bool kIsHalf = false;
};

namespace q4 {

constexpr int kNestedShift = 8;  // double quantization compresses absmax in blocks of 256

// 16 bytes of packed weights on the read-only path without allocating in L1: each weight
// byte is used by exactly one warp once, so caching it would only evict the activations
// that every warp of the SM re-reads.
__device__ __forceinline__ uint4 load_stream16(const u8* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// 16 bytes of activations on the read-only path, cached in L1 (re-read by every warp).
__device__ __forceinline__ uint4 load_cached16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

__device__ __forceinline__ u32 word_of(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));  // i is a compile-time constant after unrolling
}

// The scale of one block is fetched in two steps so that its global loads can be issued
// together with the weight loads and decoded after they land.
//   plain:  value = absmax[b]
//   nested: value = nested_absmax[b >> 8], q = qabsmax[b]
template <bool NESTED>
__device__ __forceinline__ void scale_fetch(i64 block, const float* __restrict__ absmax, const u8* __restrict__ qabsmax,
                                            const float* __restrict__ nested_absmax, float& value, u32& q) {
  if constexpr (NESTED) {
    q = __ldg(qabsmax + block);
    value = __ldg(nested_absmax + (block >> kNestedShift));
  } else {
    value = __ldg(absmax + block);
    q = 0;
  }
}

// code2_s: the 256-value nested code in shared memory.
template <bool NESTED>
__device__ __forceinline__ float scale_decode(float value, u32 q, const float* code2_s, float offset) {
  if constexpr (NESTED) {
    return __fadd_rn(__fmul_rn(code2_s[q], value), offset);
  } else {
    return value;
  }
}

// The byte table of the 16-bit kernels: a packed byte -> the pair (code[hi], code[lo])
// rounded to the activation format, high nibble (the lower k) in the low 16 bits.
template <class Fmt>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  return (u32)Fmt::from_float(lo) | ((u32)Fmt::from_float(hi) << 16);
}

// The shared byte table (u32[256][32]: one replica a lane, so a warp's 32 lookups always
// hit 32 distinct banks; written a uint4 = 4 replicas at a time) and, NESTED, the
// 256-value nested code, filled by the CTA's kThreads threads. The caller publishes them
// with a barrier. WIDE: the one-token kernel's table, entries 256 bytes apart (u32[256][64],
// words 32..63 of an entry unused; gemv_4bit.cu's ByteLookup says why).
template <bool WIDE>
__device__ __forceinline__ int table_slot(int i) {  // uint4 i of the u32[256][32] table
  return WIDE ? ((i >> 3) << 4) | (i & 7) : i;
}

template <class Fmt, bool NESTED, int kThreads, bool WIDE = false>
__device__ __forceinline__ void fill_byte_table(u32* lut, float* code2_s, const float* __restrict__ table,
                                                const float* __restrict__ code2) {
  for (int i = threadIdx.x; i < 256 * 8; i += kThreads) {
    const int b = i >> 3;
    const u32 v = pack2<Fmt>(__ldg(table + (b >> 4)), __ldg(table + (b & 15)));
    reinterpret_cast<uint4*>(lut)[table_slot<WIDE>(i)] = make_uint4(v, v, v, v);
  }
  if constexpr (NESTED) {
    for (int i = threadIdx.x; i < 256; i += kThreads) code2_s[i] = __ldg(code2 + i);
  }
}

// fill_byte_table in two steps, for kernels that issue its global loads before their weight
// loads (a load issued after a warp's weight loads waits behind them): load() fetches this
// thread's inputs into registers, fill() writes its entries. Thread t writes the uint4s
// i = t + kThreads j, j < kFills, of entry (byte) b = i / 8: the pair (table[b / 16],
// table[b % 16]), whose second code is the same for every j as kThreads % 128 == 0.
template <class Fmt, bool NESTED, int kThreads>
struct ByteTableInputs {
  // (kThreads divides the 2048 uint4s and covers code2's 256 values with one each)
  static_assert(kThreads >= 256 && 2048 % kThreads == 0, "kThreads is 256, 512, 1024 or 2048");
  static constexpr int kFills = 256 * 8 / kThreads;
  float high[kFills];  // table[b / 16] of entry j
  float low;           // table[b % 16]
  float code2;         // NESTED: code2[t] (t < 256)

  __device__ __forceinline__ void load(const float* __restrict__ table, const float* __restrict__ code2_g) {
    low = __ldg(table + ((threadIdx.x >> 3) & 15));
#pragma unroll
    for (int j = 0; j < kFills; ++j) high[j] = __ldg(table + (threadIdx.x >> 7) + (kThreads / 128) * j);
    code2 = NESTED && threadIdx.x < 256 ? __ldg(code2_g + threadIdx.x) : 0.0f;
  }

  template <bool WIDE = false>
  __device__ __forceinline__ void fill(u32* lut, float* code2_s) const {
#pragma unroll
    for (int j = 0; j < kFills; ++j) {
      const u32 v = pack2<Fmt>(high[j], low);
      reinterpret_cast<uint4*>(lut)[table_slot<WIDE>(threadIdx.x + kThreads * j)] = make_uint4(v, v, v, v);
    }
    if (NESTED && threadIdx.x < 256) code2_s[threadIdx.x] = code2;
  }
};

// Byte b (0..3) of `word`, zero-extended: one PRMT.
__device__ __forceinline__ u32 byte_of(u32 word, int b) { return __byte_perm(word, 0u, 0x4440u | (u32)b); }

// The table entry of `byte` in this lane's replica. lut_lane: the shared-memory address of
// this lane's replica of entry 0 (table + 4 * lane); entries are 128 bytes apart, so the
// address is one LEA. (volatile keeps the load after the barrier that publishes the table.)
__device__ __forceinline__ u32 load_shared32(u32 address) {
  u32 v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(address));
  return v;
}
__device__ __forceinline__ u32 lut_at(u32 lut_lane, u32 byte) { return load_shared32(lut_lane + (byte << 7)); }

__device__ __forceinline__ u32 shared_address(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// The tile order of cupyquant/tiled_4bit.py (N % 16 == 0, K % 128 == 0; gemm_4bit.cu's data
// layout): the 16 bytes of 32-element chunk t (0..3) of row `row` (0..15) of 16-row tile
// `tile`, 128-k segment `seg`, with `segments` = K / 128.
__device__ __forceinline__ const u8* tiled_chunk(const u8* packed, int tile, int segments, int seg, int row, int t) {
  return packed + (((i64)tile * segments + seg) * 16 + row) * 64 + 16 * t;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// x * s on two packed 16-bit values (round to nearest even).
template <class Fmt>
__device__ __forceinline__ u32 mul2(u32 x, u32 s) {
  u32 d;
  if constexpr (Fmt::kIsHalf) {
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(x), "r"(s));
  } else {
    // x * s + (-0.0) is exactly the rounded product (and keeps the sign of a zero product).
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(x), "r"(s), "r"(0x80008000u));
  }
  return d;
}

// 16 bytes global -> shared, asynchronously; src_bytes = 0 writes zeros without reading.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, u32 src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

}  // namespace q4
