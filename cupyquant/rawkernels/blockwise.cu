// Blockwise quantization: 4-bit (NF4, FP4) and 8-bit (any sorted 256-value code).
//
// Data layout
//   A        Fmt::storage[n]    the flat, row-major input (bf16 as raw 16-bit words)
//   absmax   float32[blocks]    max |x| per block of BLOCKSIZE consecutive elements
//   packed   u8[(n+1)/2]        4-bit codes, element 2j in the high nibble of byte j
//   q        u8[n]              8-bit codes
//
// Thread mapping (quantize): a persistent grid walks the input in chunks of THREADS * 16
// elements; in each chunk thread t owns elements [16t, 16t+16) (two 16-byte loads for
// 16-bit formats, four for float32, all issued before any use). GROUP = BLOCKSIZE / 16
// consecutive threads own one block and reduce its absmax together: warp shuffles, then
// shared memory when a block spans several warps. A CUDA block has max(256, GROUP)
// threads, so it always holds whole quantization blocks.
//
// Code choice (quantize): the scaled value x = v * (1 / absmax) picks a bucket with two
// exact float operations and one table entry (threshold, lo, hi) gives the code as
// `x > threshold ? hi : lo`. The tables are built on the host (cupyquant/_lut.py) so
// that this equals the reference search for every float32 x; see that file for the
// bucket functions. Codes that do not fit the 8-bit buckets fall back to a binary search.
//
// Thread mapping (dequantize): thread t owns 4 groups of 8 elements, 2048 elements apart,
// so every warp-wide load and 16-byte store is one contiguous span; all loads are issued
// before the first store. BLOCKSIZE >= 32 makes each group of 8 share one absmax.
//
// Bit-exactness with the NumPy reference (cupyquant/_reference.py) is the contract, so
// every float operation is an explicitly rounded intrinsic: no FMA contraction, no
// approximate reciprocal.
#include "common.cuh"

namespace {

constexpr int kQuantNF4 = 0;
constexpr int kQuantFP4 = 1;
constexpr int kQuant8bitTable = 2;   // 8-bit code through the exponent-bucket table
constexpr int kQuant8bitSearch = 3;  // 8-bit code through a binary search (any sorted code)
constexpr int kNestedBlocksize = 256;
constexpr int kVec = 16;  // elements per thread and chunk step

// Table sizes (cupyquant/_lut.py): 256 linear buckets; 8-bit: per sign one bucket for
// tiny |x| plus 64 per binade for exponents 104..127, then one entry for NaN.
constexpr int kLinearTable = 256;
constexpr int kExpMin = 104;
constexpr int kBucketsPerSign = 1 + (127 - kExpMin + 1) * 64;
constexpr int kExpTable = 2 * kBucketsPerSign + 1;

__host__ __device__ constexpr int quant_threads(int blocksize) {
  return blocksize / kVec > 256 ? blocksize / kVec : 256;
}

__host__ __device__ constexpr int table_entries(int quant) {
  return quant == kQuant8bitTable ? kExpTable : (quant == kQuant8bitSearch ? 1 : kLinearTable);
}

// One table entry: x > threshold ? hi : lo (NaN compares false and takes lo).
__device__ __forceinline__ u32 pick(uint2 entry, float x) {
  return x > __uint_as_float(entry.x) ? (entry.y >> 8) : (entry.y & 0xFFu);
}

// NF4: bucket = round(64 * max(x, -1) + 64), read from the low mantissa bits after adding
// 1.5 * 2^23 (x * 64 is exact, so the fma rounds once). fmaxf maps NaN to -1, whose
// bucket has lo = 0.
__device__ __forceinline__ u32 nf4_code(float x, const uint2* __restrict__ lut) {
  const u32 idx = __float_as_uint(__fmaf_rn(fmaxf(x, -1.0f), 64.0f, 12582976.0f)) & 0xFFu;
  return pick(lut[idx], x);
}

// FP4: the table gives the magnitude index of |x| (bucket round(128 |x|)); sign bit 8
// when x < 0, so a tiny negative value gets 8 ("-0").
__device__ __forceinline__ u32 fp4_code(float x, const uint2* __restrict__ lut) {
  const float a = fabsf(x);
  const u32 idx = __float_as_uint(__fmaf_rn(fmaxf(a, 0.0f), 128.0f, 12582912.0f)) & 0xFFu;
  return pick(lut[idx], a) | (x < 0.0f ? 8u : 0u);
}

// 8-bit by table: bucket from (sign, exponent, top 6 mantissa bits); |x| below 2^-23 is
// bucket 0 of its sign, |x| >= 2 clamps to the last one, NaN has its own entry.
__device__ __forceinline__ u32 code8_table(float x, const uint2* __restrict__ lut) {
  const u32 bits = __float_as_uint(x);
  const u32 mag = bits & 0x7FFFFFFFu;
  const int k = (int)(mag >> 17) - kExpMin * 64;
  const int within = k < 0 ? 0 : min(k + 1, kBucketsPerSign - 1);
  const int idx = mag > 0x7F800000u ? kExpTable - 1 : (int)(bits >> 31) * kBucketsPerSign + within;
  return pick(lut[idx], x);
}

// 8-bit by search, for codes the table cannot hold. bitsandbytes' search ends at the even
// index p = 2 * #{odd i : x > code[i]}; `tree` holds the 127 odd entries in breadth-first
// order (tree[1] = code[127], children of k at 2k, 2k+1), so a warp's reads at the top
// levels hit distinct banks. Then p+1 wins when x > mid(code[p], code[p+1]), p-1 (at
// least 0) when x < mid(code[p-1], code[p]); midpoints are (a + b) * 0.5f in float32.
__device__ __forceinline__ u32 code8_search(float x, const float* __restrict__ tree, const float* __restrict__ code) {
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

// Max over the GROUP threads of one quantization block (NaN-free inputs). Called the
// same number of times by every thread of the CUDA block.
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
    __syncthreads();  // warp_max is rewritten by the next chunk
  }
  return m;
}

}  // namespace

