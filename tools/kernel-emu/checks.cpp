// Checks of the kernels run through the CPU emulation (emu.h) against float64 (or exact)
// references written here: paged attention, CUDA-core and tensor-core kernels (decode and
// prefill over block tables, GQA, head slices, context partitions and their combine,
// contiguous rows), the fused log-prob forward
// and backward, SwiGLU forward and backward, the KV-cache writes with padding rows and the KV
// block copies, the row scatter-add, the elementwise kernels, RMSNorm
// (forward and backward) and the fused residual add + RMSNorm, and training attention (the tensor-core forward and
// every form of the backward, tensor-core and CUDA-core), and the emulation's own guarantees
// (the `emulator` group, tools/kernel-emu/selftest.cu). `checks pair-losses IN OUT`,
// `checks sample-rows IN OUT`, `checks sampling-exp IN OUT` and `checks adamw IN OUT` run the
// loss kernel, the sampling kernel, the sampling exponential and the AdamW update on inputs
// written by tests/kernel_emu.rs, which
// compares them with the Rust definitions. Built and run by
// tools/kernel-emu.sh; prints one line per check and exits non-zero if any fails. These checks
// run the kernels' own source, but not on a GPU: the GPU tests (tests/cuda_*.rs) stay the
// judges of the device.
#include <cstdarg>
#include <string>

#include "../../kernels/args.h"
#include "selftest.h"

dim3 blockDim;
dim3 gridDim;
thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
namespace ge_emu {
Block* block = nullptr;
Sequencer* sequencer = nullptr;
thread_local unsigned int thread_rank = 0;
thread_local std::vector<AsyncCopy> async_open;
thread_local std::vector<std::vector<AsyncCopy>> async_groups;
}  // namespace ge_emu

extern "C" {
void ge_paged_attention_d64(PagedAttentionArgs a);
void ge_paged_attention_d128(PagedAttentionArgs a);
void ge_paged_attention_tc_d64(PagedAttentionArgs a);
void ge_paged_attention_tc_d128(PagedAttentionArgs a);
void ge_paged_attention_combine(PagedCombineArgs a);
void ge_skinny_gemm(SkinnyGemmArgs a);
void ge_skinny_gemm_reduce(SkinnyGemmArgs a);
void ge_target_logprobs_bf16(TargetLogprobArgs a);
void ge_target_logprobs_bf16_v8(TargetLogprobArgs a);
void ge_target_logprobs_backward_bf16(LogprobBackwardArgs a);
void ge_target_logprobs_backward_bf16_v8(LogprobBackwardArgs a);
void ge_swiglu(SwigluArgs a);
void ge_write_kv_bf16(WriteKvArgs a);
void ge_copy_blocks_bf16(CopyBlocksArgs a);
void ge_scatter_add_rows_bf16(ScatterAddRowsArgs a);
void ge_scatter_add_rows_bf16_f32(ScatterAddRowsArgs a);
void ge_scatter_add_rows_f32(ScatterAddRowsArgs a);
void ge_scatter_add_rows_f32_bf16(ScatterAddRowsArgs a);
void ge_rms_norm(RmsNormArgs a);
void ge_rms_norm_backward_rows(RmsNormBackwardArgs a);
void ge_rms_norm_backward_weight(RmsNormBackwardArgs a);
void ge_column_partials_reduce(ColumnReduceArgs a);
void ge_bias_grad_bf16(BiasGradArgs a);
void ge_add_rms_norm(AddRmsNormArgs a);
void ge_add_assign_bf16(AddAssignArgs a);
void ge_add_assign_f32(AddAssignArgs a);
void ge_add_assign_f32_bf16(AddAssignArgs a);
void ge_scale_bf16(ScaleArgs a);
void ge_scale_f32(ScaleArgs a);
void ge_copy_columns_bf16(CopyColumnsArgs a);
void ge_copy_columns_f32(CopyColumnsArgs a);
void ge_gather_rows_bf16(GatherRowsArgs a);
void ge_gather_rows_f32(GatherRowsArgs a);
void ge_cast_f32_bf16(CastArgs a);
void ge_cast_bf16_f32(CastArgs a);
void ge_sum_squares_f32(SumSquaresArgs a);
void ge_sum_squares_bf16(SumSquaresArgs a);
void ge_attention_tc_fwd_d64(AttentionTcArgs a);
void ge_attention_tc_fwd_d128(AttentionTcArgs a);
void ge_attention_backward_tc_dq_d64(AttentionBackwardArgs a);
void ge_attention_backward_tc_dq_d128(AttentionBackwardArgs a);
void ge_attention_backward_tc_dkv_d64(AttentionBackwardArgs a);
void ge_attention_backward_tc_dkv_d128(AttentionBackwardArgs a);
void ge_attention_dkv_reduce(AttentionDkvReduceArgs a);
void ge_attention_delta(AttentionDeltaArgs a);
void ge_attention_backward_dq_d64(AttentionBackwardArgs a);
void ge_attention_backward_dq_d128(AttentionBackwardArgs a);
void ge_attention_backward_dkv_d64(AttentionBackwardArgs a);
void ge_attention_backward_dkv_d128(AttentionBackwardArgs a);
void ge_qkv_rope_write_kv(QkvRopeArgs a);
void ge_rope(RopeArgs a);
void ge_swiglu_backward(SwigluBackwardArgs a);
void ge_pair_losses(PairLossArgs a);
void ge_selftest_fresh_shared(SelfTestArgs a);
void ge_selftest_missing_barrier(SelfTestArgs a);
void ge_selftest_async_landing(SelfTestArgs a);
void ge_selftest_ldmatrix_synced(SelfTestArgs a);
void ge_selftest_ldmatrix_unsynced(SelfTestArgs a);
void ge_sample_rows(SampleArgs a);
void ge_sample_rows_bf16(SampleArgs a);
void ge_sampling_exp_values(CastArgs a);
void ge_adamw_update(AdamWArgs a);
}

namespace {

int failures = 0;
int checks = 0;

void report(bool ok, const char* fmt, ...) {
    ++checks;
    if (!ok) ++failures;
    std::printf("%s ", ok ? "ok  " : "FAIL");
    va_list ap;
    va_start(ap, fmt);
    std::vprintf(fmt, ap);
    va_end(ap);
    std::printf("\n");
    std::fflush(stdout);
}

struct Rng {
    unsigned long long s;
    explicit Rng(unsigned long long seed) : s(seed * 0x9e3779b97f4a7c15ull + 1) {}
    unsigned long long next() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        return s;
    }
    double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
    float sym(float scale) { return static_cast<float>((uniform() * 2.0 - 1.0) * scale); }
    unsigned int below(unsigned int n) { return static_cast<unsigned int>(next() % n); }
};

unsigned short bf16_bits(float f) { return ge_emu::f32_to_bf16_bits(f); }
float bf16_value(unsigned short b) { return __uint_as_float(static_cast<unsigned int>(b) << 16); }
unsigned long long addr(const void* p) { return reinterpret_cast<unsigned long long>(p); }
constexpr unsigned short BF16_NAN = 0x7fc0;
constexpr float F32_POISON = -12345.0f;

std::vector<unsigned short> random_bf16(Rng& rng, std::size_t n, float scale) {
    std::vector<unsigned short> v(n);
    for (auto& x : v) x = bf16_bits(rng.sym(scale));
    return v;
}

// ---------------------------------------------------------------------------------------
// Paged attention.

struct SeqSpec {
    int q_len;        // query rows of this sequence in the batch
    int context_len;  // positions in its cache, the new ones included
};

// Contiguous: whole-sequence causal attention over contiguous K/V rows (q_len == context_len
// for every sequence, K/V row = query row), no block tables.
void check_paged_attention(const char* name, int head_dim, int num_heads, int num_kv_heads,
                           int block_size, const std::vector<SeqSpec>& specs,
                           int partition_size, unsigned long long seed, bool contiguous = false,
                           bool tensor_cores = false) {
    Rng rng(seed);
    const int group = num_heads / num_kv_heads;
    const int slices = (group + 7) / 8;
    const int heads_per_block = (group + slices - 1) / slices;
    const int kw = num_kv_heads * head_dim;
    const int qw = num_heads * head_dim;
    // Block tables: each sequence's blocks, shuffled over the pool.
    std::vector<unsigned int> seqs, tables, work;
    int q_rows = 0, pool_blocks = 0, max_visible = 0;
    for (const auto& s : specs) pool_blocks += (s.context_len + block_size - 1) / block_size;
    pool_blocks += 3;  // unused blocks in the pool
    std::vector<unsigned int> free_blocks(pool_blocks);
    for (int i = 0; i < pool_blocks; ++i) free_blocks[i] = i;
    for (int i = pool_blocks - 1; i > 0; --i) std::swap(free_blocks[i], free_blocks[rng.below(i + 1)]);
    std::size_t next_free = 0;
    for (std::size_t si = 0; si < specs.size(); ++si) {
        const auto& s = specs[si];
        seqs.insert(seqs.end(), {static_cast<unsigned int>(q_rows), static_cast<unsigned int>(s.q_len),
                                 static_cast<unsigned int>(s.context_len),
                                 static_cast<unsigned int>(contiguous ? q_rows : static_cast<int>(tables.size()))});
        for (int b = 0; !contiguous && b < (s.context_len + block_size - 1) / block_size; ++b) {
            tables.push_back(free_blocks[next_free++]);
        }
        for (int r = 0; r < s.q_len; ++r) {
            work.push_back(q_rows + r);
            work.push_back(static_cast<unsigned int>(si));
        }
        q_rows += s.q_len;
        max_visible = std::max(max_visible, s.context_len);
    }
    const int work_rows = static_cast<int>(work.size() / 2);
    const int pool_rows = contiguous ? q_rows : pool_blocks * block_size;
    if (tables.empty()) tables.push_back(0);  // a valid address, as the backend gives
    const auto q = random_bf16(rng, static_cast<std::size_t>(q_rows) * qw, 1.5f);
    const auto kp = random_bf16(rng, static_cast<std::size_t>(pool_rows) * kw, 1.5f);
    const auto vp = random_bf16(rng, static_cast<std::size_t>(pool_rows) * kw, 1.0f);
    std::vector<unsigned short> out(static_cast<std::size_t>(q_rows) * qw, BF16_NAN);
    const int num_partitions =
        partition_size == 0 ? 1 : (max_visible + partition_size - 1) / partition_size;
    const int psize = partition_size == 0 ? ((max_visible + 127) / 128) * 128 : partition_size;
    const std::size_t stats = static_cast<std::size_t>(work_rows) * num_heads * num_partitions;
    std::vector<float> part_out(num_partitions > 1 ? stats * head_dim : 1, F32_POISON);
    std::vector<float> part_max(num_partitions > 1 ? stats : 1, F32_POISON);
    std::vector<float> part_sum(num_partitions > 1 ? stats : 1, F32_POISON);
    PagedAttentionArgs a{};
    a.q = addr(q.data());
    a.k_pool = addr(kp.data());
    a.v_pool = addr(vp.data());
    a.out = addr(out.data());
    a.part_out = addr(part_out.data());
    a.part_max = addr(part_max.data());
    a.part_sum = addr(part_sum.data());
    a.work = addr(work.data());
    a.seqs = addr(seqs.data());
    a.block_tables = addr(tables.data());
    a.work_rows = work_rows;
    a.num_heads = num_heads;
    a.num_kv_heads = num_kv_heads;
    a.head_dim = head_dim;
    a.block_size = block_size;
    a.partition_size = psize;
    a.num_partitions = num_partitions;
    a.heads_per_block = heads_per_block;
    a.scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    a.contiguous = contiguous ? 1 : 0;
    auto kernel = tensor_cores ? (head_dim == 64 ? ge_paged_attention_tc_d64 : ge_paged_attention_tc_d128)
                               : (head_dim == 64 ? ge_paged_attention_d64 : ge_paged_attention_d128);
    ge_emu::launch(kernel,
                   dim3{static_cast<unsigned int>(work_rows),
                        static_cast<unsigned int>(num_kv_heads * slices),
                        static_cast<unsigned int>(num_partitions)},
                   dim3{128, 1, 1}, a);
    if (num_partitions > 1) {
        PagedCombineArgs c{};
        c.out = a.out;
        c.part_out = a.part_out;
        c.part_max = a.part_max;
        c.part_sum = a.part_sum;
        c.work = a.work;
        c.seqs = a.seqs;
        c.work_rows = work_rows;
        c.num_heads = num_heads;
        c.head_dim = head_dim;
        c.partition_size = psize;
        c.num_partitions = num_partitions;
        ge_emu::launch(ge_paged_attention_combine,
                       dim3{static_cast<unsigned int>(work_rows),
                            static_cast<unsigned int>(num_heads), 1},
                       dim3{static_cast<unsigned int>(head_dim), 1, 1}, c);
    }
    // float64 reference on the same bf16 inputs.
    auto slot_of = [&](const unsigned int* sd, int p) -> long long {
        if (contiguous) return static_cast<long long>(sd[3]) + p;
        return static_cast<long long>(tables[sd[3] + p / block_size]) * block_size + p % block_size;
    };
    double err2 = 0.0, ref2 = 0.0, max_abs = 0.0;
    bool finite = true;
    for (int w = 0; w < work_rows; ++w) {
        const int row = static_cast<int>(work[2 * w]);
        const unsigned int* sd = &seqs[4 * work[2 * w + 1]];
        const int visible = static_cast<int>(sd[2]) - static_cast<int>(sd[1]) +
                            (row - static_cast<int>(sd[0])) + 1;
        for (int h = 0; h < num_heads; ++h) {
            const int kvh = h / group;
            std::vector<double> s(visible);
            double mx = -1e300;
            for (int p = 0; p < visible; ++p) {
                const long long slot = slot_of(sd, p);
                double dot = 0.0;
                for (int d = 0; d < head_dim; ++d) {
                    dot += static_cast<double>(bf16_value(q[static_cast<std::size_t>(row) * qw + h * head_dim + d])) *
                           bf16_value(kp[slot * kw + kvh * head_dim + d]);
                }
                s[p] = dot * a.scale;
                mx = std::max(mx, s[p]);
            }
            double total = 0.0;
            for (double& x : s) total += (x = std::exp(x - mx));
            for (int d = 0; d < head_dim; ++d) {
                double o = 0.0;
                for (int p = 0; p < visible; ++p) {
                    const long long slot = slot_of(sd, p);
                    o += s[p] * bf16_value(vp[slot * kw + kvh * head_dim + d]);
                }
                o /= total;
                const float got = bf16_value(out[static_cast<std::size_t>(row) * qw + h * head_dim + d]);
                if (!std::isfinite(got)) finite = false;
                err2 += (got - o) * (got - o);
                ref2 += o * o;
                max_abs = std::max(max_abs, std::fabs(got - o));
            }
        }
    }
    const double rel = std::sqrt(err2 / std::max(ref2, 1e-30));
    report(finite && rel <= 6e-3 && max_abs <= 2e-2,
           "paged attention%s %s: head_dim %d, heads %d/%d, %d rows, %d partition(s) of %d: "
           "relative L2 %.2e, max abs %.2e%s",
           tensor_cores ? " (tensor cores)" : "", name, head_dim, num_heads, num_kv_heads, work_rows, num_partitions, psize, rel, max_abs,
           finite ? "" : ", UNWRITTEN OR NON-FINITE OUTPUT");
}

