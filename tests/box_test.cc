// Boxes and copy runs (include/ckpt/box.h) against a brute-force element
// map: every element of the destination box must hold the source's value
// where the boxes meet and stay untouched elsewhere.
#include "ckpt/box.h"

#include <catch2/catch.hpp>
#include <cstring>
#include <random>

using namespace ckpt;

namespace {

// The row-major index of global element `g` inside box `b`, or -1.
int64_t IndexIn(const Box& b, const std::vector<int64_t>& g) {
  int64_t i = 0;
  for (size_t d = 0; d < b.ndim(); ++d) {
    int64_t r = g[d] - b.offsets[d];
    if (r < 0 || r >= b.sizes[d]) return -1;
    i = i * b.sizes[d] + r;
  }
  return i;
}

// Calls fn(global index) for every element of box b.
template <class F>
void ForEachElement(const Box& b, F fn) {
  if (b.numel() == 0) return;
  std::vector<int64_t> g = b.offsets;
  for (;;) {
    fn(g);
    size_t d = b.ndim();
    for (;;) {
      if (d == 0) return;
      --d;
      if (++g[d] < b.offsets[d] + b.sizes[d]) break;
      g[d] = b.offsets[d];
    }
  }
}

Box RandomBox(std::mt19937_64& rng, const std::vector<int64_t>& shape) {
  Box b;
  for (int64_t s : shape) {
    int64_t lo = std::uniform_int_distribution<int64_t>(0, s)(rng);
    int64_t n = std::uniform_int_distribution<int64_t>(0, s - lo)(rng);
    // Whole dims often, as real shardings cut one or two dims only.
    if (rng() % 3 == 0) lo = 0, n = s;
    b.offsets.push_back(lo);
    b.sizes.push_back(n);
  }
  return b;
}

}  // namespace

TEST_CASE("copy runs move exactly the shared elements, for random boxes") {
  std::mt19937_64 rng(20261202);
  int nonempty = 0, one_run = 0, strided2 = 0;
  for (int trial = 0; trial < 50000; ++trial) {
    const size_t ndim = static_cast<size_t>(trial % 5);  // 0-d to 4-d
    std::vector<int64_t> shape;
    for (size_t d = 0; d < ndim; ++d)
      shape.push_back(std::uniform_int_distribution<int64_t>(0, 5)(rng));
    const Box from = RandomBox(rng, shape), to = RandomBox(rng, shape);
    REQUIRE_FALSE(BoxProblem(from, shape, 4).has_value());
    const uint64_t elem = 1 + rng() % 8;
    // Source bytes: each element holds its global linear index.
    std::vector<uint8_t> src(static_cast<size_t>(from.numel()) * elem);
    ForEachElement(from, [&](const std::vector<int64_t>& g) {
      int64_t lin = 0;
      for (size_t d = 0; d < ndim; ++d) lin = lin * 7 + g[d];
      auto* p = &src[static_cast<size_t>(IndexIn(from, g)) * elem];
      for (uint64_t b = 0; b < elem; ++b)
        p[b] = static_cast<uint8_t>(lin * 31 + static_cast<int64_t>(b) + 1);
    });
    std::vector<uint8_t> dst(static_cast<size_t>(to.numel()) * elem, 0);
    auto runs = CopyRuns(from, to, elem);
    REQUIRE(runs.ok());
    auto common = Intersect(from, to);
    INFO("trial " << trial << " ndim " << ndim);
    REQUIRE(runs->has_value() == common.has_value());
    uint64_t last_src = 0, moved = 0;
    bool first = true;
    if (runs->has_value()) {
      const RunPattern& p = **runs;
      ++nonempty;
      one_run += p.counts.empty();
      strided2 += p.counts.size() >= 2;
      CHECK(p.counts.size() + 1 <= std::max<size_t>(1, ndim));
      ForEachRun(p, [&](uint64_t s, uint64_t d, uint64_t len) {
        REQUIRE(s + len <= src.size());
        REQUIRE(d + len <= dst.size());
        if (!first) REQUIRE(s > last_src);  // increasing source order
        first = false;
        last_src = s;
        std::memcpy(&dst[d], &src[s], len);
        moved += len;
      });
      CHECK(moved == p.bytes());
      CHECK(moved == static_cast<uint64_t>(common->numel()) * elem);
    }
    // Brute force: every destination element is the source's or untouched.
    ForEachElement(to, [&](const std::vector<int64_t>& g) {
      const auto* q = &dst[static_cast<size_t>(IndexIn(to, g)) * elem];
      int64_t at = IndexIn(from, g);
      for (uint64_t b = 0; b < elem; ++b) {
        uint8_t want = at < 0 ? 0 : src[static_cast<size_t>(at) * elem + b];
        REQUIRE(q[b] == want);
      }
    });
  }
  // The random cases reach every shape of pattern.
  CHECK(nonempty > 12000);
  CHECK(one_run > 2500);
  CHECK(strided2 > 20);
}

