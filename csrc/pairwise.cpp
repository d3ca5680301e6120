// Python bindings of the pairwise Jaccard and inter-camera distance cores (cpu/pairwise_cpu.h).
// Arrays arrive C-contiguous float32 / int64 (iics_fast.similarity prepares them); nothing is
// converted or copied here, the output is written in place, and the GIL is released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "condensed.h"
#include "cpu/pairwise_cpu.h"

namespace py = pybind11;

namespace {

using F32 = py::array_t<float, py::array::c_style>;
using I64 = py::array_t<int64_t, py::array::c_style>;

void need(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

void pairwise_jaccard_py(F32 a, F32 sa, F32 b, F32 sb, F32 out, const std::string& isa) {
  need(a.ndim() == 2 && b.ndim() == 2 && a.shape(1) == b.shape(1),
       "pairwise_jaccard: a (m, d) and b (p, d) must be 2-D with the same d");
  const int64_t m = a.shape(0), p = b.shape(0), d = a.shape(1);
  need(sa.ndim() == 1 && sa.shape(0) == m && sb.ndim() == 1 && sb.shape(0) == p,
       "pairwise_jaccard: row sums must have lengths m and p");
  need(out.ndim() == 2 && out.shape(0) == m && out.shape(1) == p && out.writeable(),
       "pairwise_jaccard: out must be a writeable (m, p) float32 array");
  const float *pa = a.data(), *pb = b.data(), *psa = sa.data(), *psb = sb.data();
  float* po = out.mutable_data();
  iics::simd_variant(isa);  // an unknown or unsupported name fails here, with the GIL held
  py::gil_scoped_release release;
  iics::pairwise_jaccard_cpu(pa, m, d, psa, pb, p, d, psb, d, po, p, isa);
}

void inter_camera_rows_py(std::optional<F32> scores, std::optional<F32> rowsum,
                          std::optional<F32> feats, I64 cam, int64_t r0, int64_t r1, float mu,
                          int mode, bool square, F32 out, int64_t out_base,
                          const std::string& isa) {
  need(mode >= 0 && mode <= 2, "inter_camera_rows: mode must be 0 (eq5), 1 (feature), 2 (jaccard)");
  const auto md = static_cast<iics::InterCameraMode>(mode);
  need(cam.ndim() == 1, "inter_camera_rows: cam must be 1-D");
  const int64_t n = cam.shape(0);
  need(0 <= r0 && r0 <= r1 && r1 <= n, "inter_camera_rows: need 0 <= r0 <= r1 <= n");
  const bool need_scores = md != iics::InterCameraMode::kFeature;
  const bool need_feats = md != iics::InterCameraMode::kJaccard;
  int64_t dim = 0, fdim = 0;
  if (need_scores) {
    need(scores && rowsum, "inter_camera_rows: this mode needs scores and rowsum");
    need(scores->ndim() == 2 && scores->shape(0) == n, "inter_camera_rows: scores must be (n, D)");
    need(rowsum->ndim() == 1 && rowsum->shape(0) == n, "inter_camera_rows: rowsum must be (n,)");
    dim = scores->shape(1);
  }
  if (need_feats) {
    need(feats.has_value(), "inter_camera_rows: this mode needs feats");
    need(feats->ndim() == 2 && feats->shape(0) == n, "inter_camera_rows: feats must be (n, d)");
    fdim = feats->shape(1);
  }
  if (square) {
    need(out.ndim() == 2 && out.shape(0) == n && out.shape(1) == n,
         "inter_camera_rows: square out must be (n, n)");
    need(out_base == 0, "inter_camera_rows: square out needs out_base = 0");
  } else {
    // the block [out_base, out_base + len) must hold the entries of rows [r0, r1)
    // (condensed_row(n, n) = n(n-1)/2, the formula holds for the end row too)
    const int64_t lo = iics::condensed_row(n, r0), hi = iics::condensed_row(n, r1);
    need(out.ndim() == 1 && 0 <= out_base && (r0 == r1 || (out_base <= lo && hi <= out_base + out.shape(0))),
         "inter_camera_rows: condensed out (first entry at position out_base) must hold the "
         "entries of rows [r0, r1)");
  }
  need(out.writeable(), "inter_camera_rows: out is read-only");
  const float* ps = need_scores ? scores->data() : nullptr;
  const float* prs = need_scores ? rowsum->data() : nullptr;
  const float* pf = need_feats ? feats->data() : nullptr;
  const int64_t* pc = cam.data();
  float* po = out.mutable_data();
  iics::simd_variant(isa);
  py::gil_scoped_release release;
  iics::inter_camera_rows_cpu(ps, dim, prs, dim, pf, fdim, fdim, pc, n, r0, r1, mu, md, square, po,
                              out_base, isa);
}

}  // namespace

void bind_pairwise(py::module_& m) {
  m.def("pairwise_jaccard", &pairwise_jaccard_py, py::arg("a").noconvert(),
        py::arg("sa").noconvert(), py::arg("b").noconvert(), py::arg("sb").noconvert(),
        py::arg("out").noconvert(), py::arg("isa") = "auto",
        "Generalised Jaccard sum(min)/sum(max) between the rows of a (m, d) and b (p, d) into "
        "out (m, p); sa, sb are the row sums. J(0, 0) = 0. float32, C-contiguous, no copies. "
        "isa: SIMD variant ('auto', 'avx512', 'avx2', 'scalar').");
  m.def("inter_camera_rows", &inter_camera_rows_py, py::arg("scores").noconvert(),
        py::arg("rowsum").noconvert(), py::arg("feats").noconvert(), py::arg("cam").noconvert(),
        py::arg("r0"), py::arg("r1"), py::arg("mu"), py::arg("mode"),
        py::arg("square"), py::arg("out").noconvert(), py::arg("out_base") = 0,
        py::arg("isa") = "auto",
        "IICS inter-camera distances of rows [r0, r1) against later rows, into a square (n, n) "
        "or condensed float32 out; a condensed out may be a block whose first entry is the "
        "condensed position out_base. feats: unit-norm feature rows (n, d), whose dot products "
        "are the cosines. isa: SIMD variant as for pairwise_jaccard.");
  m.def("simd_variants", &iics::simd_variants,
        "SIMD variants of the sum-of-minima loop this CPU runs, widest first (ends with 'scalar').");
  m.def("simd_variant", &iics::simd_variant, py::arg("isa") = "auto",
        "The variant an isa name resolves to ('auto': the widest this CPU runs).");
  m.def(
      "min_sum_ceiling",
      [](const std::string& isa, double seconds) {
        iics::simd_variant(isa);
        py::gil_scoped_release release;
        return iics::min_sum_ceiling(isa, seconds);
      },
      py::arg("isa") = "auto", py::arg("seconds") = 0.5,
      "One core's ceiling for the sum-of-minima loop: the micro-kernel alone on L1-resident rows, "
      "pair-dims (one min + add) a second in the fastest ~0.5 ms burst within `seconds`.");
}
