// Runs 78-80 of NOTES_matmul_4bit.md (not part of the package; kept as the record of what was
// measured): gemm_4bit_cluster, 9..16 (MT = 2) or 1..8 (MT = 1) tokens, K split over the C CTAs
// of a cluster and the PARTS warps of each, each CTA staging its K slice of the activations
// once in shared memory; the partial sums are added across the cluster through distributed
// shared memory in k-part order (with 8 k parts, the bits of gemm_4bit_small's short-share
// build). Needs K % 4096 == 0. Compiled against cupyquant/rawkernels (includes gemm_4bit.cu).
#include "gemm_4bit.cu"

namespace {

constexpr int kClusterWarps = 8;

__device__ __forceinline__ u32 cluster_address(u32 local, u32 rank) {
  u32 r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(local), "r"(rank));
  return r;
}
__device__ __forceinline__ float load_cluster_f32(u32 addr) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// Staged activation unit u (16 bytes) of token row r: bits 0..1 XORed with bit 3 of u and bit 0
// of r, so the 8 lanes of a quarter warp (rows g, g+1; chunks t = 0..3) hit 8 bank groups.
__device__ __forceinline__ int cluster_a_unit(int r, int u) { return u ^ (((u >> 3) & 1) << 1) ^ (r & 1); }

}  // namespace

// C CTAs a cluster split K C ways; inside a CTA, PARTS warps split each CTA's slice, and the
// CTA's 8 / PARTS row groups (16 RT rows each) are its warps / PARTS. k part = rank * PARTS + part;
// BATCH segments of weights in flight a warp.
template <class Fmt, bool NESTED, int MT, bool TILED = false, int C = 8, int RT = 2, int PARTS = 8 / C, int BATCH = 4>
__global__ void __cluster_dims__(C, 1, 1) __launch_bounds__(32 * kClusterWarps)
gemm_4bit_cluster(const u16* __restrict__ A, const u8* __restrict__ packed, const float* __restrict__ table,
                  const float* __restrict__ absmax, const u8* __restrict__ qabsmax, const float* __restrict__ code2,
                  const float* __restrict__ nested_absmax, const float* __restrict__ offset,
                  const u16* __restrict__ bias, u16* __restrict__ out, int M, int N, int K, int block_shift,
                  int has_bias, int ksplit, int token_chunks) {
  constexpr int kBatch = BATCH, kGroups = kClusterWarps / PARTS, kKParts = C * PARTS;
  constexpr int kWeightStep = TILED ? 1024 : kSegment / 2;
  constexpr int kPerWarp = RT * MT * 4;
  __shared__ __align__(16) u32 lut[256 * 32];  // reused for the partial sums at the end
  __shared__ float code2_s[NESTED ? 256 : 1];
  extern __shared__ __align__(16) uint4 a_s[];  // [8 MT tokens][K / 8 / 8 units], cluster_a_unit order
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int rank = blockIdx.x % C, rows = blockIdx.x / C;
  const int pair = warp / PARTS, part = warp % PARTS;
  const int tile0 = (rows * kGroups + pair) * RT;
  const bool warp_valid = tile0 * 16 < N;
  const int kc = K / C;                       // this CTA's K slice
  const int units = kc >> 3;                  // 16-byte units of a token's slice
  const int segments = K / kSegment, share = K / (kKParts * kSegment);  // share % kBatch == 0 (launcher)
  const int seg_begin = (rank * PARTS + part) * share;
  const float off = NESTED ? __ldg(offset) : 0.0f;
  const u32 lut_lane = shared_address(lut) + 4 * lane;

  const u8* wp[RT][2];
  i64 e[RT][2];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
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

  uint4 w[kBatch][RT][2];
  float v[kBatch][RT][2];
  u32 q[kBatch][RT][2];
  auto fetch_batch = [&]() {
#pragma unroll
    for (int d = 0; d < kBatch; ++d)
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          w[d][rt][h] = q4::load_stream16(wp[rt][h] + d * kWeightStep);
          q4::scale_fetch<NESTED>((e[rt][h] + d * kSegment) >> block_shift, absmax, qabsmax, nested_absmax,
                                  v[d][rt][h], q[d][rt][h]);
        }
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        wp[rt][h] += kBatch * kWeightStep;
        e[rt][h] += kBatch * kSegment;
      }
  };

  q4::ByteTableInputs<Fmt, NESTED, 32 * kClusterWarps> inputs;
  inputs.load(table, code2);
  if (warp_valid) fetch_batch();
  {  // this CTA's K slice of the (up to 8 MT) tokens, rows past M repeat row M - 1
    const u32 a0 = shared_address(a_s);
    for (int i = threadIdx.x; i < 8 * MT * units; i += 32 * kClusterWarps) {
      const int r = i / units, u = i - r * units;
      const u16* src = A + (i64)min(r, M - 1) * K + (i64)rank * kc + 8 * u;
      cp_async16(a0 + 16u * (u32)(r * units + cluster_a_unit(r, u)), src, 16u);
    }
    cp_async_commit();
  }
  inputs.fill(lut, code2_s);
  cp_async_wait<0>();
  __syncthreads();

  float acc[RT][MT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[rt][j][i] = 0.0f;

  const u32 a_lane = shared_address(a_s);
  for (int b = 0; warp_valid && b < share; b += kBatch) {
    if (b > 0) fetch_batch();
#pragma unroll
    for (int d = 0; d < kBatch; ++d) {
      u32 hs[RT][2];
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float sc = q4::scale_decode<NESTED>(v[d][rt][h], q[d][rt][h], code2_s, off);
          hs[rt][h] = pack2<Fmt>(sc, sc);
        }
      uint4 x[MT][4];
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        const int r = 8 * j + g;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int u = (part * share + b + d) * 16 + 4 * t + i;
          const u32 addr = a_lane + 16u * (u32)(r * units + cluster_a_unit(r, u));
          asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                       : "=r"(x[j][i].x), "=r"(x[j][i].y), "=r"(x[j][i].z), "=r"(x[j][i].w)
                       : "r"(addr));
        }
      }
      mma_segment<Fmt>(acc, w[d], hs, x, lut_lane);
    }
  }

  // partial sums: red[warp][c][lane] in this CTA's table memory; rank r adds warp r's tiles
  // over the cluster's CTAs in rank order (gemm_4bit_small's kpart order) and stores them
  float* red = reinterpret_cast<float*>(lut);
  __syncthreads();
#pragma unroll
  for (int c = 0; c < kPerWarp; ++c) red[(warp * kPerWarp + c) * 32 + lane] = (&acc[0][0][0])[c];
  cluster_sync();
  for (int item = rank * kClusterWarps + warp; item < kGroups * kPerWarp; item += C * kClusterWarps) {
    const int grp = item / kPerWarp, c = item % kPerWarp;
    const int my_tile0 = (rows * kGroups + grp) * RT;
    if (my_tile0 * 16 >= N) continue;
    float sum = 0.0f;
#pragma unroll
    for (int p = 0; p < kKParts; ++p) {  // k part p: CTA p / PARTS, warp grp * PARTS + p % PARTS
      const u32 local = shared_address(red + ((grp * PARTS + p % PARTS) * kPerWarp + c) * 32 + lane);
      const float v = load_cluster_f32(cluster_address(local, (u32)(p / PARTS)));
      sum = p == 0 ? v : sum + v;
    }
    store_fragment<Fmt>(sum, c / (MT * 4), (c / 4) % MT, c % 4, my_tile0, 0, g, t, M, N, bias, has_bias, out);
  }
  cluster_sync();  // no CTA leaves while another reads its shared memory
}
