// Python bindings of the condensed-layout helpers (condensed.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "condensed.h"

namespace py = pybind11;

namespace {

template <typename T>
void square_to_condensed_py(py::array_t<T, py::array::c_style> buf) {
  if (buf.ndim() != 2 || buf.shape(0) != buf.shape(1))
    throw std::invalid_argument("square_to_condensed: expected a square (n, n) array, got ndim=" +
                                std::to_string(buf.ndim()));
  if (!buf.writeable()) throw std::invalid_argument("square_to_condensed: array is read-only");
  const int64_t n = buf.shape(0);
  T* data = buf.mutable_data();
  py::gil_scoped_release release;
  iics::square_to_condensed(data, n);
}

}  // namespace

void bind_condensed(py::module_& m) {
  m.def("condensed_size", &iics::condensed_size, py::arg("n"),
        "Number of entries n*(n-1)/2 of the condensed upper triangle.");
  m.def(
      "condensed_index",
      [](int64_t n, int64_t i, int64_t j) {
        if (i == j || i < 0 || j < 0 || i >= n || j >= n)
          throw std::out_of_range("condensed_index: need 0 <= i, j < n and i != j");
        if (i > j) std::swap(i, j);
        return iics::condensed_index(n, i, j);
      },
      py::arg("n"), py::arg("i"), py::arg("j"), "Offset of pair (i, j) in the condensed layout.");
  m.def("square_to_condensed", &square_to_condensed_py<float>, py::arg("buf"));
  m.def("square_to_condensed", &square_to_condensed_py<double>, py::arg("buf"),
        "Compact the upper triangle of a C-contiguous square array into its first n(n-1)/2 "
        "entries, in place (no allocation). The rest of the buffer is left undefined.");
}