void paged_attention_checks() {
    // Decode: one row per sequence, partial last blocks.
    const std::vector<SeqSpec> decode = {{1, 1}, {1, 17}, {1, 130}, {1, 255}, {1, 300}};
    // Prefill chunks after cached context, and a decode row, in one batch.
    const std::vector<SeqSpec> mixed = {{5, 5}, {3, 40}, {1, 129}, {7, 263}};
    // Split contexts: partitions of 256 (the planner's smallest), the combine after.
    const std::vector<SeqSpec> longer = {{1, 700}, {1, 256}, {1, 257}, {1, 3}, {2, 520}};
    for (int hd : {64, 128}) {
        for (auto [h, kv] : std::vector<std::pair<int, int>>{{4, 4}, {4, 2}, {14, 2}, {20, 2}}) {
            check_paged_attention("decode", hd, h, kv, 16, decode, 0, 11 + hd + h);
            check_paged_attention("mixed", hd, h, kv, 16, mixed, 0, 23 + hd + h);
        }
        check_paged_attention("split", hd, 14, 2, 16, longer, 256, 31 + hd);
        check_paged_attention("split", hd, 4, 4, 32, longer, 256, 37 + hd);
        // Whole-sequence causal attention on contiguous rows (the non-tensor-core path).
        check_paged_attention("contiguous", hd, 14, 2, 16, {{1, 1}, {37, 37}, {130, 130}}, 0,
                              43 + hd, true);
        check_paged_attention("contiguous split", hd, 2, 1, 16, {{3, 3}, {260, 260}}, 256, 47 + hd,
                              true);
    }
    // The tensor-core kernels (fewer cases: the emulated mma is slow): one head per block and
    // GQA 2, 4 (LLaMA-3's 32 / 8), 7 and 10 (two slices of 5), decode and prefill chunks,
    // partitions, block sizes 16, 7 and 1, contiguous rows.
    for (int hd : {64, 128}) {
        check_paged_attention("decode", hd, 14, 2, 16, decode, 0, 61 + hd, false, true);
        check_paged_attention("decode", hd, 16, 4, 16, decode, 0, 91 + hd, false, true);
        check_paged_attention("decode", hd, 20, 2, 7, decode, 0, 67 + hd, false, true);
        check_paged_attention("mixed", hd, 4, 2, 16, mixed, 0, 71 + hd, false, true);
        check_paged_attention("split", hd, 14, 2, 16, longer, 256, 73 + hd, false, true);
    }
    check_paged_attention("mixed", 64, 4, 4, 1, {{2, 20}, {1, 33}}, 0, 79, false, true);
    check_paged_attention("contiguous", 64, 14, 2, 16, {{1, 1}, {37, 37}, {130, 130}}, 0, 83, true,
                          true);
    check_paged_attention("contiguous split", 128, 2, 1, 16, {{3, 3}, {260, 260}}, 256, 89, true,
                          true);
}

// ---------------------------------------------------------------------------------------
// The skinny split-K GEMM: y = x w^T (+ bias), `splits` parts of `k_per_split`.

void check_skinny_gemm(int rows, int out, int inp, int k_per_split, bool bias, unsigned long long seed) {
    Rng rng(seed);
    const int splits = (inp + k_per_split - 1) / k_per_split;
    const auto x = random_bf16(rng, static_cast<std::size_t>(rows) * inp, 1.0f);
    const auto w = random_bf16(rng, static_cast<std::size_t>(out) * inp, 1.0f);
    const auto b = random_bf16(rng, static_cast<std::size_t>(out), 1.0f);
    std::vector<unsigned short> y(static_cast<std::size_t>(rows) * out, BF16_NAN);
    std::vector<float> partial(splits > 1 ? static_cast<std::size_t>(splits) * rows * out : 1, F32_POISON);
    SkinnyGemmArgs a{};
    a.x = addr(x.data());
    a.w = addr(w.data());
    a.bias = bias ? addr(b.data()) : 0ull;
    a.y = addr(y.data());
    a.partial = addr(partial.data());
    a.rows = rows;
    a.out = out;
    a.inp = inp;
    a.k_per_split = k_per_split;
    a.splits = splits;
    ge_emu::launch(ge_skinny_gemm,
                   dim3{static_cast<unsigned int>((out + 127) / 128), static_cast<unsigned int>((rows + 63) / 64),
                        static_cast<unsigned int>(splits)},
                   dim3{256, 1, 1}, a);
    if (splits > 1) ge_emu::launch(ge_skinny_gemm_reduce, dim3{7, 1, 1}, dim3{256, 1, 1}, a);
    double err2 = 0.0, ref2 = 0.0, max_rel = 0.0;
    bool finite = true;
    for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < out; ++c) {
            double want = bias ? bf16_value(b[c]) : 0.0;
            double mag = std::fabs(want);
            for (int k = 0; k < inp; ++k) {
                const double p = static_cast<double>(bf16_value(x[static_cast<std::size_t>(r) * inp + k])) *
                                 bf16_value(w[static_cast<std::size_t>(c) * inp + k]);
                want += p;
                mag += std::fabs(p);
            }
            const float got = bf16_value(y[static_cast<std::size_t>(r) * out + c]);
            if (!std::isfinite(got)) finite = false;
            err2 += (got - want) * (got - want);
            ref2 += want * want;
            // bf16 output rounding (2^-9 relative) plus f32 accumulation against the sum of
            // magnitudes.
            max_rel = std::max(max_rel, std::fabs(got - want) / (std::fabs(want) * 0x1p-8 + mag * 1e-4 + 1e-6));
        }
    }
    const double rel = std::sqrt(err2 / std::max(ref2, 1e-30));
    report(finite && rel <= 4e-3 && max_rel <= 1.0,
           "skinny GEMM: %d x %d x %d, %d split(s) of %d%s: relative L2 %.2e, worst error / bound %.2f%s",
           rows, out, inp, splits, k_per_split, bias ? ", bias" : "", rel, max_rel,
           finite ? "" : ", UNWRITTEN OR NON-FINITE OUTPUT");
}

void skinny_gemm_checks() {
    // One split (the epilogue writes y), partial row and feature tiles, K a multiple of 8 but
    // not of 32 (the last step zero-filled).
    check_skinny_gemm(37, 200, 104, 128, true, 1);
    check_skinny_gemm(64, 256, 96, 96, false, 2);
    // Splits (the reduce writes y), the last one shorter; two row tiles; an odd feature count.
    check_skinny_gemm(70, 131, 328, 96, true, 3);
    check_skinny_gemm(5, 384, 520, 128, false, 4);
    check_skinny_gemm(1, 9, 8, 32, true, 5);
}

// ---------------------------------------------------------------------------------------
// The fused log-prob forward and backward on bf16 logits.

