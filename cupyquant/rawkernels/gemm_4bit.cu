// Fused 4-bit matrix product on tensor cores (mma.sync m16n8k16, float32 accumulators):
// out[m, n] = sum_k A[m, k] * W[n, k] (+ bias[n]) for fp16 / bf16 activations and few
// tokens (1 .. 64 per CTA; more through token chunks), from bitsandbytes-packed NF4 / FP4.
// Four kernels share the layouts below: gemm_4bit_mma (activation fragments from global
// memory, split-K for narrow weights), gemm_4bit_small (<= 16 tokens, RT row tiles a
// warp), gemm_4bit_stage (gemm_4bit_small with the weights copied through shared memory in
// long row runs, for long K) and gemm_4bit_tile (activations staged in shared memory for a
// CTA's 64 * RT rows).
//
// Data layout
//   A        u16[M, K]                fp16 or bf16 activations, row-major, 16-byte aligned
//   packed   u8[(N*K + 1) / 2]        W (N, K) flattened row-major, flat element 2j in the
//                                     HIGH nibble of byte j; 16-byte aligned
//            or, TILED (every kernel here but gemm_4bit_stage; N % 16 == 0,
//            K % 128 == 0), the same bytes in 16-row x 128-k tiles: tile (r, s) = rows
//            16r..16r+15, segment s, at byte ((r * K / 128 + s) * 16 + row % 16) * 64, each
//            row's 64 bytes of the segment in order (cupyquant/tiled_4bit.py). A warp's
//            16-byte loads of rows g and g + 8 then read two runs of 512 contiguous bytes,
//            where the row-major layout gives 8 runs of 64 bytes a row apart.
//   table    float32[16]              value of each code (FP4 index 8 is -0.0)
//   absmax / qabsmax, code2, nested_absmax, offset: the scales, as in gemv_4bit.cu
//   bias     u16[N] (has_bias != 0);  out u16[M, N] row-major, rounded once from float32
//   Requires K % 32 == 0, so every weight row starts 16-byte aligned and every 32-element
//   chunk of a row lies inside one quantization block (blocks are >= 32, at multiples of 32).
//
// The product is computed transposed, C^T = W * A^T: the weight is the mma's A operand
// (16 weight rows x 16 k) and the activations its B operand (16 k x 8 tokens), so one
// m16n8k16 consumes 256 weights, and a single token wastes only tensor-core cycles.
//
// Thread mapping: a CTA of 4 warps. blockIdx.x = group * token_chunks + chunk, so the CTAs
// that read the same weights for different 8*MT-token chunks run side by side and share
// them through L2. Warp w of a group owns the 16-row tile  group * (4 / ksplit) + w / ksplit
// and the kpart = w % ksplit-th contiguous share of the row's 128-element segments (split-K
// inside the CTA, summed through shared memory at the end, for shapes with few rows).
// Lane (g, t) = (lane / 4, lane % 4) loads, per segment, the 16 packed bytes (32 elements,
// k in [32t, 32t + 32) of the segment) of weight rows g and g + 8 with one 16-byte load
// each, D = 4 segments in flight.
//
// k permutation. A dot product may visit k in any order as long as both operands use the
// same one. mma's A fragment gives lane (g, t) the k slots {2t, 2t+1, 2t+8, 2t+9} and its B
// fragment gives lane (g', t) the same slots, so step s (0..7) of a segment maps
//   slots 2t, 2t+1   -> k = 32t + 4s + {0, 1}  = packed byte 2s   of the lane's chunk
//   slots 2t+8, 2t+9 -> k = 32t + 4s + {2, 3}  = packed byte 2s+1 of the lane's chunk
// A byte's high nibble is its lower k, and the lower 16 bits of a fragment register hold
// the lower slot, so each packed byte becomes exactly one fragment register; the matching
// activations are the lane's own 64 contiguous bytes (four 16-byte loads), words 2s, 2s+1.
//
// Dequantization: a shared table maps a packed byte to the pair (code[hi], code[lo]) in
// the activation format, replicated 32 times ([byte][lane]) so a warp's 32 lookups always
// hit 32 distinct banks; the pair is multiplied by the block's scale (rounded to the
// activation format) with one packed half2 / bfloat162 multiply.
#include "matmul_4bit.cuh"

namespace {

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kSegment = 128;  // k per segment: 4 lanes x 32 elements
constexpr int kInFlight = 4;   // segments whose weights are loaded ahead

using q4::byte_of;
using q4::cp_async16;
using q4::cp_async_commit;
using q4::cp_async_wait;
using q4::mul2;
using q4::fill_byte_table;
using q4::lut_at;
using q4::pack2;
using q4::shared_address;
using q4::tiled_chunk;

// 0, made from `word` so that a load whose address adds it is issued only once the load
// that produced `word` is in: a shift by at_least_32 >= 32, which PTX clamps to a shift by
// 32. The amount is a run-time value, so ptxas cannot fold the result away.
__device__ __forceinline__ u32 zero_once_in(u32 word, int at_least_32) {
  u32 z;
  asm("shr.u32 %0, %1, %2;" : "=r"(z) : "r"(word), "r"(at_least_32));
  return z;
}

// The table entry of the byte at bit position p of `word`, lane's replica. The byte
// offset (byte << 7) | (lane << 2) is one shift and one lop3; the table's own address
// folds into the shared load's immediate.
__device__ __forceinline__ u32 lut_entry(const u32* lut, u32 word, int p, u32 lane4) {
  const u32 off = (p >= 7 ? (word >> (p - 7)) : (word << (7 - p))) & 0x7F80u;
  return *reinterpret_cast<const u32*>(reinterpret_cast<const char*>(lut) + (off | lane4));
}

template <class Fmt>
__device__ __forceinline__ void mma16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  if constexpr (Fmt::kIsHalf) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// The A fragments of mma step s (0..7) of a segment for RT row tiles: bytes 2s and 2s + 1
// of the lane's chunks of rows g and g + 8 (w), looked up in the lane's replica of the byte
// table and multiplied by the rows' packed scales (hs).
template <class Fmt, int RT>
__device__ __forceinline__ void weight_frags(u32 (&frag)[RT][4], const uint4 (&w)[RT][2], const u32 (&hs)[RT][2], int s,
                                             u32 lut_lane) {
  const int b = 2 * (s & 1);  // bytes 2s, 2s+1 of the chunk are bytes b, b+1 of word s/2
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
    const u32 lo = q4::word_of(w[rt][0], s >> 1), hi = q4::word_of(w[rt][1], s >> 1);
    frag[rt][0] = mul2<Fmt>(lut_at(lut_lane, byte_of(lo, b)), hs[rt][0]);      // row g,     byte 2s
    frag[rt][1] = mul2<Fmt>(lut_at(lut_lane, byte_of(hi, b)), hs[rt][1]);      // row g + 8, byte 2s
    frag[rt][2] = mul2<Fmt>(lut_at(lut_lane, byte_of(lo, b + 1)), hs[rt][0]);  // row g,     byte 2s+1
    frag[rt][3] = mul2<Fmt>(lut_at(lut_lane, byte_of(hi, b + 1)), hs[rt][1]);  // row g + 8, byte 2s+1
  }
}

// One segment of RT row tiles and MT token tiles: the lane's 16 packed bytes of rows g and
// g + 8 of each tile (w), their scales as packed pairs (hs) and its 64 bytes of activations
// of each token tile (x) through the 8 mma steps of the k permutation above.
template <class Fmt, int RT, int MT>
__device__ __forceinline__ void mma_segment(float (&acc)[RT][MT][4], const uint4 (&w)[RT][2], const u32 (&hs)[RT][2],
                                            const uint4 (&x)[MT][4], u32 lut_lane) {
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    const int b = 2 * (s & 1);  // step s: activation words b, b + 1 of x[j][s / 2]
    u32 frag[RT][4];
    weight_frags<Fmt>(frag, w, hs, s, lut_lane);
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const u32 b0 = q4::word_of(x[j][s >> 1], b), b1 = q4::word_of(x[j][s >> 1], b + 1);
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) mma16816<Fmt>(acc[rt][j], frag[rt], b0, b1);
    }
  }
}

// Split-K inside a CTA: warps kpart = 1 .. ksplit - 1 of a group hand their accumulators to
// its warp kpart = 0 through `red` (the byte table's shared memory: every warp is done with
// it after the first barrier). Every thread of the CTA calls it when ksplit > 1 (barriers).
template <int RT, int MT>
__device__ __forceinline__ void cta_ksplit_sum(float (&acc)[RT][MT][4], float* red, int warp, int lane, int kpart,
                                               int ksplit) {
  constexpr int kPerWarp = RT * MT * 4;  // red: [warp][rt][j][i][lane], conflict-free
  __syncthreads();
  if (kpart != 0) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[(warp * kPerWarp + (rt * MT + j) * 4 + i) * 32 + lane] = acc[rt][j][i];
  }
  __syncthreads();
  if (kpart == 0) {
    for (int p = 1; p < ksplit; ++p)
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[rt][j][i] += red[((warp + p) * kPerWarp + (rt * MT + j) * 4 + i) * 32 + lane];
  }
}

