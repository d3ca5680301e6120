// Python bindings of the agglomerative clustering core (cpu/cluster_cpu.h). The Python layer
// (iics_fast/cluster.py) validates arguments; these functions re-check what memory safety needs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "condensed.h"
#include "cpu/cluster_cpu.h"

namespace py = pybind11;

namespace {

// The number of points of a condensed (1-D) or square (2-D) distance array.
int64_t points_of(const py::array& a) {
  if (a.ndim() == 2) {
    if (a.shape(0) != a.shape(1)) throw std::invalid_argument("expected a square (n, n) array");
    return a.shape(0);
  }
  if (a.ndim() != 1) throw std::invalid_argument("expected a condensed (1-D) or square array");
  const int64_t m = a.shape(0);
  const int64_t n = iics::condensed_points(m);
  if (n < 0)
    throw std::invalid_argument("condensed length " + std::to_string(m) +
                                " is not n*(n-1)/2 for any n");
  return n;
}

// A buffer for the working copy of the triangle. On Linux it asks for transparent huge pages
// before first touch: the column accesses of the merge are one-per-row strided reads, and 2 MiB
// pages keep them from missing the TLB on every access.
struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
std::unique_ptr<T[], FreeDeleter> alloc_triangle(int64_t count) {
  constexpr size_t kHuge = size_t(1) << 21;
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + kHuge - 1) /
                       kHuge * kHuge;
  void* p = nullptr;
  if (posix_memalign(&p, kHuge, bytes) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return std::unique_ptr<T[], FreeDeleter>(static_cast<T*>(p));
}

// Copies the triangle of a condensed or square array into dst (condensed).
template <typename T>
void copy_triangle(const T* src, int64_t n, bool square, T* dst) {
  if (!square) {
    const int64_t m = iics::condensed_size(n);
#pragma omp parallel for schedule(static) if (m > iics::kParallelPass)
    for (int64_t q = 0; q < m; ++q) dst[q] = src[q];
    return;
  }
#pragma omp parallel for schedule(dynamic, 64) if (n * n > 2 * iics::kParallelPass)
  for (int64_t i = 0; i < n - 1; ++i)
    std::memcpy(dst + iics::condensed_row(n, i), src + n * i + i + 1, (n - i - 1) * sizeof(T));
}

template <typename T>
py::array_t<double> linkage_typed(py::array_t<T, py::array::c_style> a, int method,
                                  bool inplace, bool force_threads) {
  const int64_t n = points_of(a);
  const bool square = a.ndim() == 2;
  if (n < 1) throw std::invalid_argument("linkage needs at least one point");
  if (n > 2147483647) throw std::invalid_argument("linkage supports at most 2^31 - 1 points");
  if (method < 0 || method > 3) throw std::invalid_argument("unknown linkage method code");
  if (inplace && !a.writeable()) throw std::invalid_argument("inplace=True needs a writable array");
  py::array_t<double> Z({std::max<int64_t>(n - 1, 0), int64_t(4)});
  if (n < 2) return Z;
  std::unique_ptr<int32_t[]> ma(new int32_t[n - 1]), mb(new int32_t[n - 1]);
  std::unique_ptr<double[]> mh(new double[n - 1]);
  double* z = Z.mutable_data();
  const auto how = static_cast<iics::LinkageMethod>(method);
  if (inplace) {
    T* data = a.mutable_data();
    py::gil_scoped_release release;
    if (square) iics::square_to_condensed(data, n);
    iics::nn_chain_linkage(data, n, how, ma.get(), mb.get(), mh.get(), force_threads);
    iics::merges_to_linkage(n, ma.get(), mb.get(), mh.get(), z);
  } else {
    const T* data = a.data();
    py::gil_scoped_release release;
    auto work = alloc_triangle<T>(iics::condensed_size(n));
    copy_triangle(data, n, square, work.get());
    iics::nn_chain_linkage(work.get(), n, how, ma.get(), mb.get(), mh.get(), force_threads);
    work.reset();
    iics::merges_to_linkage(n, ma.get(), mb.get(), mh.get(), z);
  }
  return Z;
}

template <typename T>
int64_t first_nonfinite_typed(py::array_t<T, py::array::c_style> a) {
  const bool square = a.ndim() == 2;
  const int64_t n = square ? points_of(a) : a.size();
  const T* data = a.data();
  py::gil_scoped_release release;
  return square ? iics::first_nonfinite_upper(data, n) : iics::first_nonfinite(data, n);
}

template <typename T>
T select_rank_typed(py::array_t<T, py::array::c_style> a, int64_t rank) {
  if (a.ndim() != 1) throw std::invalid_argument("select_rank expects a 1-D array");
  if (rank < 0 || rank >= a.shape(0))
    throw std::out_of_range("select_rank: rank outside 0..len-1");
  const T* data = a.data();
  const int64_t m = a.shape(0);
  py::gil_scoped_release release;
  return iics::select_rank(data, m, rank);
}

py::array_t<int64_t> cut_py(py::array_t<double, py::array::c_style> Z, int64_t n,
                            int64_t n_merges) {
  if (n < 1 || Z.ndim() != 2 || Z.shape(0) != n - 1 || Z.shape(1) != 4)
    throw std::invalid_argument("cluster_cut: expected Z of shape (n - 1, 4)");
  if (n_merges < 0 || n_merges > n - 1)
    throw std::out_of_range("cluster_cut: n_merges outside 0..n-1");
  py::array_t<int64_t> labels(n);
  const double* z = Z.data();
  int64_t* out = labels.mutable_data();
  py::gil_scoped_release release;
  iics::cut_linkage(n, z, n_merges, out);
  return labels;
}

// Exact-dtype overloads only: a float64 array must never be silently cast to a float32 copy.
template <typename T>
void def_typed(py::module_& m) {
  m.def("cluster_linkage", &linkage_typed<T>, py::arg("dist").noconvert(), py::arg("method"),
        py::arg("inplace"), py::arg("force_threads") = false,
        "Linkage matrix of a condensed or square (upper triangle) float array; method codes "
        "single 0, complete 1, average 2, weighted 3. inplace destroys the array.");
  m.def("cluster_first_nonfinite", &first_nonfinite_typed<T>, py::arg("values").noconvert(),
        "First non-finite entry of a 1-D array, or of a square array's upper triangle as a "
        "condensed offset; -1 if none.");
  m.def("cluster_select_rank", &select_rank_typed<T>, py::arg("values").noconvert(),
        py::arg("rank"));
}

}  // namespace

void bind_cluster(py::module_& m) {
  def_typed<float>(m);
  def_typed<double>(m);
  m.def("cluster_cut", &cut_py, py::arg("Z"), py::arg("n"), py::arg("n_merges"),
        "Flat labels after the first n_merges merges of a linkage matrix (first-appearance "
        "numbering).");
}
