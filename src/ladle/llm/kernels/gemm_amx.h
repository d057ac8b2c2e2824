/* gemm.c's bfloat16 path on AMX (Intel Sapphire Rapids and later; included by gemm.c where -march=native has
 * AMX-BF16): each 64-column tile's rows go 16 (or 32) at a time through the tile registers, at every row count.
 *
 * Why: vdpbf16ps (gemm_avx512.h) ran a step's GEMMs at ~200 GFLOP/s on two cores whatever the row count, so a batch of
 * decode rows or a prefill was bound by it; TDPBF16PS multiplies a 16 x 32 block of x by a 32 x 16 block of weights in
 * one instruction. Measured over a step's layers (benchmarks/RESULTS.md): 0.36x the time at 32 rows, ~0.15x at 512;
 * and at 1-8 rows, where both stream the weights from DRAM, 0.65-0.89x too, so AMX takes every bfloat16 call. The
 * packed bfloat16 tiles are already AMX's B layout: a tile's k-pair row holds TILE columns x 2 values (256 bytes), so
 * the 16 columns of one B register are 64 bytes at a 256-byte stride — no repacking, the same weights as elsewhere.
 *
 * Registers: tmm0-3 accumulate 16 rows x 64 columns (the whole tile, so SwiGLU's gate and up halves meet in one
 * epilogue), tmm4 holds x's 16 x 32 block, tmm5-7 the weight blocks in turn. Under 16 rows those five registers are
 * configured with M rows; above, a last partial block of rows comes from a zero-padded copy (a tile load reads as many
 * rows as configured). K must be a multiple of 32 (callers fall back otherwise).
 * Tried and not kept: prefetching the next tile into L2 during a tile's later row blocks (1.07-1.08x the time at 24-32
 * rows).
 */
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_ROWS 16
/* rows from which a tile's rows go 32 at a time (amx_tile_rows32): 0.89-0.91x the time at 192-1024 rows, 0.97x at
 * 128, but 1.07-1.12x at 32-64 rows, where the tile's first pass streams from DRAM (benchmarks/RESULTS.md) */
#define AMX_PAIRED_FROM 128
#define AMX_K 32 /* bfloat16 values of k per tile multiply */
/* Up to 16 rows a tile is one pass over its weights, straight from DRAM: prefetching them 8 KB (two k steps) ahead into
 * L1 measured 0.95-0.96x the step's GEMM time at 1-16 rows (4 KB: 0.97-1.0x, 12 KB: as 8, into L2: no gain); with
 * more rows it cost 1.03x at 32 (the later row blocks read the tile from L2 meanwhile) */
#define AMX_STREAM_AHEAD 8192

/* Linux hands out the AMX register state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, once per process) */
static int amx_permitted(void) {
    static const int permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return permitted;
}

/* LADLE_AMX=0 keeps the vdpbf16ps kernels (for comparison), read at the first call; gemm_use_amx() sets it (a
 * benchmark alternating both in one process) */
static int amx_mode = -1; /* -1: not read yet; atomic loads and stores (calls may come from several threads) */

static int amx_wanted(void) {
    int mode = __atomic_load_n(&amx_mode, __ATOMIC_RELAXED);
    if (mode < 0) {
        mode = !(getenv("LADLE_AMX") && strcmp(getenv("LADLE_AMX"), "0") == 0);
        __atomic_store_n(&amx_mode, mode, __ATOMIC_RELAXED);
    }
    return mode;
}

static void amx_set(int on) { __atomic_store_n(&amx_mode, on, __ATOMIC_RELAXED); }

static int amx_runs(int bf16, int64_t k_len) {
    return bf16 && k_len % AMX_K == 0 && amx_wanted() && amx_permitted();
}

/* The tile configuration (palette 1): all eight registers 64 bytes wide; the accumulators (tmm0-3) and x's register
 * (tmm4) `rows` rows, the weights' (tmm5-7) 16. Per thread: each thread that runs tiles loads it (oneDNN's AMX kernels
 * in the same threads configure their own). */
