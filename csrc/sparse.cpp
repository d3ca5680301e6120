// Python bindings of the sparse inter-camera round's native steps (cpu/sparse_cpu.h).
// iics_fast/sparse.py validates arguments with user-facing messages; the checks here guard the
// raw buffers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/sparse_cpu.h"

namespace py = pybind11;

namespace {

template <class T>
using Array = py::array_t<T, py::array::c_style>;

template <class T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

// A C string, not std::string: the checks run once a member of every tile, and building a
// string each time cost more than the kernel.
void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("sparse: ") + what);
}

py::array_t<float> min_sums_py(const Array<int64_t>& ptr, const Array<int32_t>& col,
                               const Array<float>& val, const Array<int32_t>& ei,
                               const Array<int32_t>& ej, py::object offsets, py::object tail,
                               double tail_weight) {
  require(col.size() == val.size(), "col and val differ in length");
  require(ei.size() == ej.size(), "edge endpoint arrays differ in length");
  const int64_t rows = ptr.size() - 1;
  require(rows >= 0 && ptr.data()[rows] == col.size(), "ptr does not end at the entries' count");
  for (py::ssize_t e = 0; e < ei.size(); ++e)
    require(ei.data()[e] >= 0 && ei.data()[e] < rows && ej.data()[e] >= 0 && ej.data()[e] < rows,
            "edge endpoint outside the rows");
  Array<int64_t> offs;
  Array<float> tl;
  int blocks = 0;
  if (!tail.is_none()) {
    offs = offsets.cast<Array<int64_t>>();
    tl = tail.cast<Array<float>>();
    blocks = static_cast<int>(offs.size()) - 1;
    require(blocks >= 1 && tl.ndim() == 2 && tl.shape(0) == rows && tl.shape(1) == blocks,
            "tail must be rows x blocks with blocks + 1 offsets");
  }
  py::array_t<float> out(ei.size());
  float* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    iics::sparse_min_sums_cpu(ptr.data(), col.data(), val.data(), ei.data(), ej.data(),
                              ei.size(), o, blocks ? offs.data() : nullptr, blocks,
                              blocks ? tl.data() : nullptr, tail_weight);
  }
  return out;
}

py::array_t<float> tile_jaccard_py(const Array<int64_t>& ptr, const Array<int32_t>& col,
                                   const Array<float>& val, const Array<float>& total,
                                   const Array<int32_t>& rows, const Array<int64_t>& rows_ptr,
                                   const Array<int32_t>& cols, const Array<int64_t>& cols_ptr,
                                   const Array<int64_t>& offsets, py::object tail,
                                   double tail_weight, py::object cams, const std::string& isa) {
  const int64_t n = ptr.size() - 1;
  const int blocks = static_cast<int>(offsets.size()) - 1;
  require(n >= 0 && ptr.data()[n] == col.size() && col.size() == val.size() && total.size() == n,
          "ptr, col, val and total do not describe the same rows");
  require(blocks >= 1, "offsets must hold blocks + 1 entries");
  const int64_t tiles = rows_ptr.size() - 1;
  require(tiles >= 0 && cols_ptr.size() == tiles + 1 && rows_ptr.data()[0] == 0 &&
              cols_ptr.data()[0] == 0 && rows_ptr.data()[tiles] == rows.size() &&
              cols_ptr.data()[tiles] == cols.size(),
          "rows_ptr and cols_ptr must start at 0, end at their lists' lengths, one entry a tile + 1");
  int64_t pairs = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t nr = rows_ptr.data()[t + 1] - rows_ptr.data()[t];
    const int64_t nc = cols_ptr.data()[t + 1] - cols_ptr.data()[t];
    require(nr >= 0 && nc >= 0, "rows_ptr and cols_ptr must not decrease");
    pairs += nr * nc;
  }
  const int64_t ncols = offsets.data()[blocks];
  for (const Array<int32_t>* side : {&rows, &cols})
    for (py::ssize_t e = 0; e < side->size(); ++e) {
      const int32_t r = side->data()[e];
      require(r >= 0 && r < n, "tile member outside the rows");
      int32_t lo = 0, hi = -1;  // the member's column range, in one vectorised pass
      for (int64_t q = ptr.data()[r]; q < ptr.data()[r + 1]; ++q) {
        lo = std::min(lo, col.data()[q]);
        hi = std::max(hi, col.data()[q]);
      }
      require(lo >= 0 && hi < ncols, "a column outside the blocks");
    }
  Array<float> tl;
  if (!tail.is_none()) {
    tl = tail.cast<Array<float>>();
    require(tl.ndim() == 2 && tl.shape(0) == n && tl.shape(1) == blocks, "tail must be rows x blocks");
  }
  Array<int64_t> cm;
  if (!cams.is_none()) {
    cm = cams.cast<Array<int64_t>>();
    require(cm.size() == n, "cams must hold one camera a row");
  }
  py::array_t<float> out(pairs);
  float* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    iics::sparse_tile_jaccard_cpu(ptr.data(), col.data(), val.data(), total.data(), rows.data(),
                                  rows_ptr.data(), cols.data(), cols_ptr.data(), tiles,
                                  offsets.data(), blocks, tail.is_none() ? nullptr : tl.data(),
                                  tail_weight, cams.is_none() ? nullptr : cm.data(), o, isa);
  }
  return out;
}

