// ONNX Runtime registration of the custom op onnxprune.BlockSparseAttention
// (versions 1 and 2; one kernel serves both) and of its internal statistics form
// onnxprune.BlockSparseAttentionStatistics (CPU only; calibration's in-memory model), written
// against the raw C API (no exceptions cross the C boundary: every failure becomes an OrtStatus).
#ifndef ORT_API_MANUAL_INIT
#define ORT_API_MANUAL_INIT
#endif
#include <onnxruntime_c_api.h>

#include <cstdint>
#include <exception>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "block_sparse_attention.h"
#if defined(ONNXPRUNE_WITH_CUDA)
#include "block_sparse_attention_cuda.h"
#endif

#if defined(_WIN32)
#define ONNXPRUNE_EXPORT __declspec(dllexport)
#else
#define ONNXPRUNE_EXPORT __attribute__((visibility("default")))
#endif

namespace {

constexpr const char* kDomain = "onnxprune";
constexpr const char* kOpName = "BlockSparseAttention";
constexpr const char* kStatisticsOpName = "BlockSparseAttentionStatistics";
constexpr size_t kNumInputs = 7;
constexpr size_t kLayoutRuleInput = 6;
// The statistics form: BlockSparseAttention's inputs, then query_valid ([B, Sq] bool or
// int64); outputs Y and the pooled probabilities (double).
constexpr size_t kQueryValidInput = 7;
constexpr size_t kNumStatisticsInputs = 8;
// Op versions the kernel implements. A version-1 node passes neither layout_rule nor
// queries_at_end, which gives it version 2's defaults (the same meaning, lengths beyond the
// layout continuing densely). ORT (1.2x) builds one schema per custom op name, "since" the
// start version, so it hands nodes of any version of the domain to this kernel: the end version
// documents the contract more than it filters.
constexpr int kStartVersion = 1;
constexpr int kEndVersion = 2;

const OrtApi* g_api = nullptr;

OrtStatus* invalid_arg(const std::string& msg) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str());
}

OrtStatus* fail(const std::string& msg) { return g_api->CreateStatus(ORT_FAIL, msg.c_str()); }

// Prefixes the message of an ORT status with some context; takes ownership.
OrtStatus* wrap_status(OrtStatus* st, const std::string& what) {
  if (st == nullptr) return nullptr;
  std::string msg = "BlockSparseAttention: " + what + ": " + g_api->GetErrorMessage(st);
  OrtErrorCode code = g_api->GetErrorCode(st);
  g_api->ReleaseStatus(st);
  return g_api->CreateStatus(code, msg.c_str());
}

#define BSA_RETURN_IF_ERROR(expr, what)          \
  do {                                           \
    OrtStatus* _st = (expr);                     \
    if (_st != nullptr) return wrap_status(_st, what); \
  } while (0)

struct BsaKernel {
  bool cuda = false;  // CUDAExecutionProvider kernel (device pointers, ORT's stream)
  int64_t block_size = 0;
  bool has_block_size = false;
  bool has_scale = false;
  float scale = 0.0f;
  int64_t is_causal = 0;
  int64_t queries_at_end = 0;
  bool statistics = false;  // onnxprune.BlockSparseAttentionStatistics
  int64_t granularity = 0;
};

// Reads the type and shape of a tensor OrtValue.
OrtStatus* get_type_shape(const OrtValue* value, int32_t* type, std::vector<int64_t>* shape) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  OrtStatus* st = g_api->GetTensorTypeAndShape(value, &info);
  if (st != nullptr) return st;
  ONNXTensorElementDataType t = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t rank = 0;
  st = g_api->GetTensorElementType(info, &t);
  if (st == nullptr) st = g_api->GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    shape->assign(rank, 0);
    st = g_api->GetDimensions(info, shape->data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  *type = static_cast<int32_t>(t);
  return st;
}

struct ParallelCtx {
  OrtKernelContext* ctx;
  std::string error;
};

