// Python bindings of the Market-1501 ranking core (cpu/evaluation_cpu.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <utility>

#include "cpu/evaluation_cpu.h"

namespace py = pybind11;

namespace {

using ids_t = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

std::pair<py::array_t<int64_t>, py::array_t<double>> rank_queries_py(
    py::array_t<float, py::array::c_style> dist, ids_t qp, ids_t qc, ids_t gp, ids_t gc) {
  if (dist.ndim() != 2)
    throw std::invalid_argument("rank_queries: dist must be 2-D (queries, gallery)");
  const int64_t nq = dist.shape(0), ng = dist.shape(1);
  auto check = [](const ids_t& a, int64_t n, const char* name) {
    if (a.ndim() != 1 || a.shape(0) != n)
      throw std::invalid_argument(std::string("rank_queries: ") + name + " must be 1-D of length " +
                                  std::to_string(n));
  };
  check(qp, nq, "q_pids");
  check(qc, nq, "q_camids");
  check(gp, ng, "g_pids");
  check(gc, ng, "g_camids");
  py::array_t<int64_t> first(nq);
  py::array_t<double> ap(nq);
  const float* d = dist.data();
  const int64_t *qpd = qp.data(), *qcd = qc.data(), *gpd = gp.data(), *gcd = gc.data();
  int64_t* fd = first.mutable_data();
  double* ad = ap.mutable_data();
  {
    py::gil_scoped_release release;
    iics::rank_queries_cpu(d, ng, nq, ng, qpd, qcd, gpd, gcd, fd, ad);
  }
  return {first, ap};
}

}  // namespace

void bind_evaluation(py::module_& m) {
  m.def("rank_queries", &rank_queries_py, py::arg("dist"), py::arg("q_pids"), py::arg("q_camids"),
        py::arg("g_pids"), py::arg("g_camids"),
        "Market-1501 protocol per query of a C-contiguous float32 (queries, gallery) block: "
        "(first-match rank, 0 = no valid match; average precision). No NaN allowed.");
}
