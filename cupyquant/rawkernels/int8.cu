// LLM.int8: row-wise int8 quantization with outlier columns, int8 products with a fused
// dequantization epilogue, and the small-M (decode) path.
//
// Data layout (all row-major, element offsets in 64-bit)
//   A        Fmt::storage[rows * K]   activations (bf16 / fp16 as raw 16-bit words)
//   CA       i8[rows * K]             row-wise codes of A
//   SCA      float32[rows]            row absmax of A (outlier values left out)
//   CB       i8[N * K]                int8 weight, one output feature per row
//   SCB      float32[N]               row absmax of the weight
//   flags    u8[K]                    1 where column k of A holds an outlier (|a| >= threshold)
//   rowbits  u32[rows * stride]       each row's own outlier bitmap, the stride ceil(K / 32)
//                                     rounded up to 4 (medium-M path at MT = 16 and the
//                                     cuBLAS path at few rows: every word written, no zeroing)
//   idx      i32[K], count i32[1]     the flagged columns in ascending order, and how many
//   out      OutFmt::storage[M * N]   or int32[M * N] for the raw product
//
// Arithmetic (the NumPy spec is cupyquant/_reference_int8.py; results are bit-equal):
//   scale    = 127 * RZ(1 / absmax)                         __frcp_rz, then __fmul_rn
//   code     = round_half_even(x * scale), 0 for NaN        __float2int_rn
//   dequant  = fmaf((float(acc) * SCA) * SCB, 1/127^2, bias) one rounding to OutFmt
//   outliers = OutFmt(widen(dequant) + sum_j A[m, c_j] * OutFmt((CB[n, c_j] * SCB[n]) / 127))
//              the sum in ascending column order, one multiply and one add per term
// Every float operation is an explicitly rounded intrinsic: no FMA contraction.
//
// Kernels
//   int8_outlier_flags   thread = 8 consecutive columns x a slab of rows; sets flags
//   int8_row_quant       warp = one row; pass 1 absmax, pass 2 codes (row re-read from L1/L2)
//   int8_col_absmax / int8_col_quant   thread = one column x a slab of rows (backward only)
//   int8_compact_flags   one CTA: flags -> ascending idx, count (no host round trip)
//   int8_vectorwise_dequant, int8_mm_dequant   elementwise (thread = column x row slab)
//   int8_mm_dequant_outliers  int8_mm_dequant plus the outlier columns' 16-bit products
//                        (thread = 1, 2 or 4 columns x row slab), taking their int8
//                        products back out of the int32 ones first where asked
//   int8_outlier_gather  lists the outlier columns from the row bitmaps (every CTA) and
//                        gathers their operands; runs beside cuBLAS (cuBLAS path, few rows)
//   int8_outlier_weights  lists the outlier columns (every CTA), zeroes them in CA, gathers
//                        their activations; thread = weight row: their 16-bit weights, once
//                        a call (cuBLAS path, many rows)
//   int8_gemm            tensor cores (mma.m16n8k32.s8), 128x128x64 CTA tile, 4-stage cp.async
//                        pipeline, int32 or dequantized epilogue (+ outlier columns)
//   int8_linear_gemv     M <= MT rows: each CTA quantizes A into shared memory itself, each
//                        warp streams whole weight rows once with 16-byte loads and dp4a
//   int8_row_quant_wide  CTA = one row; finds outlier columns in the same pass (flags or
//                        row bitmaps), leaving their codes for the consumer to subtract
//   int8_linear_mmv      M <= 64 ("auto": from 5 rows): weight rows as mma's 16-row operand,
//                        activation codes as its n8 operand, each weight byte read once;
//                        dequant epilogue
#include "common.cuh"

typedef signed char i8;

