// Host-side view of a DLPack tensor handed over from Python (torch, numpy, cupy...).
// Shared by the CPU and CUDA launchers. Holds the capsule for the duration of the call.
#pragma once
#include <pybind11/pybind11.h>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "pykernels/common.h"
#include "pykernels/dlpack.h"

namespace pykernels {
namespace py = pybind11;

struct TensorArg {
  std::string name;
  DLTensor* t = nullptr;
  DLManagedTensor* managed = nullptr;
  std::vector<int64_t> strides;  // always filled (compact strides when DLPack gives NULL)

  TensorArg(const std::string& n, py::object obj) : name(n) {
    py::object cap = obj;
    if (!PyCapsule_CheckExact(obj.ptr())) {
      if (!py::hasattr(obj, "__dlpack__"))
        throw py::type_error(name + ": expected a tensor supporting DLPack, got " +
                             std::string(py::str(py::type::of(obj))));
      cap = obj.attr("__dlpack__")();
    }
    void* p = PyCapsule_GetPointer(cap.ptr(), "dltensor");
    if (p == nullptr) {
      PyErr_Clear();
      throw py::value_error(name + ": DLPack capsule was already consumed or is not a 'dltensor'");
    }
    managed = static_cast<DLManagedTensor*>(p);
    // Consume the capsule: we own the managed tensor now and call its deleter ourselves.
    PyCapsule_SetName(cap.ptr(), "used_dltensor");
    t = &managed->dl_tensor;
    strides.resize(t->ndim);
    if (t->strides) {
      for (int i = 0; i < t->ndim; ++i) strides[i] = t->strides[i];
    } else {
      int64_t s = 1;
      for (int i = t->ndim - 1; i >= 0; --i) { strides[i] = s; s *= t->shape[i]; }
    }
  }
  ~TensorArg() {
    if (managed && managed->deleter) managed->deleter(managed);
  }
  TensorArg(const TensorArg&) = delete;
  TensorArg& operator=(const TensorArg&) = delete;

  int ndim() const { return t->ndim; }
  int64_t size(int i) const { return t->shape[i]; }
  int64_t stride(int i) const { return strides[i]; }
  void* data() const { return static_cast<char*>(t->data) + t->byte_offset; }
  int device_type() const { return t->device.device_type; }
  int device_id() const { return t->device.device_id; }

  // Float dtype of this tensor, or throws naming the argument.
  DType float_dtype() const {
    const DLDataType& d = t->dtype;
    if (d.lanes == 1) {
      if (d.code == kDLFloat && d.bits == 32) return DType::kFloat32;
      if (d.code == kDLFloat && d.bits == 16) return DType::kFloat16;
      if (d.code == kDLBfloat && d.bits == 16) return DType::kBFloat16;
    }
    throw py::type_error(name + ": expected float32, float16 or bfloat16, got " + dtype_str());
  }
  bool is_int32() const { return t->dtype.code == kDLInt && t->dtype.bits == 32 && t->dtype.lanes == 1; }
  bool is_float32() const { return t->dtype.code == kDLFloat && t->dtype.bits == 32 && t->dtype.lanes == 1; }
  std::string dtype_str() const {
    const char* c = t->dtype.code == kDLInt ? "int" : t->dtype.code == kDLUInt ? "uint"
                  : t->dtype.code == kDLFloat ? "float" : t->dtype.code == kDLBfloat ? "bfloat" : "code?";
    return std::string(c) + std::to_string(t->dtype.bits);
  }
  std::string shape_str() const {
    std::string s = "[";
    for (int i = 0; i < t->ndim; ++i) s += (i ? ", " : "") + std::to_string(t->shape[i]);
    return s + "]";
  }
  void require_ndim(int n) const {
    if (t->ndim != n)
      throw py::value_error(name + ": expected " + std::to_string(n) + " dimensions, got shape " + shape_str());
  }
  void require_last_contiguous() const {
    if (t->ndim > 0 && t->shape[t->ndim - 1] > 1 && strides[t->ndim - 1] != 1)
      throw py::value_error(name + ": last dimension must have stride 1, got stride " +
                            std::to_string(strides[t->ndim - 1]));
  }
  void require_contiguous() const {
    int64_t s = 1;
    for (int i = t->ndim - 1; i >= 0; --i) {
      if (t->shape[i] > 1 && strides[i] != s)
        throw py::value_error(name + ": expected a contiguous tensor");
      s *= t->shape[i];
    }
  }
};

}  // namespace pykernels
