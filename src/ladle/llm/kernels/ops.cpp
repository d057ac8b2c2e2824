/* ladle's torch operators (C++, registered with torch's dispatcher): what a step calls once per layer costs one
 * dispatch (~3 us), not a Python call. Built at first use by kernels/build.py against the installed torch's headers
 * and cached like the C kernels.
 *
 * ladle::paged_attention(q, k, v, k_cache, v_cache, meta, scale) -> out
 *   A whole step's attention for one layer: the new tokens' keys/values written to their cache slots, every
 *   one-token (decode) sequence attended in place through its block table (paged_decode.c's kernel), every
 *   multi-token span (prefill chunk, draft verification) through SDPA over its own k/v or its cached context.
 *   q [T, heads, D], k/v [T, kv_heads, D] (last dim contiguous); caches [kv_heads, num_blocks, block_size, D]
 *   contiguous, float32, bfloat16, float16, float8_e4m3fn or float8_e5m2 (may be narrower than q: --kv-cache-dtype;
 *   new rows are then rounded into the cache — an 8-bit float saturating at its largest finite value, as vLLM's
 *   conversion does — and cached context widened back for SDPA); out [T, heads * D] in q's dtype. `meta` is the
 *   step's int64 description (attention.py, pack_step), shared by every layer:
 *     [seqs, decodes, max_blocks, max_decode_len, tokens,
 *      query_start[seqs + 1], context[seqs], tables[seqs * max_blocks], slots[tokens]]
 *   Sequences [0, decodes) are the one-token ones (rows [0, decodes)); context = tokens in the cache after the step.
 *   The op writes the caches without declaring it in its schema: nothing else in a graph reads them, and declared
 *   mutation would make inductor functionalize (copy) a whole cache per layer.
 *
 * ladle::tiled_linear(x, weight, bias, other, n_out, kind) -> out
 *   x [..., K] @ W^T through gemm.c, W packed in tiles of gemm_tile() columns (models/linear.py: TiledLinear), bias float32 in
 *   packed column order; kind 0: plain, 1: + other ([..., n_out]), 2: SwiGLU (silu(gate) * up). out [..., n_out].
 * ladle::tiled_linear_q8(x, weight, scales, bias, other, n_out, kind) -> out
 *   As tiled_linear over int8 weights packed the same way, column c scaled by scales[c] (float32, packed order).
 * ladle::tiled_linear_q4(x, weight, scales, zeros, group, bias, other, n_out, kind) -> out
 *   As tiled_linear over int4 codes (gemm.c gemm_q4): w = (q - 8) * scale + zero per group of inputs.
 * ladle::gemm_q8_available() -> bool: whether this build runs int8 and int4 weights (the AVX2 kernels).
 * ladle::gemm_tile() -> int: the output columns per packed tile in this build (64 on AVX-512, 16 on AVX2).
 * ladle::gemm_available(bool bf16) -> bool: whether this build's gemm.c runs that dtype (AVX-512 / AVX-512-BF16 /
 *   AVX2 + FMA).
 * ladle::gemm_amx() -> bool: whether bfloat16 layers run on AMX tiles here (gemm_amx.h: an AMX build, and Linux
 *   granted the process the tile registers, and neither LADLE_AMX=0 nor gemm_use_amx(False) turned it off).
 * ladle::gemm_use_amx(bool on) -> bool: AMX on or off for later calls (benchmarks); returns gemm_amx().
 */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>
#include <cmath>

extern "C" {
#include "gemm.c"
#include "paged_decode.c"
}

