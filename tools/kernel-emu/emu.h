// A CPU emulation of the small part of CUDA that the CUDA-core kernels of kernels/ use, so that
// their real source runs on a machine without a GPU (tools/kernel-emu.sh compiles each kernel
// unit with g++ and this header force-included; tests/kernel_emu.rs runs the result).
//
// A launch runs its blocks one after another. Each block runs every one of its threads as an
// OS thread: __syncthreads is a barrier over the block's live threads, a warp shuffle two
// barriers over the warp's live threads (each lane publishes its value, then reads its
// partner's). A thread that returns leaves both barriers, as exited threads do on the GPU.
// `__shared__` variables become statics: one instance, which is right while one block runs at
// a time. tools/kernel-emu.sh rewrites each declaration `__shared__ T name[dims];` as
// GE_EMU_SHARED(T, name, [dims]), which also fills the variable with 0xcd bytes the first time
// a thread of each block reaches it (as the dynamic shared memory is at every block): the
// device's shared memory starts undefined, so a kernel that reads a shared variable before its
// block wrote it (a missing initialisation, or a missing barrier after one) reads garbage here
// too instead of a friendly zero or the previous block's value.
//
// The tensor-core instructions the attention kernels use (mma.sync m16n8k16, bf16 in, f32
// accumulate; ldmatrix, plain and transposed) are emulated per warp from the PTX ISA's
// fragment layouts, and cp.async per thread (the copies land at the wait); the kernels call
// them instead of their inline PTX when built with GE_KERNEL_EMU. __syncwarp is a barrier
// over the warp's live threads.
//
// Thread order ($GE_EMU_ORDER): `parallel` (the default) runs a block's threads at once, in
// whatever order the OS gives them. `ascending` and `descending` run them one at a time, as
// fibers: the runnable thread of lowest rank (highest, descending) runs until it reaches a
// barrier (or a warp-wide operation, or returns), then the runnable thread of lowest rank
// takes over. So the first warp runs ahead of the others up to each __syncthreads, and lanes
// run in rank order between the warp's barriers: a read of another thread's write that lacks
// a barrier sees the old value in one of the two orders, every time, where the parallel
// order hits it by chance. These orders also track the shared-memory pieces each thread's
// cp.async landed: ldmatrix reading one that another thread landed, before that thread
// passed a __syncthreads / __syncwarp, aborts the run (the warp-wide operations synchronise
// the emulation's lanes, so stale data alone would not show that missing barrier).
//
// When cp.async copies land ($GE_EMU_ASYNC): `wait` (the default) lands them at the thread's
// cp.async.wait, the latest the device may; `issue` lands them at the cp.async itself (and
// again at the wait), the earliest: then a refill issued while other threads may still read
// the stage it overwrites (a missing barrier before the refill: a write-after-read race) gives
// those threads the new data, where landing at the wait would hide it behind the wait.
//
// What it does not model: timing, occupancy, memory coalescing, the tensor cores' internal
// accumulation order, and the differences between the device's and the host's math functions
// (expf, logf: a few ulps).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <ucontext.h>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define GE_EMU_SHARED(type, name, dims) \
    static type name dims;              \
    ::ge_emu::shared_declared(&name, sizeof(name))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __restrict__