TEST_CASE("row and column shards make the patterns loaders rely on") {
  const uint64_t e = 2;  // bf16
  // 8 x 6 tensor. Rows 2..6 saved, rows 4..8 wanted: one run.
  auto rows = CopyRuns({{2, 0}, {4, 6}}, {{4, 0}, {4, 6}}, e);
  REQUIRE(rows.ok());
  REQUIRE(rows->has_value());
  CHECK(**rows == RunPattern{2 * 6 * e, 0, 2 * 6 * e, {}, {}, {}});
  // Whole rows saved, columns 2..5 wanted: one strided dim (a 2-D copy),
  // spitch = saved row bytes, dpitch = wanted row bytes.
  auto cols = CopyRuns({{0, 0}, {8, 6}}, {{0, 2}, {8, 3}}, e);
  REQUIRE(cols.ok());
  REQUIRE(cols->has_value());
  CHECK(**cols == RunPattern{2 * e, 0, 3 * e, {8}, {6 * e}, {3 * e}});
  // Two leading dims whole, the last cut: they merge into one strided dim.
  auto merged = CopyRuns({{0, 0, 0}, {2, 3, 4}}, {{0, 0, 2}, {2, 3, 2}}, e);
  REQUIRE(merged.ok());
  REQUIRE(merged->has_value());
  CHECK((*merged)->counts == std::vector<uint64_t>{6});
  // A zero-size box and disjoint boxes share nothing.
  auto none = CopyRuns({{0, 0}, {0, 6}}, {{0, 0}, {8, 6}}, e);
  REQUIRE(none.ok());
  CHECK_FALSE(none->has_value());
  auto apart = CopyRuns({{0, 0}, {4, 6}}, {{4, 0}, {4, 6}}, e);
  REQUIRE(apart.ok());
  CHECK_FALSE(apart->has_value());
  // 0-d: one element.
  auto scalar = CopyRuns({}, {}, 8);
  REQUIRE(scalar.ok());
  REQUIRE(scalar->has_value());
  CHECK((*scalar)->bytes() == 8);
}

TEST_CASE("bad boxes are refused with what is wrong") {
  CHECK(CopyRuns({{0}, {2}}, {{0, 0}, {2, 2}}, 4).status().code() ==
        ErrorCode::kInvalidArgument);
  CHECK(CopyRuns({{0}, {2}}, {{0}, {2}}, 0).status().code() ==
        ErrorCode::kInvalidArgument);
  CHECK(CopyRuns({{0}, {-1}}, {{0}, {2}}, 4).status().code() ==
        ErrorCode::kInvalidArgument);
  auto has = [](const std::optional<std::string>& p, const char* text) {
    return p && p->find(text) != std::string::npos;
  };
  CHECK(has(BoxProblem({{0}, {5}}, {4}), "outside"));
  CHECK(has(BoxProblem({{INT64_MAX}, {INT64_MAX}}, {INT64_MAX}), "outside"));
  CHECK(has(BoxProblem({{-1}, {1}}, {4}), "negative"));
  CHECK(has(BoxProblem({{0, 0}, {1, 1}}, {4}), "dims"));
  CHECK(has(BoxProblem({{0, 0}, {INT64_MAX, 2}}, {INT64_MAX, 2}), "overflows"));
  CHECK(has(BoxProblem({{0}, {INT64_MAX / 2}}, {INT64_MAX}, 4), "byte size"));
  CHECK_FALSE(BoxProblem({{1, 0}, {3, 0}}, {4, 0}).has_value());
}