py::array_t<float> pair_dots_py(const Array<float>& f, const Array<int32_t>& ei,
                                const Array<int32_t>& ej) {
  require(f.ndim() == 2, "f must be n x d");
  require(ei.size() == ej.size(), "edge endpoint arrays differ in length");
  const int64_t n = f.shape(0);
  for (py::ssize_t e = 0; e < ei.size(); ++e)
    require(ei.data()[e] >= 0 && ei.data()[e] < n && ej.data()[e] >= 0 && ej.data()[e] < n,
            "edge endpoint outside the rows");
  py::array_t<float> out(ei.size());
  float* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    iics::pair_dots_cpu(f.data(), f.shape(1), ei.data(), ej.data(), ei.size(), o);
  }
  return out;
}

void top_update_py(const Array<float>& p, int64_t gr0, int64_t gc0, int64_t r0, Array<float>& near_c,
                   Array<int32_t>& near_i, Array<float>& far_c, Array<int32_t>& far_i, bool rows_side,
                   bool cols_side) {
  require(p.ndim() == 2 && near_c.ndim() == 2 && far_c.ndim() == 2, "p and the lists must be 2-D");
  require(near_i.size() == near_c.size() && far_i.size() == far_c.size() &&
              near_c.shape(0) == far_c.shape(0) && near_i.ndim() == 2 && near_i.shape(1) == near_c.shape(1) &&
              far_i.ndim() == 2 && far_i.shape(1) == far_c.shape(1),
          "the near and far lists must be m x kn and m x kf, values and ids alike");
  const int64_t r = p.shape(0), c = p.shape(1), m = near_c.shape(0);
  require(near_c.shape(1) >= 1 && far_c.shape(1) >= 1, "the lists need at least one entry");
  require(!rows_side || (gr0 >= r0 && gr0 - r0 + r <= m), "p's rows fall outside the lists");
  require(!cols_side || (gc0 >= r0 && gc0 - r0 + c <= m), "p's columns fall outside the lists");
  require(gr0 >= 0 && gc0 >= 0 && gr0 + r <= INT32_MAX && gc0 + c <= INT32_MAX, "ids outside int32");
  float* nc = near_c.mutable_data();
  int32_t* ni = near_i.mutable_data();
  float* fc = far_c.mutable_data();
  int32_t* fi = far_i.mutable_data();
  py::gil_scoped_release release;
  iics::top_update_cpu(p.data(), r, c, gr0, gc0, r0, nc, ni, static_cast<int>(near_c.shape(1)), fc, fi,
                       static_cast<int>(far_c.shape(1)), rows_side, cols_side);
}

py::array_t<int64_t> pair_find_py(const Array<int64_t>& ptr, const Array<int32_t>& col, const Array<int32_t>& qi,
                                  const Array<int32_t>& qj) {
  require(qi.size() == qj.size(), "query arrays differ in length");
  const int64_t rows = ptr.size() - 1;
  require(rows >= 0 && ptr.data()[rows] == col.size() && ptr.data()[0] == 0, "ptr does not fit col");
  for (int64_t r = 0; r < rows; ++r) require(ptr.data()[r] <= ptr.data()[r + 1], "ptr must not decrease");
  for (py::ssize_t e = 0; e < qi.size(); ++e) require(qi.data()[e] >= 0 && qi.data()[e] < rows, "query row outside the rows");
  py::array_t<int64_t> out(qi.size());
  int64_t* o = out.mutable_data();
  py::gil_scoped_release release;
  iics::pair_find_cpu(ptr.data(), col.data(), qi.data(), qj.data(), qi.size(), o);
  return out;
}