bool ort_parallel_for(void* pf_ctx, size_t total, onnxprune::BsaTaskFn fn, void* data) {
  auto* pc = static_cast<ParallelCtx*>(pf_ctx);
  OrtStatus* st = g_api->KernelContext_ParallelFor(pc->ctx, fn, total, 0, data);
  if (st != nullptr) {
    pc->error = g_api->GetErrorMessage(st);
    g_api->ReleaseStatus(st);
    return false;
  }
  return true;
}

OrtStatus* compute_impl(const BsaKernel& kernel, OrtKernelContext* context) {
  size_t n_in = 0;
  BSA_RETURN_IF_ERROR(g_api->KernelContext_GetInputCount(context, &n_in), "GetInputCount");

  const size_t num_inputs = kernel.statistics ? kNumStatisticsInputs : kNumInputs;
  const OrtValue* in[kNumStatisticsInputs] = {};
  for (size_t i = 0; i < num_inputs && i < n_in; ++i) {
    BSA_RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, i, &in[i]), "GetInput");
  }
  static const char* const names[kNumStatisticsInputs] = {"Q", "K", "V", "layout", "attn_mask",
                                                          "key_padding_mask", "layout_rule", "query_valid"};
  for (size_t i = 0; i < 4; ++i) {
    if (in[i] == nullptr) return invalid_arg(std::string("BlockSparseAttention: missing required input ") + names[i]);
  }
  for (size_t i = 0; i < num_inputs; ++i) {
    if (in[i] == nullptr) continue;
    int is_tensor = 0;
    BSA_RETURN_IF_ERROR(g_api->IsTensor(in[i], &is_tensor), "IsTensor");
    if (!is_tensor) return invalid_arg(std::string("BlockSparseAttention: input ") + names[i] + " must be a tensor");
  }

  if (!kernel.has_block_size) {
    return invalid_arg("BlockSparseAttention: required attribute block_size is missing");
  }

  onnxprune::BsaInputDesc desc;
  BSA_RETURN_IF_ERROR(get_type_shape(in[0], &desc.q_type, &desc.q_shape), "reading Q");
  BSA_RETURN_IF_ERROR(get_type_shape(in[1], &desc.k_type, &desc.k_shape), "reading K");
  BSA_RETURN_IF_ERROR(get_type_shape(in[2], &desc.v_type, &desc.v_shape), "reading V");
  BSA_RETURN_IF_ERROR(get_type_shape(in[3], &desc.layout_type, &desc.layout_shape), "reading layout");
  if (in[4] != nullptr) {
    desc.has_attn_mask = true;
    BSA_RETURN_IF_ERROR(get_type_shape(in[4], &desc.attn_mask_type, &desc.attn_mask_shape),
                        "reading attn_mask");
  }
  if (in[5] != nullptr) {
    desc.has_key_padding_mask = true;
    BSA_RETURN_IF_ERROR(
        get_type_shape(in[5], &desc.key_padding_mask_type, &desc.key_padding_mask_shape),
        "reading key_padding_mask");
  }
  if (in[kLayoutRuleInput] != nullptr) {
    desc.has_layout_rule = true;
    BSA_RETURN_IF_ERROR(get_type_shape(in[kLayoutRuleInput], &desc.layout_rule_type, &desc.layout_rule_shape),
                        "reading layout_rule");
    if (desc.layout_rule_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
      // Host memory on every execution provider (get_input_mem_type), so validation reads it.
      void* rule = nullptr;
      BSA_RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(in[kLayoutRuleInput]), &rule),
                          "GetTensorMutableData(layout_rule)");
      desc.layout_rule = static_cast<const int64_t*>(rule);
    }
  }
  desc.block_size = kernel.block_size;
  desc.has_scale = kernel.has_scale;
  desc.scale = kernel.scale;
  desc.is_causal = kernel.is_causal;
  desc.queries_at_end = kernel.queries_at_end;
  desc.allow_half = kernel.cuda;
  if (kernel.statistics) {
    desc.statistics = true;
    desc.granularity = kernel.granularity;  // 0 when the attribute is missing: an error
    if (in[kQueryValidInput] != nullptr) {
      desc.has_query_valid = true;
      BSA_RETURN_IF_ERROR(get_type_shape(in[kQueryValidInput], &desc.query_valid_type, &desc.query_valid_shape),
                          "reading query_valid");
    }
  }

  onnxprune::BsaParams p;
  std::string err = onnxprune::bsa_validate(desc, &p);
  if (!err.empty()) return invalid_arg(err);

  auto data_of = [](const OrtValue* v, const void** out) -> OrtStatus* {
    void* ptr = nullptr;
    OrtStatus* st = g_api->GetTensorMutableData(const_cast<OrtValue*>(v), &ptr);
    *out = ptr;
    return st;
  };
  const void* ptrs[kLayoutRuleInput] = {};  // (layout_rule: read above)
  for (size_t i = 0; i < kLayoutRuleInput; ++i) {
    if (in[i] != nullptr) BSA_RETURN_IF_ERROR(data_of(in[i], &ptrs[i]), "GetTensorMutableData");
  }
  p.q = static_cast<const float*>(ptrs[0]);
  p.k = static_cast<const float*>(ptrs[1]);
  p.v = static_cast<const float*>(ptrs[2]);
  p.layout = static_cast<const uint8_t*>(ptrs[3]);
  p.attn_mask = ptrs[4];
  p.key_padding_mask = ptrs[5];
  if (p.query_valid_kind != onnxprune::PaddingKind::kNone) {
    BSA_RETURN_IF_ERROR(data_of(in[kQueryValidInput], &p.query_valid), "GetTensorMutableData(query_valid)");
  }

  const std::vector<int64_t> out_shape = p.output_shape();
  OrtValue* out = nullptr;
  BSA_RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, out_shape.data(), out_shape.size(), &out),
                      "GetOutput");
  void* out_ptr = nullptr;
  BSA_RETURN_IF_ERROR(g_api->GetTensorMutableData(out, &out_ptr), "GetTensorMutableData(Y)");
  p.y = static_cast<float*>(out_ptr);

  if (kernel.cuda) {
#if defined(ONNXPRUNE_WITH_CUDA)
    void* stream = nullptr;
    BSA_RETURN_IF_ERROR(g_api->KernelContext_GetGPUComputeStream(context, &stream),
                        "KernelContext_GetGPUComputeStream");
    err = onnxprune::bsa_compute_cuda(p, stream);
    return err.empty() ? nullptr : fail(err);
#else
    return fail("BlockSparseAttention: this library was built without CUDA");
#endif
  }

  ParallelCtx pc{context, std::string()};
  if (kernel.statistics) {
    const std::vector<int64_t> pooled_shape = onnxprune::bsa_pooled_shape(p);
    OrtValue* pooled = nullptr;
    BSA_RETURN_IF_ERROR(
        g_api->KernelContext_GetOutput(context, 1, pooled_shape.data(), pooled_shape.size(), &pooled), "GetOutput");
    void* pooled_ptr = nullptr;
    BSA_RETURN_IF_ERROR(g_api->GetTensorMutableData(pooled, &pooled_ptr), "GetTensorMutableData(pooled)");
    err = onnxprune::bsa_statistics_cpu(p, static_cast<double*>(pooled_ptr), &ort_parallel_for, &pc);
  } else {
    err = onnxprune::bsa_compute_cpu(p, &ort_parallel_for, &pc);
  }
  if (!err.empty()) {
    if (!pc.error.empty()) err += ": " + pc.error;
    return fail(err);
  }
  return nullptr;
}