namespace {

constexpr u32 kFull = 0xffffffffu;
constexpr int kRowsPerSlab = 32;  // rows one thread walks in the column-mapped kernels

// bitsandbytes' float32 constants bit for bit: 1/127 (int8_vectorwise_dequant) and
// 1/127^2 (MM_DEQUANT_CONST of its int32 -> fp16 kernel).
__device__ __forceinline__ float dequant_scale() { return __uint_as_float(0x3C010204u); }
__device__ __forceinline__ float mm_dequant_scale() { return __uint_as_float(0x38820610u); }

// 127 * RZ(1/absmax). bitsandbytes uses __fdividef (an approximate reciprocal times 127),
// whose reciprocal the truncated one reproduces on its outputs; unlike the hardware
// approximation, RZ is specified exactly and NumPy can compute it.
__device__ __forceinline__ float int8_scale(float absmax) { return __fmul_rn(127.0f, __frcp_rz(absmax)); }

// round_half_even(x * scale); cvt.rni.s32.f32 gives 0 for NaN (and 0 * inf is NaN).
__device__ __forceinline__ int quantize_int8(float x, float scale) { return __float2int_rn(__fmul_rn(x, scale)); }

__device__ __forceinline__ u32 pack4(int a, int b, int c, int d) {
  return (u32)(a & 0xff) | ((u32)(b & 0xff) << 8) | ((u32)(c & 0xff) << 16) | ((u32)(d & 0xff) << 24);
}

// Sum of the four signed byte products of a and b, plus c.
__device__ __forceinline__ int dp4a(u32 a, u32 b, int c) {
  int d;
  asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ float warp_max(float m) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(kFull, m, o));
  return m;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Elements [k, k+8) of one row as floats, 0.0f past K. VEC: the row start and K keep
// every 8-element chunk 16-byte aligned (the launcher checks), so full chunks are vector loads.
template <class Fmt, bool VEC>
__device__ __forceinline__ void load_row8(const typename Fmt::storage* __restrict__ row, int k, int K, float (&v)[8]) {
  if constexpr (VEC) {
    load8<Fmt>(row, k, K, v);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = k + i < K ? Fmt::to_float(row[k + i]) : 0.0f;
  }
}

// The dequantized value of one int32 product, before rounding to the output format;
// `b` is the bias value (0 without one).
__device__ __forceinline__ float dequant_with(int acc, float row_stat, float col_stat, float b) {
  const float v = __fmul_rn(__fmul_rn(__int2float_rn(acc), row_stat), col_stat);
  return __fmaf_rn(v, mm_dequant_scale(), b);
}

template <class BiasFmt, bool HAS_BIAS>
__device__ __forceinline__ float dequant_value(int acc, float row_stat, float col_stat,
                                               const typename BiasFmt::storage* __restrict__ bias, i64 col) {
  return dequant_with(acc, row_stat, col_stat, HAS_BIAS ? BiasFmt::to_float(bias[col]) : 0.0f);
}

// A weight value of an outlier column in the activations' 16-bit format: bitsandbytes
// dequantizes those weight columns and casts them to A's dtype before addmm.
template <class Fmt>
__device__ __forceinline__ typename Fmt::storage outlier_weight_bits(i8 cb, float scb) {
  return Fmt::from_float(__fmul_rn(__fmul_rn((float)cb, scb), dequant_scale()));
}
template <class Fmt>
__device__ __forceinline__ float outlier_weight(i8 cb, float scb) {
  return Fmt::to_float(outlier_weight_bits<Fmt>(cb, scb));
}

// Element e of 16 bytes of Fmt::storage (e < 16 / Fmt::kBytes, known after unrolling), widened.
template <class Fmt>
__device__ __forceinline__ float element_of(const uint4& v, int e) {
  const u32 w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (Fmt::kBytes == 4) {
    return __uint_as_float(w[e]);
  } else {
    return Fmt::to_float((u16)(w[e >> 1] >> (16 * (e & 1))));  // little endian: even element low
  }
}

// Exclusive prefix sum of `v` over a CTA of kThreads threads, and the CTA's total in
// `total`. Every thread must call it (it holds a __syncthreads); `scratch` (shared,
// int[kThreads / 32]) may be reused after the caller's next __syncthreads.
template <int kThreads>
__device__ __forceinline__ int block_exclusive_scan(int v, int* scratch, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    const int s = scratch[w];
    before += w < warp ? s : 0;
    total += s;
  }
  return before + incl - v;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Outlier columns
// ---------------------------------------------------------------------------------------

// int8_outlier_flags<Fmt, VEC>
//   A          Fmt::storage[rows * K]
//   threshold  > 0; a value is an outlier when |a| >= threshold (float32 compare)
//   flags      u8[K], zeroed by the caller; only ever set to 1, so racing writers agree
// grid (ceil(K / 2048), row slabs); thread = 8 consecutive columns over kRowsPerSlab rows
// per slab, consecutive threads on consecutive 16-byte pieces of a row (coalesced).
template <class Fmt, bool VEC>
__global__ void __launch_bounds__(256)
int8_outlier_flags(const typename Fmt::storage* __restrict__ A, float threshold, u8* __restrict__ flags, i64 rows, int K) {
  const int k = (blockIdx.x * 256 + threadIdx.x) * 8;
  if (k >= K) return;
  u32 found = 0;  // bit i: column k + i
  for (i64 r0 = (i64)blockIdx.y * kRowsPerSlab; r0 < rows; r0 += (i64)gridDim.y * kRowsPerSlab) {
    const i64 r1 = r0 + kRowsPerSlab < rows ? r0 + kRowsPerSlab : rows;
    for (i64 r = r0; r < r1; ++r) {
      float v[8];
      load_row8<Fmt, VEC>(A + r * K, k, K, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) found |= (fabsf(v[i]) >= threshold ? 1u : 0u) << i;  // padding 0 never counts
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if ((found >> i) & 1u) flags[k + i] = 1;
}

// int8_compact_flags: one CTA of 1024 threads.
//   flags  u8[K]   ->   idx i32[K] (first *count entries: flagged columns, ascending), count i32[1]
// Thread t owns the contiguous columns [t * per, (t + 1) * per); a block-wide exclusive scan
// of the per-thread counts gives each thread its first output slot.
__global__ void __launch_bounds__(1024)
int8_compact_flags(const u8* __restrict__ flags, int K, int* __restrict__ idx, int* __restrict__ count) {
  __shared__ int warp_base[32];
  const int t = threadIdx.x;
  const int per = (K + 1023) / 1024;
  const int begin = t * per < K ? t * per : K;
  const int end = begin + per < K ? begin + per : K;
  int mine = 0;
  for (int k = begin; k < end; ++k) mine += flags[k] != 0;
  int total;
  int pos = block_exclusive_scan<1024>(mine, warp_base, total);
  for (int k = begin; k < end; ++k)
    if (flags[k]) idx[pos++] = k;
  if (t == 0) *count = total;
}

// ---------------------------------------------------------------------------------------
// Row-wise and column-wise quantization
// ---------------------------------------------------------------------------------------

// int8_row_quant<Fmt, SPARSE, VEC>
//   A          Fmt::storage[rows * K]
//   flags      u8[K] outlier columns (SPARSE), from int8_outlier_flags
//   threshold  SPARSE: values with |a| >= threshold stay out of the row absmax
//   CA         i8[rows * K]: codes; outlier columns are 0
//   SCA        float32[rows]: the row absmax
// 8 warps per CTA, warp = one row; lane handles 8-element chunks lane*8, lane*8 + 256, ...
// Pass 2 re-reads the row: it was just read by the same warp, so it comes from L1/L2 and
// DRAM sees each element once. VEC: K % 8 == 0 and A, CA aligned (16 / 8 bytes).
template <class Fmt, bool SPARSE, bool VEC>
__global__ void __launch_bounds__(256)
int8_row_quant(const typename Fmt::storage* __restrict__ A, const u8* __restrict__ flags, float threshold,
               i8* __restrict__ CA, float* __restrict__ SCA, i64 rows, int K) {
  const int lane = threadIdx.x & 31;
  const i64 row = (i64)blockIdx.x * 8 + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps leave together
  const typename Fmt::storage* a = A + row * K;
  float m = 0.0f;
  for (int k = lane * 8; k < K; k += 256) {
    float v[8];
    load_row8<Fmt, VEC>(a, k, K, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float x = fabsf(v[i]);
      if constexpr (SPARSE) x = x >= threshold ? 0.0f : x;
      m = fmaxf(m, x);  // fmaxf drops NaN
    }
  }
  m = warp_max(m);
  const float scale = int8_scale(m);
  i8* q = CA + row * K;
  for (int k = lane * 8; k < K; k += 256) {
    float v[8];
    load_row8<Fmt, VEC>(a, k, K, v);
    int c[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) c[i] = quantize_int8(v[i], scale);
    if constexpr (SPARSE) {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (k + i < K && flags[k + i]) c[i] = 0;
    }
    if (VEC && k + 8 <= K) {
      *reinterpret_cast<uint2*>(q + k) = make_uint2(pack4(c[0], c[1], c[2], c[3]), pack4(c[4], c[5], c[6], c[7]));
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (k + i < K) q[k + i] = (i8)c[i];
    }
  }
  if (lane == 0) SCA[row] = m;
}

// int8_col_absmax<Fmt, SPARSE>
//   A            Fmt::storage[rows * K]
//   colmax_bits  u32[K], zeroed by the caller: float bits of max |a| per column (outlier
//                values left out). Non-negative floats order like their bit patterns, so an
//                integer atomicMax merges the row slabs, and max is order-independent.
// grid (ceil(K / 256), row slabs); thread = one column over a slab of rows.
template <class Fmt, bool SPARSE>
__global__ void __launch_bounds__(256)
int8_col_absmax(const typename Fmt::storage* __restrict__ A, float threshold, u32* __restrict__ colmax_bits, i64 rows,
                int K) {
  const int k = blockIdx.x * 256 + threadIdx.x;
  if (k >= K) return;
  float m = 0.0f;
  for (i64 r0 = (i64)blockIdx.y * kRowsPerSlab; r0 < rows; r0 += (i64)gridDim.y * kRowsPerSlab) {
    const i64 r1 = r0 + kRowsPerSlab < rows ? r0 + kRowsPerSlab : rows;
    for (i64 r = r0; r < r1; ++r) {
      float x = fabsf(Fmt::to_float(A[r * K + k]));
      if constexpr (SPARSE) x = x >= threshold ? 0.0f : x;
      m = fmaxf(m, x);
    }
  }
  if (m > 0.0f) atomicMax(colmax_bits + k, __float_as_uint(m));
}

// int8_col_quant<Fmt, SPARSE>
//   A            Fmt::storage[rows * K]
//   flags        u8[K] outlier columns (SPARSE): zero in the output
//   colmax_bits  u32[K] from int8_col_absmax
//   CAt          i8[rows * K]: codes scaled per column (same layout as A)
//   SCAt         float32[K]: the column absmax
template <class Fmt, bool SPARSE>
__global__ void __launch_bounds__(256)
int8_col_quant(const typename Fmt::storage* __restrict__ A, const u8* __restrict__ flags,
               const u32* __restrict__ colmax_bits, i8* __restrict__ CAt, float* __restrict__ SCAt, i64 rows, int K) {
  const int k = blockIdx.x * 256 + threadIdx.x;
  if (k >= K) return;
  const float m = __uint_as_float(colmax_bits[k]);
  const float scale = int8_scale(m);
  const bool zero = SPARSE && flags[k] != 0;
  if (blockIdx.y == 0) SCAt[k] = m;
  for (i64 r0 = (i64)blockIdx.y * kRowsPerSlab; r0 < rows; r0 += (i64)gridDim.y * kRowsPerSlab) {
    const i64 r1 = r0 + kRowsPerSlab < rows ? r0 + kRowsPerSlab : rows;
    for (i64 r = r0; r < r1; ++r)
      CAt[r * K + k] = zero ? (i8)0 : (i8)quantize_int8(Fmt::to_float(A[r * K + k]), scale);
  }
}

// int8_vectorwise_dequant
//   CA   i8[rows * K], SCA float32[rows]  ->  out float32[rows * K] = (CA * SCA) * (1/127)
// grid (ceil(K / 256), row slabs); thread = one column over a slab of rows.
__global__ void __launch_bounds__(256)
int8_vectorwise_dequant(const i8* __restrict__ CA, const float* __restrict__ SCA, float* __restrict__ out, i64 rows,
                        int K) {
  const int k = blockIdx.x * 256 + threadIdx.x;
  if (k >= K) return;
  for (i64 r0 = (i64)blockIdx.y * kRowsPerSlab; r0 < rows; r0 += (i64)gridDim.y * kRowsPerSlab) {
    const i64 r1 = r0 + kRowsPerSlab < rows ? r0 + kRowsPerSlab : rows;
    for (i64 r = r0; r < r1; ++r) out[r * K + k] = __fmul_rn(__fmul_rn((float)CA[r * K + k], SCA[r]), dequant_scale());
  }
}

// ---------------------------------------------------------------------------------------
// int32 -> float dequantization (the epilogue of an unfused product)
// ---------------------------------------------------------------------------------------

// int8_outlier_weights<Fmt>
//   CB, SCB    i8[N * K], float32[N]: the int8 weight and its row absmax
//   flags      u8[K], 0 / 1 (int8_row_quant_wide), 16-byte aligned, K % 16 == 0
//   A, CA      Fmt::storage[M * K] activations and i8[M * K] their codes: the outlier
//              columns of CA are zeroed here, so the int32 product of CA is the
//              reference's and needs no correction
//   idx, count written by CTA 0: the flagged columns in ascending order (i32[K]) and how
//              many there are (i32[1]), for int8_mm_dequant_outliers
//   Wout       Fmt::storage[kOutlierCache * N]: the 16-bit weights (outlier_weight_bits) of
//              the first min(count, kOutlierCache) columns in groups of B = 16 / Fmt::kBytes
//              columns, [((j / B) * N + n) * B + j % B]: one 16-byte load holds B columns
//              of a weight row, consecutive rows contiguous (zeros past the cached columns)
//   Aout       Fmt::storage[kOutlierCache * Mp], Mp = M rounded up to kDequantRows:
//              [j * Mp + m] = A[m, j-th outlier column], 0 for m in [M, Mp): a column's
//              kDequantRows slab rows are whole 16-byte loads
// grid >= ceil(N / 256). Every CTA lists the flagged columns itself (K bytes from L2 and a
// block scan: no compaction launch and no zeroed counter). Then the (cached column, row)
// pairs are spread over all threads of the grid, rows fastest: each copies A to Aout
// (coalesced) and zeroes CA (the listing thread zeroing every row of its columns, serially,
// took 15.9 us at 4096 x 4096, M = 4096 on an H100). Last, thread = one weight row n over
// the cached columns, B at a time. Run once a call, so int8_mm_dequant_outliers' row slabs read
// coalesced Wout words and uniform (L1-broadcast) Aout words instead of gathering weight
// bytes (a 32-byte DRAM sector each) and activations per slab and column.
constexpr int kOutlierCache = 32;
constexpr int kDequantRows = 8;  // the dequantization kernels' rows a slab, and the padding of Aout's rows

template <class Fmt>
__global__ void __launch_bounds__(256)
int8_outlier_weights(const i8* __restrict__ CB, const float* __restrict__ SCB, const u8* __restrict__ flags, int K,
                     const typename Fmt::storage* __restrict__ A, i8* __restrict__ CA, int M, int* __restrict__ idx,
                     int* __restrict__ count, typename Fmt::storage* __restrict__ Wout,
                     typename Fmt::storage* __restrict__ Aout, int N) {
  using St = typename Fmt::storage;
  constexpr int kB = 16 / Fmt::kBytes;  // columns a 16-byte Wout load holds
  static_assert(kOutlierCache % kB == 0, "Wout groups tile the cache");
  __shared__ int cols[kOutlierCache];
  __shared__ int scan[8];
  // Thread t owns the contiguous 16-column chunks [c0, c1), so ranks follow column order.
  // Flags are 0 or 1 bytes: a word's popcount is its number of flagged columns.
  const uint4* f = reinterpret_cast<const uint4*>(flags);
  const int chunks = K >> 4, per = (chunks + 255) >> 8;
  const int c0 = min((int)threadIdx.x * per, chunks), c1 = min(c0 + per, chunks);
  int mine = 0;
  for (int c = c0; c < c1; ++c) {
    const uint4 v = f[c];
    mine += __popc(v.x) + __popc(v.y) + __popc(v.z) + __popc(v.w);
  }
  int outliers;
  int r = block_exclusive_scan<256>(mine, scan, outliers);
  for (int c = c0; c < c1 && mine > 0; ++c) {
    const uint4 v = f[c];
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i)
      for (u32 bits = w[i]; bits; bits &= bits - 1, ++r) {
        const int col = c * 16 + i * 4 + ((__ffs((int)bits) - 1) >> 3);
        if (blockIdx.x == 0) idx[r] = col;
        if (r < kOutlierCache) {
          cols[r] = col;
        } else {  // past the cache (rare): this CTA's rows, serially
          for (int m = blockIdx.x; m < M; m += gridDim.x) CA[(i64)m * K + col] = 0;
        }
      }
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *count = outliers;
  __syncthreads();

  const int cached = outliers < kOutlierCache ? outliers : kOutlierCache;
  const int Mp = (M + kDequantRows - 1) / kDequantRows * kDequantRows;
  for (i64 e = (i64)blockIdx.x * 256 + threadIdx.x; e < (i64)cached * Mp; e += (i64)gridDim.x * 256) {
    const int j = (int)(e / Mp), m = (int)(e - (i64)j * Mp);
    St v = 0;  // +0.0 in every format
    if (m < M) {
      const i64 at = (i64)m * K + cols[j];
      v = A[at];
      CA[at] = 0;
    }
    Aout[e] = v;
  }
  const int n = blockIdx.x * 256 + threadIdx.x;
  if (n >= N) return;
  const float scb = SCB[n];
  for (int j0 = 0; j0 < cached; j0 += kB) {
    i8 w[kB];
#pragma unroll
    for (int q = 0; q < kB; ++q) w[q] = j0 + q < cached ? CB[(i64)n * K + cols[j0 + q]] : (i8)0;
    u32 word[4];
    if constexpr (Fmt::kBytes == 4) {
#pragma unroll
      for (int q = 0; q < 4; ++q) word[q] = __float_as_uint(j0 + q < cached ? outlier_weight_bits<Fmt>(w[q], scb) : 0.0f);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const u32 lo = j0 + 2 * q < cached ? outlier_weight_bits<Fmt>(w[2 * q], scb) : 0u;
        const u32 hi = j0 + 2 * q + 1 < cached ? outlier_weight_bits<Fmt>(w[2 * q + 1], scb) : 0u;
        word[q] = lo | (hi << 16);
      }
    }
    *reinterpret_cast<uint4*>(Wout + ((i64)(j0 / kB) * N + n) * kB) = make_uint4(word[0], word[1], word[2], word[3]);
  }
}

// int8_mm_dequant<OutFmt, BiasFmt, HAS_BIAS>
//   acc        int32[rows * N]
//   SCA        float32[rows], SCB float32[N]
//   bias       BiasFmt::storage[N] (HAS_BIAS)
//   out        OutFmt::storage[rows * N]
// grid (ceil(N / 256), row slabs); thread = one output column over kDequantRows rows a slab
// (consecutive threads on consecutive columns: coalesced), slabs grid-strided. Eight rows
// keep a thread at 32 registers, so a memory-bound SM holds many threads.
template <class OutFmt, class BiasFmt, bool HAS_BIAS>
__global__ void __launch_bounds__(256)
int8_mm_dequant(const int* __restrict__ acc, const float* __restrict__ SCA, const float* __restrict__ SCB,
                const typename BiasFmt::storage* __restrict__ bias, typename OutFmt::storage* __restrict__ out, i64 rows,
                int N) {
  const int n = blockIdx.x * 256 + threadIdx.x;
  if (n >= N) return;
  const float scb = SCB[n];
  for (i64 r0 = (i64)blockIdx.y * kDequantRows; r0 < rows; r0 += (i64)gridDim.y * kDequantRows) {
    const int nr = (int)(r0 + kDequantRows < rows ? kDequantRows : rows - r0);
    int a[kDequantRows];
#pragma unroll
    for (int i = 0; i < kDequantRows; ++i) a[i] = i < nr ? acc[(r0 + i) * N + n] : 0;
#pragma unroll
    for (int i = 0; i < kDequantRows; ++i)
      if (i < nr) out[(r0 + i) * N + n] = OutFmt::from_float(dequant_value<BiasFmt, HAS_BIAS>(a[i], SCA[r0 + i], scb, bias, n));
  }
}

// CPT consecutive elements of T as one aligned access (8 or 16 bytes: one vector load or store).
template <class T, int CPT>
struct alignas(sizeof(T) * CPT) Pack {
  T v[CPT];
};

// The byte of 16 int8 codes `v` at index e (e < 16), sign-extended. Selects, not an indexed
// array: e is not always known at compile time, and an array would go to local memory.
__device__ __forceinline__ int code_of(const uint4& v, int e) {
  const int q = e >> 2;
  const u32 w = q == 0 ? v.x : (q == 1 ? v.y : (q == 2 ? v.z : v.w));
  return (int)(i8)(w >> (8 * (e & 3)));
}

// int8_mm_dequant_outliers<OutFmt, BiasFmt, HAS_BIAS, CPT, SUBTRACT>: int8_mm_dequant plus
// the outlier columns' 16-bit products (the cuBLAS path with outlier columns)
//   acc, SCA, SCB, bias, out, rows, N   as int8_mm_dequant
//   A, CB, idx, count, K   activations (OutFmt::storage[rows * K]), the int8 weight (N x K)
//              and the outlier columns (int8_outlier_weights, or int8_outlier_gather)
//   Wout, Aout the first kOutlierCache columns' 16-bit weights and activations
//              (int8_outlier_weights' layouts); columns past them (rare) are read from CB
//              and A (same values, same order)
//   SUBTRACT   false: acc was computed with the outlier columns zeroed in CA
//              (int8_outlier_weights). true: acc still holds their int8 products, which are
//              taken back out exactly (int32) before the dequantization, from the cached
//              columns' codes CAout (i8 [j * Mp + m]) and weight codes Wq (i8 [((j / 16) * N
//              + n) * 16 + j % 16], int8_outlier_gather), and past the cache from CA and CB
// thread = CPT consecutive columns n0 .. n0 + CPT - 1 over kDequantRows rows a slab; CTA =
// 256 * CPT columns. CPT > 1 needs N % CPT == 0, acc aligned to 4 * CPT bytes and out to
// OutFmt::kBytes * CPT (the launcher checks): a row's products are one vector load and its
// outputs one vector store.
// A slab's activations of the cached columns (kDequantRows x up to kOutlierCache) are
// widened to float once a CTA into shared memory, while the products' loads are in flight;
// each column is then two LDS.128 broadcasts a thread, shared by its CPT columns. The first
// batch of weights (B = 16 / OutFmt::kBytes columns, one 16-byte load a column n) is
// loaded with the products. H100, 4096 x 4096, M = 4096: 39.7 us at CPT = 4, 40.9 at 2,
// 58.0 at 1, against 66.7 for one column a thread widening its own activations and 36.1
// for int8_mm_dequant (benchmarks/NOTES_int8.md, round 7).
// SUBTRACT keeps the products live through the column loop: fewer CTAs an SM for its registers.
template <class OutFmt, class BiasFmt, bool HAS_BIAS, int CPT, bool SUBTRACT>
__global__ void __launch_bounds__(256, CPT == 4 ? 2 : (CPT == 2 ? (SUBTRACT ? 2 : 3) : 4))
int8_mm_dequant_outliers(const int* __restrict__ acc, const float* __restrict__ SCA, const float* __restrict__ SCB,
                         const typename BiasFmt::storage* __restrict__ bias,
                         const typename OutFmt::storage* __restrict__ A, const i8* __restrict__ CB,
                         const int* __restrict__ idx, const int* __restrict__ count, int K,
                         const typename OutFmt::storage* __restrict__ Wout,
                         const typename OutFmt::storage* __restrict__ Aout, const i8* __restrict__ CA,
                         const i8* __restrict__ Wq, const i8* __restrict__ CAout,
                         typename OutFmt::storage* __restrict__ out, i64 rows, int N) {
  using St = typename OutFmt::storage;
  constexpr int kB = 16 / OutFmt::kBytes;  // cached columns a 16-byte Wout load holds
  static_assert(kDequantRows == 8, "a column's slab activations are two float4");
  static_assert(kOutlierCache % 16 == 0 && 16 % kB == 0, "Wq and Wout groups tile the cache");
  __shared__ float4 a_s[kOutlierCache][2];  // [j][half]: rows 4 * half .. 4 * half + 3 of cached column j
  __shared__ int4 ca_s[SUBTRACT ? kOutlierCache : 1][2];  // their codes, the same way
  const int n0 = (blockIdx.x * 256 + threadIdx.x) * CPT;
  const bool live = n0 < N;  // all CPT columns (N % CPT == 0); dead threads still fill a_s
  float scb[CPT];
#pragma unroll
  for (int c = 0; c < CPT; ++c) scb[c] = live ? SCB[n0 + c] : 0.0f;
  const int outliers = *count;
  const int cached = outliers < kOutlierCache ? outliers : kOutlierCache;
  const i64 Mp = (rows + kDequantRows - 1) / kDequantRows * kDequantRows;  // Aout's row stride
  for (i64 r0 = (i64)blockIdx.y * kDequantRows; r0 < rows; r0 += (i64)gridDim.y * kDequantRows) {
    const int nr = (int)(r0 + kDequantRows < rows ? kDequantRows : rows - r0);
    // The products and the first batch of weights first: their round trip covers the rest.
    Pack<int, CPT> a[kDequantRows];
#pragma unroll
    for (int i = 0; i < kDequantRows; ++i) {
      if (live && i < nr) {
        a[i] = *reinterpret_cast<const Pack<int, CPT>*>(acc + (r0 + i) * N + n0);
      } else {
#pragma unroll
        for (int c = 0; c < CPT; ++c) a[i].v[c] = 0;
      }
    }
    uint4 wv[CPT];
    auto fetch_weights = [&](int j0) {  // cached columns j0 .. j0 + kB - 1 of this thread's rows
#pragma unroll
      for (int c = 0; c < CPT; ++c)
        wv[c] = live && j0 < cached ? *reinterpret_cast<const uint4*>(Wout + ((i64)(j0 / kB) * N + n0 + c) * kB)
                                    : make_uint4(0u, 0u, 0u, 0u);
    };
    uint4 qv[SUBTRACT ? CPT : 1];
    auto fetch_codes = [&](int j0) {  // SUBTRACT: weight codes of cached columns j0 .. j0 + 15
#pragma unroll
      for (int c = 0; c < (SUBTRACT ? CPT : 0); ++c)
        qv[c] = live && j0 < cached ? *reinterpret_cast<const uint4*>(Wq + ((i64)(j0 / 16) * N + n0 + c) * 16)
                                    : make_uint4(0u, 0u, 0u, 0u);
    };
    fetch_weights(0);
    fetch_codes(0);
    if (r0 != (i64)blockIdx.y * kDequantRows) __syncthreads();  // the last slab's a_s reads are done
    for (int e = threadIdx.x; e < cached * kDequantRows; e += 256) {
      const int j = e / kDequantRows, i = e % kDequantRows;  // Aout rows past `rows` are zeros
      reinterpret_cast<float*>(a_s[j])[i] = OutFmt::to_float(Aout[j * Mp + r0 + i]);
      if constexpr (SUBTRACT) reinterpret_cast<int*>(ca_s[j])[i] = CAout[j * Mp + r0 + i];
    }
    __syncthreads();

    float o[kDequantRows][CPT];
    auto dequantize = [&]() {
#pragma unroll
      for (int i = 0; i < kDequantRows; ++i) {
        const float sca = i < nr ? SCA[r0 + i] : 0.0f;
#pragma unroll
        for (int c = 0; c < CPT; ++c)
          o[i][c] = OutFmt::to_float(OutFmt::from_float(
              dequant_value<BiasFmt, HAS_BIAS>(a[i].v[c], sca, scb[c], bias, live ? n0 + c : 0)));
      }
    };
    if constexpr (!SUBTRACT) dequantize();  // the products' registers free early
    float s[kDequantRows][CPT];
#pragma unroll
    for (int i = 0; i < kDequantRows; ++i)
#pragma unroll
      for (int c = 0; c < CPT; ++c) s[i][c] = 0.0f;
    if (outliers > 0) {  // uniform across the CTA
      for (int j0 = 0; j0 < cached; j0 += kB) {
        if (j0 > 0) fetch_weights(j0);  // more than one batch of columns (rare)
        if (j0 > 0 && j0 % 16 == 0) fetch_codes(j0);
#pragma unroll
        for (int q = 0; q < kB; ++q)
          if (j0 + q < cached) {
            const float4 lo = a_s[j0 + q][0], hi = a_s[j0 + q][1];
            const float x[kDequantRows] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
            for (int c = 0; c < CPT; ++c) {
              const float w = element_of<OutFmt>(wv[c], q);
#pragma unroll
              for (int i = 0; i < kDequantRows; ++i) s[i][c] = __fadd_rn(s[i][c], __fmul_rn(x[i], w));
            }
            if constexpr (SUBTRACT) {
              const int4 clo = ca_s[j0 + q][0], chi = ca_s[j0 + q][1];
              const int ca[kDequantRows] = {clo.x, clo.y, clo.z, clo.w, chi.x, chi.y, chi.z, chi.w};
#pragma unroll
              for (int c = 0; c < CPT; ++c) {
                const int wb = code_of(qv[c], (j0 + q) % 16);
#pragma unroll
                for (int i = 0; i < kDequantRows; ++i) a[i].v[c] -= ca[i] * wb;
              }
            }
          }
      }
      for (int j = cached; j < outliers; ++j) {  // past the cache (rare): from CB, A (and CA)
        const int col = idx[j];
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
          const int wb = live ? (int)CB[(i64)(n0 + c) * K + col] : 0;
          const float w = outlier_weight<OutFmt>((i8)wb, scb[c]);
#pragma unroll
          for (int i = 0; i < kDequantRows; ++i)
            if (i < nr) {
              s[i][c] = __fadd_rn(s[i][c], __fmul_rn(OutFmt::to_float(A[(r0 + i) * K + col]), w));
              if constexpr (SUBTRACT) a[i].v[c] -= (int)CA[(r0 + i) * K + col] * wb;
            }
        }
      }
    }
    if constexpr (SUBTRACT) dequantize();
    if (outliers > 0) {
#pragma unroll
      for (int i = 0; i < kDequantRows; ++i)
#pragma unroll
        for (int c = 0; c < CPT; ++c) o[i][c] = __fadd_rn(o[i][c], s[i][c]);  // only then: -0 + 0 would be +0
    }
    if (live) {
#pragma unroll
      for (int i = 0; i < kDequantRows; ++i)
        if (i < nr) {
          Pack<St, CPT> v;
#pragma unroll
          for (int c = 0; c < CPT; ++c) v.v[c] = OutFmt::from_float(o[i][c]);
          *reinterpret_cast<Pack<St, CPT>*>(out + (r0 + i) * N + n0) = v;
        }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core int8 GEMM: C[M, N] = CA[M, K] @ CB[N, K]^T
// ---------------------------------------------------------------------------------------
//
// CTA tile 128 (M) x 128 (N) x 64 (K bytes), 8 warps as 2 (M) x 4 (N), warp tile 64 x 32 =
// 4 x 4 mma.m16n8k32 (int32 accumulators: 64 registers a thread). Operands are K-major
// (both matrices row-major with K contiguous), which is the "row.col" mma form directly.
//
// Shared memory: kStages stages of [A tile 128 x 64 B | B tile 128 x 64 B], 64 KB in all
// (dynamic). A 64-byte row holds four 16-byte chunks; chunk c of row r is stored at chunk
// c ^ ((r >> 1) & 3). ldmatrix reads 8 rows at one logical chunk: rows r and r + 2 would
// otherwise share banks (64-byte pitch); with the XOR the 8 rows hit 8 distinct 16-byte
// bank groups, conflict-free. cp.async writes of a warp cover 8 whole rows, also conflict-free.
//
// Fragments: ldmatrix.x4 of 8x8 b16 matrices is byte-for-byte the s8 m16n8k32 layout
// (a 32-bit word = 4 int8 along K). A: lanes 0-15 address rows 0-15 at chunk 2ks, lanes
// 16-31 rows 0-15 at chunk 2ks+1 -> a0..a3. B (rows = n): lanes 0-7 rows 0-7 chunk 2ks,
// 8-15 rows 0-7 chunk 2ks+1, 16-23 rows 8-15 chunk 2ks, 24-31 rows 8-15 chunk 2ks+1 ->
// b0, b1 of two n8 tiles. Accumulator c0, c1: row g, columns 2t, 2t+1; c2, c3: row g + 8
// (g = lane / 4, t = lane % 4).
//
// Requirements (the launcher pads or copies otherwise): K % 16 == 0, CA and CB 16-byte
// aligned. Rows past M or N and chunks past K are zero-filled by cp.async (src-size 0).
// The grid's x walks M tiles first, so CTAs running together share weight tiles in L2.

namespace {

constexpr int kBM = 128, kBN = 128, kBK = 64, kStages = 4, kGemmThreads = 256;
constexpr int kStageBytes = (kBM + kBN) * kBK;

__device__ __forceinline__ u32 shared_address(const void* p) {
  u32 r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void mma_s8(int (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Byte offset of logical 16-byte chunk `chunk` of tile row `row` (64-byte rows, XOR swizzle).
__device__ __forceinline__ u32 swizzle(int row, int chunk) { return row * kBK + ((chunk ^ ((row >> 1) & 3)) << 4); }

// One 128 x 64-byte tile of a K-major int8 matrix with `rows` rows into shared memory.
__device__ __forceinline__ void load_tile(u32 dst, const i8* __restrict__ src, int rows, int K, int row0, int k0) {
#pragma unroll
  for (int i = 0; i < (kBM * kBK / 16) / kGemmThreads; ++i) {
    const int id = threadIdx.x + i * kGemmThreads;
    const int row = id >> 2, chunk = id & 3;
    const int gr = row0 + row, gk = k0 + chunk * 16;
    const bool ok = gr < rows && gk < K;
    cp_async16(dst + swizzle(row, chunk), ok ? src + (i64)gr * K + gk : src, ok ? 16 : 0);
  }
}

}  // namespace

// int8_gemm<OutFmt, EPI, BiasFmt, HAS_BIAS, SPARSE>
//   CA       i8[M * K], CB i8[N * K] (16-byte aligned, K % 16 == 0)
//   EPI = 0: out_i32 int32[M * N] = CA @ CB^T
//   EPI = 1: out OutFmt::storage[M * N] = dequant (SCA float32[M], SCB float32[N], bias
//            BiasFmt::storage[N] when HAS_BIAS), plus with SPARSE the outlier columns idx[0..*count)
//            of A (OutFmt::storage[M * K], the unquantized activations); their codes in CA
//            may be zero or as quantized (their int8 products are subtracted either way)
// dynamic shared memory: kStages * kStageBytes; block 256; grid (ceil(M / 128), ceil(N / 128)).
template <class OutFmt, int EPI, class BiasFmt, bool HAS_BIAS, bool SPARSE>
__global__ void __launch_bounds__(kGemmThreads)
int8_gemm(const i8* __restrict__ CA, const i8* __restrict__ CB, int M, int N, int K, int* __restrict__ out_i32,
          const float* __restrict__ SCA, const float* __restrict__ SCB, const typename BiasFmt::storage* __restrict__ bias,
          const typename OutFmt::storage* __restrict__ A, const int* __restrict__ idx, const int* __restrict__ count,
          typename OutFmt::storage* __restrict__ out) {
  extern __shared__ __align__(128) u8 smem[];
  const u32 base = shared_address(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;

  int acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  const int ktiles = (K + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) {
      load_tile(base + s * kStageBytes, CA, M, K, m0, s * kBK);
      load_tile(base + s * kStageBytes + kBM * kBK, CB, N, K, n0, s * kBK);
    }
    cp_async_commit();  // empty groups keep the group count uniform
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();  // this thread's copies of tile kt have landed
    __syncthreads();               // ... everyone's have, and stage (kt - 1) % kStages is free
    const int next = kt + kStages - 1;
    if (next < ktiles) {
      const u32 stage = base + (next % kStages) * kStageBytes;
      load_tile(stage, CA, M, K, m0, next * kBK);
      load_tile(stage + kBM * kBK, CB, N, K, n0, next * kBK);
    }
    cp_async_commit();

    const u32 sa = base + (kt % kStages) * kStageBytes;
    const u32 sb = sa + kBM * kBK;
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {
      u32 a[4][4], b[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = wm * 64 + i * 16 + (lane & 15);
        ldmatrix_x4(a[i], sa + swizzle(row, ks * 2 + (lane >> 4)));
      }
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const int row = wn * 32 + jj * 16 + (lane & 7) + ((lane >> 4) << 3);
        u32 r[4];
        ldmatrix_x4(r, sb + swizzle(row, ks * 2 + ((lane >> 3) & 1)));
        b[2 * jj][0] = r[0];
        b[2 * jj][1] = r[1];
        b[2 * jj + 1][0] = r[2];
        b[2 * jj + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_s8(acc[i][j], a[i], b[j][0], b[j][1]);
    }
  }
  cp_async_wait<0>();

  const int g = lane >> 2, t = lane & 3;
  if constexpr (EPI == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = m0 + wm * 64 + i * 16 + g + (r >> 1) * 8;
          const int col = n0 + wn * 32 + j * 8 + t * 2 + (r & 1);
          if (row < M && col < N) out_i32[(i64)row * N + col] = acc[i][j][r];
        }
  } else {
    // SPARSE: each outlier column's int8 product (CA[row, c] * CB[col, c]: 0 where the row
    // quantization zeroed the column, the code as computed where int8_row_quant_wide left
    // it) comes back out of the exact int32 sums, and its 16-bit product is summed apart.
    float s[4][4][4];
    int outliers = 0;
    if constexpr (SPARSE) {
      outliers = *count;
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) s[i][j][r] = 0.0f;
      for (int q = 0; q < outliers; ++q) {
        const int c = idx[q];
        float av[4][2], wv[4][2];
        int cav[4][2], cbv[4][2];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = m0 + wm * 64 + i * 16 + g + h * 8;
            av[i][h] = row < M ? OutFmt::to_float(A[(i64)row * K + c]) : 0.0f;
            cav[i][h] = row < M ? (int)CA[(i64)row * K + c] : 0;
          }
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int col = n0 + wn * 32 + j * 8 + t * 2 + h;
            const i8 b = col < N ? CB[(i64)col * K + c] : (i8)0;
            cbv[j][h] = b;
            wv[j][h] = col < N ? outlier_weight<OutFmt>(b, SCB[col]) : 0.0f;
          }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              acc[i][j][r] -= cav[i][r >> 1] * cbv[j][r & 1];
              s[i][j][r] = __fadd_rn(s[i][j][r], __fmul_rn(av[i][r >> 1], wv[j][r & 1]));
            }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = m0 + wm * 64 + i * 16 + g + (r >> 1) * 8;
          const int col = n0 + wn * 32 + j * 8 + t * 2 + (r & 1);
          if (row < M && col < N) {
            float o = OutFmt::to_float(
                OutFmt::from_float(dequant_value<BiasFmt, HAS_BIAS>(acc[i][j][r], SCA[row], SCB[col], bias, col)));
            if (SPARSE && outliers > 0) o = __fadd_rn(o, s[i][j][r]);  // only then: -0 + 0 would be +0
            out[(i64)row * N + col] = OutFmt::from_float(o);
          }
        }
  }
}

// ---------------------------------------------------------------------------------------
// Small-M linear (decode): quantize A in every CTA, stream the int8 weight once
// ---------------------------------------------------------------------------------------

// One batch of a warp's weight stream: chunks c0, c0 + 32, ... (kGemvUnroll of them) of row n,
// zeros past the row or past N. Weights are read exactly once: keep them out of L1.
constexpr int kGemvUnroll = 4;
// Outlier columns the gemv's epilogue takes from a list made once per CTA, one per lane
// (more than this, rare, take the per-word walk).
constexpr int kGemvOutliers = 32;

__device__ __forceinline__ void load_weight_batch(const i8* __restrict__ CB, int n, int N, int K, int c0,
                                                  uint4 (&w)[kGemvUnroll]) {
  const int chunks = K >> 4;
  const uint4* row = reinterpret_cast<const uint4*>(CB + (i64)n * K);
#pragma unroll
  for (int u = 0; u < kGemvUnroll; ++u) {
    const int c = c0 + u * 32;
    if (n < N && c < chunks) {
      asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
          : "=r"(w[u].x), "=r"(w[u].y), "=r"(w[u].z), "=r"(w[u].w)
          : "l"(row + c));
    } else {
      w[u] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// Dynamic shared memory of int8_linear_gemv: codes, outlier bitmap, bitmap summary.
__host__ __device__ constexpr int gemv_words(int K) { return (K + 31) / 32; }

// int8_linear_gemv<Fmt, BiasFmt, HAS_BIAS, SPARSE, MT>
//   A          Fmt::storage[M * K], M <= MT <= 8 activation rows, 16-byte aligned
//   CB         i8[N * K], K % 16 == 0, 16-byte aligned (rows are read as uint4)
//   SCB        float32[N]; bias BiasFmt::storage[N] (HAS_BIAS)
//   threshold  SPARSE: outlier columns are those holding |a| >= threshold
//   out        Fmt::storage[M * N]
// dynamic smem: CA_s i8[MT * K] | bitmap u32[ceil(K/32)] | summary u32[ceil(K/1024)]
// block 256 (8 warps); grid = min(ceil(N / 8), a few CTAs per SM), rows n grid-strided.
//
// Prologue (whole CTA): thread t walks the 8-column chunks 8t, 8t + 2048, ... (one 16-byte
// load a row and chunk, A 16-byte aligned): the row absmax of each of the M rows (outliers
// left out) and, SPARSE, the chunk's outlier bits, four lanes' of which make a bitmap word.
// A summary word has bit w set when bitmap word w is not zero. SPARSE: a block scan of the
// bitmap words' popcounts ranks the outlier columns in ascending order, and every thread
// lists its own (the first kGemvOutliers) with their activations: no serial listing for
// the other warps to wait on at the barrier (H200, 4096 x 4096: threshold 6 at M = 2 took
// 12.0 us under the profiler with warp 0 listing alone, against 9.7 at threshold 0, most
// of the difference barrier stalls). Then A is quantized into CA_s (outlier columns 0).
// Every CTA repeats this: A is M * K elements (tiny next to the weight) and it saves a
// launch and a round trip through memory.
//
// Main loop (warp = one weight row n): lane reads 16-byte chunks lane, lane + 32, ... of
// row n, the matching 16 codes of each activation row from shared memory, and accumulates
// with dp4a. The weight stream is software-pipelined: while one batch of 4 chunks is
// multiplied the next is in flight (the next row's first batch at a row's end), and the
// very first batch is issued before the prologue, so DRAM latency hides behind it.
// (Prefetching the second batch into L2 as well measured slower on an H100, per lane or
// as one bulk request a warp: benchmarks/NOTES_int8.md.) Then a butterfly sum; the outlier
// columns' 16-bit products are summed in ascending column order (lane j: the listed column
// j, whose weight byte it loads when the row starts; past the list, one word of the bitmap
// at a time, one lane a column) through shuffles, so the result matches the NumPy spec bit
// for bit; lane m writes out[m, n].
// MT = 4 / 8 run at most 2 CTAs an SM (the launcher's grid cap): 128 registers, no spill.
template <class Fmt, class BiasFmt, bool HAS_BIAS, bool SPARSE, int MT>
__global__ void __launch_bounds__(256, MT >= 4 ? 2 : 0)
int8_linear_gemv(const typename Fmt::storage* __restrict__ A, const i8* __restrict__ CB, const float* __restrict__ SCB,
                 const typename BiasFmt::storage* __restrict__ bias, float threshold, int M, int N, int K,
                 typename Fmt::storage* __restrict__ out) {
  constexpr int kThreads = 256, kWarps = 8;
  extern __shared__ __align__(16) u8 gemv_smem[];
  i8* ca = reinterpret_cast<i8*>(gemv_smem);
  u32* bitmap = reinterpret_cast<u32*>(gemv_smem + MT * K);
  const int words = gemv_words(K);
  u32* summary = bitmap + words;
  const int summaries = (words + 31) / 32;
  __shared__ float red[kWarps][MT];
  __shared__ float row_absmax[MT], row_scale[MT];
  __shared__ int ocols[SPARSE ? kGemvOutliers : 1];     // the first outlier columns, ascending
  __shared__ float oa[MT][SPARSE ? kGemvOutliers : 1];  // A[m, ocols[j]]
  __shared__ int scan[kWarps];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int row_stride = gridDim.x * kWarps;
  int n = blockIdx.x * kWarps + warp;
  uint4 wbuf[kGemvUnroll];
  load_weight_batch(CB, n, N, K, lane, wbuf);  // in flight during the prologue

  // ---- prologue: absmax per row, outlier bitmap
  float amax[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) amax[m] = 0.0f;
  for (int k0 = 0; k0 < K; k0 += 8 * kThreads) {  // uniform trip count: the shuffles see whole warps
    const int k = k0 + 8 * tid;
    u32 bits = 0;  // bit i: column k + i holds an outlier in some row
    if (k < K) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < M) {
          float v[8];
          load_row8<Fmt, true>(A + (i64)m * K, k, K, v);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            float x = fabsf(v[i]);
            if constexpr (SPARSE) {
              if (x >= threshold) {
                bits |= 1u << i;
                x = 0.0f;
              }
            }
            amax[m] = fmaxf(amax[m], x);  // fmaxf drops NaN
          }
        }
      }
    }
    if constexpr (SPARSE) {
      // Lanes 4q .. 4q + 3 hold the 32 columns of one bitmap word, the lowest in lane 4q.
      u32 word = bits << (8 * (lane & 3));
      word |= __shfl_xor_sync(kFull, word, 1);
      word |= __shfl_xor_sync(kFull, word, 2);
      if ((lane & 3) == 0 && k < K) bitmap[k >> 5] = word;
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float wmax = warp_max(amax[m]);
    if (lane == 0) red[warp][m] = wmax;
  }
  __syncthreads();  // red and bitmap complete
  if (tid < MT) {
    float rmax = red[0][tid];
#pragma unroll
    for (int i = 1; i < kWarps; ++i) rmax = fmaxf(rmax, red[i][tid]);
    row_absmax[tid] = rmax;
    row_scale[tid] = int8_scale(rmax);
  }
  int outliers = 0;  // SPARSE: all outlier columns
  if constexpr (SPARSE) {
    for (int w0 = 0; w0 < words; w0 += kThreads) {
      const int wi = w0 + tid;
      const u32 s = __ballot_sync(kFull, wi < words && bitmap[wi] != 0);
      if (lane == 0 && w0 + warp * 32 < words) summary[(w0 + warp * 32) >> 5] = s;
    }
    // ---- rank the outlier columns (a block scan over each thread's contiguous bitmap
    // words, so ranks follow column order) and list the first kGemvOutliers with their
    // activations, all threads at once (the scan's barrier also publishes row_scale)
    const int per = (words + kThreads - 1) / kThreads;
    const int w0 = min(tid * per, words), w1 = min(w0 + per, words);
    int mine = 0;
    for (int w = w0; w < w1; ++w) mine += __popc(bitmap[w]);
    int r = block_exclusive_scan<kThreads>(mine, scan, outliers);
    for (int w = w0; w < w1 && r < kGemvOutliers; ++w)
      for (u32 bits = bitmap[w]; bits && r < kGemvOutliers; bits &= bits - 1, ++r) {
        const int c = w * 32 + __ffs((int)bits) - 1;
        ocols[r] = c;
#pragma unroll
        for (int m = 0; m < MT; ++m) oa[m][r] = m < M ? Fmt::to_float(A[(i64)m * K + c]) : 0.0f;
      }
  } else {
    __syncthreads();  // publishes row_scale
  }

  // ---- quantize A into shared memory (the rows re-read from L1), 8 codes a store
  for (int k = 8 * tid; k < K; k += 8 * kThreads) {
    const u32 zero = SPARSE ? (bitmap[k >> 5] >> (k & 31)) & 0xffu : 0u;  // outlier columns: code 0
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      int q[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (m < M) {
        float v[8];
        load_row8<Fmt, true>(A + (i64)m * K, k, K, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) q[i] = (zero >> i) & 1u ? 0 : quantize_int8(v[i], row_scale[m]);
      }
      *reinterpret_cast<uint2*>(ca + m * K + k) = make_uint2(pack4(q[0], q[1], q[2], q[3]), pack4(q[4], q[5], q[6], q[7]));
    }
  }
  __syncthreads();  // codes, ocols and oa complete

  const bool listed = outliers <= kGemvOutliers;                          // else the per-word walk
  const bool mine = SPARSE && outliers > 0 && listed && lane < outliers;  // lane holds column `oc`
  const int oc = mine ? ocols[lane] : 0;

  // ---- main loop: one weight row per warp
  const int chunks = K >> 4;
  for (; n < N; n += row_stride) {
    const int ow = mine ? CB[(i64)n * K + oc] : 0;  // loaded now, needed at the row's end
    int acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0;
    // Lanes differ by at most one iteration; each lane's last one prefetches its part of
    // the next row's first batch, which is what it needs at the top of that row.
    for (int c0 = lane; c0 < chunks; c0 += 32 * kGemvUnroll) {
      uint4 cur[kGemvUnroll];
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) cur[u] = wbuf[u];
      const int next = c0 + 32 * kGemvUnroll;
      if (next < chunks) {
        load_weight_batch(CB, n, N, K, next, wbuf);
      } else {
        load_weight_batch(CB, n + row_stride, N, K, lane, wbuf);
      }
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) {
        const int c = c0 + u * 32;
        if (c < chunks) {
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const uint4 a = *reinterpret_cast<const uint4*>(ca + m * K + c * 16);
            acc[m] = dp4a(cur[u].x, a.x, acc[m]);
            acc[m] = dp4a(cur[u].y, a.y, acc[m]);
            acc[m] = dp4a(cur[u].z, a.z, acc[m]);
            acc[m] = dp4a(cur[u].w, a.w, acc[m]);
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = warp_sum(acc[m]);

    const float scb = SCB[n];
    float s[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) s[m] = 0.0f;
    if (SPARSE && outliers > 0 && listed) {
      const float wq = mine ? outlier_weight<Fmt>((i8)ow, scb) : 0.0f;
      float p[MT];
#pragma unroll
      for (int m = 0; m < MT; ++m) p[m] = mine ? __fmul_rn(oa[m][lane], wq) : 0.0f;
      for (int j = 0; j < outliers; ++j)  // ascending column order
#pragma unroll
        for (int m = 0; m < MT; ++m) s[m] = __fadd_rn(s[m], __shfl_sync(kFull, p[m], j));
    } else if (SPARSE && outliers > 0) {
      for (int sw = 0; sw < summaries; ++sw) {
        u32 sbits = summary[sw];  // warp-uniform: loops and shuffles below see full warps
        while (sbits) {
          const int wi = sw * 32 + __ffs((int)sbits) - 1;
          sbits &= sbits - 1;
          const u32 word = bitmap[wi];
          const int col = wi * 32 + lane;
          float p[MT];
#pragma unroll
          for (int m = 0; m < MT; ++m) p[m] = 0.0f;
          if ((word >> lane) & 1u) {
            const float wq = outlier_weight<Fmt>(CB[(i64)n * K + col], scb);
#pragma unroll
            for (int m = 0; m < MT; ++m)
              if (m < M) p[m] = __fmul_rn(Fmt::to_float(A[(i64)m * K + col]), wq);
          }
          u32 bits = word;
          while (bits) {  // ascending column order
            const int b = __ffs((int)bits) - 1;
            bits &= bits - 1;
#pragma unroll
            for (int m = 0; m < MT; ++m) s[m] = __fadd_rn(s[m], __shfl_sync(kFull, p[m], b));
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M && lane == m) {
        float o = Fmt::to_float(Fmt::from_float(dequant_value<BiasFmt, HAS_BIAS>(acc[m], row_absmax[m], scb, bias, n)));
        if (SPARSE && outliers > 0) o = __fadd_rn(o, s[m]);  // only then: -0 + 0 would be +0
        out[(i64)m * N + n] = Fmt::from_float(o);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Medium-M linear (M <= 64; "auto": from 5 rows): row quantization a CTA a row, then the
// weights streamed once through tensor cores
// ---------------------------------------------------------------------------------------

// Outlier flags int8_row_quant_wide writes (its FLAGS argument).
constexpr int kNoFlags = 0;    // threshold 0: none
constexpr int kByteFlags = 1;  // flags u8[K]: 1 where a column holds an outlier (zeroed by the caller;
                               // racing writers all write 1)
constexpr int kRowBits = 2;    // rowbits u32[rows * rowbits_stride(K)]: each row's own outlier bitmap
                               // (bit i of word w = column 32w + i), every word written (the padding
                               // words 0): no zeroing

// Words a row of rowbits takes: ceil(K / 32) rounded up to 4, so that a row's words are
// whole 16-byte loads for int8_linear_mmv.
__device__ __forceinline__ int rowbits_stride(int K) { return (((K + 31) >> 5) + 3) & ~3; }

// int8_row_quant_wide<Fmt, FLAGS, VEC>
//   A          Fmt::storage[rows * K]
//   threshold  FLAGS != kNoFlags: values with |a| >= threshold stay out of the row absmax
//              and are recorded in flags (kByteFlags) or rowbits (kRowBits)
//   CA         i8[rows * K] codes; the outlier columns' codes are left as computed (not
//              zeroed): the consumer takes their int8 products back out, so quantizing a
//              row never waits for the other rows' outlier search
//   SCA        float32[rows] row absmax
// block 256 = one row, grid = rows: the medium-M path has too few rows for a warp a row
// (int8_row_quant) to fill the GPU. Thread t handles the 8-element chunks 8t, 8t + 2048, ...;
// pass 2 re-reads them (L1 hits). K % 16 == 0; VEC: A 16-byte and CA 8-byte aligned.
template <class Fmt, int FLAGS, bool VEC>
__global__ void __launch_bounds__(256)
int8_row_quant_wide(const typename Fmt::storage* __restrict__ A, float threshold, u8* __restrict__ flags,
                    u32* __restrict__ rowbits, i8* __restrict__ CA, float* __restrict__ SCA, int K) {
  __shared__ float red[8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const typename Fmt::storage* a = A + (i64)blockIdx.x * K;
  const int words = (K + 31) >> 5, stride = rowbits_stride(K);
  float m = 0.0f;
  for (int k0 = 0; k0 < K; k0 += 2048) {  // uniform trip count: the bitmap shuffles see whole warps
    const int k = k0 + threadIdx.x * 8;
    u32 bits = 0;  // bit i: column k + i holds an outlier
    if (k < K) {
      float v[8];
      load_row8<Fmt, VEC>(a, k, K, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        float x = fabsf(v[i]);
        if (FLAGS != kNoFlags && x >= threshold) {  // threshold > 0
          bits |= 1u << i;
          x = 0.0f;
        }
        m = fmaxf(m, x);  // fmaxf drops NaN
      }
      if constexpr (FLAGS == kByteFlags) {
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if ((bits >> i) & 1u) flags[k + i] = 1;
      }
    }
    if constexpr (FLAGS == kRowBits) {
      // Lanes 4q .. 4q + 3 hold the 32 columns of one word, the lowest in lane 4q.
      u32 word = bits << (8 * (lane & 3));
      word |= __shfl_xor_sync(kFull, word, 1);
      word |= __shfl_xor_sync(kFull, word, 2);
      if ((lane & 3) == 0 && k < K) rowbits[(i64)blockIdx.x * stride + (k >> 5)] = word;
    }
  }
  if (FLAGS == kRowBits && (int)threadIdx.x < stride - words) rowbits[(i64)blockIdx.x * stride + words + threadIdx.x] = 0;
  m = warp_max(m);
  if (lane == 0) red[warp] = m;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < 8; ++w) m = fmaxf(m, red[w]);  // max is exact in any order
  const float scale = int8_scale(m);
  i8* q = CA + (i64)blockIdx.x * K;
  for (int k = threadIdx.x * 8; k < K; k += 2048) {
    float v[8];
    load_row8<Fmt, VEC>(a, k, K, v);
    int c[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) c[i] = quantize_int8(v[i], scale);
    if (VEC && k + 8 <= K) {
      *reinterpret_cast<uint2*>(q + k) = make_uint2(pack4(c[0], c[1], c[2], c[3]), pack4(c[4], c[5], c[6], c[7]));
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (k + i < K) q[k + i] = (i8)c[i];
    }
  }
  if (threadIdx.x == 0) SCA[blockIdx.x] = m;
}

// The GEMM's 128-row M tile wastes most of its work below 64 rows, and the gemv's dp4a
// path re-reads every activation code from shared memory once per 16 weight bytes. Here
// the product is computed transposed: the weight is mma's A operand (16 weight rows) and
// the activation codes are its B operand (n8 = 8 activation rows), so one mma.m16n8k32
// consumes 512 weight bytes and MT / 8 mmas cover all activation rows.
//
// K order inside a 64-byte span: the dot product does not depend on the order of k, so
// lane (g, t) (g = lane / 4, t = lane % 4) loads the 16 bytes [k0 + 16t, k0 + 16t + 16) of
// weight rows g and g + 8 and of activation row g, and feeds words (x, y) to the first
// mma and (z, w) to the second: a0 = W[g].x, a1 = W[g+8].x, a2 = W[g].y, a3 = W[g+8].y,
// b0 = X[g].x, b1 = X[g].y. Logical k of both operands depends only on t, so each logical
// k names the same actual column in A and B, and every 16-byte load is one whole chunk.
// Accumulator c0, c1: weight row g, activation rows 2t, 2t + 1; c2, c3: weight row g + 8.

constexpr int kMmvRowGroups = 2;  // 16-row weight groups per CTA
constexpr int kMmvKParts = 4;     // K split among the warps of a CTA (reduced in shared memory)
constexpr int kMmvUnroll = 4;     // 64-byte spans whose weight loads a warp keeps in flight
constexpr int kMmvRows = 16 * kMmvRowGroups;
constexpr int kMmvOutliers = 16;  // outlier columns whose operands one epilogue round stages

// The aligned 4-byte word holding element c of a row that starts 4-byte aligned: what a
// 4-byte cp.async gathers for a byte or a 16-bit element; byte_in / value_in pick it out.
template <class T>
__device__ __forceinline__ const T* word_of(const T* row, int c) {
  return row + (c & ~(int)(4 / sizeof(T) - 1));
}
__device__ __forceinline__ i8 byte_in(u32 word, int c) { return (i8)(word >> (8 * (c & 3))); }
template <class Fmt>
__device__ __forceinline__ float value_in(u32 word, int c) {
  if constexpr (Fmt::kBytes == 4) {
    return __uint_as_float(word);
  } else {
    return Fmt::to_float((u16)(word >> (16 * (c & 1))));
  }
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(shared_address(dst)), "l"(src));
}

// 32 flags (u8, 0 or 1) from 16-byte aligned `f` as a bitmap word, bit i = column i; the
// second half is past K when `two` is false (K % 16 == 0 keeps halves whole).
__device__ __forceinline__ u32 flag_word(const u8* __restrict__ f, bool two) {
  const uint4 lo = *reinterpret_cast<const uint4*>(f);
  const uint4 hi = two ? *reinterpret_cast<const uint4*>(f + 16) : make_uint4(0u, 0u, 0u, 0u);
  const u32 w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  u32 bits = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int b = 0; b < 4; ++b) bits |= ((w[i] >> (8 * b)) & 1u) << (4 * i + b);
  return bits;
}

// 16 bytes of CA through the read-only path. Written out for the SPARSE kernel, whose
// cp.async gathers (inline asm reading CA) keep the compiler from proving CA read-only:
// its main-loop loads were plain LDGs where threshold 0's are LDG.CONSTANT.
__device__ __forceinline__ uint4 load_nc16(const i8* p) {
  uint4 v;
  asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// int8_linear_mmv<Fmt, BiasFmt, HAS_BIAS, SPARSE, MT>
//   CA         i8[M * K] row codes of A, SCA float32[M] their row absmax (int8_row_quant_wide)
//   CB         i8[N * K], SCB float32[N]; bias BiasFmt::storage[N] (HAS_BIAS)
//   A          SPARSE: activations Fmt::storage[M * K] (4-byte aligned)
//   rowbits    SPARSE, MT = 16: each row's outlier bitmap u32[M * rowbits_stride(K)]
//              (int8_row_quant_wide, kRowBits: no zeroing, so no memset node before it)
//   flags      SPARSE, MT >= 32: outlier columns u8[K] (kByteFlags, zeroed by the caller:
//              OR-ing 32 or 64 rows' bitmaps took a thread up to four rounds of loads).
//              The main loop is threshold 0's: outlier columns' codes go through the
//              tensor cores too; the epilogue subtracts their exact int32 products
//              (CA[m, c] * CB[n, c]) before dequantizing, and adds them in Fmt as
//              int8_mm_dequant does, in ascending column order
//   out        Fmt::storage[M * N]
//   M <= MT (16, 32 or 64); K % 16 == 0; CA and CB 16-byte aligned.
// block 256 = 8 warps; warp w: weight rows n0 + 16 (w % 2) + [0, 16), K spans
// w / 2, w / 2 + 4, ...; grid ceil(N / 32). The four K parts are summed in shared memory
// (int32, exact), then all 256 threads run the epilogue: thread = one weight row (tid % 32)
// x activation rows tid / 32, tid / 32 + 8, ... (stores of 32 consecutive n).
//
// SPARSE, before the main loop (its first weight loads already in flight): each thread
// makes the outlier bits of its units of columns. MT = 16: 128-column groups of the row
// bitmaps (16-byte loads); tpg = 8, 4, 2 or 1 threads share a group (as many as 256
// threads allow), each OR-ing every tpg-th row, then shuffles combine them: one round of
// loads covers M <= 16 (2-4 rows a thread at K <= 8192). MT >= 32: 32-column words of the
// byte flags, thread t the words [t * per, (t + 1) * per) (row bitmaps there took up to
// four rounds: +13 us at 28672 x 8192, M = 64; benchmarks/NOTES_int8.md, round 6). A block
// scan ranks the columns in ascending order, and the operands of the first kMmvOutliers (the CTA's 32
// weight bytes, M activations and M codes a column) are gathered into shared memory with
// cp.async while the main loop runs. The epilogue then reads only shared memory; more
// columns than that (rare) are handled in further rounds after the main loop.
// (Recomputing the codes from the activations and SCA instead of gathering them, 40%
// fewer gathers at MT = 64, measured slower on an H100: 4096 x 4096, M = 64, 29.3 against
// 26.9 us; benchmarks/NOTES_int8.md, round 5.)
// SPARSE at MT = 16 is held to 80 registers (3 CTAs an SM, as threshold 0).
template <class Fmt, class BiasFmt, bool HAS_BIAS, bool SPARSE, int MT>
__global__ void __launch_bounds__(256, SPARSE && MT == 16 ? 3 : 2)
int8_linear_mmv(const i8* __restrict__ CA, const float* __restrict__ SCA, const i8* __restrict__ CB,
                const float* __restrict__ SCB, const typename BiasFmt::storage* __restrict__ bias,
                const typename Fmt::storage* __restrict__ A, const u32* __restrict__ rowbits,
                const u8* __restrict__ flags, int M, int N, int K, typename Fmt::storage* __restrict__ out) {
  constexpr int kTiles = MT / 8;
  constexpr int kStage = SPARSE ? kMmvOutliers : 1;
  __shared__ int part[kMmvKParts - 1][kMmvRowGroups][kTiles * 4][32];
  __shared__ int total[MT][kMmvRows + 1];  // +1: the transposed writes below spread over banks
  __shared__ int ocols[kStage];            // SPARSE: this round's outlier columns
  __shared__ u32 ocb[kStage][kMmvRows], oa[kStage][MT], oca[kStage][MT];  // ... their operands' words
  __shared__ int scan[8];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rg = warp % kMmvRowGroups, kp = warp / kMmvRowGroups;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * kMmvRows;
  const int ra = n0 + rg * 16 + g, rb = ra + 8;
  const i8* wrow_a = CB + (i64)(ra < N ? ra : 0) * K;
  const i8* wrow_b = CB + (i64)(rb < N ? rb : 0) * K;

  int acc[kTiles][4];
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[j][r] = 0;

  const int spans = (K + 63) >> 6;
  constexpr int kStride = kMmvKParts * kMmvUnroll;  // spans a warp moves on per batch
  uint4 wa[kMmvUnroll], wb[kMmvUnroll];
  auto load = [&](int s0) {  // the weight chunks of spans s0, s0 + kMmvKParts, ...; zeros past K
#pragma unroll
    for (int u = 0; u < kMmvUnroll; ++u) {
      const int k = (s0 + u * kMmvKParts) * 64 + t * 16;
      const bool in = k < K;  // K % 16 == 0: a chunk is wholly inside or past the row
      wa[u] = make_uint4(0u, 0u, 0u, 0u);
      wb[u] = wa[u];
      if (in && ra < N)
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(wa[u].x), "=r"(wa[u].y), "=r"(wa[u].z), "=r"(wa[u].w)
            : "l"(wrow_a + k));
      if (in && rb < N)
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(wb[u].x), "=r"(wb[u].y), "=r"(wb[u].z), "=r"(wb[u].w)
            : "l"(wrow_b + k));
    }
  };
  load(kp);

  // ---- SPARSE: rank the outlier columns (see above). A thread's units are u0, u0 + ustep,
  // ... below units, each kUnitCols columns as 4 words (a flag word fills only .x).
  constexpr bool kGroups = MT == 16;
  constexpr int kUnitCols = kGroups ? 128 : 32;
  const int words = (K + 31) >> 5, groups = rowbits_stride(K) >> 2;
  const int tpg = !kGroups ? 1 : groups <= 32 ? 8 : groups <= 64 ? 4 : groups <= 128 ? 2 : 1;  // threads a group
  const int sub = threadIdx.x & (tpg - 1);  // lane sub == 0 of a group owns its columns
  const int per = (words + 255) >> 8;
  const int u0 = kGroups ? (int)threadIdx.x / tpg : min((int)threadIdx.x * per, words);
  const int ustep = kGroups ? 256 / tpg : 1, units = kGroups ? groups : min(u0 + per, words);
  auto unit_bits = [&](int ui) -> uint4 {  // the outlier bits of columns kUnitCols * ui + [0, kUnitCols)
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if constexpr (kGroups) {
      if (ui < groups) {
#pragma unroll 4
        for (int m = sub; m < M; m += tpg) {
          const uint4 r = *reinterpret_cast<const uint4*>(rowbits + (i64)m * (4 * groups) + 4 * ui);
          v = make_uint4(v.x | r.x, v.y | r.y, v.z | r.z, v.w | r.w);
        }
      }
      // The group's tpg threads are consecutive lanes of one warp; with tpg > 1 a thread has
      // one group (u0), so these run in every lane; only tpg = 1 (K > 16384) has more.
      for (int o = 1; o < tpg; o <<= 1)
        v = make_uint4(v.x | __shfl_xor_sync(kFull, v.x, o), v.y | __shfl_xor_sync(kFull, v.y, o),
                       v.z | __shfl_xor_sync(kFull, v.z, o), v.w | __shfl_xor_sync(kFull, v.w, o));
    } else {
      v.x = flag_word(flags + ui * 32, ui * 32 + 16 < K);
    }
    return v;
  };
  auto popc4 = [](uint4 v) { return __popc(v.x) + __popc(v.y) + __popc(v.z) + __popc(v.w); };
  int mine = 0, first = 0, outliers = 0;  // this thread's outlier columns, the rank of its first, all
  uint4 kept = make_uint4(0u, 0u, 0u, 0u);  // unit u0's bits (its only one for K <= 8192)
  auto rank = [&]() {
    if (kGroups || u0 < units) kept = unit_bits(u0);  // groups: every lane, for the shuffles
    mine = sub == 0 ? popc4(kept) : 0;
    for (int ui = u0 + ustep; ui < units; ui += ustep) mine += popc4(unit_bits(ui));
    first = block_exclusive_scan<256>(mine, scan, outliers);
  };
  auto list = [&](int base) {  // ocols[r - base] = the column of rank r, r in [base, base + kMmvOutliers)
    if (mine == 0 || first >= base + kMmvOutliers || first + mine <= base) return;
    int r = first;
    for (int ui = u0; ui < units; ui += ustep) {
      const uint4 v = ui == u0 ? kept : unit_bits(ui);
      const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int q = 0; q < 4; ++q)
        for (u32 bits = w[q]; bits; bits &= bits - 1, ++r)
          if (r >= base && r < base + kMmvOutliers) ocols[r - base] = ui * kUnitCols + q * 32 + __ffs((int)bits) - 1;
    }
  };
  auto gather = [&](int cnt) {  // cp.async the operands of ocols[0, cnt)
    const int per_col = kMmvRows + 2 * M;
    for (int e = threadIdx.x; e < cnt * per_col; e += 256) {
      const int j = e / per_col, r = e - j * per_col, c = ocols[j];
      if (r < kMmvRows) {
        if (n0 + r < N) cp_async4(&ocb[j][r], word_of(CB + (i64)(n0 + r) * K, c));
      } else if (r < kMmvRows + M) {
        cp_async4(&oa[j][r - kMmvRows], word_of(A + (i64)(r - kMmvRows) * K, c));
      } else {
        cp_async4(&oca[j][r - kMmvRows - M], word_of(CA + (i64)(r - kMmvRows - M) * K, c));
      }
    }
    cp_async_commit();
  };
  if constexpr (SPARSE) {
    rank();
    if (outliers > 0) {  // uniform across the CTA
      list(0);
      __syncthreads();
      gather(min(outliers, kMmvOutliers));
    }
  }

  // ---- main loop: the batch in wa / wb, then the next one loaded
  for (int s0 = kp; s0 < spans; s0 += kStride) {
#pragma unroll
    for (int u = 0; u < kMmvUnroll; ++u) {
      if (s0 + u * kMmvKParts < spans) {  // warp-uniform: mma needs the whole warp
        const int k = (s0 + u * kMmvKParts) * 64 + t * 16;
        const u32 a_lo[4] = {wa[u].x, wb[u].x, wa[u].y, wb[u].y};
        const u32 a_hi[4] = {wa[u].z, wb[u].z, wa[u].w, wb[u].w};
#pragma unroll
        for (int j = 0; j < kTiles; ++j) {
          const int m = j * 8 + g;
          uint4 x = make_uint4(0u, 0u, 0u, 0u);
          if (m < M && k < K) {  // L1: shared by row groups
            const i8* p = CA + (i64)m * K + k;
            x = SPARSE ? load_nc16(p) : *reinterpret_cast<const uint4*>(p);  // (threshold 0's code as it was)
          }
          mma_s8(acc[j], a_lo, x.x, x.y);
          mma_s8(acc[j], a_hi, x.z, x.w);
        }
      }
    }
    load(s0 + kStride);
  }
  if constexpr (SPARSE) cp_async_wait<0>();  // the gathered operands (published by the barrier below)

  // ---- sum the K parts: parts 1..3 park their accumulators, part 0 adds them (exact)
  if (kp > 0) {
#pragma unroll
    for (int j = 0; j < kTiles; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) part[kp - 1][rg][j * 4 + r][lane] = acc[j][r];
  }
  __syncthreads();
  if (kp == 0) {
#pragma unroll
    for (int j = 0; j < kTiles; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        int v = acc[j][r];
#pragma unroll
        for (int p = 0; p < kMmvKParts - 1; ++p) v += part[p][rg][j * 4 + r][lane];
        const int m = j * 8 + 2 * t + (r & 1);
        const int nl = rg * 16 + g + (r >> 1) * 8;
        total[m][nl] = v;
      }
  }
  __syncthreads();

  // ---- epilogue: thread = weight row n (tid % 32) x activation rows tid / 32 + 8i
  const int nl = threadIdx.x & 31;
  const int n = n0 + nl;
  const bool live = n < N;
  const int m0 = threadIdx.x >> 5;
  const float scb = live ? SCB[n] : 0.0f;
  constexpr int kPer = MT / 8;
  int tot[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) tot[i] = m0 + 8 * i < M ? total[m0 + 8 * i][nl] : 0;
  float s[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) s[i] = 0.0f;
  if constexpr (SPARSE) {
    for (int base = 0; base < outliers; base += kMmvOutliers) {  // uniform across the CTA
      const int cnt = min(outliers - base, kMmvOutliers);
      if (base > 0) {     // more outlier columns than one round stages (rare)
        __syncthreads();  // the previous round's operands are used up
        rank();           // (mine / first were not kept through the main loop)
        list(base);
        __syncthreads();
        gather(cnt);
        cp_async_wait<0>();
        __syncthreads();
      }
      if (live) {
        for (int j = 0; j < cnt; ++j) {  // ascending column order
          const int c = ocols[j];
          const i8 wq = byte_in(ocb[j][nl], c);
          const float w = outlier_weight<Fmt>(wq, scb);
#pragma unroll
          for (int i = 0; i < kPer; ++i) {
            const int m = m0 + 8 * i;
            if (m < M) {
              tot[i] -= (int)byte_in(oca[j][m], c) * wq;
              s[i] = __fadd_rn(s[i], __fmul_rn(value_in<Fmt>(oa[j][m], c), w));
            }
          }
        }
      }
    }
  }
  if (!live) return;
  float o[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int m = m0 + 8 * i;
    o[i] = m < M ? Fmt::to_float(Fmt::from_float(dequant_value<BiasFmt, HAS_BIAS>(tot[i], SCA[m], scb, bias, n))) : 0.0f;
    if (SPARSE && outliers > 0) o[i] = __fadd_rn(o[i], s[i]);  // only then: -0 + 0 would be +0
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int m = m0 + 8 * i;
    if (m < M) out[(i64)m * N + n] = Fmt::from_float(o[i]);
  }
}

// ---------------------------------------------------------------------------------------
// The cuBLAS path with outlier columns at few rows: the columns listed beside the product
// ---------------------------------------------------------------------------------------

// The outlier columns of all `rows` row bitmaps (u32[rows * stride], 16-byte aligned rows):
// their OR in any_bits (shared u32[stride]) and the first kOutlierCache of them in ascending
// order in cols (shared); `idx` (global, or nullptr) gets every one of them in that order.
// Returns how many there are. Every thread of the kThreads-thread CTA calls it (it holds
// __syncthreads); cols and idx are complete for the caller after its next __syncthreads.
// The OR: 16-byte loads spread over the CTA, kBatch in flight a thread; a thread ORs its
// loads in registers while their 128-column group stays the same (always, where the groups
// divide 256) and publishes a group's words with shared atomics, one a non-zero word: not
// one a row (the same few words from every row would serialize). The rank: a block scan.
template <int kThreads>
__device__ __forceinline__ int list_row_bitmaps(const u32* __restrict__ rowbits, i64 rows, int stride,
                                                u32* any_bits, int* cols, int* scan, int* __restrict__ idx) {
  constexpr int kBatch = 8;
  const int groups = stride >> 2;
  for (int w = threadIdx.x; w < stride; w += kThreads) any_bits[w] = 0u;
  __syncthreads();
  const i64 units = rows * groups;  // (row, 128-column group) pairs
  uint4 run = make_uint4(0u, 0u, 0u, 0u);
  int run_g = (int)(threadIdx.x % groups);
  auto publish = [&]() {
    if (run.x) atomicOr(&any_bits[4 * run_g], run.x);
    if (run.y) atomicOr(&any_bits[4 * run_g + 1], run.y);
    if (run.z) atomicOr(&any_bits[4 * run_g + 2], run.z);
    if (run.w) atomicOr(&any_bits[4 * run_g + 3], run.w);
    run = make_uint4(0u, 0u, 0u, 0u);
  };
  for (i64 e0 = threadIdx.x; e0 < units; e0 += kThreads * kBatch) {
    uint4 v[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const i64 e = e0 + b * kThreads;
      v[b] = e < units ? reinterpret_cast<const uint4*>(rowbits)[e] : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int g = (int)((e0 + b * kThreads) % groups);
      if (g != run_g) {
        publish();
        run_g = g;
      }
      run = make_uint4(run.x | v[b].x, run.y | v[b].y, run.z | v[b].z, run.w | v[b].w);
    }
  }
  publish();
  __syncthreads();
  const int per = (stride + kThreads - 1) / kThreads;  // thread t: words [t * per, (t + 1) * per)
  const int w0 = min((int)threadIdx.x * per, stride), w1 = min(w0 + per, stride);
  int mine = 0;
  for (int w = w0; w < w1; ++w) mine += __popc(any_bits[w]);
  int outliers;
  int r = block_exclusive_scan<kThreads>(mine, scan, outliers);
  const int last = idx != nullptr ? outliers : kOutlierCache;  // ranks to write
  for (int w = w0; w < w1 && r < last; ++w)
    for (u32 bits = any_bits[w]; bits && r < last; bits &= bits - 1, ++r) {
      const int col = w * 32 + __ffs((int)bits) - 1;
      if (r < kOutlierCache) cols[r] = col;
      if (idx != nullptr) idx[r] = col;
    }
  return outliers;
}

// int8_outlier_gather<Fmt>: the outlier columns of the row bitmaps and their operands, for
// int8_mm_dequant_outliers<..., SUBTRACT = true>. It reads only what the row quantization
// wrote, so it runs on a forked branch of the stream while cuBLAS multiplies the codes
// (with the outlier columns still in them): off the critical path.
//   rowbits    u32[M * rowbits_stride(K)]: int8_row_quant_wide's kRowBits
//   CB, SCB    i8[N * K], float32[N]
//   A, CA      Fmt::storage[M * K] and i8[M * K]
//   idx, count written by CTA 0: the columns in ascending order (i32[K]), how many (i32[1])
//   Wout, Aout int8_outlier_weights' layouts (16-bit weights and activations of the first
//              kOutlierCache columns)
//   Wq         i8[kOutlierCache * N]: [((j / 16) * N + n) * 16 + j % 16] = CB[n, c_j], a
//              16-byte load a weight row and 16 columns
//   CAout      i8[kOutlierCache * Mp]: [j * Mp + m] = CA[m, c_j], 0 for m in [M, Mp)
// dynamic smem: u32[rowbits_stride(K)]. block kThreads, grid ceil(N / kThreads): every CTA
// lists the columns itself (reading all bitmap rows: the launcher bounds those reads), the
// (cached column, row) pairs are spread over the grid, and thread = weight row n gathers
// its row's bytes.
template <class Fmt, int kThreads>
__global__ void __launch_bounds__(kThreads)
int8_outlier_gather(const u32* __restrict__ rowbits, int K, const i8* __restrict__ CB, const float* __restrict__ SCB,
                    const typename Fmt::storage* __restrict__ A, const i8* __restrict__ CA, int M, int N,
                    int* __restrict__ idx, int* __restrict__ count, typename Fmt::storage* __restrict__ Wout,
                    i8* __restrict__ Wq, typename Fmt::storage* __restrict__ Aout, i8* __restrict__ CAout) {
  using St = typename Fmt::storage;
  constexpr int kB = 16 / Fmt::kBytes;  // columns a 16-byte Wout store holds
  extern __shared__ __align__(16) u32 any_bits[];
  __shared__ int cols[kOutlierCache];
  __shared__ int scan[kThreads / 32];
  const int outliers = list_row_bitmaps<kThreads>(rowbits, M, rowbits_stride(K), any_bits, cols, scan,
                                                  blockIdx.x == 0 ? idx : nullptr);
  if (blockIdx.x == 0 && threadIdx.x == 0) *count = outliers;
  __syncthreads();  // cols listed

  const int cached = outliers < kOutlierCache ? outliers : kOutlierCache;
  const int Mp = (M + kDequantRows - 1) / kDequantRows * kDequantRows;
  for (i64 e = (i64)blockIdx.x * kThreads + threadIdx.x; e < (i64)cached * Mp; e += (i64)gridDim.x * kThreads) {
    const int j = (int)(e / Mp), m = (int)(e - (i64)j * Mp);
    St v = 0;  // +0.0 in every format
    i8 q = 0;
    if (m < M) {
      const i64 at = (i64)m * K + cols[j];
      v = A[at];
      q = CA[at];
    }
    Aout[e] = v;
    CAout[e] = q;
  }
  const int n = blockIdx.x * kThreads + threadIdx.x;
  if (n >= N) return;
  const float scb = SCB[n];
  const i8* wrow = CB + (i64)n * K;
  for (int j0 = 0; j0 < cached; j0 += 16) {
    i8 w[16];
#pragma unroll
    for (int q = 0; q < 16; ++q) w[q] = j0 + q < cached ? wrow[cols[j0 + q]] : (i8)0;
    u32 code[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) code[q] = pack4(w[4 * q], w[4 * q + 1], w[4 * q + 2], w[4 * q + 3]);
    *reinterpret_cast<uint4*>(Wq + ((i64)(j0 / 16) * N + n) * 16) = make_uint4(code[0], code[1], code[2], code[3]);
#pragma unroll
    for (int g = 0; g < 16; g += kB) {
      if (j0 + g >= cached) continue;  // (not break: the loop stays unrolled, w in registers)
      u32 word[4];
      if constexpr (Fmt::kBytes == 4) {
#pragma unroll
        for (int q = 0; q < 4; ++q)
          word[q] = __float_as_uint(j0 + g + q < cached ? outlier_weight_bits<Fmt>(w[g + q], scb) : 0.0f);
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const u32 lo = j0 + g + 2 * q < cached ? outlier_weight_bits<Fmt>(w[g + 2 * q], scb) : 0u;
          const u32 hi = j0 + g + 2 * q + 1 < cached ? outlier_weight_bits<Fmt>(w[g + 2 * q + 1], scb) : 0u;
          word[q] = lo | (hi << 16);
        }
      }
      *reinterpret_cast<uint4*>(Wout + ((i64)((j0 + g) / kB) * N + n) * kB) = make_uint4(word[0], word[1], word[2], word[3]);
    }
  }
}
