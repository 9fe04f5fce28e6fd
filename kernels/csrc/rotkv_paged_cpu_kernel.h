// The fused CPU attention over the RotateKV packed paged cache, written once over the vector type `Vec`
// (rotkv_paged_cpu_vec.h) and compiled once per ISA. Include after defining ROTKV_ISA_NAMESPACE.
//
// One work item = (request, query tokens [tok_lo, tok_hi), rotation block of g KV heads, context split).
// Rows are the (query token, query head) pairs of the item. Per tile of N cached positions (N = lanes):
//
//   1. read the N slots where they are when the block size is a multiple of N (else copy them into a small
//      buffer), prefetching the next tile's slots; scales and zeros of 4 (fp8) or 2 (fp16) groups per gather;
//   2. keys, *lanes over positions*: bring each token's code words in (register transposes of N words of N
//      slots; gathers for 3 bits), unpack, dequantize (q - z) * s / sqrt(gD)
//      and store channel i at its natural index perm[i] (the inverse channel order costs nothing here);
//   3. inverse grouped-head Hadamard kron(H_m, H_p)^T on the N keys at once: log2(p) butterfly stages over
//      whole vectors (no shuffles), then the small +-1 core H_m^T (m = 1 for powers of two);
//   4. per KV head: add the key mean, RoPE at each lane's own position (cos/sin from tile tables cached
//      across calls, one half for [c | c] tables) and the scores of all the head's rows in one pass (a
//      register block of up to 8 rows);
//   5. online softmax per row (base 2: the query is pre-multiplied by scale * log2 e);
//   6. values, *lanes over channels*: unpack N codes (2 and 4 bits: N bytes zero-extended, 8 / bits vectors,
//      accumulators interleaved until the item ends), subtract the zero, and add p_t * s_t times them into
//      each row's accumulator, which stays in the values' rotated basis (the item that completes a row's
//      splits merges them and applies one inverse per-head Hadamard per output row).
//
// Sinks (positions < S, split 0) come from the full-precision area: keys as stored (post-RoPE), values
// rotated forward into the accumulator's basis.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "rotkv_paged_cpu.h"
#include "rotkv_paged_cpu_vec.h"

