// The arithmetic of the fused two-force update for one element, shared by the CPU and CUDA
// kernels so both compute exactly the same expression in the same order (see fused.py for
// the formula and the plain reference implementation the tests compare against).
#pragma once

#include <cstdint>
#include <type_traits>

#ifdef __CUDACC__
#define HL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HL_HOST_DEVICE inline
#endif

namespace horovod_leader {

// What one call does. The leader forces are evaluated at x itself (GRAD_STEP, PULL_SELF) or at
// a separate anchor y (PULL_ANCHOR: the parameters before a non-fused optimizer's step).
enum Mode : int { GRAD_STEP = 0, PULL_SELF = 1, PULL_ANCHOR = 2 };

// Raw pointers of one call; an absent input is nullptr and is never read.
struct Pointers {
  void* x;
  const void* g;
  void* m;
  const void* local;
  const void* global;
  const void* anchor;
};

template <typename acc_t>
struct Coefs {
  acc_t lr, momentum, one_minus_dampening, weight_decay, local_pull, global_pull;
  bool nesterov, first_step;
};

// Returns the new x; updates the momentum value *m in place when MOM.
template <typename acc_t, int MODE, bool MOM, bool HAS_LOCAL, bool HAS_GLOBAL>
HL_HOST_DEVICE acc_t two_force_element(acc_t x, acc_t g, acc_t* m, acc_t local, acc_t global, acc_t anchor,
                                       const Coefs<acc_t>& c) {
  acc_t step = acc_t(0);
  acc_t y = (MODE == PULL_ANCHOR) ? anchor : x;
  if (MODE == GRAD_STEP) {
    acc_t d = g + c.weight_decay * x;
    if (MOM) {
      // torch.optim.SGD: the first step sets the buffer to d (no dampening).
      acc_t buf = c.first_step ? d : c.momentum * (*m) + c.one_minus_dampening * d;
      *m = buf;
      d = c.nesterov ? d + c.momentum * buf : buf;
    }
    step = c.lr * d;
  }
  if (HAS_LOCAL) step += c.local_pull * (y - local);
  if (HAS_GLOBAL) step += c.global_pull * (y - global);
  return x - step;
}

// Compile-time flags, picked once per call, keep the inner loops branch-free (and vectorisable).
template <typename F>
void with_bool(bool value, F&& f) {
  if (value) f(std::true_type{}); else f(std::false_type{});
}

template <typename F>
void with_mode(int mode, F&& f) {
  switch (mode) {
    case GRAD_STEP: f(std::integral_constant<int, GRAD_STEP>{}); break;
    case PULL_SELF: f(std::integral_constant<int, PULL_SELF>{}); break;
    default: f(std::integral_constant<int, PULL_ANCHOR>{}); break;
  }
}

}  // namespace horovod_leader