namespace {

// Cut points 0 = c0 < c1 < ... = n of one dim, some cells possibly empty
// (uneven shardings: 6 rows on 4 ranks leaves one with none).
std::vector<int64_t> RandomCuts(std::mt19937_64& rng, int64_t n) {
  std::vector<int64_t> c = {0};
  int parts = 1 + static_cast<int>(rng() % 4);
  for (int i = 1; i < parts; ++i)
    c.push_back(std::uniform_int_distribution<int64_t>(0, n)(rng));
  c.push_back(n);
  std::sort(c.begin(), c.end());
  return c;
}

std::vector<size_t> BruteOverlaps(const std::vector<Box>& chunks,
                                  const Box& want) {
  std::vector<size_t> out;
  for (size_t i = 0; i < chunks.size(); ++i) {
    auto r = CopyRuns(chunks[i], want, 1);
    if (r.ok() && r->has_value()) out.push_back(i);
  }
  return out;
}

}  // namespace

TEST_CASE("the chunk index finds exactly the chunks a box meets") {
  std::mt19937_64 rng(7);
  int grids = 0, others = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    const size_t ndim = static_cast<size_t>(trial % 4);  // 0-d to 3-d
    std::vector<int64_t> shape;
    for (size_t d = 0; d < ndim; ++d)
      shape.push_back(std::uniform_int_distribution<int64_t>(0, 9)(rng));
    // A grid of chunks from per-dim cuts, in a shuffled (rank) order.
    std::vector<std::vector<int64_t>> cuts;
    for (int64_t n : shape) cuts.push_back(RandomCuts(rng, n));
    std::vector<Box> chunks;
    std::vector<size_t> j(ndim, 0);
    for (bool more = true; more;) {
      Box b;
      for (size_t d = 0; d < ndim; ++d) {
        b.offsets.push_back(cuts[d][j[d]]);
        b.sizes.push_back(cuts[d][j[d] + 1] - cuts[d][j[d]]);
      }
      chunks.push_back(b);
      more = false;
      for (size_t d = ndim; d-- > 0;) {
        if (++j[d] + 1 < cuts[d].size()) {
          more = true;
          break;
        }
        j[d] = 0;
      }
    }
    // Every third layout is not a grid: two neighbouring cells merged.
    if (trial % 3 == 2 && ndim > 0 && chunks.size() >= 2) {
      for (size_t a = 0; a + 1 < chunks.size(); ++a) {
        Box& x = chunks[a];
        const Box& y = chunks[a + 1];
        bool row = true;
        for (size_t d = 0; d + 1 < ndim; ++d)
          row = row && x.offsets[d] == y.offsets[d] && x.sizes[d] == y.sizes[d];
        if (row &&
            x.offsets[ndim - 1] + x.sizes[ndim - 1] == y.offsets[ndim - 1] &&
            x.numel() > 0 && y.numel() > 0) {
          x.sizes[ndim - 1] += y.sizes[ndim - 1];
          chunks.erase(chunks.begin() + static_cast<std::ptrdiff_t>(a + 1));
          break;
        }
      }
    }
    std::shuffle(chunks.begin(), chunks.end(), rng);
    auto ix = BoxIndex::Build(chunks);
    REQUIRE(ix.ok());
    (ix->is_grid() ? grids : others)++;
    for (int q = 0; q < 20; ++q) {
      Box want = RandomBox(rng, shape);
      INFO("trial " << trial << " query " << q);
      CHECK(ix->Overlapping(want) == BruteOverlaps(chunks, want));
    }
  }
  CHECK(grids > 1000);
  CHECK(others > 100);
}

