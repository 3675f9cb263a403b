// Kernels that check the emulation itself (tools/kernel-emu/emu.h), built like the units of
// kernels/ (the same __shared__ rewrite) and run by checks.cpp's `emulator` group: shared
// memory starts as garbage in every block, template kernels' too; a read of another
// thread's write without a barrier sees the old value in the one-at-a-time orders; cp.async
// copies land at the wait, or at issue when asked. If one of these stopped holding, the other
// checks would pass kernels with the bugs they are meant to catch.
#include "common.cuh"
#include "../tools/kernel-emu/selftest.h"

// Every thread reads its shared word before anything writes it, then writes it (so a second
// block would see this block's values if shared memory carried over). A template, as most
// kernels are (their statics are laid out differently from a plain function's).
template <int N>
__device__ void ge_selftest_fresh_shared_impl(const SelfTestArgs& a) {
    __shared__ unsigned int s[N];
    const int t = threadIdx.x;
    a.out[blockIdx.x * N + t] = s[t];
    s[t] = 0x12345678u + t;
}
extern "C" __global__ void ge_selftest_fresh_shared(SelfTestArgs a) { ge_selftest_fresh_shared_impl<64>(a); }

// Thread 1 (of warp 1) writes a shared word that thread 0 then reads with no barrier between.
extern "C" __global__ void ge_selftest_missing_barrier(SelfTestArgs a) {
    __shared__ unsigned int v;
    if (threadIdx.x == 0) v = 7u;
    __syncthreads();
    if (threadIdx.x == 33) v = 42u;
    if (threadIdx.x == 0) a.out[0] = v;  // 7 if thread 0 runs first, 42 if thread 33 does
}

// Each thread copies 16 bytes into shared memory by cp.async and reads them before and after
// its wait.
extern "C" __global__ void ge_selftest_async_landing(SelfTestArgs a) {
    __shared__ __align__(16) unsigned int tile[4 * 32];
    const int t = threadIdx.x;
    tile[4 * t] = 0u;
    ge_cp_async16(tile + 4 * t, a.in + 4 * t, true);
    ge_cp_async_commit();
    a.out[2 * t] = tile[4 * t];  // 0, or the source when copies land at issue
    ge_cp_async_wait<0>();
    a.out[2 * t + 1] = tile[4 * t];  // the source
}

// Lanes 0-15 each land one 16-byte row of two 8 x 8 bf16 matrices by cp.async and wait for
// it; the warp then reads them with ldmatrix.x2, each lane's fragment holding other lanes'
// rows. With SYNC a __syncwarp makes those rows visible first; without it the one-at-a-time
// orders must stop the run (the device would read stale rows now and then).
template <bool SYNC>
__device__ void ge_selftest_ldmatrix_after_copies_impl(const SelfTestArgs& a) {
    __shared__ __align__(16) ge_bf16 tile[16 * 8];
    const int lane = threadIdx.x;
    if (lane < 16) ge_cp_async16(tile + 8 * lane, a.in + 4 * lane, true);
    ge_cp_async_commit();
    ge_cp_async_wait<0>();
    if (SYNC) __syncwarp();
    unsigned int r[2];
    ge_ldsm<2, false>(r, tile + 8 * (lane % 16));
    a.out[2 * lane] = r[0];
    a.out[2 * lane + 1] = r[1];
}
extern "C" __global__ void ge_selftest_ldmatrix_synced(SelfTestArgs a) { ge_selftest_ldmatrix_after_copies_impl<true>(a); }
extern "C" __global__ void ge_selftest_ldmatrix_unsynced(SelfTestArgs a) { ge_selftest_ldmatrix_after_copies_impl<false>(a); }
