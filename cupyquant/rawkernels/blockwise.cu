// Blockwise quantization: 4-bit (NF4, FP4) and 8-bit (any sorted 256-value code).
//
// Data layout
//   A        Fmt::storage[n]    the flat, row-major input (bf16 as raw 16-bit words)
//   absmax   float32[blocks]    max |x| per block of BLOCKSIZE consecutive elements
//   packed   u8[(n+1)/2]        4-bit codes, element 2j in the high nibble of byte j
//   q        u8[n]              8-bit codes
//
// Thread mapping (quantize): thread t owns elements [8t, 8t+8) (one 16-byte load for
// 16-bit formats, two for float32). GROUP = BLOCKSIZE / 8 consecutive threads own one
// block and reduce its absmax together: warp shuffles inside a warp, then shared memory
// when a block spans several warps (BLOCKSIZE > 256). A CUDA block has max(256, GROUP)
// threads, so it always holds whole quantization blocks.
//
// Thread mapping (dequantize): thread t owns 16 elements: 8 packed bytes (4-bit) or 16
// code bytes (8-bit), and writes them with 16-byte stores. BLOCKSIZE >= 32 makes the 16
// elements share one absmax.
//
// Bit-exactness with the NumPy reference (cupyquant/_reference.py) is the contract, so
// every float operation is an explicitly rounded intrinsic: no FMA contraction, no
// approximate reciprocal.
#include "common.cuh"

namespace {

constexpr int kQuantNF4 = 0;
constexpr int kQuantFP4 = 1;
constexpr int kQuant8bit = 2;
constexpr int kNestedBlocksize = 256;

__host__ __device__ constexpr int quant_threads(int blocksize) { return blocksize / 8 > 256 ? blocksize / 8 : 256; }

// NF4 code = number of the 15 sorted thresholds t[0..14] that x exceeds, found by a
// 4-level binary search with selects (no divergence, no local memory). NaN compares
// false everywhere and gets code 0, as in the reference.
__device__ __forceinline__ u32 nf4_code(float x, const float (&t)[16]) {
  const bool b3 = x > t[7];
  const bool b2 = x > (b3 ? t[11] : t[3]);
  const bool b1 = x > (b3 ? (b2 ? t[13] : t[9]) : (b2 ? t[5] : t[1]));
  const float last = b3 ? (b2 ? (b1 ? t[14] : t[12]) : (b1 ? t[10] : t[8]))
                        : (b2 ? (b1 ? t[6] : t[4]) : (b1 ? t[2] : t[0]));
  const bool b0 = x > last;
  return ((u32)b3 << 3) | ((u32)b2 << 2) | ((u32)b1 << 1) | (u32)b0;
}

// FP4 code: sign bit 8 when x < 0; the count c of the 7 sorted thresholds t[0..6] that |x|
// exceeds picks the magnitude index, nibble c of `magnitude_nibbles` (FP4 is not
// monotonic in its index: c = 0..7 -> 0, 1, 6, 7, 4, 5, 2, 3).
__device__ __forceinline__ u32 fp4_code(float x, const float (&t)[16], u32 magnitude_nibbles) {
  const u32 sign = x < 0.0f ? 8u : 0u;
  const float a = fabsf(x);
  const bool b2 = a > t[3];
  const bool b1 = a > (b2 ? t[5] : t[1]);
  const bool b0 = a > (b2 ? (b1 ? t[6] : t[4]) : (b1 ? t[2] : t[0]));
  const u32 c = ((u32)b2 << 2) | ((u32)b1 << 1) | (u32)b0;
  return ((magnitude_nibbles >> (4 * c)) & 0xFu) | sign;
}

// 8-bit code of x for a sorted code. bitsandbytes' search ends at the even index
// p = 2 * #{odd i : x > code[i]}; `tree` holds the 127 odd entries in breadth-first
// order (tree[1] = code[127], children of k at 2k, 2k+1), so a warp's reads at the top
// levels hit distinct banks. Then p+1 wins when x > mid(code[p], code[p+1]), p-1 (at
// least 0) when x < mid(code[p-1], code[p]); midpoints are (a + b) * 0.5f in float32.
__device__ __forceinline__ u32 code8(float x, const float* __restrict__ tree, const float* __restrict__ code) {
  int k = 1;
#pragma unroll
  for (int level = 0; level < 7; ++level) k = 2 * k + (x > tree[k] ? 1 : 0);
  const int p = 2 * (k - 128);
  const float val = code[p];
  if (x > val) {
    const float mid = __fmul_rn(__fadd_rn(code[p + 1], val), 0.5f);
    return x > mid ? p + 1 : p;
  }
  const int lower = p > 0 ? p - 1 : 0;
  const float mid = __fmul_rn(__fadd_rn(code[lower], val), 0.5f);
  return x < mid ? lower : p;
}

// Max over the GROUP threads of one quantization block (NaN-free inputs).
template <int GROUP, int THREADS>
__device__ __forceinline__ float group_max(float m) {
  constexpr int kWarpWidth = GROUP < 32 ? GROUP : 32;
#pragma unroll
  for (int o = kWarpWidth / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if constexpr (GROUP > 32) {
    __shared__ float warp_max[THREADS / 32];
    const int warp = threadIdx.x / 32;
    if ((threadIdx.x & 31) == 0) warp_max[warp] = m;
    __syncthreads();
    const int first = (threadIdx.x / GROUP) * (GROUP / 32);
    m = warp_max[first];
#pragma unroll
    for (int i = 1; i < GROUP / 32; ++i) m = fmaxf(m, warp_max[first + i]);
  }
  return m;
}

}  // namespace

// quantize_blockwise<Fmt, BLOCKSIZE, QUANT, HAS_OFFSET>
//   A            Fmt::storage[n]
//   table        float32[16] thresholds (4-bit) or float32[256] sorted code (8-bit)
//   magnitude    u32: FP4 count -> magnitude index, 8 nibbles (ignored otherwise)
//   offset       float32[1] subtracted from every element first (HAS_OFFSET; nested absmax)
//   absmax       float32[ceil(n / BLOCKSIZE)]
//   out          u8[(n+1)/2] (4-bit) or u8[n] (8-bit); 4-byte (4-bit) / 8-byte (8-bit) aligned
template <class Fmt, int BLOCKSIZE, int QUANT, bool HAS_OFFSET>
__global__ void __launch_bounds__(quant_threads(BLOCKSIZE))
quantize_blockwise(const typename Fmt::storage* __restrict__ A, const float* __restrict__ table, u32 magnitude,
                   const float* __restrict__ offset, float* __restrict__ absmax, u8* __restrict__ out, i64 n) {
  constexpr int GROUP = BLOCKSIZE / 8;
  constexpr int THREADS = quant_threads(BLOCKSIZE);
  __shared__ float tree[QUANT == kQuant8bit ? 128 : 1];
  __shared__ float code[QUANT == kQuant8bit ? 256 : 1];
  float t[16];
  if constexpr (QUANT == kQuant8bit) {
    // THREADS >= 256: one code entry per thread; odd entries also go to the BFS tree.
    const int i = threadIdx.x;
    if (i < 256) {
      code[i] = table[i];
      if (i >= 1 && i < 128) {
        const int level = 31 - __clz(i);
        const int pivot = (2 * (i - (1 << level)) + 1) * (1 << (7 - level)) - 1;
        tree[i] = table[pivot];
      }
    }
    __syncthreads();
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) t[i] = table[i];  // uniform loads, kept in registers
  }

