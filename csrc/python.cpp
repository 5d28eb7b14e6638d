// The Python module mlbfgs_fused._C: importing it loads this library, whose static
// initialisers register the ops (torch.ops.mlbfgs_fused_native, csrc/ops.cpp), and it
// holds the CPU's whole step as one direct call (csrc/cpu/step.h):
//
//   plan = _C.whole_step_plan(params, order, state, m)
//   done = _C.whole_step(plan, params, lr, momentum, weight_decay, ema_decay,
//                        pair_momentum, damping, sigma_low, sigma_high, eps,
//                        update_period, maximize, normalize, grad_scale, found_inf)
//
// A custom op's call from Python parses its schema argument by argument (about 10 us
// for the passes' argument lists); this call reads the parameters, their gradients and
// the hyperparameters straight from the Python objects, so a step's fixed cost is that
// of the work (docs/design.md, "The C++ and CUDA backends"). whole_step checks that
// everything is as the plan was made for (the same parameter objects, dtype, shapes,
// strides, CPU tensors; gradients dense and laid out like their parameters) before it
// writes anything, and returns False where it is not: MLBFGS.step then takes the
// general path, which raises the error or rebuilds the arena.
#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <exception>
#include <vector>

#include "cpu/step.h"

namespace {

using mlbfgs_fused::cpu::StepHyper;
using mlbfgs_fused::cpu::StepState;

constexpr const char* PLAN_NAME = "mlbfgs_fused.whole_step_plan";

struct Plan {
  std::vector<PyObject*> params;  // the group's parameters in group order (references held)
  std::vector<int64_t> order;     // arena position -> group index
  std::vector<std::vector<int64_t>> sizes, strides;  // per arena position
  c10::ScalarType dtype = c10::ScalarType::Float;
  StepState state;
  // Per step, reused: the tensors in arena order.
  std::vector<at::Tensor> tensors, grads;

  ~Plan() {
    for (PyObject* p : params) Py_XDECREF(p);
  }
};

void destroy_plan(PyObject* capsule) {
  delete static_cast<Plan*>(PyCapsule_GetPointer(capsule, PLAN_NAME));
}

bool unpack_tensor(PyObject* obj, at::Tensor& out) {
  if (!THPVariable_Check(obj)) return false;
  out = THPVariable_Unpack(obj);
  return true;
}

// whole_step_plan(params: list, order: list[int], state: tuple[Tensor, ...], m: int)
PyObject* whole_step_plan(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4 || !PyList_Check(args[0]) || !PyList_Check(args[1]) || !PyTuple_Check(args[2])) {
    PyErr_SetString(PyExc_TypeError, "whole_step_plan(params: list, order: list, state: tuple, m: int)");
    return nullptr;
  }
  auto plan = std::make_unique<Plan>();
  const Py_ssize_t count = PyList_GET_SIZE(args[0]);
  if (PyList_GET_SIZE(args[1]) != count) {
    PyErr_SetString(PyExc_ValueError, "whole_step_plan: order must name every parameter");
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* p = PyList_GET_ITEM(args[0], i);
    if (!THPVariable_Check(p)) {
      PyErr_SetString(PyExc_TypeError, "whole_step_plan: parameters must be tensors");
      return nullptr;
    }
    Py_INCREF(p);
    plan->params.push_back(p);
  }
  for (Py_ssize_t j = 0; j < count; ++j) {
    const int64_t i = PyLong_AsLongLong(PyList_GET_ITEM(args[1], j));
    if (i < 0 || i >= count) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "whole_step_plan: bad order");
      return nullptr;
    }
    plan->order.push_back(i);
    const at::Tensor t = THPVariable_Unpack(plan->params[i]);
    plan->sizes.push_back(t.sizes().vec());
    plan->strides.push_back(t.strides().vec());
    plan->dtype = t.scalar_type();
  }
  std::vector<at::Tensor> state;
  for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(args[2]); ++k) {
    at::Tensor t;
    if (!unpack_tensor(PyTuple_GET_ITEM(args[2], k), t)) {
      PyErr_SetString(PyExc_TypeError, "whole_step_plan: state must be tensors");
      return nullptr;
    }
    state.push_back(t);
  }
  if (state.size() != 19) {
    PyErr_SetString(PyExc_ValueError, "whole_step_plan: expected 19 state tensors");
    return nullptr;
  }
  StepState& s = plan->state;
  at::Tensor* fields[] = {&s.history_s, &s.history_y, &s.param_ema, &s.grad_ema, &s.momentum_buffer,
                          &s.param_snapshot, &s.grad_snapshot, &s.gram, &s.step, &s.pair_count,
                          &s.skipped_pairs, &s.skipped_steps, &s.chunks, &s.blocks, &s.partials,
                          &s.pair_partials, &s.gram_partials, &s.coef, &s.stats};
  for (size_t k = 0; k < state.size(); ++k) *fields[k] = state[k];
  s.m = PyLong_AsLongLong(args[3]);
  if (PyErr_Occurred()) return nullptr;
  plan->tensors.resize(count);
  plan->grads.resize(count);
  PyObject* capsule = PyCapsule_New(plan.get(), PLAN_NAME, destroy_plan);
  if (capsule != nullptr) plan.release();
  return capsule;
}