namespace {

struct StepMeta {
    int64_t seqs, decodes, max_blocks, max_decode_len, tokens;
    const int64_t *query_start, *context, *tables, *slots;
};

StepMeta parse(const at::Tensor& meta) {
    TORCH_CHECK(meta.scalar_type() == at::kLong && meta.is_contiguous() && meta.numel() >= 5,
                "paged_attention: meta must be a contiguous int64 tensor");
    const int64_t* p = meta.data_ptr<int64_t>();
    StepMeta m{p[0], p[1], p[2], p[3], p[4], nullptr, nullptr, nullptr, nullptr};
    TORCH_CHECK(m.seqs >= 0 && m.decodes >= 0 && m.decodes <= m.seqs && m.max_blocks >= 0 && m.tokens >= 0,
                "paged_attention: malformed meta header");
    TORCH_CHECK(meta.numel() == 5 + (m.seqs + 1) + m.seqs + m.seqs * m.max_blocks + m.tokens,
                "paged_attention: meta length does not match its header");
    m.query_start = p + 5;
    m.context = m.query_start + m.seqs + 1;
    m.tables = m.context + m.seqs;
    m.slots = m.tables + m.seqs * m.max_blocks;
    return m;
}

/* Every sequence's rows, context and used blocks inside the tensors and the cache: the kernels index with them. */
void check(const StepMeta& m, int64_t num_blocks, int64_t block_size) {
    TORCH_CHECK(m.query_start[0] == 0 && m.query_start[m.seqs] == m.tokens, "paged_attention: rows do not add up");
    for (int64_t s = 0; s < m.seqs; s++) {
        const int64_t n = m.query_start[s + 1] - m.query_start[s], context = m.context[s];
        TORCH_CHECK(n >= 1 && (s >= m.decodes || n == 1) && context >= n &&
                        context <= m.max_blocks * block_size && (s >= m.decodes || context <= m.max_decode_len),
                    "paged_attention: sequence ", s, " has ", n, " rows and a context of ", context);
        for (int64_t b = 0; b < (context + block_size - 1) / block_size; b++) {
            const int64_t block = m.tables[s * m.max_blocks + b];
            TORCH_CHECK(block >= 0 && block < num_blocks, "paged_attention: block ", block, " outside the cache");
        }
    }
}

/* x as an 8-bit float (e4m3fn, else e5m2): torch's own conversion (round to nearest even) of x clamped to the type's
 * largest finite value — what attention.py's write_kv stores (std::clamp keeps NaN a NaN) */
inline uint8_t to_fp8(float x, bool e4m3) {
    return e4m3 ? c10::Float8_e4m3fn(std::clamp(x, -448.0f, 448.0f)).x
                : c10::Float8_e5m2(std::clamp(x, -57344.0f, 57344.0f)).x;
}

/* The step's rows (float32 or bfloat16; others are widened first) into an 8-bit cache: cache[h, slot] =
 * to_fp8(rows[t, h]), converted here rather than as a clamp and a conversion over the step's rows (no temporary
 * tensors per layer), tokens split over the threads (a long prefill chunk converts ~1 M values a layer) */
void write_fp8(const at::Tensor& new_rows, const at::Tensor& cache, const StepMeta& m) {
    const at::ScalarType from = new_rows.scalar_type();
    const at::Tensor rows = from == at::kFloat || from == at::kBFloat16 ? new_rows : new_rows.to(at::kFloat);
    const bool e4m3 = cache.scalar_type() == at::kFloat8_e4m3fn, bf16 = rows.scalar_type() == at::kBFloat16;
    const int64_t kv_heads = cache.size(0), per_head = cache.size(1) * cache.size(2), dim = cache.size(3);
    for (int64_t t = 0; t < m.tokens; t++)  // (checked before the threads: an error cannot leave a worker)
        TORCH_CHECK(m.slots[t] >= 0 && m.slots[t] < per_head, "paged_attention: slot ", m.slots[t],
                    " outside the cache");
    uint8_t* dst = static_cast<uint8_t*>(cache.data_ptr());
    at::parallel_for(0, m.tokens, 64, [&](int64_t first, int64_t last) {
        for (int64_t t = first; t < last; t++) {
            for (int64_t h = 0; h < kv_heads; h++) {
                uint8_t* out = dst + (h * per_head + m.slots[t]) * dim;
                const int64_t at = t * rows.stride(0) + h * rows.stride(1);
                if (bf16) {
                    const uint16_t* in = static_cast<const uint16_t*>(rows.data_ptr()) + at;
                    for (int64_t d = 0; d < dim; d++) out[d] = to_fp8(bf16_to_f32(in[d]), e4m3);
                } else {
                    const float* in = rows.data_ptr<float>() + at;
                    for (int64_t d = 0; d < dim; d++) out[d] = to_fp8(in[d], e4m3);
                }
            }
        }
    });
}

/* cache[h, slot] = rows[t, h] for every new token t (slot = block * block_size + offset). */
void write_kv(const at::Tensor& new_rows, const at::Tensor& cache, const StepMeta& m) {
    TORCH_CHECK(new_rows.dim() == 3 && new_rows.stride(2) == 1,
                "paged_attention: new k/v must be [T, kv_heads, D], last dim contiguous");
    const at::ScalarType kind = cache.scalar_type(), from = new_rows.scalar_type();
    if (kind == at::kFloat8_e4m3fn || kind == at::kFloat8_e5m2) return write_fp8(new_rows, cache, m);
    // a cache narrower than the model (--kv-cache-dtype) stores the step's rows rounded to its dtype
    const at::Tensor rows = from == kind ? new_rows : new_rows.to(kind);
    TORCH_CHECK(rows.dim() == 3 && rows.stride(2) == 1,
                "paged_attention: new k/v must be [T, kv_heads, D], last dim contiguous");
    const int64_t kv_heads = cache.size(0), per_head = cache.size(1) * cache.size(2), dim = cache.size(3);
    const size_t elem = cache.element_size(), row_bytes = dim * elem;
    char* dst = static_cast<char*>(cache.data_ptr());
    const char* src = static_cast<const char*>(rows.data_ptr());
    for (int64_t t = 0; t < m.tokens; t++) {
        const int64_t slot = m.slots[t];
        TORCH_CHECK(slot >= 0 && slot < per_head, "paged_attention: slot ", slot, " outside the cache");
        for (int64_t h = 0; h < kv_heads; h++) {
            std::memcpy(dst + (h * per_head + slot) * row_bytes, src + (t * rows.stride(0) + h * rows.stride(1)) * elem,
                        row_bytes);
        }
    }
}

at::Tensor decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const StepMeta& m,
                  double scale) {
    const int64_t batch = m.decodes, heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(0);
    at::Tensor q32 = q.narrow(0, 0, batch).to(at::kFloat).contiguous();
    at::Tensor out = at::empty_like(q32);
    const int threads = at::get_num_threads();
    at::Tensor scratch = at::empty({threads * (heads / kv_heads) * m.max_decode_len}, q32.options());
    // one kernel per cache dtype (paged_decode.c), K/V as its elements (floats, 16-bit words or bytes); q is float32
    // in all of them
    const auto call = [&](auto kernel, const auto* k, const auto* v) {
        return kernel(q32.data_ptr<float>(), k, v, m.tables, m.context, out.data_ptr<float>(), batch, heads, kv_heads,
                      dim, k_cache.size(1), k_cache.size(2), m.max_blocks, scale, threads, scratch.data_ptr<float>(),
                      m.max_decode_len);
    };
    const auto words = [](const at::Tensor& t) { return static_cast<const uint16_t*>(t.data_ptr()); };
    const auto bytes = [](const at::Tensor& t) { return static_cast<const uint8_t*>(t.data_ptr()); };
    const at::ScalarType kv = k_cache.scalar_type();
    const int failed =
        kv == at::kFloat           ? call(paged_decode_f32, k_cache.data_ptr<float>(), v_cache.data_ptr<float>())
        : kv == at::kBFloat16      ? call(paged_decode_bf16, words(k_cache), words(v_cache))
        : kv == at::kHalf          ? call(paged_decode_f16, words(k_cache), words(v_cache))
        : kv == at::kFloat8_e4m3fn ? call(paged_decode_e4m3, bytes(k_cache), bytes(v_cache))
                                   : call(paged_decode_e5m2, bytes(k_cache), bytes(v_cache));
    TORCH_CHECK(!failed, "paged_attention: unsupported shape (heads ", heads, ", kv heads ", kv_heads, ", head_dim ",
                dim, ")");
    return out.view({batch, heads * dim}).to(q.scalar_type());
}

