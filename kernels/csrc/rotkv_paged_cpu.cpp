// torch.library ops of the RotateKV paged cache on the CPU (namespace `rotkv`):
//
//   paged_attention_cpu(...) -> ()   fused attention over the packed pages, writes `out` [T, Hq, D]
//   paged_write_cpu(...) -> ()       inverse RoPE, key mean, Hadamard, channel order, quantize, pack, scatter
//   ring_prev_cpu(...) -> Tensor     the recent window's R - 1 positions before each request's step, from the rings
//   paged_cpu_isa(int isa) -> int    the kernel that runs for a request (0 auto, 1 scalar, 2 avx2, 3 avx512)
//
// The Python face is rotkv_kernels.rotkv_paged_cpu (argument checks, fake implementations, docs); the
// maths are those of rotkv_kernels.rotkv_paged.paged_write_ref / paged_attention_ref.
//
// `layout` packs the PagedCacheSpec as ints: [H, D, key_bits, value_bits, key_group, value_group, key_rot,
// value_rot (0/1), scale_fp8 (0/1), sink_tokens, key_bytes, value_bytes, sliding_window (0: none), recent_window (0:
// none)]. `key_core` / `value_core` are the
// +-1 core matrices H_m (fp32 [m, m]) of the Hadamard orders m * 2^k (rotkv_kernels.hadamard), generated in
// Python; the power-of-two factor runs as butterflies here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <memory>
#include <mutex>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "rotkv_paged_cpu.h"

namespace rotkv_cpu {

// Normalized Hadamard kron(H_m, H_p) (forward) or its transpose of one vector (scalar, fp32, the reference's
// order of operations: butterflies, then the core, then one multiply by 1 / sqrt(n)).
void hadamard_scalar(float* x, int m, int p, const float* core, bool forward, float* tmp) {
  for (int a = 0; a < m; ++a) {
    float* y = x + a * p;
    for (int h = 1; h < p; h *= 2)
      for (int i0 = 0; i0 < p; i0 += 2 * h)
        for (int i = i0; i < i0 + h; ++i) {
          const float u = y[i], v = y[i + h];
          y[i] = u + v;
          y[i + h] = u - v;
        }
  }
  if (m > 1) {
    for (int b = 0; b < p; ++b) {
      for (int a = 0; a < m; ++a) {
        float acc = 0.0f;
        for (int j = 0; j < m; ++j) acc += (forward ? core[a * m + j] : core[j * m + a]) * x[j * p + b];
        tmp[a] = acc;
      }
      for (int a = 0; a < m; ++a) x[a * p + b] = tmp[a];
    }
  }
  const float c = static_cast<float>(1.0 / std::sqrt(static_cast<double>(m * p)));
  for (int i = 0; i < m * p; ++i) x[i] = x[i] * c;
}

namespace {

enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

int64_t best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kScalar;
}

int64_t resolve_isa(int64_t isa) {
  static const int64_t best = best_isa();
  if (isa == kAuto) return best;
  TORCH_CHECK(isa >= kScalar && isa <= kAvx512, "isa=", isa, ": expected 0 (auto), 1 (scalar), 2 (avx2), 3 (avx512)");
  TORCH_CHECK(isa <= best, "isa=", isa, ": this CPU supports up to ", best, " (1 scalar, 2 avx2, 3 avx512)");
  return isa;
}

int64_t paged_cpu_isa(int64_t isa) { return resolve_isa(isa); }

struct Layout {
  int H, D, key_bits, value_bits, key_group, value_group, key_rot;
  bool value_rot, fp8;
  int sink_tokens, key_bytes, value_bytes;
  int64_t sliding_window;
  int recent_window;  // R: a page's full-precision area holds sink_tokens + R - 1 ring slots after the sinks
  int ring_slots() const { return std::max(recent_window - 1, 0); }
};

Layout parse_layout(at::IntArrayRef v) {
  TORCH_CHECK(v.size() == 14, "layout: expected 14 ints, got ", v.size());
  Layout l{};
  l.H = static_cast<int>(v[0]);
  l.D = static_cast<int>(v[1]);
  l.key_bits = static_cast<int>(v[2]);
  l.value_bits = static_cast<int>(v[3]);
  l.key_group = static_cast<int>(v[4]);
  l.value_group = static_cast<int>(v[5]);
  l.key_rot = static_cast<int>(v[6]);
  l.value_rot = v[7] != 0;
  l.fp8 = v[8] != 0;
  l.sink_tokens = static_cast<int>(v[9]);
  l.key_bytes = static_cast<int>(v[10]);
  l.value_bytes = static_cast<int>(v[11]);
  l.sliding_window = v[12];
  TORCH_CHECK(l.sliding_window >= 0, "layout: sliding_window=", l.sliding_window, " must be >= 0");
  l.recent_window = static_cast<int>(v[13]);
  TORCH_CHECK(l.recent_window >= 0, "layout: recent_window=", l.recent_window, " must be >= 0");
  const int W = l.H * l.D;
  TORCH_CHECK(l.H > 0 && l.D > 0 && l.D % 16 == 0, "layout: head_dim=", l.D, " must be a positive multiple of 16");
  TORCH_CHECK(l.key_rot > 0 && l.key_rot % l.D == 0 && W % l.key_rot == 0, "layout: bad key_rot=", l.key_rot);
  TORCH_CHECK(l.key_group > 0 && l.key_group % 8 == 0 && l.key_rot % l.key_group == 0,
              "layout: key_group=", l.key_group, " must be a multiple of 8 dividing key_rot=", l.key_rot);
  TORCH_CHECK(l.value_group > 0 && l.value_group % 8 == 0 && W % l.value_group == 0,
              "layout: value_group=", l.value_group, " must be a multiple of 8 dividing the width ", W);
  for (int b : {l.key_bits, l.value_bits}) TORCH_CHECK(b >= 2 && b <= 4, "layout: bits=", b, " (2, 3 or 4)");
  return l;
}

int core_order(const at::Tensor& core, int width, const char* name) {
  TORCH_CHECK(core.dtype() == at::kFloat && core.dim() == 2 && core.size(0) == core.size(1) && core.is_contiguous(),
              name, ": expected a contiguous fp32 [m, m] Hadamard core");
  const int m = static_cast<int>(core.size(0));
  TORCH_CHECK(m >= 1 && m <= 64 && width % m == 0, name, ": order ", m, " does not divide width ", width,
              " (or is above the kernel's limit of 64)");
  const int p = width / m;
  TORCH_CHECK((p & (p - 1)) == 0, name, ": width ", width, " / core order ", m, " = ", p, " is not a power of two");
  return m;
}


int sink_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "sinks: unsupported dtype ", t);
  }
}

