// RotateKV paged cache on the CPU: the plain-C++ interface between the torch bindings
// (rotkv_paged_cpu.cpp) and the per-ISA attention kernels (rotkv_paged_cpu_{scalar,avx2,avx512}.cpp).
//
// This header includes no torch header on purpose: the ISA translation units are compiled with
// -mavx2 / -mavx512f, and any inline function they shared with torch could be emitted with those
// instructions and picked by the linker for the generic code (a crash on an older CPU).
#pragma once

#include <cstdint>

namespace rotkv_cpu {

// Everything one attention call needs, as raw pointers into the caller's tensors.
//
// Cache layout (rotkv_paged.py): the record of position p of request r is at
//   records + block_table[r * bt_stride + p / block_size] * page_stride + (p % block_size) * slot_bytes,
// bytes [0, key_bytes) hold the key record and [key_bytes, key_bytes + value_bytes) the value record;
// each record is [packed codes (W * bits / 8) | scales of all groups | zeros of all groups].
struct AttnParams {
  // ---- layout -------------------------------------------------------------------------------------------
  int num_kv_heads = 0;     // H
  int head_dim = 0;         // D
  int num_q_heads = 0;      // Hq (a multiple of H)
  int key_bits = 2, value_bits = 2;
  int key_group = 0, value_group = 0;  // quantization group sizes along the stored channels
  int key_rot = 0;          // key Hadamard width g * D
  bool value_rot = true;    // per-head Hadamard on values (else width 1: no rotation)
  bool scale_fp8 = false;   // fp8 e4m3 scale + uint8 zero (else fp16 scale + fp16 zero)
  int key_bytes = 0, value_bytes = 0;
  int sink_tokens = 0;      // S (0: none)
  // Sliding window SW (0: none): a query at position t attends keys t - SW < j <= t. An item reads no position
  // before its first query's window (those blocks may be vLLM's null block); its splits start there.
  int64_t sliding_window = 0;
  // Hadamard factors: width = m * p, matrix kron(H_m, H_p); cores are +-1 row-major [m, m].
  int key_m = 1, key_p = 1;
  const float* key_core = nullptr;
  int value_m = 1, value_p = 1;
  const float* value_core = nullptr;

  // ---- step inputs --------------------------------------------------------------------------------------
  const float* query = nullptr;  // fp32 [T, Hq, D] contiguous, pre-multiplied by scale * log2(e)
  const uint8_t* records = nullptr;
  int64_t page_stride = 0;       // bytes between pages
  int64_t slot_bytes = 0;        // C, bytes between slots of a page
  int block_size = 0;
  const void* sinks = nullptr;   // [num_blocks, S, 2, H, D] strided, dtype sink_dtype; or null
  int sink_dtype = 0;            // 0 fp32, 1 fp16, 2 bf16
  int64_t sink_stride[5] = {0, 0, 0, 0, 0};  // in elements
  const int64_t* block_table = nullptr;
  int64_t bt_stride = 0;
  const int64_t* seq_lens = nullptr;         // [R]
  const int64_t* query_start_loc = nullptr;  // [R + 1]
  int num_reqs = 0;
  const float* rope_cos = nullptr;  // fp32 [max_pos, D] (HF convention) or null: keys stored post-RoPE
  const float* rope_sin = nullptr;
  int64_t rope_stride = 0;
  // Optional: the RoPE tables pre-transposed for the kernel's tiles (transpose_rope), shared by every item
  // that reads the same positions: tile t (positions t*N .. t*N + N - 1) is [cos: D][N] then [sin: D][N].
  const float* rope_t = nullptr;
  // Channels per tile in rope_t: D, or D / 2 when every table row is [c | c] (Hugging Face's layout: the two
  // halves of a RoPE pair share cos and sin), which halves the bytes the scores read.
  int rope_width = 0;
  const int64_t* key_perm = nullptr;  // stored channel i holds natural channel key_perm[i]; or null
  const float* key_mean = nullptr;    // fp32 [W] pre-RoPE key mean (natural order); or null
  // Recent window R = `window` (0: none): each query at position p reads positions p - R + 1 .. p in full precision
  // instead of their records. Of request r (step positions p0 = L - q_len .. L - 1, rows q0 .. of the step):
  // position j >= p0 is row q0 + j - p0 of win_step_k / win_step_v (fp32 [T, H, D] contiguous: K post-RoPE,
  // V already rotated into the accumulators' basis); j < p0 is entry j - p0 + R - 1 of win_prev (fp32
  // [num_reqs, R - 1, 2, H, D] contiguous, V rotated likewise; null when R = 1).
  const float* win_step_k = nullptr;
  const float* win_step_v = nullptr;
  const float* win_prev = nullptr;
  int window = 0;