/* A span's cached context as [1, kv_heads, tokens, D]: a view when its blocks are consecutive (the pool hands them
 * out in order), else a gather of its blocks. */
at::Tensor context_of(const at::Tensor& cache, const int64_t* table, int64_t tokens) {
    const int64_t block_size = cache.size(2), blocks = (tokens + block_size - 1) / block_size;
    bool consecutive = true;
    for (int64_t i = 1; i < blocks && consecutive; i++) consecutive = table[i] == table[0] + i;
    at::Tensor gathered;
    if (consecutive) {
        gathered = cache.narrow(1, table[0], blocks);
    } else {
        at::Tensor ids = at::from_blob(const_cast<int64_t*>(table), {blocks}, at::TensorOptions().dtype(at::kLong));
        gathered = cache.index_select(1, ids);
    }
    return gathered.reshape({cache.size(0), blocks * block_size, cache.size(3)}).narrow(1, 0, tokens).unsqueeze(0);
}

/* context_of in the queries' dtype (SDPA takes one dtype): a copy only where the cache is narrower than the model */
at::Tensor context_as(const at::Tensor& cache, const int64_t* table, int64_t tokens, at::ScalarType dtype) {
    at::Tensor context = context_of(cache, table, tokens);
    return context.scalar_type() == dtype ? context : context.to(dtype);
}

