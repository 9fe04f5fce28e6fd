// Thin vector types for the CPU attention kernel: one struct per ISA with the same static members,
// so the kernel (rotkv_paged_cpu_kernel.h) is written once and compiled once per ISA.
//
//   N                     lanes (fp32)
//   F / I                 float / int32 vector
//   load, store, set1, add, sub, mul, fmadd(a, b, c) = a * b + c, max
//   fnmadd1(b, a), fmadd1(b, a)  a - b and a + b on the FMA pipes (same rounding as sub / add)
//   hmax, hsum            horizontal max / sum (to a scalar)
//   any_gt(a, b)          whether some lane of a is > b (false for NaN lanes)
//   exp2                  2^x per lane, relative error below 2^-22 for x >= -126, exactly 0 below
//   mask_gt(pos, lim, s)  s where pos <= lim, -inf elsewhere
//   gather32(base, off)   the 32-bit little-endian word at base + off[lane]
//   srli, and_, cvt       logical shift right, bitwise and, int32 -> fp32
//   unpack<BITS>(codes, c0)  codes c0 .. c0 + N - 1 of a packed bit stream (c0 a multiple of N)
//   bytes(p)              N bytes zero-extended to int32 lanes
//   code_float(x, s, m)   float(2^23 + ((x >> s) & m)): subtracting 2^23 + z gives q - z exactly (1-2 ops
//                         instead of mask, convert and subtract)
//   fp8_to_float / f16_to_float(x)  the e4m3 byte / IEEE half in the low bits of each lane, as fp32 (e4m3 by
//                         arithmetic: exponent and mantissa moved into a float, times 2^120; 0x7F reads as 480,
//                         not NaN: the writer never stores it, the scale is clamped to >= 2^-6)
//   select(ok, x)         x where ok (1.0f) else 0 (ok is 1.0f / 0.0f per lane; a NaN in x never leaks)
//   transpose(rows, c0, out)  out[j * N + i] = rows[i][c0 + j] for i, j < N (RoPE tables, lanes = positions)
//   transpose_words(rows, off, n, out)  the same for the first n 32-bit words at rows[i] + off (key codes)
//   (the write) min(a, b) = a < b ? a : b, max likewise a > b ? a : b (the second operand on ties and NaN, like
//   std::min(b, a) / std::max(b, a)); div; neg (sign flip); round (to nearest even, std::nearbyint); cvt_i
//   (fp32 -> int32, for integral values); sll, or_, store_i
//
// The header selects by the compiler's target macros, so each translation unit gets the type of the
// flags it is compiled with (rotkv_paged_cpu_{scalar,avx2,avx512}.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(ROTKV_VEC_AVX512) && !(defined(__AVX512F__) && defined(__AVX512BW__))
#error "ROTKV_VEC_AVX512 needs -mavx512f -mavx512bw (setup.py ISA_FLAGS)"
#endif
#if defined(ROTKV_VEC_AVX2) && !(defined(__AVX2__) && defined(__FMA__))
#error "ROTKV_VEC_AVX2 needs -mavx2 -mfma (setup.py ISA_FLAGS)"
#endif
#if defined(ROTKV_VEC_AVX512) || defined(ROTKV_VEC_AVX2)
#include <immintrin.h>
#endif