// A float hyperparameter (a Python number), or a CPU tensor's value where `tensor_ok`.
bool read_number(PyObject* obj, double& out, bool tensor_ok) {
  if (THPVariable_Check(obj)) {
    if (!tensor_ok) return false;
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (!t.device().is_cpu() || t.numel() != 1 || !(t.is_floating_point() || t.scalar_type() == at::kBool)) {
      return false;
    }
    switch (t.scalar_type()) {
      case at::kDouble: out = *t.const_data_ptr<double>(); return true;
      case at::kFloat: out = *t.const_data_ptr<float>(); return true;
      case at::kHalf: out = static_cast<double>(*t.const_data_ptr<at::Half>()); return true;
      case at::kBFloat16: out = static_cast<double>(*t.const_data_ptr<at::BFloat16>()); return true;
      case at::kBool: out = *t.const_data_ptr<bool>() ? 1.0 : 0.0; return true;
      default: return false;
    }
  }
  out = PyFloat_AsDouble(obj);
  return !(out == -1.0 && PyErr_Occurred());
}

// The GIL released for the work, taken back however it ends.
struct WithoutGil {
  PyThreadState* saved = PyEval_SaveThread();
  ~WithoutGil() { PyEval_RestoreThread(saved); }
};

bool same_layout(const at::Tensor& t, const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  return t.sizes().equals(sizes) && t.strides().equals(strides);
}

PyObject* whole_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 16) {
    PyErr_SetString(PyExc_TypeError, "whole_step takes 16 arguments");
    return nullptr;
  }
  auto* plan = static_cast<Plan*>(PyCapsule_GetPointer(args[0], PLAN_NAME));
  if (plan == nullptr) return nullptr;
  PyObject* live = args[1];
  const size_t count = plan->params.size();
  // The same parameter objects, in the same order.
  if (!PyList_Check(live) || static_cast<size_t>(PyList_GET_SIZE(live)) != count) Py_RETURN_FALSE;
  for (size_t i = 0; i < count; ++i) {
    if (PyList_GET_ITEM(live, i) != plan->params[i]) Py_RETURN_FALSE;
  }
  // Hyperparameters, read at every step (schedulers change them).
  StepHyper h;
  double period = 0, maximize = 0, normalize = 0;
  PyObject* ema = args[5];  // (beta_p, beta_g), a tuple or a list
  const bool pair = (PyTuple_Check(ema) && PyTuple_GET_SIZE(ema) == 2) || (PyList_Check(ema) && PyList_GET_SIZE(ema) == 2);
  if (!read_number(args[2], h.lr, true) || !read_number(args[3], h.momentum, false) ||
      !read_number(args[4], h.weight_decay, false) || !pair ||
      !read_number(PySequence_Fast_GET_ITEM(ema, 0), h.beta_p, false) ||
      !read_number(PySequence_Fast_GET_ITEM(ema, 1), h.beta_g, false) ||
      !read_number(args[6], h.pair_momentum, false) || !read_number(args[7], h.damping, false) ||
      !read_number(args[8], h.sigma_low, false) || !read_number(args[9], h.sigma_high, false) ||
      !read_number(args[10], h.eps, false) || !read_number(args[11], period, false) ||
      !read_number(args[12], maximize, false) || !read_number(args[13], normalize, false)) {
    PyErr_Clear();
    Py_RETURN_FALSE;
  }
  h.period = static_cast<int64_t>(period);
  h.maximize = maximize != 0.0;
  h.normalize = static_cast<int64_t>(normalize);
  double grad_scale = 1.0, found_inf = 0.0;  // AMP's, where GradScaler.step set them
  if ((args[14] != Py_None && !read_number(args[14], grad_scale, true)) ||
      (args[15] != Py_None && !read_number(args[15], found_inf, true))) {
    PyErr_Clear();
    Py_RETURN_FALSE;
  }
  // The tensors as the plan was made for them; gradients laid out like their parameters.
  bool any_grad = false;
  for (size_t j = 0; j < count; ++j) {
    at::Tensor& t = plan->tensors[j];
    t = THPVariable_Unpack(plan->params[plan->order[j]]);
    if (!t.device().is_cpu() || t.scalar_type() != plan->dtype || t.layout() != c10::kStrided ||
        !same_layout(t, plan->sizes[j], plan->strides[j]) || !t.is_non_overlapping_and_dense()) {
      Py_RETURN_FALSE;
    }
    at::Tensor& g = plan->grads[j];
    g = t.grad();
    if (g.defined()) {
      if (!g.device().is_cpu() || g.scalar_type() != plan->dtype || g.layout() != c10::kStrided ||
          !same_layout(g, plan->sizes[j], plan->strides[j])) {
        Py_RETURN_FALSE;
      }
      any_grad = true;
    }
  }
  if (!any_grad) Py_RETURN_TRUE;  // a group without gradients: nothing to do
  try {
    const WithoutGil released;
    mlbfgs_fused::cpu::whole_step(plan->tensors, plan->grads, plan->state, h, grad_scale, found_inf != 0.0);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  // In-place writes, as torch's own in-place ops count them.
  for (size_t j = 0; j < count; ++j) {
    if (plan->grads[j].defined()) torch::autograd::impl::bump_version(plan->tensors[j]);
  }
  Py_RETURN_TRUE;
}

PyMethodDef methods[] = {
    {"whole_step_plan", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(whole_step_plan)),
     METH_FASTCALL, "The plan of an arena's whole step (csrc/python.cpp)."},
    {"whole_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(whole_step)), METH_FASTCALL,
     "One whole step of an arena; False, writing nothing, where it does not fit the plan."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
