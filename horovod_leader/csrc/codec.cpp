// The compressed exchanges' codecs in one pass over memory (CPU): the difference from the
// reference and the encoding together, and the decoding and the add-back together.
// horovod_leader/compression.py holds the formats' definition and a plain PyTorch reference;
// tests/test_codec.py compares the two.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>

namespace horovod_leader {

constexpr int64_t kBlock = 256;  // values per int8 scale (compression.INT8_BLOCK)

static void check_values(const at::Tensor& x, const std::optional<at::Tensor>& ref, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 1, what, ": values must be a flat contiguous CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              what, ": values must be float32, float16 or bfloat16");
  if (ref.has_value()) {
    TORCH_CHECK(ref->scalar_type() == x.scalar_type() && ref->numel() == x.numel() && ref->is_contiguous() &&
                    ref->device().is_cpu(),
                what, ": ref must match the values' dtype, size and device");
  }
}

// d = float(x) - float(ref), rounded to bfloat16 (to nearest, ties to even), stored as its bits.
void encode_bf16(const at::Tensor& x, const std::optional<at::Tensor>& ref, at::Tensor out) {
  check_values(x, ref, "encode_bf16");
  TORCH_CHECK(out.scalar_type() == at::kShort && out.numel() >= x.numel() && out.is_contiguous(), "encode_bf16: out");
  const int64_t n = x.numel();
  int16_t* o = out.data_ptr<int16_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "encode_bf16", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = ref.has_value() ? ref->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float d = static_cast<float>(xp[i]) - (rp ? static_cast<float>(rp[i]) : 0.0f);
        const c10::BFloat16 h(d);
        int16_t bits;
        std::memcpy(&bits, &h.x, sizeof(bits));
        o[i] = bits;
      }
    });
  });
}

// Per block of 256: s = max|d| / 127 (1 for an all-zero block; non-finite when d holds NaN or
// inf, so that the block decodes non-finite), q = round(d / s) in [-127, 127]; the tail of the
// last block is padded with zeros.
void encode_int8(const at::Tensor& x, const std::optional<at::Tensor>& ref, at::Tensor q, at::Tensor scales) {
  check_values(x, ref, "encode_int8");
  const int64_t n = x.numel();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  TORCH_CHECK(q.scalar_type() == at::kChar && q.numel() >= blocks * kBlock && q.is_contiguous(), "encode_int8: q");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() >= blocks && scales.is_contiguous(),
              "encode_int8: scales");
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "encode_int8", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = ref.has_value() ? ref->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, blocks, 64, [&](int64_t begin, int64_t end) {
      float d[kBlock];
      for (int64_t b = begin; b < end; ++b) {
        const int64_t lo = b * kBlock, count = std::min(kBlock, n - lo);
        float amax = 0.0f;
        bool nan = false;
        for (int64_t j = 0; j < count; ++j) {
          d[j] = static_cast<float>(xp[lo + j]) - (rp ? static_cast<float>(rp[lo + j]) : 0.0f);
          nan |= std::isnan(d[j]);
          amax = std::max(amax, std::fabs(d[j]));
        }
        float s = nan ? std::numeric_limits<float>::quiet_NaN() : amax / 127.0f;
        if (s == 0.0f) s = 1.0f;
        sp[b] = s;
        int8_t* out = qp + lo;
        if (!std::isfinite(s)) {
          std::memset(out, 0, kBlock);  // decodes to 0 * s: non-finite, as the block was
          continue;
        }
        for (int64_t j = 0; j < count; ++j) {
          const float r = std::nearbyint(d[j] / s);  // to nearest, ties to even (torch.round)
          out[j] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
        }
        if (count < kBlock) std::memset(out + count, 0, kBlock - count);
      }
    });
  });
}

template <typename scalar_t, typename Decode>
static void decode_loop(int64_t n, const std::optional<at::Tensor>& ref, at::Tensor& out, double alpha,
                        bool accumulate, Decode decode) {
  scalar_t* op = out.data_ptr<scalar_t>();
  const scalar_t* rp = ref.has_value() ? ref->data_ptr<scalar_t>() : nullptr;
  const float a = static_cast<float>(alpha);
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float v = decode(j) + (rp ? static_cast<float>(rp[j]) : 0.0f);
      if (a != 1.0f) v *= a;
      op[j] = static_cast<scalar_t>(accumulate ? static_cast<float>(op[j]) + v : v);
    }
  });
}

static void check_out(const at::Tensor& out, const std::optional<at::Tensor>& ref, const char* what) {
  check_values(out, std::nullopt, what);
  if (ref.has_value()) {
    TORCH_CHECK(ref->scalar_type() == out.scalar_type() && ref->numel() == out.numel() && ref->is_contiguous(),
                what, ": ref must match out's dtype and size");
  }
}

// out[j] (+)= alpha * (decode(payload)[start + j] + ref[j]) for j < out.numel()
void decode_bf16(const at::Tensor& payload, const std::optional<at::Tensor>& ref, at::Tensor out, double alpha,
                 bool accumulate, int64_t start) {
  check_out(out, ref, "decode_bf16");
  TORCH_CHECK(payload.scalar_type() == at::kShort && payload.numel() >= start + out.numel(), "decode_bf16: payload");
  const int16_t* p = payload.data_ptr<int16_t>() + start;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "decode_bf16", [&] {
    decode_loop<scalar_t>(out.numel(), ref, out, alpha, accumulate, [&](int64_t j) {
      c10::BFloat16 h;
      std::memcpy(&h.x, p + j, sizeof(int16_t));
      return static_cast<float>(h);
    });
  });
}

void decode_int8(const at::Tensor& q, const at::Tensor& scales, const std::optional<at::Tensor>& ref, at::Tensor out,
                 double alpha, bool accumulate, int64_t start) {
  check_out(out, ref, "decode_int8");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.numel() >= start + out.numel(), "decode_int8: q");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() * kBlock >= start + out.numel(),
              "decode_int8: scales");
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "decode_int8", [&] {
    decode_loop<scalar_t>(out.numel(), ref, out, alpha, accumulate, [&](int64_t j) {
      const int64_t i = start + j;
      return static_cast<float>(qp[i]) * sp[i / kBlock];
    });
  });
}

}  // namespace horovod_leader
