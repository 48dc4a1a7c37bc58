// Fused 4-bit GEMV on CUDA cores: out[m, n] = sum_k A[m, k] * W[n, k] (+ bias[n]) for a
// handful of activation rows, straight from bitsandbytes-packed NF4 / FP4 codes. Every
// packed byte is read once from device memory; nothing is dequantized to memory.
//
// Data layout
//   A        Fmt::storage[M, K]       activations, row-major (bfloat16 as raw 16-bit words)
//   packed   u8[(N*K + 1) / 2]        W (N, K) flattened row-major, two codes a byte, flat
//                                     element 2j in the HIGH nibble of byte j
//   table    float32[16]              value of each code (FP4 index 8 is -0.0)
//   absmax   float32[blocks]          one scale per 2^block_shift flat elements (NESTED = false)
//   qabsmax  u8[blocks], code2 float32[256], nested_absmax float32[ceil(blocks / 256)],
//   offset   float32[1]               the nested (double-quantized) scales (NESTED = true)
//   bias     Fmt::storage[N]          read when has_bias != 0
//   out      Fmt::storage[M, N]       row-major; each value rounded once from float32
//
// Thread mapping: a CTA of 4 warps; warp w owns ROWS consecutive weight rows
// (blockIdx.x * 4 + w) * ROWS ... and the MR activation rows blockIdx.y * MR ... (rows past
// M or N are clamped for loads and never stored). Lane l walks its weight rows in chunks of
// 32 elements (16 packed bytes): chunks l, l + 32, l + 64, ... with UNROLL chunks' loads in
// flight. Each lane keeps MR x ROWS float32 sums; a butterfly of shuffles adds the lanes.
//
// ALIGNED (K % 32 == 0, packed and A 16-byte aligned): a chunk is one 16-byte load and lies
// inside one quantization block (blocks hold >= 32 elements and start at multiples of 32),
// so its scale is factored out: acc += scale * sum_j A[k_j] * code[q_j].
// Otherwise (odd K, K % 32 != 0, unaligned pointers) each element's byte, nibble and
// block come from its flat index row * K + k (with odd K a row may start in a low nibble,
// and a 32-element chunk may straddle two blocks) and the weight is code[q] * scale in
// float32, as the reference dequantizes it.
//
// Dequantization: a shared table maps a whole packed byte to both of its values (float2:
// high nibble, low nibble), so one 8-byte shared load decodes two weights. The table is
// replicated 16 times ([byte][replica]) and lane l reads replica l % 16: a half-warp's
// sixteen 8-byte reads then hit 32 distinct banks whatever the bytes are.
#include "matmul_4bit.cuh"

namespace {

constexpr int kGemvWarps = 4;
constexpr int kGemvThreads = 32 * kGemvWarps;
constexpr int kLutReplicas = 16;
constexpr int kUnroll = 2;

}  // namespace

// gemv_4bit<Fmt, NESTED, MR, ROWS, ALIGNED, TILED>
//   grid (ceil(N / (4 * ROWS)), ceil(M / MR)), block 128.
// TILED (with ALIGNED): the weight is in the tile order of gemm_4bit.cu's data layout (N % 16
// == 0, K % 128 == 0, cupyquant/tiled_4bit.py); chunk c of a row is then its 16 bytes in
// segment c / 4 of the row's tile. Everything else, the scales included, is unchanged.
template <class Fmt, bool NESTED, int MR, int ROWS, bool ALIGNED, bool TILED = false>
__global__ void __launch_bounds__(kGemvThreads, 3)
gemv_4bit(const typename Fmt::storage* __restrict__ A, const u8* __restrict__ packed, const float* __restrict__ table,
          const float* __restrict__ absmax, const u8* __restrict__ qabsmax, const float* __restrict__ code2,
          const float* __restrict__ nested_absmax, const float* __restrict__ offset,
          const typename Fmt::storage* __restrict__ bias, typename Fmt::storage* __restrict__ out, int M, int N, int K,
          int block_shift, int has_bias) {
  static_assert(ALIGNED || !TILED, "the tile order needs the aligned path");
  __shared__ float2 lut[256 * kLutReplicas];
  __shared__ float code2_s[NESTED ? 256 : 1];
  for (int i = threadIdx.x; i < 256 * kLutReplicas; i += kGemvThreads) {
    const int b = i / kLutReplicas;
    lut[i] = make_float2(__ldg(table + (b >> 4)), __ldg(table + (b & 15)));
  }
  if constexpr (NESTED) {
    for (int i = threadIdx.x; i < 256; i += kGemvThreads) code2_s[i] = __ldg(code2 + i);
  }
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kGemvWarps + (threadIdx.x >> 5)) * ROWS;
  const int m0 = blockIdx.y * MR;
  if (row0 >= N) return;  // no barrier follows
  const float off = NESTED ? __ldg(offset) : 0.0f;
  i64 row_start[ROWS];  // flat index of each weight row's first element