/* Rows [start, start + n) of one multi-token sequence whose context holds `context` tokens after this step. */
at::Tensor prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                   const at::Tensor& v_cache, const StepMeta& m, int64_t seq, double scale) {
    const int64_t start = m.query_start[seq], n = m.query_start[seq + 1] - start, context = m.context[seq];
    const int64_t start_pos = context - n;
    const bool gqa = q.size(1) != k.size(1);
    at::Tensor q_seq = q.narrow(0, start, n).transpose(0, 1).unsqueeze(0);  // 4-D: SDPA's fused CPU kernel
    at::Tensor out;
    if (start_pos == 0) {  // its own k/v are the whole context: top-left causal
        at::Tensor k_seq = k.narrow(0, start, n).transpose(0, 1).unsqueeze(0);
        at::Tensor v_seq = v.narrow(0, start, n).transpose(0, 1).unsqueeze(0);
        out = at::scaled_dot_product_attention(q_seq, k_seq, v_seq, {}, 0.0, true, scale, gqa);
    } else {  // a later chunk or a prefix-cache hit: read the context back, causal mask offset by start_pos
        const int64_t* table = m.tables + seq * m.max_blocks;
        at::Tensor k_seq = context_as(k_cache, table, context, q.scalar_type());
        at::Tensor v_seq = context_as(v_cache, table, context, q.scalar_type());
        // query i sits at position start_pos + i and sees keys [0, start_pos + i]
        at::Tensor bias = at::empty({n, context}, at::TensorOptions().dtype(at::kFloat));
        float* row = bias.data_ptr<float>();
        for (int64_t i = 0; i < n; i++, row += context) {
            for (int64_t j = 0; j < context; j++) row[j] = j <= start_pos + i ? 0.0f : -INFINITY;
        }
        bias = bias.to(q.scalar_type());
        out = at::scaled_dot_product_attention(q_seq, k_seq, v_seq, bias, 0.0, false, scale, gqa);
    }
    return out[0].transpose(0, 1).reshape({n, -1});
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& meta, double scale) {
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 && q.dim() == 3,
                "paged_attention: caches must be contiguous [kv_heads, num_blocks, block_size, D], q [T, heads, D]");
    const at::ScalarType kv = k_cache.scalar_type();
    TORCH_CHECK((kv == at::kFloat || kv == at::kBFloat16 || kv == at::kHalf || kv == at::kFloat8_e4m3fn ||
                 kv == at::kFloat8_e5m2) && v_cache.scalar_type() == kv,
                "paged_attention: float32, bfloat16, float16 or 8-bit float caches only, K and V alike");
    const StepMeta m = parse(meta);
    check(m, k_cache.size(1), k_cache.size(2));
    TORCH_CHECK(q.size(0) == m.tokens && k.size(0) == m.tokens && v.size(0) == m.tokens, "paged_attention: meta "
                "describes ", m.tokens, " tokens, q has ", q.size(0));
    TORCH_CHECK(k.sizes() == v.sizes() && k.size(1) == k_cache.size(0) && k.size(2) == k_cache.size(3) &&
                    q.size(2) == k_cache.size(3) && v_cache.sizes() == k_cache.sizes() && q.size(1) % k.size(1) == 0,
                "paged_attention: q/k/v and the caches disagree in heads or head size");
    write_kv(k, k_cache, m);
    write_kv(v, v_cache, m);
    if (m.decodes == m.seqs) return decode(q, k_cache, v_cache, m, scale);
    if (m.decodes == 0 && m.seqs == 1) return prefill(q, k, v, k_cache, v_cache, m, 0, scale);
    at::Tensor out = at::empty({m.tokens, q.size(1) * q.size(2)}, q.options());
    if (m.decodes) out.narrow(0, 0, m.decodes).copy_(decode(q, k_cache, v_cache, m, scale));
    for (int64_t seq = m.decodes; seq < m.seqs; seq++) {
        const int64_t start = m.query_start[seq], n = m.query_start[seq + 1] - start;
        out.narrow(0, start, n).copy_(prefill(q, k, v, k_cache, v_cache, m, seq, scale));
    }
    return out;
}