// C fragment register acc[rt][j][i] of row tiles from tile0 and token tiles from tok0,
// plus the bias, rounded once: i = 0..1 row g, tokens 8j + 2t + {0, 1}; i = 2..3 row g + 8.
template <class Fmt>
__device__ __forceinline__ void store_fragment(float value, int rt, int j, int i, int tile0, int tok0, int g, int t,
                                               int M, int N, const u16* __restrict__ bias, int has_bias,
                                               u16* __restrict__ out) {
  const int tok = tok0 + 8 * j + 2 * t + (i & 1);
  const int row = (tile0 + rt) * 16 + g + (i < 2 ? 0 : 8);
  if (tok < M && row < N) {
    const float bv = has_bias ? Fmt::to_float(bias[row]) : 0.0f;
    out[(i64)tok * N + row] = Fmt::from_float(__fadd_rn(value, bv));
  }
}

// The C fragments of row tiles tile0 .. tile0 + RT - 1 and token tiles from tok0.
template <class Fmt, int RT, int MT>
__device__ __forceinline__ void store_tiles(const float (&acc)[RT][MT][4], int tile0, int tok0, int g, int t, int M,
                                            int N, const u16* __restrict__ bias, int has_bias, u16* __restrict__ out) {
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        store_fragment<Fmt>(acc[rt][j][i], rt, j, i, tile0, tok0, g, t, M, N, bias, has_bias, out);
}

// Split-K inside a CTA, then the store (the short-share builds of gemm_4bit_small): the
// ksplit warps of a group (consecutive warps, kpart = warp % ksplit) put their accumulators
// in `red` (the byte table's shared memory: every warp is done with it after the first
// barrier), and each of them sums and stores every ksplit-th of the group's RT * MT * 4
// fragment registers, where cta_ksplit_sum leaves the whole sum and store to the group's
// first warp. The sum adds kpart 0, 1, .. in the same order, so the bits are the same.
// Every thread of the CTA calls it (barriers); with ksplit == 1 each warp stores its tiles.
// Where the split spans all WARPS warps (one group a CTA, as at 4096 x 4096), a warp's
// registers are kpart + WARPS r (with fewer registers than warps, warp kpart sums register
// kpart, and the others have none): all their partials are loaded before the first add, not
// one shared-memory trip an add in a loop over the run-time split, which every warp of the
// CTA waited out after the last barrier. Same sums in the same order. H100, us, loop /
// loaded first (NOTES_matmul_4bit.md run 143): 4096 x 4096 at 16 tokens tiled 8.30 / 7.90,
// row-major 8.89 / 8.56, at 9 tokens 7.78 / 7.43; 8192 x 4096 at 16 tokens 11.78 / 11.24.
template <class Fmt, int RT, int MT, int WARPS>
__device__ __forceinline__ void ksplit_store(const float (&acc)[RT][MT][4], float* red, int warp, int lane, int kpart,
                                             int ksplit, bool warp_valid, int tile0, int tok0, int M, int N,
                                             const u16* __restrict__ bias, int has_bias, u16* __restrict__ out) {
  const int g = lane >> 2, t = lane & 3;
  if (ksplit == 1) {
    if (warp_valid) store_tiles<Fmt>(acc, tile0, tok0, g, t, M, N, bias, has_bias, out);
    return;
  }
  constexpr int kPerWarp = RT * MT * 4;  // red: [warp][rt][j][i][lane], conflict-free
  __syncthreads();
#pragma unroll
  for (int c = 0; c < kPerWarp; ++c) red[(warp * kPerWarp + c) * 32 + lane] = (&acc[0][0][0])[c];
  __syncthreads();
  if (!warp_valid) return;
  const float* first = red + (warp - kpart) * kPerWarp * 32 + lane;  // the group's kpart-0 warp
  auto store_register = [&](float sum, int c) {  // register c is acc[rt][j][i], c = (rt * MT + j) * 4 + i
    store_fragment<Fmt>(sum, c / (MT * 4), (c / 4) % MT, c % 4, tile0, tok0, g, t, M, N, bias, has_bias, out);
  };
  if constexpr (kPerWarp % WARPS == 0 || kPerWarp < WARPS) {
    if (ksplit == WARPS) {
      constexpr int kOwn = (kPerWarp + WARPS - 1) / WARPS;  // registers this warp sums
      if (kPerWarp < WARPS && kpart >= kPerWarp) return;
      float part[kOwn][WARPS];
#pragma unroll
      for (int r = 0; r < kOwn; ++r)
#pragma unroll
        for (int p = 0; p < WARPS; ++p) part[r][p] = first[(p * kPerWarp + kpart + WARPS * r) * 32];
#pragma unroll
      for (int r = 0; r < kOwn; ++r) {
        float sum = part[r][0];
#pragma unroll
        for (int p = 1; p < WARPS; ++p) sum += part[r][p];
        store_register(sum, kpart + WARPS * r);
      }
      return;
    }
  }
  for (int c = kpart; c < kPerWarp; c += ksplit) {
    float sum = first[c * 32];
    for (int p = 1; p < ksplit; ++p) sum += first[(p * kPerWarp + c) * 32];
    store_register(sum, c);
  }
}

}  // namespace

// gemm_4bit_mma<Fmt, NESTED, MT, TILED>: Fmt is MmaHalf (fp16) or MmaBFloat16 (bf16); MT n8 token tiles per
// CTA; TILED: the weight in tile order.
//   grid (ceil(ceil(N / 16) / (4 / ksplit)) * token_chunks), block 128; ksplit in {1, 2, 4}.
template <class Fmt, bool NESTED, int MT, bool TILED = false>
__global__ void __launch_bounds__(kMmaThreads)
gemm_4bit_mma(const u16* __restrict__ A, const u8* __restrict__ packed, const float* __restrict__ table,
              const float* __restrict__ absmax, const u8* __restrict__ qabsmax, const float* __restrict__ code2,
              const float* __restrict__ nested_absmax, const float* __restrict__ offset, const u16* __restrict__ bias,
              u16* __restrict__ out, int M, int N, int K, int block_shift, int has_bias, int ksplit, int token_chunks) {
  __shared__ __align__(16) u32 lut[256 * 32];  // reused for the split-K sums at the end
  __shared__ float code2_s[NESTED ? 256 : 1];
  fill_byte_table<Fmt, NESTED, kMmaThreads>(lut, code2_s, table, code2);
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int chunk = blockIdx.x % token_chunks;
  const int tile = (blockIdx.x / token_chunks) * (kMmaWarps / ksplit) + warp / ksplit;
  const int kpart = warp % ksplit;
  const bool tile_valid = tile * 16 < N;
  const int row_lo = tile * 16 + g, row_hi = row_lo + 8;
  const i64 start_lo = (i64)min(row_lo, N - 1) * K, start_hi = (i64)min(row_hi, N - 1) * K;
  const int tok0 = chunk * 8 * MT;
  const u16* a_tok[MT];
#pragma unroll
  for (int j = 0; j < MT; ++j) a_tok[j] = A + (i64)min(tok0 + 8 * j + g, M - 1) * K;
  const float off = NESTED ? __ldg(offset) : 0.0f;
  const u32 lane4 = 4u * lane;

  float acc[MT][4];
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;

  const int segments = (K + kSegment - 1) / kSegment;
  const int share = (segments + ksplit - 1) / ksplit;
  const int seg_begin = kpart * share;
  const int seg_end = tile_valid ? min(segments, seg_begin + share) : seg_begin;

  for (int seg0 = seg_begin; seg0 < seg_end; seg0 += kInFlight) {
    uint4 w_lo[kInFlight], w_hi[kInFlight];
    float v_lo[kInFlight], v_hi[kInFlight];
    u32 q_lo[kInFlight], q_hi[kInFlight];
#pragma unroll
    for (int d = 0; d < kInFlight; ++d) {
      const int k0 = (seg0 + d) * kSegment + 32 * t;
      if (seg0 + d < seg_end && k0 < K) {
        if constexpr (TILED) {  // N % 16 == 0 and K % 128 == 0: every segment is whole
          w_lo[d] = q4::load_stream16(tiled_chunk(packed, tile, segments, seg0 + d, g, t));
          w_hi[d] = q4::load_stream16(tiled_chunk(packed, tile, segments, seg0 + d, g + 8, t));
        } else {
          w_lo[d] = q4::load_stream16(packed + ((start_lo + k0) >> 1));
          w_hi[d] = q4::load_stream16(packed + ((start_hi + k0) >> 1));
        }
        q4::scale_fetch<NESTED>((start_lo + k0) >> block_shift, absmax, qabsmax, nested_absmax, v_lo[d], q_lo[d]);
        q4::scale_fetch<NESTED>((start_hi + k0) >> block_shift, absmax, qabsmax, nested_absmax, v_hi[d], q_hi[d]);
      } else {
        w_lo[d] = w_hi[d] = make_uint4(0, 0, 0, 0);
        v_lo[d] = v_hi[d] = 0.0f;
        q_lo[d] = q_hi[d] = 0;
      }
    }
#pragma unroll
    for (int d = 0; d < kInFlight; ++d) {
      if (seg0 + d >= seg_end) break;  // warp-uniform
      const int k0 = (seg0 + d) * kSegment + 32 * t;
      const bool valid = k0 < K;  // past K: zero scale and zero activations add nothing
      const float s_lo = valid ? q4::scale_decode<NESTED>(v_lo[d], q_lo[d], code2_s, off) : 0.0f;
      const float s_hi = valid ? q4::scale_decode<NESTED>(v_hi[d], q_hi[d], code2_s, off) : 0.0f;
      const u32 h_lo = pack2<Fmt>(s_lo, s_lo), h_hi = pack2<Fmt>(s_hi, s_hi);
      u32 frag[8][4];
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        const u32 lo = q4::word_of(w_lo[d], s >> 1), hi = q4::word_of(w_hi[d], s >> 1);
        const int p = 16 * (s & 1);  // bit position of byte 2s in its word; byte 2s+1 is at p + 8
        frag[s][0] = mul2<Fmt>(lut_entry(lut, lo, p, lane4), h_lo);      // row g,     byte 2s
        frag[s][1] = mul2<Fmt>(lut_entry(lut, hi, p, lane4), h_hi);      // row g + 8, byte 2s
        frag[s][2] = mul2<Fmt>(lut_entry(lut, lo, p + 8, lane4), h_lo);  // row g,     byte 2s+1
        frag[s][3] = mul2<Fmt>(lut_entry(lut, hi, p + 8, lane4), h_hi);  // row g + 8, byte 2s+1
      }
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        uint4 x[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) x[i] = valid ? q4::load_cached16(a_tok[j] + k0 + 8 * i) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int s = 0; s < 8; ++s)
          mma16816<Fmt>(acc[j], frag[s], q4::word_of(x[s >> 1], 2 * (s & 1)), q4::word_of(x[s >> 1], 2 * (s & 1) + 1));
      }
    }
  }

  if (ksplit > 1) {  // uniform over the launch
    __syncthreads();  // every warp is done with the table
    float* red = reinterpret_cast<float*>(lut);  // [warp][j][i][lane]: conflict-free
    if (kpart != 0) {
#pragma unroll
      for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[((warp * MT + j) * 4 + i) * 32 + lane] = acc[j][i];
    }
    __syncthreads();
    if (kpart == 0) {
      for (int p = 1; p < ksplit; ++p)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[j][i] += red[(((warp + p) * MT + j) * 4 + i) * 32 + lane];
    }
  }
  if (kpart != 0 || !tile_valid) return;

  // C fragment: acc[j][0..1] = rows g, tokens 8j + 2t + {0, 1}; acc[j][2..3] = row g + 8.