void top_sort_py(Array<float>& val, Array<int32_t>& ids, bool descending) {
  require(val.ndim() == 2 && ids.ndim() == 2 && val.shape(0) == ids.shape(0) && val.shape(1) == ids.shape(1),
          "values and ids must be m x k alike");
  float* v = val.mutable_data();
  int32_t* i = ids.mutable_data();
  py::gil_scoped_release release;
  iics::top_sort_cpu(v, i, val.shape(0), static_cast<int>(val.shape(1)), descending);
}

py::tuple expansion_sets_py(const Array<int32_t>& nbr, int k_half) {
  require(nbr.ndim() == 2, "nbr must be n x kk");
  const int64_t n = nbr.shape(0);
  const int kk = static_cast<int>(nbr.shape(1));
  require(k_half >= 1 && k_half <= kk, "need 1 <= k_half <= kk");
  std::vector<int32_t> lists(nbr.data(), nbr.data() + nbr.size());
  for (const int32_t x : lists) require(x >= 0 && x < n, "neighbour index outside 0..n-1");
  iics::rerank_parts::Sparse v;
  {
    py::gil_scoped_release release;
    v = iics::rerank_parts::expansion_sets(n, kk, k_half, lists);
  }
  return py::make_tuple(to_numpy(v.ptr), to_numpy(v.col));
}

py::tuple k_reciprocal_pairs_py(const Array<int64_t>& ptr, const Array<int32_t>& col,
                                const Array<float>& keys, const Array<int32_t>& nbr, int k2) {
  require(nbr.ndim() == 2, "nbr must be n x kk");
  const int64_t n = nbr.shape(0);
  const int kk = static_cast<int>(nbr.shape(1));
  require(ptr.size() == n + 1 && col.size() == keys.size() && ptr.data()[n] == col.size(),
          "expansion sets do not fit nbr");
  require(k2 >= 1 && k2 <= kk, "need 1 <= k2 <= kk");
  iics::rerank_parts::Sparse v;
  v.ptr.assign(ptr.data(), ptr.data() + ptr.size());
  v.col.assign(col.data(), col.data() + col.size());
  std::vector<int32_t> lists(nbr.data(), nbr.data() + nbr.size());
  iics::JaccardPairs pairs;
  {
    py::gil_scoped_release release;
    pairs = iics::k_reciprocal_pairs_cpu(std::move(v), keys.data(), n, kk, k2, lists);
  }
  return py::make_tuple(to_numpy(pairs.i), to_numpy(pairs.j), to_numpy(pairs.m));
}

// Holds the sum arrays alive while the native linkage updates them.
struct LinkagePy {
  Array<float> x, g;
  Array<double> u;
  iics::SparseLinkage core;
  LinkagePy(Array<float> x_, Array<float> g_, Array<double> u_, double c0)
      : x(std::move(x_)), g(std::move(g_)), u(std::move(u_)),
        core(x.shape(0), x.shape(1), x.mutable_data(),
             g.is(x) ? x.mutable_data() : g.mutable_data(), u.data(), c0) {}
};

std::unique_ptr<LinkagePy> make_linkage(Array<float> x, Array<float> g, Array<double> u,
                                        double c0) {
  require(x.ndim() == 2 && g.ndim() == 2 && x.shape(0) == g.shape(0) &&
              x.shape(1) == g.shape(1) && u.size() == x.shape(0),
          "sums must be n x d (x, g) and n (u)");
  require(x.writeable() && g.writeable(), "sum arrays must be writeable");
  return std::make_unique<LinkagePy>(std::move(x), std::move(g), std::move(u), c0);
}

void add_edges_py(LinkagePy& l, const Array<int32_t>& a, const Array<int32_t>& b,
                  py::object s) {
  require(a.size() == b.size(), "edge endpoint arrays differ in length");
  const int64_t n = l.x.shape(0);
  for (py::ssize_t e = 0; e < a.size(); ++e)
    require(a.data()[e] >= 0 && a.data()[e] < n && b.data()[e] >= 0 && b.data()[e] < n,
            "edge endpoint outside the slots");
  Array<double> sums;
  const double* sp = nullptr;
  if (!s.is_none()) {
    sums = s.cast<Array<double>>();
    require(sums.size() == a.size(), "pair sums differ in length from the edges");
    sp = sums.data();
  }
  py::gil_scoped_release release;
  l.core.add_edges(a.data(), b.data(), sp, a.size());
}

int64_t run_py(LinkagePy& l, int64_t target) {
  py::gil_scoped_release release;
  return l.core.run(target);
}