static void amx_configure(int rows) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = i < 5 ? rows : AMX_ROWS;
    }
    _tile_loadconfig(&cfg);
}

/* acc[16][TILE] = 16 rows of x (bfloat16, `lda` bytes apart) times one packed tile `w` ([K/2][TILE][2]). `ahead`:
 * prefetch the weight stream that many bytes ahead into L1 (0: none) */
static void amx_tile_rows(const uint16_t *x, int64_t lda, const uint16_t *w, int64_t k_len, float acc[][TILE],
                          int64_t ahead) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int64_t w_stride = TILE * 2 * 2; /* bytes per k-pair row */
    for (int64_t k = 0; k < k_len; k += AMX_K) {
        const char *wk = (const char *)(w + k * TILE); /* k-pair row k / 2 */
        if (ahead) /* this step's 4 KB, `ahead` bytes on (past the tile: the next tile; a prefetch never faults) */
            for (int64_t line = 0; line < AMX_K / 2 * w_stride; line += 64)
                _mm_prefetch(wk + ahead + line, _MM_HINT_T0);
        _tile_loadd(4, x + k, lda);
        _tile_loadd(5, wk, w_stride);
        _tile_loadd(6, wk + 64, w_stride);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(7, wk + 128, w_stride);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, wk + 192, w_stride);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, acc[0], TILE * sizeof(float));
    _tile_stored(1, acc[0] + 16, TILE * sizeof(float));
    _tile_stored(2, acc[0] + 32, TILE * sizeof(float));
    _tile_stored(3, acc[0] + 48, TILE * sizeof(float));
}

/* acc[32][TILE] = 32 rows of x times one packed tile: two 16-row blocks of x share each weight block (two passes of
 * 32 columns), so the weights are loaded half as often per multiply */
static void amx_tile_rows32(const uint16_t *x, int64_t lda, const uint16_t *w, int64_t k_len, float acc[][TILE]) {
    const int64_t w_stride = TILE * 2 * 2;
    const char *x1 = (const char *)x + 16 * lda;
    for (int h = 0; h < 2; h++) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = 0; k < k_len; k += AMX_K) {
            const char *wk = (const char *)(w + k * TILE) + h * 128;
            _tile_loadd(4, x + k, lda);
            _tile_loadd(6, wk, w_stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(7, wk + 64, w_stride);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(5, x1 + k * 2, lda);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, acc[0] + h * 32, TILE * sizeof(float));
        _tile_stored(1, acc[0] + h * 32 + 16, TILE * sizeof(float));
        _tile_stored(2, acc[16] + h * 32, TILE * sizeof(float));
        _tile_stored(3, acc[16] + h * 32 + 16, TILE * sizeof(float));
    }
}

/* What gemm_amx's tiles share: the padded copy of a last partial row block, the weight prefetch distance */
struct amx_ctx {
    const uint16_t *padded;
    int64_t ahead;
    int small;
};

/* tile_fn on AMX (under AMX_PAIRED_FROM rows, see gemm_amx): tile t's rows over k [k0, k0 + k_len), 16 at a time
 * (under 16 rows all at once, a last partial block from the padded copy) */
static void amx_tile(const struct gemm_job *j, void *ctx, int64_t t, int64_t k0, int64_t k_len, float *sum) {
    const struct amx_ctx *c = (const struct amx_ctx *)ctx;
    float acc[AMX_ROWS][TILE] __attribute__((aligned(64)));
    const uint16_t *wt = (const uint16_t *)((const char *)j->w + t * j->tile_bytes) + k0 * TILE;
    for (int64_t m0 = 0; m0 < j->m_len; m0 += AMX_ROWS) {
        const int rows = j->m_len - m0 < AMX_ROWS ? (int)(j->m_len - m0) : AMX_ROWS;
        if (rows == AMX_ROWS || c->small)
            amx_tile_rows((const uint16_t *)(j->x + (m0 * j->x_ld + k0) * 2), j->x_ld * 2, wt, k_len, acc, c->ahead);
        else
            amx_tile_rows(c->padded + k0, j->k_len * 2, wt, k_len, acc, c->ahead);
        if (sum)
            memcpy(sum + m0 * TILE, acc, sizeof(float) * TILE * rows);
        else
            tile_epilogue(j, t, acc, rows, m0);
    }
}