namespace ge_emu {

// $GE_EMU_ORDER (see the top of this file).
enum class Order { Parallel, Ascending, Descending };
inline Order thread_order() {
    static const Order order = [] {
        const char* v = std::getenv("GE_EMU_ORDER");
        const std::string s = v ? v : "parallel";
        if (s == "parallel") return Order::Parallel;
        if (s == "ascending") return Order::Ascending;
        if (s == "descending") return Order::Descending;
        std::fprintf(stderr, "emu: GE_EMU_ORDER=%s: want parallel, ascending or descending\n",
                     s.c_str());
        std::exit(2);
    }();
    return order;
}

// $GE_EMU_ASYNC (see the top of this file): whether cp.async copies land at issue.
inline bool async_lands_at_issue() {
    static const bool at_issue = [] {
        const char* v = std::getenv("GE_EMU_ASYNC");
        const std::string s = v ? v : "wait";
        if (s == "wait") return false;
        if (s == "issue") return true;
        std::fprintf(stderr, "emu: GE_EMU_ASYNC=%s: want wait or issue\n", s.c_str());
        std::exit(2);
    }();
    return at_issue;
}

class Barrier;

// The one-at-a-time orders run a block's threads as fibers (ucontext) on the launching OS
// thread: a thread that reaches a barrier switches back to the scheduler, which resumes the
// runnable thread of lowest rank (highest when descending). No locks: one fiber runs at a
// time.
// One queued cp.async (see cp_async16 below).
struct AsyncCopy {
    void* dst;
    const void* src;
    bool valid;
};
// A fiber's saved context. On x86-64 a fiber switch is a few instructions of our own
// (ge_emu_switch: the callee-saved registers and the SSE / x87 control words on the stack,
// then the stack pointer); elsewhere ucontext's swapcontext, which also saves the signal mask
// by a system call on every switch (several times slower: the emulation switches fibers at
// every barrier, shuffle and warp-wide operation of every thread).
#if defined(__x86_64__) && defined(__ELF__) && !defined(_WIN32)
#define GE_EMU_FAST_SWITCH 1
extern "C" void ge_emu_switch(void** save_sp, void* load_sp);
// Defined once, in the checks program (built with GE_EMU_MAIN); System V calling convention.
// Fibers return into frames that were never called, so the build turns off shadow stacks
// (-fcf-protection=none in kernel-emu.sh).
#ifdef GE_EMU_MAIN
asm(R"(
    .text
    .globl ge_emu_switch
    .type ge_emu_switch, @function
ge_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size ge_emu_switch, .-ge_emu_switch
)");
#endif
#endif
struct FiberContext {
#ifdef GE_EMU_FAST_SWITCH
    void* sp = nullptr;
#else
    ucontext_t uc;
#endif
};
// Saves the running context in `from` and resumes `to`.
inline void switch_context(FiberContext& from, FiberContext& to) {
#ifdef GE_EMU_FAST_SWITCH
    ge_emu_switch(&from.sp, to.sp);
#else
    swapcontext(&from.uc, &to.uc);
#endif
}
// Makes `c` start `entry` (which must never return) on the given stack.
inline void start_context(FiberContext& c, char* stack, std::size_t size, void (*entry)()) {
#ifdef GE_EMU_FAST_SWITCH
    // The frame ge_emu_switch pops: control words, six registers, then `entry` as the return
    // address, placed so that `entry` starts with the stack aligned as after a call.
    const auto top = (reinterpret_cast<std::uintptr_t>(stack) + size) & ~std::uintptr_t{15};
    auto* ret = reinterpret_cast<std::uint64_t*>(top - 16);
    ret[0] = reinterpret_cast<std::uint64_t>(entry);
    for (int i = 1; i <= 6; ++i) ret[-i] = 0;
    auto* words = reinterpret_cast<std::uint32_t*>(ret - 7);
    std::uint32_t mxcsr;
    std::uint16_t fpcw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpcw));
    words[0] = mxcsr;
    words[1] = fpcw;
    c.sp = ret - 7;
#else
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
#endif
}

struct Fiber {
    FiberContext context;
    std::vector<AsyncCopy> async_open;  // its cp.async state while it does not run
    std::vector<std::vector<AsyncCopy>> async_groups;
    const Barrier* waiting_on = nullptr;  // the barrier it waits at, or null
    unsigned long long waiting_phase = 0;
    bool done = false;
};
// Stack of each fiber (untouched pages cost nothing).
constexpr std::size_t kFiberStack = 512 * 1024;
// The fibers' stacks, kept for the next launch (fresh ones would be mapped, faulted in page by
// page and unmapped again at every launch): at least n of them.
inline char* fiber_stack(unsigned int i) {
    static thread_local std::vector<std::unique_ptr<char[]>> stacks;
    while (stacks.size() <= i) stacks.push_back(std::make_unique<char[]>(kFiberStack));
    return stacks[i].get();
}
struct Sequencer {
    bool descending = false;
    std::vector<Fiber> fibers;
    FiberContext scheduler;
    unsigned int running = 0;
    // Scan position (k-th thread in rank order) from which the scheduler looks for the next
    // runnable thread: every thread before it is known not to be runnable. A barrier that
    // completes wakes its waiters and moves it back to its first participant's position.
    unsigned int cursor = 0;
    std::function<void()> body;  // the kernel with its arguments
    bool runnable(unsigned int t) const;
    void woke(unsigned int position) { cursor = std::min(cursor, position); }
    // Back to the scheduler from the running fiber.
    void yield() { switch_context(fibers[running].context, scheduler); }
};
extern Sequencer* sequencer;  // set during a launch in the one-at-a-time orders