// ---- RoPE tables in the kernel's tile layout, cached ------------------------------------------------------

struct RopeCache {
  std::mutex mu;
  at::Tensor cos_ref, sin_ref, tiles;
  int64_t cos_version = -1, sin_version = -1, positions = 0;
  int lanes = 0;
  int width = 0;
};

at::Tensor rope_tiles(AttnParams& P, const at::Tensor& cos32, const at::Tensor& sin32, int64_t max_ctx,
                      int lanes, int64_t isa, int threads) {
  static RopeCache cache;
  std::lock_guard<std::mutex> lock(cache.mu);
  const bool same = cache.tiles.defined() && cache.cos_ref.unsafeGetTensorImpl() == cos32.unsafeGetTensorImpl() &&
                    cache.sin_ref.unsafeGetTensorImpl() == sin32.unsafeGetTensorImpl() &&
                    cache.cos_version == static_cast<int64_t>(cos32._version()) &&
                    cache.sin_version == static_cast<int64_t>(sin32._version()) && cache.lanes == lanes &&
                    cache.positions >= max_ctx;
  if (same) {
    P.rope_width = cache.width;
    return cache.tiles;
  }
  // grow geometrically (a longer context rebuilds), never past the table
  int64_t positions = std::max<int64_t>(max_ctx, 2 * cache.positions);
  positions = std::min<int64_t>(std::max<int64_t>(positions, 1024), cos32.size(0));
  positions = std::max(positions, max_ctx);
  const int64_t n_tiles = (positions + lanes - 1) / lanes;
  const int64_t D = P.head_dim, half = D / 2;
  const at::Tensor c = cos32.narrow(0, 0, positions), s = sin32.narrow(0, 0, positions);
  const bool halves = half % lanes == 0 && at::equal(c.narrow(1, 0, half), c.narrow(1, half, half)) &&
                      at::equal(s.narrow(1, 0, half), s.narrow(1, half, half));
  P.rope_width = static_cast<int>(halves ? half : D);
  at::Tensor t = at::empty({n_tiles, 2, P.rope_width, lanes}, cos32.options());
  auto tr = isa == kAvx512 ? &avx512::transpose_rope : isa == kAvx2 ? &avx2::transpose_rope : &scalar::transpose_rope;
  float* out = t.data_ptr<float>();
  const int64_t chunk = 64;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t0 = 0; t0 < n_tiles; t0 += chunk) tr(P, t0, std::min(n_tiles, t0 + chunk), positions, out);
  cache.cos_ref = cos32;
  cache.sin_ref = sin32;
  cache.cos_version = static_cast<int64_t>(cos32._version());
  cache.sin_version = static_cast<int64_t>(sin32._version());
  cache.tiles = t;
  cache.positions = positions;
  cache.lanes = lanes;
  cache.width = P.rope_width;
  return t;
}

// ---- attention -------------------------------------------------------------------------------------------