void check_logprobs(int rows, int vocab, unsigned long long seed) {
    Rng rng(seed);
    auto logits = random_bf16(rng, static_cast<std::size_t>(rows) * vocab, 6.0f);
    std::vector<unsigned int> targets(rows);
    for (auto& t : targets) t = rng.below(vocab);
    std::vector<float> g(rows);
    for (auto& x : g) x = rng.sym(2.0f);
    // Rows 1.. of special kinds when there are enough rows: a NaN logit, all -inf, a target
    // outside the vocabulary, one huge logit (the rest underflow), -inf logits mixed in.
    if (rows >= 6) {
        logits[1 * static_cast<std::size_t>(vocab) + vocab / 2] = BF16_NAN;
        for (int i = 0; i < vocab; ++i) logits[2 * static_cast<std::size_t>(vocab) + i] = 0xff80;
        targets[3] = static_cast<unsigned int>(vocab);
        logits[4 * static_cast<std::size_t>(vocab) + vocab - 1] = bf16_bits(90.0f);
        for (int i = 0; i < vocab; i += 3) logits[5 * static_cast<std::size_t>(vocab) + i] = 0xff80;
        if (targets[5] % 3 == 0) targets[5] += 1;
    }
    const int expected_status[6] = {0, 1, 2, 4, 0, 0};
    const bool vec = vocab % 8 == 0;
    const unsigned int threads = vocab >= 16384 ? 1024 : 256;
    // Forward.
    std::vector<float> out(rows, F32_POISON);
    std::vector<float> lse(rows, F32_POISON);
    std::vector<int> status(rows, -1);
    TargetLogprobArgs fa{addr(logits.data()), addr(targets.data()), addr(out.data()),
                         addr(status.data()), addr(lse.data()), rows, vocab};
    ge_emu::launch(vec ? ge_target_logprobs_bf16_v8 : ge_target_logprobs_bf16,
                   dim3{static_cast<unsigned int>(rows), 1, 1}, dim3{threads, 1, 1}, fa);
    // Backward (in place on a copy), computing its own statistics.
    auto dl = logits;
    std::vector<int> bstatus(rows, -1);
    LogprobBackwardArgs ba{addr(dl.data()), addr(targets.data()), addr(g.data()),
                           addr(bstatus.data()), 0, rows, vocab};
    ge_emu::launch(vec ? ge_target_logprobs_backward_bf16_v8 : ge_target_logprobs_backward_bf16,
                   dim3{static_cast<unsigned int>(rows), 1, 1}, dim3{threads, 1, 1}, ba);
    // Backward in one pass with the forward's log-sum-exp. Row 1 (a NaN logit) is given a
    // finite one, so that the pass itself must notice the NaN; the forward left NaN in the
    // other failed rows (status 3, or 4 for the target outside the vocabulary).
    auto dl1 = logits;
    auto lse_in = lse;
    if (rows >= 6) lse_in[1] = 0.0f;
    const int expected_one_pass[6] = {0, 1, 3, 4, 0, 0};
    std::vector<int> b1status(rows, -1);
    LogprobBackwardArgs b1a{addr(dl1.data()), addr(targets.data()), addr(g.data()),
                            addr(b1status.data()), addr(lse_in.data()), rows, vocab};
    ge_emu::launch(vec ? ge_target_logprobs_backward_bf16_v8 : ge_target_logprobs_backward_bf16,
                   dim3{static_cast<unsigned int>(rows), 1, 1}, dim3{threads, 1, 1}, b1a);
    double fwd_err = 0.0, lse_err = 0.0, bwd_err = 0.0, bwd1_err = 0.0;
    bool status_ok = true;
    for (int r = 0; r < rows; ++r) {
        const int want_status = rows >= 6 && r < 6 ? expected_status[r] : 0;
        const int want_one_pass = rows >= 6 && r < 6 ? expected_one_pass[r] : 0;
        const bool lse_nan_ok = want_status == 0 || std::isnan(lse[r]);
        if (status[r] != want_status || bstatus[r] != want_status ||
            b1status[r] != want_one_pass || !lse_nan_ok) {
            status_ok = false;
            std::printf("  row %d: status %d (forward), %d (backward), %d (one pass), want %d "
                        "and %d; lse %g\n", r, status[r], bstatus[r], b1status[r], want_status,
                        want_one_pass, lse[r]);
        }
        if (want_status != 0) continue;
        const unsigned short* l = &logits[static_cast<std::size_t>(r) * vocab];
        double mx = -1e300;
        for (int i = 0; i < vocab; ++i) mx = std::max(mx, static_cast<double>(bf16_value(l[i])));
        double se = 0.0;
        for (int i = 0; i < vocab; ++i) se += std::exp(bf16_value(l[i]) - mx);
        const double row_lse = mx + std::log(se);
        const double want = bf16_value(l[targets[r]]) - row_lse;
        fwd_err = std::max(fwd_err, std::fabs(out[r] - want) / (1e-3 + std::fabs(want)));
        lse_err = std::max(lse_err, std::fabs(lse[r] - row_lse) / (1e-3 + std::fabs(row_lse)));
        for (int i = 0; i < vocab; ++i) {
            const double p = std::exp(bf16_value(l[i]) - row_lse);
            const double wd = g[r] * ((i == static_cast<int>(targets[r]) ? 1.0 : 0.0) - p);
            const double got = bf16_value(dl[static_cast<std::size_t>(r) * vocab + i]);
            const double got1 = bf16_value(dl1[static_cast<std::size_t>(r) * vocab + i]);
            // bf16 output: half an ulp is up to 2^-8 of the value; f32 statistics add little.
            bwd_err = std::max(bwd_err, std::fabs(got - wd) / (1e-7 + std::fabs(wd)));
            bwd1_err = std::max(bwd1_err, std::fabs(got1 - wd) / (1e-7 + std::fabs(wd)));
        }
    }
    report(status_ok && fwd_err <= 1e-5, "log-prob forward%s: %d rows, vocab %d, %u threads: "
           "max relative error %.2e%s", vec ? " (16-byte loads)" : "", rows, vocab, threads,
           fwd_err, status_ok ? "" : ", WRONG STATUS");
    report(status_ok && bwd_err <= 5e-3 && bwd1_err <= 5e-3 && lse_err <= 1e-5,
           "log-prob backward%s: %d rows, vocab %d: max relative error %.2e (two passes), "
           "%.2e (one pass, the forward's log-sum-exp; its error %.2e)%s",
           vec ? " (16-byte loads)" : "", rows, vocab, bwd_err, bwd1_err, lse_err,
           status_ok ? "" : ", WRONG STATUS");
}

void logprob_checks() {
    check_logprobs(7, 1000, 3);
    check_logprobs(7, 1001, 4);
    check_logprobs(6, 8000, 8);  // several 16-byte vectors per thread: the rescale runs
    check_logprobs(3, 7, 5);
    check_logprobs(6, 16392, 6);
    check_logprobs(2, 16385, 7);
}

// ---------------------------------------------------------------------------------------
// SwiGLU forward and backward: the 16-byte path (inner % 8 == 0) and the scalar one, against
// the same f32 formula on the host (bit for bit: the emulation uses the host's expf).
// (Below them: the KV-cache writes with padding rows.)

void check_swiglu(int rows, int inner, unsigned long long seed) {
    Rng rng(seed);
    const auto gu = random_bf16(rng, static_cast<std::size_t>(rows) * 2 * inner, 4.0f);
    const auto dy = random_bf16(rng, static_cast<std::size_t>(rows) * inner, 1.0f);
    std::vector<unsigned short> out(static_cast<std::size_t>(rows) * inner, BF16_NAN);
    std::vector<unsigned short> dgu(static_cast<std::size_t>(rows) * 2 * inner, BF16_NAN);
    SwigluArgs fa{addr(gu.data()), addr(out.data()), rows, inner};
    ge_emu::launch(ge_swiglu, dim3{3, 1, 1}, dim3{64, 1, 1}, fa);
    SwigluBackwardArgs ba{addr(gu.data()), addr(dy.data()), addr(dgu.data()), rows, inner};
    ge_emu::launch(ge_swiglu_backward, dim3{3, 1, 1}, dim3{64, 1, 1}, ba);
    int fwd_bad = 0, bwd_bad = 0;
    for (int r = 0; r < rows; ++r) {
        for (int j = 0; j < inner; ++j) {
            const float gv = bf16_value(gu[static_cast<std::size_t>(r) * 2 * inner + j]);
            const float uv = bf16_value(gu[static_cast<std::size_t>(r) * 2 * inner + inner + j]);
            const float d = bf16_value(dy[static_cast<std::size_t>(r) * inner + j]);
            const float o = gv / (1.0f + expf(-gv)) * uv;
            if (out[static_cast<std::size_t>(r) * inner + j] != bf16_bits(o)) ++fwd_bad;
            const float s = 1.0f / (1.0f + expf(-gv));
            const float du = d * gv * s;
            const float dg = d * uv * s * (1.0f + gv * (1.0f - s));
            if (dgu[static_cast<std::size_t>(r) * 2 * inner + j] != bf16_bits(dg)) ++bwd_bad;
            if (dgu[static_cast<std::size_t>(r) * 2 * inner + inner + j] != bf16_bits(du)) ++bwd_bad;
        }
    }
    report(fwd_bad == 0, "swiglu forward: %d rows, inner %d%s: %d elements differ", rows, inner,
           inner % 8 == 0 ? " (16-byte path)" : "", fwd_bad);
    report(bwd_bad == 0, "swiglu backward: %d rows, inner %d%s: %d elements differ", rows, inner,
           inner % 8 == 0 ? " (16-byte path)" : "", bwd_bad);
}

void swiglu_checks() {
    check_swiglu(5, 24, 41);
    check_swiglu(3, 200, 42);
    check_swiglu(5, 13, 43);
}

// ---------------------------------------------------------------------------------------
// KV-cache writes with padding rows (GE_NO_SLOT, the padded rows of a graph-replayed decode
// step): write_kv and the fused q/k/v split + RoPE + K/V write leave the pools untouched for
// them and write every other row's slot exactly; q is written for every row.

