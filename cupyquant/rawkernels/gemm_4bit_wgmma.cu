// Fused 4-bit matrix product on Hopper's warpgroup MMA (wgmma; sm_90a, compiled for that target
// only): out[m, n] = sum_k A[m, k] * W[n, k] (+ bias[n]) for fp16 / bf16 activations and tens
// to hundreds of tokens, from NF4 / FP4 weights in the bitsandbytes layout or in tile order.
//
// Why a kernel of its own: gemm_4bit_tile (mma.sync) keeps the activation fragments in
// registers too, and at 64 tokens it is bound by issuing its multiplies (2 warps a scheduler
// at 255 registers). Here the activations stay in shared memory, where the tensor cores read
// them asynchronously; the threads only decode weights into the wgmma's register operand.
//
// Data layout: as gemm_4bit.cu (A u16[M, K] row-major, which X_TMA builds read through a tensor map
// and, where N % 8 == 0, write out through another: see the epilogue; packed in the bitsandbytes layout, or
// TILED in 16-row x 128-k tiles, cupyquant/tiled_4bit.py; table, scales, bias, out). Requires
// K % 32 == 0 (TILED: K % 128 == 0 and N % 16 == 0) and 16-byte aligned A and packed.
//
// The product is computed transposed, as in gemm_4bit.cu: D = W * X^T, a CTA computing
// D[128 rows][T tokens] (T = TOKENS, 64, 128 or 256; WgmmaShape) over its share of K with
// wgmma m64nTk16 on two row blocks of 64: A = 64 weight rows x 16 k from registers, B = X
// (the activations, T tokens x 16 k) K-major in shared memory with the 128-byte swizzle.
// T = 64: one warpgroup computes both row blocks (b = 0, 1), plus a scale warp (160
// threads), or (GROUPS = 2) as at 128; T = 128: warpgroup wg computes row block wg, plus a
// scale warp (288 threads);
// T = 256: as 128, plus a scale warpgroup (384 threads; setmaxnreg moves registers to the
// multiplying ones). (At T = 256 one m64n256k16 a k slice is 4-9% faster than two m64n128k16
// on tokens 0..127 and 128..255, with the same bits: run 49.) A weight is
// W(row, k) = code[q] * scale, each rounded to A's format and multiplied there (as in
// gemm_4bit.cu); products are summed in float32.
//   grid (ceil(N / 128) * token_chunks, ksplit), block kThreads, blockIdx.x = tile = group *
//   token_chunks + chunk (the CTAs that read the same weights for different tokens run side
//   by side and share them through L2), blockIdx.y = split of K (the tiles from split_from
//   on; below); dynamic shared memory kSmemBytes (below).
//
// Register operand: warp w of a warpgroup, lane (g, t) = (lane / 4, lane % 4) holds, for its
// row block B (b with one warpgroup, wg with two) and k slice kk of a stage, rows r = 64B +
// 16w + g (+ 8) and k = 16kk + 2t, + 1 (+ 8): that is byte t of words 2kk and 2kk + 1 of the
// row's 32 packed bytes of the stage. Each byte becomes one register through the byte table
// (code pair in A's format, lower k in the low half) times the chunk's packed scale pair.
//
// Stages of 64 k (one 128-byte swizzle atom of X a token):
//   X        u16[T tokens][64]  8 / 16 / 32 KB, copied with cp.async (zeros past M and K),
//            kXStages buffers, two stages ahead; token r's 16-byte unit u (8 k) at byte
//            r * 128 + ((u ^ (r & 7)) << 4), the swizzle the descriptor names (a quarter
//            warp's copies of 8 units of one token then hit 8 distinct bank groups).
//            X_TMA builds have the TMA unit copy them instead: the scale warp's first thread
//            moves a stage with one tensor copy (cp.async.bulk.tensor) of the box of 64 k x T
//            tokens at (k, tok0) of A's tensor map (x_map: cupyquant/_tensor_map.py), which
//            lands in this swizzle with zeros past M and K and counts its bytes on the
//            buffer's mbarrier; the warpgroups wait for that barrier's phase before their
//            wgmma. The threads then issue no X copies, and since the tensor copy and the
//            wgmma both use the async proxy, the stage's proxy fence goes too. It pays where a
//            stage's X is largest: 256 tokens a CTA, 8 copies a thread a stage otherwise
//            (28672 x 8192 at 512 tokens 582 -> 501-512 us with a bulk copy from a swizzled
//            image of A that a pass of its own wrote, run 49 of NOTES_matmul_4bit.md; at 64 and
//            128 tokens no gain, as run 36 found before 256-token CTAs existed). The tensor map
//            took that pass's place (8192 x 28672 at 256 tokens 215 -> 202 us, run 150);
//   packed   the stage's 4 KB of packed weights, row r's 32 bytes at byte 32 r, copied with
//            cp.async three stages ahead (kPStages buffers): thread c copies chunk c (and
//            c + 128 with one warpgroup), chunk j = row j / 2, k 32 (j % 2) .. + 32 (a warp's
//            copy covers 16 rows x 32 contiguous bytes);
//   scales   u32[256 chunks], the chunk's scale as a packed pair in A's format (chunk
//            2 row + h: the row's k 32 h .. + 32 of the stage), kPStages buffers, written by
//            the scale warp (below).
//   (The packed weights pass through shared memory because, held in a ring of registers,
//   the compiler moved a just-loaded 16-byte vector between registers, which waits for the
//   load: every stage then waited a DRAM latency.)
//
// The scale warp (the last warp; at T = 256 the last warpgroup): scale thread l serves rows
// l + 32 q (q < 4; at T = 256 row l only). It fetches a stage's scales
// kScaleAhead = 6 stages ahead into registers and decodes them into shared memory two stages
// ahead. Why a warp of its own: in the warpgroup, the scale loads and their 64-bit address
// arithmetic cost ~40 instructions a stage on the critical path, and the proxy fence of each
// stage (fence.proxy.async is a MEMBAR) waited for the loads still in flight. H100, 28672 x
// 8192 at 64 tokens: 131.1 us with the scales in the warpgroup, 116.2 with this warp
// (NOTES_matmul_4bit.md, run 35). The warp's own loop must stay short, since every stage
// waits for it at the barrier: with 64-bit block indices (~255 instructions a stage) it
// gained nothing; with 32-bit offsets from per-row pointers (~215) it does. (Two scale warps
// of 64 rows each measured no faster: run 36.)
//
// Pipeline, stage i (one barrier a stage, named barrier 1 over all threads):
//   warpgroups: copy X(i + 2) into the buffer of stage i - 2 (X_TMA: the scale warp's first
//   thread, as it enters stage i) and the packed weights of i + 3
//   into that of i - 1 (their wgmma and decoding are done: the barrier ending stage i - 1);
//   issue stage i's wgmma (four a row block) on its register operands and X buffer
//   i % kXStages, commit; wait for stage i - 1's wgmma (stage i's run on, across the
//   barrier, while the next are decoded); decode stage i + 1 into the register set of i - 1;
//   wait for this thread's copies of X(i + 1) and the packed weights of i + 2, make the
//   shared writes visible to the tensor cores' (async) proxy (X_TMA: the packed weights
//   only, and no proxy fence; the warpgroups wait for X(i)'s mbarrier before its wgmma);
//   scale warp: write the scales of stage i + 2; fetch those of stage i + 6;
//   barrier.
// (Waiting for stage i's own wgmma before the barrier, with three X buffers, was 6% slower at
// 128 tokens a CTA and as fast at 64: run 36.)
//
// Accumulators (m64nNk16, float32): warp w of a warpgroup, lane (g, t) holds, for its row
// block B as above, acc[b][4j + 2h + e] = D[row 64B + 16w + g + 8h][token 8j + 2t + e].
//
// Split-K (ksplit > 1, blockIdx.y = split): as gemm_4bit_tile_split, for tiles split_from
// .. on (all of them, or those of a balanced last wave: below). Split p takes the p-th
// contiguous share of ceil(stages / ksplit) stages, stores its accumulators to `partial` in
// fragment order [split][tile - split_from][r][thread], and the CTA that counts in last sums
// the partials of its tile in split order 0, 1, ... (its own as stored), so the result does
// not depend on which CTA finishes last. It resets the counter for the next launch. The
// tiles before split_from are computed whole by their split-0 CTAs (the others return at
// once), as in an unsplit launch: same bits as there, and the split tiles' as where all are
// split.
// Balanced last wave (one CTA an SM): where the tiles fill some waves of the SMs and leave
// the last one short, that wave's tiles (the last ones) are split. Dispatched in grid order
// (row y = split), split 0 of them follows the whole tiles, and split 1 follows the whole
// tiles' CTAs of row 1, which return at once: the shares start together as the full waves
// end and spread the last wave's work over the SMs.
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