namespace rotkv_cpu {

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      uint32_t m = man;
      do {
        ++e;
        m <<= 1;
      } while ((m & 0x400u) == 0);
      bits = sign | ((127 - 15 - e) << 23) | ((m & 0x3FFu) << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

// Exact 2^x for the reduction step: cephes' exp2f polynomial on [-0.5, 0.5] (relative error ~1.5e-7).
#define ROTKV_EXP2_POLY(FMA, SET1, f)                   \
  FMA(FMA(FMA(FMA(FMA(SET1(1.535336188319500e-4f), f,   \
                      SET1(1.339887440266574e-3f)), f,  \
                  SET1(9.618437357674640e-3f)), f,      \
              SET1(5.550332471162809e-2f)), f,          \
          SET1(2.402264791363012e-1f)), f,              \
      SET1(6.931472028550421e-1f))

#if defined(ROTKV_VEC_AVX512)

struct Vec {
  static constexpr int N = 16;
  using F = __m512;
  using I = __m512i;
  static inline F zero() { return _mm512_setzero_ps(); }
  static inline F set1(float x) { return _mm512_set1_ps(x); }
  static inline F load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, F x) { _mm512_storeu_ps(p, x); }
  static inline F add(F a, F b) { return _mm512_add_ps(a, b); }
  static inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static inline F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static inline F fnmadd1(F b, F a) { return _mm512_fnmadd_ps(b, _mm512_set1_ps(1.0f), a); }
  static inline F fmadd1(F b, F a) { return _mm512_fmadd_ps(b, _mm512_set1_ps(1.0f), a); }
  static inline F max(F a, F b) { return _mm512_max_ps(a, b); }
  static inline F min(F a, F b) { return _mm512_min_ps(a, b); }
  static inline F div(F a, F b) { return _mm512_div_ps(a, b); }
  static inline F neg(F a) { return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN))); }
  static inline F round(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline I cvt_i(F a) { return _mm512_cvttps_epi32(a); }
  static inline I sll(I a, int n) { return _mm512_sll_epi32(a, _mm_cvtsi32_si128(n)); }
  static inline I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static inline void store_i(int32_t* p, I a) { _mm512_storeu_si512(p, a); }
  static inline F butterfly_in(F x, int h) {
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const F other = _mm512_permutexvar_ps(_mm512_xor_si512(iota, _mm512_set1_epi32(h)), x);
    // +1 / -1 per lane: x * sign + other rounds like x + other / other - x
    const __mmask16 neg = _mm512_test_epi32_mask(iota, _mm512_set1_epi32(h));
    const F sign = _mm512_mask_blend_ps(neg, _mm512_set1_ps(1.0f), _mm512_set1_ps(-1.0f));
    return _mm512_fmadd_ps(x, sign, other);
  }
  static inline F load_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static inline F load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static inline float hmax(F a) { return _mm512_reduce_max_ps(a); }
  static inline float hsum(F a) { return _mm512_reduce_add_ps(a); }
  static inline bool any_gt(F a, float b) { return _mm512_cmp_ps_mask(a, _mm512_set1_ps(b), _CMP_GT_OQ) != 0; }
  static inline F exp2(F x) {
    const F xc = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    const F n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const F f = _mm512_sub_ps(xc, n);
    F p = ROTKV_EXP2_POLY(_mm512_fmadd_ps, _mm512_set1_ps, f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const I e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    const F r = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
    return _mm512_maskz_mov_ps(keep, r);
  }
  static inline F mask_gt(F pos, F lim, F s) {
    const __mmask16 ok = _mm512_cmp_ps_mask(pos, lim, _CMP_LE_OQ);
    return _mm512_mask_blend_ps(ok, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), s);
  }
  static inline I load_i(const int32_t* p) { return _mm512_loadu_si512(p); }
  static inline I gather32(const uint8_t* base, I off) { return _mm512_i32gather_epi32(off, base, 1); }
  static inline I srli(I a, int n) { return _mm512_srl_epi32(a, _mm_cvtsi32_si128(n)); }
  static inline I and_(I a, int m) { return _mm512_and_si512(a, _mm512_set1_epi32(m)); }
  static inline F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  // Codes c0 .. c0 + 15 span 2 * BITS <= 8 bytes from byte c0 * BITS / 8. Each 128-bit lane gets the 8 bytes
  // (twice), a byte shuffle puts the two bytes holding code j into 32-bit lane j, a variable shift aligns it.
  static inline I bytes(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static inline F code_float(I x, int s, int m) {
    // (x >> s) & m | 0x4B000000 in one ternary-logic op: A & B | C = 0xEA
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_srl_epi32(x, _mm_cvtsi32_si128(s)),
                                                         _mm512_set1_epi32(m), _mm512_set1_epi32(0x4B000000), 0xEA));
  }
  static inline F fp8_to_float(I x) {
    const I mag = _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x7F)), 20);
    const F f = _mm512_mul_ps(_mm512_castsi512_ps(mag), _mm512_set1_ps(1.329227995784916e36f));  // 2^120
    const I sign = _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x80)), 24);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(f), sign));
  }
  static inline F f16_to_float(I x) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(x)); }
  static inline F select(F ok, F x) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(ok, _mm512_setzero_ps(), _CMP_NEQ_UQ), x);
  }
  static inline void transpose_regs(__m512* r, float* out) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // r[4i + j], 128-bit lane k: column 4k + j of rows 4i .. 4i + 3
    for (int i = 0; i < 4; ++i) {
      r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
      r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
      r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
      const __m512 v0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), v1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
      const __m512 v2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88),
                   v3 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
      _mm512_storeu_ps(out + (j) * 16, _mm512_shuffle_f32x4(v0, v2, 0x88));
      _mm512_storeu_ps(out + (8 + j) * 16, _mm512_shuffle_f32x4(v0, v2, 0xDD));
      _mm512_storeu_ps(out + (4 + j) * 16, _mm512_shuffle_f32x4(v1, v3, 0x88));
      _mm512_storeu_ps(out + (12 + j) * 16, _mm512_shuffle_f32x4(v1, v3, 0xDD));
    }
  }
  static inline void transpose(const float* const* rows, int c0, float* out) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(rows[i] + c0);
    transpose_regs(r, out);
  }
  // out[w * 16 + i] = 32-bit word w at rows[i] + byte_off, w < nwords (masked loads: nothing past them is read)
  static inline void transpose_words(const uint8_t* const* rows, int byte_off, int nwords, int32_t* out) {
    const __mmask16 m = static_cast<__mmask16>(nwords >= 16 ? 0xFFFF : (1u << nwords) - 1);
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(m, rows[i] + byte_off));
    transpose_regs(r, reinterpret_cast<float*>(out));
  }
  template <int BITS>
  static inline I unpack(const uint8_t* codes, int c0) {
    uint64_t w;
    std::memcpy(&w, codes + c0 * BITS / 8, 8);
    const I v = _mm512_set1_epi64(static_cast<long long>(w));
    alignas(64) static const struct Tables {
      int8_t idx[64];
      int32_t shift[16];
      Tables() : idx(), shift() {
        for (int j = 0; j < 16; ++j) {
          const int b = (j * BITS) / 8;
          idx[j * 4 + 0] = static_cast<int8_t>(b);
          idx[j * 4 + 1] = static_cast<int8_t>(b + 1);
          idx[j * 4 + 2] = static_cast<int8_t>(0x80);
          idx[j * 4 + 3] = static_cast<int8_t>(0x80);
          shift[j] = (j * BITS) % 8;
        }
      }
    } t;
    const I bytes = _mm512_shuffle_epi8(v, _mm512_load_si512(t.idx));
    const I s = _mm512_srlv_epi32(bytes, _mm512_load_si512(t.shift));
    return _mm512_and_si512(s, _mm512_set1_epi32((1 << BITS) - 1));
  }
};