#pragma unroll
  for (int j = 0; j < MT; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int tok = tok0 + 8 * j + 2 * t + (i & 1);
      const int row = i < 2 ? row_lo : row_hi;
      if (tok < M && row < N) {
        const float b = has_bias ? Fmt::to_float(bias[row]) : 0.0f;
        out[(i64)tok * N + row] = Fmt::from_float(__fadd_rn(acc[j][i], b));
      }
    }
  }
}

// gemm_4bit_small<Fmt, NESTED, MT, RT, FRAG_A, WARPS, TILED>: the same product for up to 8 * MT
// tokens a CTA, with the loads and addresses trimmed for the few-token case, RT row tiles a
// warp and WARPS warps a CTA (8: twice the split-K warps for weights with few rows).
//   grid (ceil(ceil(N / 16) / (RT * WARPS / ksplit)) * token_chunks), block 32 * WARPS;
//   ksplit a power of two up to WARPS.
//
// Differences from gemm_4bit_mma (same layouts, k permutation and table):
//  * warp w owns the RT consecutive 16-row tiles RT * (group * (WARPS / ksplit) + w / ksplit) + rt,
//    so every activation fragment loaded feeds RT tiles' mma (the activation loads, not the
//    weight bytes, are what the L1/shared-memory pipe runs out of once there are 16 tokens);
//  * segments that lie wholly inside K run in batches of BATCH (default 4 / RT) with no
//    bounds checks, on pointers that step by one segment; only the last, partial segment is
//    checked;
//  * a packed byte becomes a table address with one PRMT and one LEA.
// EARLY: the first batch of weights is requested before the byte table is built, so that
// its trip to DRAM overlaps the table's loads and the barrier that publishes it. It pays on
// 8-warp CTAs with long K and costs elsewhere (H100, run 41 of NOTES_matmul_4bit.md, us,
// without / with: 8192 x 28672 at 16 tokens 72.8 / 66.3, tiled 61.3 / 52.5; 28672 x 8192
// tiled at 2 tokens 58.1 / 54.6; but 4096 x 4096 at 16 tokens 10.6 / 11.1, and 4-warp CTAs
// lost their fourth CTA an SM to the registers it holds: 28672 x 8192 at 16 tokens 70.4 /
// 94.0). The byte table's own global loads go out before the weights' (a load issued after
// them waits behind them): 8192 x 28672 tiled at 16 tokens 53.1-53.7 -> 52.4-52.8 us (run
// 62). BATCH = 4 at RT = 2 (9..16 tokens on 8-warp CTAs, matmul_4bit._small_schedule):
// each warp has its share's next 4 segments in flight, not 2.
// EARLY with BATCH = 4 is the schedule of shares of at most one batch (K = 4096 split 8
// ways), where the prologue and the epilogue are most of a warp's time, and three things
// shorten them (run 74, H100, us at 16 tokens, tiled: 4096 x 4096 9.88 -> 9.63, 8192 x 4096
// 17.24 -> 16.0, 2048 x 4096 8.65 -> 8.09; same bits):
//  * the warp's place takes shifts (ksplit is a power of two) and no division (one token
//    chunk): ptxas placed the ~190 instructions of the divisions, and the table's fill
//    behind them, ahead of the first weight load;
//  * each segment's activations are requested before the segment ahead of it is multiplied,
//    the first segment's before the table's barrier (they were requested after the barrier,
//    one L2 round trip before the first mma);
//  * the split-K sum and the stores are spread over the group's warps (ksplit_store).
// Elsewhere the first and the last measured slower (run 72: the long tiled shares at 16
// tokens lost 1.5 us, a 4-warp build grew past 128 registers and lost its fourth CTA an
// SM), so the other builds keep the code they had (the same cubins).
// These builds also request only their first segment's weights before the table's barrier,
// the other three right after it (runs 85-87): a warp that issued its whole share first
// reached the barrier only once enough of those loads had drained (run 85's timeline: the
// tiled build published its table at ~4.1 us, the row-major one at ~1.5), and every mma
// waits for that barrier. Us at 16 tokens, all four first / one first, same bits: 4096 x
// 4096 tiled 9.64 / 9.11, row-major 10.0 / 9.23; 8192 x 4096 tiled 16.29 / 12.49; 2048 x
// 4096 8.07 / 8.25.
// The last segment's weights go out later still: once the first segment's are in, so that
// fewer bytes in flight let segments 1 and 2 land sooner and the last lands while they are
// multiplied (a per-warp timeline, run 88: segment 1 landed ~1 us after segment 0 was
// multiplied); or, LAST_AFTER_MULTIPLY (the launcher's pick where the grid has more CTAs
// than SMs), once the first is multiplied, into its registers (ptxas then fits the tiled
// build in 128 registers, two CTAs an SM). H100, runs 94 and 90, us at 16 tokens, before /
// after, same bits: 4096 x 4096 tiled 9.19 / 8.23, row-major 9.27 / 8.89; 8192 x 4096 (after
// the multiply) tiled 12.54 / 11.82, row-major 16.37 / 12.74; 2048 x 4096 tiled 8.21 / 7.58.
template <class Fmt, bool NESTED, int MT, int RT, bool FRAG_A, int WARPS, bool TILED = false, bool EARLY = false,
          int BATCH = 0, bool LAST_AFTER_MULTIPLY = false>
