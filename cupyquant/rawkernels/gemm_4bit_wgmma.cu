// Fused 4-bit matrix product on Hopper's warpgroup MMA (wgmma; sm_90a, compiled for that target
// only): out[m, n] = sum_k A[m, k] * W[n, k] (+ bias[n]) for fp16 / bf16 activations and tens
// to hundreds of tokens, from NF4 / FP4 weights in the bitsandbytes layout or in tile order.
//
// Why a kernel of its own: gemm_4bit_tile (mma.sync) keeps the dequantized weights and the
// activation fragments in registers, and at 64 tokens it is bound by issuing its multiplies
// (2 warps a scheduler at 255 registers). Here both operands of the product are in shared
// memory and the tensor cores read them there asynchronously, so the threads only decode:
// each weight is dequantized once a 64-token chunk, stored to shared memory in A's format,
// and multiplied while the threads decode the next stage.
//
// Data layout: as gemm_4bit.cu (A u16[M, K] row-major; packed in the bitsandbytes layout, or
// TILED in 16-row x 128-k tiles, cupyquant/tiled_4bit.py; table, scales, bias, out). Requires
// K % 32 == 0 (TILED: K % 128 == 0 and N % 16 == 0) and 16-byte aligned A and packed.
//
// The product: a CTA is one warpgroup (128 threads) and computes out[tok0 .. tok0 + 64,
// n0 .. n0 + 128] over its share of K, as D[64 tokens x 128 rows] += X[64 x 16] * W^T[16 x 128]
// with wgmma m64n128k16: X (the activations) is the A operand, W (the weights) the B operand,
// both K-major in shared memory with the 128-byte swizzle. A weight is W(row, k) =
// code[q] * scale, each rounded to A's format and multiplied there (as in gemm_4bit.cu);
// products are summed in float32.
//   grid (ceil(N / 128) * token_chunks, ksplit), block 128, blockIdx.x = group * token_chunks
//   + chunk (the CTAs that read the same weights for different tokens run side by side and
//   share them through L2); dynamic shared memory kSmemBytes (below).
//
// Stages of 64 k (one 128-byte swizzle atom a row):
//   X stage  u16[64 tokens][64]  8 KB, copied with cp.async (zeros past M and K), kXStages
//            buffers, two stages ahead;
//   packed   the stage's 4 KB of packed weights, copied with cp.async three stages ahead
//            (kPStages buffers): thread c copies, and later decodes, chunks c and c + 128,
//            chunk j = row j / 2, k 32 (j % 2) .. + 32, 16 bytes (a warp's copy covers 16 rows
//            x 32 contiguous bytes), to byte 16 j; its block scales go to registers;
//   W stage  u16[128 rows][64]  16 KB, two buffers, written by the threads when decoding.
//   In X and W, row r's 16-byte unit u (8 k) is at byte r * 128 + ((u ^ (r & 7)) << 4): the
//   swizzle the descriptors name, and a quarter warp's 16-byte stores or copies of 8 units
//   of 4 rows then hit 8 distinct bank groups.
//   (Why the packed weights pass through shared memory: held in a ring of registers, the
//   compiler moved a just-loaded 16-byte vector between registers, which waits for the load;
//   every stage then waited a full DRAM latency, 28672 x 8192 at 64 tokens took 198 us.)
//
// Pipeline, stage i (one barrier a stage):
//   copy the activations of stage i + 2 and the packed weights of stage i + 3 (into the
//   buffers of stage i - 1, whose wgmma and decoding are done);
//   issue stage i's four wgmma (X buffer i % kXStages, W buffer i % 2) and commit them;
//   decode stage i + 1 into W buffer (i + 1) % 2 (last read by stage i - 1's wgmma, which
//   every warp waited for before the barrier that opened stage i);
//   wait for stage i's wgmma and this thread's copies of X(i + 1) and the packed weights of
//   i + 2, make the shared writes visible to the tensor cores' (async) proxy, barrier.
//
// Accumulators (m64nNk16, float32): warp w, lane (g, t) = (lane / 4, lane % 4) holds
// d[4j + 2h + e] = D[token 16w + g + 8h][row 8j + 2t + e].
//
// Split-K (ksplit > 1, blockIdx.y = split): as gemm_4bit_tile_split. Split p takes the p-th
// contiguous share of ceil(stages / ksplit) stages, stores its accumulators to `partial` in
// fragment order [split][blockIdx.x][r][thread], and the CTA that counts in last sums the
// partials of its tile in split order 0, 1, ... (its own as stored), so the result does not
// depend on which CTA finishes last. It resets the counter for the next launch.
#include "matmul_4bit.cuh"