namespace rotkv_cpu {
namespace ROTKV_ISA_NAMESPACE {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kPrefetchTiles = 2;        // how far ahead a work item prefetches its tiles' slots
constexpr int kRowBlock = 8;             // rows whose scores / accumulators are kept in registers together
constexpr float kMagic = 8388608.0f;  // 2^23: float(2^23 + q) - (2^23 + z) == q - z exactly (Vec::code_float)

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float load_sink(const AttnParams& P, const void* base, int64_t off) {
  switch (P.sink_dtype) {
    case 0: return static_cast<const float*>(base)[off];
    case 1: return half_to_float(static_cast<const uint16_t*>(base)[off]);
    default: return bf16_to_float(static_cast<const uint16_t*>(base)[off]);
  }
}

// D contiguous sink values from element offset `off` as fp32
inline void load_sink_row(const AttnParams& P, int64_t off, float* out) {
  using V = Vec;
  constexpr int N = V::N;
  const int D = P.head_dim;
  switch (P.sink_dtype) {
    case 0: std::memcpy(out, static_cast<const float*>(P.sinks) + off, size_t(D) * 4); break;
    case 1:
      for (int c = 0; c < D; c += N) V::store(out + c, V::load_f16(static_cast<const uint16_t*>(P.sinks) + off + c));
      break;
    default:
      for (int c = 0; c < D; c += N) V::store(out + c, V::load_bf16(static_cast<const uint16_t*>(P.sinks) + off + c));
      break;
  }
}

struct Scratch {
  void* mem = nullptr;
  explicit Scratch(size_t bytes) {
    mem = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (mem == nullptr) throw std::bad_alloc();
  }
  ~Scratch() { std::free(mem); }
};

inline size_t align64(size_t n) { return (n + 63) / 64 * 64; }

// ---- keys: decode a tile into X[rw][N] (natural channel order of the rotation block) --------------------------
template <int BITS, int CPG>
void decode_keys(const AttnParams& P, int rot, const uint8_t* tb, const uint8_t* const* rows, const int32_t* lane_off,
                 const float* ks, const float* kz, float* X) {
  using V = Vec;
  constexpr int N = V::N;
  const int rw = P.key_rot, i_base = rot * rw, units = rw / CPG, per_group = P.key_group / CPG;
  auto unit = [&](int u, typename V::I word) {
    const int i0 = i_base + u * CPG;
    const int gk = u / per_group;
    const typename V::F sv = V::load(ks + gk * N), zv = V::load(kz + gk * N);
#pragma GCC unroll 16
    for (int j = 0; j < CPG; ++j) {
      const typename V::F c = V::code_float(word, j * BITS, (1 << BITS) - 1);
      const int dst = (P.key_perm ? static_cast<int>(P.key_perm[i0 + j]) : i0 + j) - i_base;
      V::store(X + dst * N, V::mul(V::sub(c, zv), sv));
    }
  };
  if constexpr (CPG * BITS == 32) {
    // whole 32-bit words per unit: N units of N tokens come in with one register transpose (a gather per unit
    // is several times slower)
    alignas(64) int32_t words[N * N];
    for (int u0 = 0; u0 < units; u0 += N) {
      const int nw = std::min(N, units - u0);
      V::transpose_words(rows, (i_base + u0 * CPG) * BITS / 8, nw, words);
      for (int uu = 0; uu < nw; ++uu) unit(u0 + uu, V::load_i(words + uu * N));
    }
  } else {
    const typename V::I off = V::load_i(lane_off);
    for (int u = 0; u < units; ++u) unit(u, V::gather32(tb + (i_base + u * CPG) * BITS / 8, off));
  }
}

// One full-precision key/value pair into a row's online softmax (base 2): the sinks and the recent window.
// Vectorized over channels (D is a multiple of 16, so of N): a prefill reaches it R times per query row.
inline void online_softmax_one(const float* q, const float* kk, const float* vv, int D, float& m, float& l,
                               float* a) {
  using V = Vec;
  constexpr int N = V::N;
  typename V::F s0 = V::zero(), s1 = V::zero();
  int c = 0;
  for (; c + 2 * N <= D; c += 2 * N) {
    s0 = V::fmadd(V::load(q + c), V::load(kk + c), s0);
    s1 = V::fmadd(V::load(q + c + N), V::load(kk + c + N), s1);
  }
  for (; c < D; c += N) s0 = V::fmadd(V::load(q + c), V::load(kk + c), s0);
  const float s = V::hsum(V::add(s0, s1));
  const float mn = std::max(m, s);
  const float alpha = std::exp2(m - mn), pj = std::exp2(s - mn);
  l = l * alpha + pj;
  const typename V::F av = V::set1(alpha), pv = V::set1(pj);
  for (c = 0; c < D; c += N) V::store(a + c, V::fmadd(pv, V::load(vv + c), V::mul(V::load(a + c), av)));
  m = mn;
}

// LOGR butterfly stages (strides h, 2h, ..., 2^(LOGR-1) h) on 2^LOGR vectors held in registers
template <int LOGR>
inline void butterfly_pass(float* y, int p, int h) {
  using V = Vec;
  constexpr int N = V::N, R = 1 << LOGR;
  for (int i0 = 0; i0 < p; i0 += R * h)
    for (int i = i0; i < i0 + h; ++i) {
      // fully unrolled (compile-time trip counts) so that r[] lives in registers
      typename V::F r[R];
#pragma GCC unroll 16
      for (int k = 0; k < R; ++k) r[k] = V::load(y + (i + k * h) * N);
#pragma GCC unroll 4
      for (int st = 1; st < R; st *= 2)
#pragma GCC unroll 16
        for (int k = 0; k < R; ++k)
          if ((k & st) == 0) {
            const typename V::F a = r[k], b = r[k + st];
            r[k] = V::add(a, b);
            // a - b as -(b * 1) + a rounds identically; on cores with separate add and FMA pipes this
            // spreads the butterflies over both
            r[k + st] = V::fnmadd1(b, a);
          }
#pragma GCC unroll 16
      for (int k = 0; k < R; ++k) V::store(y + (i + k * h) * N, r[k]);
    }
}

// out[a] = sum_j core[j][a] in[j] (the transposed core: the inverse) for every b of X[m][p][N]: all m outputs
// accumulate at once (independent FMA chains, not one latency-bound chain per output).
template <int M>
inline void core_tile(const float* core, int p, float* X) {
  using V = Vec;
  constexpr int N = V::N;
  for (int b = 0; b < p; ++b) {
    typename V::F acc[M];
#pragma GCC unroll 32
    for (int a = 0; a < M; ++a) acc[a] = V::zero();
    for (int j = 0; j < M; ++j) {
      const typename V::F x = V::load(X + (static_cast<size_t>(j) * p + b) * N);
#pragma GCC unroll 32
      for (int a = 0; a < M; ++a) acc[a] = V::fmadd(V::set1(core[j * M + a]), x, acc[a]);
    }
#pragma GCC unroll 32
    for (int a = 0; a < M; ++a) V::store(X + (static_cast<size_t>(a) * p + b) * N, acc[a]);
  }
}

// The order-12 core rotkv_kernels.hadamard generates (Paley I), row-major [j][a] like the kernel's `core`.
constexpr signed char kCore12[12][12] = {
    {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},         {-1, 1, 1, -1, 1, 1, 1, -1, -1, -1, 1, -1},
    {-1, -1, 1, 1, -1, 1, 1, 1, -1, -1, -1, 1},   {-1, 1, -1, 1, 1, -1, 1, 1, 1, -1, -1, -1},
    {-1, -1, 1, -1, 1, 1, -1, 1, 1, 1, -1, -1},   {-1, -1, -1, 1, -1, 1, 1, -1, 1, 1, 1, -1},
    {-1, -1, -1, -1, 1, -1, 1, 1, -1, 1, 1, 1},   {-1, 1, -1, -1, -1, 1, -1, 1, 1, -1, 1, 1},
    {-1, 1, 1, -1, -1, -1, 1, -1, 1, 1, -1, 1},   {-1, 1, 1, 1, -1, -1, -1, 1, -1, 1, 1, -1},
    {-1, -1, 1, 1, 1, -1, -1, -1, 1, -1, 1, 1},   {-1, 1, -1, 1, 1, 1, -1, -1, -1, 1, -1, 1}};

inline bool is_core12(const float* core) {
  for (int j = 0; j < 12; ++j)
    for (int a = 0; a < 12; ++a)
      if (core[j * 12 + a] != static_cast<float>(kCore12[j][a])) return false;
  return true;
}

// The transposed core kCore12 by quads: for output A the coefficients of inputs 4q .. 4q + 3 are
// g (1, s1, s2, s3) with g = kCore12[4q][A], and x0 + s1 x1 + s2 x2 + s3 x3 = a_{s1} + s2 b_{s2 s3} with
// a_+- = x0 +- x1, b_+- = x2 +- x3: the 8 sums of a quad cost 12 adds, each output 2 more (3 with a sign flip),
// about 60 adds per column where the 12 x 12 products take 144. The sums round in a tree (4 roundings on an
// output's path, not 12 in a row), within the bound the tests derive for an m-term sum.
template <int Q, int A>
constexpr int quad_index() {
  constexpr int g = kCore12[4 * Q][A];
  constexpr int s1 = kCore12[4 * Q + 1][A] * g, s2 = kCore12[4 * Q + 2][A] * g, s3 = kCore12[4 * Q + 3][A] * g;
  return (s1 < 0) * 4 + (s2 < 0) * 2 + (s2 * s3 < 0);
}

inline void quad_sums(const float* X, int p, int b, int q, typename Vec::F* S) {
  using V = Vec;
  constexpr int N = V::N;
  auto ld = [&](int j) { return V::load(X + (static_cast<size_t>(4 * q + j) * p + b) * N); };
  const typename V::F x0 = ld(0), x1 = ld(1), x2 = ld(2), x3 = ld(3);
  const typename V::F ap = V::add(x0, x1), am = V::sub(x0, x1), bp = V::add(x2, x3), bm = V::sub(x2, x3);
  S[0] = V::add(ap, bp);
  S[1] = V::add(ap, bm);
  S[2] = V::sub(ap, bp);
  S[3] = V::sub(ap, bm);
  S[4] = V::add(am, bp);
  S[5] = V::add(am, bm);
  S[6] = V::sub(am, bp);
  S[7] = V::sub(am, bm);
}

template <int A>
inline typename Vec::F core12_out(const typename Vec::F* S0, const typename Vec::F* S1, const typename Vec::F* S2) {
  using V = Vec;
  constexpr int i0 = quad_index<0, A>(), i1 = quad_index<1, A>(), i2 = quad_index<2, A>();
  constexpr int g0 = kCore12[0][A], g1 = kCore12[4][A], g2 = kCore12[8][A];
  if constexpr (g0 > 0) {
    const typename V::F r = g1 > 0 ? V::add(S0[i0], S1[i1]) : V::sub(S0[i0], S1[i1]);
    return g2 > 0 ? V::add(r, S2[i2]) : V::sub(r, S2[i2]);
  } else if constexpr (g1 > 0) {
    const typename V::F r = V::sub(S1[i1], S0[i0]);
    return g2 > 0 ? V::add(r, S2[i2]) : V::sub(r, S2[i2]);
  } else if constexpr (g2 > 0) {
    return V::sub(V::sub(S2[i2], S0[i0]), S1[i1]);
  } else {
    return V::neg(V::add(V::add(S0[i0], S1[i1]), S2[i2]));
  }
}

template <int... A>
inline void core12_store(float* X, int p, int b, const typename Vec::F* S0, const typename Vec::F* S1,
                         const typename Vec::F* S2, std::integer_sequence<int, A...>) {
  using V = Vec;
  constexpr int N = V::N;
  (V::store(X + (static_cast<size_t>(A) * p + b) * N, core12_out<A>(S0, S1, S2)), ...);
}

// core_tile<12> for the core kCore12 (the same sums in another order: no multiplies, a third of the adds)
inline void core_tile12(int p, float* X) {
  for (int b = 0; b < p; ++b) {
    typename Vec::F S0[8], S1[8], S2[8];
    quad_sums(X, p, b, 0, S0);
    quad_sums(X, p, b, 1, S1);
    quad_sums(X, p, b, 2, S2);
    core12_store(X, p, b, S0, S1, S2, std::make_integer_sequence<int, 12>());
  }
}

inline void core_tile_any(const float* core, int m, int p, float* X) {
  using V = Vec;
  constexpr int N = V::N;
  typename V::F acc[64];
  for (int b = 0; b < p; ++b) {
    for (int a = 0; a < m; ++a) acc[a] = V::zero();
    for (int j = 0; j < m; ++j) {
      const typename V::F x = V::load(X + (static_cast<size_t>(j) * p + b) * N);
      for (int a = 0; a < m; ++a) acc[a] = V::fmadd(V::set1(core[j * m + a]), x, acc[a]);
    }
    for (int a = 0; a < m; ++a) V::store(X + (static_cast<size_t>(a) * p + b) * N, acc[a]);
  }
}

// inverse kron(H_m, H_p) over X[rw][N] (unnormalized: 1/sqrt(rw) is folded into the key scales)
// All log2(p) butterfly stages of y [p][N] (p a power of two), a few stages per pass over memory: 4 with 32
// vector registers (AVX-512), 3 otherwise.
inline void butterflies(float* y, int p) {
  constexpr int kMaxLog = Vec::N == 16 ? 4 : 3;
  int logp = 0;
  while ((1 << logp) < p) ++logp;
  int h = 1, left = logp;
  while (left > 0) {
    const int st = std::min(left, kMaxLog);
    switch (st) {
      case 4: butterfly_pass<(kMaxLog >= 4 ? 4 : 1)>(y, p, h); break;
      case 3: butterfly_pass<3>(y, p, h); break;
      case 2: butterfly_pass<2>(y, p, h); break;
      default: butterfly_pass<1>(y, p, h); break;
    }
    h <<= st;
    left -= st;
  }
}

inline void inverse_hadamard_tile(const AttnParams& P, bool core12, float* X) {
  constexpr int N = Vec::N;
  const int m = P.key_m, p = P.key_p;
  for (int a = 0; a < m; ++a) butterflies(X + static_cast<size_t>(a) * p * N, p);
  if (m > 1) {
    switch (m) {  // the orders rotkv_kernels.hadamard generates below 64 get their accumulators in registers
      case 2: core_tile<2>(P.key_core, p, X); break;
      case 12:
        if (core12) core_tile12(p, X);
        else core_tile<12>(P.key_core, p, X);
        break;
      case 20: core_tile<20>(P.key_core, p, X); break;
      case 28: core_tile<28>(P.key_core, p, X); break;
      default: core_tile_any(P.key_core, m, p, X); break;
    }
  }
}

// Normalized Sylvester Hadamard of order p (a power of two, a multiple of N; its own inverse) of one row in place,
// lanes over the row's channels: stages of stride h < N inside each vector (Vec::butterfly_in), the wider ones
// across vectors, one multiply by 1 / sqrt(p). Stage by stage the same fp32 operations as hadamard_scalar with
// m = 1 (x * -1 + y rounds like y - x), so the same bits. The merge's inverse value rotation of every output
// row, the sinks' and the recent window's forward one (value orders D = 64, 128, 256 have no core).
inline void fwht_row(float* x, int p) {
  using V = Vec;
  using F = typename V::F;
  constexpr int N = V::N;
  constexpr int kMaxVecs = 256 / N;  // p <= 256 (head sizes)
  F r[kMaxVecs];
  const int nv = p / N;
  for (int i = 0; i < nv; ++i) r[i] = V::load(x + i * N);
  for (int h = 1; h < N && h < p; h *= 2)
    for (int i = 0; i < nv; ++i) r[i] = V::butterfly_in(r[i], h);
  for (int hv = 1; hv < nv; hv *= 2)
    for (int i0 = 0; i0 < nv; i0 += 2 * hv)
      for (int i = i0; i < i0 + hv; ++i) {
        const F a = r[i], b = r[i + hv];
        r[i] = V::add(a, b);
        r[i + hv] = V::sub(a, b);
      }
  const F cv = V::set1(static_cast<float>(1.0 / std::sqrt(static_cast<double>(p))));
  for (int i = 0; i < nv; ++i) V::store(x + i * N, V::mul(r[i], cv));
}

void fwht_rows_impl(float* x, int64_t n, int64_t stride, int p) {
  if (p > 256 || p % Vec::N != 0) {  // not a head size this kernel serves: the scalar reference
    float tmp[1];
    for (int64_t i = 0; i < n; ++i) hadamard_scalar(x + i * stride, 1, p, nullptr, true, tmp);
    return;
  }
  for (int64_t i = 0; i < n; ++i) fwht_row(x + i * stride, p);
}

// ---- the write: N tokens at a time, lanes over tokens --------------------------------------------------------

// IEEE half bits of f, rounded to nearest even (c10::Half's conversion, fp16_ieee_from_fp32_value)
inline uint16_t float_to_half_bits(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t w;
  std::memcpy(&w, &f, 4);
  const uint32_t shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  const uint32_t bb = (bias >> 1) + 0x07800000u;
  float bf;
  std::memcpy(&bf, &bb, 4);
  base = bf + base;
  uint32_t bits;
  std::memcpy(&bits, &base, 4);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// fp8 e4m3fn bits of f, rounded to nearest even, 0x7F (NaN) from 480 up (c10::Float8_e4m3fn's conversion)
inline uint8_t float_to_fp8_bits(float f) {
  uint32_t fb;
  std::memcpy(&fb, &f, 4);
  const uint32_t sign = fb & 0x80000000u;
  fb ^= sign;
  uint8_t r;
  if (fb >= (1087u << 20)) {
    r = 0x7F;
  } else if (fb < (121u << 23)) {  // below 2^-6: subnormal
    const uint32_t dm = 141u << 23;
    float a, d;
    std::memcpy(&a, &fb, 4);
    std::memcpy(&d, &dm, 4);
    a = a + d;
    uint32_t ab;
    std::memcpy(&ab, &a, 4);
    r = static_cast<uint8_t>(ab - dm);
  } else {
    const uint32_t mant_odd = (fb >> 20) & 1u;
    fb += (static_cast<uint32_t>(7 - 127) << 23) + 0x7FFFFu;
    fb += mant_odd;
    r = static_cast<uint8_t>(fb >> 20);
  }
  return static_cast<uint8_t>(r | (sign >> 24));
}

inline float fp8_bits_to_float(uint8_t b) {
  if ((b & 0x7F) == 0x7F) return std::numeric_limits<float>::quiet_NaN();
  const int e = (b >> 3) & 0xF, m = b & 7;
  const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(1.0f + m / 8.0f, e - 7);
  return (b & 0x80) ? -mag : mag;
}

// forward normalized kron(H_m, H_p) of every E.rot rows of X[width][N] (hadamard_scalar(.., forward) per lane:
// butterflies, core, one multiply by 1 / sqrt(rot); the cores are +-1, so fma(+-1, x, acc) rounds like acc + x)
inline void forward_hadamard_rows(const EncodeParams& E, int width, float* X) {
  using V = Vec;
  constexpr int N = V::N;
  const int m = E.m, p = E.rot / m;
  const typename V::F cv = V::set1(static_cast<float>(1.0 / std::sqrt(static_cast<double>(m * p))));
  for (int b0 = 0; b0 < width; b0 += E.rot) {
    float* Xb = X + static_cast<size_t>(b0) * N;
    for (int a = 0; a < m; ++a) butterflies(Xb + static_cast<size_t>(a) * p * N, p);
    if (m > 1) {
      switch (m) {
        case 2: core_tile<2>(E.core_t, p, Xb); break;
        case 12: core_tile<12>(E.core_t, p, Xb); break;
        case 20: core_tile<20>(E.core_t, p, Xb); break;
        case 28: core_tile<28>(E.core_t, p, Xb); break;
        default: core_tile_any(E.core_t, m, p, Xb); break;
      }
    }
    for (int i = 0; i < E.rot; ++i) V::store(Xb + i * N, V::mul(V::load(Xb + i * N), cv));
  }
}

// X[width][N] (lanes = tokens) -> the records at dst[lane] + E.offset for lanes < n; Q is scratch [width][N]
inline void encode_rows(const EncodeParams& E, int width, bool fp8, float* X, float* Q, uint8_t* const* dst, int n) {
  using V = Vec;
  using F = typename V::F;
  constexpr int N = V::N;
  if (E.rot > 1) forward_hadamard_rows(E, width, X);
  const int maxq = (1 << E.bits) - 1, ng = width / E.group;
  const F vmaxq = V::set1(static_cast<float>(maxq)), vclip = V::set1(E.clip), vzero = V::zero();
  const F veps = V::set1(fp8 ? 0.015625f : 6.103515625e-05f);  // finfo(scale dtype).tiny
  const int scale_bytes = fp8 ? 1 : 2;
  const int codes_bytes = width * E.bits / 8;
  alignas(64) float sc[N], scs[N], zz[N];
  for (int gi = 0; gi < ng; ++gi) {
    auto row = [&](int i) {
      const int c = gi * E.group + i;
      return X + static_cast<size_t>(E.perm ? static_cast<int>(E.perm[c]) : c) * N;
    };
    F mx = V::load(row(0)), mn = mx;
    for (int i = 1; i < E.group; ++i) {
      const F y = V::load(row(i));
      mx = V::max(y, mx);  // std::max(mx, y)
      mn = V::min(y, mn);  // std::min(mn, y)
    }
    const F hi = V::mul(mx, vclip), lo = V::mul(mn, vclip);
    V::store(sc, V::max(veps, V::div(V::sub(hi, lo), vmaxq)));  // std::max(sc, eps)
    for (int l = 0; l < N; ++l) {
      uint8_t* sp = dst[l < n ? l : n - 1] + E.offset + codes_bytes + gi * scale_bytes;
      if (fp8) {
        const uint8_t b = float_to_fp8_bits(sc[l]);
        scs[l] = fp8_bits_to_float(b);
        if (l < n) sp[0] = b;
      } else {
        const uint16_t b = float_to_half_bits(sc[l]);
        scs[l] = half_to_float(b);
        if (l < n) std::memcpy(sp, &b, 2);
      }
    }
    const F vs = V::load(scs);
    const F z = V::min(vmaxq, V::max(vzero, V::round(V::div(V::neg(lo), vs))));
    V::store(zz, z);
    for (int l = 0; l < n; ++l) {
      uint8_t* zp = dst[l] + E.offset + codes_bytes + ng * scale_bytes + gi * scale_bytes;
      if (fp8) {
        zp[0] = static_cast<uint8_t>(zz[l]);
      } else {
        const uint16_t b = float_to_half_bits(zz[l]);
        std::memcpy(zp, &b, 2);
      }
    }
    for (int i = 0; i < E.group; ++i) {
      const F v = V::add(V::round(V::div(V::load(row(i)), vs)), z);
      V::store(Q + static_cast<size_t>(gi * E.group + i) * N, V::min(vmaxq, V::max(vzero, v)));
    }
  }
  alignas(64) int32_t words[N];
  for (int u = 0; u < width / 8; ++u) {
    typename V::I w = V::cvt_i(V::load(Q + static_cast<size_t>(u) * 8 * N));
    for (int j = 1; j < 8; ++j) w = V::or_(w, V::sll(V::cvt_i(V::load(Q + static_cast<size_t>(u * 8 + j) * N)), j * E.bits));
    V::store_i(words, w);
    for (int l = 0; l < n; ++l) {
      uint8_t* cp = dst[l] + E.offset + u * E.bits;
      const uint32_t word = static_cast<uint32_t>(words[l]);
      for (int bb = 0; bb < E.bits; ++bb) cp[bb] = static_cast<uint8_t>(word >> (8 * bb));
    }
  }
}

void write_tokens_impl(const WriteParams& P, const int64_t* toks, int n) {
  using V = Vec;
  using F = typename V::F;
  constexpr int N = V::N;
  const int H = P.H, D = P.D, W = H * D, half = D / 2;
  thread_local std::vector<float> buf;
  const size_t need = static_cast<size_t>(W) * N * 3 + static_cast<size_t>(D) * N * 2;
  if (buf.size() < need) buf.resize(need);
  float* K = buf.data();              // [W][N] the step's keys / values, lanes = tokens
  float* X = K + size_t(W) * N;       // [W][N] what gets encoded
  float* Q = X + size_t(W) * N;       // [W][N] codes
  float* CT = Q + size_t(W) * N;      // [D][N] cos / sin at each lane's position
  float* ST = CT + size_t(D) * N;
  const float* rows[N];
  uint8_t* dst[N];
  for (int l = 0; l < N; ++l) {
    const int64_t t = toks[l < n ? l : n - 1];  // lanes past n repeat the last token (never stored)
    const int64_t slot = P.slots[t];
    dst[l] = P.records + (slot / P.block_size) * P.page_stride + (slot % P.block_size) * P.slot_bytes;
    rows[l] = P.key + t * W;
  }
  for (int c0 = 0; c0 < W; c0 += N) V::transpose(rows, c0, K + static_cast<size_t>(c0) * N);
  if (P.rope_cos) {
    const float* crow[N];
    const float* srow[N];
    for (int l = 0; l < N; ++l) {
      const int64_t pos = P.positions[toks[l < n ? l : n - 1]];
      crow[l] = P.rope_cos + pos * P.rope_stride;
      srow[l] = P.rope_sin + pos * P.rope_stride;
    }
    for (int c0 = 0; c0 < D; c0 += N) {
      V::transpose(crow, c0, CT + static_cast<size_t>(c0) * N);
      V::transpose(srow, c0, ST + static_cast<size_t>(c0) * N);
    }
    // (k c - rotate_half(k) s) / (c^2 + s^2), each operation rounded to fp32 like the reference
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < D; ++i) {
        const float* kh = K + static_cast<size_t>(h) * D * N;
        const F kv = V::load(kh + i * N);
        const F rh = i < half ? V::neg(V::load(kh + (i + half) * N)) : V::load(kh + (i - half) * N);
        const F c = V::load(CT + i * N), s = V::load(ST + i * N);
        const F num = V::sub(V::mul(kv, c), V::mul(rh, s));
        const F den = V::add(V::mul(c, c), V::mul(s, s));
        V::store(X + static_cast<size_t>(h * D + i) * N, V::div(num, den));
      }
  } else {
    std::memcpy(X, K, sizeof(float) * W * N);
  }
  if (P.key_mean)
    for (int i = 0; i < W; ++i)
      V::store(X + static_cast<size_t>(i) * N, V::sub(V::load(X + static_cast<size_t>(i) * N), V::set1(P.key_mean[i])));
  encode_rows(P.key_enc, W, P.fp8, X, Q, dst, n);
  for (int l = 0; l < N; ++l) rows[l] = P.value + toks[l < n ? l : n - 1] * W;
  for (int c0 = 0; c0 < W; c0 += N) V::transpose(rows, c0, X + static_cast<size_t>(c0) * N);
  encode_rows(P.value_enc, W, P.fp8, X, Q, dst, n);
}

// Scores of NB rows of one KV head against the tile: mean, RoPE, dot, mask.
template <int NB>
void score_rows(const AttnParams& P, int h, const float* Xh, const float* CT, const float* ST,
                const float* const* q, const int* rows, const float* lim, const float* nfirst, const float* posf,
                const float* nposf, float* S) {
  using V = Vec;
  constexpr int N = V::N;
  const int D = P.head_dim, half = D / 2;
  const float* mean = P.key_mean ? P.key_mean + static_cast<int64_t>(h) * D : nullptr;
  // two accumulators per row (channel halves): twice the independent FMA chains
  typename V::F acc[NB], acc2[NB];
  for (int k = 0; k < NB; ++k) acc[k] = acc2[k] = V::zero();
  for (int c = 0; c < half; ++c) {
    typename V::F x1 = V::load(Xh + c * N), x2 = V::load(Xh + (c + half) * N);
    if (mean) {
      x1 = V::add(x1, V::set1(mean[c]));
      x2 = V::add(x2, V::set1(mean[c + half]));
    }
    typename V::F r1 = x1, r2 = x2;
    if (CT) {
      const typename V::F c1 = V::load(CT + c * N), s1 = V::load(ST + c * N);
      const int c_hi = (P.rope_t && P.rope_width != D) ? c : c + half;  // [c | c] tables keep one half
      const typename V::F c2 = V::load(CT + c_hi * N), s2 = V::load(ST + c_hi * N);
      r1 = V::sub(V::mul(x1, c1), V::mul(x2, s1));
      r2 = V::fmadd(x1, s2, V::mul(x2, c2));
    }
    for (int k = 0; k < NB; ++k) {
      acc[k] = V::fmadd(V::set1(q[k][c]), r1, acc[k]);
      acc2[k] = V::fmadd(V::set1(q[k][c + half]), r2, acc2[k]);
    }
  }
  const typename V::F pv = V::load(posf);
  if (nfirst) {
    // sliding window: also -pos <= -first, i.e. pos >= the row's first key
    const typename V::F npv = V::load(nposf);
    for (int k = 0; k < NB; ++k)
      V::store(S + rows[k] * N, V::mask_gt(npv, V::set1(nfirst[rows[k]]),
                                           V::mask_gt(pv, V::set1(lim[rows[k]]), V::add(acc[k], acc2[k]))));
    return;
  }
  for (int k = 0; k < NB; ++k)
    V::store(S + rows[k] * N, V::mask_gt(pv, V::set1(lim[rows[k]]), V::add(acc[k], acc2[k])));
}

// acc[k][c0 .. c0 + N) += sum_t ps[k][t] * (codes_t - z_t) for NB rows (one value group for the chunk);
// zt holds 2^23 + z (kMagic)
template <int BITS, int NB>
void accumulate_values(const uint8_t* vbase, int stride, int chan, int t0, int t1, const float* zt, const float* ps,
                       float* const* acc) {
  using V = Vec;
  constexpr int N = V::N;
  typename V::F a[NB];
  for (int k = 0; k < NB; ++k) a[k] = V::load(acc[k]);
  for (int t = t0; t < t1; ++t) {
    const typename V::F f =
        V::sub(V::cvt(Vec::template unpack<BITS>(vbase + t * stride, chan)), V::set1(zt[t] - kMagic));
    for (int k = 0; k < NB; ++k) a[k] = V::fmadd(V::set1(ps[k * N + t]), f, a[k]);
  }
  for (int k = 0; k < NB; ++k) V::store(acc[k], a[k]);
}

// Interleaved block of N * 8 / BITS channels (BITS 2 or 4) starting at channel `chan`: N code bytes are
// zero-extended once; vector kk holds code kk of each byte.
template <int BITS, int NB>
void accumulate_values_il(const uint8_t* vbase, int stride, int chan, int t0, int t1, const float* zt,
                          const float* ps, float* const* acc) {
  using V = Vec;
  constexpr int N = V::N, PER = 8 / BITS;
  typename V::F a[NB][PER];
  for (int k = 0; k < NB; ++k)
    for (int kk = 0; kk < PER; ++kk) a[k][kk] = V::load(acc[k] + kk * N);
  for (int t = t0; t < t1; ++t) {
    const typename V::I x = V::bytes(vbase + t * stride + chan * BITS / 8);
    const typename V::F zv = V::set1(zt[t]);
#pragma GCC unroll 4
    for (int kk = 0; kk < PER; ++kk) {
      const typename V::F f = V::sub(V::code_float(x, kk * BITS, (1 << BITS) - 1), zv);
      for (int k = 0; k < NB; ++k) a[k][kk] = V::fmadd(V::set1(ps[k * N + t]), f, a[k][kk]);
    }
  }
  for (int k = 0; k < NB; ++k)
    for (int kk = 0; kk < PER; ++kk) V::store(acc[k] + kk * N, a[k][kk]);
}

template <int NB, class Fn>
void dispatch_rows(int n, Fn&& fn) {
  static_assert(NB == kRowBlock, "row blocks of 8");
  switch (n) {
    case 1: fn(std::integral_constant<int, 1>()); break;
    case 2: fn(std::integral_constant<int, 2>()); break;
    case 3: fn(std::integral_constant<int, 3>()); break;
    case 4: fn(std::integral_constant<int, 4>()); break;
    case 5: fn(std::integral_constant<int, 5>()); break;
    case 6: fn(std::integral_constant<int, 6>()); break;
    case 7: fn(std::integral_constant<int, 7>()); break;
    default: fn(std::integral_constant<int, 8>()); break;
  }
}

template <int KB, int CPG, int VB>
void attend_item_t(const AttnParams& P, const WorkItem& w) {
  using V = Vec;
  constexpr int N = V::N;
  const int H = P.num_kv_heads, D = P.head_dim, Hq = P.num_q_heads, qpk = Hq / H;
  const int rw = P.key_rot, g = rw / D, W = H * D, S = P.sinks ? P.sink_tokens : 0;
  const int r = w.req, nt = w.tok_hi - w.tok_lo, per_tok = g * qpk, R = nt * per_tok;
  const int64_t L = P.seq_lens[r], q0 = P.query_start_loc[r];
  const int64_t first_pos = L - (P.query_start_loc[r + 1] - q0);
  const int64_t ctx_end = first_pos + (w.tok_hi - q0);
  // sliding window: the item's context starts at its first query's window (earlier blocks may be null blocks)
  const int64_t ctx_start =
      P.sliding_window ? std::max<int64_t>(0, first_pos + (w.tok_lo - q0) - P.sliding_window + 1) : 0;
  const int64_t lo = ctx_start + static_cast<int64_t>(w.split) * P.split_size;
  const int64_t hi = std::min(lo + P.split_size, ctx_end);
  const int row_bytes = (P.key_bytes + P.value_bytes + 8 + 7) / 8 * 8;
  const int kg0 = (w.rot * rw) / P.key_group, n_kg = rw / P.key_group;
  const int vg0 = (w.rot * rw) / P.value_group, vg1 = (w.rot * rw + rw - 1) / P.value_group, n_vg = vg1 - vg0 + 1;

  // scratch: rows (m, l, lim, acc, q pointers), tile (records, key scales, X, cos/sin, scores, p)
  size_t off = 0;
  auto take = [&](size_t bytes) { const size_t o = off; off += align64(bytes); return o; };
  const size_t o_m = take(R * 4), o_l = take(R * 4), o_lv = take(size_t(R) * N * 4), o_lim = take(R * 4),
               o_nfirst = take(R * 4), o_acc = take(size_t(R) * D * 4);
  const size_t o_tb = take(size_t(N) * row_bytes), o_ks = take(size_t(n_kg) * N * 4),
               o_kz = take(size_t(n_kg) * N * 4), o_vs = take(size_t(n_vg) * N * 4),
               o_vz = take(size_t(n_vg) * N * 4), o_x = take(size_t(rw) * N * 4),
               o_ct = take(size_t(D) * N * 4), o_st = take(size_t(D) * N * 4), o_s = take(size_t(R) * N * 4),
               o_ps = take(size_t(kRowBlock) * N * 4), o_tmp = take(size_t(2 * D + 64) * 4),
               o_rows = take(size_t(R) * 4),
               o_zero = take(size_t(D) * 4);
  // one scratch buffer per thread, kept between calls: a fresh large allocation is a fresh mmap, and its
  // page faults cost more than a short item's work
  thread_local std::unique_ptr<Scratch> scratch;
  thread_local size_t scratch_bytes = 0;
  if (scratch_bytes < off) {
    scratch = std::make_unique<Scratch>(off);
    scratch_bytes = off;
  }
  char* base = static_cast<char*>(scratch->mem);
  float* m = reinterpret_cast<float*>(base + o_m);
  float* l = reinterpret_cast<float*>(base + o_l);
  float* lv = reinterpret_cast<float*>(base + o_lv);  // per-lane sums of the tiles' p
  float* lim = reinterpret_cast<float*>(base + o_lim);
  // -(first key of the row's sliding window), or null without a window
  float* nfirst = P.sliding_window ? reinterpret_cast<float*>(base + o_nfirst) : nullptr;
  float* acc = reinterpret_cast<float*>(base + o_acc);
  uint8_t* tb = reinterpret_cast<uint8_t*>(base + o_tb);
  float* ks = reinterpret_cast<float*>(base + o_ks);
  float* kz = reinterpret_cast<float*>(base + o_kz);
  float* vs = reinterpret_cast<float*>(base + o_vs);
  float* vz = reinterpret_cast<float*>(base + o_vz);
  float* X = reinterpret_cast<float*>(base + o_x);
  float* CT = reinterpret_cast<float*>(base + o_ct);
  float* ST = reinterpret_cast<float*>(base + o_st);
  float* Sc = reinterpret_cast<float*>(base + o_s);
  float* ps = reinterpret_cast<float*>(base + o_ps);
  float* tmp = reinterpret_cast<float*>(base + o_tmp);
  float* zero_row = reinterpret_cast<float*>(base + o_zero);  // RoPE row of invalid lanes
  // rows of each KV head hl of the block, all query tokens of the item: hrows[hl * nt * qpk + ti * qpk + j].
  // Steps 4 and 6 take them kRowBlock at a time across tokens, so a prefill item reuses a tile's RoPE'd keys and
  // unpacked values for 8 rows, not only the qpk rows of one token (3 for SmolLM2)
  int* hrows = reinterpret_cast<int*>(base + o_rows);
  const int per_h = nt * qpk;
  for (int hl = 0; hl < g; ++hl)
    for (int ti = 0; ti < nt; ++ti)
      for (int j = 0; j < qpk; ++j) hrows[hl * per_h + ti * qpk + j] = ti * per_tok + hl * qpk + j;
  std::memset(zero_row, 0, size_t(D) * 4);

  // row k = ti * per_tok + hl * qpk + j: query token tok_lo + ti, query head (rot * g + hl) * qpk + j
  auto q_row = [&](int k) {
    const int ti = k / per_tok, rem = k % per_tok;
    return P.query + (static_cast<int64_t>(w.tok_lo + ti) * Hq + w.rot * per_tok + rem) * D;
  };
  for (int k = 0; k < R; ++k) {
    m[k] = kNegInf;
    l[k] = 0.0f;
    const int64_t qpos = first_pos + (w.tok_lo + k / per_tok - q0);
    // the recent window's positions come from window_kv (below), not from the records or the sinks
    lim[k] = static_cast<float>(std::min(qpos - P.window, hi - 1));
    if (nfirst) nfirst[k] = -static_cast<float>(qpos - P.sliding_window + 1);
  }
  std::memset(acc, 0, size_t(R) * D * 4);
  std::memset(lv, 0, size_t(R) * N * 4);

  // Prefetch a tile's slots (one contiguous run) kPrefetchTiles tiles ahead: its first reads are gathers, which
  // would otherwise wait on memory one cache line at a time, and between two steps the pages of a layer leave
  // the caches (the model's weights stream through them). Pages follow each other in block-table order, not in
  // memory, so the hardware's stream prefetch stops at every page boundary. The item's first tiles are fetched
  // before the sinks and the recent window, which then hide their latency.
  const bool direct = P.block_size % N == 0;
  auto prefetch_tile = [&](int64_t pn) {
    if (!direct || pn >= hi) return;
    const int64_t bn = P.block_table[static_cast<int64_t>(r) * P.bt_stride + pn / P.block_size];
    const uint8_t* nb = P.records + bn * P.page_stride + (pn % P.block_size) * P.slot_bytes;
    const int64_t span = static_cast<int64_t>(N) * P.slot_bytes;
    for (int64_t o = 0; o < span; o += 64) __builtin_prefetch(nb + o);
  };
  {
    const int64_t first = std::max<int64_t>(lo, S) / N * N;
    for (int i = 0; i < kPrefetchTiles; ++i) prefetch_tile(first + static_cast<int64_t>(i) * N);
  }

  if (lo < hi && w.split == 0 && S > lo) {
    // sinks: full-precision K (post-RoPE) and V (rotated forward into the accumulators' basis); only those
    // inside the item's context (a sliding window may have left them, and their block with them)
    const int64_t blk = P.block_table[static_cast<int64_t>(r) * P.bt_stride];
    const int64_t ns = std::min<int64_t>(S, hi);
    for (int64_t j = lo; j < ns; ++j) {
      for (int hl = 0; hl < g; ++hl) {
        const int h = w.rot * g + hl;
        float* kk = tmp;
        float* vv = tmp + D;
        const int64_t b0 = blk * P.sink_stride[0] + j * P.sink_stride[1] + h * P.sink_stride[3];
        if (P.sink_stride[4] == 1) {
          load_sink_row(P, b0, kk);
          load_sink_row(P, b0 + P.sink_stride[2], vv);
        } else {
          for (int c = 0; c < D; ++c) {
            kk[c] = load_sink(P, P.sinks, b0 + c * P.sink_stride[4]);
            vv[c] = load_sink(P, P.sinks, b0 + P.sink_stride[2] + c * P.sink_stride[4]);
          }
        }
        if (P.value_rot && P.value_m == 1) fwht_row(vv, D);
        else if (P.value_rot) hadamard_scalar(vv, P.value_m, P.value_p, P.value_core, true, tmp + 2 * D);
        for (int ti = 0; ti < nt; ++ti)
          for (int jj = 0; jj < qpk; ++jj) {
            const int k = ti * per_tok + hl * qpk + jj;
            if (static_cast<float>(j) > lim[k] || (nfirst && -static_cast<float>(j) > nfirst[k])) continue;
            online_softmax_one(q_row(k), kk, vv, D, m[k], l[k], acc + static_cast<size_t>(k) * D);
          }
      }
    }
  }

  if (w.split == 0 && P.window > 0) {
    // recent window: full-precision K (post-RoPE) and V (already in the accumulators' basis) of each query's
    // last `window` positions, like the sinks: the step's own rows, or the ring entries before the step
    const int64_t hoff = static_cast<int64_t>(w.rot * g) * D;
    for (int k = 0; k < R; ++k) {
      const int ti = k / per_tok, hl = (k % per_tok) / qpk;
      const int64_t tok = w.tok_lo + ti, qpos = first_pos + (tok - q0);
      const float* q = q_row(k);
      for (int i = 0; i < P.window; ++i) {
        const int64_t j = qpos - P.window + 1 + i;
        if (j < 0) continue;
        const float *kk, *vv;
        if (j >= first_pos) {
          const int64_t row = (q0 + j - first_pos) * W + hoff + static_cast<int64_t>(hl) * D;
          kk = P.win_step_k + row;
          vv = P.win_step_v + row;
        } else {
          kk = P.win_prev + ((static_cast<int64_t>(r) * (P.window - 1) + (j - first_pos + P.window - 1)) * 2 * W) +
               hoff + static_cast<int64_t>(hl) * D;
          vv = kk + W;
        }
        online_softmax_one(q, kk, vv, D, m[k], l[k], acc + static_cast<size_t>(k) * D);
      }
    }
  }

  alignas(64) int32_t lane_off[N];
  alignas(64) float posf[N];
  alignas(64) float nposf[N];
  alignas(64) float okf[N];
  const float c_rot = static_cast<float>(1.0 / std::sqrt(static_cast<double>(rw)));
  const bool core12 = P.key_m == 12 && is_core12(P.key_core);
  const uint8_t* trow[N];
  const float* crow[N];
  const float* srow[N];
  // Pages hold whole tiles when the block size is a multiple of N (tiles start at multiples of N): the
  // kernel then reads the slots where they are; otherwise it copies each tile's records first.
  const int stride = direct ? static_cast<int>(P.slot_bytes) : row_bytes;
  for (int i = 0; i < N; ++i) lane_off[i] = i * stride;
  // Values with lanes over channels: for 2 and 4 bits, N whole bytes are zero-extended at once and each of
  // the 8 / bits codes per byte gives one vector, so a block of N * 8 / bits channels is held interleaved
  // (vector k, lane j = channel j * 8 / bits + k) until the item ends.
  constexpr int v_per = VB == 3 ? 1 : 8 / VB;
  constexpr int v_block = N * v_per;
  const bool interleaved = VB != 3 && D % v_block == 0 && P.value_group % v_block == 0;
  auto permute_rows = [&](bool to_interleaved) {
    for (int k = 0; k < R; ++k) {
      float* a = acc + static_cast<size_t>(k) * D;
      std::memcpy(tmp, a, size_t(D) * 4);
      for (int b0 = 0; b0 < D; b0 += v_block)
        for (int kk = 0; kk < v_per; ++kk)
          for (int j = 0; j < N; ++j) {
            const int nat = b0 + j * v_per + kk, il = b0 + kk * N + j;
            if (to_interleaved) a[il] = tmp[nat]; else a[nat] = tmp[il];
          }
    }
  };
  if (interleaved) permute_rows(true);

  const int64_t p_start = std::max<int64_t>(lo, S);
  for (int64_t p0 = p_start / N * N; p0 < hi; p0 += N) {
    const int lane_lo = static_cast<int>(std::max<int64_t>(0, p_start - p0));
    const int nv = static_cast<int>(std::min<int64_t>(N, hi - p0));
    const uint8_t* tbase;
    if (direct) {
      const int64_t blk = P.block_table[static_cast<int64_t>(r) * P.bt_stride + p0 / P.block_size];
      tbase = P.records + blk * P.page_stride + (p0 % P.block_size) * P.slot_bytes;
      for (int i = 0; i < N; ++i) trow[i] = tbase + i * stride;
      prefetch_tile(p0 + kPrefetchTiles * N);
    } else {
      for (int i = 0; i < N; ++i) {
        uint8_t* dst = tb + i * row_bytes;
        if (i >= lane_lo && i < nv) {
          const int64_t pos = p0 + i;
          const int64_t blk = P.block_table[static_cast<int64_t>(r) * P.bt_stride + pos / P.block_size];
          const uint8_t* src = P.records + blk * P.page_stride + (pos % P.block_size) * P.slot_bytes;
          std::memcpy(dst, src, P.key_bytes + P.value_bytes);
          std::memset(dst + P.key_bytes + P.value_bytes, 0, row_bytes - P.key_bytes - P.value_bytes);
        } else {
          std::memset(dst, 0, row_bytes);
        }
        trow[i] = dst;
      }
      tbase = tb;
    }
    for (int i = 0; i < N; ++i) {
      const bool ok = i >= lane_lo && i < nv;
      posf[i] = ok ? static_cast<float>(p0 + i) : std::numeric_limits<float>::max();
      nposf[i] = -posf[i];
      okf[i] = ok ? 1.0f : 0.0f;
    }
    // scales and zeros, gathered across the tile's slots; lanes outside [lane_lo, nv) decode to exact
    // zeros whatever their bytes hold
    {
      const typename V::I offs = V::load_i(lane_off);
      const typename V::F okv = V::load(okf);
      // One 32-bit gather brings 4 fp8 (or 2 fp16) consecutive groups of every lane. The word read for a
      // chunk of nk groups is the one *ending* at its last group, so no read leaves the record (the codes
      // precede the scales and the scales precede the zeros).
      const int esz = P.scale_fp8 ? 1 : 2, per = 4 / esz;
      auto decode = [&](const uint8_t* sbase, int ng, int g0, int count, float mult, float* so, float* zo) {
        for (int gi = 0; gi < count; gi += per) {
          const int nk = std::min(per, count - gi);
          const int at = (g0 + gi + nk - per) * esz;
          const typename V::I ws = V::gather32(sbase + at, offs);
          const typename V::I wz = V::gather32(sbase + ng * esz + at, offs);
          for (int k = 0; k < nk; ++k) {
            const int shift = 8 * esz * (per - nk + k);
            typename V::F sc, z;
            if (P.scale_fp8) {
              sc = V::fp8_to_float(V::srli(ws, shift));
              z = V::cvt(V::and_(V::srli(wz, shift), 0xFF));
            } else {
              sc = V::f16_to_float(V::srli(ws, shift));
              z = V::f16_to_float(V::srli(wz, shift));
            }
            V::store(so + (gi + k) * N, V::select(okv, V::mul(sc, V::set1(mult))));
            V::store(zo + (gi + k) * N, V::add(V::select(okv, z), V::set1(kMagic)));
          }
        }
      };
      decode(tbase + W * P.key_bits / 8, W / P.key_group, kg0, n_kg, c_rot, ks, kz);
      decode(tbase + P.key_bytes + W * P.value_bits / 8, W / P.value_group, vg0, n_vg, 1.0f, vs, vz);
    }
    // 2-3. keys of the rotation block, natural order, inverse Hadamard
    decode_keys<KB, CPG>(P, w.rot, tbase, trow, lane_off, ks, kz, X);
    inverse_hadamard_tile(P, core12, X);
    // RoPE tables of the tile, transposed to [D][N]
    const float* CTp = nullptr;
    const float* STp = nullptr;
    if (P.rope_t) {
      CTp = P.rope_t + (p0 / N) * 2 * P.rope_width * N;
      STp = CTp + P.rope_width * N;
      // the next tile's cos / sin (2 * rope_width * N floats, read once per item): a context's tables are
      // larger than L2, and without this the scores wait on them
      if (p0 + N < hi) {
        const char* nt = reinterpret_cast<const char*>(CTp + 2 * P.rope_width * N);
        for (int o = 0; o < 2 * P.rope_width * N * 4; o += 64) __builtin_prefetch(nt + o);
      }
    } else if (P.rope_cos) {
      for (int i = 0; i < N; ++i) {
        const bool ok = i >= lane_lo && i < nv;
        crow[i] = ok ? P.rope_cos + (p0 + i) * P.rope_stride : zero_row;
        srow[i] = ok ? P.rope_sin + (p0 + i) * P.rope_stride : zero_row;
      }
      for (int c0 = 0; c0 < D; c0 += N) {
        V::transpose(crow, c0, CT + c0 * N);
        V::transpose(srow, c0, ST + c0 * N);
      }
      CTp = CT;
      STp = ST;
    }
    // 4. scores
    for (int hl = 0; hl < g; ++hl) {
      const int h = w.rot * g + hl;
      const float* Xh = X + static_cast<size_t>(hl) * D * N;
      for (int b0 = 0; b0 < per_h; b0 += kRowBlock) {
        const int nb = std::min(kRowBlock, per_h - b0);
        const int* rows = hrows + hl * per_h + b0;
        const float* qs[kRowBlock];
        for (int k = 0; k < nb; ++k) qs[k] = q_row(rows[k]);
        dispatch_rows<kRowBlock>(nb, [&](auto nbc) {
          score_rows<decltype(nbc)::value>(P, h, Xh, CTp, STp, qs, rows, lim, nfirst, posf, nposf, Sc);
        });
      }
    }
    // 5. online softmax per row; Sc becomes p. The running max moves only when a lane exceeds it (a compare,
    // not a horizontal max, on most tiles), and the tile's p joins the row's per-lane sums lv (one add, not a
    // horizontal sum: lv is summed once, after the last tile)
    for (int k = 0; k < R; ++k) {
      float* sk = Sc + static_cast<size_t>(k) * N;
      const typename V::F sv = V::load(sk);
      if (V::any_gt(sv, m[k])) {
        const float mn = V::hmax(sv);  // > m[k]
        const float alpha = std::exp2(m[k] - mn);  // 0 while m[k] is -inf
        m[k] = mn;
        if (alpha != 1.0f) {
          l[k] *= alpha;
          float* lk = lv + static_cast<size_t>(k) * N;
          const typename V::F av = V::set1(alpha);
          V::store(lk, V::mul(V::load(lk), av));
          float* a = acc + static_cast<size_t>(k) * D;
          for (int c = 0; c < D; c += N) V::store(a + c, V::mul(V::load(a + c), av));
        }
      }
      if (m[k] == kNegInf) {  // nothing unmasked yet: every lane is -inf
        V::store(sk, V::zero());
        continue;
      }
      const typename V::F pv = V::exp2(V::sub(sv, V::set1(m[k])));
      V::store(sk, pv);
      float* lk = lv + static_cast<size_t>(k) * N;
      V::store(lk, V::add(V::load(lk), pv));
    }
    // 6. values, in their rotated basis
    const uint8_t* vbase = tbase + P.key_bytes;
    for (int hl = 0; hl < g; ++hl) {
      const int h = w.rot * g + hl;
      for (int b0 = 0; b0 < per_h; b0 += kRowBlock) {
          const int nb = std::min(kRowBlock, per_h - b0);
          const int* rows = hrows + hl * per_h + b0;
          int cur_g = -1;
          const int step = interleaved ? v_block : N;
          for (int c0 = 0; c0 < D; c0 += step) {
            const int chan = h * D + c0;
            const int ga = chan / P.value_group, gb = (chan + step - 1) / P.value_group;
            float* accp[kRowBlock];
            for (int k = 0; k < nb; ++k) accp[k] = acc + static_cast<size_t>(rows[k]) * D + c0;
            if (ga == gb) {
              if (ga != cur_g) {
                const typename V::F sv = V::load(vs + (ga - vg0) * N);
                for (int k = 0; k < nb; ++k)
                  V::store(ps + k * N, V::mul(V::load(Sc + static_cast<size_t>(rows[k]) * N), sv));
                cur_g = ga;
              }
              const float* zt = vz + (ga - vg0) * N;
              dispatch_rows<kRowBlock>(nb, [&](auto nbc) {
                if (interleaved)
                  accumulate_values_il<VB, decltype(nbc)::value>(vbase, stride, chan, lane_lo, nv, zt, ps, accp);
                else
                  accumulate_values<VB, decltype(nbc)::value>(vbase, stride, chan, lane_lo, nv, zt, ps, accp);
              });
            } else {
              // a chunk straddling two value groups (group sizes not a multiple of N): per-lane scale and zero
              cur_g = -1;
              for (int t = lane_lo; t < nv; ++t) {
                alignas(64) float sl[N], zl[N];
                for (int i = 0; i < N; ++i) {
                  const int gi = (chan + i) / P.value_group - vg0;
                  sl[i] = vs[gi * N + t];
                  zl[i] = vz[gi * N + t] - kMagic;
                }
                const typename V::F f = V::sub(
                    V::cvt(Vec::template unpack<VB>(vbase + t * stride, chan)), V::load(zl));
                const typename V::F sf = V::mul(f, V::load(sl));
                for (int k = 0; k < nb; ++k)
                  V::store(accp[k], V::fmadd(V::set1(Sc[static_cast<size_t>(rows[k]) * N + t]), sf, V::load(accp[k])));
              }
            }
          }
        }
    }
  }
  if (interleaved) permute_rows(false);

  // partial results of this split
  for (int k = 0; k < R; ++k) l[k] += V::hsum(V::load(lv + static_cast<size_t>(k) * N));
  for (int k = 0; k < R; ++k) {
    const int ti = k / per_tok, hq = w.rot * per_tok + k % per_tok;
    const int64_t idx = (static_cast<int64_t>(w.tok_lo + ti) * Hq + hq) * P.num_splits + w.split;
    P.part_m[idx] = m[k];
    P.part_l[idx] = l[k];
    std::memcpy(P.part_acc + idx * D, acc + static_cast<size_t>(k) * D, size_t(D) * 4);
  }
}

}  // namespace

int lanes() { return Vec::N; }

void fwht_rows(float* x, int64_t n, int64_t stride, int p) { fwht_rows_impl(x, n, stride, p); }

void write_tokens(const WriteParams& p, const int64_t* toks, int n) { write_tokens_impl(p, toks, n); }

void transpose_rope(const AttnParams& P, int64_t tile_lo, int64_t tile_hi, int64_t n_pos, float* out) {
  constexpr int N = Vec::N;
  const int D = P.head_dim;
  Scratch zeros(size_t(D) * 4);
  float* z = static_cast<float*>(zeros.mem);
  std::memset(z, 0, size_t(D) * 4);
  const float* crow[N];
  const float* srow[N];
  for (int64_t t = tile_lo; t < tile_hi; ++t) {
    for (int i = 0; i < N; ++i) {
      const int64_t pos = t * N + i;
      crow[i] = pos < n_pos ? P.rope_cos + pos * P.rope_stride : z;
      srow[i] = pos < n_pos ? P.rope_sin + pos * P.rope_stride : z;
    }
    const int width = P.rope_width;
    float* ct = out + t * 2 * width * N;
    for (int c0 = 0; c0 < width; c0 += N) {
      Vec::transpose(crow, c0, ct + c0 * N);
      Vec::transpose(srow, c0, ct + width * N + c0 * N);
    }
  }
}

void attend_item(const AttnParams& P, const WorkItem& w) {
  // Key codes are gathered 16 at a time from one 32-bit word at 2 bits (when groups allow), 8 otherwise.
  const bool wide2 = P.key_group % 16 == 0 && P.key_rot % 16 == 0;
#define ROTKV_VB(KB_, CPG_)                                                 \
  switch (P.value_bits) {                                                   \
    case 2: return attend_item_t<KB_, CPG_, 2>(P, w);                       \
    case 3: return attend_item_t<KB_, CPG_, 3>(P, w);                       \
    default: return attend_item_t<KB_, CPG_, 4>(P, w);                      \
  }
  switch (P.key_bits) {
    case 2:
      if (wide2) {
        ROTKV_VB(2, 16)
      } else {
        ROTKV_VB(2, 8)
      }
    case 3: ROTKV_VB(3, 8)
    default: ROTKV_VB(4, 8)
  }
#undef ROTKV_VB
}

}  // namespace ROTKV_ISA_NAMESPACE
}  // namespace rotkv_cpu