__global__ void __launch_bounds__(32 * WARPS)
gemm_4bit_small(const u16* __restrict__ A, const u8* __restrict__ packed, const float* __restrict__ table,
                const float* __restrict__ absmax, const u8* __restrict__ qabsmax, const float* __restrict__ code2,
                const float* __restrict__ nested_absmax, const float* __restrict__ offset, const u16* __restrict__ bias,
                u16* __restrict__ out, int M, int N, int K, int block_shift, int has_bias, int ksplit,
                int token_chunks) {
  constexpr int kBatch = BATCH > 0 ? BATCH : kInFlight / RT;  // segments a batch (default: 4 x 2 x 16 B a lane)
  constexpr bool kShortShare = EARLY && BATCH == 4;  // the schedule of shares of one batch (above)
  constexpr int kWeightStep = TILED ? 1024 : kSegment / 2;  // bytes from a row's segment to the next
  __shared__ __align__(16) u32 lut[256 * 32];  // reused for the split-K sums at the end
  __shared__ float code2_s[NESTED ? 256 : 1];
  if constexpr (!EARLY) {
    fill_byte_table<Fmt, NESTED, 32 * WARPS>(lut, code2_s, table, code2);
    __syncthreads();
  }

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  // kShortShare: ksplit is a power of two (shifts), and one token chunk takes no division.
  const int ksplit_log2 = __ffs(ksplit) - 1;
  const bool one_chunk = kShortShare && token_chunks == 1;
  const int chunk = one_chunk ? 0 : blockIdx.x % token_chunks;
  const int group = one_chunk ? (int)blockIdx.x : blockIdx.x / token_chunks;
  const int tile0 = kShortShare ? ((group * WARPS >> ksplit_log2) + (warp >> ksplit_log2)) * RT
                                : (group * (WARPS / ksplit) + warp / ksplit) * RT;
  const int kpart = kShortShare ? warp & (ksplit - 1) : warp % ksplit;
  const bool warp_valid = tile0 * 16 < N;
  const int tok0 = chunk * 8 * MT;
  const float off = NESTED ? __ldg(offset) : 0.0f;
  const u32 lut_lane = shared_address(lut) + 4 * lane;

  const int segments = (K + kSegment - 1) / kSegment;
  const int share = kShortShare ? (segments + ksplit - 1) >> ksplit_log2 : (segments + ksplit - 1) / ksplit;
  const int seg_begin = kpart * share;
  const int seg_end = warp_valid ? min(segments, seg_begin + share) : seg_begin;
  const int full_end = min(seg_end, K / kSegment);  // segments with no element past K

  // Per-lane streams, positioned at seg_begin: [rt][0] row g, [rt][1] row g + 8 of tile rt.
  const u8* wp[RT][2];
  i64 e[RT][2];  // flat index of the lane's first element in the current segment
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = min((tile0 + rt) * 16 + g + 8 * h, N - 1);
      e[rt][h] = (i64)row * K + (i64)seg_begin * kSegment + 32 * t;
      if constexpr (TILED) {
        wp[rt][h] = tiled_chunk(packed, min(tile0 + rt, N / 16 - 1), segments, seg_begin, g + 8 * h, t);
      } else {
        wp[rt][h] = packed + (e[rt][h] >> 1);
      }
    }
  }
  // FRAG_A: A in fragment order (permute_fragments), so a load of the 32 lanes reads 512
  // contiguous bytes; otherwise lane (g, t) reads 64 contiguous bytes of token g at k 32t
  // of the segment, and each 16-byte load of the warp touches twice the sectors it uses.
  const int frag_tiles = token_chunks * MT;  // token tiles of the fragment-order copy
  const i64 a_step = FRAG_A ? (i64)frag_tiles * 4 * 32 * 8 : kSegment;  // elements a segment
  const int a_load = FRAG_A ? 32 * 8 : 8;                               // elements a load
  const u16* ap[MT];
#pragma unroll
  for (int j = 0; j < MT; ++j)
    ap[j] = FRAG_A ? A + (((i64)seg_begin * frag_tiles + chunk * MT + j) * 4 * 32 + lane) * 8
                   : A + (i64)min(tok0 + 8 * j + g, M - 1) * K + (i64)seg_begin * kSegment + 32 * t;

  float acc[RT][MT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[rt][j][i] = 0.0f;

  // A segment's scales as packed pairs (zero past K: valid false).
  auto scale_pairs = [&](u32 (&hs)[RT][2], const float (&v)[RT][2], const u32 (&q)[RT][2], bool valid) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sc = valid ? q4::scale_decode<NESTED>(v[rt][h], q[rt][h], code2_s, off) : 0.0f;
        hs[rt][h] = pack2<Fmt>(sc, sc);
      }
  };
  // One segment: scales -> packed scale pairs, activations, 8 mma steps.
  // d: the segment's place in the batch (its pointer offsets); valid: false past K.
  auto segment = [&](const uint4 (&w)[RT][2], const float (&v)[RT][2], const u32 (&q)[RT][2], int d, bool valid) {
    u32 hs[RT][2];
    scale_pairs(hs, v, q, valid);
    uint4 x[MT][4];
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        x[j][i] = valid ? q4::load_cached16(ap[j] + d * a_step + a_load * i) : make_uint4(0, 0, 0, 0);
    mma_segment<Fmt>(acc, w, hs, x, lut_lane);
  };
  auto load_x = [&](uint4 (&x)[MT][4], int d) {  // segment d of the batch's activations (whole segments)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) x[j][i] = q4::load_cached16(ap[j] + d * a_step + a_load * i);
  };

  auto advance = [&](int count) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        wp[rt][h] += count * kWeightStep;
        e[rt][h] += count * kSegment;
      }
#pragma unroll
    for (int j = 0; j < MT; ++j) ap[j] += count * a_step;
  };

  // Segment d of the batch: its weights and scales requested. after: 0 (zero_once_in),
  // added to the weight addresses to hold their loads back.
  auto fetch_segment = [&](uint4 (&w)[RT][2], float (&v)[RT][2], u32 (&q)[RT][2], int d, u32 after = 0u) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        w[rt][h] = q4::load_stream16(wp[rt][h] + d * kWeightStep + after);
        q4::scale_fetch<NESTED>((e[rt][h] + d * kSegment) >> block_shift, absmax, qabsmax, nested_absmax, v[rt][h],
                                q[rt][h]);
      }
  };
  // A batch of kBatch whole segments: requested, then multiplied.
  auto fetch_batch = [&](uint4 (&w)[kBatch][RT][2], float (&v)[kBatch][RT][2], u32 (&q)[kBatch][RT][2]) {
#pragma unroll
    for (int d = 0; d < kBatch; ++d) fetch_segment(w[d], v[d], q[d], d);
  };
  auto multiply_batch = [&](const uint4 (&w)[kBatch][RT][2], const float (&v)[kBatch][RT][2],
                            const u32 (&q)[kBatch][RT][2]) {
#pragma unroll
    for (int d = 0; d < kBatch; ++d) segment(w[d], v[d], q[d], d, true);
    advance(kBatch);
  };
  // kShortShare: segment d + 1's activations are requested before segment d is multiplied
  // (x0 holds segment 0's, requested by the caller), and the last segment's weights here:
  // once segment 0's are in or, LAST_AFTER_MULTIPLY, once segment 0 is multiplied (into its
  // registers). The caller requests segments 1 .. kBatch - 2. K >= 512 (a whole batch).
  auto multiply_batch_ahead = [&](uint4 (&w)[kBatch][RT][2], float (&v)[kBatch][RT][2], u32 (&q)[kBatch][RT][2],
                                  const uint4 (&x0)[MT][4]) {
    constexpr int kLast = kBatch - 1;
    uint4 x[2][MT][4];
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) x[0][j][i] = x0[j][i];
#pragma unroll
    for (int d = 0; d < kBatch; ++d) {
      if (d + 1 < kBatch) load_x(x[(d + 1) & 1], d + 1);
      u32 hs[RT][2];
      scale_pairs(hs, v[d], q[d], true);
      if (d == 0 && !LAST_AFTER_MULTIPLY)
        fetch_segment(w[kLast], v[kLast], q[kLast], kLast, zero_once_in(w[0][0][0].x ^ w[0][RT - 1][1].w ^ hs[0][0], K));
      mma_segment<Fmt>(acc, w[d], hs, x[d & 1], lut_lane);
      if (d == 0 && LAST_AFTER_MULTIPLY)
        fetch_segment(w[kLast], v[kLast], q[kLast], kLast,
                      zero_once_in(__float_as_uint(acc[0][0][0]) ^ __float_as_uint(acc[RT - 1][MT - 1][3]), K));
    }
    advance(kBatch);
  };

  int seg = seg_begin;
  if constexpr (EARLY) {  // one register set for every batch, the first one requested before the table
    uint4 w[kBatch][RT][2];
    float v[kBatch][RT][2];
    u32 q[kBatch][RT][2];
    const bool first_batch = seg + kBatch <= full_end;
    q4::ByteTableInputs<Fmt, NESTED, 32 * WARPS> inputs;  // its loads first: not queued behind the weights'
    inputs.load(table, code2);
    uint4 x0[MT][4];
    if constexpr (kShortShare) {  // the first segment before the table's barrier, the middle ones after it
      if (first_batch) {
        fetch_segment(w[0], v[0], q[0], 0);
        load_x(x0, 0);
      }
      inputs.fill(lut, code2_s);
      __syncthreads();
      if (first_batch) {
#pragma unroll
        for (int d = 1; d < kBatch - 1; ++d) fetch_segment(w[d], v[d], q[d], d);
      }
    } else {
      if (first_batch) fetch_batch(w, v, q);
      inputs.fill(lut, code2_s);
      __syncthreads();
    }
    if (first_batch) {
      if constexpr (kShortShare) multiply_batch_ahead(w, v, q, x0);
      else multiply_batch(w, v, q);
      seg += kBatch;
    }
    // (a short share is one batch: any segment past it runs in the loop after this one)
    for (; !kShortShare && seg + kBatch <= full_end; seg += kBatch) {
      fetch_batch(w, v, q);
      multiply_batch(w, v, q);
    }
  } else {  // (the table was built first)
    for (; seg + kBatch <= full_end; seg += kBatch) {
      uint4 w[kBatch][RT][2];
      float v[kBatch][RT][2];
      u32 q[kBatch][RT][2];
      fetch_batch(w, v, q);
      multiply_batch(w, v, q);
    }
  }
  for (; seg < seg_end; ++seg) {  // fewer than a batch left, or the segment that K cuts
    const bool valid = seg * kSegment + 32 * t < K;
    uint4 w[RT][2];
    float v[RT][2];
    u32 q[RT][2];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (valid) {
          w[rt][h] = q4::load_stream16(wp[rt][h]);
          q4::scale_fetch<NESTED>(e[rt][h] >> block_shift, absmax, qabsmax, nested_absmax, v[rt][h], q[rt][h]);
        } else {
          w[rt][h] = make_uint4(0, 0, 0, 0);
          v[rt][h] = 0.0f;
          q[rt][h] = 0;
        }
      }
    segment(w, v, q, 0, valid);
    advance(1);
  }

  // The short builds sum the split in ksplit_store, and so do the builds of one token tile
  // on 8 warps (2..8 tokens, A row-major) where the split spans all 8 (the narrower
  // weights): there ksplit_store's sum from partials loaded at once, spread over the warps,
  // replaces the first warp's loop over the split. Same bits. H100, us, loop / loaded first
  // (NOTES_matmul_4bit.md run 147): 4096 x 4096 tiled at 2 tokens 7.81 / 7.55, at 8 8.20 /
  // 8.08, row-major at 8 8.86 / 8.72; 11008 x 4096 tiled at 8 14.30 / 14.06. The others keep
  // the loop: 4-warp CTAs split 4 ways lost 16% with this sum (11008 x 4096 row-major at 8
  // tokens 16.10 / 18.65), and the tiled builds with plain (not nested) scales and the
  // table built first, which ptxas then gave a spilled register across the loop, lost 1-2%
  // (run 148: 4096 x 4096 at 4 tokens 7.53 / 7.63, 11008 x 4096 at 8 15.00 / 15.27).
  constexpr bool kSpreadWholeSplit = MT == 1 && WARPS == 8 && !FRAG_A && (NESTED || EARLY || !TILED);
  if (kShortShare || (kSpreadWholeSplit && ksplit == WARPS)) {
    ksplit_store<Fmt, RT, MT, WARPS>(acc, reinterpret_cast<float*>(lut), warp, lane, kpart, ksplit, warp_valid, tile0,
                                     tok0, M, N, bias, has_bias, out);
    return;
  }
  if (ksplit > 1) cta_ksplit_sum(acc, reinterpret_cast<float*>(lut), warp, lane, kpart, ksplit);
  if (kpart != 0 || !warp_valid) return;
  store_tiles<Fmt>(acc, tile0, tok0, g, t, M, N, bias, has_bias, out);
}