#elif defined(ROTKV_VEC_AVX2)

struct Vec {
  static constexpr int N = 8;
  using F = __m256;
  using I = __m256i;
  static inline F zero() { return _mm256_setzero_ps(); }
  static inline F set1(float x) { return _mm256_set1_ps(x); }
  static inline F load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, F x) { _mm256_storeu_ps(p, x); }
  static inline F add(F a, F b) { return _mm256_add_ps(a, b); }
  static inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static inline F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static inline F fnmadd1(F b, F a) { return _mm256_fnmadd_ps(b, _mm256_set1_ps(1.0f), a); }
  static inline F fmadd1(F b, F a) { return _mm256_fmadd_ps(b, _mm256_set1_ps(1.0f), a); }
  static inline F max(F a, F b) { return _mm256_max_ps(a, b); }
  static inline F min(F a, F b) { return _mm256_min_ps(a, b); }
  static inline F div(F a, F b) { return _mm256_div_ps(a, b); }
  static inline F neg(F a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
  static inline F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline I cvt_i(F a) { return _mm256_cvttps_epi32(a); }
  static inline I sll(I a, int n) { return _mm256_sll_epi32(a, _mm_cvtsi32_si128(n)); }
  static inline I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static inline void store_i(int32_t* p, I a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a); }
  static inline F butterfly_in(F x, int h) {
    const __m256i iota = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    const __m256i hv = _mm256_set1_epi32(h);
    const F other = _mm256_permutevar8x32_ps(x, _mm256_xor_si256(iota, hv));
    const __m256i bit = _mm256_cmpeq_epi32(_mm256_and_si256(iota, hv), hv);
    const F sign = _mm256_blendv_ps(_mm256_set1_ps(1.0f), _mm256_set1_ps(-1.0f), _mm256_castsi256_ps(bit));
    return _mm256_fmadd_ps(x, sign, other);
  }
  static inline F load_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static inline F load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static inline float hmax(F a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static inline float hsum(F a) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static inline bool any_gt(F a, float b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(b), _CMP_GT_OQ)) != 0; }
  static inline F exp2(F x) {
    const F xc = _mm256_max_ps(x, _mm256_set1_ps(-126.0f));
    const F n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const F f = _mm256_sub_ps(xc, n);
    F p = ROTKV_EXP2_POLY(_mm256_fmadd_ps, _mm256_set1_ps, f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const I e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const F r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_and_ps(r, _mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_GE_OQ));
  }
  static inline F mask_gt(F pos, F lim, F s) {
    return _mm256_blendv_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()), s,
                            _mm256_cmp_ps(pos, lim, _CMP_LE_OQ));
  }
  static inline I load_i(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline I gather32(const uint8_t* base, I off) {
    return _mm256_i32gather_epi32(reinterpret_cast<const int*>(base), off, 1);
  }
  static inline I srli(I a, int n) { return _mm256_srl_epi32(a, _mm_cvtsi32_si128(n)); }
  static inline I and_(I a, int m) { return _mm256_and_si256(a, _mm256_set1_epi32(m)); }
  static inline F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  // Codes c0 .. c0 + 7 span BITS <= 4 bytes from byte c0 * BITS / 8 (same scheme as the AVX-512 type).
  static inline I bytes(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static inline F code_float(I x, int s, int m) {
    const I c = _mm256_and_si256(_mm256_srl_epi32(x, _mm_cvtsi32_si128(s)), _mm256_set1_epi32(m));
    return _mm256_castsi256_ps(_mm256_or_si256(c, _mm256_set1_epi32(0x4B000000)));
  }
  static inline F fp8_to_float(I x) {
    const I mag = _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7F)), 20);
    const F f = _mm256_mul_ps(_mm256_castsi256_ps(mag), _mm256_set1_ps(1.329227995784916e36f));  // 2^120
    const I sign = _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x80)), 24);
    return _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(f), sign));
  }
  static inline F f16_to_float(I x) {
    const I w = _mm256_and_si256(x, _mm256_set1_epi32(0xFFFF));
    const I packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(w, _mm256_setzero_si256()), 0x08);
    return _mm256_cvtph_ps(_mm256_castsi256_si128(packed));
  }
  static inline F select(F ok, F x) { return _mm256_and_ps(x, _mm256_cmp_ps(ok, _mm256_setzero_ps(), _CMP_NEQ_UQ)); }
  static inline void transpose_regs(__m256* r, float* out) {
    __m256 t[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
      r[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
      r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
      r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
      _mm256_storeu_ps(out + j * 8, _mm256_permute2f128_ps(r[j], r[4 + j], 0x20));
      _mm256_storeu_ps(out + (4 + j) * 8, _mm256_permute2f128_ps(r[j], r[4 + j], 0x31));
    }
  }
  static inline void transpose(const float* const* rows, int c0, float* out) {
    __m256 r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows[i] + c0);
    transpose_regs(r, out);
  }
  static inline void transpose_words(const uint8_t* const* rows, int byte_off, int nwords, int32_t* out) {
    const I m = _mm256_cmpgt_epi32(_mm256_set1_epi32(nwords), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 r[8];
    for (int i = 0; i < 8; ++i)
      r[i] = _mm256_castsi256_ps(_mm256_maskload_epi32(reinterpret_cast<const int*>(rows[i] + byte_off), m));
    transpose_regs(r, reinterpret_cast<float*>(out));
  }
  template <int BITS>
  static inline I unpack(const uint8_t* codes, int c0) {
    const I v = _mm256_set1_epi32(static_cast<int>(load_u32(codes + c0 * BITS / 8)));
    alignas(32) static const struct Tables {
      int8_t idx[32];
      int32_t shift[8];
      Tables() : idx(), shift() {
        for (int j = 0; j < 8; ++j) {
          const int b = (j * BITS) / 8;
          // lanes 4..7 live in the upper 128-bit half, which holds the same 4 bytes (broadcast)
          idx[j * 4 + 0] = static_cast<int8_t>(b);
          idx[j * 4 + 1] = static_cast<int8_t>(b + 1);
          idx[j * 4 + 2] = static_cast<int8_t>(0x80);
          idx[j * 4 + 3] = static_cast<int8_t>(0x80);
          shift[j] = (j * BITS) % 8;
        }
      }
    } t;
    const I bytes = _mm256_shuffle_epi8(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.idx)));
    const I s = _mm256_srlv_epi32(bytes, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.shift)));
    return _mm256_and_si256(s, _mm256_set1_epi32((1 << BITS) - 1));
  }
};