namespace {

using q4::byte_of;
using q4::cp_async16;
using q4::cp_async_commit;
using q4::cp_async_wait;
using q4::lut_at;
using q4::mul2;
using q4::pack2;
using q4::shared_address;

constexpr int kThreads = 128;  // one warpgroup
constexpr int kTokens = 64;    // the wgmma's M
constexpr int kRows = 128;     // the wgmma's N: weight rows a CTA
constexpr int kStageK = 64;    // k a stage: one 128-byte swizzle atom a row
constexpr int kXStages = 3;  // activation buffers: copied two stages ahead
constexpr int kPStages = 4;  // packed weight buffers: copied three stages ahead
constexpr int kXBytes = kTokens * 2 * kStageK;
constexpr int kWBytes = kRows * 2 * kStageK;
constexpr int kPBytes = kRows * kStageK / 2;
constexpr int kAccs = kTokens * kRows / kThreads;  // float32 accumulators a thread
// Dynamic shared memory: X buffers | W buffers | packed weight buffers | byte table
// u32[256][32] | code2 float[256] | the split-K flag, plus 1 KB to align the X and W buffers
// to the swizzle atom's 1024 bytes.
constexpr int kSmemBytes = kXStages * kXBytes + 2 * kWBytes + kPStages * kPBytes + 4 * (256 * 32 + 256) + 16 + 1024;

// A shared-memory matrix descriptor: K-major rows of 128 bytes with the 128-byte swizzle,
// 8-row groups 1024 bytes apart (the leading offset is unused for this layout; encoded as 1).
__device__ __forceinline__ u64 sw128_desc(u32 address) {
  return (u64)((address >> 4) & 0x3FFFu) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

__device__ __forceinline__ u32 sw128_offset(u32 row, u32 unit) { return row * 128 + ((unit ^ (row & 7)) << 4); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Shared writes of the generic proxy (st.shared, cp.async) become visible to wgmma's reads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Pins the accumulators at this point of the program: the compiler may not move their uses
// above a wgmma wait, nor their definitions below a wgmma issue.
__device__ __forceinline__ void fence_accumulators(float (&d)[kAccs]) {
#pragma unroll
  for (int i = 0; i < kAccs; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define CQ_WGMMA_D                                                                                                    \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "  \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define CQ_WGMMA_D_OPERANDS                                                                                            \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),        \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),         \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),        \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),        \
      "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),        \
      "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),        \
      "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),        \
      "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// D[64 x 128] += A[64 x 16] * B[16 x 128], A and B K-major in shared memory (descriptors).
template <class Fmt>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[kAccs], u64 desc_a, u64 desc_b) {
  if constexpr (Fmt::kIsHalf) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " CQ_WGMMA_D ", %64, %65, 1, 1, 1, 0, 0;"
                 : CQ_WGMMA_D_OPERANDS
                 : "l"(desc_a), "l"(desc_b));
  } else {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " CQ_WGMMA_D ", %64, %65, 1, 1, 1, 0, 0;"
                 : CQ_WGMMA_D_OPERANDS
                 : "l"(desc_a), "l"(desc_b));
  }
}
#undef CQ_WGMMA_D
#undef CQ_WGMMA_D_OPERANDS

__device__ __forceinline__ uint4 load_shared16(u32 address) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(address));
  return v;
}

__device__ __forceinline__ void store_shared16(u32 address, u32 a, u32 b, u32 c, u32 d) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(address), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

}  // namespace