#pragma unroll
  for (int r = 0; r < ROWS; ++r) row_start[r] = (i64)min(row0 + r, N - 1) * K;
  const typename Fmt::storage* a_row[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) a_row[m] = A + (i64)min(m0 + m, M - 1) * K;
  const float2* lut_lane = lut + (lane % kLutReplicas);

  float acc[MR][ROWS];
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[m][r] = 0.0f;

  const int chunks = (K + 31) >> 5;
  const u8* tile_lane[ROWS];  // TILED: this lane's first chunk (chunk `lane`) of each row
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = min(row0 + r, N - 1);
    tile_lane[r] = TILED ? q4::tiled_chunk(packed, row >> 4, K >> 7, lane >> 2, row & 15, lane & 3) : packed;
  }
  if constexpr (ALIGNED) {
    for (int c0 = lane; c0 < chunks; c0 += 32 * kUnroll) {
      // Issue every load of UNROLL chunks first, then decode: more bytes in flight per warp.
      uint4 w[kUnroll][ROWS];
      float sv[kUnroll][ROWS];
      u32 sq[kUnroll][ROWS];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + 32 * u;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          if (c < chunks) {
            const i64 e = row_start[r] + 32 * c;
            // TILED: chunk c = lane + 32 j lies (c - lane) / 4 segments = (c - lane) * 256 bytes past chunk lane
            w[u][r] = q4::load_stream16(TILED ? tile_lane[r] + (i64)(c - lane) * 256 : packed + (e >> 1));
            q4::scale_fetch<NESTED>(e >> block_shift, absmax, qabsmax, nested_absmax, sv[u][r], sq[u][r]);
          } else {
            w[u][r] = make_uint4(0, 0, 0, 0);
            sv[u][r] = 0.0f;
            sq[u][r] = 0;
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + 32 * u;
        if (c >= chunks) break;
        float part[MR][ROWS];
#pragma unroll
        for (int m = 0; m < MR; ++m)
#pragma unroll
          for (int r = 0; r < ROWS; ++r) part[m][r] = 0.0f;
#pragma unroll
        for (int q = 0; q < 4; ++q) {  // 8 elements: packed bytes 4q .. 4q+3 of the chunk
          float wf[ROWS][8];
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
            const u32 word = q4::word_of(w[u][r], q);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const float2 v = lut_lane[((word >> (8 * i)) & 0xFFu) * kLutReplicas];
              wf[r][2 * i] = v.x;  // high nibble: the even (lower-k) element
              wf[r][2 * i + 1] = v.y;
            }
          }
#pragma unroll
          for (int m = 0; m < MR; ++m) {
            float a[8];
            load8<Fmt>(a_row[m], 32 * c + 8 * q, K, a);
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
#pragma unroll
              for (int i = 0; i < 8; ++i) part[m][r] = fmaf(a[i], wf[r][i], part[m][r]);
          }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float s = q4::scale_decode<NESTED>(sv[u][r], sq[u][r], code2_s, off);
#pragma unroll
          for (int m = 0; m < MR; ++m) acc[m][r] = fmaf(part[m][r], s, acc[m][r]);
        }
      }
    }
  } else {
    for (int c = lane; c < chunks; c += 32) {
      const int k0 = 32 * c;
      const int valid = min(32, K - k0);
      // A 32-element chunk straddles at most two blocks (blocks hold >= 32 elements):
      // elements before `boundary` take the first block's scale, the rest the second's.
      float s_first[ROWS], s_last[ROWS];
      int boundary[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const i64 e0 = row_start[r] + k0;
        const i64 b_first = e0 >> block_shift;
        const i64 b_last = (e0 + valid - 1) >> block_shift;
        float v0, v1;
        u32 q0, q1;
        q4::scale_fetch<NESTED>(b_first, absmax, qabsmax, nested_absmax, v0, q0);
        q4::scale_fetch<NESTED>(b_last, absmax, qabsmax, nested_absmax, v1, q1);
        s_first[r] = q4::scale_decode<NESTED>(v0, q0, code2_s, off);
        s_last[r] = q4::scale_decode<NESTED>(v1, q1, code2_s, off);
        boundary[r] = b_first == b_last ? 32 : (int)(((b_first + 1) << block_shift) - e0);
      }
#pragma unroll 1  // the general path is for odd shapes: keep it small
      for (int q = 0; q < 4; ++q) {
        float wf[ROWS][8];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const int j = 8 * q + i;
            float value = 0.0f;
            if (j < valid) {
              const i64 e = row_start[r] + k0 + j;
              const u32 byte = __ldg(packed + (e >> 1));
              const u32 code = (e & 1) ? (byte & 15u) : (byte >> 4);
              // entry code * 17 is the byte (code, code): its .x is the code's value
              value = __fmul_rn(lut_lane[code * 17u * kLutReplicas].x, j < boundary[r] ? s_first[r] : s_last[r]);
            }
            wf[r][i] = value;
          }
        }
#pragma unroll
        for (int m = 0; m < MR; ++m) {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const int j = 8 * q + i;
            const float a = j < valid ? Fmt::to_float(a_row[m][k0 + j]) : 0.0f;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[m][r] = fmaf(a, wf[r][i], acc[m][r]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int m = 0; m < MR; ++m) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float v = q4::warp_sum(acc[m][r]);
      const int row = row0 + r, tok = m0 + m;
      // every lane holds the sum; spread the stores over lanes
      if (lane == ((m * ROWS + r) & 31) && row < N && tok < M) {
        const float b = has_bias ? Fmt::to_float(bias[row]) : 0.0f;
        out[(i64)tok * N + row] = Fmt::from_float(__fadd_rn(v, b));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// gemv_4bit_half<Fmt, NESTED, ROWS, UNROLL, CTAS, STAGED>: one token of fp16 (Fmt =
// Float16) or bf16 (BFloat16) activations (M = 1), K % 32 == 0, A and packed 16-byte
// aligned, N * K / 32 < 2^32; the arguments are gemv_4bit's (M must be 1).
//
// At one token the weight stream is the whole cost, so this kernel spends as few
// instructions and shared-memory wavefronts a packed byte as it can: one PRMT and one LEA
// (the table address), one 4-byte shared load of the pair (code[hi], code[lo]) in Fmt from
// the tensor-core kernels' byte table (one wavefront a warp), and one packed FMA with the
// two activations the byte meets. gemv_4bit's float32 path pays an 8-byte table load (two
// wavefronts) and two FFMA a byte; the tensor-core kernels pay a packed multiply by the
// scale and their fragment plumbing.
//
// Accumulation: a lane's 32-element chunk (one 16-byte load, inside one quantization block)
// is summed in Fmt by two packed accumulators (bytes 0, 2, .. and 1, 3, ..: 8 products a
// half each), widened to float32 and summed there, then multiplied by the block's scale into
// the row's float32 sum. (A NumPy rounding simulation, 256 x 4096 NF4: relative error 4.8e-4
// in fp16 and 3.7e-3 in bf16, against 3.6e-4 and 2.8e-3 for the tensor-core kernels, which
// round each dequantized weight to Fmt.) fp16 has too little range for that unguarded: the
// CTA first finds A's largest magnitude and, below 2^-2, multiplies A by a power of two
// (exact) so that small activations do not make subnormal products (a_scale_exponent); the
// row sums are multiplied back. A chunk whose sum is not finite (in fp16, 8 products of
// activations above ~8000 can overflow; inf / NaN activations) is redone in float32 from the
// same registers, so no fp16 overflow reaches the output.
//
// Thread mapping: 8 warps a CTA, warp w owns ROWS consecutive weight rows; lane l reads
// chunks l, l + 32, ... of each row (a warp reads 512 contiguous bytes of a row per load),
// UNROLL chunks a row in flight: a chunk's registers are refilled with the chunk UNROLL * 32
// ahead as soon as it is used. The first batch is issued before the CTA builds its byte
// table, so its DRAM latency hides the build. A lane's activation chunk (64 bytes) is shared
// by the ROWS rows; STAGED reads it from a copy of A in shared memory (conflict-free
// 16-byte loads), which took the L1 throughput of 28672 x 8192 from ~80% to ~60% (ncu).
namespace {

constexpr int kHalfWarps = 8;
constexpr int kHalfThreads = 32 * kHalfWarps;

// a * b + c on two packed 16-bit values of Fmt (round to nearest even), and their widening.
template <class Fmt>
__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c);
template <>
__device__ __forceinline__ u32 fma2<Float16>(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
template <>
__device__ __forceinline__ u32 fma2<BFloat16>(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <class Fmt>
__device__ __forceinline__ float2 pair_to_float2(u32 h);
template <>
__device__ __forceinline__ float2 pair_to_float2<Float16>(u32 h) {
  float2 f;
  asm("{.reg .f16 lo, hi;\n\tmov.b32 {lo, hi}, %2;\n\tcvt.f32.f16 %0, lo;\n\tcvt.f32.f16 %1, hi;\n\t}"
      : "=f"(f.x), "=f"(f.y)
      : "r"(h));
  return f;
}
template <>
__device__ __forceinline__ float2 pair_to_float2<BFloat16>(u32 h) {
  return make_float2(__uint_as_float(h << 16), __uint_as_float(h & 0xFFFF0000u));
}

// fp16's range guard (the sums of a chunk are fp16 only for Float16 activations).
template <class Fmt>
struct SumsInHalf {
  static constexpr bool value = false;
};
template <>
struct SumsInHalf<Float16> {
  static constexpr bool value = true;
};

// max(m, |each of the 8 fp16 values of a 16-byte unit|) on packed pairs, as 16-bit integers:
// a magnitude's bits order as its value does, with a NaN above inf (then every output of the
// product is NaN whatever the scale, and a_scale_exponent gives 0 for it as for inf).
__device__ __forceinline__ u32 unit_absmax2(u32 m, const uint4& v) {
#pragma unroll
  for (int q = 0; q < 4; ++q) asm("max.u16x2 %0, %1, %2;" : "=r"(m) : "r"(m), "r"(q4::word_of(v, q) & 0x7FFF7FFFu));
  return m;
}

// k such that fp16 activations are multiplied by 2^k (exactly) before the fp16 sums, from
// their largest magnitude: below 2^-2 they are raised to [2^10, 2^11) (at most by 2^15), so
// that the products of small activations are not fp16 subnormals (and 8 products stay far
// from overflow); otherwise k = 0, and a chunk whose 8-product sums overflow is redone in
// float32.
__device__ __forceinline__ int a_scale_exponent(float amax) {
  const int e = (int)((__float_as_uint(amax) >> 23) & 0xFFu) - 127;  // floor(log2(amax))
  return amax > 0.0f && amax < 0.25f ? min(15, 10 - e) : 0;
}

__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
  u32 d;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

__device__ __forceinline__ uint4 scale_unit(const uint4& v, u32 scale2) {
  return make_uint4(hmul2(v.x, scale2), hmul2(v.y, scale2), hmul2(v.z, scale2), hmul2(v.w, scale2));
}

__device__ __forceinline__ bool is_finite(float f) { return (__float_as_uint(f) & 0x7F800000u) != 0x7F800000u; }

// A packed byte's code pair from the CTA's byte table (q4::fill_byte_table), for a lane.
// Narrow (WIDE = false): the tensor-core kernels' table, entries 128 bytes apart, replica
// `lane` at word `lane`: a PRMT takes the byte out, a LEA makes its address, then the load.
// Wide: entries 256 bytes apart (the upper 128 bytes of each unused), so that one PRMT puts
// the byte in bits 8..15 beside 4 * lane in bits 0..7, which is the whole offset, and the
// load adds the table's base: one instruction a byte fewer (the same banks, the same
// values), for 64 KB of shared memory instead of 32.
template <bool WIDE>
struct ByteLookup {
  u32 base;   // shared address of the table
  u32 lane4;  // 4 * lane (< 128)

  // byte b (0..3, a constant once unrolled) of the word
  __device__ __forceinline__ u32 at(u32 word, int b) const {
    if constexpr (WIDE) {
      u32 offset;  // (an explicit PRMT: __byte_perm compiled to more instructions here)
      asm("prmt.b32 %0, %1, %2, %3;" : "=r"(offset) : "r"(word), "r"(lane4), "r"(0x5504u | ((u32)b << 4)));
      return q4::load_shared32(base + offset);
    } else {
      return q4::lut_at(base + lane4, q4::byte_of(word, b));
    }
  }
};

// sum_j code[q_j] * a_j over one 32-element chunk: w its 16 packed bytes, x its 32 fp16
// activations (64 bytes), both in k order.
template <class Fmt, bool WIDE>
__device__ __forceinline__ float chunk_dot_half(const uint4& w, const uint4 (&x)[4], const ByteLookup<WIDE>& lut) {
  u32 h0 = 0u, h1 = 0u;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const u32 word = q4::word_of(w, q);
#pragma unroll
    for (int b = 0; b < 4; b += 2) {
      h0 = fma2<Fmt>(lut.at(word, b), q4::word_of(x[q], b), h0);
      h1 = fma2<Fmt>(lut.at(word, b + 1), q4::word_of(x[q], b + 1), h1);
    }
  }
  const float2 f0 = pair_to_float2<Fmt>(h0), f1 = pair_to_float2<Fmt>(h1);
  float f = (f0.x + f0.y) + (f1.x + f1.y);
  if (!is_finite(f)) {  // rare: redo in float32 (inf / NaN activations stay inf / NaN)
    f = 0.0f;
#pragma unroll 1
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const float2 c = pair_to_float2<Fmt>(lut.at(q4::word_of(w, q), b));
        const float2 a = pair_to_float2<Fmt>(q4::word_of(x[q], b));
        f = fmaf(c.y, a.y, fmaf(c.x, a.x, f));
      }
    }
  }
  return f;
}

// The 16 packed bytes and the scale of chunk c of each of the warp's rows; nothing past K
// (those registers are never read). chunk0[r]: the flat index of row r's first 32-element
// chunk (the launcher keeps N * K / 32 below 2^32). TILED: the weight is stored in 16-row x
// 128-k tiles (gemm_4bit.cu's data layout; N % 16 == 0, K % 128 == 0), where chunk c of row
// r is 16-byte unit unit0[r] + 64 (c / 4) + c % 4, unit0[r] = 64 (r / 16) (K / 128) + 4 (r % 16).
template <bool NESTED, int ROWS, bool TILED = false>
__device__ __forceinline__ void fetch_chunk(uint4 (&w)[ROWS], float (&sv)[ROWS], u32 (&sq)[ROWS],
                                            const u32 (&chunk0)[ROWS], int c, int chunks,
                                            const u8* __restrict__ packed, const float* __restrict__ absmax,
                                            const u8* __restrict__ qabsmax, const float* __restrict__ nested_absmax,
                                            int chunk_shift, const u32 (&unit0)[ROWS]) {
  if (c < chunks) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const u32 chunk = chunk0[r] + (u32)c;
      const u32 unit = TILED ? unit0[r] + ((u32)c >> 2) * 64u + ((u32)c & 3u) : chunk;
      w[r] = q4::load_stream16(packed + 16 * (u64)unit);
      q4::scale_fetch<NESTED>(chunk >> chunk_shift, absmax, qabsmax, nested_absmax, sv[r], sq[r]);
    }
  }
}

}  // namespace