// A barrier over a fixed set of threads (a block, or one warp's lanes), of either kind.
class Barrier {
  public:
    explicit Barrier(unsigned int participants) : participants_(participants) {
        if (sequencer == nullptr) parallel_ = std::make_unique<std::barrier<>>(participants);
    }
    void arrive_and_wait();
    void arrive_and_drop();
    unsigned long long phase() const { return phase_; }
    // One-at-a-time orders: the scan position of the participant that comes first in the
    // order (where the scheduler looks again when this barrier completes).
    unsigned int first_position = 0;

  private:
    void complete() {
        arrived_ = 0;
        ++phase_;
        if (sequencer != nullptr) sequencer->woke(first_position);
    }
    std::unique_ptr<std::barrier<>> parallel_;
    unsigned int participants_;
    unsigned int arrived_ = 0;
    unsigned long long phase_ = 0;
};

inline bool Sequencer::runnable(unsigned int t) const {
    const Fiber& f = fibers[t];
    return !f.done && (f.waiting_on == nullptr || f.waiting_on->phase() > f.waiting_phase);
}

// The running block: its barriers, the warps' shuffle slots and its dynamic shared memory.
struct Block {
    std::unique_ptr<Barrier> all;
    std::vector<std::unique_ptr<Barrier>> warps;
    std::vector<unsigned long long> slots;  // one per thread
    std::vector<std::array<unsigned int, 6>> mma;  // one per thread: a0..a3, b0, b1
    std::vector<unsigned char> dynamic_shared;
    // One-at-a-time orders only: the 16-byte pieces that a thread's cp.async landed at its
    // wait and that it has not yet published by a barrier (piece address -> thread), and each
    // thread's list of them. ldmatrix reading another thread's piece from here is the
    // missing-barrier bug the device would show as stale data now and then.
    std::unordered_map<std::uintptr_t, unsigned int> unpublished;
    // The shared variables this block has reached (and filled with 0xcd bytes).
    std::unordered_set<const void*> poisoned;
    std::mutex poisoned_mutex;
    std::vector<std::vector<std::uintptr_t>> unpublished_by;
    unsigned long long visibility_errors = 0;
};

extern Block* block;
extern thread_local unsigned int thread_rank;  // linear index in the block

// A thread of the running block reaches the declaration of the shared variable at `p`: the
// first one fills it with 0xcd bytes (GE_EMU_SHARED).
inline void shared_declared(const void* p, std::size_t bytes) {
    std::lock_guard<std::mutex> lock(block->poisoned_mutex);
    if (block->poisoned.insert(p).second) std::memset(const_cast<void*>(p), 0xcd, bytes);
}

inline unsigned char* dynamic_shared() {
    // 16-byte aligned, as the device's dynamic shared memory.
    auto p = reinterpret_cast<std::uintptr_t>(block->dynamic_shared.data());
    return reinterpret_cast<unsigned char*>((p + 15) & ~std::uintptr_t{15});
}

// The calling thread reaches a barrier: the pieces its cp.async landed are visible to the
// barrier's other threads once it completes (their reads wait for it).
inline void publish_async_copies() {
    auto& mine = block->unpublished_by[thread_rank];
    for (const std::uintptr_t p : mine) {
        const auto it = block->unpublished.find(p);
        if (it != block->unpublished.end() && it->second == thread_rank) block->unpublished.erase(it);
    }
    mine.clear();
}

inline void Barrier::arrive_and_wait() {
    if (parallel_) {
        parallel_->arrive_and_wait();
        return;
    }
    Fiber& f = sequencer->fibers[thread_rank];
    f.waiting_on = this;
    f.waiting_phase = phase_;
    if (++arrived_ == participants_) complete();
    sequencer->yield();
    f.waiting_on = nullptr;
}

inline void Barrier::arrive_and_drop() {
    if (parallel_) {
        parallel_->arrive_and_drop();
        return;
    }
    --participants_;
    if (arrived_ > 0 && arrived_ == participants_) complete();
}

inline unsigned int warp_of_thread() { return thread_rank / 32; }
inline unsigned int lane_of_thread() { return thread_rank % 32; }

// Round to nearest even, NaN kept a (quiet) NaN: PTX cvt.rn.bf16.f32.
inline unsigned short f32_to_bf16_bits(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((u >> 16) | 0x40);
    const unsigned int rounding = 0x7fffu + ((u >> 16) & 1u);
    return static_cast<unsigned short>((u + rounding) >> 16);
}