constexpr int kRows = 128;     // weight rows a CTA: two row blocks of the wgmma's M = 64
constexpr int kStageK = 64;    // k a stage: one 128-byte swizzle atom a token
constexpr int kXAhead = 2;  // stages the X copies run ahead (three in five buffers: slower, run 49)
constexpr int kXStages = kXAhead + 2;  // X buffers: two ahead, and the one the last stage's wgmma reads
constexpr int kPStages = 4;    // packed weight buffers (copied three stages ahead) and scale buffers (two)
constexpr int kPBytes = kRows * kStageK / 2;
constexpr int kSBytes = 4 * kRows * kStageK / 32;  // a packed scale pair a 32-k chunk
constexpr int kScaleAhead = 6;                     // stages the scale warp fetches ahead
constexpr int kStageBarrier = 1;                   // named barriers: the prologue's and each stage's (all threads)
constexpr int kMmaBarrier = 2;                     // and the warpgroups', after the scale warp has left
constexpr int kStoreBarrier = 3;                   // + warpgroup: a warpgroup's output box is staged (X_TMA)

// The CTA's shape for TOKENS tokens (64, 128 or 256) on GROUPS warpgroups. 64: one warpgroup
// computes both row blocks, two CTAs an SM; or two warpgroups, one row block each, one CTA an
// SM (twice the warps decoding; at the same K split the same bits, since each row block sums
// its k slices in the same order; the launcher's choice: _wgmma_default_split in
// matmul_4bit.py). 128 (more tokens): two warpgroups, one row block each, share the activations, so a
// decoded weight feeds twice the multiplies; one CTA an SM. 256: as 128,
// each warpgroup issuing wgmma N = 256 (128 accumulators a thread), and the
// scales served by a whole warpgroup, so that setmaxnreg can hand its registers to the two
// that multiply. (Without that, 256 tokens spilled under the 168 registers a thread that
// three warps a scheduler leave, and lost everywhere: 28672 x 8192 at 512 tokens 792 us
// against 623 on 128-token CTAs, run 36.)
// The warpgroups a width has unless told otherwise: one at 64 tokens, two above.
__host__ __device__ constexpr int default_groups(int tokens) { return tokens == 64 ? 1 : 2; }