// gemm_4bit_wgmma<Fmt, NESTED, TILED>: Fmt is MmaHalf (fp16) or MmaBFloat16 (bf16).
// (__launch_bounds__ minimum of 2 CTAs an SM: the shared memory allows two, and they overlap
// one CTA's decoding with the other's barrier waits.)
template <class Fmt, bool NESTED, bool TILED = false>
__global__ void __launch_bounds__(kThreads, 2)
gemm_4bit_wgmma(const u16* __restrict__ A, const u8* __restrict__ packed, const float* __restrict__ table,
                const float* __restrict__ absmax, const u8* __restrict__ qabsmax, const float* __restrict__ code2,
                const float* __restrict__ nested_absmax, const float* __restrict__ offset,
                const u16* __restrict__ bias, u16* __restrict__ out, int M, int N, int K, int block_shift,
                int has_bias, int ksplit, int token_chunks, float* __restrict__ partial, u32* __restrict__ counters) {
  extern __shared__ __align__(16) u8 smem_raw[];
  // The swizzle atoms must start 1024-byte aligned in the shared window.
  const u32 raw_s = shared_address(smem_raw);
  const u32 pad = ((raw_s + 1023u) & ~1023u) - raw_s;
  u8* smem = smem_raw + pad;
  const u32 xs = raw_s + pad;                // X buffers
  const u32 ws = xs + kXStages * kXBytes;    // W buffers (decoded)
  const u32 ps = ws + 2 * kWBytes;           // packed weight buffers
  u32* lut = reinterpret_cast<u32*>(smem + kXStages * kXBytes + 2 * kWBytes + kPStages * kPBytes);
  float* code2_s = reinterpret_cast<float*>(lut + 256 * 32);
  int* last_flag = reinterpret_cast<int*>(code2_s + 256);
  q4::fill_byte_table<Fmt, NESTED, kThreads>(lut, code2_s, table, code2);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int chunk = blockIdx.x % token_chunks;
  const int n0 = (blockIdx.x / token_chunks) * kRows, tok0 = chunk * kTokens;
  const float off = NESTED ? __ldg(offset) : 0.0f;
  const u32 lut_lane = shared_address(lut) + 4 * lane;
  // This CTA's share of the stages (all of them when ksplit = 1); uniform over the CTA.
  const int stages_all = (K + kStageK - 1) / kStageK;
  const int share = (stages_all + ksplit - 1) / ksplit;
  const int st_begin = min(stages_all, (int)blockIdx.y * share);
  const int stages = min(stages_all, st_begin + share) - st_begin;

  // Activations of local stage s into X buffer s % kXStages: copy q of this thread is unit
  // c = tid + 128 q of the stage, token c / 8, k 8 (c % 8) .. + 8.
  auto copy_x = [&](int s) {
    if (s >= stages) return;
    const u32 base = xs + (u32)(s % kXStages) * kXBytes;
#pragma unroll
    for (int q = 0; q < kXBytes / 16 / kThreads; ++q) {
      const u32 c = tid + kThreads * q, tok = c >> 3, unit = c & 7;
      const int k = (st_begin + s) * kStageK + 8 * (int)unit;
      const bool ok = tok0 + (int)tok < M && k < K;  // K % 32 == 0: a unit is wholly in or out
      const u16* src = ok ? A + (i64)(tok0 + (int)tok) * K + k : A;
      cp_async16(base + sw128_offset(tok, unit), src, ok ? 16u : 0u);
    }
  };

  // Weights of local stage s: this thread's chunks j = tid + 128 i (i = 0, 1), row j / 2 of the
  // CTA, k 32 (j % 2) .. + 32 of the stage, copied to byte 16 j of packed buffer s % kPStages
  // (zeros past N and K), and their scales fetched into registers (v, q).
  const int half = tid & 1;
  auto chunk_valid = [&](int s, int i) {
    return s < stages && n0 + (tid >> 1) + 64 * i < N && (st_begin + s) * kStageK + 32 * half < K;
  };
  auto copy_w = [&](int s, float (&v)[2], u32 (&q)[2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const u32 dst = ps + (u32)(s % kPStages) * kPBytes + 16 * (tid + kThreads * i);
      if (chunk_valid(s, i)) {
        const int row = n0 + (tid >> 1) + 64 * i, k = (st_begin + s) * kStageK + 32 * half;
        const i64 e = (i64)row * K + k;
        if constexpr (TILED) {
          const i64 tile = ((i64)(row >> 4) * (K >> 7) + (k >> 7)) * 16 + (row & 15);
          cp_async16(dst, packed + tile * 64 + ((k & 127) >> 1), 16u);
        } else {
          cp_async16(dst, packed + (e >> 1), 16u);
        }
        q4::scale_fetch<NESTED>(e >> block_shift, absmax, qabsmax, nested_absmax, v[i], q[i]);
      } else if (s < stages) {
        cp_async16(dst, packed, 0u);  // zeros
        v[i] = 0.0f;
        q[i] = 0;
      }
    }
  };
  // Decode local stage s (its packed buffer and scales) into W buffer s % 2: 16 bytes -> 32
  // weights -> four 16-byte units a chunk.
  auto decode = [&](int s, const float (&v)[2], const u32 (&q)[2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint4 w = load_shared16(ps + (u32)(s % kPStages) * kPBytes + 16 * (tid + kThreads * i));
      const float sc = chunk_valid(s, i) ? q4::scale_decode<NESTED>(v[i], q[i], code2_s, off) : 0.0f;
      const u32 hs = pack2<Fmt>(sc, sc);
      const u32 row = (tid >> 1) + 64 * i;
      const u32 base = ws + (u32)(s & 1) * kWBytes;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const u32 word = q4::word_of(w, u);
        store_shared16(base + sw128_offset(row, 4 * half + u), mul2<Fmt>(lut_at(lut_lane, byte_of(word, 0)), hs),
                       mul2<Fmt>(lut_at(lut_lane, byte_of(word, 1)), hs),
                       mul2<Fmt>(lut_at(lut_lane, byte_of(word, 2)), hs),
                       mul2<Fmt>(lut_at(lut_lane, byte_of(word, 3)), hs));
      }
    }
  };

  float acc[kAccs];