void paged_attention_cpu(const at::Tensor& query, const at::Tensor& records, const at::Tensor& block_tables,
                         const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                         const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& rope_cos,
                         const std::optional<at::Tensor>& rope_sin, const std::optional<at::Tensor>& key_perm,
                         const std::optional<at::Tensor>& key_mean, const at::Tensor& key_core,
                         const at::Tensor& value_core, at::IntArrayRef layout, double scale, int64_t num_splits,
                         int64_t isa, at::Tensor& out, const std::optional<at::Tensor>& recent_key,
                         const std::optional<at::Tensor>& recent_value, const std::optional<at::Tensor>& recent_prev) {
  const Layout ly = parse_layout(layout);
  const int64_t run_isa = resolve_isa(isa);
  TORCH_CHECK(records.scalar_type() == at::kByte && records.dim() == 3 && records.stride(2) == 1,
              "records: expected uint8 [num_blocks, block_size, C] with contiguous slots");
  TORCH_CHECK(query.dim() == 3 && query.size(2) == ly.D && query.size(1) % ly.H == 0, "query: expected [T, Hq, D]");
  const int64_t Hq = query.size(1), D = ly.D;
  const int g = ly.key_rot / ly.D, qpk = static_cast<int>(Hq / ly.H), per_tok = g * qpk, n_rot = ly.H / g;
  const int key_m = core_order(key_core, ly.key_rot, "key_core");
  const int value_m = ly.value_rot ? core_order(value_core, ly.D, "value_core") : 1;

  const at::Tensor qsl = query_start_loc.to(at::kLong).contiguous();
  const at::Tensor seq = seq_lens.to(at::kLong).contiguous();
  const at::Tensor bt = block_tables.to(at::kLong).contiguous();
  const int R = static_cast<int>(seq.size(0));
  const int64_t* qslp = qsl.data_ptr<int64_t>();
  const int64_t* seqp = seq.data_ptr<int64_t>();
  const int64_t T = R ? qslp[R] : 0;
  TORCH_CHECK(out.dim() == 3 && out.size(0) == query.size(0) && out.size(1) == Hq && out.size(2) == D,
              "out: expected [T, Hq, D]");
  if (T == 0) return;
  // base-2 logits: 2^(s log2 e) = e^s
  const at::Tensor q32 = (query.narrow(0, 0, T).to(at::kFloat) * (scale * M_LOG2E)).contiguous();

  // ---- plan: query blocks x rotation blocks x context splits -------------------------------------------------
  // max_pos: the longest sequence (RoPE rows); max_ctx: the most context positions one item reads (with a
  // sliding window an item starts at its first query's window, so the splits cover the window only)
  int64_t max_q = 0, max_ctx = 0, max_pos = 0;
  for (int r = 0; r < R; ++r) {
    const int64_t ql = qslp[r + 1] - qslp[r];
    TORCH_CHECK(ql >= 0 && ql <= seqp[r], "request ", r, ": ", ql, " queries but seq_lens=", seqp[r]);
    max_q = std::max(max_q, ql);
    if (ql > 0) max_pos = std::max(max_pos, seqp[r]);
  }
  // Prefill rows share the decoded keys of a tile: up to ~256 rows (query tokens x query heads) per item.
  const int64_t mq = max_q <= 1 ? 1 : std::max<int64_t>(1, 256 / per_tok);
  std::vector<WorkItem> base_items;
  for (int r = 0; r < R; ++r) {
    const int64_t ql = qslp[r + 1] - qslp[r];
    for (int64_t t = 0; t < ql; t += mq) {
      const int64_t first = seqp[r] - ql + t, end = seqp[r] - ql + std::min(t + mq, ql);
      const int64_t start = ly.sliding_window ? std::max<int64_t>(0, first - ly.sliding_window + 1) : 0;
      max_ctx = std::max(max_ctx, end - start);
      for (int rot = 0; rot < n_rot; ++rot)
        base_items.push_back(WorkItem{r, static_cast<int>(qslp[r] + t), static_cast<int>(qslp[r] + std::min(t + mq, ql)),
                                      rot, 0});
    }
  }
  const int threads = at::get_num_threads();
  int64_t ns = num_splits;
  if (ns <= 0) {
    // enough items for the threads to balance under the dynamic schedule (16 per thread: other processes
    // may slow one thread down), with at least kMinSplit positions per split: a split's fixed cost (its
    // partial rows and their merge) is a few tiles' work, and one decoding sequence of 1-2K positions
    // still gets every thread
    constexpr int64_t kMinSplit = 256;
    const int64_t n = std::max<int64_t>(1, base_items.size());
    const int64_t want = (16 * threads + n - 1) / n;
    ns = std::max<int64_t>(1, std::min<int64_t>(want, (max_ctx + kMinSplit - 1) / kMinSplit));
    // Items run split-major (all base items of split 0, then split 1, ...), so a thread's consecutive
    // items read the same positions' RoPE rows (2 * D / 2 floats per position, more bytes than the
    // records at 2 bits): splits small enough for those rows to stay in L2 let every sequence after the
    // first read them from there.
    if (rope_cos.has_value() && n > 1) {
      constexpr int64_t kRopeSplitBytes = 256 * 1024;
      const int64_t rope_pos_bytes = 4 * D;
      ns = std::max<int64_t>(ns, (max_ctx * rope_pos_bytes + kRopeSplitBytes - 1) / kRopeSplitBytes);
    }
  }
  int64_t split = (std::max<int64_t>(max_ctx, 1) + ns - 1) / ns;
  split = std::max<int64_t>(split, ly.sink_tokens);  // the sinks belong to split 0
  split = (split + 15) / 16 * 16;
  ns = std::max<int64_t>(1, (max_ctx + split - 1) / split);

  at::Tensor pm = at::empty({T, Hq, ns}, query.options().dtype(at::kFloat));
  at::Tensor pl = at::empty({T, Hq, ns}, query.options().dtype(at::kFloat));
  at::Tensor pacc = at::empty({T, Hq, ns, D}, query.options().dtype(at::kFloat));

  AttnParams P;
  P.num_kv_heads = ly.H;
  P.head_dim = ly.D;
  P.num_q_heads = static_cast<int>(Hq);
  P.key_bits = ly.key_bits;
  P.value_bits = ly.value_bits;
  P.key_group = ly.key_group;
  P.value_group = ly.value_group;
  P.key_rot = ly.key_rot;
  P.value_rot = ly.value_rot;
  P.scale_fp8 = ly.fp8;
  P.key_bytes = ly.key_bytes;
  P.value_bytes = ly.value_bytes;
  P.sink_tokens = ly.sink_tokens;
  P.sliding_window = ly.sliding_window;
  P.key_m = key_m;
  P.key_p = ly.key_rot / key_m;
  P.key_core = key_core.data_ptr<float>();
  P.value_m = value_m;
  P.value_p = ly.D / value_m;
  P.value_core = value_core.data_ptr<float>();
  P.query = q32.data_ptr<float>();
  P.records = records.data_ptr<uint8_t>();
  P.page_stride = records.stride(0);
  P.slot_bytes = records.stride(1);
  P.block_size = static_cast<int>(records.size(1));
  if (sinks.has_value() && ly.sink_tokens > 0) {
    const at::Tensor& s = *sinks;
    TORCH_CHECK(s.dim() == 5, "sinks: expected [num_blocks, S, 2, H, D]");
    P.sinks = s.data_ptr();
    P.sink_dtype = sink_dtype_code(s.scalar_type());
    for (int i = 0; i < 5; ++i) P.sink_stride[i] = s.stride(i);
  }
  P.block_table = bt.data_ptr<int64_t>();
  P.bt_stride = bt.size(1);
  P.seq_lens = seqp;
  P.query_start_loc = qslp;
  P.num_reqs = R;
  at::Tensor cos32, sin32, perm64, mean32;
  if (rope_cos.has_value()) {
    cos32 = rope_cos->to(at::kFloat).contiguous();
    sin32 = rope_sin->to(at::kFloat).contiguous();
    TORCH_CHECK(cos32.sizes() == sin32.sizes() && cos32.dim() == 2 && cos32.size(1) == D,
                "rope_cos/rope_sin: expected fp32 [max_position, D]");
    P.rope_cos = cos32.data_ptr<float>();
    P.rope_sin = sin32.data_ptr<float>();
    P.rope_stride = cos32.stride(0);
  }
  if (key_perm.has_value()) {
    perm64 = key_perm->to(at::kLong).contiguous();
    P.key_perm = perm64.data_ptr<int64_t>();
  }
  if (key_mean.has_value()) {
    mean32 = key_mean->to(at::kFloat).contiguous();
    P.key_mean = mean32.data_ptr<float>();
  }
  auto fwht = run_isa == kAvx512 ? &avx512::fwht_rows : run_isa == kAvx2 ? &avx2::fwht_rows : &scalar::fwht_rows;
  at::Tensor win_k, win_v, win_prev;
  if (ly.recent_window > 0) {
    const int Rw = ly.recent_window, n = ly.ring_slots();
    TORCH_CHECK(recent_key.has_value() && recent_value.has_value(), "recent_key/recent_value: needed for recent_window=",
                Rw);
    const at::Tensor& rk = *recent_key;
    const at::Tensor& rv = *recent_value;
    TORCH_CHECK(rk.dim() == 3 && rv.dim() == 3 && rk.size(0) >= T && rv.size(0) >= T && rk.size(1) == ly.H &&
                    rv.size(1) == ly.H && rk.size(2) == D && rv.size(2) == D,
                "recent_key/recent_value: expected [>= T, H, D]");
    win_k = rk.narrow(0, 0, T).to(at::kFloat).contiguous();
    // V into the accumulators' basis (the merge rotates each output row back): a copy, rotated in place
    win_v = at::empty({T, ly.H, D}, rv.options().dtype(at::kFloat));
    win_v.copy_(rv.narrow(0, 0, T));
    if (n > 0) {
      TORCH_CHECK(recent_prev.has_value(), "recent_prev: needed for recent_window=", Rw);
      const at::Tensor& rp = *recent_prev;
      TORCH_CHECK(rp.dim() == 5 && rp.size(0) == R && rp.size(1) == n && rp.size(2) == 2 && rp.size(3) == ly.H &&
                      rp.size(4) == D,
                  "recent_prev: expected [num_reqs, R - 1, 2, H, D]");
      win_prev = at::empty({R, n, 2, ly.H, D}, rp.options().dtype(at::kFloat));
      win_prev.copy_(rp);
    }
    if (ly.value_rot && value_m == 1) {
      // Sylvester orders (D = 64, 128, 256): vectorized, the same bits as hadamard_scalar
      fwht(win_v.data_ptr<float>(), T * ly.H, D, ly.D);
      if (win_prev.defined())
        for (int64_t i = 0; i < static_cast<int64_t>(R) * n; ++i)  // the V halves of [R, n, 2, H, D]
          fwht(win_prev.data_ptr<float>() + (2 * i + 1) * ly.H * D, ly.H, D, ly.D);
    } else if (ly.value_rot) {
      float* vrows = win_v.data_ptr<float>();
      float* prows = win_prev.defined() ? win_prev.data_ptr<float>() : nullptr;
      const int64_t n_step = T * ly.H, n_prev = prows ? static_cast<int64_t>(R) * n * ly.H : 0;
      at::parallel_for(0, n_step + n_prev, 64, [&](int64_t b, int64_t e) {
        std::vector<float> tmp(64);
        for (int64_t i = b; i < e; ++i) {
          // prev rows: [r, j, 1, h] of [R, n, 2, H, D]
          float* x = i < n_step ? vrows + i * D
                                : prows + (((i - n_step) / ly.H * 2 + 1) * ly.H + (i - n_step) % ly.H) * D;
          hadamard_scalar(x, value_m, ly.D / value_m, value_core.data_ptr<float>(), true, tmp.data());
        }
      });
    }
    P.win_step_k = win_k.data_ptr<float>();
    P.win_step_v = win_v.data_ptr<float>();
    P.win_prev = win_prev.defined() ? win_prev.data_ptr<float>() : nullptr;
    P.window = Rw;
  } else {
    TORCH_CHECK(!recent_key.has_value() && !recent_value.has_value() && !recent_prev.has_value(),
                "recent_key/recent_value/recent_prev: given, but the layout's recent_window is 0");
  }
  P.part_m = pm.data_ptr<float>();
  P.part_l = pl.data_ptr<float>();
  P.part_acc = pacc.data_ptr<float>();
  P.num_splits = static_cast<int>(ns);
  P.split_size = split;

  // RoPE tables transposed for the kernel's tiles, shared by every item (all sequences read the same positions)
  // and kept between calls: the serving tables never change, so the transposition is paid once per process
  // (again only when a longer context arrives). The cache holds a reference to the tables it was built from
  // and their version counters, so a freed-and-reused address or an in-place edit cannot match.
  at::Tensor rope_t;
  if (P.rope_cos) {
    TORCH_CHECK(cos32.size(0) >= max_pos, "rope_cos: ", cos32.size(0), " positions, the context needs ", max_pos);
    const int lanes = run_isa == kAvx512 ? avx512::lanes() : run_isa == kAvx2 ? avx2::lanes() : scalar::lanes();
    rope_t = rope_tiles(P, cos32, sin32, max_pos, lanes, run_isa, threads);
    P.rope_t = rope_t.data_ptr<float>();
  }

  void (*fn)(const AttnParams&, const WorkItem&) =
      run_isa == kAvx512 ? &avx512::attend_item : run_isa == kAvx2 ? &avx2::attend_item : &scalar::attend_item;

  // ---- merge of the splits, one inverse value Hadamard per output row ------------------------------------------
  // Run by the item that finishes a (query block, rotation block) last (a ticket per base item), so the call
  // has one parallel region and one barrier: under CPU contention every barrier can cost a whole time slice.
  const float* pmp = pm.data_ptr<float>();
  const float* plp = pl.data_ptr<float>();
  const float* pap = pacc.data_ptr<float>();
  const int vp = ly.D / value_m;
  const float* vcore = value_core.data_ptr<float>();
  const at::ScalarType odt = out.scalar_type();
  char* outp = static_cast<char*>(out.data_ptr());
  const int64_t osz = out.element_size(), os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2);
  // rows of a (query block, rotation block): merged into `ob` [rows, D], rotated back (all rows at once where the
  // order has no core), converted into `out`
  auto merge_rows = [&](const WorkItem& w, std::vector<float>& ob, float* tmp) {
    const int64_t n_rows = static_cast<int64_t>(w.tok_hi - w.tok_lo) * per_tok;
    if (static_cast<int64_t>(ob.size()) < n_rows * D) ob.resize(n_rows * D);
    for (int64_t t = w.tok_lo; t < w.tok_hi; ++t)
      for (int64_t hq = static_cast<int64_t>(w.rot) * per_tok; hq < (w.rot + 1) * per_tok; ++hq) {
        float* o = ob.data() + ((t - w.tok_lo) * per_tok + hq - static_cast<int64_t>(w.rot) * per_tok) * D;
        const int64_t base = (t * Hq + hq) * ns;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < ns; ++s) mx = std::max(mx, pmp[base + s]);
        std::fill(o, o + D, 0.0f);
        float lsum = 0.0f;
        if (mx != -std::numeric_limits<float>::infinity()) {
          for (int64_t s = 0; s < ns; ++s) {
            const float wgt = std::exp2(pmp[base + s] - mx);
            if (wgt == 0.0f) continue;
            lsum += wgt * plp[base + s];
            const float* a = pap + (base + s) * D;
            for (int64_t c = 0; c < D; ++c) o[c] += wgt * a[c];
          }
        }
        const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
        for (int64_t c = 0; c < D; ++c) o[c] *= inv;
        if (ly.value_rot && value_m > 1) hadamard_scalar(o, value_m, vp, vcore, false, tmp);
      }
    if (ly.value_rot && value_m == 1) fwht(ob.data(), n_rows, D, ly.D);
    for (int64_t t = w.tok_lo; t < w.tok_hi; ++t)
      for (int64_t hq = static_cast<int64_t>(w.rot) * per_tok; hq < (w.rot + 1) * per_tok; ++hq) {
        const float* o = ob.data() + ((t - w.tok_lo) * per_tok + hq - static_cast<int64_t>(w.rot) * per_tok) * D;
        char* row = outp + (t * os0 + hq * os1) * osz;
        // one dtype test per row, not per value
        auto put = [&](auto* typed) {
          for (int64_t c = 0; c < D; ++c) typed[c * os2] = static_cast<std::remove_pointer_t<decltype(typed)>>(o[c]);
        };
        if (odt == at::kFloat) put(reinterpret_cast<float*>(row));
        else if (odt == at::kHalf) put(reinterpret_cast<at::Half*>(row));
        else put(reinterpret_cast<at::BFloat16*>(row));
      }
  };
  TORCH_CHECK(odt == at::kFloat || odt == at::kHalf || odt == at::kBFloat16, "out: unsupported dtype ", odt);

  const int64_t n_items = static_cast<int64_t>(base_items.size()) * ns;
  std::unique_ptr<std::atomic<int64_t>[]> tickets(new std::atomic<int64_t>[base_items.size()]);
  for (size_t i = 0; i < base_items.size(); ++i) tickets[i].store(0, std::memory_order_relaxed);
  // no more threads than items: a thread with nothing to do still has to reach the region's end, and on a
  // busy machine waiting for it to be scheduled can cost more than a short call's whole work