py::tuple merges_py(const LinkagePy& l) {
  return py::make_tuple(to_numpy(l.core.kept()), to_numpy(l.core.absorbed()),
                        to_numpy(l.core.heights()));
}

py::array_t<int32_t> live_slots_py(const LinkagePy& l) {
  std::vector<int32_t> out;
  for (int64_t s = 0; s < l.x.shape(0); ++s)
    if (l.core.alive(s)) out.push_back(static_cast<int32_t>(s));
  return to_numpy(out);
}

void set_bounds_py(LinkagePy& l, const Array<int32_t>& slots, const Array<double>& values) {
  require(slots.size() == values.size(), "bound slots and values differ in length");
  for (py::ssize_t t = 0; t < slots.size(); ++t) {
    require(slots.data()[t] >= 0 && slots.data()[t] < l.x.shape(0), "bound slot outside the slots");
    l.core.set_bound(slots.data()[t], values.data()[t]);
  }
}

py::tuple slot_sums_py(const LinkagePy& l, const Array<int32_t>& slots) {
  py::array_t<double> size(slots.size()), u(slots.size()), bound(slots.size());
  for (py::ssize_t t = 0; t < slots.size(); ++t) {
    const int32_t s = slots.data()[t];
    require(s >= 0 && s < l.x.shape(0), "slot outside the slots");
    size.mutable_data()[t] = static_cast<double>(l.core.size(s));
    u.mutable_data()[t] = l.core.usum(s);
    bound.mutable_data()[t] = l.core.bound(s);
  }
  return py::make_tuple(size, u, bound);
}

py::array_t<double> sizes_py(const LinkagePy& l, const Array<int32_t>& slots) {
  py::array_t<double> out(slots.size());
  for (py::ssize_t t = 0; t < slots.size(); ++t)
    out.mutable_data()[t] = static_cast<double>(l.core.size(slots.data()[t]));
  return out;
}

py::tuple pending_py(LinkagePy& l, int64_t count) {
  std::vector<int32_t> a, b;
  std::vector<double> model, exact;
  std::vector<int64_t> rect_ptr;
  std::vector<iics::SparseLinkage::Rect> rects;
  static_assert(sizeof(iics::SparseLinkage::Rect) == 4 * sizeof(int32_t), "Rect is four int32");
  l.core.pending(count, a, b, model, exact, rect_ptr, rects);
  py::array_t<int32_t> r({static_cast<py::ssize_t>(rects.size()), py::ssize_t{4}});
  std::copy(reinterpret_cast<const int32_t*>(rects.data()),
            reinterpret_cast<const int32_t*>(rects.data()) + 4 * rects.size(), r.mutable_data());
  return py::make_tuple(to_numpy(a), to_numpy(b), to_numpy(model), to_numpy(exact),
                        to_numpy(rect_ptr), r);
}

void set_sums_py(LinkagePy& l, const Array<int32_t>& a, const Array<int32_t>& b,
                 const Array<double>& s) {
  require(a.size() == b.size() && s.size() == a.size(), "pair arrays differ in length");
  const int64_t n = l.x.shape(0);
  for (py::ssize_t e = 0; e < a.size(); ++e)
    require(a.data()[e] >= 0 && a.data()[e] < n && b.data()[e] >= 0 && b.data()[e] < n,
            "pair slot outside the slots");
  l.core.set_sums(a.data(), b.data(), s.data(), a.size());
}

py::tuple members_py(const LinkagePy& l, const Array<int32_t>& slots) {
  std::vector<int64_t> ptr{0};
  std::vector<int32_t> idx;
  for (py::ssize_t t = 0; t < slots.size(); ++t) {
    const int32_t s = slots.data()[t];
    require(s >= 0 && s < l.x.shape(0) && l.core.alive(s), "members of a slot not live");
    l.core.members(s, idx);
    ptr.push_back(static_cast<int64_t>(idx.size()));
  }
  return py::make_tuple(to_numpy(ptr), to_numpy(idx));
}

}  // namespace