#pragma unroll
  for (int i = 0; i < kAccs; ++i) acc[i] = 0.0f;

  // Scales of the stages in flight, slot s % kPStages (the loop is unrolled by kPStages so
  // the slots are registers).
  float vr[kPStages][2];
  u32 qr[kPStages][2];
  copy_x(0);
  copy_w(0, vr[0], qr[0]);
  copy_w(1, vr[1], qr[1]);
  cp_async_commit();
  copy_x(1);
  copy_w(2, vr[2], qr[2]);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();  // the table, code2 and stage 0's copies are published
  decode(0, vr[0], qr[0]);
  fence_proxy_async();
  __syncthreads();

  for (int s0 = 0; s0 < stages; s0 += kPStages) {
#pragma unroll
    for (int d = 0; d < kPStages; ++d) {
      const int s = s0 + d;
      if (s >= stages) break;  // uniform over the CTA
      // Into the buffers of stage s - 1: its wgmma and decode are done (barrier below).
      copy_x(s + 2);
      copy_w(s + 3, vr[(d + 3) % kPStages], qr[(d + 3) % kPStages]);
      cp_async_commit();
      const u32 xa = xs + (u32)(s % kXStages) * kXBytes, wa = ws + (u32)(d & 1) * kWBytes;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kStageK / 16; ++kk) wgmma_m64n128k16<Fmt>(acc, sw128_desc(xa + 32 * kk), sw128_desc(wa + 32 * kk));
      wgmma_commit();
      if (s + 1 < stages) decode(s + 1, vr[(d + 1) % kPStages], qr[(d + 1) % kPStages]);
      wgmma_wait_all();
      fence_accumulators(acc);
      cp_async_wait<1>();  // this thread's copies of X(s + 1) and the packed weights of s + 2
      fence_proxy_async();
      __syncthreads();
    }
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the CTA exits

  if (ksplit > 1) {  // uniform over the launch
    const i64 ctas = gridDim.x;
    float* mine = partial + ((i64)blockIdx.y * ctas + blockIdx.x) * (kAccs * kThreads) + tid;
#pragma unroll
    for (int r = 0; r < kAccs; ++r) __stcg(mine + r * kThreads, acc[r]);
    __threadfence();  // the partials are visible GPU-wide before this CTA is counted
    __syncthreads();
    if (tid == 0) {
      *last_flag = atomicAdd(counters + blockIdx.x, 1u) == (u32)ksplit - 1;
      if (*last_flag) counters[blockIdx.x] = 0;  // every split has counted: reset for the next launch
    }
    __syncthreads();
    if (!*last_flag) return;
    __threadfence();  // (acquire) the other splits' partials are read after their count
    // Split by split (this CTA's own partial too, as stored), all accumulators at once: one
    // round trip to L2 a split, not one an accumulator and split.
    const float* tile_part = partial + (i64)blockIdx.x * (kAccs * kThreads) + tid;
#pragma unroll
    for (int r = 0; r < kAccs; ++r) acc[r] = 0.0f;
    for (int p = 0; p < ksplit; ++p) {
      const float* part = tile_part + (p * ctas) * (kAccs * kThreads);
#pragma unroll
      for (int r = 0; r < kAccs; ++r) acc[r] += __ldcg(part + r * kThreads);
    }
  }

  // Epilogue: bias, one rounding, two adjacent rows of a token at a time.
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < kRows / 8; ++j) {
    const int row = n0 + 8 * j + 2 * t;
    if (row >= N) continue;
    const bool pair = row + 1 < N;
    const float b0 = has_bias ? Fmt::to_float(bias[row]) : 0.0f;
    const float b1 = has_bias && pair ? Fmt::to_float(bias[row + 1]) : 0.0f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int tok = tok0 + 16 * warp + g + 8 * h;
      if (tok >= M) continue;
      const u16 lo = Fmt::from_float(__fadd_rn(acc[4 * j + 2 * h], b0));
      u16* dst = out + (i64)tok * N + row;
      if (!pair) {
        dst[0] = lo;
      } else {
        const u16 hi = Fmt::from_float(__fadd_rn(acc[4 * j + 2 * h + 1], b1));
        if ((N & 1) == 0) {
          *reinterpret_cast<u32*>(dst) = (u32)lo | ((u32)hi << 16);
        } else {
          dst[0] = lo;
          dst[1] = hi;
        }
      }
    }
  }
}
