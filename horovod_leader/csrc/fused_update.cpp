// CPU kernel of the fused two-force update, and the entry point that dispatches to CUDA.
// One pass over memory: read x, g, m, L, G once; write x and m once.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <optional>

#include "two_force.h"

namespace horovod_leader {

template <typename scalar_t, typename acc_t, int MODE, bool MOM, bool HAS_LOCAL, bool HAS_GLOBAL>
void cpu_loop(int64_t n, const Pointers& p, const Coefs<acc_t>& c) {
  scalar_t* __restrict__ x = static_cast<scalar_t*>(p.x);
  const scalar_t* __restrict__ g = static_cast<const scalar_t*>(p.g);
  scalar_t* __restrict__ m = static_cast<scalar_t*>(p.m);
  const scalar_t* __restrict__ local = static_cast<const scalar_t*>(p.local);
  const scalar_t* __restrict__ global = static_cast<const scalar_t*>(p.global);
  const scalar_t* __restrict__ anchor = static_cast<const scalar_t*>(p.anchor);
  // Grain: enough work per task to amortise the thread hand-off, small enough to balance.
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t mi = MOM ? static_cast<acc_t>(m[i]) : acc_t(0);
      acc_t xi = two_force_element<acc_t, MODE, MOM, HAS_LOCAL, HAS_GLOBAL>(
          static_cast<acc_t>(x[i]),
          MODE == GRAD_STEP ? static_cast<acc_t>(g[i]) : acc_t(0), &mi,
          HAS_LOCAL ? static_cast<acc_t>(local[i]) : acc_t(0),
          HAS_GLOBAL ? static_cast<acc_t>(global[i]) : acc_t(0),
          MODE == PULL_ANCHOR ? static_cast<acc_t>(anchor[i]) : acc_t(0), c);
      x[i] = static_cast<scalar_t>(xi);
      if (MOM) m[i] = static_cast<scalar_t>(mi);
    }
  });
}

template <typename acc_t>
Coefs<acc_t> make_coefs(double lr, double momentum, double dampening, double wd, bool nesterov, double a, double b,
                        bool first_step) {
  return Coefs<acc_t>{static_cast<acc_t>(lr), static_cast<acc_t>(momentum), static_cast<acc_t>(1.0 - dampening),
                      static_cast<acc_t>(wd), static_cast<acc_t>(a), static_cast<acc_t>(b), nesterov, first_step};
}

void cpu_two_force(const at::Tensor& x, int mode, bool mom, bool has_local, bool has_global, const Pointers& p,
                   double lr, double momentum, double dampening, double wd, bool nesterov, double a, double b,
                   bool first_step) {
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "two_force_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float for half/bfloat16, else the type itself
    const auto c = make_coefs<acc_t>(lr, momentum, dampening, wd, nesterov, a, b, first_step);
    with_mode(mode, [&](auto M) {
      with_bool(mom && M.value == GRAD_STEP, [&](auto MOM) {
        with_bool(has_local, [&](auto L) {
          with_bool(has_global, [&](auto G) {
            cpu_loop<scalar_t, acc_t, decltype(M)::value, decltype(MOM)::value, decltype(L)::value,
                     decltype(G)::value>(n, p, c);
          });
        });
      });
    });
  });
}

#ifdef WITH_CUDA
void cuda_two_force(const at::Tensor& x, int mode, bool mom, bool has_local, bool has_global, const Pointers& p,
                    double lr, double momentum, double dampening, double wd, bool nesterov, double a, double b,
                    bool first_step);
#endif

static void check_like(const at::Tensor& x, const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == x.device() && t->scalar_type() == x.scalar_type() && t->numel() == x.numel() &&
                  t->is_contiguous(),
              name, " must be a contiguous tensor with param's dtype, device and size");
}

static const void* data_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

void two_force_update_(at::Tensor x, std::optional<at::Tensor> g, std::optional<at::Tensor> m,
                       std::optional<at::Tensor> local, std::optional<at::Tensor> global,
                       std::optional<at::Tensor> anchor, double lr, double momentum, double dampening, double wd,
                       bool nesterov, double a, double b, bool first_step) {
  TORCH_CHECK(x.is_contiguous(), "param must be contiguous");
  check_like(x, g, "grad");
  check_like(x, m, "momentum_buf");
  check_like(x, local, "local_leader");
  check_like(x, global, "global_leader");
  check_like(x, anchor, "anchor");
  if (x.numel() == 0) return;
  const int mode = g.has_value() ? GRAD_STEP : (anchor.has_value() ? PULL_ANCHOR : PULL_SELF);
  const bool mom = mode == GRAD_STEP && m.has_value();
  Pointers p{x.data_ptr(), data_or_null(g), m.has_value() ? m->data_ptr() : nullptr, data_or_null(local),
             data_or_null(global), data_or_null(anchor)};
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    cuda_two_force(x, mode, mom, local.has_value(), global.has_value(), p, lr, momentum, dampening, wd, nesterov, a,
                   b, first_step);
    return;
#else
    TORCH_CHECK(false, "horovod_leader._fused was built without CUDA");
#endif
  }
  TORCH_CHECK(x.device().is_cpu(), "two_force_update_: unsupported device ", x.device());
  cpu_two_force(x, mode, mom, local.has_value(), global.has_value(), p, lr, momentum, dampening, wd, nesterov, a, b,
                first_step);
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

// csrc/codec.cpp: the compressed exchanges' codecs in one pass
void encode_bf16(const at::Tensor& x, const std::optional<at::Tensor>& ref, at::Tensor out);
void encode_int8(const at::Tensor& x, const std::optional<at::Tensor>& ref, at::Tensor q, at::Tensor scales);
void decode_bf16(const at::Tensor& payload, const std::optional<at::Tensor>& ref, at::Tensor out, double alpha,
                 bool accumulate, int64_t start);
void decode_int8(const at::Tensor& q, const at::Tensor& scales, const std::optional<at::Tensor>& ref, at::Tensor out,
                 double alpha, bool accumulate, int64_t start);

}  // namespace horovod_leader

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "Fused two-force update (gradient force + two leader forces) for horovod_leader";
  module.def("two_force_update_", &horovod_leader::two_force_update_, "In-place fused two-force update",
             pybind11::arg("param"), pybind11::arg("grad"), pybind11::arg("momentum_buf"),
             pybind11::arg("local_leader"), pybind11::arg("global_leader"), pybind11::arg("anchor"),
             pybind11::arg("lr"), pybind11::arg("momentum"), pybind11::arg("dampening"),
             pybind11::arg("weight_decay"), pybind11::arg("nesterov"), pybind11::arg("local_pull"),
             pybind11::arg("global_pull"), pybind11::arg("first_step"));
  module.def("has_cuda", &horovod_leader::has_cuda, "Whether the CUDA kernel was compiled in");
  module.def("encode_bf16", &horovod_leader::encode_bf16, "bf16 payload of x - ref, in one pass (CPU)");
  module.def("encode_int8", &horovod_leader::encode_int8, "int8 payload (values, scales) of x - ref, in one pass (CPU)");
  module.def("decode_bf16", &horovod_leader::decode_bf16, "out (+)= alpha (decode + ref), in one pass (CPU)");
  module.def("decode_int8", &horovod_leader::decode_int8, "out (+)= alpha (decode + ref), in one pass (CPU)");
}