void check_kv_writes(unsigned long long seed, int hd = 64) {
    Rng rng(seed);
    const int rows = 6, heads = 7, kv_heads = 2, half = hd / 2;
    const int qw = heads * hd, kw = kv_heads * hd, width = qw + 2 * kw, pool_rows = 20;
    const std::vector<unsigned int> slots = {3, 0xffffffffu, 17, 0, 0xffffffffu, 9};
    std::vector<unsigned int> positions(rows);
    for (auto& p : positions) p = rng.below(5000);
    const auto qkv = random_bf16(rng, static_cast<std::size_t>(rows) * width, 2.0f);
    std::vector<float> inv_freq(half);
    for (int i = 0; i < half; ++i) inv_freq[i] = static_cast<float>(std::pow(10000.0, -2.0 * i / hd));
    const auto pool0 = random_bf16(rng, static_cast<std::size_t>(pool_rows) * kw, 1.0f);
    auto kp = pool0, vp = pool0;
    std::vector<unsigned short> q(static_cast<std::size_t>(rows) * qw, BF16_NAN);
    QkvRopeArgs a{addr(qkv.data()), addr(q.data()), addr(kp.data()), addr(vp.data()),
                  addr(positions.data()), addr(slots.data()), addr(inv_freq.data()),
                  rows, qw, kw, hd};
    ge_emu::launch(ge_qkv_rope_write_kv, dim3{rows, 1, 1}, dim3{128, 1, 1}, a,
                   static_cast<std::size_t>(hd) * sizeof(float));
    // Expected: the pools as before but at the real rows' slots.
    auto want_k = pool0, want_v = pool0;
    std::vector<unsigned short> want_q(q.size());
    auto rotate = [&](const unsigned short* h, unsigned short* d, unsigned int pos) {
        for (int i = 0; i < half; ++i) {
            double sn, cs;
            sincos(static_cast<double>(pos) * static_cast<double>(inv_freq[i]), &sn, &cs);
            const float c = static_cast<float>(cs), s = static_cast<float>(sn);
            const float lo = bf16_value(h[i]), hi = bf16_value(h[i + half]);
            d[i] = bf16_bits(lo * c - hi * s);
            d[i + half] = bf16_bits(hi * c + lo * s);
        }
    };
    for (int r = 0; r < rows; ++r) {
        const unsigned short* src = &qkv[static_cast<std::size_t>(r) * width];
        for (int h = 0; h < heads; ++h) rotate(src + h * hd, &want_q[static_cast<std::size_t>(r) * qw + h * hd], positions[r]);
        if (slots[r] == 0xffffffffu) continue;
        for (int h = 0; h < kv_heads; ++h) {
            rotate(src + qw + h * hd, &want_k[static_cast<std::size_t>(slots[r]) * kw + h * hd], positions[r]);
        }
        std::copy(src + qw + kw, src + qw + 2 * kw, &want_v[static_cast<std::size_t>(slots[r]) * kw]);
    }
    report(q == want_q && kp == want_k && vp == want_v,
           "q/k/v split + RoPE + K/V write: head_dim %d%s, %d rows, 2 of them padding (no slot): q %s, "
           "K pool %s, V pool %s", hd, hd % 16 == 0 ? " (16-byte path)" : "", rows,
           q == want_q ? "exact" : "DIFFERS", kp == want_k ? "exact" : "DIFFERS",
           vp == want_v ? "exact" : "DIFFERS");
    // ge_rope in place on q's rows (forward, then the inverse rotation of the backward).
    for (int inverse : {0, 1}) {
        // q's columns of every row of qkv.
        std::vector<unsigned short> x(static_cast<std::size_t>(rows) * qw);
        for (int r = 0; r < rows; ++r) {
            std::copy(&qkv[static_cast<std::size_t>(r) * width], &qkv[static_cast<std::size_t>(r) * width] + qw,
                      &x[static_cast<std::size_t>(r) * qw]);
        }
        std::vector<unsigned short> want_x(x.size());
        for (int r = 0; r < rows; ++r) {
            for (int h = 0; h < heads; ++h) {
                const unsigned short* hsrc = &x[static_cast<std::size_t>(r) * qw + h * hd];
                unsigned short* d = &want_x[static_cast<std::size_t>(r) * qw + h * hd];
                for (int i = 0; i < half; ++i) {
                    double sn, cs;
                    sincos(static_cast<double>(positions[r]) * static_cast<double>(inv_freq[i]), &sn, &cs);
                    const float c = static_cast<float>(cs);
                    const float sgn = (inverse ? -1.0f : 1.0f) * static_cast<float>(sn);
                    const float lo = bf16_value(hsrc[i]), hi = bf16_value(hsrc[i + half]);
                    d[i] = bf16_bits(lo * c - hi * sgn);
                    d[i + half] = bf16_bits(hi * c + lo * sgn);
                }
            }
        }
        RopeArgs ra{};
        ra.x = addr(x.data());
        ra.positions = addr(positions.data());
        ra.inv_freq = addr(inv_freq.data());
        ra.rows = rows;
        ra.width = qw;
        ra.head_dim = hd;
        ra.inverse = inverse;
        ge_emu::launch(ge_rope, dim3{rows, 1, 1}, dim3{64, 1, 1}, ra, static_cast<std::size_t>(hd) * sizeof(float));
        report(x == want_x, "rope%s: head_dim %d%s, %d rows: %s", inverse ? " (inverse)" : "", hd,
               hd % 16 == 0 ? " (16-byte path)" : "", rows, x == want_x ? "exact" : "DIFFERS");
    }
    // write_kv: the same slots, rows of k and v copied.
    const auto k = random_bf16(rng, static_cast<std::size_t>(rows) * kw, 1.0f);
    const auto v = random_bf16(rng, static_cast<std::size_t>(rows) * kw, 1.0f);
    kp = pool0;
    vp = pool0;
    WriteKvArgs w{addr(kp.data()), addr(vp.data()), addr(k.data()), addr(v.data()),
                  addr(slots.data()), rows, kw};
    ge_emu::launch(ge_write_kv_bf16, dim3{2, 1, 1}, dim3{96, 1, 1}, w);
    want_k = pool0;
    want_v = pool0;
    for (int r = 0; r < rows; ++r) {
        if (slots[r] == 0xffffffffu) continue;
        std::copy(&k[static_cast<std::size_t>(r) * kw], &k[static_cast<std::size_t>(r + 1) * kw],
                  &want_k[static_cast<std::size_t>(slots[r]) * kw]);
        std::copy(&v[static_cast<std::size_t>(r) * kw], &v[static_cast<std::size_t>(r + 1) * kw],
                  &want_v[static_cast<std::size_t>(slots[r]) * kw]);
    }
    report(kp == want_k && vp == want_v, "write_kv: %d rows, 2 of them padding (no slot): %s",
           rows, kp == want_k && vp == want_v ? "pools exact" : "POOLS DIFFER");
}

// ---------------------------------------------------------------------------------------
// Causal attention over packed sequences for training, forward and backward: the tensor-core
// forward (out and its log-sum-exp), the tensor-core backward in its three forms (statistics
// computed by the dq kernel or taken from the forward with ge_attention_delta; dk/dv in one
// block per kv head or split over the group's query heads and summed by
// ge_attention_dkv_reduce), and the CUDA-core backward, each against a float64 reference.
// The launches mirror src/backend/cuda/attention_tc.rs and attention_backward.rs.

struct Span {
    int start, len;
};

// Tiles of `rows` positions of every sequence, three u32s each (start, len, tile start), in
// sequence order (the backend orders them heaviest first; the order does not change results).
std::vector<unsigned int> tiles_of(const std::vector<Span>& seqs, int rows) {
    std::vector<unsigned int> t;
    for (const auto& s : seqs) {
        for (int p = 0; p < s.len; p += rows) {
            t.insert(t.end(), {static_cast<unsigned int>(s.start), static_cast<unsigned int>(s.len),
                               static_cast<unsigned int>(p)});
        }
    }
    return t;
}

struct AttnRef {
    std::vector<double> out, lse, dq, dk, dv;
};

AttnRef attention_reference(const std::vector<Span>& seqs, int n, int heads, int kv_heads, int hd,
                            const std::vector<unsigned short>& q, const std::vector<unsigned short>& k,
                            const std::vector<unsigned short>& v,
                            const std::vector<unsigned short>& dout) {
    const int qw = heads * hd, kw = kv_heads * hd, group = heads / kv_heads;
    const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
    AttnRef r;
    r.out.assign(static_cast<std::size_t>(n) * qw, 0.0);
    r.lse.assign(static_cast<std::size_t>(n) * heads, 0.0);
    r.dq.assign(static_cast<std::size_t>(n) * qw, 0.0);
    r.dk.assign(static_cast<std::size_t>(n) * kw, 0.0);
    r.dv.assign(static_cast<std::size_t>(n) * kw, 0.0);
    auto at = [](const std::vector<unsigned short>& m, int row, int width, int col) {
        return static_cast<double>(bf16_value(m[static_cast<std::size_t>(row) * width + col]));
    };
    for (const auto& s : seqs) {
        for (int h = 0; h < heads; ++h) {
            const int kvh = h / group;
            for (int i = 0; i < s.len; ++i) {
                const int ri = s.start + i;
                std::vector<double> p(i + 1), dp(i + 1);
                double mx = -1e300;
                for (int j = 0; j <= i; ++j) {
                    double d = 0.0;
                    for (int c = 0; c < hd; ++c) d += at(q, ri, qw, h * hd + c) * at(k, s.start + j, kw, kvh * hd + c);
                    p[j] = d * scale;
                    mx = std::max(mx, p[j]);
                }
                double z = 0.0;
                for (double& x : p) z += (x = std::exp(x - mx));
                r.lse[static_cast<std::size_t>(ri) * heads + h] = mx + std::log(z);
                for (double& x : p) x /= z;
                double delta = 0.0;
                for (int j = 0; j <= i; ++j) {
                    double d = 0.0;
                    for (int c = 0; c < hd; ++c) d += at(dout, ri, qw, h * hd + c) * at(v, s.start + j, kw, kvh * hd + c);
                    dp[j] = d;
                    delta += p[j] * d;
                }
                for (int c = 0; c < hd; ++c) {
                    double o = 0.0;
                    for (int j = 0; j <= i; ++j) o += p[j] * at(v, s.start + j, kw, kvh * hd + c);
                    r.out[static_cast<std::size_t>(ri) * qw + h * hd + c] = o;
                }
                for (int j = 0; j <= i; ++j) {
                    const double ds = p[j] * (dp[j] - delta);
                    const int rj = s.start + j;
                    for (int c = 0; c < hd; ++c) {
                        r.dq[static_cast<std::size_t>(ri) * qw + h * hd + c] += scale * ds * at(k, rj, kw, kvh * hd + c);
                        r.dk[static_cast<std::size_t>(rj) * kw + kvh * hd + c] += scale * ds * at(q, ri, qw, h * hd + c);
                        r.dv[static_cast<std::size_t>(rj) * kw + kvh * hd + c] += p[j] * at(dout, ri, qw, h * hd + c);
                    }
                }
            }
        }
    }
    return r;
}

// Relative L2 error of bf16 `got` against `want` over the sequences' rows (`width` columns);
// `finite` false if any of those is NaN (unwritten: the outputs start as NaN).
double rel_l2_rows(const std::vector<unsigned short>& got, const std::vector<double>& want,
                   const std::vector<Span>& seqs, int width, bool& finite) {
    double e2 = 0.0, r2 = 0.0;
    for (const auto& s : seqs) {
        for (int r = s.start; r < s.start + s.len; ++r) {
            for (int c = 0; c < width; ++c) {
                const std::size_t i = static_cast<std::size_t>(r) * width + c;
                const double g = bf16_value(got[i]);
                if (!std::isfinite(g)) finite = false;
                e2 += (g - want[i]) * (g - want[i]);
                r2 += want[i] * want[i];
            }
        }
    }
    return std::sqrt(e2 / std::max(r2, 1e-30));
}