// Position of activation unit u (16 bytes) in the staged copy: the low 3 bits of u are XORed
// with bits 3..5, inside its 128-byte group, so that the 8 lanes of a quarter warp, which
// read units 4c + i of 8 consecutive chunks c, hit 8 distinct 16-byte bank groups.
__device__ __forceinline__ int staged_unit(int u) { return u ^ ((u >> 3) & 7); }

// The 32 activations (four 16-byte units 4c .. 4c + 3) of chunk c from the staged copy at
// shared address `stage`: units 4c + i sit at (4c ^ s) ^ i, s = (c >> 1) & 7.
__device__ __forceinline__ void load_staged_chunk(u32 stage, int c, uint4 (&x)[4]) {
  const u32 off0 = 16u * (u32)((4 * c) ^ ((c >> 1) & 7));
#pragma unroll
  for (int i = 0; i < 4; ++i)
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(x[i].x), "=r"(x[i].y), "=r"(x[i].z), "=r"(x[i].w)
                 : "r"(stage + (off0 ^ (16u * i))));
}

// 2^k in both fp16 halves of a word (-14 <= k <= 15).
__device__ __forceinline__ u32 half2_power_of_two(int k) { return ((u32)(k + 15) << 10) * 0x10001u; }

// 2^-k as a float32: what the row sums of A taken as 2^k times its value are scaled back by.
__device__ __forceinline__ float power_of_two_inverse(int k) { return __uint_as_float((u32)(127 - k) << 23); }