/* How a tiled weight is stored: x's dtype (no scales), int8 codes with column scales, or int4 codes with group
 * scales and zeros (bfloat16) */
struct Weights {
    const at::Tensor* scales = nullptr;
    const at::Tensor* zeros = nullptr;
    int64_t group = 0;
};

/* The packed weight's checks, per storage */
void check_weights(const at::Tensor& x, const at::Tensor& weight, const Weights& q, int64_t k, int64_t tiles) {
    if (q.zeros) {
        TORCH_CHECK(q.group > 0 && q.group % 32 == 0 && k % q.group == 0, "tiled_linear_q4: group ", q.group,
                    " must be a multiple of 32 dividing K = ", k);
        TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kByte && weight.numel() == tiles * TILE * k / 2,
                    "tiled_linear_q4: the weight is not packed uint8 [tiles, ", k / 2, ", ", TILE, "]");
        for (const at::Tensor* t : {q.scales, q.zeros})
            TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() &&
                            t->numel() == tiles * (k / q.group) * TILE,
                        "tiled_linear_q4: scales and zeros must be bfloat16 [tiles, ", k / q.group, ", ", TILE, "]");
        return;
    }
    const int64_t k_packed = q.scales ? k + (k & 1) : k; /* int8 tiles pad an odd K with a zero k */
    const auto w_type = q.scales ? at::kChar : x.scalar_type();
    TORCH_CHECK(weight.is_contiguous() && weight.numel() == tiles * TILE * k_packed && weight.scalar_type() == w_type,
                "tiled_linear: the weight is not a packed [tiles, ", k_packed, ", ", TILE, "] tensor of ",
                q.scales ? "int8" : "x's dtype");
    if (q.scales)
        TORCH_CHECK(q.scales->scalar_type() == at::kFloat && q.scales->is_contiguous() &&
                        q.scales->numel() == tiles * TILE,
                    "tiled_linear_q8: scales must be float32 [tiles * ", TILE, "]");
}