void check_training_attention(int hd, int heads, int kv_heads, const std::vector<Span>& seqs, int n,
                              unsigned long long seed) {
    Rng rng(seed);
    const int qw = heads * hd, kw = kv_heads * hd, group = heads / kv_heads;
    const auto q = random_bf16(rng, static_cast<std::size_t>(n) * qw, 1.5f);
    const auto k = random_bf16(rng, static_cast<std::size_t>(n) * kw, 1.5f);
    const auto v = random_bf16(rng, static_cast<std::size_t>(n) * kw, 1.0f);
    const auto dout = random_bf16(rng, static_cast<std::size_t>(n) * qw, 1.0f);
    const AttnRef ref = attention_reference(seqs, n, heads, kv_heads, hd, q, k, v, dout);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    char what[96];
    std::snprintf(what, sizeof what, "head_dim %d, heads %d/%d, %zu sequences in %d rows", hd, heads,
                  kv_heads, seqs.size(), n);

    // Forward on tensor cores: out and the log-sum-exp.
    std::vector<unsigned short> out(static_cast<std::size_t>(n) * qw, BF16_NAN);
    std::vector<float> lse(static_cast<std::size_t>(n) * heads, F32_POISON);
    auto fwd_tiles = tiles_of(seqs, 64);
    AttentionTcArgs fa{addr(q.data()), addr(k.data()), addr(v.data()), addr(out.data()), addr(lse.data()),
                       addr(fwd_tiles.data()), static_cast<int>(fwd_tiles.size() / 3), heads, kv_heads, hd,
                       64, scale};
    ge_emu::launch(hd == 64 ? ge_attention_tc_fwd_d64 : ge_attention_tc_fwd_d128,
                   dim3{static_cast<unsigned int>(fwd_tiles.size() / 3), static_cast<unsigned int>(heads), 1},
                   dim3{128, 1, 1}, fa);
    bool finite = true;
    const double out_err = rel_l2_rows(out, ref.out, seqs, qw, finite);
    double lse_err = 0.0;
    for (const auto& s : seqs) {
        for (int r = s.start; r < s.start + s.len; ++r) {
            for (int h = 0; h < heads; ++h) {
                const std::size_t i = static_cast<std::size_t>(r) * heads + h;
                lse_err = std::max(lse_err, std::fabs(lse[i] - ref.lse[i]));
            }
        }
    }
    report(finite && out_err <= 1e-2 && lse_err <= 1e-3,
           "attention forward (tensor cores): %s: out relative L2 %.2e, log-sum-exp max abs %.2e%s",
           what, out_err, lse_err, finite ? "" : ", UNWRITTEN OR NON-FINITE OUTPUT");

    // Backward, each form.
    struct Form {
        const char* name;
        bool tc, stats_given, split;
    };
    const Form forms[] = {{"tensor cores, statistics computed, dk/dv per kv head", true, false, false},
                          {"tensor cores, forward's statistics, dk/dv split over query heads", true, true, true},
                          {"tensor cores, forward's statistics, dk/dv per kv head", true, true, false},
                          {"CUDA cores", false, false, false}};
    for (const Form& f : forms) {
        if (f.split && group == 1) continue;  // the backend splits only shared kv heads
        const int q_rows = f.tc ? 64 : 32;
        const int k_rows = f.tc ? 64 : (hd == 64 ? 64 : 32);
        const unsigned int threads = f.tc ? 128 : 256;
        std::vector<unsigned short> dq(static_cast<std::size_t>(n) * qw, BF16_NAN);
        std::vector<unsigned short> dk(static_cast<std::size_t>(n) * kw, BF16_NAN);
        std::vector<unsigned short> dv(static_cast<std::size_t>(n) * kw, BF16_NAN);
        std::vector<float> blse = f.stats_given ? lse : std::vector<float>(lse.size(), F32_POISON);
        std::vector<float> delta(static_cast<std::size_t>(n) * heads, F32_POISON);
        if (f.stats_given) {
            AttentionDeltaArgs da{addr(out.data()), addr(dout.data()), addr(delta.data()),
                                  static_cast<long long>(n), heads, hd};
            ge_emu::launch(ge_attention_delta, dim3{3, 1, 1}, dim3{256, 1, 1}, da);
        }
        auto qt = tiles_of(seqs, q_rows);
        auto kt = tiles_of(seqs, k_rows);
        AttentionBackwardArgs a{addr(q.data()), addr(k.data()), addr(v.data()), addr(dout.data()),
                                addr(dq.data()), addr(dk.data()), addr(dv.data()), addr(blse.data()),
                                addr(delta.data()), addr(qt.data()), static_cast<int>(qt.size() / 3),
                                heads, kv_heads, hd, q_rows, scale, 0, f.stats_given ? 1 : 0};
        auto dq_kernel = f.tc ? (hd == 64 ? ge_attention_backward_tc_dq_d64 : ge_attention_backward_tc_dq_d128)
                              : (hd == 64 ? ge_attention_backward_dq_d64 : ge_attention_backward_dq_d128);
        auto dkv_kernel = f.tc ? (hd == 64 ? ge_attention_backward_tc_dkv_d64 : ge_attention_backward_tc_dkv_d128)
                               : (hd == 64 ? ge_attention_backward_dkv_d64 : ge_attention_backward_dkv_d128);
        ge_emu::launch(dq_kernel, dim3{static_cast<unsigned int>(qt.size() / 3), static_cast<unsigned int>(heads), 1},
                       dim3{threads, 1, 1}, a);
        a.tiles = addr(kt.data());
        a.num_tiles = static_cast<int>(kt.size() / 3);
        a.tile_rows = k_rows;
        if (f.split) {
            std::vector<float> dk_part(static_cast<std::size_t>(n) * qw, std::nanf(""));
            std::vector<float> dv_part(static_cast<std::size_t>(n) * qw, std::nanf(""));
            a.dk = addr(dk_part.data());
            a.dv = addr(dv_part.data());
            a.split_heads = 1;
            ge_emu::launch(dkv_kernel,
                           dim3{static_cast<unsigned int>(kt.size() / 3), static_cast<unsigned int>(kv_heads),
                                static_cast<unsigned int>(group)},
                           dim3{threads, 1, 1}, a);
            AttentionDkvReduceArgs r{addr(dk_part.data()), addr(dv_part.data()), addr(dk.data()), addr(dv.data()),
                                     static_cast<long long>(n), heads, kv_heads, hd, scale};
            ge_emu::launch(ge_attention_dkv_reduce, dim3{2, 1, 1}, dim3{256, 1, 1}, r);
        } else {
            ge_emu::launch(dkv_kernel,
                           dim3{static_cast<unsigned int>(kt.size() / 3), static_cast<unsigned int>(kv_heads), 1},
                           dim3{threads, 1, 1}, a);
        }
        bool ok_finite = true;
        const double eq = rel_l2_rows(dq, ref.dq, seqs, qw, ok_finite);
        const double ek = rel_l2_rows(dk, ref.dk, seqs, kw, ok_finite);
        const double ev = rel_l2_rows(dv, ref.dv, seqs, kw, ok_finite);
        report(ok_finite && eq <= 1e-2 && ek <= 1e-2 && ev <= 1e-2,
               "attention backward (%s): %s: dq / dk / dv relative L2 %.2e / %.2e / %.2e%s", f.name, what,
               eq, ek, ev, ok_finite ? "" : ", UNWRITTEN OR NON-FINITE OUTPUT");
    }
}

void training_attention_checks() {
    // Packed sequences: odd lengths, a partial tile, a gap row (row 0) and a one-token one.
    const std::vector<Span> seqs = {{1, 1}, {2, 37}, {39, 70}, {109, 20}};
    check_training_attention(64, 4, 2, seqs, 129, 61);
    check_training_attention(64, 7, 1, seqs, 129, 62);
    check_training_attention(128, 4, 4, {{0, 19}, {20, 66}}, 86, 63);
    check_training_attention(128, 6, 2, {{0, 19}, {20, 66}}, 86, 64);
}

// ---------------------------------------------------------------------------------------
// RMSNorm (one warp per row, `per_block` rows per block: row counts that leave warps idle)
// against float64, and the fused residual add + RMSNorm bit for bit against the add then the
// norm.

void check_norms(int rows, int dim, unsigned long long seed, unsigned int per_block = 8) {
    Rng rng(seed);
    const auto x0 = random_bf16(rng, static_cast<std::size_t>(rows) * dim, 3.0f);
    const auto y = random_bf16(rng, static_cast<std::size_t>(rows) * dim, 3.0f);
    const auto w = random_bf16(rng, dim, 1.5f);
    const float eps = 1e-6f;
    const unsigned int blocks = static_cast<unsigned int>((rows + per_block - 1) / per_block);
    const dim3 threads{32 * per_block, 1, 1};
    // Plain norm against float64.
    std::vector<unsigned short> out(x0.size(), BF16_NAN);
    RmsNormArgs na{addr(x0.data()), addr(w.data()), addr(out.data()), rows, dim, eps};
    ge_emu::launch(ge_rms_norm, dim3{blocks, 1, 1}, threads, na);
    double worst = 0.0;
    bool finite = true;
    for (int r = 0; r < rows; ++r) {
        double ss = 0.0;
        for (int i = 0; i < dim; ++i) {
            const double v = bf16_value(x0[static_cast<std::size_t>(r) * dim + i]);
            ss += v * v;
        }
        const double scale = 1.0 / std::sqrt(ss / dim + eps);
        for (int i = 0; i < dim; ++i) {
            const std::size_t k = static_cast<std::size_t>(r) * dim + i;
            const double want = bf16_value(x0[k]) * scale * bf16_value(w[i]);
            const double got = bf16_value(out[k]);
            if (!std::isfinite(got)) finite = false;
            worst = std::max(worst, std::fabs(got - want) / (1e-3 + std::fabs(want)));
        }
    }
    report(finite && worst <= 8e-3, "rms_norm: %d rows (%u per block), dim %d%s: max relative error %.2e%s",
           rows, per_block, dim, dim % 8 == 0 ? " (16-byte path)" : "", worst, finite ? "" : ", UNWRITTEN OUTPUT");
    // Fused against composed, bit for bit (x updated in place by both).
    auto xf = x0, xc = x0;
    std::vector<unsigned short> of(x0.size(), BF16_NAN), oc(x0.size(), BF16_NAN);
    AddRmsNormArgs fa{addr(xf.data()), addr(y.data()), addr(w.data()), addr(of.data()), rows, dim, eps};
    ge_emu::launch(ge_add_rms_norm, dim3{blocks, 1, 1}, threads, fa);
    AddAssignArgs aa{addr(xc.data()), addr(y.data()), static_cast<long long>(x0.size())};
    ge_emu::launch(ge_add_assign_bf16, dim3{3, 1, 1}, dim3{256, 1, 1}, aa);
    RmsNormArgs ca{addr(xc.data()), addr(w.data()), addr(oc.data()), rows, dim, eps};
    ge_emu::launch(ge_rms_norm, dim3{blocks, 1, 1}, threads, ca);
    report(xf == xc && of == oc, "add_rms_norm: %d rows, dim %d: %s", rows, dim,
           xf == xc && of == oc ? "the bits of add_assign then rms_norm" : "DIFFERS from add_assign then rms_norm");
}

// ---------------------------------------------------------------------------------------
// RMSNorm backward (one warp per row for dx; row groups of `row_group` for the weight
// gradient, their sums added in group order) against float64.

void check_rms_norm_backward(int rows, int dim, int row_group, unsigned long long seed) {
    Rng rng(seed);
    const auto x = random_bf16(rng, static_cast<std::size_t>(rows) * dim, 2.0f);
    const auto dy = random_bf16(rng, static_cast<std::size_t>(rows) * dim, 1.0f);
    const auto w = random_bf16(rng, dim, 1.5f);
    const float eps = 1e-5f;
    const int groups = (rows + row_group - 1) / row_group;
    std::vector<unsigned short> dx(x.size(), BF16_NAN);
    std::vector<float> rinv(rows, F32_POISON);
    std::vector<float> wg(dim, 0.25f);  // accumulated into
    std::vector<float> partial(static_cast<std::size_t>(groups) * dim, F32_POISON);
    RmsNormBackwardArgs a{};
    a.x = addr(x.data());
    a.weight = addr(w.data());
    a.dy = addr(dy.data());
    a.dx = addr(dx.data());
    a.rinv = addr(rinv.data());
    a.partial = addr(partial.data());
    a.rows = rows;
    a.dim = dim;
    a.eps = eps;
    a.row_group = row_group;
    ge_emu::launch(ge_rms_norm_backward_rows, dim3{static_cast<unsigned int>((rows + 7) / 8), 1, 1},
                   dim3{256, 1, 1}, a);
    const int tile = dim % 8 == 0 ? 256 : 32;
    ge_emu::launch(ge_rms_norm_backward_weight,
                   dim3{static_cast<unsigned int>((dim + tile - 1) / tile), static_cast<unsigned int>((groups + 7) / 8), 1},
                   dim3{32, 8, 1}, a);
    ColumnReduceArgs ra{addr(partial.data()), addr(wg.data()), groups, dim};
    ge_emu::launch(ge_column_partials_reduce, dim3{static_cast<unsigned int>((dim + 31) / 32), 1, 1},
                   dim3{32, 8, 1}, ra);
    double worst_dx = 0.0, worst_wg = 0.0;
    bool finite = true;
    std::vector<double> want_wg(dim, 0.25);
    for (int r = 0; r < rows; ++r) {
        double ss = 0.0, dot = 0.0;
        for (int i = 0; i < dim; ++i) {
            const std::size_t k = static_cast<std::size_t>(r) * dim + i;
            const double xv = bf16_value(x[k]);
            ss += xv * xv;
            dot += static_cast<double>(bf16_value(dy[k])) * bf16_value(w[i]) * xv;
        }
        const double rr = 1.0 / std::sqrt(ss / dim + eps);
        const double c = rr * rr * rr / dim * dot;
        for (int i = 0; i < dim; ++i) {
            const std::size_t k = static_cast<std::size_t>(r) * dim + i;
            const double xv = bf16_value(x[k]);
            const double g = bf16_value(dy[k]);
            const double want = rr * bf16_value(w[i]) * g - c * xv;
            const double got = bf16_value(dx[k]);
            if (!std::isfinite(got)) finite = false;
            worst_dx = std::max(worst_dx, std::fabs(got - want) / (1e-2 + std::fabs(want)));
            want_wg[i] += g * xv * rr;
        }
    }
    for (int i = 0; i < dim; ++i) {
        if (!std::isfinite(wg[i])) finite = false;
        worst_wg = std::max(worst_wg, std::fabs(wg[i] - want_wg[i]) / (1e-2 + std::fabs(want_wg[i])));
    }
    report(finite && worst_dx <= 1e-2 && worst_wg <= 1e-4,
           "rms_norm_backward: %d rows, dim %d%s, groups of %d: dx max relative error %.2e, weight "
           "gradient %.2e%s",
           rows, dim, dim % 8 == 0 ? " (16-byte path)" : "", row_group, worst_dx, worst_wg,
           finite ? "" : ", UNWRITTEN OR NON-FINITE OUTPUT");
}