// ---- OrtCustomOp callbacks -------------------------------------------------

// One registered kernel: the CPU float32 op, or a CUDA op for one value type
// (ORT picks among same-named ops by execution provider and input types, and
// infers Y's type from the selected op's single output type).
struct BsaOp {
  OrtCustomOp base;  // first member: ORT hands callbacks a pointer to it
  bool cuda;
  ONNXTensorElementDataType value_type;
  bool statistics;
};

const BsaOp& op_of(const OrtCustomOp* op) { return *reinterpret_cast<const BsaOp*>(op); }

OrtStatusPtr ORT_API_CALL create_kernel_v2(const OrtCustomOp* op, const OrtApi* api,
                                           const OrtKernelInfo* info, void** kernel) noexcept {
  *kernel = nullptr;
  BsaKernel* k = new (std::nothrow) BsaKernel();
  if (k == nullptr) return api->CreateStatus(ORT_FAIL, "BlockSparseAttention: out of memory");
  k->cuda = op_of(op).cuda;  // no CUDA call here: kernels are created on CPU-only hosts too
  k->statistics = op_of(op).statistics;

  // Attribute problems are reported at run time (see compute_impl / bsa_validate).
  int64_t iv = 0;
  OrtStatus* st = api->KernelInfoGetAttribute_int64(info, "block_size", &iv);
  if (st == nullptr) {
    k->block_size = iv;
    k->has_block_size = true;
  } else {
    api->ReleaseStatus(st);
  }
  float fv = 0.0f;
  st = api->KernelInfoGetAttribute_float(info, "scale", &fv);
  if (st == nullptr) {
    k->scale = fv;
    k->has_scale = true;
  } else {
    api->ReleaseStatus(st);
  }
  st = api->KernelInfoGetAttribute_int64(info, "is_causal", &iv);
  if (st == nullptr) {
    k->is_causal = iv;
  } else {
    api->ReleaseStatus(st);
  }
  st = api->KernelInfoGetAttribute_int64(info, "queries_at_end", &iv);
  if (st == nullptr) {
    k->queries_at_end = iv;
  } else {
    api->ReleaseStatus(st);
  }
  if (k->statistics) {
    st = api->KernelInfoGetAttribute_int64(info, "granularity", &iv);
    if (st == nullptr) {
      k->granularity = iv;
    } else {
      api->ReleaseStatus(st);
    }
  }
  *kernel = k;
  return nullptr;
}

