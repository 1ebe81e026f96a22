// A CPU thread emulator for the CUDA subset kernels.cu uses, so tests run the kernel source
// itself where no GPU is lent: one OS thread per CUDA thread, blocks one after another,
// __syncthreads as a block barrier, warp shuffles and matches through a per-warp barrier.
// It checks the kernels' logic (indices, ties, bit packing, rounding order); it says
// nothing about speed, and the compiler's own rules (contraction, intrinsics) are checked
// only by the GPU parity tests. Compile with -ffp-contract=off on x86-64 (SSE floats).
#pragma once
#define SHARDROP_EMU 1

#include <barrier>
#include <climits>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct EmuDim {
    unsigned x;
};
inline thread_local EmuDim threadIdx;
inline thread_local EmuDim blockIdx;
inline EmuDim blockDim;
inline EmuDim gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define DYN_SHARED(type, name) type* name = (type*)emu::dyn_shared

namespace emu {
struct Warp {
    std::barrier<> bar{32};
    unsigned slot[32];
};
inline unsigned char* dyn_shared;
inline std::barrier<>* block_bar;
inline std::vector<std::unique_ptr<Warp>> warps;

template <class F>
void launch(unsigned grid, unsigned block, size_t dyn_bytes, F kernel) {
    blockDim.x = block;
    gridDim.x = grid;
    std::vector<unsigned char> dyn(dyn_bytes + 1);
    for (unsigned b = 0; b < grid; b++) {
        dyn_shared = dyn.data();
        std::barrier<> bar(block);
        block_bar = &bar;
        warps.clear();
        for (unsigned w = 0; w < block / 32; w++) warps.push_back(std::make_unique<Warp>());
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < block; t++) {
            ts.emplace_back([&, t] {
                threadIdx.x = t;
                blockIdx.x = b;
                kernel();
            });
        }
        for (auto& t : ts) t.join();
    }
}
}  // namespace emu

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }

inline unsigned __shfl_up_sync(unsigned, unsigned v, unsigned d) {
    unsigned lane = threadIdx.x & 31u;
    emu::Warp& w = *emu::warps[threadIdx.x >> 5];
    w.slot[lane] = v;
    w.bar.arrive_and_wait();
    unsigned r = lane >= d ? w.slot[lane - d] : v;
    w.bar.arrive_and_wait();
    return r;
}

inline unsigned __shfl_xor_sync(unsigned, unsigned v, unsigned d) {
    unsigned lane = threadIdx.x & 31u;
    emu::Warp& w = *emu::warps[threadIdx.x >> 5];
    w.slot[lane] = v;
    w.bar.arrive_and_wait();
    unsigned r = w.slot[lane ^ d];
    w.bar.arrive_and_wait();
    return r;
}

inline unsigned __match_any_sync(unsigned, unsigned v) {
    unsigned lane = threadIdx.x & 31u;
    emu::Warp& w = *emu::warps[threadIdx.x >> 5];
    w.slot[lane] = v;
    w.bar.arrive_and_wait();
    unsigned m = 0;
    for (unsigned l = 0; l < 32; l++) m |= (w.slot[l] == v ? 1u : 0u) << l;
    w.bar.arrive_and_wait();
    return m;
}

template <class T>
inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class T>
inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
template <class T>
inline T atomicMax(T* p, T v) {
    T cur = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (cur < v && !__atomic_compare_exchange_n(p, &cur, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return cur;
}
template <class T>
inline T atomicMin(T* p, T v) {
    T cur = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (cur > v && !__atomic_compare_exchange_n(p, &cur, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return cur;
}

inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __uint2float_rn(unsigned u) { return (float)u; }
inline unsigned __float2uint_rz(float f) {
    if (!(f > 0.0f)) return 0;
    if (f >= 4294967296.0f) return UINT_MAX;
    return (unsigned)f;
}