template <int TOKENS, int GROUPS = default_groups(TOKENS)>
struct WgmmaShape {
  static_assert(TOKENS == 64 || TOKENS == 128 || TOKENS == 256, "TOKENS is 64, 128 or 256");
  static_assert(GROUPS == 2 || (GROUPS == 1 && TOKENS == 64), "two warpgroups, or one at 64 tokens");
  static constexpr int kTokens = TOKENS;
  static constexpr int kGroups = GROUPS;  // warpgroups: the wgmma and the weight decoding
  static constexpr int kMmaThreads = 128 * kGroups;
  static constexpr int kScaleThreads = TOKENS == 256 ? 128 : 32;  // the scale warp(s)
  static constexpr int kThreads = kMmaThreads + kScaleThreads;
  static constexpr int kScaleWarp = kMmaThreads / 32;       // the first scale warp's index
  static constexpr int kScaleRows = kRows / kScaleThreads;  // rows a scale thread serves
  static constexpr int kBlocks = 2 / kGroups;               // 64-row blocks a warpgroup
  static constexpr int kAccs = TOKENS / 2;                  // float32 accumulators of a row block, a thread
  // setmaxnreg (256 tokens; 0: none): launched at 168 registers a thread (384 threads, one
  // CTA an SM), the scale warpgroup gives up 88 a thread and the other two take 40 of them.
  static constexpr int kScaleRegs = TOKENS == 256 ? 80 : 0;
  static constexpr int kMmaRegs = TOKENS == 256 ? 208 : 0;
  static constexpr int kXBytes = kTokens * 2 * kStageK;
  static constexpr int kXCopies = kXBytes / 16 / kMmaThreads;  // 16-byte activation copies a thread a stage
  static constexpr int kWCopies = kPBytes / 16 / kMmaThreads;  // and packed weight copies
  static constexpr int kCtasPerSm = GROUPS == 1 ? 2 : 1;
  // Dynamic shared memory: X buffers | packed weight buffers | scale buffers | byte table
  // u32[256][32] | code2 float[256] | the split-K flag (16 bytes) | an mbarrier an X buffer
  // (X_TMA), plus 1 KB to align the X buffers to the swizzle atom's 1024 bytes.
  static constexpr int kSmemBytes =
      kXStages * kXBytes + kPStages * (kPBytes + kSBytes) + 4 * (256 * 32 + 256) + 16 + 8 * kXStages + 1024;
};

// A shared-memory matrix descriptor: K-major rows of 128 bytes with the 128-byte swizzle,
// 8-row groups 1024 bytes apart (the leading offset is unused for this layout; encoded as 1).
__device__ __forceinline__ u64 sw128_desc(u32 address) {
  return (u64)((address >> 4) & 0x3FFFu) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

__device__ __forceinline__ u32 sw128_offset(u32 row, u32 unit) { return row * 128 + ((unit ^ (row & 7)) << 4); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}
// Shared writes of the generic proxy (cp.async) become visible to wgmma's reads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Pins the accumulators at this point of the program: the compiler may not move their uses
// above a wgmma wait, nor their definitions below a wgmma issue.
template <int kCount>
__device__ __forceinline__ void fence_accumulators(float (&d)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define CQ_D64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define CQ_D64_OPERANDS "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define CQ_D128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define CQ_D128_OPERANDS "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define CQ_D256 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"
#define CQ_D256_OPERANDS "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
#define CQ_WGMMA_N64(type) \
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." type "." type " " CQ_D64 ", {%32, %33, %34, %35}, %36, 1, 1, 1, 0;" \
               : CQ_D64_OPERANDS \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))
#define CQ_WGMMA_N128(type) \
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32." type "." type " " CQ_D128 ", {%64, %65, %66, %67}, %68, 1, 1, 1, 0;" \
               : CQ_D128_OPERANDS \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))

#define CQ_WGMMA_N256(type) \
  asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32." type "." type " " CQ_D256 ", {%128, %129, %130, %131}, %132, 1, 1, 1, 0;" \
               : CQ_D256_OPERANDS \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))

// D[64 x N] += A[64 x 16] * B[16 x N]: A from registers (the warp's 16 rows), B K-major in
// shared memory (descriptor).
template <class Fmt, int N>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[N / 2], const u32 (&a)[4], u64 desc_b) {
  static_assert(N == 64 || N == 128 || N == 256, "the wgmma N built here is 64, 128 or 256");
  if constexpr (N == 64) {
    if constexpr (Fmt::kIsHalf) CQ_WGMMA_N64("f16"); else CQ_WGMMA_N64("bf16");
  } else if constexpr (N == 256) {
    if constexpr (Fmt::kIsHalf) CQ_WGMMA_N256("f16"); else CQ_WGMMA_N256("bf16");
  } else {
    if constexpr (Fmt::kIsHalf) CQ_WGMMA_N128("f16"); else CQ_WGMMA_N128("bf16");
  }
}
#undef CQ_WGMMA_N64
#undef CQ_WGMMA_N128
#undef CQ_WGMMA_N256
#undef CQ_D256
#undef CQ_D256_OPERANDS
#undef CQ_D64
#undef CQ_D64_OPERANDS
#undef CQ_D128
#undef CQ_D128_OPERANDS

__device__ __forceinline__ uint4 load_shared16(u32 address) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(address));
  return v;
}