// ---------------------------------------------------------------------------------------
// The bias gradient (column sums of row groups, then the groups added in order) against
// float64.

void check_bias_grad(int rows, int cols, int row_group, unsigned long long seed) {
    Rng rng(seed);
    const auto dy = random_bf16(rng, static_cast<std::size_t>(rows) * cols, 1.0f);
    const int groups = (rows + row_group - 1) / row_group;
    std::vector<float> grad(cols, -0.5f);  // accumulated into
    std::vector<float> partial(static_cast<std::size_t>(groups) * cols, F32_POISON);
    BiasGradArgs a{addr(dy.data()), addr(partial.data()), rows, cols, row_group, 0};
    const int tile = cols % 8 == 0 ? 256 : 32;
    ge_emu::launch(ge_bias_grad_bf16,
                   dim3{static_cast<unsigned int>((cols + tile - 1) / tile), static_cast<unsigned int>((groups + 7) / 8), 1},
                   dim3{32, 8, 1}, a);
    ColumnReduceArgs ra{addr(partial.data()), addr(grad.data()), groups, cols};
    ge_emu::launch(ge_column_partials_reduce, dim3{static_cast<unsigned int>((cols + 31) / 32), 1, 1},
                   dim3{32, 8, 1}, ra);
    double worst = 0.0;
    bool finite = true;
    for (int c = 0; c < cols; ++c) {
        double want = -0.5;
        double mag = 0.5;
        for (int r = 0; r < rows; ++r) {
            const double v = bf16_value(dy[static_cast<std::size_t>(r) * cols + c]);
            want += v;
            mag += std::fabs(v);
        }
        if (!std::isfinite(grad[c])) finite = false;
        worst = std::max(worst, std::fabs(grad[c] - want) / mag);
    }
    report(finite && worst <= 1e-6, "bias gradient: %d rows, %d columns%s, groups of %d: max error / sum of magnitudes %.2e%s",
           rows, cols, cols % 8 == 0 ? " (16-byte path)" : "", row_group, worst,
           finite ? "" : ", UNWRITTEN OR NON-FINITE OUTPUT");
}

// ---------------------------------------------------------------------------------------
// The grid-stride elementwise kernels' eight-element (16-byte) paths against their one-at-a-
// time definitions, exactly: aligned buffers with tails, and buffers one element off 16-byte
// alignment (the scalar path).

float f32_of(unsigned short b) { return bf16_value(b); }

void check_elementwise_vectors(unsigned long long seed) {
    Rng rng(seed);
    bool ok = true;
    std::string failed;
    auto fail = [&](const char* what) {
        ok = false;
        failed += std::string(" ") + what;
    };
    const dim3 grid{3, 1, 1}, block{64, 1, 1};  // fewer threads than vectors: the loops stride
    for (long long n : {1LL, 7LL, 8LL, 1000LL, 4099LL}) {
        for (int off : {0, 1}) {  // element offset of every buffer: 1 breaks 16-byte alignment
            const std::size_t total = static_cast<std::size_t>(n) + 8;
            // bf16 += bf16, f32 += f32, f32 += bf16.
            auto xb = random_bf16(rng, total, 3.0f), yb = random_bf16(rng, total, 3.0f);
            std::vector<float> xf(total), yf(total);
            for (auto& v : xf) v = rng.uniform() * 3.0f;
            for (auto& v : yf) v = rng.uniform() * 3.0f;
            auto want_b = xb;
            auto want_f = xf;
            auto want_fb = xf;
            for (long long i = 0; i < n; ++i) {
                want_b[off + i] = ge_emu::f32_to_bf16_bits(f32_of(xb[off + i]) + f32_of(yb[off + i]));
                want_f[off + i] = xf[off + i] + yf[off + i];
                want_fb[off + i] = xf[off + i] + f32_of(yb[off + i]);
            }
            auto got_b = xb;
            auto got_f = xf;
            auto got_fb = xf;
            ge_emu::launch(ge_add_assign_bf16, grid, block, AddAssignArgs{addr(got_b.data() + off), addr(yb.data() + off), n});
            ge_emu::launch(ge_add_assign_f32, grid, block, AddAssignArgs{addr(got_f.data() + off), addr(yf.data() + off), n});
            ge_emu::launch(ge_add_assign_f32_bf16, grid, block, AddAssignArgs{addr(got_fb.data() + off), addr(yb.data() + off), n});
            if (got_b != want_b) fail("add_assign_bf16");
            if (got_f != want_f) fail("add_assign_f32");
            if (got_fb != want_fb) fail("add_assign_f32_bf16");
            // Scale.
            auto sb = xb;
            auto sf = xf;
            auto want_sb = xb;
            auto want_sf = xf;
            for (long long i = 0; i < n; ++i) {
                want_sb[off + i] = ge_emu::f32_to_bf16_bits(f32_of(xb[off + i]) * 0.37f);
                want_sf[off + i] = xf[off + i] * 0.37f;
            }
            ge_emu::launch(ge_scale_bf16, grid, block, ScaleArgs{addr(sb.data() + off), n, 0.37f});
            ge_emu::launch(ge_scale_f32, grid, block, ScaleArgs{addr(sf.data() + off), n, 0.37f});
            if (sb != want_sb) fail("scale_bf16");
            if (sf != want_sf) fail("scale_f32");
            // Casts both ways.
            std::vector<unsigned short> cb(total, BF16_NAN), want_cb(total, BF16_NAN);
            std::vector<float> cf(total, F32_POISON), want_cf(total, F32_POISON);
            for (long long i = 0; i < n; ++i) {
                want_cb[off + i] = ge_emu::f32_to_bf16_bits(xf[off + i]);
                want_cf[off + i] = f32_of(xb[off + i]);
            }
            ge_emu::launch(ge_cast_f32_bf16, grid, block, CastArgs{addr(xf.data() + off), addr(cb.data() + off), n});
            ge_emu::launch(ge_cast_bf16_f32, grid, block, CastArgs{addr(xb.data() + off), addr(cf.data() + off), n});
            if (cb != want_cb) fail("cast_f32_bf16");
            if (std::memcmp(cf.data(), want_cf.data(), total * 4) != 0) fail("cast_bf16_f32");
            // Sums of squares (f64 partials per block, added here in order) against float64.
            std::vector<double> partials(grid.x, -1.0);
            double want_ss = 0.0, got_ss = 0.0;
            for (long long i = 0; i < n; ++i) want_ss += static_cast<double>(xf[off + i]) * xf[off + i];
            ge_emu::launch(ge_sum_squares_f32, grid, block, SumSquaresArgs{addr(xf.data() + off), addr(partials.data()), n});
            for (double p : partials) got_ss += p;
            if (std::fabs(got_ss - want_ss) > 1e-12 * want_ss) fail("sum_squares_f32");
            want_ss = got_ss = 0.0;
            for (long long i = 0; i < n; ++i) want_ss += static_cast<double>(f32_of(xb[off + i])) * f32_of(xb[off + i]);
            ge_emu::launch(ge_sum_squares_bf16, grid, block, SumSquaresArgs{addr(xb.data() + off), addr(partials.data()), n});
            for (double p : partials) got_ss += p;
            if (std::fabs(got_ss - want_ss) > 1e-12 * want_ss) fail("sum_squares_bf16");
        }
    }
    // Column copies (the q/k/v split: widths and offsets in whole 16-byte pieces; and not) and
    // row gathers (rows of whole pieces; and not), bf16 and f32.
    for (auto [cols, src_width, src_col, dst_width, dst_col] :
         std::vector<std::array<int, 5>>{{128, 1152, 1024, 128, 0}, {896, 1152, 0, 1024, 128}, {5, 13, 3, 9, 2}, {8, 20, 4, 16, 8}}) {
        const int rows = 7;
        auto src = random_bf16(rng, static_cast<std::size_t>(rows) * src_width, 1.0f);
        std::vector<float> srcf(src.size());
        for (std::size_t i = 0; i < src.size(); ++i) srcf[i] = f32_of(src[i]);
        std::vector<unsigned short> dst(static_cast<std::size_t>(rows) * dst_width, BF16_NAN), want = dst;
        std::vector<float> dstf(dst.size(), F32_POISON), wantf = dstf;
        for (int r = 0; r < rows; ++r) {
            for (int c = 0; c < cols; ++c) {
                want[static_cast<std::size_t>(r) * dst_width + dst_col + c] = src[static_cast<std::size_t>(r) * src_width + src_col + c];
                wantf[static_cast<std::size_t>(r) * dst_width + dst_col + c] = srcf[static_cast<std::size_t>(r) * src_width + src_col + c];
            }
        }
        CopyColumnsArgs ca{addr(src.data()), addr(dst.data()), rows, cols, src_width, src_col, dst_width, dst_col};
        ge_emu::launch(ge_copy_columns_bf16, grid, block, ca);
        CopyColumnsArgs cf{addr(srcf.data()), addr(dstf.data()), rows, cols, src_width, src_col, dst_width, dst_col};
        ge_emu::launch(ge_copy_columns_f32, grid, block, cf);
        if (dst != want) fail("copy_columns_bf16");
        if (std::memcmp(dstf.data(), wantf.data(), dstf.size() * 4) != 0) fail("copy_columns_f32");
    }
    for (int width : {896, 12, 13}) {
        const int src_rows = 9;
        auto src = random_bf16(rng, static_cast<std::size_t>(src_rows) * width, 1.0f);
        std::vector<float> srcf(src.size());
        for (std::size_t i = 0; i < src.size(); ++i) srcf[i] = f32_of(src[i]);
        const std::vector<unsigned int> idx = {3, 0, 8, 3, 5};
        const int count = static_cast<int>(idx.size());
        std::vector<unsigned short> dst(static_cast<std::size_t>(count) * width, BF16_NAN), want = dst;
        std::vector<float> dstf(dst.size(), F32_POISON), wantf = dstf;
        for (int i = 0; i < count; ++i) {
            for (int c = 0; c < width; ++c) {
                want[static_cast<std::size_t>(i) * width + c] = src[static_cast<std::size_t>(idx[i]) * width + c];
                wantf[static_cast<std::size_t>(i) * width + c] = srcf[static_cast<std::size_t>(idx[i]) * width + c];
            }
        }
        ge_emu::launch(ge_gather_rows_bf16, grid, block, GatherRowsArgs{addr(src.data()), addr(dst.data()), addr(idx.data()), count, width});
        ge_emu::launch(ge_gather_rows_f32, grid, block, GatherRowsArgs{addr(srcf.data()), addr(dstf.data()), addr(idx.data()), count, width});
        if (dst != want) fail("gather_rows_bf16");
        if (std::memcmp(dstf.data(), wantf.data(), dstf.size() * 4) != 0) fail("gather_rows_f32");
    }
    report(ok, "elementwise kernels, 16-byte and one-element paths (add_assign x3, scale x2, casts x2, "
               "sum_squares x2, copy_columns x2, gather_rows x2): %s",
           ok ? "exact" : ("DIFFER:" + failed).c_str());
}