  // ---- partial results, one per (token, query head, split) ------------------------------------------------
  float* part_m = nullptr;    // [T, Hq, ns] running max (base-2 logits)
  float* part_l = nullptr;    // [T, Hq, ns] sum of 2^(s - m)
  float* part_acc = nullptr;  // [T, Hq, ns, D] sum of 2^(s - m) v, in the values' rotated basis
  int num_splits = 1;
  int64_t split_size = 0;     // context positions per split (split s of an item starts at its context start
                              // + s * split_size: 0, or its first query's window start)
};

// One unit of parallel work: query tokens [tok_lo, tok_hi) of request `req`, the KV heads of rotation block
// `rot`, context positions of split `split`.
struct WorkItem {
  int req;
  int tok_lo, tok_hi;
  int rot;
  int split;
};

// One half of a slot's record for the write (rotkv_paged.paged_write_ref): forward normalized kron(H_m, H_p) on
// every `rot` channels (rot = 1: none), stored order (stored channel i = channel perm[i]), group-wise asymmetric
// quantization to `bits`, codes packed 8 per `bits` bytes, then the scales and zeros of every group.
struct EncodeParams {
  int rot = 1, m = 1;
  const float* core_t = nullptr;  // [m, m] transposed core (core_t[j * m + a] = core[a * m + j]) when m > 1
  const int64_t* perm = nullptr;  // or null: natural order
  int bits = 2, group = 8;
  float clip = 1.0f;
  int offset = 0;  // byte offset of this record in the slot (keys 0, values key_bytes)
};

// Everything one write call needs (the torch binding checked it): per token t, keys (post-RoPE, fp32 [T, H * D])
// are turned back to pre-RoPE (divided like the reference: (k c - rotate_half(k) s) / (c^2 + s^2)), centered,
// encoded; values encoded; the record lands at slot slots[t] (page slots[t] / block_size).
struct WriteParams {
  int H = 0, D = 0;
  bool fp8 = false;                  // fp8 e4m3 scale + uint8 zero (else fp16 scale + fp16 zero)
  const float* key = nullptr;        // fp32 [T, H * D] contiguous
  const float* value = nullptr;      // fp32 [T, H * D] contiguous
  const int64_t* slots = nullptr;    // [T]
  const int64_t* positions = nullptr;  // [T] (needed with RoPE)
  const float* rope_cos = nullptr;   // fp32 [max_pos, D] rows rope_stride apart, or null: no inverse RoPE
  const float* rope_sin = nullptr;
  int64_t rope_stride = 0;
  const float* key_mean = nullptr;   // fp32 [H * D] or null
  EncodeParams key_enc, value_enc;
  uint8_t* records = nullptr;
  int64_t page_stride = 0, slot_bytes = 0, block_size = 0;
};

// Normalized Hadamard kron(H_m, H_p) (forward) or its transpose of one vector of m * p floats, scalar fp32
// in the reference's order of operations (butterflies, core, one multiply by 1 / sqrt(n)). Defined once in
// rotkv_paged_cpu.cpp; the write and the ISA kernels' sink values use it (nothing hot).
void hadamard_scalar(float* x, int m, int p, const float* core, bool forward, float* tmp);

// Per-ISA kernels. attend_item: process one work item (writes its rows of part_m / part_l / part_acc).
// write_tokens: encode the n <= lanes() tokens toks[0 .. n) (slots >= 0) into their records, bit-identical to
// the scalar write (the same fp32 operations per value, vectorized over tokens).
// lanes: the ISA's N. transpose_rope: tiles [tile_lo, tile_hi) of AttnParams::rope_t, p.rope_width channels
// (rows >= n_pos are 0). fwht_rows: the normalized order-p Sylvester Hadamard (p a power of two, a multiple of 16)
// of n rows in place (row i at x + i * stride), bit-identical to hadamard_scalar(row, 1, p, ...).
#define ROTKV_ISA_API                                                                             \
  void attend_item(const AttnParams& p, const WorkItem& w);                                       \
  int lanes();                                                                                    \
  void transpose_rope(const AttnParams& p, int64_t tile_lo, int64_t tile_hi, int64_t n_pos, float* out); \
  void fwht_rows(float* x, int64_t n, int64_t stride, int p);                                     \
  void write_tokens(const WriteParams& p, const int64_t* toks, int n);
namespace scalar {
ROTKV_ISA_API
}
namespace avx2 {
ROTKV_ISA_API
}
namespace avx512 {
ROTKV_ISA_API
}
#undef ROTKV_ISA_API

}  // namespace rotkv_cpu