// A's first kHeadUnits 16-byte units a thread (units threadIdx.x + kHalfThreads q), loaded
// before the weights (as q4::ByteTableInputs) and handed to prepare_activations (HEAD).
constexpr int kHeadUnits = 2;
struct ActivationHead {
  uint4 unit[kHeadUnits];

  __device__ __forceinline__ void load(const u16* __restrict__ A, int K) {
#pragma unroll
    for (int q = 0; q < kHeadUnits; ++q) {
      const int u = threadIdx.x + kHalfThreads * q;
      if (u < (K >> 3)) unit[q] = q4::load_cached16(reinterpret_cast<const uint4*>(A) + u);
    }
  }
};

// fp16's range guard after prepare_activations' barrier: k from the warps' maxima in amax_s.
__device__ __forceinline__ int guard_exponent(const u32* amax_s) {
  const uint4 lo = reinterpret_cast<const uint4*>(amax_s)[0], hi = reinterpret_cast<const uint4*>(amax_s)[1];
  const u32 m = max(max(max(lo.x, lo.y), max(lo.z, lo.w)), max(max(hi.x, hi.y), max(hi.z, hi.w)));
  return a_scale_exponent(pair_to_float2<Float16>(m).x);
}

// The staged copy of A times 2^k (k != 0, the CTA's: every thread calls it), then a barrier.
__device__ __forceinline__ void rescale_staged(uint4* staged_a, int K, int k) {
  const u32 scale2 = half2_power_of_two(k);
  for (int u = threadIdx.x; u < (K >> 3); u += kHalfThreads)
    staged_a[staged_unit(u)] = scale_unit(staged_a[staged_unit(u)], scale2);
  __syncthreads();
}

