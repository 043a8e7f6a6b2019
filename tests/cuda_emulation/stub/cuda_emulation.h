// CPU emulation of the CUDA execution model, enough to run the kernels of csrc/cuda on small cases in CPU CI:
// a launch runs its blocks one after another, each block's threads as real threads (so __syncthreads and
// __syncwarp are real barriers); __shared__ arrays become function statics, shared by the threads of the one
// block that runs at a time. Not a simulator of timing, warps or memory coalescing: it checks what the kernels
// compute (indexing, predicates, tiling, epilogues), which is what a wrong kernel gets wrong first.
#pragma once

#define SSL_LIGHTNING_CUDA_EMULATION 1

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct int4 {
  int x, y, z, w;
};

namespace emu {
inline thread_local uint3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};
inline thread_local dim3 block_dim, grid_dim;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local std::barrier<>* warp_barrier = nullptr;

// Runs kernel<<<grid, block>>>(args...) (1-D blocks): blocks in turn, each block's threads concurrently.
struct Launch {
  template <typename... P, typename... A>
  void operator()(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) const {
    const unsigned nt = block.x;
    std::barrier<> sync(nt);
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    for (unsigned w = 0; w * 32 < nt; ++w) warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, nt - 32 * w)));
    const std::tuple<std::decay_t<A>...> held(std::forward<A>(args)...);
    std::vector<std::thread> threads;
    threads.reserve(nt);
    for (unsigned t = 0; t < nt; ++t) {
      threads.emplace_back([&, t] {
        thread_idx = {t, 0, 0};
        block_dim = block;
        grid_dim = grid;
        block_barrier = &sync;
        warp_barrier = warps[t / 32].get();
        for (unsigned z = 0; z < grid.z; ++z)
          for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
              block_idx = {x, y, z};
              std::apply([&](const auto&... a) { kernel(a...); }, held);
              sync.arrive_and_wait();  // the block is done before the next one uses the shared arrays
            }
      });
    }
    for (std::thread& th : threads) th.join();
  }
};
}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp() { emu::warp_barrier->arrive_and_wait(); }
[[noreturn]] inline void __trap() { std::abort(); }
using std::fma;