/* tiled_linear / _q8 / _q4: checks, then gemm.c's gemm, gemm_q8 or gemm_q4 */
at::Tensor run_tiled(const at::Tensor& x, const at::Tensor& weight, const Weights& q,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& other, int64_t n_out,
                     int64_t kind) {
    const int64_t k = x.size(-1), tiles = weight.size(0);
    check_weights(x, weight, q, k, tiles);
    TORCH_CHECK(kind >= EPI_NONE && kind <= EPI_SWIGLU && n_out <= tiles * (kind == EPI_SWIGLU ? TILE / 2 : TILE),
                "tiled_linear: bad kind or n_out");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                "tiled_linear: x must be float32 or bfloat16");
    at::Tensor rows = x.reshape({-1, k});
    if (rows.stride(1) != 1) rows = rows.contiguous();
    const int64_t m = rows.size(0);
    at::Tensor out = at::empty({m, n_out}, x.options());
    const float* bias_ptr = nullptr;
    if (bias) {
        TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == tiles * TILE,
                    "tiled_linear: bias must be float32 [tiles * ", TILE, "]");
        bias_ptr = bias->data_ptr<float>();
    }
    at::Tensor extra;
    if (kind == EPI_ADD) {
        TORCH_CHECK(other && other->scalar_type() == x.scalar_type(), "tiled_linear: kind 1 adds `other` of x's dtype");
        extra = other->reshape({m, n_out});
        if (extra.stride(1) != 1) extra = extra.contiguous();
    }
    const void* other_ptr = extra.defined() ? extra.data_ptr() : nullptr;
    const int64_t ldo = extra.defined() ? extra.stride(0) : 0;
    const int bf16 = x.scalar_type() == at::kBFloat16, threads = at::get_num_threads(), epi = static_cast<int>(kind);
    int failed;
    if (q.zeros)
        failed = gemm_q4(rows.data_ptr(), rows.stride(0), weight.data_ptr<uint8_t>(),
                         static_cast<const uint16_t*>(q.scales->data_ptr()),
                         static_cast<const uint16_t*>(q.zeros->data_ptr()), q.group, bias_ptr, other_ptr, ldo,
                         out.data_ptr(), n_out, m, k, tiles, n_out, epi, bf16, threads);
    else if (q.scales)
        failed = gemm_q8(rows.data_ptr(), rows.stride(0), weight.data_ptr<int8_t>(), q.scales->data_ptr<float>(),
                         bias_ptr, other_ptr, ldo, out.data_ptr(), n_out, m, k, tiles, n_out, epi, bf16, threads);
    else
        failed = gemm(rows.data_ptr(), rows.stride(0), weight.data_ptr(), bias_ptr, other_ptr, ldo, out.data_ptr(),
                      n_out, m, k, tiles, n_out, epi, bf16, threads);
    TORCH_CHECK(failed != 1, "tiled_linear: this build cannot run ", q.zeros ? "int4" : q.scales ? "int8" : "these",
                " weights with ", x.scalar_type(), " x");
    TORCH_CHECK(failed != 2, "tiled_linear: out of memory preparing ", m, " rows of x");
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = n_out;
    return out.view(shape);
}

at::Tensor tiled_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& other, int64_t n_out, int64_t kind) {
    return run_tiled(x, weight, Weights{}, bias, other, n_out, kind);
}

at::Tensor tiled_linear_q8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& other,
                           int64_t n_out, int64_t kind) {
    return run_tiled(x, weight, Weights{&scales}, bias, other, n_out, kind);
}

at::Tensor tiled_linear_q4(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t group, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& other, int64_t n_out, int64_t kind) {
    return run_tiled(x, weight, Weights{&scales, &zeros, group}, bias, other, n_out, kind);
}

bool available(bool bf16) { return gemm_available(bf16); }

int64_t tile() { return gemm_tile(); }

bool q8_available() { return gemm_q8_available(); }

bool amx() { return gemm_amx_available(); }

bool use_amx(bool on) { return gemm_use_amx(on); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(ladle, lib) {
    lib.def("tiled_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? other, int n_out, int kind) -> Tensor");
    lib.def("gemm_available(bool bf16) -> bool", &available);
    lib.def("gemm_tile() -> int", &tile);
    lib.def("tiled_linear_q8(Tensor x, Tensor weight, Tensor scales, Tensor? bias, Tensor? other, int n_out, "
            "int kind) -> Tensor");
    lib.def("gemm_q8_available() -> bool", &q8_available);
    lib.def("gemm_amx() -> bool", &amx);
    lib.def("gemm_use_amx(bool on) -> bool", &use_amx);
    lib.def("tiled_linear_q4(Tensor x, Tensor weight, Tensor scales, Tensor zeros, int group, Tensor? bias, "
            "Tensor? other, int n_out, int kind) -> Tensor");
    lib.def("paged_attention(Tensor q, Tensor k, Tensor v, Tensor k_cache, Tensor v_cache, Tensor meta, float scale) "
            "-> Tensor");
}

TORCH_LIBRARY_IMPL(ladle, CPU, lib) {
    lib.impl("paged_attention", &paged_attention);
    lib.impl("tiled_linear", &tiled_linear);
    lib.impl("tiled_linear_q8", &tiled_linear_q8);
    lib.impl("tiled_linear_q4", &tiled_linear_q4);
}