TEST_CASE("the chunk index refuses mixed ranks") {
  CHECK(BoxIndex::Build({{{0}, {2}}, {{0, 0}, {2, 2}}}).status().code() ==
        ErrorCode::kInvalidArgument);
  CHECK(BoxIndex::Build({{{0}, {-2}}}).status().code() ==
        ErrorCode::kInvalidArgument);
  auto empty = BoxIndex::Build({});
  REQUIRE(empty.ok());
  CHECK(empty->Overlapping({}).empty());
}

namespace {
// Whether two boxes share an element, by the same oracle as above.
bool Share(const Box& a, const Box& b) {
  return !BruteOverlaps({a}, b).empty();
}
}  // namespace

TEST_CASE("FirstOverlap finds an overlapping pair exactly when one exists") {
  std::mt19937_64 rng(4711);
  int with = 0, without = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    const size_t ndim = static_cast<size_t>(trial % 5);  // 0-d to 4-d
    std::vector<int64_t> shape;
    for (size_t d = 0; d < ndim; ++d)
      shape.push_back(std::uniform_int_distribution<int64_t>(1, 6)(rng));
    std::vector<Box> chunks;
    const size_t n = 1 + rng() % 6;
    for (size_t i = 0; i < n; ++i) chunks.push_back(RandomBox(rng, shape));
    bool any = false;
    for (size_t i = 0; i < n; ++i)
      for (size_t j = i + 1; j < n; ++j)
        any = any || Share(chunks[i], chunks[j]);
    auto ix = BoxIndex::Build(chunks);
    REQUIRE(ix.ok());
    auto got = ix->FirstOverlap(UINT64_MAX);
    REQUIRE(got.ok());
    INFO("trial " << trial);
    REQUIRE(got->has_value() == any);
    if (any) {
      auto [i, j] = **got;
      CHECK(i < j);
      CHECK(Share(chunks[i], chunks[j]));
      ++with;
    } else {
      ++without;
    }
  }
  CHECK(with > 1000);
  CHECK(without > 1000);
}

TEST_CASE("FirstOverlap stays linear on layouts that are not grids") {
  // Column strips of one row: not a grid along dim 0, swept along dim 1.
  const int64_t c = 200000;
  std::vector<Box> strips;
  for (int64_t i = 0; i < c; ++i) strips.push_back({{0, 2 * i}, {1, 1}});
  auto ix = BoxIndex::Build(strips);
  REQUIRE(ix.ok());
  auto none = ix->FirstOverlap(4 * static_cast<uint64_t>(c));
  REQUIRE(none.ok());
  CHECK_FALSE(none->has_value());
  CHECK(ix->Overlapping({{0, 10}, {1, 3}}) == std::vector<size_t>{5, 6});
  // Left half in rows, right half in columns: no sweep dim keeps the open
  // set small. The bound refuses it instead of taking k^2 comparisons.
  const int64_t k = 4000;
  std::vector<Box> mixed;
  for (int64_t i = 0; i < k; ++i) mixed.push_back({{i, 0}, {1, k}});
  for (int64_t j = 0; j < k; ++j) mixed.push_back({{0, k + j}, {k, 1}});
  auto mix = BoxIndex::Build(mixed);
  REQUIRE(mix.ok());
  CHECK_FALSE(mix->is_grid());
  auto refused = mix->FirstOverlap(16 * mixed.size());
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.status().code() == ErrorCode::kResourceExhausted);
  CHECK_THAT(refused.status().message(), Catch::Contains("comparisons"));
  // A grid is disjoint by construction: no comparisons at all.
  std::vector<Box> grid;
  for (int64_t i = 0; i < 300; ++i)
    for (int64_t j = 0; j < 300; ++j) grid.push_back({{i, j}, {1, 1}});
  auto g = BoxIndex::Build(grid);
  REQUIRE(g.ok());
  CHECK(g->is_grid());
  auto gn = g->FirstOverlap(0);
  REQUIRE(gn.ok());
  CHECK_FALSE(gn->has_value());
}