// gemm_4bit_tile<Fmt, NESTED, MT, RT, TILED>: the same product for up to 8 * MT tokens a CTA (M up
// to a few hundred through token chunks), with the activations staged in shared memory.
//   grid (ceil(ceil(N / 16) / (4 * RT)) * token_chunks), block 128, dynamic shared memory
//   4 * (256 * 32 + 256) + kTileStages * MT * 2048 bytes (matmul_4bit._tile_smem); ksplit
//   must be 1 (kept in the parameter list so every tensor-core kernel takes the same
//   arguments, A, bias and out at positions 0, 8 and 9).
//
// Why: gemm_4bit_mma has every warp fetch its own copy of the activations for each 16-row
// tile through L1; at 64 tokens and K = 8192 that is 1 MB a warp, which L1 cannot hold, so
// the activations stream from L2 once per 16 weight rows (~1.8 GB at 28672 x 8192) and L2,
// not DRAM, sets the time. Here the 4 warps of a CTA (64 * RT weight rows) share one copy
// in shared memory, and each activation fragment read from it feeds RT row tiles' mma
// (H100, 64 tokens of 28672 x 8192: 373 us for gemm_4bit_mma, 127 us for this kernel).
// What bounds it now: a CTA takes ~2 us a segment at MT = 8, RT = 2 whatever the weights in
// flight, ~240 TFLOP/s of mma.sync over the GPU: the tensor-core issue rate with ~2.5 other
// instructions (table lookups, multiplies, fragment loads) per mma.
//
// Thread mapping: blockIdx.x = group * token_chunks + chunk (the CTAs that read the same
// weights for different 8*MT-token chunks run side by side and share them through L2).
// With G = gridDim.x / token_chunks CTA groups, warp w owns the RT consecutive 16-row tiles
// RT * (group + G * w) + rt, over all of K: the launcher takes G up to one wave of CTAs, so
// the weight's row groups are dealt out evenly (28672 x 8192 at 64 tokens: 264 CTAs with 6-7
// busy warps each, not 224 with 4, 92 SMs holding two and 40 one).
// Lane (g, t) holds rows g and g + 8 of each tile, as in gemm_4bit_small (same k
// permutation, table and fragment layout); its weights for the next kAhead - 1 segments
// (4 for RT = 1, 3 for RT = 2) are in flight in registers while a segment is multiplied.
//
// Shared memory (dynamic): the byte table u32[256][32] | code2 float[256] | kTileStages
// activation stages, each u16[8 * MT tokens][128 k] (one segment; 256 bytes a token).
// All 128 threads copy a stage with cp.async (16 bytes each, zero-filled past M and K),
// kTileStages - 1 segments ahead of the one being multiplied. Within a token's 256 bytes
// the 16-byte chunk c is stored at chunk c ^ ((c >> 3) << 1) ^ (token & 1): a quarter warp
// reading chunk 4t + i (t = 0..3) of two consecutive tokens then hits 8 distinct 16-byte
// bank groups (unswizzled, t = 0 and t = 2 and the two tokens would collide).
constexpr int kTileStages = 4;

__device__ __forceinline__ u32 tile_swizzle(u32 chunk, u32 token) { return chunk ^ ((chunk >> 3) << 1) ^ (token & 1u); }

