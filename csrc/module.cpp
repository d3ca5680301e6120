// The extension iics_fast._C: one bind_<op> a source file, registered here.
#include <pybind11/pybind11.h>

#include "parallel.h"

namespace py = pybind11;

void bind_condensed(py::module_& m);
void bind_rerank(py::module_& m);
void bind_cluster(py::module_& m);
void bind_pairwise(py::module_& m);
void bind_evaluation(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "iics_fast native core: condensed-matrix helpers, merge, similarity";
#ifdef IICS_WITH_OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
  m.def("max_threads", &iics::max_threads,
        "Threads a parallel region of the cores would get (1 when built without OpenMP).");
#ifdef IICS_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  bind_condensed(m);
  bind_rerank(m);
  bind_cluster(m);
  bind_pairwise(m);
  bind_evaluation(m);
}