// fp16's range guard read late, once a warp's first batch is multiplied (every thread of the
// CTA calls it): k from the warps' maxima (guard_exponent); where k != 0 the staged copy is
// rescaled and `redo` multiplies the first batch again on it, so every sum is the one an
// early read gives. Returns k.
template <class Redo>
__device__ __forceinline__ int read_guard_late(const u32* amax_s, uint4* staged_a, int K, Redo&& redo) {
  const int k = guard_exponent(amax_s);
  if (k != 0) {  // k is the CTA's: the barriers are reached by all threads or none
    __syncthreads();  // every warp is done with the unscaled copy
    rescale_staged(staged_a, K, k);
    redo();
  }
  return k;
}

// The one-token kernels' activation prologue, run by every thread of a CTA of kHalfThreads:
// STAGED copies A (K fp16 / bf16 values) into staged_a at staged_unit positions; for fp16 it
// also finds A's largest magnitude and returns k such that the kernel may treat A as 2^k
// times its value (a_scale_exponent; a staged copy is rescaled here, an unstaged A is scaled
// by the caller as it is read), else 0. Ends with a barrier (two where a staged copy is
// rescaled). HEAD: A's first units come from `head` (ActivationHead::load, called earlier).
// DEFER_GUARD: the warps' maxima are left in amax_s, k is not read (0 is returned); the
// caller reads it later and rescales the staged copy itself (read_guard_late).
template <class Fmt, bool STAGED, bool HEAD, bool DEFER_GUARD = false>
__device__ __forceinline__ int prepare_activations(const u16* __restrict__ A, int K, uint4* staged_a, u32* amax_s,
                                                   const ActivationHead& head) {
  constexpr bool kGuard = SumsInHalf<Fmt>::value;
  static_assert(kHalfWarps == 8, "the warps' maxima are read back as two uint4");
  const uint4* a16 = reinterpret_cast<const uint4*>(A);
  u32 amax2 = 0u;
  // (q: the head's slot while q < kHeadUnits)
  for (int u = threadIdx.x, q = 0; (STAGED || kGuard) && u < (K >> 3); u += kHalfThreads, ++q) {
    uint4 v;
    if (HEAD && q < kHeadUnits) {
      v = head.unit[0];
#pragma unroll
      for (int i = 1; i < kHeadUnits; ++i) v = q == i ? head.unit[i] : v;
    } else {
      v = q4::load_cached16(a16 + u);
    }
    if constexpr (STAGED) staged_a[staged_unit(u)] = v;
    if constexpr (kGuard) amax2 = unit_absmax2(amax2, v);
  }
  if constexpr (kGuard) {  // the warp's largest magnitude, by one integer reduction
    const u32 amax = __reduce_max_sync(0xffffffffu, max(amax2 & 0xFFFFu, amax2 >> 16));
    if ((threadIdx.x & 31) == 0) amax_s[threadIdx.x >> 5] = amax;
  }
  __syncthreads();
  int k = 0;  // A counts 2^k times its value from here on; the row sums are scaled back
  if constexpr (kGuard && !DEFER_GUARD) k = guard_exponent(amax_s);
  if constexpr (STAGED && kGuard && !DEFER_GUARD) {
    if (k != 0) rescale_staged(staged_a, K, k);  // k is the CTA's: the barrier is reached by all threads or none
  }
  return k;
}

// grid ceil(N / (8 * ROWS)), block 256; CTAS: the CTAs an SM the registers are bounded for.
// STAGED: A is copied into dynamic shared memory first, 16-byte units at staged_unit
// positions (ceil(K / 64) * 128 bytes); otherwise each warp reads it through L1, where a
// lane's four 16-byte loads 64 bytes apart touch twice the sectors they use. TILED: the
// weight in 16-row x 128-k tiles (fetch_chunk).
// PROLOGUE_FIRST: the prologue's global loads (the byte table's inputs, A's head) are issued
// before the first UNROLL batches of weights, not after them: a load issued after a warp's
// weight loads waits behind them, and the table and A gate every multiply. The launcher
// takes it where the grid is one wave and a CTA's weights are short (_prologue_first in
// matmul_4bit.py; H100, one fp16 token, 4096 x 4096: 7.35 -> 6.95 us, tiled 7.23 -> 6.42,
// NOTES_matmul_4bit.md run 46). Elsewhere the weights first do better (28672 x 8192 tiled:
// 49.8 against 50.5 us with the prologue first): a CTA of a later wave, or with a long
// stream of weights, then starts that stream at once.
// STAGED builds multiply their first batch outside the chunk loop (kPeelFirst), and in fp16
// read the range guard after it, not right after the prologue's barrier (kDeferGuard, below).
template <class Fmt, bool NESTED, int ROWS, int UNROLL, int CTAS, bool STAGED, bool TILED = false,
          bool PROLOGUE_FIRST = false>
__global__ void __launch_bounds__(kHalfThreads, CTAS)
gemv_4bit_half(const u16* __restrict__ A, const u8* __restrict__ packed, const float* __restrict__ table,
               const float* __restrict__ absmax, const u8* __restrict__ qabsmax, const float* __restrict__ code2,
               const float* __restrict__ nested_absmax, const float* __restrict__ offset, const u16* __restrict__ bias,
               u16* __restrict__ out, int M, int N, int K, int block_shift, int has_bias) {
  __shared__ __align__(16) u32 lut[256 * 32];
  __shared__ float code2_s[NESTED ? 256 : 1];
  __shared__ __align__(16) u32 amax_s[kHalfWarps];  // the warps' largest |A| (fp16 bits)
  extern __shared__ __align__(16) uint4 staged_a[];
  constexpr int kStep = 32 * UNROLL;  // chunks a warp's row advances per batch
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kHalfWarps + (threadIdx.x >> 5)) * ROWS;
  const int chunks = K >> 5;
  const int chunk_shift = block_shift - 5;  // blocks hold >= 32 elements
  u32 chunk0[ROWS];  // flat chunk index of each weight row's start (rows past N clamped)
