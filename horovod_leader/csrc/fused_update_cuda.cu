// CUDA kernel of the fused two-force update: a grid-stride loop, several independent elements
// per thread in flight (memory-level parallelism), one read of each input and one write of x
// and m. The per-element arithmetic is shared with the CPU kernel (two_force.h).
// Only c10's CUDA headers: ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers,
// which a minimal CUDA toolkit does not ship.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "two_force.h"

namespace horovod_leader {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

template <typename scalar_t, typename acc_t, int MODE, bool MOM, bool HAS_LOCAL, bool HAS_GLOBAL>
__global__ void __launch_bounds__(kThreads) two_force_kernel(int64_t n, scalar_t* __restrict__ x,
                                                             const scalar_t* __restrict__ g,
                                                             scalar_t* __restrict__ m,
                                                             const scalar_t* __restrict__ local,
                                                             const scalar_t* __restrict__ global,
                                                             const scalar_t* __restrict__ anchor, Coefs<acc_t> c) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * kUnroll;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x; base < n; base += stride) {
    acc_t xs[kUnroll], gs[kUnroll], ms[kUnroll], ls[kUnroll], gl[kUnroll], an[kUnroll];
    // Issue every load first so kUnroll requests per input are in flight at once.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * kThreads;
      if (i < n) {
        xs[u] = static_cast<acc_t>(x[i]);
        gs[u] = MODE == GRAD_STEP ? static_cast<acc_t>(g[i]) : acc_t(0);
        ms[u] = MOM ? static_cast<acc_t>(m[i]) : acc_t(0);
        ls[u] = HAS_LOCAL ? static_cast<acc_t>(local[i]) : acc_t(0);
        gl[u] = HAS_GLOBAL ? static_cast<acc_t>(global[i]) : acc_t(0);
        an[u] = MODE == PULL_ANCHOR ? static_cast<acc_t>(anchor[i]) : acc_t(0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * kThreads;
      if (i < n) {
        acc_t mi = ms[u];
        acc_t xi = two_force_element<acc_t, MODE, MOM, HAS_LOCAL, HAS_GLOBAL>(xs[u], gs[u], &mi, ls[u], gl[u], an[u], c);
        x[i] = static_cast<scalar_t>(xi);
        if (MOM) m[i] = static_cast<scalar_t>(mi);
      }
    }
  }
}

void cuda_two_force(const at::Tensor& x, int mode, bool mom, bool has_local, bool has_global, const Pointers& p,
                    double lr, double momentum, double dampening, double wd, bool nesterov, double a, double b,
                    bool first_step) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  int sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, x.device().index()));
  // Enough resident blocks to fill every SM, no more: the grid-stride loop covers the rest.
  const int64_t max_blocks = static_cast<int64_t>(sms) * (threads_per_sm / kThreads);
  const int64_t needed = (n + kThreads * kUnroll - 1) / (kThreads * kUnroll);
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min(needed, max_blocks)));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "two_force_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Coefs<acc_t> c{static_cast<acc_t>(lr), static_cast<acc_t>(momentum), static_cast<acc_t>(1.0 - dampening),
                         static_cast<acc_t>(wd), static_cast<acc_t>(a), static_cast<acc_t>(b), nesterov, first_step};
    with_mode(mode, [&](auto M) {
      with_bool(mom && M.value == GRAD_STEP, [&](auto MOM) {
        with_bool(has_local, [&](auto L) {
          with_bool(has_global, [&](auto G) {
            two_force_kernel<scalar_t, acc_t, decltype(M)::value, decltype(MOM)::value, decltype(L)::value,
                             decltype(G)::value><<<blocks, kThreads, 0, stream>>>(
                n, static_cast<scalar_t*>(p.x), static_cast<const scalar_t*>(p.g), static_cast<scalar_t*>(p.m),
                static_cast<const scalar_t*>(p.local), static_cast<const scalar_t*>(p.global),
                static_cast<const scalar_t*>(p.anchor), c);
          });
        });
      });
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace horovod_leader