__device__ __forceinline__ u32 load_shared4(u32 address) {
  u32 v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(address));
  return v;
}

__device__ __forceinline__ void store_shared8(u32 address, u32 lo, u32 hi) {
  asm volatile("st.shared.v2.u32 [%0], {%1, %2};" ::"r"(address), "r"(lo), "r"(hi) : "memory");
}

template <int kCount>
__device__ __forceinline__ void named_barrier(int id) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "n"(kCount) : "memory");
}

// The X_TMA build's copies: one tensor copy a stage (the TMA unit's, off the threads), which
// counts its bytes on the buffer's mbarrier; the warpgroups wait for the barrier's phase.
__device__ __forceinline__ void mbarrier_init(u32 bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
}
// The initialised barriers become visible to the tensor copies' (async) proxy.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// A's TMA tensor map (a CUtensorMap, opaque to the kernel): 2-D u16 [M][K], box 64 k x TOKENS
// tokens, 128-byte swizzle, zeros out of bounds (cupyquant/_tensor_map.py).
struct alignas(128) XMap {
  u64 opaque[16];
};

// Arrives on `bar` (its one expected arrival) and expects `bytes` from the copy of the box at
// (k, row) issued next: the whole box, zeros out of bounds included.
__device__ __forceinline__ void tensor_copy(u32 dst, const XMap* map, int k, int row, u32 bytes, u32 bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
      "l"(reinterpret_cast<u64>(map)), "r"(k), "r"(row), "r"(bar)
      : "memory");
}

// Four 8x8 blocks of 16-bit values from accumulator fragments (thread (g, t) holds row g,
// columns 2t, 2t + 1 of block m in r[m]) into shared memory transposed: lane 8m + k gives the
// address of column k of block m, whose 8 values land there as one 16-byte unit.
__device__ __forceinline__ void store_matrix_x4_trans(u32 address, const u32 (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(address), "r"(r[0]),
               "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// The X_TMA build's output: one tensor store of a staged box (64 rows x T tokens) to (row,
// token) of out's tensor map, which writes nothing past N and M. The issuing thread waits
// until the box has been read out of shared memory (the CTA may then exit).
__device__ __forceinline__ void tensor_store(const XMap* map, int row, int token, u32 src) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];" ::"l"(
                   reinterpret_cast<u64>(map)),
               "r"(row), "r"(token), "r"(src)
               : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
  asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}

__device__ __forceinline__ void mbarrier_wait(u32 bar, u32 parity) {
  u32 done;
  do {
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done);
}

}  // namespace

// gemm_4bit_wgmma<Fmt, NESTED, TILED, TOKENS, X_TMA, GROUPS>: Fmt is MmaHalf (fp16) or
// MmaBFloat16 (bf16); TOKENS a CTA and its warpgroups (WgmmaShape); X_TMA: the TMA unit copies X
// through x_map (which the other builds take and do not read). (64 tokens on one warpgroup:
// __launch_bounds__ minimum of 2 CTAs an SM: the shared memory allows two, and they overlap one
// CTA's decoding with the other's barrier waits. Ten warps an SM put three on some of its four
// schedulers, whose register files then bound a thread to 168 registers. On two warpgroups two
// CTAs an SM would leave 112 registers a thread, and the build spilled ~570 bytes a thread.)
template <class Fmt, bool NESTED, bool TILED = false, int TOKENS = 64, bool X_TMA = false,
          int GROUPS = default_groups(TOKENS)>