#pragma unroll
  for (int r = 0; r < ROWS; ++r) chunk0[r] = (u32)min(row0 + r, N - 1) * (u32)chunks;
  u32 unit0[ROWS];  // TILED: the 16-byte unit of each row's chunk 0 (see fetch_chunk)
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const u32 row = (u32)min(row0 + r, N - 1);
    unit0[r] = TILED ? (row >> 4) * (u32)(chunks >> 2) * 64u + (row & 15u) * 4u : 0u;
  }

  constexpr bool kHead = STAGED || SumsInHalf<Fmt>::value;  // prepare_activations reads A
  q4::ByteTableInputs<Fmt, NESTED, kHalfThreads> table_inputs;
  ActivationHead head;
  if constexpr (PROLOGUE_FIRST) {
    table_inputs.load(table, code2);
    if (kHead) head.load(A, K);
  }
  uint4 w[UNROLL][ROWS];
  float sv[UNROLL][ROWS];
  u32 sq[UNROLL][ROWS];
  auto fetch = [&](int u, int c) {  // chunk c of each of the warp's rows into slot u (nothing past K)
    fetch_chunk<NESTED, ROWS, TILED>(w[u], sv[u], sq[u], chunk0, c, chunks, packed, absmax, qabsmax, nested_absmax,
                                     chunk_shift, unit0);
  };
  const int first = row0 < N ? lane : chunks;  // a warp past N loads nothing
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) fetch(u, first + 32 * u);
  if constexpr (PROLOGUE_FIRST) {
    table_inputs.fill(lut, code2_s);
  } else {
    q4::fill_byte_table<Fmt, NESTED, kHalfThreads>(lut, code2_s, table, code2);
  }
  // Staged builds multiply the first batch outside the chunk loop and read fp16's range guard
  // after it (below).
  constexpr bool kPeelFirst = STAGED;
  constexpr bool kDeferGuard = SumsInHalf<Fmt>::value && kPeelFirst;
  int k = prepare_activations<Fmt, STAGED, PROLOGUE_FIRST, kDeferGuard>(A, K, staged_a, amax_s, head);
  const u32 scale2 = half2_power_of_two(k);  // (read by unstaged builds only, which never defer)
  float unscale = power_of_two_inverse(k);  // (a deferred guard sets it again)
  if (!kDeferGuard && row0 >= N) return;  // no barrier follows (a deferred guard's may)

  const float off = NESTED ? __ldg(offset) : 0.0f;
  const ByteLookup<false> lookup{q4::shared_address(lut), 4u * (u32)lane};
  const u32 stage = q4::shared_address(staged_a);
  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
  auto multiply_batch = [&](int c0) {  // chunks c0 + 32 u, each slot refilled with the chunk kStep on
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int c = c0 + 32 * u;
      if (c >= chunks) break;
      uint4 x[4];
      if constexpr (STAGED) {
        load_staged_chunk(stage, c, x);
      } else {
        const uint4* a = reinterpret_cast<const uint4*>(A + 32 * c);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          x[i] = q4::load_cached16(a + i);
          if (SumsInHalf<Fmt>::value && k != 0) x[i] = scale_unit(x[i], scale2);  // k is the CTA's: no divergence
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float s = q4::scale_decode<NESTED>(sv[u][r], sq[u][r], code2_s, off);
        acc[r] = fmaf(chunk_dot_half<Fmt>(w[u][r], x, lookup), s, acc[r]);
      }
      fetch(u, c + kStep);
    }
  };
  // STAGED builds multiply the first batch outside the loop, as gemv_4bit_tiled's builds of
  // two CTAs an SM do. H100, one bf16 token, us, looped / peeled (NOTES_matmul_4bit.md runs
  // 135-136): 28672 x 8192 (2x2c3) 47.38 / 46.99, 11008 x 4096 (4x1c3) 12.14 / 11.92, 4096 x
  // 4096 (2x2c3) 6.94 / 6.90, 8192 x 28672 (4x2c2) 46.52 / 46.50; the unstaged build loses
  // (4096 x 4096, forced: 7.64 / 7.95) and keeps the loop.
  if constexpr (kPeelFirst) {
    int c0 = first;
    if (c0 < chunks) multiply_batch(c0);
    if constexpr (kDeferGuard) {
      // As in gemv_4bit_tiled: the guard is read once the first batch is multiplied and its
      // refills are in flight; where k != 0 the first batch is fetched again and multiplied on
      // the rescaled copy (same bits as the guard read first). Warps past N stay for the
      // barriers and multiply nothing. H100, one fp16 token, us, read first / deferred
      // (NOTES_matmul_4bit.md run 133): 4096 x 4096 (2x2c3) 6.94 / 6.49, 4096 x 11008 13.51 /
      // 12.91, 28672 x 8192 (2x2c3) 48.40 / 47.60, 8192 x 28672 (4x2c2) 46.88 / 46.40;
      // 11008 x 4096 (4x1c3) 12.15 / 12.22. Unlike the tiled kernel's, builds of three CTAs an
      // SM gain too, so every staged one defers.
      k = read_guard_late(amax_s, staged_a, K, [&] {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
        if (c0 < chunks) {
#pragma unroll
          for (int u = 0; u < UNROLL; ++u) fetch(u, c0 + 32 * u);
          multiply_batch(c0);
        }
      });
      unscale = power_of_two_inverse(k);
    }
    for (c0 += kStep; c0 < chunks; c0 += kStep) multiply_batch(c0);
  } else {
    for (int c0 = lane; c0 < chunks; c0 += kStep) multiply_batch(c0);
  }

#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float v = q4::warp_sum(acc[r]) * unscale;
    const int row = row0 + r;
    if (lane == r && row < N) {
      const float b = has_bias ? Fmt::to_float(bias[row]) : 0.0f;
      out[row] = Fmt::from_float(__fadd_rn(v, b));
    }
  }
}