// The KV block copies of copy-on-write (ge_copy_blocks_bf16) on a pool of `blocks` blocks of
// `block_elems` bf16 (16-byte path when a multiple of 8), and the row scatter-add (the
// embedding's backward, every destination / source type pair), exactly against their
// definitions: destination blocks are the sources' bits and nothing else changes; each target
// row gets its group's source rows added in order in f32, rounded once.
void check_copy_blocks_and_scatter_add(unsigned long long seed) {
    Rng rng(seed);
    bool ok = true;
    std::string failed;
    auto fail = [&](const std::string& what) {
        ok = false;
        failed += " " + what;
    };
    for (long long block_elems : {16LL * 64, 7LL * 20, 5LL}) {
        const int blocks = 9;
        auto pool = random_bf16(rng, static_cast<std::size_t>(blocks * block_elems), 2.0f);
        const std::vector<unsigned int> pairs = {0, 5, 3, 8, 3, 1};  // (source, destination)
        auto want = pool;
        for (std::size_t c = 0; c < pairs.size(); c += 2) {
            std::copy(pool.begin() + pairs[c] * block_elems, pool.begin() + (pairs[c] + 1) * block_elems,
                      want.begin() + pairs[c + 1] * block_elems);
        }
        // Fewer threads than a block's vectors in x: the loop strides; y is the copy.
        ge_emu::launch(ge_copy_blocks_bf16, dim3{2, 3, 1}, dim3{32, 1, 1},
                       CopyBlocksArgs{addr(pool.data()), addr(pairs.data()), block_elems, 3});
        if (pool != want) fail("copy_blocks (" + std::to_string(block_elems) + " elements per block)");
    }
    const int width = 37, src_rows = 11, dst_rows = 6;
    // Groups (destination row <- source rows, ascending): 4 <- {0, 3, 9}, 1 <- {2}, 5 <- {1, 4, 5, 10}.
    const std::vector<unsigned int> order = {0, 3, 9, 2, 1, 4, 5, 10};
    const std::vector<unsigned int> segments = {0, 3, 4, 8};
    const std::vector<unsigned int> targets = {4, 1, 5};
    const int groups = 3;
    auto src_b = random_bf16(rng, static_cast<std::size_t>(src_rows * width), 2.0f);
    std::vector<float> src_f(static_cast<std::size_t>(src_rows * width));
    for (auto& v : src_f) v = rng.uniform() * 2.0f;
    auto dst_b0 = random_bf16(rng, static_cast<std::size_t>(dst_rows * width), 2.0f);
    std::vector<float> dst_f0(static_cast<std::size_t>(dst_rows * width));
    for (auto& v : dst_f0) v = rng.uniform() * 2.0f;
    // The definition, for source values `sv` and destination values `dv` (as f32).
    auto sums = [&](auto sv, auto dv) {
        std::vector<float> out(static_cast<std::size_t>(dst_rows * width));
        for (int r = 0; r < dst_rows; ++r)
            for (int c = 0; c < width; ++c) out[r * width + c] = dv(r * width + c);
        for (int g = 0; g < groups; ++g) {
            for (int c = 0; c < width; ++c) {
                float acc = dv(targets[g] * width + c);
                for (unsigned int k = segments[g]; k < segments[g + 1]; ++k) acc += sv(order[k] * width + c);
                out[targets[g] * width + c] = acc;
            }
        }
        return out;
    };
    auto sb = [&](int i) { return f32_of(src_b[i]); };
    auto sf = [&](int i) { return src_f[i]; };
    auto db = [&](int i) { return f32_of(dst_b0[i]); };
    auto df = [&](int i) { return dst_f0[i]; };
    auto args = [&](void* dst, const void* src) {
        return ScatterAddRowsArgs{addr(dst), addr(src), addr(order.data()), addr(segments.data()),
                                  addr(targets.data()), groups, width};
    };
    auto as_bf16 = [](const std::vector<float>& v) {
        std::vector<unsigned short> b(v.size());
        for (std::size_t i = 0; i < v.size(); ++i) b[i] = ge_emu::f32_to_bf16_bits(v[i]);
        return b;
    };
    const dim3 grid{2, 1, 1}, block{32, 1, 1};
    {
        auto d = dst_b0;
        ge_emu::launch(ge_scatter_add_rows_bf16, grid, block, args(d.data(), src_b.data()));
        if (d != as_bf16(sums(sb, db))) fail("scatter_add_rows_bf16");
    }
    {
        auto d = dst_b0;
        ge_emu::launch(ge_scatter_add_rows_bf16_f32, grid, block, args(d.data(), src_f.data()));
        if (d != as_bf16(sums(sf, db))) fail("scatter_add_rows_bf16_f32");
    }
    {
        auto d = dst_f0;
        ge_emu::launch(ge_scatter_add_rows_f32, grid, block, args(d.data(), src_f.data()));
        if (d != sums(sf, df)) fail("scatter_add_rows_f32");
    }
    {
        auto d = dst_f0;
        ge_emu::launch(ge_scatter_add_rows_f32_bf16, grid, block, args(d.data(), src_b.data()));
        if (d != sums(sb, df)) fail("scatter_add_rows_f32_bf16");
    }
    report(ok, "KV block copies (16-byte and one-element paths) and the row scatter-add (4 type pairs): %s",
           ok ? "exact" : ("DIFFER:" + failed).c_str());
}

// ---------------------------------------------------------------------------------------
// `checks pair-losses IN OUT`: runs ge_pair_losses on the inputs in file IN and writes its
// outputs to OUT, for tests/kernel_emu.rs to compare with the host definition
// (genius::loss::pair_losses_host). Every number is its IEEE bits in hexadecimal.
//   IN:  kind clip_max beta alpha gamma tau      (kind, clip_max decimal; the rest f64 bits)
//        rows, then rows f32 bits
//        pairs, then per pair: 4 u32 (chosen start, end, rejected start, end), 6 f64 bits
//        (reference sums, token counts, advantages: chosen then rejected each)
//   OUT: per pair, GE_PAIR_LOSS_OUTPUTS f64 bits

double f64_of(const char* hex) {
    const unsigned long long bits = std::strtoull(hex, nullptr, 16);
    double d;
    std::memcpy(&d, &bits, 8);
    return d;
}

// Writes the bit patterns of v[0..n) to `path` in hexadecimal, one per line (8 or 16 digits
// by the element's size): the output files of the IN / OUT modes. 0, or 2 if it cannot write.
template <typename T>
int write_bits(const char* path, const T* v, std::size_t n) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "4- or 8-byte elements");
    FILE* o = std::fopen(path, "w");
    if (!o) {
        std::fprintf(stderr, "cannot write %s\n", path);
        return 2;
    }
    for (std::size_t i = 0; i < n; ++i) {
        unsigned long long bits = 0;
        std::memcpy(&bits, &v[i], sizeof(T));
        std::fprintf(o, "%0*llx\n", static_cast<int>(2 * sizeof(T)), bits);
    }
    std::fclose(o);
    return 0;
}

int run_pair_losses(const char* in_path, const char* out_path) {
    FILE* in = std::fopen(in_path, "r");
    if (!in) {
        std::fprintf(stderr, "pair-losses: cannot read %s\n", in_path);
        return 2;
    }
    char b[6][32];
    int kind = 0, clip = 0;
    if (std::fscanf(in, "%d %d %31s %31s %31s %31s", &kind, &clip, b[0], b[1], b[2], b[3]) != 6) {
        std::fprintf(stderr, "pair-losses: bad header in %s\n", in_path);
        return 2;
    }
    std::size_t rows = 0, pairs = 0;
    if (std::fscanf(in, "%zu", &rows) != 1) return 2;
    std::vector<float> lp(rows + 1);
    for (std::size_t i = 0; i < rows; ++i) {
        unsigned int bits = 0;
        if (std::fscanf(in, "%x", &bits) != 1) return 2;
        std::memcpy(&lp[i], &bits, 4);
    }
    if (std::fscanf(in, "%zu", &pairs) != 1) return 2;
    std::vector<unsigned int> seg(4 * pairs + 1);
    std::vector<double> inputs(6 * pairs + 1);
    for (std::size_t p = 0; p < pairs; ++p) {
        for (int k = 0; k < 4; ++k) {
            if (std::fscanf(in, "%u", &seg[4 * p + k]) != 1) return 2;
        }
        for (int k = 0; k < 6; ++k) {
            if (std::fscanf(in, "%31s", b[4]) != 1) return 2;
            inputs[6 * p + k] = f64_of(b[4]);
        }
    }
    std::fclose(in);
    std::vector<double> out(GE_PAIR_LOSS_OUTPUTS * pairs + 1, std::nan(""));
    PairLossArgs a{};
    a.row_logprobs = addr(lp.data());
    a.segments = addr(seg.data());
    a.inputs = addr(inputs.data());
    a.outputs = addr(out.data());
    a.pairs = static_cast<int>(pairs);
    a.kind = kind;
    a.clip_max = clip;
    a.beta = f64_of(b[0]);
    a.alpha = f64_of(b[1]);
    a.gamma = f64_of(b[2]);
    a.tau = f64_of(b[3]);
    ge_emu::launch(ge_pair_losses, dim3{static_cast<unsigned int>(pairs), 1, 1}, dim3{256, 1, 1}, a);
    return write_bits(out_path, out.data(), GE_PAIR_LOSS_OUTPUTS * pairs);
}