__global__ void __launch_bounds__(WgmmaShape<TOKENS, GROUPS>::kThreads, WgmmaShape<TOKENS, GROUPS>::kCtasPerSm)
gemm_4bit_wgmma(const u16* __restrict__ A, const u8* __restrict__ packed, const float* __restrict__ table,
                const float* __restrict__ absmax, const u8* __restrict__ qabsmax, const float* __restrict__ code2,
                const float* __restrict__ nested_absmax, const float* __restrict__ offset,
                const u16* __restrict__ bias, u16* __restrict__ out, int M, int N, int K, int block_shift,
                int has_bias, int ksplit, int token_chunks, float* __restrict__ partial, u32* __restrict__ counters,
                int split_from, const __grid_constant__ XMap x_map, const __grid_constant__ XMap out_map,
                int store_by_map) {
  using S = WgmmaShape<TOKENS, GROUPS>;
  constexpr int kTokens = S::kTokens, kMmaThreads = S::kMmaThreads, kThreads = S::kThreads;
  constexpr int kXBytes = S::kXBytes, kBlocks = S::kBlocks, kAccs = S::kAccs;
  constexpr int kScaleRows = S::kScaleRows;
  // Tiles before split_from are computed whole, by their CTAs of split 0 (see "Split-K"
  // above). Not with two CTAs an SM (64 tokens): that build sits at its register limit, and
  // the tail's arithmetic made it spill, so it splits every tile or none.
  constexpr bool kTailSplit = S::kCtasPerSm == 1;
  if constexpr (kTailSplit) {
    if (blockIdx.y > 0 && (int)blockIdx.x < split_from) return;
  }
  const int nsplit = !kTailSplit || (int)blockIdx.x >= split_from ? ksplit : 1;  // uniform over the CTA
  extern __shared__ __align__(16) u8 smem_raw[];
  // The swizzle atoms must start 1024-byte aligned in the shared window.
  const u32 raw_s = shared_address(smem_raw);
  const u32 pad = ((raw_s + 1023u) & ~1023u) - raw_s;
  u8* smem = smem_raw + pad;
  const u32 xs = raw_s + pad;                      // X buffers
  const u32 ps = xs + kXStages * kXBytes;          // packed weight buffers
  const u32 ss = ps + kPStages * kPBytes;          // scale buffers
  u32* lut = reinterpret_cast<u32*>(smem + kXStages * kXBytes + kPStages * (kPBytes + kSBytes));
  float* code2_s = reinterpret_cast<float*>(lut + 256 * 32);
  int* last_flag = reinterpret_cast<int*>(code2_s + 256);
  const u32 x_bars = shared_address(last_flag) + 16;  // X_TMA: the mbarrier of X buffer b at + 8 b
  q4::fill_byte_table<Fmt, NESTED, kThreads>(lut, code2_s, table, code2);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  // Warp wq of warpgroup wg computes rows 16 wq .. + 16 of its row blocks: both (one
  // warpgroup), or block wg.
  const int wg = warp >> 2, wq = warp & 3;
  const int chunk = blockIdx.x % token_chunks;
  const int n0 = (blockIdx.x / token_chunks) * kRows, tok0 = chunk * kTokens;
  const float off = NESTED ? __ldg(offset) : 0.0f;
  const u32 lut_lane = shared_address(lut) + 4 * lane;
  // This CTA's share of the stages (all of them unless its tile is split); uniform over the CTA.
  const int stages_all = (K + kStageK - 1) / kStageK;
  const int share = (stages_all + nsplit - 1) / nsplit;
  const int st_begin = min(stages_all, (int)blockIdx.y * share);
  const int stages = min(stages_all, st_begin + share) - st_begin;

  // Activations of local stage s into X buffer s % kXStages: copy q of this thread is unit
  // c = tid + kMmaThreads q of the stage, token c / 8 = tid / 8 + kXTokStep q, k 8 (c % 8) ..
  // + 8. Only the k offset changes from stage to stage, so the addresses are computed once.
  constexpr int kXTokStep = kMmaThreads / 8;
  const int x_tok = tid >> 3, x_k0 = st_begin * kStageK + 8 * (tid & 7);
  const u16* x_src = A + (i64)(tok0 + x_tok) * K + x_k0;  // copy q: + kXTokStep q rows
  const u32 x_dst = sw128_offset(x_tok, tid & 7);           // copy q: + kXTokStep q rows of 128 bytes
  auto copy_x = [&](int s) {
    if (s >= stages) return;
    if constexpr (X_TMA) return;  // the scale warp's first thread issues the tensor copies
    const u32 base = xs + (u32)(s % kXStages) * kXBytes + x_dst;
    const bool k_ok = x_k0 + kStageK * s < K;  // K % 32 == 0: a unit is wholly in or out
#pragma unroll
    for (int q = 0; q < S::kXCopies; ++q) {
      const bool ok = k_ok && tok0 + x_tok + kXTokStep * q < M;
      cp_async16(base + kXTokStep * 128 * q, ok ? x_src + (i64)kXTokStep * q * K + kStageK * s : A, ok ? 16u : 0u);
    }
  };

  // This thread's chunks of local stage s: j = tid + kMmaThreads i (i < kWCopies: 0, 1 with one
  // warpgroup, 0 with two), row w_row + 64 i of the weight, k w_k0 + 64 s .. + 32 (its first
  // flat element w_e0 + 64 K i + 64 s).
  const int w_row = n0 + (tid >> 1), w_k0 = st_begin * kStageK + 32 * (tid & 1);
  bool w_row_ok[S::kWCopies];
#pragma unroll
  for (int i = 0; i < S::kWCopies; ++i) w_row_ok[i] = w_row + 64 * i < N;
  const i64 w_e0 = (i64)w_row * K + w_k0;
  // Chunk 0 of stage 0 (row-major) or of a stage's 16-row x 128-k tile (TILED; the stage adds
  // its tile and half); chunk 1 lies 64 rows = 32 K bytes further in both layouts.
  const u8* w_src = TILED ? packed + ((i64)(w_row >> 4) * (K >> 7) * 16 + (w_row & 15)) * 64 + 16 * (tid & 1)
                          : packed + (w_e0 >> 1);
  auto chunk_valid = [&](int s, int i) { return s < stages && w_row_ok[i] && w_k0 + kStageK * s < K; };
  // This thread's chunk 0 of local stage s: TILED, stage st lies in the row's tile st / 2, half st % 2.
  auto w_stage = [&](int s) {
    const int stage = st_begin + s;
    return w_src + (TILED ? (i64)(stage >> 1) * 1024 + (stage & 1) * 32 : (i64)32 * s);
  };
  auto copy_w_from = [&](int s, const u8* src) {  // src: w_stage(s)
    if (s >= stages) return;
#pragma unroll
    for (int i = 0; i < S::kWCopies; ++i) {
      const u32 dst = ps + (u32)(s % kPStages) * kPBytes + 16 * (tid + kMmaThreads * i);
      if (chunk_valid(s, i)) {
        cp_async16(dst, src + (i64)32 * K * i, 16u);
      } else {
        cp_async16(dst, packed, 0u);  // zeros
      }
    }
  };
  auto copy_w = [&](int s) { copy_w_from(s, w_stage(s)); };
  // The register operands of local stage s: a[b][kk] for this warpgroup's row block b and k
  // slice kk.
  auto block_of = [&](int b) { return kBlocks == 2 ? b : wg; };  // the CTA's row block
  auto decode = [&](int s, u32 (&a)[kBlocks][4][4]) {
    const u32 pbuf = ps + (u32)(s % kPStages) * kPBytes, sbuf = ss + (u32)(s % kPStages) * kSBytes;
#pragma unroll
    for (int b = 0; b < kBlocks; ++b)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const u32 row = 64 * block_of(b) + 16 * wq + g + 8 * h;
        const uint4 lo = load_shared16(pbuf + 32 * row), hi = load_shared16(pbuf + 32 * row + 16);
        const u32 words[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        const u32 hs[2] = {load_shared4(sbuf + 8 * row), load_shared4(sbuf + 8 * row + 4)};  // chunks 2 row, 2 row + 1
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          a[b][kk][h] = mul2<Fmt>(lut_at(lut_lane, byte_of(words[2 * kk], t)), hs[kk >> 1]);
          a[b][kk][h + 2] = mul2<Fmt>(lut_at(lut_lane, byte_of(words[2 * kk + 1], t)), hs[kk >> 1]);
        }
      }
  };

  if (warp >= S::kScaleWarp) {
    if constexpr (S::kScaleRegs > 0) asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(S::kScaleRegs));
    const int st = tid - kMmaThreads;  // this scale thread
    // X_TMA: scale thread 0 copies X, stage s as the loop below enters stage s - 2, after
    // the barrier that ends stage s - 3 (the warpgroups passed it having waited for the wgmma
    // of stage s - 4, the buffer's last reader).
    const bool x_issuer = X_TMA && st == 0;
    auto issue_x = [&](int s) {
      if (x_issuer && s < stages)
        tensor_copy(xs + (u32)(s % kXStages) * kXBytes, &x_map, kStageK * (st_begin + s), tok0, kXBytes,
                    x_bars + 8 * (s % kXStages));
    };
    if (x_issuer) {
#pragma unroll
      for (int b = 0; b < kXStages; ++b) mbarrier_init(x_bars + 8 * b);
      fence_mbarrier_init();  // (the warpgroups wait on them only after the first stage barrier)
    }