template <typename T>
T shuffle(T v, unsigned int src_lane) {
    static_assert(sizeof(T) <= 8, "shuffle of a value over 8 bytes");
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    const unsigned int warp = warp_of_thread();
    block->slots[thread_rank] = bits;
    block->warps[warp]->arrive_and_wait();
    const unsigned long long got = block->slots[warp * 32 + (src_lane % 32)];
    block->warps[warp]->arrive_and_wait();
    T r;
    std::memcpy(&r, &got, sizeof(T));
    return r;
}

}  // namespace ge_emu

extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

// The barriers that make a thread's cp.async pieces visible to others (the warp-wide
// operations below synchronise the emulation's lanes but publish nothing).
inline void __syncthreads() {
    if (ge_emu::sequencer != nullptr) ge_emu::publish_async_copies();
    ge_emu::block->all->arrive_and_wait();
}
inline void __syncwarp(unsigned int = 0xffffffffu) {
    if (ge_emu::sequencer != nullptr) ge_emu::publish_async_copies();
    ge_emu::block->warps[ge_emu::warp_of_thread()]->arrive_and_wait();
}

template <typename T>
T __shfl_xor_sync(unsigned int, T v, int mask) {
    return ge_emu::shuffle(v, ge_emu::lane_of_thread() ^ static_cast<unsigned int>(mask));
}
template <typename T>
T __shfl_sync(unsigned int, T v, int src) {
    return ge_emu::shuffle(v, static_cast<unsigned int>(src));
}
template <typename T>
T __shfl_up_sync(unsigned int, T v, unsigned int delta) {
    const unsigned int lane = ge_emu::lane_of_thread();
    const T got = ge_emu::shuffle(v, lane >= delta ? lane - delta : lane);
    return lane >= delta ? got : v;
}
template <typename T>
T __shfl_down_sync(unsigned int, T v, unsigned int delta) {
    const unsigned int lane = ge_emu::lane_of_thread();
    const T got = ge_emu::shuffle(v, lane + delta < 32 ? lane + delta : lane);
    return lane + delta < 32 ? got : v;
}

inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}

namespace ge_emu {

// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` for the calling warp: every lane
// publishes its A and B fragments (PTX ISA layout, lane = 4 gid + tig: a0 = A[gid][2tig, +1],
// a1 = A[gid + 8][same], a2 = A[gid][2tig + 8, +9], a3 = A[gid + 8][same]; b0 = B[2tig, +1][gid],
// b1 = B[2tig + 8, +9][gid]; the lower index in the low 16 bits), the matrices are rebuilt
// from all 32, and each lane adds its C elements (c0, c1 = C[gid][2tig, +1], c2, c3 =
// C[gid + 8][same]), summing the 16 products in f32 in k order (the hardware's order and
// internal precision are its own: results agree to f32 rounding, not bit for bit).
inline void mma_m16n8k16_bf16(float (&c)[4], const unsigned int (&a)[4], unsigned int b0,
                              unsigned int b1) {
    const unsigned int warp = warp_of_thread();
    const unsigned int lane = lane_of_thread();
    block->mma[thread_rank] = {a[0], a[1], a[2], a[3], b0, b1};
    block->warps[warp]->arrive_and_wait();
    auto lo = [](unsigned int w) { return __uint_as_float(w << 16); };
    auto hi = [](unsigned int w) { return __uint_as_float(w & 0xffff0000u); };
    float A[16][16], B[16][8];
    for (unsigned int l = 0; l < 32; ++l) {
        const auto& f = block->mma[warp * 32 + l];
        const unsigned int g = l / 4, t = l % 4;
        A[g][2 * t] = lo(f[0]);
        A[g][2 * t + 1] = hi(f[0]);
        A[g + 8][2 * t] = lo(f[1]);
        A[g + 8][2 * t + 1] = hi(f[1]);
        A[g][2 * t + 8] = lo(f[2]);
        A[g][2 * t + 9] = hi(f[2]);
        A[g + 8][2 * t + 8] = lo(f[3]);
        A[g + 8][2 * t + 9] = hi(f[3]);
        B[2 * t][g] = lo(f[4]);
        B[2 * t + 1][g] = hi(f[4]);
        B[2 * t + 8][g] = lo(f[5]);
        B[2 * t + 9][g] = hi(f[5]);
    }
    block->warps[warp]->arrive_and_wait();
    const unsigned int g = lane / 4, t = lane % 4;
    const unsigned int rows[4] = {g, g, g + 8, g + 8};
    const unsigned int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int e = 0; e < 4; ++e) {
        float acc = c[e];
        for (int k = 0; k < 16; ++k) acc += A[rows[e]][k] * B[k][cols[e]];
        c[e] = acc;
    }
}