/* gemm_run on AMX (amx_runs() said yes). Under AMX_PAIRED_FROM rows each thread runs its share through amx_tile
 * (run_share: balanced where the tiles do not divide over the threads); from there every thread takes whole tiles,
 * 32 rows at a time through amx_tile_rows32 and the last rows 16 at a time. Returns 2 when out of memory. */
static int gemm_amx(const struct gemm_job *j, int threads) {
    if (j->m_len == 0) return 0; /* (a zero-row tile configuration is invalid) */
    const int64_t full = j->m_len / AMX_ROWS * AMX_ROWS, tail = j->m_len - full;
    /* under 16 rows the accumulators and x's register have M rows (configured so): no padded copy, and the tile
     * multiplies cost M rows (0.92-0.95x the step's GEMM time at 1-8 rows) */
    const int small = j->m_len < AMX_ROWS;
    uint16_t *padded = NULL;
    if (tail && !small) {
        padded = (uint16_t *)calloc((size_t)AMX_ROWS * j->k_len, sizeof(uint16_t));
        if (!padded) return 2;
        for (int64_t m = 0; m < tail; m++)
            memcpy(padded + m * j->k_len, j->x + (full + m) * j->x_ld * 2, (size_t)j->k_len * 2);
    }
    const struct amx_ctx ctx = {padded, j->m_len <= AMX_ROWS ? AMX_STREAM_AHEAD : 0, small};
    if (j->m_len < AMX_PAIRED_FROM) {
        struct pieces pieces;
        const int balance = balanced(j, threads);
        if (balance && !pieces_alloc(&pieces, j, threads)) {
            free(padded);
            return 2;
        }
#pragma omp parallel num_threads(threads)
        {
            amx_configure(small ? (int)j->m_len : AMX_ROWS);
            run_share(j, balance ? &pieces : NULL, amx_tile, (void *)&ctx);
            _tile_release();
        }
        if (balance) pieces_free(&pieces);
        free(padded);
        return 0;
    }
    /* (whole tiles here, not balanced: at these rows the 32-row kernel's speed depends on code layout — this loop ran
     * 1.08x slower in one build only because a second copy of the kernel appeared in the file, 1.00x in another —
     * so it keeps its one copy, unchanged) */
#pragma omp parallel num_threads(threads)
    {
        amx_configure(AMX_ROWS);
        float acc[2 * AMX_ROWS][TILE] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < j->tiles; t++) {
            const uint16_t *wt = (const uint16_t *)((const char *)j->w + t * j->tile_bytes);
            int64_t m0 = 0;
            for (; m0 + 2 * AMX_ROWS <= j->m_len; m0 += 2 * AMX_ROWS) {
                amx_tile_rows32((const uint16_t *)(j->x + m0 * j->x_ld * 2), j->x_ld * 2, wt, j->k_len, acc);
                tile_epilogue(j, t, acc, 2 * AMX_ROWS, m0);
            }
            for (; m0 < j->m_len; m0 += AMX_ROWS) {
                const int rows = j->m_len - m0 < AMX_ROWS ? (int)(j->m_len - m0) : AMX_ROWS;
                amx_tile_rows(rows == AMX_ROWS ? (const uint16_t *)(j->x + m0 * j->x_ld * 2) : padded,
                              rows == AMX_ROWS ? j->x_ld * 2 : j->k_len * 2, wt, j->k_len, acc, 0);
                tile_epilogue(j, t, acc, rows, m0);
            }
        }
        _tile_release();
    }
    free(padded);
    return 0;
}