#pragma unroll
    for (int s = 0; s < kXAhead; ++s) issue_x(s);
    // Row n0 + st + kScaleThreads q (clamped to the last row; its scales are zeroed when stored). The
    // share's first element of the row lies r0 into block b0; the stage's chunk h (k 32 h ..
    // + 32) then lies in block b0 + ((r0 + 64 s + 32 h) >> block_shift): 32-bit offsets from
    // per-row pointers, so a fetch is a few instructions. Both chunks lie in one block unless
    // the blocksize is 32 (the chunks are two blocks) or K % 64 == 32 (a stage then starts 32
    // elements into a 64-element window of the flat weight, so its chunks can straddle a block
    // boundary).
    const bool two_blocks = block_shift == 5 || K % kStageK != 0;  // uniform
    const int k0 = st_begin * kStageK;
    const u8* q_row[kScaleRows];      // NESTED: qabsmax + b0
    const float* v_row[kScaleRows];   // NESTED: nested_absmax + (b0 >> 8); else absmax + b0
    u32 r0[kScaleRows], b0_low[kScaleRows];  // b0_low: b0 % 256 (NESTED)
    bool row_ok[kScaleRows];
#pragma unroll
    for (int q = 0; q < kScaleRows; ++q) {
      const int row = n0 + st + S::kScaleThreads * q;
      row_ok[q] = row < N;
      const i64 e = (i64)min(row, N - 1) * K + k0, b0 = e >> block_shift;
      r0[q] = (u32)(e - (b0 << block_shift));
      b0_low[q] = (u32)b0 & ((1u << q4::kNestedShift) - 1);
      q_row[q] = qabsmax + b0;
      v_row[q] = NESTED ? nested_absmax + (b0 >> q4::kNestedShift) : absmax + b0;
    }
    // Whether chunk h of local stage s exists (uniform over the warp; rows are checked when stored).
    auto chunk_exists = [&](int s, int h) { return s < stages && k0 + kStageK * s + 32 * h < K; };
    auto fetch = [&](int s, float (&v)[kScaleRows][2], u32 (&c)[kScaleRows][2]) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool exists = chunk_exists(s, h) && (h == 0 || two_blocks);
        const u32 ks = kStageK * s + 32 * h;
#pragma unroll
        for (int q = 0; q < kScaleRows; ++q) {
          if (exists) {
            const u32 off = (r0[q] + ks) >> block_shift;
            if constexpr (NESTED) {
              c[q][h] = __ldg(q_row[q] + off);
              v[q][h] = __ldg(v_row[q] + ((b0_low[q] + off) >> q4::kNestedShift));
            } else {
              v[q][h] = __ldg(v_row[q] + off);
              c[q][h] = 0;
            }
          } else {
            v[q][h] = 0.0f;
            c[q][h] = 0;
          }
        }
      }
    };
    auto store = [&](int s, const float (&v)[kScaleRows][2], const u32 (&c)[kScaleRows][2]) {
      if (s >= stages) return;
      const bool exists1 = chunk_exists(s, 1);
#pragma unroll
      for (int q = 0; q < kScaleRows; ++q) {
        // (Selected, not indexed: a run-time index would put the slots in local memory.)
        const float v1 = two_blocks ? v[q][1] : v[q][0];
        const u32 c1 = two_blocks ? c[q][1] : c[q][0];
        const float s0 = row_ok[q] ? q4::scale_decode<NESTED>(v[q][0], c[q][0], code2_s, off) : 0.0f;
        const float s1 = row_ok[q] && exists1 ? q4::scale_decode<NESTED>(v1, c1, code2_s, off) : 0.0f;
        store_shared8(ss + (u32)(s % kPStages) * kSBytes + 8 * (st + S::kScaleThreads * q), pack2<Fmt>(s0, s0),
                      pack2<Fmt>(s1, s1));
      }
    };
    // Scales in flight, slot s % kScaleAhead (the loop is unrolled by kScaleAhead so the slots
    // are registers): fetched kScaleAhead stages ahead, stored two ahead.
    float vr[kScaleAhead][kScaleRows][2];
    u32 cr[kScaleAhead][kScaleRows][2];