// quantize_blockwise<Fmt, BLOCKSIZE, QUANT, HAS_OFFSET>
//   A            Fmt::storage[n], 16-byte aligned
//   table        kQuantNF4 / kQuantFP4: uint32[256][2]; kQuant8bitTable: uint32[kExpTable][2]
//                (threshold bits, lo | hi << 8); kQuant8bitSearch: the sorted float32[256] code
//   offset       float32[1] subtracted from every element first (HAS_OFFSET; nested absmax)
//   absmax       float32[ceil(n / BLOCKSIZE)]
//   out          u8[(n+1)/2] (4-bit, 8-byte aligned) or u8[n] (8-bit, 16-byte aligned)
// Grid: any number of blocks (persistent; each walks chunks gridDim.x apart).
template <class Fmt, int BLOCKSIZE, int QUANT, bool HAS_OFFSET>
__global__ void __launch_bounds__(quant_threads(BLOCKSIZE))
quantize_blockwise(const typename Fmt::storage* __restrict__ A, const void* __restrict__ table,
                   const float* __restrict__ offset, float* __restrict__ absmax, u8* __restrict__ out, i64 n) {
  constexpr int GROUP = BLOCKSIZE / kVec;
  constexpr int THREADS = quant_threads(BLOCKSIZE);
  constexpr int CHUNK = THREADS * kVec;
  constexpr bool SEARCH = QUANT == kQuant8bitSearch;
  __shared__ uint2 lut[table_entries(QUANT)];
  __shared__ float tree[SEARCH ? 128 : 1];
  __shared__ float code[SEARCH ? 256 : 1];
  if constexpr (SEARCH) {
    const float* src = static_cast<const float*>(table);
    for (int i = threadIdx.x; i < 256; i += THREADS) {
      code[i] = src[i];
      if (i >= 1 && i < 128) {  // BFS node i holds pivot (2r + 1) * 2^(7 - level) - 1
        const int level = 31 - __clz(i);
        tree[i] = src[(2 * (i - (1 << level)) + 1) * (1 << (7 - level)) - 1];
      }
    }
  } else {
    const uint2* src = static_cast<const uint2*>(table);
    for (int i = threadIdx.x; i < table_entries(QUANT); i += THREADS) lut[i] = src[i];
  }
  const float off = HAS_OFFSET ? *offset : 0.0f;
  __syncthreads();

  for (i64 base = (i64)blockIdx.x * CHUNK; base < n; base += (i64)gridDim.x * CHUNK) {
    const i64 start = base + (i64)threadIdx.x * kVec;
    float v[2][8];
    load8<Fmt>(A, start, n, v[0]);
    load8<Fmt>(A, start + 8, n, v[1]);
    float m = 0.0f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if constexpr (HAS_OFFSET) v[h][i] = start + 8 * h + i < n ? __fsub_rn(v[h][i], off) : 0.0f;
        m = fmaxf(m, fabsf(v[h][i]));  // fmaxf drops NaN
      }
    }
    m = group_max<GROUP, THREADS>(m);
    if (start < n && (threadIdx.x % GROUP) == 0) absmax[start / BLOCKSIZE] = m;
    const float recip = __frcp_rn(m);  // IEEE 1/m: 1/0 = inf, and 0 * inf = NaN -> code 0

    if constexpr (QUANT == kQuant8bitTable || QUANT == kQuant8bitSearch) {
      u32 w[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        w[j] = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float x = __fmul_rn(v[j / 2][(j % 2) * 4 + i], recip);
          const u32 c = SEARCH ? code8_search(x, tree, code) : code8_table(x, lut);
          w[j] |= c << (8 * i);
        }
      }
      if (start + kVec <= n) {
        *reinterpret_cast<uint4*>(out + start) = make_uint4(w[0], w[1], w[2], w[3]);
      } else {
        for (int i = 0; i < kVec; ++i)
          if (start + i < n) out[start + i] = (u8)(w[i / 4] >> (8 * (i % 4)));
      }
    } else {
      u32 w[2];  // byte j (little endian) = code(2j) << 4 | code(2j + 1)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        w[h] = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float a = __fmul_rn(v[h][2 * j], recip), b = __fmul_rn(v[h][2 * j + 1], recip);
          const u32 ca = QUANT == kQuantNF4 ? nf4_code(a, lut) : fp4_code(a, lut);
          const u32 cb = QUANT == kQuantNF4 ? nf4_code(b, lut) : fp4_code(b, lut);
          w[h] |= ((ca << 4) | cb) << (8 * j);
        }
      }
      const i64 byte0 = start / 2, bytes = (n + 1) / 2;
      if (byte0 + 8 <= bytes) {
        *reinterpret_cast<uint2*>(out + byte0) = make_uint2(w[0], w[1]);
      } else {
        for (int j = 0; j < 8; ++j)
          if (byte0 + j < bytes) out[byte0 + j] = (u8)(w[j / 4] >> (8 * (j % 4)));
      }
    }
  }
}

