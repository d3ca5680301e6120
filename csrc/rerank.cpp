// Python bindings of the sparse k-reciprocal re-ranking (cpu/rerank_cpu.h). iics_fast/rerank.py
// validates arguments with user-facing messages; the checks here guard the raw buffers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "condensed.h"
#include "cpu/rerank_cpu.h"

namespace py = pybind11;

namespace {

using Matrix = py::array_t<float, py::array::c_style>;

// Layout and sample count of a square (n, n) or condensed (n(n-1)/2,) float32 buffer.
iics::Layout layout_of(const Matrix& a, const char* name, int64_t* n) {
  if (a.ndim() == 2 && a.shape(0) == a.shape(1)) {
    *n = a.shape(0);
    return iics::Layout::Square;
  }
  if (a.ndim() == 1) {
    const int64_t m = iics::condensed_points(a.shape(0));
    if (m >= 2) {
      *n = m;
      return iics::Layout::Condensed;
    }
  }
  throw std::invalid_argument(std::string("k_reciprocal: ") + name +
                              " must be square (n, n) or condensed (n*(n-1)/2,) with n >= 2");
}

void k_reciprocal_py(const Matrix& dist, Matrix& out, int k1, int k_half, int k2,
                     float jaccard_weight, float dist_weight, const std::string& isa) {
  int64_t n = 0, n_out = 0;
  const iics::Layout in_layout = layout_of(dist, "dist", &n);
  const iics::Layout out_layout = layout_of(out, "out", &n_out);
  if (n_out != n) throw std::invalid_argument("k_reciprocal: out and dist differ in n");
  if (!out.writeable()) throw std::invalid_argument("k_reciprocal: out is read-only");
  if (k1 < 1 || k_half < 1 || k2 < 1 || k2 > k1 + 1)
    throw std::invalid_argument("k_reciprocal: need k1, k_half, k2 >= 1 and k2 <= k1 + 1");
  const float* in = dist.data();
  float* o = out.mutable_data();
  if (o == in && in_layout != out_layout)
    throw std::invalid_argument("k_reciprocal: in place needs out in dist's layout");
  const iics::KReciprocalParams p{n, k1, k_half, k2, jaccard_weight, dist_weight, isa};
  py::gil_scoped_release release;
  iics::k_reciprocal_cpu(in, in_layout, o, out_layout, p);
}

py::array_t<int32_t> k_reciprocal_neighbours_py(const Matrix& dist, int k1,
                                                const std::string& isa) {
  int64_t n = 0;
  const iics::Layout layout = layout_of(dist, "dist", &n);
  if (k1 < 1) throw std::invalid_argument("k_reciprocal_neighbours: k1 must be >= 1");
  std::vector<int32_t> nbr;
  {
    py::gil_scoped_release release;
    nbr = iics::k_reciprocal_neighbours_cpu(dist.data(), layout, n, k1, isa);
  }
  const int64_t kk = static_cast<int64_t>(nbr.size()) / n;
  py::array_t<int32_t> result({n, kk});
  std::copy(nbr.begin(), nbr.end(), result.mutable_data());
  return result;
}

}  // namespace

void bind_rerank(py::module_& m) {
  m.def("k_reciprocal", &k_reciprocal_py, py::arg("dist").noconvert(), py::arg("out").noconvert(),
        py::kw_only(), py::arg("k1"), py::arg("k_half"), py::arg("k2"), py::arg("jaccard_weight"),
        py::arg("dist_weight"), py::arg("isa") = "auto",
        "Sparse k-reciprocal re-ranking of a float32 square or condensed distance into out "
        "(square or condensed; out may be dist itself). isa: the row sweeps' instruction set, "
        "'auto' (the widest this CPU runs), 'avx512' or 'plain'. Use "
        "iics_fast.rerank.k_reciprocal.");
  m.def("k_reciprocal_neighbours", &k_reciprocal_neighbours_py, py::arg("dist").noconvert(),
        py::arg("k1"), py::arg("isa") = "auto",
        "Each row's min(k1 + 1, n) nearest samples by row-normalised distance, nearest first, "
        "ties to the smaller index (int32, n x min(k1 + 1, n)). isa as for k_reciprocal.");
}