void bind_sparse(py::module_& m) {
  m.def("sparse_min_sums", &min_sums_py, py::arg("ptr").noconvert(), py::arg("col").noconvert(),
        py::arg("val").noconvert(), py::arg("ei").noconvert(), py::arg("ej").noconvert(),
        py::arg("offsets") = py::none(), py::arg("tail") = py::none(),
        py::arg("tail_weight") = 1.0,
        "Sum of minima of CSR rows ei[e] and ej[e] (columns ascending a row), float32; with "
        "block offsets and per-row block tails, the even-tail estimate of the full rows' (its tail "
        "terms times tail_weight).");
  m.def("sparse_tile_jaccard", &tile_jaccard_py, py::arg("ptr").noconvert(),
        py::arg("col").noconvert(), py::arg("val").noconvert(), py::arg("total").noconvert(),
        py::arg("rows").noconvert(), py::arg("rows_ptr").noconvert(), py::arg("cols").noconvert(),
        py::arg("cols_ptr").noconvert(), py::arg("offsets").noconvert(),
        py::arg("tail") = py::none(), py::arg("tail_weight") = 1.0, py::arg("cams") = py::none(),
        py::arg("isa") = "auto",
        "J of every pair of each tile (rows of a tile x its cols, tile after tile, row-major), "
        "float32 as sparse_min_sums then m / (S_i + S_j - m); 0 within one camera with cams. "
        "isa: 'auto' (AVX-512 where the CPU has it), 'avx512' or 'plain'.");
  m.def("sparse_pair_dots", &pair_dots_py, py::arg("f").noconvert(), py::arg("ei").noconvert(),
        py::arg("ej").noconvert(), "Inner products of rows ei[e] and ej[e] of f (float32).");
  m.def("sparse_top_update", &top_update_py, py::arg("p").noconvert(), py::arg("gr0"), py::arg("gc0"),
        py::arg("r0"), py::arg("near_c").noconvert(), py::arg("near_i").noconvert(), py::arg("far_c").noconvert(),
        py::arg("far_i").noconvert(), py::arg("rows_side"), py::arg("cols_side"),
        "Update the running near / far heaps (m x kn, m x kf; rows r0..) with one block p of "
        "cosines (global rows gr0.., columns gc0..): for p's rows, its columns, or both.");
  m.def("sparse_pair_find", &pair_find_py, py::arg("ptr").noconvert(), py::arg("col").noconvert(),
        py::arg("qi").noconvert(), py::arg("qj").noconvert(),
        "Position of each (qi, qj) in the CSR (ptr, col ascending a row), -1 where absent.");
  m.def("sparse_top_sort", &top_sort_py, py::arg("val").noconvert(), py::arg("ids").noconvert(),
        py::arg("descending"), "Sort each row of (val, ids) in place by value, ties by id.");
  m.def("sparse_expansion_sets", &expansion_sets_py, py::arg("nbr").noconvert(),
        py::arg("k_half"),
        "Expanded k-reciprocal sets (ptr int64, col int32 ascending) of the n x kk lists.");
  m.def("sparse_k_reciprocal_pairs", &k_reciprocal_pairs_py, py::arg("ptr").noconvert(),
        py::arg("col").noconvert(), py::arg("keys").noconvert(), py::arg("nbr").noconvert(),
        py::arg("k2"),
        "Pairs i < j sharing a column of the weighted, query-expanded V and their float16 sum "
        "of minima (i, j int32; m float32).");
  py::class_<LinkagePy>(m, "SparseLinkage")
      .def(py::init(&make_linkage), py::arg("x").noconvert(), py::arg("g").noconvert(),
           py::arg("u").noconvert(), py::arg("c0"))
      .def("add_edges", &add_edges_py, py::arg("a").noconvert(), py::arg("b").noconvert(),
           py::arg("sums") = py::none())
      .def("run", &run_py, py::arg("target"))
      .def("merges", &merges_py)
      .def("live_slots", &live_slots_py)
      .def("sizes", &sizes_py, py::arg("slots").noconvert())
      .def("set_bounds", &set_bounds_py, py::arg("slots").noconvert(), py::arg("values").noconvert())
      .def("slot_sums", &slot_sums_py, py::arg("slots").noconvert())
      .def("top", [](LinkagePy& l) { return l.core.top(); })
      .def("check_pairs", [](LinkagePy& l, double margin, int64_t max_rects) {
        require(margin >= 0, "the re-check margin must be >= 0");
        require(max_rects >= 1, "max_rects must be >= 1");
        l.core.check_pairs(margin, max_rects);
      }, py::arg("margin"), py::arg("max_rects") = 16)
      .def_property_readonly("collapsed", [](const LinkagePy& l) { return l.core.collapsed(); })
      .def("pending", &pending_py, py::arg("count"))
      .def("set_sums", &set_sums_py, py::arg("a").noconvert(), py::arg("b").noconvert(),
           py::arg("sums").noconvert())
      .def("members", &members_py, py::arg("slots").noconvert())
      .def_property_readonly("live", [](const LinkagePy& l) { return l.core.live(); });
}