OrtStatusPtr ORT_API_CALL kernel_compute_v2(void* op_kernel, OrtKernelContext* context) noexcept {
  try {
    return compute_impl(*static_cast<const BsaKernel*>(op_kernel), context);
  } catch (const std::bad_alloc&) {
    return fail("BlockSparseAttention: out of memory");
  } catch (const std::exception& e) {
    return fail(std::string("BlockSparseAttention: ") + e.what());
  } catch (...) {
    return fail("BlockSparseAttention: unknown error");
  }
}

void ORT_API_CALL kernel_destroy(void* op_kernel) noexcept { delete static_cast<BsaKernel*>(op_kernel); }

const char* ORT_API_CALL get_name(const OrtCustomOp* op) noexcept {
  return op_of(op).statistics ? kStatisticsOpName : kOpName;
}
const char* ORT_API_CALL get_ep(const OrtCustomOp* op) noexcept {
  return op_of(op).cuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
}

ONNXTensorElementDataType ORT_API_CALL get_input_type(const OrtCustomOp* op, size_t index) noexcept {
  switch (index) {
    case 0:
    case 1:
    case 2: return op_of(op).value_type;
    case 3: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // checked at run time
  }
}
size_t ORT_API_CALL get_input_count(const OrtCustomOp* op) noexcept {
  return op_of(op).statistics ? kNumStatisticsInputs : kNumInputs;
}
ONNXTensorElementDataType ORT_API_CALL get_output_type(const OrtCustomOp* op, size_t index) noexcept {
  return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE : op_of(op).value_type;
}
size_t ORT_API_CALL get_output_count(const OrtCustomOp* op) noexcept { return op_of(op).statistics ? 2 : 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL get_input_char(const OrtCustomOp*, size_t index) noexcept {
  return index >= 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL get_output_char(const OrtCustomOp*, size_t) noexcept {
  return INPUT_OUTPUT_REQUIRED;
}
// The rule is a few integers per head that the host validates (and the CUDA launch passes by
// value), so the CUDA op takes it in CPU memory too.
OrtMemType ORT_API_CALL get_input_mem_type(const OrtCustomOp*, size_t index) noexcept {
  return index == kLayoutRuleInput ? OrtMemTypeCPUInput : OrtMemTypeDefault;
}
int ORT_API_CALL get_variadic_min_arity(const OrtCustomOp*) noexcept { return 1; }
int ORT_API_CALL get_variadic_homogeneity(const OrtCustomOp*) noexcept { return 1; }
int ORT_API_CALL get_start_version(const OrtCustomOp*) noexcept { return kStartVersion; }
int ORT_API_CALL get_end_version(const OrtCustomOp*) noexcept { return kEndVersion; }
size_t ORT_API_CALL get_no_pairs(int** a, int** b) noexcept {
  *a = nullptr;
  *b = nullptr;
  return 0;
}
void ORT_API_CALL release_no_pairs(int*, int*) noexcept {}

BsaOp make_op(bool cuda, ONNXTensorElementDataType value_type, bool statistics = false) {
  BsaOp bop{};
  bop.cuda = cuda;
  bop.value_type = value_type;
  bop.statistics = statistics;
  OrtCustomOp& op = bop.base;
  op.version = ORT_API_VERSION;
  op.CreateKernel = nullptr;  // V2 entry points are used (version > 15, KernelCompute == null)
  op.GetName = &get_name;
  op.GetExecutionProviderType = &get_ep;
  op.GetInputType = &get_input_type;
  op.GetInputTypeCount = &get_input_count;
  op.GetOutputType = &get_output_type;
  op.GetOutputTypeCount = &get_output_count;
  op.KernelCompute = nullptr;
  op.KernelDestroy = &kernel_destroy;
  op.GetInputCharacteristic = &get_input_char;
  op.GetOutputCharacteristic = &get_output_char;
  op.GetInputMemoryType = &get_input_mem_type;
  op.GetVariadicInputMinArity = &get_variadic_min_arity;
  op.GetVariadicInputHomogeneity = &get_variadic_homogeneity;
  op.GetVariadicOutputMinArity = &get_variadic_min_arity;
  op.GetVariadicOutputHomogeneity = &get_variadic_homogeneity;
  op.CreateKernelV2 = &create_kernel_v2;
  op.KernelComputeV2 = &kernel_compute_v2;
  op.InferOutputShapeFn = nullptr;
  op.GetStartVersion = &get_start_version;
  op.GetEndVersion = &get_end_version;
  op.GetMayInplace = &get_no_pairs;
  op.ReleaseMayInplace = &release_no_pairs;
  op.GetAliasMap = &get_no_pairs;
  op.ReleaseAliasMap = &release_no_pairs;
  return bop;
}

// Ops and domain live for the whole process (sessions keep raw pointers to them).
BsaOp g_ops[] = {
    make_op(false, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
    make_op(false, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, /*statistics=*/true),
#if defined(ONNXPRUNE_WITH_CUDA)
    make_op(true, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
    make_op(true, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16),
    make_op(true, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16),
#endif
};
OrtCustomOpDomain* g_domain = nullptr;
std::mutex g_mutex;

}  // namespace

extern "C" ONNXPRUNE_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                      const OrtApiBase* api_base) {
  if (api_base == nullptr || options == nullptr) return nullptr;
  try {
    std::lock_guard<std::mutex> lock(g_mutex);
    const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
    if (api == nullptr) {
      const OrtApi* api1 = api_base->GetApi(1);
      if (api1 == nullptr) return nullptr;
      std::string msg = std::string("onnxprune custom ops need ONNX Runtime API version ") +
                        std::to_string(ORT_API_VERSION) + " or newer; this runtime is " +
                        api_base->GetVersionString();
      return api1->CreateStatus(ORT_FAIL, msg.c_str());
    }
    g_api = api;
    if (g_domain == nullptr) {
      OrtCustomOpDomain* domain = nullptr;
      OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain);
      if (st != nullptr) return st;
      for (BsaOp& op : g_ops) {
        st = api->CustomOpDomain_Add(domain, &op.base);
        if (st != nullptr) {
          api->ReleaseCustomOpDomain(domain);
          return st;
        }
      }
      g_domain = domain;  // intentionally never released
    }
    return api->AddCustomOpDomain(options, g_domain);
  } catch (...) {
    return g_api != nullptr ? g_api->CreateStatus(ORT_FAIL, "onnxprune: RegisterCustomOps failed")
                            : nullptr;
  }
}