#pragma omp parallel num_threads(static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n_items))))
  {
    std::vector<float> ob, tmp(64);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_items; ++i) {
      const int64_t nb = static_cast<int64_t>(base_items.size()), bi = i % nb;
      WorkItem w = base_items[bi];
      w.split = static_cast<int>(i / nb);  // split-major: see the plan
      fn(P, w);
      if (tickets[bi].fetch_add(1, std::memory_order_acq_rel) + 1 == ns) merge_rows(w, ob, tmp.data());
    }
  }
}

// ---- write -----------------------------------------------------------------------------------------------

void paged_write_cpu(const at::Tensor& key, const at::Tensor& value, const at::Tensor& slot_mapping,
                     at::Tensor& records, const std::optional<at::Tensor>& positions,
                     const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& rope_cos,
                     const std::optional<at::Tensor>& rope_sin, const std::optional<at::Tensor>& key_perm,
                     const std::optional<at::Tensor>& key_mean, const at::Tensor& key_core,
                     const at::Tensor& value_core, at::IntArrayRef layout, double key_clip, double value_clip,
                     int64_t isa) {
  const Layout ly = parse_layout(layout);
  const int64_t run_isa = resolve_isa(isa);
  TORCH_CHECK(records.scalar_type() == at::kByte && records.dim() == 3 && records.stride(2) == 1,
              "records: expected uint8 [num_blocks, block_size, C] with contiguous slots");
  const int64_t T = key.size(0);
  if (T == 0) return;
  const int H = ly.H, D = ly.D, W = H * D;
  const int key_m = core_order(key_core, ly.key_rot, "key_core");
  const int value_m = ly.value_rot ? core_order(value_core, ly.D, "value_core") : 1;
  const at::Tensor k32 = key.to(at::kFloat).contiguous().view({T, W});
  const at::Tensor v32 = value.to(at::kFloat).contiguous().view({T, W});
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  at::Tensor pos;
  if (positions.has_value()) pos = positions->to(at::kLong).contiguous();
  at::Tensor cos32, sin32, perm64, mean32;
  const bool rope = rope_cos.has_value();
  if (rope) {
    cos32 = rope_cos->to(at::kFloat).contiguous();
    sin32 = rope_sin->to(at::kFloat).contiguous();
  }
  if (key_perm.has_value()) perm64 = key_perm->to(at::kLong).contiguous();
  if (key_mean.has_value()) mean32 = key_mean->to(at::kFloat).contiguous();
  const bool has_sinks = sinks.has_value() && ly.sink_tokens > 0;
  const int n_ring = ly.ring_slots();
  TORCH_CHECK(!(rope || has_sinks) || pos.defined(), "positions: needed for RoPE and sinks");
  TORCH_CHECK(n_ring == 0 || (sinks.has_value() && sinks->dim() == 5 && sinks->size(1) == ly.sink_tokens + n_ring),
              "sinks: recent_window=", ly.recent_window, " needs the full-precision area [num_blocks, S + R - 1, 2, H, D]");

  const float* kp = k32.data_ptr<float>();
  const float* vp = v32.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = pos.defined() ? pos.data_ptr<int64_t>() : nullptr;
  const float* cp = rope ? cos32.data_ptr<float>() : nullptr;
  const float* snp = rope ? sin32.data_ptr<float>() : nullptr;
  const int64_t rs = rope ? cos32.stride(0) : 0;
  const int64_t* perm = perm64.defined() ? perm64.data_ptr<int64_t>() : nullptr;
  const float* mean = mean32.defined() ? mean32.data_ptr<float>() : nullptr;
  uint8_t* rec = records.data_ptr<uint8_t>();
  const int64_t bs = records.size(1), s0 = records.stride(0), s1 = records.stride(1);
  const float kclip = static_cast<float>(key_clip), vclip = static_cast<float>(value_clip);
  TORCH_CHECK(key.dim() == 3 && value.dim() == 3 && key.size(1) == H && key.size(2) == D && value.size(1) == H &&
                  value.size(2) == D,
              "key/value: expected [T, ", H, ", ", D, "]");
  TORCH_CHECK(slots.size(0) == T && v32.size(0) == T && (!pp || pos.size(0) == T),
              "slot_mapping/value/positions: expected ", T, " tokens like key");
  // bounds of what the tokens index (a bad slot or position would write or read outside the cache / tables)
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(sp[t] < records.size(0) * bs, "slot_mapping[", t, "]=", sp[t], " is past the cache's ",
                records.size(0) * bs, " slots");
    if (sp[t] < 0) continue;
    TORCH_CHECK(!pp || pp[t] >= 0, "positions[", t, "]=", pp[t], " is negative");
    TORCH_CHECK(!rope || pp[t] < cos32.size(0), "positions[", t, "]=", pp[t], ": the RoPE tables have ",
                cos32.size(0), " rows");
  }
  // the ISA tiles' core product is the transpose (the attention's inverse): give them the transposed cores
  const at::Tensor kcore_t = key_core.t().contiguous(), vcore_t = value_core.t().contiguous();
  WriteParams wp{};
  wp.H = H;
  wp.D = D;
  wp.fp8 = ly.fp8;
  wp.key = kp;
  wp.value = vp;
  wp.slots = sp;
  wp.positions = pp;
  wp.rope_cos = cp;
  wp.rope_sin = snp;
  wp.rope_stride = rs;
  wp.key_mean = mean;
  wp.key_enc.rot = ly.key_rot;
  wp.key_enc.m = key_m;
  wp.key_enc.core_t = kcore_t.data_ptr<float>();
  wp.key_enc.perm = perm;
  wp.key_enc.bits = ly.key_bits;
  wp.key_enc.group = ly.key_group;
  wp.key_enc.clip = kclip;
  wp.key_enc.offset = 0;
  wp.value_enc.rot = ly.value_rot ? D : 1;
  wp.value_enc.m = ly.value_rot ? value_m : 1;
  wp.value_enc.core_t = vcore_t.data_ptr<float>();
  wp.value_enc.bits = ly.value_bits;
  wp.value_enc.group = ly.value_group;
  wp.value_enc.clip = vclip;
  wp.value_enc.offset = ly.key_bytes;
  wp.records = rec;
  wp.page_stride = s0;
  wp.slot_bytes = s1;
  wp.block_size = bs;
  // the tokens that write (padding slots are -1), in tiles of the ISA's lanes
  std::vector<int64_t> toks;
  toks.reserve(T);
  for (int64_t t = 0; t < T; ++t)
    if (sp[t] >= 0) toks.push_back(t);
  const int lanes = run_isa == kAvx512 ? avx512::lanes() : run_isa == kAvx2 ? avx2::lanes() : scalar::lanes();
  auto write_tile = run_isa == kAvx512 ? &avx512::write_tokens
                    : run_isa == kAvx2 ? &avx2::write_tokens
                                       : &scalar::write_tokens;
  const int64_t n_tok = static_cast<int64_t>(toks.size());
  const int64_t n_tiles = (n_tok + lanes - 1) / lanes;
  const at::ScalarType fp_dt = has_sinks || n_ring > 0 ? sinks->scalar_type() : at::kFloat;
  at::parallel_for(0, n_tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t ti = b; ti < e; ++ti) {
      const int64_t lo = ti * lanes, n = std::min<int64_t>(lanes, n_tok - lo);
      write_tile(wp, toks.data() + lo, static_cast<int>(n));
      // the sink area (positions < S), and the ring slot S + off % n unless a later token of this step in the
      // same page takes it (rotkv_paged.ring_write_mask: that token is t + n at slot + n)
      for (int64_t j = lo; j < lo + n; ++j) {
        const int64_t t = toks[j], slot = sp[t], blk = slot / bs, off = slot % bs;
        const bool sink = has_sinks && pp[t] >= 0 && pp[t] < ly.sink_tokens;
        const bool ring = n_ring > 0 && !(t + n_ring < T && sp[t + n_ring] == slot + n_ring && off + n_ring < bs);
        for (int64_t fp_slot : {sink ? pp[t] : int64_t{-1}, ring ? ly.sink_tokens + off % n_ring : int64_t{-1}}) {
          if (fp_slot < 0) continue;
          const at::Tensor& sk = *sinks;
          const int64_t base = blk * sk.stride(0) + fp_slot * sk.stride(1);
          const float* k = kp + t * W;
          const float* v = vp + t * W;
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fp_dt, "paged_write_cpu_fp", [&] {
            scalar_t* d = sk.data_ptr<scalar_t>();
            const int64_t st2 = sk.stride(2), st3 = sk.stride(3), st4 = sk.stride(4);
            for (int h = 0; h < H; ++h)
              for (int i = 0; i < D; ++i) {
                const int64_t o = base + h * st3 + i * st4;
                d[o] = static_cast<scalar_t>(k[h * D + i]);
                d[o + st2] = static_cast<scalar_t>(v[h * D + i]);
              }
          });
        }
      }
    }
  });
}