#pragma unroll
    for (int d = 0; d < kScaleAhead; ++d) fetch(d, vr[d], cr[d]);
    named_barrier<kThreads>(kStageBarrier);  // the table and code2 are published
    store(0, vr[0], cr[0]);
    store(1, vr[1], cr[1]);
    named_barrier<kThreads>(kStageBarrier);
    for (int s0 = 0; s0 < stages; s0 += kScaleAhead) {
#pragma unroll
      for (int d = 0; d < kScaleAhead; ++d) {
        const int s = s0 + d;
        if (s >= stages) break;  // uniform over the CTA
        issue_x(s + kXAhead);
        store(s + 2, vr[(d + 2) % kScaleAhead], cr[(d + 2) % kScaleAhead]);
        fetch(s + kScaleAhead, vr[d], cr[d]);
        named_barrier<kThreads>(kStageBarrier);
      }
    }
    return;  // the warpgroups go on alone (their barriers from here on are kMmaBarrier)
  }

  if constexpr (S::kMmaRegs > 0) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(S::kMmaRegs));
  // acc[b]: this warpgroup's row block b, all kTokens tokens
  float acc[kBlocks][kAccs];
#pragma unroll
  for (int b = 0; b < kBlocks; ++b)
#pragma unroll
    for (int i = 0; i < kAccs; ++i) acc[b][i] = 0.0f;

  u32 frag[2][kBlocks][4][4];  // two register sets: stage s uses set s % 2
  copy_x(0);
  copy_w(0);
  copy_w(1);
  cp_async_commit();
  copy_x(1);
  copy_w(2);
  cp_async_commit();
  named_barrier<kThreads>(kStageBarrier);  // the table and code2 are published
  cp_async_wait<1>();                      // X(0) and the packed weights of stages 0 and 1
  if constexpr (!X_TMA) fence_proxy_async();
  named_barrier<kThreads>(kStageBarrier);  // and the scales of stages 0 and 1
  decode(0, frag[0]);

  // TILED, one CTA an SM: the loop's weight copies (local stage s0 + d + 3, s0 a multiple of
  // kPStages = 4) start at w_loop + 1024 (d / 2), plus odd_step for odd d (the half's step:
  // 32 bytes from an even stage to the next, 992 from an odd one, by the parity of stage 3),
  // and w_loop moves two tiles a round. w_stage's tile arithmetic a stage cost this build ~6%
  // more issue cycles than the row-major one's (H100, 28672 x 8192 at 512 tokens: 430-458 us
  // -> 405-438, interleaved; run 59 of NOTES_matmul_4bit.md). The row-major build keeps
  // w_stage: the same pointer there ran no faster. Not at 64 tokens, whose build sits at its
  // register limit and spilled with the registers this keeps.
  constexpr bool kLoopPointer = TILED && S::kCtasPerSm == 1;
  static_assert(kPStages == 4, "w_loop steps two whole tiles a round of the loop");
  const u8* w_loop = kLoopPointer ? w_stage(3) : nullptr;  // (unused by the other builds)
  const int odd_step = kLoopPointer && ((st_begin + 3) & 1) ? 1024 - 32 : 32;
  for (int s0 = 0; s0 < stages; s0 += kPStages) {
#pragma unroll
    for (int d = 0; d < kPStages; ++d) {
      const int s = s0 + d;
      if (s >= stages) break;  // uniform over the CTA
      // X into the buffer of stage s - 2, packed weights into that of s - 1: their wgmma and
      // decoding are done (the barrier ending stage s - 1).
      copy_x(s + 2);
      if constexpr (kLoopPointer) {
        copy_w_from(s + 3, w_loop + 1024 * (d >> 1) + ((d & 1) ? odd_step : 0));
      } else {
        copy_w(s + 3);
      }
      cp_async_commit();
      const u32 xa = xs + (u32)(s % kXStages) * kXBytes;
      if constexpr (X_TMA) mbarrier_wait(x_bars + 8 * (s % kXStages), (s / kXStages) & 1);  // X(s) landed
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int b = 0; b < kBlocks; ++b)
          wgmma_m64k16<Fmt, kTokens>(acc[b], frag[d & 1][b][kk], sw128_desc(xa + 32 * kk));
      wgmma_commit();
      wgmma_wait<1>();  // stage s - 1's wgmma: its register set and X buffer are free
      if (s + 1 < stages) decode(s + 1, frag[(d + 1) & 1]);
      cp_async_wait<1>();  // this thread's copies of X(s + 1) and the packed weights of s + 2
      if constexpr (!X_TMA) fence_proxy_async();  // (tensor copies write through the async proxy already)
      named_barrier<kThreads>(kStageBarrier);
    }
    if constexpr (kLoopPointer) w_loop += 2 * 1024;
  }
  wgmma_wait<0>();