// ---------------------------------------------------------------------------------------
// gemv_4bit_tiled<Fmt, NESTED, STRIPS, UNROLL, CTAS>: gemv_4bit_half's one-token product on
// a weight stored in 16-row x 128-k tiles (cupyquant.tiled_4bit; N % 16 == 0, K % 128 ==
// 0), read in the tiles' own order. Same arguments, same per-chunk arithmetic (chunk_dot_half,
// the fp16 range guard, A staged in shared memory), so it differs from gemv_4bit_half only
// in the order the float32 chunk sums are added.
//
// gemv_4bit_half on tiles reads each row's chunks across the tiles (a warp load: 8 runs of
// 64 bytes, 1 KB apart). Here a warp reads whole tiles: lane l loads 16-byte units l and
// l + 32 of a tile (its 1 KB is contiguous), which are chunk l % 4 of the tile's rows l / 4
// and l / 4 + 8; both meet the same 32 activations. A CTA of 8 warps owns STRIPS strips of
// 16 rows; the 8 / STRIPS warps of a strip (its parts) take its tiles in turn (part p:
// tiles p, p + 8 / STRIPS, ...), so the warps of a CTA read neighbouring tiles. UNROLL
// tiles a warp are in flight, each refilled with the tile UNROLL turns ahead once used.
// A row's sum: over its four lanes (chunks l % 4 of every tile) by shuffles, then over the
// strip's parts in order through shared memory; deterministic for a given configuration.
//
// grid ceil(N / (16 * STRIPS)), block 256, dynamic shared memory K * 2 bytes (staged A);
// PROLOGUE_FIRST as gemv_4bit_half's. AHEAD: the tiles a warp requests before the prologue
// (the rest of its first UNROLL right after the prologue's barrier). The launcher takes 1
// for bf16 with PROLOGUE_FIRST: without fp16's range check its prologue is short, and fewer
// weight bytes requested ahead let its loads land sooner (H100, one token, 4096 x 4096 6.73
// -> 6.45 us, 11008 x 4096 12.12 -> 11.83; fp16 loses 0.1-0.2 with it; NOTES_matmul_4bit.md
// run 48). fp16's WIDE builds take 1 too, since they read the guard late (run 137: 4096 x
// 4096 6.15 -> 6.04, 4096 x 11008 12.26 -> 11.97).
// WIDE: the wide byte table (ByteLookup), first in the dynamic shared memory (kWideTableBytes,
// then A). Its multiplies issue ~17% fewer instructions (SASS of the 1x2c3 builds); the
// launcher takes it where two of its CTAs an SM hold the grid in one wave (_tgemv_wide).
// H100, one token, us, narrow / wide (fp16, bf16; same bits; NOTES_matmul_4bit.md run 125):
// 4096 x 4096 6.45 / 6.36, 6.40 / 6.17; 2048 x 4096 5.16 / 4.95, 5.29 / 4.91; 4096 x 11008
// 12.88 / 12.39, 12.62 / 12.08; 4096 x 14336 15.93 / 15.02, 15.55 / 14.69. Elsewhere its
// footprint costs more than it saves (28672 x 8192: 49.9 / 52.0, run 123).
// Builds of at most two CTAs an SM (WIDE, or CTAS < 3) multiply their first batch outside the
// tile loop (kPeelFirst), and in fp16 read the range guard after it, not right after the
// prologue's barrier (kDeferGuard, below).
constexpr int kWideTableBytes = 256 * 256;

template <class Fmt, bool NESTED, int STRIPS, int UNROLL, int CTAS, bool PROLOGUE_FIRST = false, int AHEAD = UNROLL,
          bool WIDE = false>