// gemm_4bit_stage<Fmt, NESTED, MT, RT, STAGES, CHUNK, WARPS>: gemm_4bit_small's product
// (same k permutation, table, fragments, thread mapping, in-CTA split-K and epilogue) with
// the weights copied through shared memory, so that every global load reads long runs of a
// row, and WARPS warps sharing one byte table.
//   grid (G * token_chunks) with G * WARPS / ksplit >= ceil(N / (16 * RT)), block 32 * WARPS,
//   dynamic shared memory 4 * (256 * 32 + 256) + WARPS * STAGES * RT * CHUNK * 1024 bytes
//   (matmul_4bit._stage_smem); ksplit in {1, 2, 4}.
//
// Why: in gemm_4bit_small a warp's 16-byte loads cover 8 rows x 64 bytes each, and DRAM
// serves that pattern at ~2.0 TB/s on an H100 where runs of 256-512 bytes of a row reach
// ~2.7 TB/s (NOTES_matmul_4bit.md run 6: the loads alone, 28672 x 8192, 60.8 against 44.2
// us). Here each warp copies, with cp.async, a stage of CHUNK segments of its 16 * RT rows
// (64 * CHUNK contiguous bytes a row; a copy instruction covers 8 / CHUNK rows), STAGES - 1
// stages ahead of the one it multiplies, and reads its fragments from the stage with one
// LDS.128 a row and segment. The stages are private to the warp (no CTA barrier in the
// loop). Within a row the 16-byte chunk c is stored at c ^ (4 * (row & 1)): the 8 lanes of
// a quarter warp read two consecutive rows and hit 8 distinct bank groups. Activations and
// scales stay in registers, two segments ahead. The stages cost shared memory, so with 4
// warps a CTA only ~7 warps an SM fit in one wave, too few to hide the multiply's latencies
// (28672 x 8192, one token: 64.7 us); 8 warps sharing the 33 KB table give ~14 (60.1 us).
// (__launch_bounds__: at most 128 registers, 16 warps an SM; without it the 8-warp
// configuration took 149 registers and fit one CTA an SM.)
template <class Fmt, bool NESTED, int MT, int RT, int STAGES, int CHUNK, int WARPS>
__global__ void __launch_bounds__(32 * WARPS, 16 / WARPS)
gemm_4bit_stage(const u16* __restrict__ A, const u8* __restrict__ packed, const float* __restrict__ table,
                const float* __restrict__ absmax, const u8* __restrict__ qabsmax, const float* __restrict__ code2,
                const float* __restrict__ nested_absmax, const float* __restrict__ offset, const u16* __restrict__ bias,
                u16* __restrict__ out, int M, int N, int K, int block_shift, int has_bias, int ksplit,
                int token_chunks) {
  constexpr int kChunkSegments = CHUNK;  // 2 or 4
  constexpr int kRowBytes = kChunkSegments * kSegment / 2;  // a row's bytes in one stage
  constexpr int kStageBytes = 16 * RT * kRowBytes;
  constexpr int kCopies = kStageBytes / (16 * 32);  // 16-byte copies a lane a stage
  constexpr int kAhead = 2;                         // segments of activations and scales in registers
  extern __shared__ __align__(16) u32 smem[];
  u32* lut = smem;  // reused for the split-K sums at the end
  float* code2_s = reinterpret_cast<float*>(smem + 256 * 32);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int chunk = blockIdx.x % token_chunks;
  // Tile group (RT row tiles, ksplit warps) w / ksplit of CTA b is group b + gridDim.x * (w / ksplit):
  // consecutive groups go to different CTAs, so a grid of one wave spreads them evenly over the SMs.
  const int tile0 = (blockIdx.x / token_chunks + gridDim.x / token_chunks * (warp / ksplit)) * RT;
  const int kpart = warp % ksplit;
  const bool warp_valid = tile0 * 16 < N;
  const int tok0 = chunk * 8 * MT;

  const int segments = (K + kSegment - 1) / kSegment;
  const int share = (segments + ksplit - 1) / ksplit;
  const int seg_begin = kpart * share;
  const int seg_end = warp_valid ? min(segments, seg_begin + share) : seg_begin;
  const int stages_needed = (seg_end - seg_begin + kChunkSegments - 1) / kChunkSegments;

  // This warp's stages. Copy r of a lane: stage row kRowsPerCopy * r + lane / kLanesPerRow
  // (row parity: that of lane / kLanesPerRow), 16-byte chunk lane % kLanesPerRow of the row.
  constexpr int kLanesPerRow = kRowBytes / 16;
  constexpr int kRowsPerCopy = 32 / kLanesPerRow;
  const char* stage_base = reinterpret_cast<const char*>(smem + 256 * 32 + 256) + warp * STAGES * kStageBytes;
  const u32 stage_s = shared_address(stage_base);
  const i64 row_bytes = K / 2;
  const int copy_row = lane / kLanesPerRow, copy_byte = (lane % kLanesPerRow) * 16;
  const u32 copy_dst = (u32)(copy_row * kRowBytes) + (u32)(((lane % kLanesPerRow) ^ ((copy_row & 1) << 2)) << 4);
  // Copy 0's source at the share's first byte; copy r is kRowsPerCopy * r rows further.
  const u8* copy_src = packed + (i64)(tile0 * 16 + copy_row) * row_bytes + seg_begin * (kSegment / 2) + copy_byte;
  const bool rows_in = (tile0 + RT) * 16 <= N;  // every row of the group exists (warp-uniform)
  auto stage_load = [&](int c) {  // stage c: segments seg_begin + CHUNK c .. + CHUNK of the share
    if (c < stages_needed) {
      const int offset = kChunkSegments * c * (kSegment / 2);  // from the share's first byte
      const u32 dst = stage_s + (u32)((c % STAGES) * kStageBytes) + copy_dst;
      if (rows_in && seg_begin * (kSegment / 2) + offset + kRowBytes <= row_bytes) {  // no bound to check
        const u8* src = copy_src + offset;
        const i64 stride = kRowsPerCopy * row_bytes;
#pragma unroll
        for (int r = 0; r < kCopies; ++r) cp_async16(dst + (u32)(kRowsPerCopy * r * kRowBytes), src + r * stride, 16u);
      } else {
        const int byte = seg_begin * (kSegment / 2) + offset + copy_byte;
#pragma unroll
        for (int r = 0; r < kCopies; ++r) {
          const int row = tile0 * 16 + kRowsPerCopy * r + copy_row;
          const bool ok = row < N && byte < row_bytes;  // zeros past N and K (K % 32 == 0: whole chunks)
          cp_async16(dst + (u32)(kRowsPerCopy * r * kRowBytes), ok ? packed + (i64)row * row_bytes + byte : packed,
                     ok ? 16u : 0u);
        }
      }
    }
    cp_async_commit();  // an empty group past the end keeps the wait count uniform
  };

  // Activations and scales of one segment, in registers (zeros past the share or K).
  struct Slot {
    float v[RT][2];
    u32 q[RT][2];
    uint4 x[MT][4];
  };
  const u16* ap[MT];
#pragma unroll
  for (int j = 0; j < MT; ++j) ap[j] = A + (i64)min(tok0 + 8 * j + g, M - 1) * K + 32 * t;
  i64 scale_e[RT][2];  // flat index of the lane's first element of each stream, at segment 0
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int h = 0; h < 2; ++h) scale_e[rt][h] = (i64)min((tile0 + rt) * 16 + g + 8 * h, N - 1) * K + 32 * t;
  auto slot_load = [&](int seg, Slot& s) {
    const int k0 = seg * kSegment;
    const bool ok = seg < seg_end && k0 + 32 * t < K;
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (ok) {
          q4::scale_fetch<NESTED>((scale_e[rt][h] + k0) >> block_shift, absmax, qabsmax, nested_absmax, s.v[rt][h],
                                  s.q[rt][h]);
        } else {
          s.v[rt][h] = 0.0f;
          s.q[rt][h] = 0;
        }
      }
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) s.x[j][i] = ok ? q4::load_cached16(ap[j] + k0 + 8 * i) : make_uint4(0, 0, 0, 0);
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) stage_load(s);
  Slot ring[kAhead];
#pragma unroll
  for (int d = 0; d < kAhead; ++d) slot_load(seg_begin + d, ring[d]);

  fill_byte_table<Fmt, NESTED, 32 * WARPS>(lut, code2_s, table, code2);
  __syncthreads();
  const float off = NESTED ? __ldg(offset) : 0.0f;
  const u32 lut_lane = shared_address(lut) + 4 * lane;

  float acc[RT][MT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[rt][j][i] = 0.0f;

  // Segment sl of a stage: the lane's 16 bytes of rows g and g + 8 of each tile, then 8 mma steps.
  auto multiply = [&](const char* stage, int sl, const Slot& s) {
    const int at = ((4 * sl + t) ^ ((g & 1) << 2)) << 4;
    uint4 w[RT][2];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        w[rt][h] = *reinterpret_cast<const uint4*>(stage + (rt * 16 + 8 * h + g) * kRowBytes + at);
    u32 hs[RT][2];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sc = q4::scale_decode<NESTED>(s.v[rt][h], s.q[rt][h], code2_s, off);
        hs[rt][h] = pack2<Fmt>(sc, sc);
      }
    mma_segment<Fmt>(acc, w, hs, s.x, lut_lane);
  };

  for (int c = 0; c < stages_needed; ++c) {
    cp_async_wait<STAGES - 2>();  // this lane's copies of stage c have landed
    __syncwarp();                 // every lane's have; and every lane is done with stage c - 1
    stage_load(c + STAGES - 1);   // into the buffer of stage c - 1
    const char* stage = stage_base + (c % STAGES) * kStageBytes;
#pragma unroll
    for (int sl = 0; sl < kChunkSegments; ++sl) {
      const int seg = seg_begin + kChunkSegments * c + sl;
      if (seg >= seg_end) break;  // warp-uniform
      multiply(stage, sl, ring[sl % kAhead]);
      slot_load(seg + kAhead, ring[sl % kAhead]);
    }
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the CTA exits

  if (ksplit > 1) cta_ksplit_sum(acc, reinterpret_cast<float*>(lut), warp, lane, kpart, ksplit);
  if (kpart != 0 || !warp_valid) return;
  store_tiles<Fmt>(acc, tile0, tok0, g, t, M, N, bias, has_bias, out);
}