#pragma unroll
  for (int b = 0; b < kBlocks; ++b) fence_accumulators(acc[b]);
  cp_async_wait<0>();  // no copy may still target shared memory when the CTA exits

  const int first = kTailSplit ? split_from : 0;  // the first split tile
  if (ksplit > 1 && (int)blockIdx.x >= first) {     // nsplit > 1 (worked out again, not kept live)
    const int ctas = gridDim.x - first, split_tile = blockIdx.x - first;
    float* mine = partial + ((i64)blockIdx.y * ctas + split_tile) * (kBlocks * kAccs * kMmaThreads) + tid;
#pragma unroll
    for (int b = 0; b < kBlocks; ++b)
#pragma unroll
      for (int i = 0; i < kAccs; ++i) __stcg(mine + (b * kAccs + i) * kMmaThreads, acc[b][i]);
    __threadfence();  // the partials are visible GPU-wide before this CTA is counted
    named_barrier<kMmaThreads>(kMmaBarrier);
    if (tid == 0) {
      *last_flag = atomicAdd(counters + split_tile, 1u) == (u32)ksplit - 1;
      if (*last_flag) counters[split_tile] = 0;  // every split has counted: reset for the next launch
    }
    named_barrier<kMmaThreads>(kMmaBarrier);
    if (!*last_flag) return;
    __threadfence();  // (acquire) the other splits' partials are read after their count
    // Split by split (this CTA's own partial too, as stored), all accumulators at once: one
    // round trip to L2 a split, not one an accumulator and split.
    const float* tile_part = partial + (i64)split_tile * (kBlocks * kAccs * kMmaThreads) + tid;
#pragma unroll
    for (int b = 0; b < kBlocks; ++b)
#pragma unroll
      for (int i = 0; i < kAccs; ++i) acc[b][i] = 0.0f;
    for (int p = 0; p < ksplit; ++p) {
      const float* part = tile_part + (i64)p * ctas * (kBlocks * kAccs * kMmaThreads);
#pragma unroll
      for (int b = 0; b < kBlocks; ++b)
#pragma unroll
        for (int i = 0; i < kAccs; ++i) acc[b][i] += __ldcg(part + (b * kAccs + i) * kMmaThreads);
    }
  }

  // Epilogue: bias, one rounding.
  // X_TMA builds, where out has a map (store_by_map: N % 8 == 0, out 16-byte aligned): each
  // row block is staged in shared memory as out's box lands there (token r's rows 8u .. + 8 in
  // unit u at sw128_offset(r, u)), four 8x8 blocks an stmatrix, and leaves in one tensor store.
  // The staging reuses X buffers no wgmma reads any more: those after the last stage's (the
  // other warpgroup may still run the last stage's wgmma; the stage barriers say the one before
  // is done). Why: the threads' 2-byte stores, four tokens' 16 bytes a warp instruction, took
  // ~6.4 us of a 256-token CTA's ~112 (H100, run 155 of NOTES_matmul_4bit.md).
  if constexpr (X_TMA) {
    if (store_by_map) {
      const int m = lane >> 3, k = lane & 7;  // lane 8m + k: column k of block m of an stmatrix
#pragma unroll
      for (int b = 0; b < kBlocks; ++b) {
        const int B = block_of(b);
        const u32 box = xs + (u32)((stages + B) % kXStages) * kXBytes;
        float bv[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = n0 + 64 * B + 16 * wq + g + 8 * h;
          bv[h] = has_bias && row < N ? Fmt::to_float(bias[row]) : 0.0f;
        }
        // Block m of tokens 8j .. + 16: rows 16 wq + 8 (m % 2) .. + 8 (unit 2 wq + m % 2) of
        // tokens 8 (j + m / 2) + k, whose row of the box r has r % 8 == k.
        const u32 column = box + 1024 * (m >> 1) + 128 * k + (((2 * wq + (m & 1)) ^ k) << 4);
#pragma unroll
        for (int j = 0; j < kTokens / 8; j += 2) {
          u32 r[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int i = 4 * (j + (q >> 1)) + 2 * (q & 1);
            r[q] = pack2<Fmt>(__fadd_rn(acc[b][i], bv[q & 1]), __fadd_rn(acc[b][i + 1], bv[q & 1]));
          }
          store_matrix_x4_trans(column + 1024 * j, r);
        }
      }
      fence_proxy_async();  // the staged boxes become visible to the tensor store (async proxy)
      if (wg == 0) {  // (ids the compiler sees: a computed one reserves all 16 barriers)
        named_barrier<128>(kStoreBarrier);
      } else {
        named_barrier<128>(kStoreBarrier + 1);
      }
      if (wq == 0 && lane == 0) {
#pragma unroll
        for (int b = 0; b < kBlocks; ++b) {
          const int B = block_of(b);
          tensor_store(&out_map, n0 + 64 * B, tok0, xs + (u32)((stages + B) % kXStages) * kXBytes);
        }
      }
      return;
    }
  }
#pragma unroll
  for (int b = 0; b < kBlocks; ++b)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = n0 + 64 * block_of(b) + 16 * wq + g + 8 * h;
      if (row >= N) continue;
      const float bv = has_bias ? Fmt::to_float(bias[row]) : 0.0f;
#pragma unroll
      for (int j = 0; j < kTokens / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int tok = tok0 + 8 * j + 2 * t + e;
          if (tok < M) out[(i64)tok * N + row] = Fmt::from_float(__fadd_rn(acc[b][4 * j + 2 * h + e], bv));
        }
    }
}