__global__ void __launch_bounds__(kHalfThreads, CTAS)
gemv_4bit_tiled(const u16* __restrict__ A, const u8* __restrict__ packed, const float* __restrict__ table,
                const float* __restrict__ absmax, const u8* __restrict__ qabsmax, const float* __restrict__ code2,
                const float* __restrict__ nested_absmax, const float* __restrict__ offset, const u16* __restrict__ bias,
                u16* __restrict__ out, int M, int N, int K, int block_shift, int has_bias) {
  static_assert(kHalfWarps % STRIPS == 0, "the warps of a CTA split evenly over its strips");
  constexpr int kParts = kHalfWarps / STRIPS;  // warps a strip
  __shared__ __align__(16) u32 narrow_lut[WIDE ? 4 : 256 * 32];
  __shared__ float code2_s[NESTED ? 256 : 1];
  __shared__ __align__(16) u32 amax_s[kHalfWarps];  // the warps' largest |A| (fp16 bits)
  __shared__ float part_sums[kHalfWarps][16];
  extern __shared__ __align__(16) uint4 dynamic_smem[];
  u32* lut = WIDE ? reinterpret_cast<u32*>(dynamic_smem) : narrow_lut;
  uint4* staged_a = WIDE ? dynamic_smem + kWideTableBytes / 16 : dynamic_smem;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int strip = blockIdx.x * STRIPS + warp / kParts, part = warp % kParts;
  const int tiles = K >> 7;   // 128-k tiles a row
  const int chunks = K >> 5;  // 32-element chunks a row
  const int chunk_shift = block_shift - 5;  // blocks hold >= 32 elements
  const int tile_row = lane >> 2, tile_chunk = lane & 3;
  // this lane's two rows (a strip past N, in the grid's last CTA, loads nothing)
  const bool live = strip < (N >> 4);
  const u32 row = (u32)(16 * strip + tile_row);
  const u32 chunk0[2] = {row * (u32)chunks + (u32)tile_chunk, (row + 8u) * (u32)chunks + (u32)tile_chunk};
  const u8* strip_bytes = packed + (u64)strip * (u64)tiles * 1024u + 16u * (u32)lane;

  q4::ByteTableInputs<Fmt, NESTED, kHalfThreads> table_inputs;
  ActivationHead head;
  if constexpr (PROLOGUE_FIRST) {
    table_inputs.load(table, code2);
    head.load(A, K);
  }
  uint4 w[UNROLL][2];
  float sv[UNROLL][2];
  u32 sq[UNROLL][2];
  auto fetch = [&](int u, int t) {  // tile t of the strip into slot u (nothing past the row)
    if (live && t < tiles) {
      const u8* p = strip_bytes + (u64)t * 1024u;
      w[u][0] = q4::load_stream16(p);
      w[u][1] = q4::load_stream16(p + 512);
#pragma unroll
      for (int h = 0; h < 2; ++h)
        q4::scale_fetch<NESTED>((chunk0[h] + 4u * (u32)t) >> chunk_shift, absmax, qabsmax, nested_absmax, sv[u][h],
                                sq[u][h]);
    }
  };
#pragma unroll
  for (int u = 0; u < AHEAD; ++u) fetch(u, part + kParts * u);
  if constexpr (PROLOGUE_FIRST) {
    table_inputs.template fill<WIDE>(lut, code2_s);
  } else {
    q4::fill_byte_table<Fmt, NESTED, kHalfThreads, WIDE>(lut, code2_s, table, code2);
  }
  // Builds of at most two CTAs an SM multiply their first batch outside the tile loop, and
  // read fp16's range guard after it (below).
  constexpr bool kPeelFirst = WIDE || CTAS < 3;
  constexpr bool kDeferGuard = SumsInHalf<Fmt>::value && kPeelFirst;
  int k = prepare_activations<Fmt, true, PROLOGUE_FIRST, kDeferGuard>(A, K, staged_a, amax_s, head);
  float unscale = power_of_two_inverse(k);  // (a deferred guard sets it again)
#pragma unroll
  for (int u = AHEAD; u < UNROLL; ++u) fetch(u, part + kParts * u);

  const float off = NESTED ? __ldg(offset) : 0.0f;
  const ByteLookup<WIDE> lookup{q4::shared_address(lut), 4u * (u32)lane};
  const u32 stage = q4::shared_address(staged_a);
  float acc[2] = {0.0f, 0.0f};
  constexpr int kStep = kParts * UNROLL;  // tiles a part advances per batch
  auto multiply_batch = [&](int t0) {  // tiles t0 + kParts u, each slot refilled with the tile kStep on
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int t = t0 + kParts * u;
      if (t >= tiles) break;
      uint4 x[4];
      load_staged_chunk(stage, 4 * t + tile_chunk, x);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float s = q4::scale_decode<NESTED>(sv[u][h], sq[u][h], code2_s, off);
        acc[h] = fmaf(chunk_dot_half<Fmt>(w[u][h], x, lookup), s, acc[h]);
      }
      fetch(u, t + kStep);
    }
  };
  if constexpr (kPeelFirst) {
    // The first batch out of the loop: ptxas then schedules it apart from the refilling
    // loop, which gains wherever at most two CTAs share an SM and loses with three narrow
    // ones, whose other CTAs' warps fill the wait anyway. H100, one bf16 token, us, looped /
    // peeled (NOTES_matmul_4bit.md run 135): 4096 x 4096 (wide) 6.14 / 5.98, 4096 x 11008
    // (wide) 12.10 / 11.87, 28672 x 8192 (2x3c2) 49.30 / 49.27; 11008 x 4096 (2x2c3) 11.83
    // / 12.06, and fp16 6144 x 4096 (1x2c3) 7.63 / 8.23.
    int t0 = live ? part : tiles;
    if (t0 < tiles) multiply_batch(t0);
    if constexpr (kDeferGuard) {
      // fp16's range guard is read once the first batch is multiplied, its refills in flight:
      // read right after the barrier, it holds up every warp's first multiply. Where k != 0
      // (A's largest magnitude below 2^-2) the first batch is fetched and multiplied again.
      // H100, one fp16 token, us, read first / deferred (NOTES_matmul_4bit.md run 132): 4096
      // x 4096 6.33 / 6.22, 2048 x 4096 5.01 / 4.90, 28672 x 8192 49.30 / 48.68, 32000 x
      // 4096 28.84 / 28.09.
      k = read_guard_late(amax_s, staged_a, K, [&] {
        acc[0] = acc[1] = 0.0f;
        if (t0 < tiles) {
#pragma unroll
          for (int u = 0; u < UNROLL; ++u) fetch(u, t0 + kParts * u);
          multiply_batch(t0);
        }
      });
      unscale = power_of_two_inverse(k);
    }
    for (t0 += kStep; t0 < tiles; t0 += kStep) multiply_batch(t0);
  } else {
    for (int t0 = live ? part : tiles; t0 < tiles; t0 += kStep) multiply_batch(t0);
  }
  // the four lanes of a row (chunks 0..3 of each tile), then the strip's parts in order
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    acc[h] += __shfl_xor_sync(0xffffffffu, acc[h], 1);
    acc[h] += __shfl_xor_sync(0xffffffffu, acc[h], 2);
  }
  if (tile_chunk == 0) {
    part_sums[warp][tile_row] = acc[0];
    part_sums[warp][tile_row + 8] = acc[1];
  }
  __syncthreads();
  if (threadIdx.x < 16 * STRIPS) {
    const int s = threadIdx.x >> 4, r = threadIdx.x & 15;
    const int out_row = 16 * (blockIdx.x * STRIPS + s) + r;
    if (out_row < N) {
      float v = part_sums[s * kParts][r];
#pragma unroll
      for (int p = 1; p < kParts; ++p) v += part_sums[s * kParts + p][r];
      const float b = has_bias ? Fmt::to_float(bias[out_row]) : 0.0f;
      out[out_row] = Fmt::from_float(__fadd_rn(v * unscale, b));
    }
  }
}