// (The minimum of 2 CTAs an SM, which the registers allow anyway, only changes ptxas's
// allocation heuristic: without it the <MmaHalf, false, 4, 1> instance got 80 registers
// and spilled.)
template <class Fmt, bool NESTED, int MT, int RT, bool TILED = false>
__global__ void __launch_bounds__(kMmaThreads, 2)
gemm_4bit_tile(const u16* __restrict__ A, const u8* __restrict__ packed, const float* __restrict__ table,
               const float* __restrict__ absmax, const u8* __restrict__ qabsmax, const float* __restrict__ code2,
               const float* __restrict__ nested_absmax, const float* __restrict__ offset, const u16* __restrict__ bias,
               u16* __restrict__ out, int M, int N, int K, int block_shift, int has_bias, int ksplit,
               int token_chunks) {
  constexpr int kTokens = 8 * MT;
  constexpr int kRowBytes = 2 * kSegment;  // one token's 128 activations
  constexpr int kStageBytes = kTokens * kRowBytes;
  constexpr int kCopies = kStageBytes / 16 / kMmaThreads;  // 16-byte copies a thread a stage
  extern __shared__ __align__(16) u32 smem[];
  u32* lut = smem;
  float* code2_s = reinterpret_cast<float*>(smem + 256 * 32);
  const char* act = reinterpret_cast<const char*>(smem + 256 * 32 + 256);
  const u32 act_s = shared_address(act);
  fill_byte_table<Fmt, NESTED, kMmaThreads>(lut, code2_s, table, code2);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int chunk = blockIdx.x % token_chunks;
  // Row group (RT tiles) of warp w in CTA group b: b + (gridDim.x / token_chunks) * w, so a grid
  // of more CTA groups than a quarter of the row groups spreads the busy warps evenly.
  const int tile0 = (blockIdx.x / token_chunks + (int)(gridDim.x / token_chunks) * warp) * RT;
  const bool warp_valid = tile0 * 16 < N;
  const int tok0 = chunk * kTokens;
  const float off = NESTED ? __ldg(offset) : 0.0f;
  const u32 lut_lane = shared_address(lut) + 4 * lane;
  const int segments = (K + kSegment - 1) / kSegment;

  // Copies of one stage: copy r of this thread is chunk c = threadIdx.x + 128 r of the
  // stage, token c / 16, elements 8 (c % 16) .. + 8 of the segment.
  auto stage_load = [&](int seg) {
    if (seg < segments) {
      const u32 base = act_s + (u32)(seg % kTileStages) * kStageBytes;
#pragma unroll
      for (int r = 0; r < kCopies; ++r) {
        const u32 c = threadIdx.x + kMmaThreads * r, tok = c >> 4, cc = c & 15;
        const int k = seg * kSegment + 8 * (int)cc;
        const bool ok = tok0 + (int)tok < M && k < K;  // K % 32 == 0: a chunk is wholly in or out
        const u16* src = ok ? A + (i64)(tok0 + (int)tok) * K + k : A;
        cp_async16(base + tok * kRowBytes + (tile_swizzle(cc, tok) << 4), src, ok ? 16u : 0u);
      }
    }
    cp_async_commit();  // an empty group past the end keeps the wait count uniform
  };

  // Weight streams: [rt][0] row g, [rt][1] row g + 8 of tile rt (rows past N read row N - 1).
  i64 row_start[RT][2];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int h = 0; h < 2; ++h) row_start[rt][h] = (i64)min((tile0 + rt) * 16 + g + 8 * h, N - 1) * K;

  // This lane's 16 packed bytes and scale of each stream for segment seg (zeros past K).
  auto weights_load = [&](int seg, uint4 (&w)[RT][2], float (&v)[RT][2], u32 (&q)[RT][2]) {
    const int k0 = seg * kSegment + 32 * t;
    const bool ok = warp_valid && seg < segments && k0 < K;
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (ok) {
          const i64 e = row_start[rt][h] + k0;
          if constexpr (TILED) {
            const int tile = min(tile0 + rt, N / 16 - 1);
            w[rt][h] = q4::load_stream16(tiled_chunk(packed, tile, segments, seg, g + 8 * h, t));
          } else {
            w[rt][h] = q4::load_stream16(packed + (e >> 1));
          }
          q4::scale_fetch<NESTED>(e >> block_shift, absmax, qabsmax, nested_absmax, v[rt][h], q[rt][h]);
        } else {
          w[rt][h] = make_uint4(0, 0, 0, 0);
          v[rt][h] = 0.0f;
          q[rt][h] = 0;
        }
      }
  };

  float acc[RT][MT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[rt][j][i] = 0.0f;

  // One segment: scales -> packed scale pairs, then 4 x (activation fragments of MT token
  // tiles from the stage, 2 steps of RT x MT mma).
  auto multiply = [&](int seg, const uint4 (&w)[RT][2], const float (&v)[RT][2], const u32 (&q)[RT][2]) {
    const bool valid = seg * kSegment + 32 * t < K;  // past K: zero scales and zero activations
    u32 hs[RT][2];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sc = valid ? q4::scale_decode<NESTED>(v[rt][h], q[rt][h], code2_s, off) : 0.0f;
        hs[rt][h] = pack2<Fmt>(sc, sc);
      }
    const char* xs = act + (seg % kTileStages) * kStageBytes + g * kRowBytes;
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // the lane's activations k = 32t + 8i .. + 8: steps 2i, 2i + 1
      uint4 x[MT];
      const int at = tile_swizzle(4 * t + i, g) << 4;  // token 8j + g has g's parity
#pragma unroll
      for (int j = 0; j < MT; ++j) x[j] = *reinterpret_cast<const uint4*>(xs + 8 * j * kRowBytes + at);
#pragma unroll
      for (int ss = 0; ss < 2; ++ss) {
        const int b = 2 * ss;  // step s = 2i + ss: activation words b, b + 1 of x[j]
        u32 frag[RT][4];
        weight_frags<Fmt>(frag, w, hs, 2 * i + ss, lut_lane);
#pragma unroll
        for (int j = 0; j < MT; ++j) {
          const u32 b0 = q4::word_of(x[j], b), b1 = q4::word_of(x[j], b + 1);
#pragma unroll
          for (int rt = 0; rt < RT; ++rt) mma16816<Fmt>(acc[rt][j], frag[rt], b0, b1);
        }
      }
    }
  };

  // Weights: a ring of kAhead segments' registers, loaded kAhead segments ahead. With one
  // segment ahead (H100 runs 3 and 4 of NOTES_matmul_4bit.md) 32 tokens of 28672 x 8192 took
  // 104 us, with the ring 90.5; at 64 tokens it changed nothing (128 -> 127 us), which is
  // bound by the mma.sync issue rate instead. The loop is unrolled by kAhead so the ring is
  // indexed with constants.
  constexpr int kAhead = RT == 1 ? 5 : 4;
  uint4 wr[kAhead][RT][2];
  float vr[kAhead][RT][2];
  u32 qr[kAhead][RT][2];
#pragma unroll
  for (int s = 0; s < kTileStages - 1; ++s) stage_load(s);
#pragma unroll
  for (int d = 0; d < kAhead; ++d) weights_load(d, wr[d], vr[d], qr[d]);
  __syncthreads();  // the table and code2 are published (the stages by the barrier in the loop)

  for (int seg0 = 0; seg0 < segments; seg0 += kAhead) {
#pragma unroll
    for (int d = 0; d < kAhead; ++d) {
      const int seg = seg0 + d;
      if (seg >= segments) break;         // uniform over the CTA: every thread has the same count
      cp_async_wait<kTileStages - 2>();   // this thread's copies of stage seg have landed
      __syncthreads();                    // everyone's have; and everyone is done with stage seg - 1
      stage_load(seg + kTileStages - 1);  // into the buffer of stage seg - 1
      if (warp_valid) multiply(seg, wr[d], vr[d], qr[d]);
      weights_load(seg + kAhead, wr[d], vr[d], qr[d]);
    }
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the CTA exits
  if (!warp_valid) return;

  store_tiles<Fmt>(acc, tile0, tok0, g, t, M, N, bias, has_bias, out);
}