// `ldmatrix.sync.aligned.m8n8.x{count}[.trans].shared.b16` for the calling warp: lane i gives
// the address of row i % 8 of matrix i / 8 (8 bf16, 16 bytes); lane l receives, per matrix
// j, register j = the pair (row l / 4, columns 2 (l % 4) and + 1), or with `trans` the pair
// (rows 2 (l % 4) and + 1, column l / 4); the lower index in the low 16 bits.
inline void ldmatrix(unsigned int* r, int count, const void* row, bool trans) {
    const unsigned int warp = warp_of_thread();
    const unsigned int lane = lane_of_thread();
    block->slots[thread_rank] = reinterpret_cast<unsigned long long>(row);
    block->warps[warp]->arrive_and_wait();
    auto row_of = [&](int m, unsigned int i) {
        return reinterpret_cast<const unsigned short*>(block->slots[warp * 32 + 8 * m + i]);
    };
    if (sequencer != nullptr) {
        // Every row this lane reads (as ldmatrix reads whole 16-byte rows) must not be
        // another thread's unpublished cp.async piece.
        for (int m = 0; m < count; ++m) {
            for (unsigned int i = 0; i < 8; ++i) {
                if (trans ? (i / 2 != lane % 4) : (i != lane / 4)) continue;
                const auto p = reinterpret_cast<std::uintptr_t>(row_of(m, i));
                const auto it = block->unpublished.find(p & ~std::uintptr_t{15});
                if (it != block->unpublished.end() && it->second != thread_rank &&
                    block->visibility_errors++ == 0) {
                    std::fprintf(stderr, "emu: thread %u: ldmatrix reads shared memory that "
                                 "thread %u's cp.async wrote, with no barrier between\n",
                                 thread_rank, it->second);
                }
            }
        }
    }
    for (int m = 0; m < count; ++m) {
        unsigned short lo, hi;
        if (!trans) {
            const unsigned short* p = row_of(m, lane / 4);
            lo = p[2 * (lane % 4)];
            hi = p[2 * (lane % 4) + 1];
        } else {
            lo = row_of(m, 2 * (lane % 4))[lane / 4];
            hi = row_of(m, 2 * (lane % 4) + 1)[lane / 4];
        }
        r[m] = static_cast<unsigned int>(lo) | (static_cast<unsigned int>(hi) << 16);
    }
    block->warps[warp]->arrive_and_wait();
}

// `cp.async` (16 bytes, zero-filled when not valid), per thread: a copy is queued in the
// thread's open group, `commit` closes the group, and `wait(n)` performs the oldest groups
// until at most n are pending. By default the bytes land only at the wait, so a kernel that
// reads a tile before waiting for it reads stale shared memory here too; with
// GE_EMU_ASYNC=issue they also land at once (see the top of this file).
extern thread_local std::vector<AsyncCopy> async_open;
extern thread_local std::vector<std::vector<AsyncCopy>> async_groups;

// One copy's 16 bytes land (zeros when not valid).
inline void land(const AsyncCopy& c) {
    if (c.valid) {
        std::memcpy(c.dst, c.src, 16);
    } else {
        std::memset(c.dst, 0, 16);
    }
}

inline void cp_async16(void* dst, const void* src, bool valid) {
    async_open.push_back({dst, src, valid});
    if (async_lands_at_issue()) land(async_open.back());
}
inline void cp_async_commit() {
    async_groups.push_back(std::move(async_open));
    async_open.clear();
}
inline void cp_async_wait(int n) {
    std::size_t done = 0;
    while (async_groups.size() - done > static_cast<std::size_t>(n)) {
        for (const auto& c : async_groups[done]) {
            land(c);
            if (sequencer != nullptr) {
                const auto p = reinterpret_cast<std::uintptr_t>(c.dst);
                block->unpublished[p] = thread_rank;
                block->unpublished_by[thread_rank].push_back(p);
            }
        }
        ++done;
    }
    async_groups.erase(async_groups.begin(), async_groups.begin() + static_cast<std::ptrdiff_t>(done));
}

}  // namespace ge_emu