// ---- the recent window's positions before a step, from the rings ------------------------------------------

// rotkv_paged.recent_prev_ref: entry j of request r is position p = p0 - n + j (p0 = seq_lens[r] - q_len[r]), read
// from ring slot S + (p % bs) % n of its page; zeros where p < 0; with `before`, the positions in the page of p0
// come from it (the step's own ring writes may have replaced them).
at::Tensor ring_prev_cpu(const at::Tensor& sinks, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         const at::Tensor& query_start_loc, int64_t sink_tokens, int64_t ring_slots, int64_t block_size,
                         const std::optional<at::Tensor>& before) {
  TORCH_CHECK(sinks.dim() == 5 && sinks.size(1) == sink_tokens + ring_slots && ring_slots > 0,
              "sinks: expected [num_blocks, S + R - 1, 2, H, D] with R > 1");
  TORCH_CHECK(sinks.stride(4) == 1 && sinks.stride(3) == sinks.size(4) && sinks.stride(2) == sinks.size(3) * sinks.size(4),
              "sinks: each slot's [2, H, D] must be contiguous");
  TORCH_CHECK(block_size > 0, "block_size=", block_size);
  const at::Tensor qsl = query_start_loc.to(at::kLong).contiguous();
  const at::Tensor seq = seq_lens.to(at::kLong).contiguous();
  const at::Tensor bt = block_tables.to(at::kLong).contiguous();
  const int64_t R = seq.size(0), n = ring_slots, H = sinks.size(3), D = sinks.size(4);
  TORCH_CHECK(qsl.size(0) == R + 1 && bt.dim() == 2 && bt.size(0) >= R, "block_tables/query_start_loc: ", R,
              " requests");
  at::Tensor out = at::zeros({R, n, 2, H, D}, sinks.options());
  if (R == 0) return out;
  at::Tensor bef;
  if (before.has_value()) {
    bef = before->contiguous();
    TORCH_CHECK(bef.sizes() == out.sizes() && bef.scalar_type() == out.scalar_type(),
                "before: expected the result of a previous call for the same step");
  }
  const int64_t* qslp = qsl.data_ptr<int64_t>();
  const int64_t* seqp = seq.data_ptr<int64_t>();
  const int64_t* btp = bt.data_ptr<int64_t>();
  const int64_t bw = bt.size(1), esz = sinks.element_size(), row = 2 * H * D * esz;
  const char* src = static_cast<const char*>(sinks.data_ptr());
  const char* bsrc = bef.defined() ? static_cast<const char*>(bef.data_ptr()) : nullptr;
  char* dst = static_cast<char*>(out.data_ptr());
  for (int64_t r = 0; r < R; ++r) {
    const int64_t p0 = seqp[r] - (qslp[r + 1] - qslp[r]);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t p = p0 - n + j;
      if (p < 0) continue;
      char* d = dst + (r * n + j) * row;
      if (bsrc && p / block_size == p0 / block_size) {
        std::memcpy(d, bsrc + (r * n + j) * row, row);
        continue;
      }
      const int64_t bi = p / block_size;
      TORCH_CHECK(bi < bw, "request ", r, ": position ", p, " is past its block table");
      const int64_t blk = btp[r * bw + bi];
      std::memcpy(d, src + (blk * sinks.stride(0) + (sink_tokens + (p % block_size) % n) * sinks.stride(1)) * esz,
                  row);
    }
  }
  return out;
}

}  // namespace
}  // namespace rotkv_cpu