#else  // scalar reference: one lane, plain C++

struct Vec {
  static constexpr int N = 1;
  using F = float;
  using I = int32_t;
  static inline F zero() { return 0.0f; }
  static inline F set1(float x) { return x; }
  static inline F load(const float* p) { return *p; }
  static inline void store(float* p, F x) { *p = x; }
  static inline F add(F a, F b) { return a + b; }
  static inline F sub(F a, F b) { return a - b; }
  static inline F mul(F a, F b) { return a * b; }
  static inline F fmadd(F a, F b, F c) { return a * b + c; }
  static inline F fnmadd1(F b, F a) { return a - b; }
  static inline F fmadd1(F b, F a) { return a + b; }
  static inline F max(F a, F b) { return a > b ? a : b; }
  static inline F min(F a, F b) { return a < b ? a : b; }
  static inline F div(F a, F b) { return a / b; }
  static inline F neg(F a) { return -a; }
  static inline F round(F a) { return std::nearbyint(a); }
  static inline I cvt_i(F a) { return static_cast<I>(a); }
  static inline I sll(I a, int n) { return static_cast<I>(static_cast<uint32_t>(a) << n); }
  static inline I or_(I a, I b) { return a | b; }
  static inline void store_i(int32_t* p, I a) { *p = a; }
  static inline F butterfly_in(F x, int) { return x; }  // N = 1: no stage inside a vector
  static inline F load_bf16(const uint16_t* p) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  static inline F load_f16(const uint16_t* p) { return half_to_float(*p); }
  static inline float hmax(F a) { return a; }
  static inline float hsum(F a) { return a; }
  static inline bool any_gt(F a, float b) { return a > b; }
  static inline F exp2(F x) { return x >= -126.0f ? std::exp2(x) : 0.0f; }
  static inline F mask_gt(F pos, F lim, F s) { return pos <= lim ? s : -std::numeric_limits<float>::infinity(); }
  static inline I load_i(const int32_t* p) { return *p; }
  static inline I gather32(const uint8_t* base, I off) { return static_cast<I>(load_u32(base + off)); }
  static inline I srli(I a, int n) { return static_cast<I>(static_cast<uint32_t>(a) >> n); }
  static inline I and_(I a, int m) { return a & m; }
  static inline F cvt(I a) { return static_cast<float>(a); }
  static inline I bytes(const uint8_t* p) { return p[0]; }
  static inline F code_float(I x, int s, int m) { return 8388608.0f + static_cast<float>((static_cast<uint32_t>(x) >> s) & m); }
  static inline F fp8_to_float(I x) {
    const uint32_t mag = (static_cast<uint32_t>(x) & 0x7Fu) << 20, sign = (static_cast<uint32_t>(x) & 0x80u) << 24;
    float f;
    std::memcpy(&f, &mag, 4);
    f *= 1.329227995784916e36f;  // 2^120
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  static inline F f16_to_float(I x) { return half_to_float(static_cast<uint16_t>(x & 0xFFFF)); }
  static inline F select(F ok, F x) { return ok != 0.0f ? x : 0.0f; }
  static inline void transpose(const float* const* rows, int c0, float* out) { out[0] = rows[0][c0]; }
  static inline void transpose_words(const uint8_t* const* rows, int byte_off, int nwords, int32_t* out) {
    if (nwords > 0) out[0] = static_cast<int32_t>(load_u32(rows[0] + byte_off));
  }
  template <int BITS>
  static inline I unpack(const uint8_t* codes, int c0) {
    const int bit = c0 * BITS;
    uint32_t w = codes[bit / 8] | (static_cast<uint32_t>(codes[bit / 8 + 1]) << 8);
    return static_cast<I>((w >> (bit % 8)) & ((1u << BITS) - 1));
  }
};

#endif

}  // namespace rotkv_cpu