// Explicitly rounded arithmetic: the emulation is built with -ffp-contract=off, so a plain
// operation is one IEEE operation.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline float __expf(float a) { return std::exp(a); }
// glibc declares an internal __log2f without exporting it: the device intrinsic under a macro.
inline float ge_emu_log2f(float a) { return std::log2(a); }
#define __log2f ge_emu_log2f

// CUDA's integer min / max (and their float overloads), for mixed argument types too.
template <typename A, typename B>
std::common_type_t<A, B> min(A a, B b) {
    return b < a ? b : a;
}
template <typename A, typename B>
std::common_type_t<A, B> max(A a, B b) {
    return a < b ? b : a;
}

template <typename T>
T atomic_rmw(T* p, const std::function<T(T)>& f) {
    std::atomic_ref<T> r(*p);
    T old = r.load();
    while (!r.compare_exchange_weak(old, f(old))) {
    }
    return old;
}
inline int atomicOr(int* p, int v) { return std::atomic_ref<int>(*p).fetch_or(v); }
inline unsigned int atomicOr(unsigned int* p, unsigned int v) {
    return std::atomic_ref<unsigned int>(*p).fetch_or(v);
}
inline int atomicMax(int* p, int v) {
    return atomic_rmw<int>(p, [v](int o) { return o > v ? o : v; });
}
inline int atomicMin(int* p, int v) {
    return atomic_rmw<int>(p, [v](int o) { return o < v ? o : v; });
}
inline unsigned int atomicMax(unsigned int* p, unsigned int v) {
    return atomic_rmw<unsigned int>(p, [v](unsigned int o) { return o > v ? o : v; });
}
inline unsigned int atomicMin(unsigned int* p, unsigned int v) {
    return atomic_rmw<unsigned int>(p, [v](unsigned int o) { return o < v ? o : v; });
}
inline float atomicAdd(float* p, float v) {
    return atomic_rmw<float>(p, [v](float o) { return o + v; });
}
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
[[noreturn]] inline void __trap() {
    std::fprintf(stderr, "emu: __trap() in a kernel\n");
    std::abort();
}