  const i64 thread = (i64)blockIdx.x * THREADS + threadIdx.x;
  const i64 start = thread * 8;
  float v[8];
  load8<Fmt>(A, start, n, v);
  if constexpr (HAS_OFFSET) {
    const float off = *offset;
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = start + i < n ? __fsub_rn(v[i], off) : 0.0f;
  }
  float m = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(v[i]));  // fmaxf drops NaN
  m = group_max<GROUP, THREADS>(m);
  if (start < n && (threadIdx.x % GROUP) == 0) absmax[start / BLOCKSIZE] = m;
  const float recip = __frcp_rn(m);  // IEEE 1/m: 1/0 = inf, and 0 * inf = NaN -> code 0

  if constexpr (QUANT == kQuant8bit) {
    u32 lo = 0, hi = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) lo |= code8(__fmul_rn(v[i], recip), tree, code) << (8 * i);
#pragma unroll
    for (int i = 0; i < 4; ++i) hi |= code8(__fmul_rn(v[4 + i], recip), tree, code) << (8 * i);
    if (start + 8 <= n) {
      *reinterpret_cast<uint2*>(out + start) = make_uint2(lo, hi);
    } else {
      const u64 word = ((u64)hi << 32) | lo;
      for (int i = 0; i < 8; ++i)
        if (start + i < n) out[start + i] = (u8)(word >> (8 * i));
    }
  } else {
    u32 word = 0;  // byte j (little endian) = code(2j) << 4 | code(2j + 1)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float a = __fmul_rn(v[2 * j], recip), b = __fmul_rn(v[2 * j + 1], recip);
      const u32 ca = QUANT == kQuantNF4 ? nf4_code(a, t) : fp4_code(a, t, magnitude);
      const u32 cb = QUANT == kQuantNF4 ? nf4_code(b, t) : fp4_code(b, t, magnitude);
      word |= ((ca << 4) | cb) << (8 * j);
    }
    const i64 byte0 = start / 2, bytes = (n + 1) / 2;
    if (byte0 + 4 <= bytes) {
      *reinterpret_cast<u32*>(out + byte0) = word;
    } else {
      for (int j = 0; j < 4; ++j)
        if (byte0 + j < bytes) out[byte0 + j] = (u8)(word >> (8 * j));
    }
  }
}

