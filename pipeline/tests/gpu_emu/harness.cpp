// Runs kernels.cu under emu.h with the launch sequence of pipeline/src/format/codec/gpu/mod.rs:
//   harness encode JOB OUT   ef_select, emit, then staging blocks compacted to body bytes
//   harness decode JOB OUT   decode, scatter_add into a dense buffer
// JOB and OUT are little-endian binary records written and read by tests/it/gpu_emulated.rs.
#include "emu.h"
#include "kernels.cu"

#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>

namespace {
struct Reader {
    std::vector<unsigned char> b;
    size_t at = 0;
    template <class T>
    T get() {
        T v;
        std::memcpy(&v, b.data() + at, sizeof(T));
        at += sizeof(T);
        return v;
    }
    template <class T>
    std::vector<T> vec(size_t n) {
        std::vector<T> v(n);
        if (n) std::memcpy(v.data(), b.data() + at, n * sizeof(T));
        at += n * sizeof(T);
        return v;
    }
};
struct Writer {
    std::vector<unsigned char> b;
    template <class T>
    void put(const T& v) {
        auto p = (const unsigned char*)&v;
        b.insert(b.end(), p, p + sizeof(T));
    }
    template <class T>
    void vec(const std::vector<T>& v) {
        auto p = (const unsigned char*)v.data();
        b.insert(b.end(), p, p + v.size() * sizeof(T));
    }
};

int run_encode(Reader& r, Writer& w) {
    u32 dtype = r.get<u32>();
    u64 n = r.get<u64>();
    u32 chunk = r.get<u32>(), k = r.get<u32>(), vbits = r.get<u32>();
    u32 tensor_scale = r.get<u32>(), compact = r.get<u32>();
    float beta = r.get<float>();
    u32 block = r.get<u32>();
    u32 idx_full = r.get<u32>(), idx_last = r.get<u32>(), val_full = r.get<u32>(),
        val_last = r.get<u32>(), n_scales = r.get<u32>();
    u32 size = dtype == DT_F32 ? 4 : 2;
    auto in = r.vec<unsigned char>(n * size);
    auto state = r.vec<float>(n);
    u32 chunks = (u32)((n + chunk - 1) / chunk);
    std::vector<u32> sel((size_t)chunks * k), maxes(chunks), tmax(1, 0), fault(2, NO_FAULT);
    int use_shared = chunk <= 8192 ? 1 : 0;
    emu::launch(chunks, block, use_shared ? (chunk + chunk / 32) * 4 : 0, [&] {
        ef_select(in.data(), (int)dtype, state.data(), n, chunk, k, beta, sel.data(), maxes.data(),
                  tmax.data(), fault.data(), use_shared);
    });
    u32 idx_stride = (std::max(idx_full, idx_last) + 3) / 4, val_stride = (val_full + 3) / 4;
    std::vector<u32> idx_words((size_t)chunks * idx_stride + 1), val_words((size_t)chunks * val_stride + 1);
    std::vector<u16> scales(std::max<u32>(n_scales, 1));
    // As codec::gpu: blocks assembled in shared memory when they fit in 32 KiB.
    int emit_shared = (idx_stride + val_stride) * 4 <= (32u << 10) ? 1 : 0;
    emu::launch(chunks, block, emit_shared ? (idx_stride + val_stride) * 4 : 0, [&] {
        emit(state.data(), n, chunk, k, sel.data(), maxes.data(), tmax.data(), vbits, (int)tensor_scale,
             (int)compact, idx_words.data(), idx_stride, val_words.data(), val_stride, scales.data(),
             fault.data(), emit_shared);
    });
    std::vector<unsigned char> idx, val;
    for (u32 c = 0; c < chunks; c++) {
        bool last = c + 1 == chunks;
        auto ib = (const unsigned char*)(idx_words.data() + (size_t)c * idx_stride);
        idx.insert(idx.end(), ib, ib + (last ? idx_last : idx_full));
        auto vb = (const unsigned char*)(val_words.data() + (size_t)c * val_stride);
        val.insert(val.end(), vb, vb + (last ? val_last : val_full));
    }
    scales.resize(n_scales);
    w.put(fault[0]);
    w.put(fault[1]);
    w.put((u64)idx.size());
    w.vec(idx);
    w.put((u64)val.size());
    w.vec(val);
    w.vec(scales);
    w.vec(state);
    return 0;
}

int run_decode(Reader& r, Writer& w) {
    u64 n = r.get<u64>();
    u32 chunk = r.get<u32>(), k = r.get<u32>(), vbits = r.get<u32>();
    u32 tensor_scale = r.get<u32>(), compact = r.get<u32>();
    float weight = r.get<float>();
    u32 block = r.get<u32>(), idx_full = r.get<u32>(), val_full = r.get<u32>();
    u64 idx_len = r.get<u64>(), val_len = r.get<u64>();
    u32 n_scales = r.get<u32>();
    auto idx = r.vec<unsigned char>(idx_len);
    auto val = r.vec<unsigned char>(val_len);
    auto scales = r.vec<u16>(n_scales);
    auto dense = r.vec<float>(n);
    scales.resize(std::max<u32>(n_scales, 1));
    u32 chunks = (u32)((n + chunk - 1) / chunk);
    std::vector<u32> sp_idx((size_t)chunks * k), fault(1, NO_FAULT);
    std::vector<float> sp_val((size_t)chunks * k);
    emu::launch(chunks, block, 0, [&] {
        ::decode(idx.data(), idx_len, idx_full, val.data(), val_len, val_full, scales.data(), n, chunk, k,
               vbits, (int)tensor_scale, (int)compact, sp_idx.data(), sp_val.data(), fault.data());
    });
    emu::launch(chunks, block, 0, [&] {
        scatter_add(sp_idx.data(), sp_val.data(), n, chunk, k, weight, fault.data(), dense.data());
    });
    w.put(fault[0]);
    w.vec(dense);
    return 0;
}
}  // namespace

int main(int argc, char** argv) {
    if (argc != 4) {
        std::fprintf(stderr, "usage: harness encode|decode JOB OUT\n");
        return 2;
    }
    std::ifstream f(argv[2], std::ios::binary);
    Reader r{std::vector<unsigned char>(std::istreambuf_iterator<char>(f), {})};
    Writer w;
    std::string mode = argv[1];
    int rc = mode == "encode" ? run_encode(r, w) : run_decode(r, w);
    std::ofstream o(argv[3], std::ios::binary);
    o.write((const char*)w.b.data(), (std::streamsize)w.b.size());
    return rc;
}