// The launch: blocks in order, each block's threads concurrently. One OS thread per thread of
// a block, made once per launch: between blocks they meet the launching thread at two
// barriers, while it sets up the next block's barriers (the kernel's may have been left by
// threads that returned early).
namespace ge_emu {

// A fiber's start: the kernel, then it leaves the barriers, as a returning thread does, and
// goes back to the scheduler for good.
inline void fiber_entry() {
    Sequencer& q = *sequencer;
    q.body();
    const unsigned int t = q.running;
    block->warps[t / 32]->arrive_and_drop();
    block->all->arrive_and_drop();
    q.fibers[t].done = true;
    switch_context(q.fibers[t].context, q.scheduler);
    std::abort();  // a finished fiber is never resumed
}

// A block's threads as fibers, one at a time, lowest rank first (highest when descending; see
// Sequencer): `body` runs the kernel for the thread `thread_rank`.
inline void run_block_as_fibers(Sequencer& q, unsigned int n, const dim3& threads) {
    for (unsigned int t = 0; t < n; ++t) {
        Fiber& f = q.fibers[t];
        f.done = false;
        f.waiting_on = nullptr;
        start_context(f.context, fiber_stack(t), kFiberStack, fiber_entry);
    }
    std::vector<AsyncCopy> open;
    std::vector<std::vector<AsyncCopy>> groups;
    // Always the first runnable thread in rank order (lowest rank, or highest when
    // descending): that thread's warp runs ahead as far as it can, and other warps' writes
    // that it reads without a barrier are not there yet.
    unsigned int first_live = 0;  // ranks (in order) before this one are done
    q.cursor = 0;
    for (;;) {
        unsigned int next = n;
        while (first_live < n && q.fibers[q.descending ? n - 1 - first_live : first_live].done) {
            ++first_live;
        }
        for (unsigned int k = std::max(first_live, q.cursor); k < n; ++k) {
            const unsigned int t = q.descending ? n - 1 - k : k;
            if (q.runnable(t)) {
                next = t;
                q.cursor = k;
                break;
            }
        }
        if (next == n) {
            for (unsigned int t = 0; t < n; ++t) {
                if (!q.fibers[t].done) {
                    std::fprintf(stderr, "emu: deadlock: thread %u waits at a barrier no other "
                                 "thread can reach\n", t);
                    std::abort();
                }
            }
            return;
        }
        q.running = next;
        thread_rank = next;
        threadIdx = dim3{next % threads.x, (next / threads.x) % threads.y,
                         next / (threads.x * threads.y)};
        // The fiber's cp.async state lives in the thread-local queues while it runs.
        std::swap(async_open, q.fibers[next].async_open);
        std::swap(async_groups, q.fibers[next].async_groups);
        switch_context(q.scheduler, q.fibers[next].context);
        std::swap(async_open, q.fibers[next].async_open);
        std::swap(async_groups, q.fibers[next].async_groups);
    }
}

// The launch: blocks in order. In the parallel order each block's threads run concurrently,
// one OS thread per thread of a block, made once per launch: between blocks they meet the
// launching thread at two barriers, while it sets up the next block's barriers (the kernel's
// may have been left by threads that returned early). In the one-at-a-time orders they run
// as fibers on the launching thread.
template <typename Args>
void launch(void (*kernel)(Args), dim3 grid, dim3 threads, Args args,
            std::size_t dynamic_shared_bytes = 0) {
    const unsigned int n = threads.x * threads.y * threads.z;
    if (n == 0 || n > 1024) {
        std::fprintf(stderr, "emu: a block of %u threads\n", n);
        std::abort();
    }
    gridDim = grid;
    blockDim = threads;
    const unsigned long long blocks =
        static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
    Block b;
    dim3 current;
    const Order order = thread_order();
    Sequencer seq;
    sequencer = order == Order::Parallel ? nullptr : &seq;
    auto prepare = [&](unsigned long long i) {
        b.all = std::make_unique<Barrier>(n);
        b.warps.clear();
        for (unsigned int w = 0; w < (n + 31) / 32; ++w) {
            b.warps.push_back(std::make_unique<Barrier>(std::min(32u, n - 32 * w)));
            // The warp's first lane in the scan order: its lowest rank, or its highest when
            // descending.
            b.warps.back()->first_position =
                seq.descending ? n - 1 - std::min(32 * w + 31, n - 1) : 32 * w;
        }
        b.slots.assign(n, 0);
        b.mma.assign(n, {});
        b.unpublished.clear();
        b.unpublished_by.assign(n, {});
        b.dynamic_shared.assign(dynamic_shared_bytes + 16, 0xcd);
        b.poisoned.clear();
        current = dim3{static_cast<unsigned int>(i % grid.x),
                       static_cast<unsigned int>((i / grid.x) % grid.y),
                       static_cast<unsigned int>(i / (static_cast<unsigned long long>(grid.x) * grid.y))};
    };
    block = &b;
    if (sequencer != nullptr) {
        seq.descending = order == Order::Descending;
        seq.fibers = std::vector<Fiber>(n);
        seq.body = [&] { kernel(args); };
        for (unsigned long long i = 0; i < blocks; ++i) {
            prepare(i);
            blockIdx = current;
            run_block_as_fibers(seq, n, threads);
            if (b.visibility_errors != 0) {
                std::fprintf(stderr, "emu: %llu unsynchronised reads of cp.async data in block "
                             "(%u, %u, %u)\n", b.visibility_errors, current.x, current.y,
                             current.z);
                std::abort();
            }
        }
        block = nullptr;
        sequencer = nullptr;
        return;
    }
    std::barrier<> start(n + 1), end(n + 1);
    std::vector<std::thread> pool;
    pool.reserve(n);
    for (unsigned int t = 0; t < n; ++t) {
        pool.emplace_back([&, t] {
            thread_rank = t;
            threadIdx = dim3{t % threads.x, (t / threads.x) % threads.y, t / (threads.x * threads.y)};
            for (unsigned long long i = 0; i < blocks; ++i) {
                start.arrive_and_wait();
                blockIdx = current;
                kernel(args);
                b.warps[t / 32]->arrive_and_drop();
                b.all->arrive_and_drop();
                end.arrive_and_wait();
            }
        });
    }
    for (unsigned long long i = 0; i < blocks; ++i) {
        prepare(i);
        start.arrive_and_wait();
        end.arrive_and_wait();
    }
    for (auto& th : pool) th.join();
    block = nullptr;
}

}  // namespace ge_emu