// Dequantize thread mapping: a CUDA block of 256 threads covers kDequantGroups * 2048
// elements; in group g, thread t owns the 8 elements at g * 2048 + 8t, so each load and
// each 16-byte store instruction of a warp touches one contiguous span.
constexpr int kDequantGroups = 4;

__device__ __forceinline__ i64 group_start(int g) {
  return ((i64)blockIdx.x * kDequantGroups + g) * 2048 + (i64)threadIdx.x * 8;
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

// Row-major index of element i of an (n / K, K) weight stored in 16-row x 128-column tiles
// (cupyquant.tiled_4bit; K % 128 == 0): tile i / 2048 is (row tile, column tile) = divmod(.,
// K / 128), and inside it element i % 2048 is (row, column) = divmod(., 128). Elements i ..
// i + 7 (i % 8 == 0) stay in one row: contiguous in both orders.
__device__ __forceinline__ i64 row_major_index(i64 i, int K) {
  const u32 tiles_a_row = (u32)K >> 7;
  const u32 tile = (u32)(i >> 11), in_tile = (u32)i & 2047u;
  const u32 row_tile = tile / tiles_a_row, col_tile = tile - row_tile * tiles_a_row;
  return (i64)(16u * row_tile + (in_tile >> 7)) * K + 128u * col_tile + (in_tile & 127u);
}

// dequantize_4bit<Fmt, BLOCKSIZE, NESTED, TILED>
//   packed      u8[(n+1)/2], 4-byte aligned; TILED: an (n / tile_k, tile_k) weight stored in
//               tile order (row_major_index): the threads read it as stored and write each
//               group of 8 elements to its row-major place
//   table       float32[16]: value of each code (FP4 index 8 is -0.0)
//   absmax      float32[blocks] (NESTED = false)
//   qabsmax u8[blocks], code2 float32[256], nested_absmax float32[ceil(blocks/256)],
//   offset float32[1] (NESTED)
//   out         Fmt::storage[n], 16-byte aligned
//   tile_k      K of a TILED weight (unused otherwise)
template <class Fmt, int BLOCKSIZE, bool NESTED, bool TILED = false>
__global__ void __launch_bounds__(256)
dequantize_4bit(const u8* __restrict__ packed, const float* __restrict__ table, const float* __restrict__ absmax,
                const u8* __restrict__ qabsmax, const float* __restrict__ code2, const float* __restrict__ nested_absmax,
                const float* __restrict__ offset, typename Fmt::storage* __restrict__ out, i64 n, int tile_k) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = table[threadIdx.x];
  __syncthreads();
  const i64 bytes = (n + 1) / 2;
  u32 w[kDequantGroups];
#pragma unroll
  for (int g = 0; g < kDequantGroups; ++g) {  // all loads first: several in flight
    const i64 start = group_start(g);
    if (start + 8 <= n) {
      w[g] = *reinterpret_cast<const u32*>(packed + start / 2);
    } else {
      w[g] = 0;
      for (int j = 0; j < 4; ++j)
        if (start / 2 + j < bytes) w[g] |= (u32)packed[start / 2 + j] << (8 * j);
    }
  }
#pragma unroll
  for (int g = 0; g < kDequantGroups; ++g) {
    const i64 start = group_start(g);
    if (start >= n) break;
    const i64 e = TILED ? row_major_index(start, tile_k) : start;  // of the group's first element
    const float scale = block_scale<NESTED>(e / BLOCKSIZE, absmax, qabsmax, code2, nested_absmax, offset);
    float v[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const u32 byte = (w[g] >> (8 * j)) & 0xFFu;
      v[2 * j] = __fmul_rn(lut[byte >> 4], scale);
      v[2 * j + 1] = __fmul_rn(lut[byte & 15u], scale);
    }
    store8<Fmt>(out, e, n, v);
  }
}

// dequantize_8bit<Fmt, BLOCKSIZE, NESTED>
//   q       u8[n], 8-byte aligned
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
  uint2 w[kDequantGroups];
#pragma unroll
  for (int g = 0; g < kDequantGroups; ++g) {
    const i64 start = group_start(g);
    if (start + 8 <= n) {
      w[g] = *reinterpret_cast<const uint2*>(q + start);
    } else {
      w[g] = make_uint2(0, 0);
      for (int j = 0; j < 8; ++j)
        if (start + j < n) (j < 4 ? w[g].x : w[g].y) |= (u32)q[start + j] << (8 * (j % 4));
    }
  }
#pragma unroll
  for (int g = 0; g < kDequantGroups; ++g) {
    const i64 start = group_start(g);
    if (start >= n) break;
    const float scale = block_scale<NESTED>(start / BLOCKSIZE, absmax, qabsmax, code2, nested_absmax, offset);
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = __fmul_rn(lut[((j < 4 ? w[g].x : w[g].y) >> (8 * (j % 4))) & 0xFFu], scale);
    store8<Fmt>(out, start, n, v);
  }
}