TORCH_LIBRARY_FRAGMENT(rotkv, m) {
  m.def(
      "paged_attention_cpu(Tensor query, Tensor records, Tensor block_tables, Tensor seq_lens, "
      "Tensor query_start_loc, Tensor? sinks, Tensor? rope_cos, Tensor? rope_sin, Tensor? key_perm, "
      "Tensor? key_mean, Tensor key_core, Tensor value_core, int[] layout, float scale, int num_splits, "
      "int isa, Tensor(a!) out, Tensor? recent_key=None, Tensor? recent_value=None, Tensor? recent_prev=None) -> ()");
  m.def(
      "paged_write_cpu(Tensor key, Tensor value, Tensor slot_mapping, Tensor(a!) records, Tensor? positions, "
      "Tensor(b!)? sinks, Tensor? rope_cos, Tensor? rope_sin, Tensor? key_perm, Tensor? key_mean, "
      "Tensor key_core, Tensor value_core, int[] layout, float key_clip, float value_clip, int isa=0) -> ()");
  m.def(
      "ring_prev_cpu(Tensor sinks, Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, int sink_tokens, "
      "int ring_slots, int block_size, Tensor? before=None) -> Tensor");
  m.def("paged_cpu_isa(int isa) -> int", &rotkv_cpu::paged_cpu_isa);
}

TORCH_LIBRARY_IMPL(rotkv, CPU, m) {
  m.impl("paged_attention_cpu", &rotkv_cpu::paged_attention_cpu);
  m.impl("paged_write_cpu", &rotkv_cpu::paged_write_cpu);
  m.impl("ring_prev_cpu", &rotkv_cpu::ring_prev_cpu);
}