// The absmax of the block holding element e: plain, or decoded from the nested state as
// code2[q] * nested_absmax[b / 256] + offset (two roundings, as the reference).
template <bool NESTED>
__device__ __forceinline__ float block_scale(i64 block, const float* __restrict__ absmax, const u8* __restrict__ qabsmax,
                                             const float* __restrict__ code2, const float* __restrict__ nested_absmax,
                                             const float* __restrict__ offset) {
  if constexpr (NESTED) {
    return __fadd_rn(__fmul_rn(__ldg(code2 + qabsmax[block]), nested_absmax[block / kNestedBlocksize]), *offset);
  } else {
    return absmax[block];
  }
}

// dequantize_4bit<Fmt, BLOCKSIZE, NESTED>
//   packed      u8[(n+1)/2], 8-byte aligned
//   table       float32[16]: value of each code (FP4 index 8 is -0.0)
//   absmax      float32[blocks] (NESTED = false)
//   qabsmax, code2 float32[256], nested_absmax float32[ceil(blocks/256)], offset float32[1] (NESTED)
//   out         Fmt::storage[n], 16-byte aligned
template <class Fmt, int BLOCKSIZE, bool NESTED>
__global__ void __launch_bounds__(256)
dequantize_4bit(const u8* __restrict__ packed, const float* __restrict__ table, const float* __restrict__ absmax,
                const u8* __restrict__ qabsmax, const float* __restrict__ code2, const float* __restrict__ nested_absmax,
                const float* __restrict__ offset, typename Fmt::storage* __restrict__ out, i64 n) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = table[threadIdx.x];
  __syncthreads();
  const i64 thread = (i64)blockIdx.x * 256 + threadIdx.x;
  const i64 start = thread * 16;
  if (start >= n) return;
  const float scale = block_scale<NESTED>(start / BLOCKSIZE, absmax, qabsmax, code2, nested_absmax, offset);
  const i64 bytes = (n + 1) / 2;
  u8 b[8];
  if (thread * 8 + 8 <= bytes) {
    const uint2 w = *reinterpret_cast<const uint2*>(packed + thread * 8);
#pragma unroll
    for (int i = 0; i < 4; ++i) { b[i] = (u8)(w.x >> (8 * i)); b[4 + i] = (u8)(w.y >> (8 * i)); }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) b[i] = thread * 8 + i < bytes ? packed[thread * 8 + i] : 0;
  }
  float lo[8], hi[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    lo[2 * i] = __fmul_rn(lut[b[i] >> 4], scale);
    lo[2 * i + 1] = __fmul_rn(lut[b[i] & 15], scale);
    hi[2 * i] = __fmul_rn(lut[b[4 + i] >> 4], scale);
    hi[2 * i + 1] = __fmul_rn(lut[b[4 + i] & 15], scale);
  }
  store8<Fmt>(out, start, n, lo);
  store8<Fmt>(out, start + 8, n, hi);
}

// dequantize_8bit<Fmt, BLOCKSIZE, NESTED>
//   q       u8[n], 16-byte aligned
//   code    float32[256]
//   (absmax / nested state as in dequantize_4bit)
//   out     Fmt::storage[n], 16-byte aligned
template <class Fmt, int BLOCKSIZE, bool NESTED>
__global__ void __launch_bounds__(256)
dequantize_8bit(const u8* __restrict__ q, const float* __restrict__ code, const float* __restrict__ absmax,
                const u8* __restrict__ qabsmax, const float* __restrict__ code2, const float* __restrict__ nested_absmax,
                const float* __restrict__ offset, typename Fmt::storage* __restrict__ out, i64 n) {
  __shared__ float lut[256];
  lut[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const i64 start = ((i64)blockIdx.x * 256 + threadIdx.x) * 16;
  if (start >= n) return;
  const float scale = block_scale<NESTED>(start / BLOCKSIZE, absmax, qabsmax, code2, nested_absmax, offset);
  u8 b[16];
  if (start + 16 <= n) {
    const uint4 w = *reinterpret_cast<const uint4*>(q + start);
    const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 16; ++i) b[i] = (u8)(words[i / 4] >> (8 * (i % 4)));
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) b[i] = start + i < n ? q[start + i] : 0;
  }
  float lo[8], hi[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    lo[i] = __fmul_rn(lut[b[i]], scale);
    hi[i] = __fmul_rn(lut[b[8 + i]], scale);
  }
  store8<Fmt>(out, start, n, lo);
  store8<Fmt>(out, start + 8, n, hi);
}