// ---------------------------------------------------------------------------------------
// `checks sample-rows IN OUT`: runs ge_sample_rows (f32 logits) or ge_sample_rows_bf16 on the
// rows in file IN and writes the packed output words to OUT, for tests/kernel_emu.rs to compare
// with the host port of the kernel's walk and the CPU sampler. Numbers in hexadecimal bits.
//   IN:  dtype rows vocab threads    (dtype 0 = f32, 1 = bf16; threads: GE_SAMPLE_THREADS)
//        rows x vocab logits          (f32 bits, or bf16 bits)
//        per row: seed seq_id temperature top_p top_k position
//                 (u64, u64, f32 bits, f32 bits, decimal, decimal)
//   OUT: per row, the 4 output words (token, logprob bits, sampling logprob bits, status)
int run_sample_rows(const char* in_path, const char* out_path) {
    FILE* in = std::fopen(in_path, "r");
    if (!in) {
        std::fprintf(stderr, "sample-rows: cannot read %s\n", in_path);
        return 2;
    }
    int dtype = 0, rows = 0, vocab = 0;
    unsigned int threads = 0;
    if (std::fscanf(in, "%d %d %d %u", &dtype, &rows, &vocab, &threads) != 4 || rows <= 0 ||
        vocab <= 0 || threads == 0) {
        std::fprintf(stderr, "sample-rows: bad header in %s\n", in_path);
        return 2;
    }
    const std::size_t n = static_cast<std::size_t>(rows) * vocab;
    std::vector<float> lf(dtype == 0 ? n : 1);
    std::vector<unsigned short> lb(dtype == 1 ? n : 1);
    for (std::size_t i = 0; i < n; ++i) {
        unsigned int bits = 0;
        if (std::fscanf(in, "%x", &bits) != 1) return 2;
        if (dtype == 0) std::memcpy(&lf[i], &bits, 4);
        else lb[i] = static_cast<unsigned short>(bits);
    }
    std::vector<SampleRowArgs> params(rows);
    for (int r = 0; r < rows; ++r) {
        unsigned long long seed = 0, seq = 0;
        unsigned int t = 0, p = 0, pos = 0;
        int k = 0;
        if (std::fscanf(in, "%llx %llx %x %x %d %u", &seed, &seq, &t, &p, &k, &pos) != 6) return 2;
        params[r].seed = seed;
        params[r].seq_id = seq;
        std::memcpy(&params[r].temperature, &t, 4);
        std::memcpy(&params[r].top_p, &p, 4);
        params[r].top_k = k;
        params[r].position = pos;
    }
    std::fclose(in);
    std::vector<unsigned int> out(4 * static_cast<std::size_t>(rows), 0xdeadbeefu);
    SampleArgs a{};
    a.logits = dtype == 0 ? addr(lf.data()) : addr(lb.data());
    a.params = addr(params.data());
    a.out = addr(out.data());
    a.rows = rows;
    a.vocab = vocab;
    ge_emu::launch(dtype == 0 ? ge_sample_rows : ge_sample_rows_bf16,
                   dim3{static_cast<unsigned int>(rows), 1, 1}, dim3{threads, 1, 1}, a);
    return write_bits(out_path, out.data(), out.size());
}

// `checks sampling-exp IN OUT`: ge_sampling_exp_values (the sampling definition's f32
// exponential) on IN's values; OUT gets the results' bits, for tests/kernel_emu.rs to compare
// with the CPU's `sampling_exp` bit for bit (the kernel's source against the Rust one).
//   IN:  n, then n f32 bits.   OUT: n f32 bits.
int run_sampling_exp(const char* in_path, const char* out_path) {
    FILE* in = std::fopen(in_path, "r");
    if (!in) {
        std::fprintf(stderr, "sampling-exp: cannot read %s\n", in_path);
        return 2;
    }
    std::size_t n = 0;
    if (std::fscanf(in, "%zu", &n) != 1) return 2;
    std::vector<float> x(n + 1), y(n + 1, std::nanf(""));
    for (std::size_t i = 0; i < n; ++i) {
        unsigned int bits = 0;
        if (std::fscanf(in, "%x", &bits) != 1) return 2;
        std::memcpy(&x[i], &bits, 4);
    }
    std::fclose(in);
    CastArgs a{};
    a.src = addr(x.data());
    a.dst = addr(y.data());
    a.n = static_cast<long long>(n);
    ge_emu::launch(ge_sampling_exp_values, dim3{4, 1, 1}, dim3{256, 1, 1}, a);
    return write_bits(out_path, y.data(), n);
}

// `checks adamw IN OUT`: ge_adamw_update (kernels/optim.cu), with the bf16 working copy, on
// IN's tensors; OUT gets the updated master, moments and working copy, for tests/kernel_emu.rs
// to compare with the host's `adamw_update_host` bit for bit.
//   IN:  the 9 scalars of AdamWArgs (beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
//        step_size, inv_sqrt_bias2, decay, grad_scale) as f32 bits; n; then n f32 bits each
//        of the master, m, v and the gradient.
//   OUT: n f32 bits each of the master, m and v, then n bf16 bits (as 32-bit words).
int run_adamw(const char* in_path, const char* out_path) {
    FILE* in = std::fopen(in_path, "r");
    if (!in) {
        std::fprintf(stderr, "adamw: cannot read %s\n", in_path);
        return 2;
    }
    auto read_f32 = [&](float& x) {
        unsigned int bits = 0;
        if (std::fscanf(in, "%x", &bits) != 1) return false;
        std::memcpy(&x, &bits, 4);
        return true;
    };
    float scalars[9];
    for (float& x : scalars) {
        if (!read_f32(x)) return 2;
    }
    std::size_t n = 0;
    if (std::fscanf(in, "%zu", &n) != 1) return 2;
    std::vector<float> t(4 * n + 1);
    for (std::size_t i = 0; i < 4 * n; ++i) {
        if (!read_f32(t[i])) return 2;
    }
    std::fclose(in);
    std::vector<unsigned short> out(n + 1, 0x7fc0);
    AdamWArgs a{};
    a.master = addr(t.data());
    a.m = addr(t.data() + n);
    a.v = addr(t.data() + 2 * n);
    a.grad = addr(t.data() + 3 * n);
    a.n = static_cast<long long>(n);
    a.beta1 = scalars[0];
    a.beta2 = scalars[1];
    a.one_minus_beta1 = scalars[2];
    a.one_minus_beta2 = scalars[3];
    a.eps = scalars[4];
    a.step_size = scalars[5];
    a.inv_sqrt_bias2 = scalars[6];
    a.decay = scalars[7];
    a.grad_scale = scalars[8];
    a.out_bf16 = addr(out.data());
    // Fewer threads than elements: the grid-stride loop runs.
    ge_emu::launch(ge_adamw_update, dim3{3, 1, 1}, dim3{64, 1, 1}, a);
    std::vector<unsigned int> words(4 * n + 1);
    for (std::size_t i = 0; i < 3 * n; ++i) std::memcpy(&words[i], &t[i], 4);
    for (std::size_t i = 0; i < n; ++i) words[3 * n + i] = out[i];
    return write_bits(out_path, words.data(), 4 * n);
}

}  // namespace

// The emulation's own guarantees (tools/kernel-emu/selftest.cu), which the other checks rely
// on to catch missing barriers, missing initialisations and cp.async races.
void emulator_checks() {
    using ge_emu::Order;
    const Order order = ge_emu::thread_order();
    std::vector<unsigned int> in(4 * 32), out(2 * 64, 0u);
    for (unsigned int i = 0; i < in.size(); ++i) in[i] = 1000u + i;
    SelfTestArgs a{in.data(), out.data()};
    // Fresh shared memory in each of two blocks, in a template kernel.
    ge_emu::launch(ge_selftest_fresh_shared, dim3{2, 1, 1}, dim3{64, 1, 1}, a);
    bool fresh = true;
    for (unsigned int w : out) fresh = fresh && w == 0xcdcdcdcdu;
    report(fresh, "emulator: shared memory is garbage (0xcd) at the start of every block, a template kernel's too (second block read %08x)", out[64]);
    if (order != Order::Parallel) {
        out.assign(out.size(), 0u);
        ge_emu::launch(ge_selftest_missing_barrier, dim3{1, 1, 1}, dim3{64, 1, 1}, a);
        const unsigned int want = order == Order::Ascending ? 7u : 42u;
        report(out[0] == want, "emulator: a read of another warp's write with no barrier between sees %s value (%u)",
               order == Order::Ascending ? "the old" : "the new", out[0]);
    }
    out.assign(out.size(), 0u);
    ge_emu::launch(ge_selftest_async_landing, dim3{1, 1, 1}, dim3{32, 1, 1}, a);
    const bool at_issue = ge_emu::async_lands_at_issue();
    bool landed = true;
    for (unsigned int t = 0; t < 32; ++t) {
        landed = landed && out[2 * t] == (at_issue ? in[4 * t] : 0u) && out[2 * t + 1] == in[4 * t];
    }
    report(landed, "emulator: cp.async copies land at the %s", at_issue ? "issue" : "wait");
    if (order != Order::Parallel) {
        // The synced form runs through and gives ldmatrix's fragments (lane l, register j:
        // word l of matrix j); `checks emulator-unsynced` (tests/kernel_emu.rs) must stop.
        out.assign(out.size(), 0u);
        ge_emu::launch(ge_selftest_ldmatrix_synced, dim3{1, 1, 1}, dim3{32, 1, 1}, a);
        bool fragments = true;
        for (unsigned int l = 0; l < 32; ++l) {
            fragments = fragments && out[2 * l] == in[l] && out[2 * l + 1] == in[32 + l];
        }
        report(fragments, "emulator: ldmatrix after cp.async and __syncwarp reads the landed rows as fragments");
    }
}

// `checks emulator-unsynced`: ldmatrix of other lanes' cp.async rows with no barrier between,
// which the one-at-a-time orders must refuse (the run aborts).
int run_emulator_unsynced() {
    std::vector<unsigned int> in(4 * 32, 1u), out(2 * 64, 0u);
    ge_emu::launch(ge_selftest_ldmatrix_unsynced, dim3{1, 1, 1}, dim3{32, 1, 1}, SelfTestArgs{in.data(), out.data()});
    std::printf("emulator-unsynced: the run was NOT stopped\n");
    return 1;
}

int main(int argc, char** argv) {
    const std::string only = argc > 1 ? argv[1] : "";
    if (only == "pair-losses") {
        if (argc != 4) {
            std::fprintf(stderr, "usage: checks pair-losses IN OUT\n");
            return 2;
        }
        return run_pair_losses(argv[2], argv[3]);
    }
    if (only == "sample-rows") {
        if (argc != 4) {
            std::fprintf(stderr, "usage: checks sample-rows IN OUT\n");
            return 2;
        }
        return run_sample_rows(argv[2], argv[3]);
    }
    if (only == "adamw") {
        if (argc != 4) {
            std::fprintf(stderr, "usage: checks adamw IN OUT\n");
            return 2;
        }
        return run_adamw(argv[2], argv[3]);
    }
    if (only == "emulator-unsynced") return run_emulator_unsynced();
    if (only == "sampling-exp") {
        if (argc != 4) {
            std::fprintf(stderr, "usage: checks sampling-exp IN OUT\n");
            return 2;
        }
        return run_sampling_exp(argv[2], argv[3]);
    }
    if (only.empty() || only == "emulator") emulator_checks();
    if (only.empty() || only == "attention") paged_attention_checks();
    if (only.empty() || only == "logprobs") logprob_checks();
    if (only.empty() || only == "gemm") skinny_gemm_checks();
    if (only.empty() || only == "swiglu") swiglu_checks();
    if (only.empty() || only == "kv") {
        check_kv_writes(51);
        check_kv_writes(52, 20);  // half = 10: the one-pair path
    }
    if (only.empty() || only == "norm") {
        check_norms(11, 896, 71);
        check_norms(3, 13, 72);
        check_norms(9, 64, 73);
        // The host's smaller blocks for few rows: one and three rows per block.
        check_norms(5, 896, 74, 1);
        check_norms(7, 40, 75, 3);
        // Backward: several row groups and group tiles, a partial last group; both paths.
        check_rms_norm_backward(83, 896, 8, 76);
        check_rms_norm_backward(37, 33, 32, 77);
        check_rms_norm_backward(9, 264, 4, 78);
        check_bias_grad(300, 1152, 32, 79);
        check_bias_grad(77, 45, 8, 80);
    }
    if (only.empty() || only == "elementwise") {
        check_elementwise_vectors(81);
        check_copy_blocks_and_scatter_add(82);
    }
    if (only.empty() || only == "training-attention") training_attention_checks();
    std::printf("kernel-emu: %d of %d checks passed\n", checks - failures, checks);
    return failures == 0 ? 0 : 1;
}