// gemm_4bit_tile_split<Fmt, NESTED, MT, RT, TILED>: gemm_4bit_tile with K split across CTAs, for
// weights of few rows and long K (8192 x 28672: 64 CTAs of 128 rows at 17..64 tokens, half
// the SMs idle without a split).
//   grid (ceil(ceil(N / 16) / (4 * RT)) * token_chunks, ksplit), block 128, dynamic shared
//   memory as gemm_4bit_tile; A, bias and out at positions 0, 8 and 9 as in every
//   tensor-core kernel, then the workspace: partial float[ksplit * gridDim.x * 4 * RT * MT
//   * 128] and counters u32[gridDim.x], zero before the first launch.
//
// Layout, thread mapping, staging and the k permutation are gemm_4bit_tile's. blockIdx.y
// = split takes the split-th contiguous share of ceil(segments / ksplit) 128-element
// segments (the launcher trims ksplit so no share is empty; an empty one would add zeros).
// Each CTA stores its float32 accumulators to `partial` in fragment order,
// [split][blockIdx.x][r][thread] with r = (rt * MT + j) * 4 + i (coalesced), then counts
// itself in counters[blockIdx.x]. The CTA that arrives last sums the ksplit partials of its
// tile in split order 0, 1, ... (its own from registers, the value it stored), so the result
// does not depend on which CTA finishes last: it is the same bits run to run. It then adds
// the bias, rounds once and resets the counter to zero for the next launch.
//
// Why a second kernel rather than a ksplit = 1 case of gemm_4bit_tile: built as one kernel
// (H100 run 5 of NOTES_matmul_4bit.md) the unsplit launches ran 10-28% slower than
// gemm_4bit_tile (28672 x 8192 at 64 tokens: 152 vs 124 us), so the unsplit kernel is kept
// as it was measured.
// (__launch_bounds__ minimum of 2 CTAs an SM: as gemm_4bit_tile.)
template <class Fmt, bool NESTED, int MT, int RT, bool TILED = false>
__global__ void __launch_bounds__(kMmaThreads, 2)
gemm_4bit_tile_split(const u16* __restrict__ A, const u8* __restrict__ packed, const float* __restrict__ table,
               const float* __restrict__ absmax, const u8* __restrict__ qabsmax, const float* __restrict__ code2,
               const float* __restrict__ nested_absmax, const float* __restrict__ offset, const u16* __restrict__ bias,
               u16* __restrict__ out, int M, int N, int K, int block_shift, int has_bias, int ksplit,
               int token_chunks, float* __restrict__ partial, u32* __restrict__ counters) {
  constexpr int kTokens = 8 * MT;
  constexpr int kRowBytes = 2 * kSegment;  // one token's 128 activations
  constexpr int kStageBytes = kTokens * kRowBytes;
  constexpr int kCopies = kStageBytes / 16 / kMmaThreads;  // 16-byte copies a thread a stage
  extern __shared__ __align__(16) u32 smem[];
  u32* lut = smem;
  float* code2_s = reinterpret_cast<float*>(smem + 256 * 32);
  const char* act = reinterpret_cast<const char*>(smem + 256 * 32 + 256);
  const u32 act_s = shared_address(act);
  fill_byte_table<Fmt, NESTED, kMmaThreads>(lut, code2_s, table, code2);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int chunk = blockIdx.x % token_chunks;
  const int tile0 = ((blockIdx.x / token_chunks) * kMmaWarps + warp) * RT;
  const bool warp_valid = tile0 * 16 < N;
  const int tok0 = chunk * kTokens;
  const float off = NESTED ? __ldg(offset) : 0.0f;
  const u32 lut_lane = shared_address(lut) + 4 * lane;
  // This CTA's share of the segments (all of them when ksplit = 1); uniform over the CTA.
  const int segments_all = (K + kSegment - 1) / kSegment;
  const int share = (segments_all + ksplit - 1) / ksplit;
  const int seg_begin = min(segments_all, (int)blockIdx.y * share);
  const int segments = min(segments_all, seg_begin + share);  // one past this CTA's last

  // Copies of one stage: copy r of this thread is chunk c = threadIdx.x + 128 r of the
  // stage, token c / 16, elements 8 (c % 16) .. + 8 of the segment.
  auto stage_load = [&](int seg) {
    if (seg < segments) {
      const u32 base = act_s + (u32)(seg % kTileStages) * kStageBytes;
#pragma unroll
      for (int r = 0; r < kCopies; ++r) {
        const u32 c = threadIdx.x + kMmaThreads * r, tok = c >> 4, cc = c & 15;
        const int k = seg * kSegment + 8 * (int)cc;
        const bool ok = tok0 + (int)tok < M && k < K;  // K % 32 == 0: a chunk is wholly in or out
        const u16* src = ok ? A + (i64)(tok0 + (int)tok) * K + k : A;
        cp_async16(base + tok * kRowBytes + (tile_swizzle(cc, tok) << 4), src, ok ? 16u : 0u);
      }
    }
    cp_async_commit();  // an empty group past the end keeps the wait count uniform
  };

  // Weight streams: [rt][0] row g, [rt][1] row g + 8 of tile rt (rows past N read row N - 1).
  i64 row_start[RT][2];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int h = 0; h < 2; ++h) row_start[rt][h] = (i64)min((tile0 + rt) * 16 + g + 8 * h, N - 1) * K;

  // This lane's 16 packed bytes and scale of each stream for segment seg (zeros past K).
  auto weights_load = [&](int seg, uint4 (&w)[RT][2], float (&v)[RT][2], u32 (&q)[RT][2]) {
    const int k0 = seg * kSegment + 32 * t;
    const bool ok = warp_valid && seg < segments && k0 < K;
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (ok) {
          const i64 e = row_start[rt][h] + k0;
          if constexpr (TILED) {
            const int tile = min(tile0 + rt, N / 16 - 1);
            w[rt][h] = q4::load_stream16(tiled_chunk(packed, tile, segments_all, seg, g + 8 * h, t));
          } else {
            w[rt][h] = q4::load_stream16(packed + (e >> 1));
          }
          q4::scale_fetch<NESTED>(e >> block_shift, absmax, qabsmax, nested_absmax, v[rt][h], q[rt][h]);
        } else {
          w[rt][h] = make_uint4(0, 0, 0, 0);
          v[rt][h] = 0.0f;
          q[rt][h] = 0;
        }
      }
  };

  float acc[RT][MT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[rt][j][i] = 0.0f;

  // One segment: scales -> packed scale pairs, then 4 x (activation fragments of MT token
  // tiles from the stage, 2 steps of RT x MT mma).
  auto multiply = [&](int seg, const uint4 (&w)[RT][2], const float (&v)[RT][2], const u32 (&q)[RT][2]) {
    const bool valid = seg * kSegment + 32 * t < K;  // past K: zero scales and zero activations
    u32 hs[RT][2];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sc = valid ? q4::scale_decode<NESTED>(v[rt][h], q[rt][h], code2_s, off) : 0.0f;
        hs[rt][h] = pack2<Fmt>(sc, sc);
      }
    const char* xs = act + (seg % kTileStages) * kStageBytes + g * kRowBytes;
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // the lane's activations k = 32t + 8i .. + 8: steps 2i, 2i + 1
      uint4 x[MT];
      const int at = tile_swizzle(4 * t + i, g) << 4;  // token 8j + g has g's parity
#pragma unroll
      for (int j = 0; j < MT; ++j) x[j] = *reinterpret_cast<const uint4*>(xs + 8 * j * kRowBytes + at);
#pragma unroll
      for (int ss = 0; ss < 2; ++ss) {
        const int b = 2 * ss;  // step s = 2i + ss: activation words b, b + 1 of x[j]
        u32 frag[RT][4];
        weight_frags<Fmt>(frag, w, hs, 2 * i + ss, lut_lane);
#pragma unroll
        for (int j = 0; j < MT; ++j) {
          const u32 b0 = q4::word_of(x[j], b), b1 = q4::word_of(x[j], b + 1);
#pragma unroll
          for (int rt = 0; rt < RT; ++rt) mma16816<Fmt>(acc[rt][j], frag[rt], b0, b1);
        }
      }
    }
  };

  // Weights: a ring of kAhead segments' registers, loaded kAhead segments ahead. With one
  // segment ahead (H100 runs 3 and 4 of NOTES_matmul_4bit.md) 32 tokens of 28672 x 8192 took
  // 104 us, with the ring 90.5; at 64 tokens it changed nothing (128 -> 127 us), which is
  // bound by the mma.sync issue rate instead. The loop is unrolled by kAhead so the ring is
  // indexed with constants.
  constexpr int kAhead = RT == 1 ? 5 : 4;
  uint4 wr[kAhead][RT][2];
  float vr[kAhead][RT][2];
  u32 qr[kAhead][RT][2];
#pragma unroll
  for (int s = 0; s < kTileStages - 1; ++s) stage_load(seg_begin + s);
#pragma unroll
  for (int d = 0; d < kAhead; ++d) weights_load(seg_begin + d, wr[d], vr[d], qr[d]);
  __syncthreads();  // the table and code2 are published (the stages by the barrier in the loop)

  for (int seg0 = seg_begin; seg0 < segments; seg0 += kAhead) {
#pragma unroll
    for (int d = 0; d < kAhead; ++d) {
      const int seg = seg0 + d;
      if (seg >= segments) break;         // uniform over the CTA: every thread has the same count
      cp_async_wait<kTileStages - 2>();   // this thread's copies of stage seg have landed
      __syncthreads();                    // everyone's have; and everyone is done with stage seg - 1
      stage_load(seg + kTileStages - 1);  // into the buffer of stage seg - 1
      if (warp_valid) multiply(seg, wr[d], vr[d], qr[d]);
      weights_load(seg + kAhead, wr[d], vr[d], qr[d]);
    }
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the CTA exits

  if (ksplit > 1) {  // uniform over the launch
    constexpr int kFrag = RT * MT * 4;
    const i64 ctas = gridDim.x;
    float* mine = partial + ((i64)blockIdx.y * ctas + blockIdx.x) * (kFrag * kMmaThreads) + threadIdx.x;
    if (warp_valid) {
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) __stcg(mine + ((rt * MT + j) * 4 + i) * kMmaThreads, acc[rt][j][i]);
    }
    __threadfence();  // the partials are visible GPU-wide before this CTA is counted
    __shared__ int last;
    __syncthreads();
    if (threadIdx.x == 0) {
      last = atomicAdd(counters + blockIdx.x, 1u) == (u32)ksplit - 1;
      if (last) counters[blockIdx.x] = 0;  // every split has counted: reset for the next launch
    }
    __syncthreads();
    if (!last) return;
    __threadfence();  // (acquire) the other splits' partials are read after their count
    if (!warp_valid) return;
    const float* tile_part = partial + (i64)blockIdx.x * (kFrag * kMmaThreads) + threadIdx.x;
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = ((rt * MT + j) * 4 + i) * kMmaThreads;
          float sum = 0.0f;
          for (int p = 0; p < ksplit; ++p)
            sum += p == (int)blockIdx.y ? acc[rt][j][i] : __ldcg(tile_part + p * ctas * (kFrag * kMmaThreads) + r);
          acc[rt][j][i] = sum;
        }
  }
  if (!warp_valid) return;

  store_tiles<Fmt>(acc, tile0, tok0, g, t, M, N, bias, has_bias, out);
}

// permute_fragments: A (M x K fp16 / bf16, row-major, K % 32 == 0) into the fragment order
// of gemm_4bit_small<..., FRAG_A = true>: 16-byte unit ((s * tiles + j) * 4 + i) * 32 + l holds
// A[8j + l / 4][128 s + 32 (l % 4) + 8 i, + 8), zeros past M and K. One thread a unit,
// grid ceil(units / 256) x 256, units = ceil(K / 128) * tiles * 128.
__global__ void __launch_bounds__(256)
permute_fragments(const uint4* __restrict__ A, uint4* __restrict__ out, int M, int K, int tiles, int units) {
  const int u = blockIdx.x * 256 + threadIdx.x;
  if (u >= units) return;
  const int l = u & 31, i = (u >> 5) & 3, rest = u >> 7;
  const int j = rest % tiles, s = rest / tiles;
  const int tok = 8 * j + (l >> 2), k = 128 * s + 32 * (l & 3) + 8 * i;
  out[u] = tok < M && k < K ? q4::load_cached16(A + (((i64)tok * K + k) >> 3)) : make_uint4(0, 0, 0, 0);
}
