#include "ckpt/box.h"

#include <algorithm>

namespace ckpt {

int64_t Box::numel() const {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  return n;
}

uint64_t RunPattern::src_end() const {
  uint64_t end = src + length;
  for (size_t d = 0; d < counts.size(); ++d) {
    if (counts[d] > 0) end += (counts[d] - 1) * src_strides[d];
  }
  return end;
}

uint64_t RunPattern::runs() const {
  uint64_t n = 1;
  for (uint64_t c : counts) n *= c;
  return n;
}

std::optional<std::string> BoxProblem(const Box& b,
                                      const std::vector<int64_t>& shape,
                                      uint64_t elem_size) {
  return BoxProblem(b.offsets, b.sizes, shape, elem_size);
}

std::optional<std::string> BoxProblem(std::span<const int64_t> offsets,
                                      std::span<const int64_t> sizes,
                                      std::span<const int64_t> shape,
                                      uint64_t elem_size) {
  if (offsets.size() != shape.size() || sizes.size() != shape.size()) {
    return "a box of " + std::to_string(offsets.size()) + " offsets and " +
           std::to_string(sizes.size()) + " sizes in a tensor of " +
           std::to_string(shape.size()) + " dims";
  }
  int64_t numel = 1;
  for (size_t d = 0; d < shape.size(); ++d) {
    const int64_t off = offsets[d], size = sizes[d];
    // (Built only on failure: this runs for every chunk of every save,
    // plan and manifest check.)
    auto dim = [d] { return "dim " + std::to_string(d) + ": "; };
    if (off < 0 || size < 0) {
      return dim() + "offset " + std::to_string(off) + " and size " +
             std::to_string(size) + " must not be negative";
    }
    // off + size <= shape[d], written so that it cannot overflow.
    if (shape[d] < 0 || off > shape[d] || size > shape[d] - off) {
      return dim() + "[" + std::to_string(off) + ", +" + std::to_string(size) +
             ") is outside the tensor's " + std::to_string(shape[d]);
    }
    if (size != 0 && numel > INT64_MAX / size) {
      return "the box's element count overflows int64";
    }
    numel *= size;
  }
  if (elem_size > 0 && static_cast<uint64_t>(numel) >
                           static_cast<uint64_t>(INT64_MAX) / elem_size) {
    return "the box's byte size overflows int64";
  }
  return std::nullopt;
}

std::optional<Box> Intersect(const Box& a, const Box& b) {
  Box out;
  const size_t n = a.ndim();
  out.offsets.resize(n);
  out.sizes.resize(n);
  for (size_t d = 0; d < n; ++d) {
    int64_t lo = std::max(a.offsets[d], b.offsets[d]);
    int64_t hi = std::min(a.offsets[d] + a.sizes[d], b.offsets[d] + b.sizes[d]);
    if (lo >= hi) return std::nullopt;
    out.offsets[d] = lo;
    out.sizes[d] = hi - lo;
  }
  return out;
}

Result<std::optional<RunPattern>> CopyRuns(const Box& from, const Box& to,
                                           uint64_t elem_size) {
  const size_t n = from.ndim();
  if (from.offsets.size() != n || to.sizes.size() != n ||
      to.offsets.size() != n) {
    return InvalidArgument("boxes of different ranks (" + std::to_string(n) +
                           " and " + std::to_string(to.ndim()) + " dims)");
  }
  if (elem_size == 0) return InvalidArgument("element size 0");
  for (size_t d = 0; d < n; ++d) {
    if (from.sizes[d] < 0 || to.sizes[d] < 0) {
      return InvalidArgument("a box has a negative size in dim " +
                             std::to_string(d));
    }
  }
  std::optional<Box> common = Intersect(from, to);
  if (!common) return std::optional<RunPattern>();
  const Box& in = *common;
  RunPattern p;
  p.length = elem_size;
  if (n == 0) return std::optional<RunPattern>(p);
  // Row-major element strides of both buffers.
  std::vector<uint64_t> fs(n), ts(n);
  uint64_t f = 1, t = 1;
  for (size_t d = n; d-- > 0;) {
    fs[d] = f;
    ts[d] = t;
    f *= static_cast<uint64_t>(from.sizes[d]);
    t *= static_cast<uint64_t>(to.sizes[d]);
  }
  for (size_t d = 0; d < n; ++d) {
    p.src += static_cast<uint64_t>(in.offsets[d] - from.offsets[d]) * fs[d] *
             elem_size;
    p.dst += static_cast<uint64_t>(in.offsets[d] - to.offsets[d]) * ts[d] *
             elem_size;
  }
  // The run covers dim k and every dim after it, which both boxes hold
  // whole: the smallest such k.
  size_t k = n - 1;
  auto whole = [&](size_t d) {
    return in.sizes[d] == from.sizes[d] && in.sizes[d] == to.sizes[d];
  };
  while (k > 0 && whole(k)) --k;
  p.length = static_cast<uint64_t>(in.sizes[k]) * fs[k] * elem_size;
  for (size_t d = 0; d < k; ++d) {
    if (in.sizes[d] == 1) continue;  // one step: folds into src and dst
    const uint64_t count = static_cast<uint64_t>(in.sizes[d]);
    const uint64_t ss = fs[d] * elem_size, ds = ts[d] * elem_size;
    // The previous strided dim steps over this one whole in both buffers:
    // one dim of count * its count steps.
    if (!p.counts.empty() && p.src_strides.back() == count * ss &&
        p.dst_strides.back() == count * ds) {
      p.counts.back() *= count;
      p.src_strides.back() = ss;
      p.dst_strides.back() = ds;
      continue;
    }
    p.counts.push_back(count);
    p.src_strides.push_back(ss);
    p.dst_strides.push_back(ds);
  }
  return std::optional<RunPattern>(std::move(p));
}

namespace {

bool Meets(const Box& a, const Box& b) {
  for (size_t d = 0; d < a.ndim(); ++d) {
    if (std::max(a.offsets[d], b.offsets[d]) >=
        std::min(a.offsets[d] + a.sizes[d], b.offsets[d] + b.sizes[d])) {
      return false;
    }
  }
  return true;
}

}  // namespace

Result<BoxIndex> BoxIndex::Build(std::vector<Box> chunks) {
  BoxIndex ix;
  ix.ndim_ = chunks.empty() ? 0 : chunks[0].ndim();
  for (size_t i = 0; i < chunks.size(); ++i) {
    const Box& b = chunks[i];
    if (b.ndim() != ix.ndim_ || b.offsets.size() != ix.ndim_) {
      return InvalidArgument("chunk " + std::to_string(i) + " has " +
                             std::to_string(b.ndim()) + " dims, chunk 0 " +
                             std::to_string(ix.ndim_));
    }
    for (int64_t n : b.sizes) {
      if (n < 0) {
        return InvalidArgument("chunk " + std::to_string(i) +
                               " has a negative size");
      }
    }
  }
  ix.chunks_ = std::move(chunks);
  std::vector<size_t> live;
  for (size_t i = 0; i < ix.chunks_.size(); ++i) {
    if (ix.chunks_[i].numel() > 0) live.push_back(i);
  }
  // A grid: per-dim cuts whose cells number the live chunks, each chunk
  // exactly one cell.
  ix.cuts_.assign(ix.ndim_, {});
  for (size_t d = 0; d < ix.ndim_; ++d) {
    auto& c = ix.cuts_[d];
    for (size_t i : live) {
      c.push_back(ix.chunks_[i].offsets[d]);
      c.push_back(ix.chunks_[i].offsets[d] + ix.chunks_[i].sizes[d]);
    }
    std::sort(c.begin(), c.end());
    c.erase(std::unique(c.begin(), c.end()), c.end());
  }
  uint64_t cells = live.empty() ? 0 : 1;
  for (size_t d = 0; d < ix.ndim_ && cells <= live.size(); ++d) {
    cells *= ix.cuts_[d].size() - 1;
  }
  ix.grid_ = cells == live.size();
  if (ix.grid_) {
    ix.cell_chunk_.assign(static_cast<size_t>(cells), SIZE_MAX);
    for (size_t i : live) {
      const Box& b = ix.chunks_[i];
      size_t cell = 0;
      for (size_t d = 0; d < ix.ndim_ && ix.grid_; ++d) {
        const auto& c = ix.cuts_[d];
        size_t at = static_cast<size_t>(
            std::lower_bound(c.begin(), c.end(), b.offsets[d]) - c.begin());
        // One cell wide: its end is the next cut.
        ix.grid_ = c[at + 1] == b.offsets[d] + b.sizes[d];
        cell = cell * (c.size() - 1) + at;
      }
      if (!ix.grid_ || ix.cell_chunk_[cell] != SIZE_MAX) {
        ix.grid_ = false;  // a chunk spans cells, or two share one
        break;
      }
      ix.cell_chunk_[cell] = i;
    }
  }
  if (!ix.grid_) {
    ix.cuts_.clear();
    ix.cell_chunk_.clear();
    ix.by_start_ = live;
    // Sweep the dim whose chunks start at the most distinct offsets: a
    // column sharding by dim 1, a row sharding by dim 0.
    size_t most = 0;
    for (size_t d = 0; d < ix.ndim_; ++d) {
      std::vector<int64_t> starts;
      starts.reserve(live.size());
      for (size_t i : live) starts.push_back(ix.chunks_[i].offsets[d]);
      std::sort(starts.begin(), starts.end());
      const size_t distinct = static_cast<size_t>(
          std::unique(starts.begin(), starts.end()) - starts.begin());
      if (distinct > most) most = distinct, ix.sweep_ = d;
    }
    const size_t w = ix.sweep_;
    auto start = [&](size_t i) {
      return ix.ndim_ ? ix.chunks_[i].offsets[w] : int64_t{0};
    };
    std::stable_sort(ix.by_start_.begin(), ix.by_start_.end(),
                     [&](size_t a, size_t b) { return start(a) < start(b); });
    int64_t m = INT64_MIN;
    for (size_t i : ix.by_start_) {
      if (ix.ndim_) m = std::max(m, start(i) + ix.chunks_[i].sizes[w]);
      ix.prefix_end_.push_back(ix.ndim_ ? m : INT64_MAX);
    }
  }
  return ix;
}

std::vector<size_t> BoxIndex::Overlapping(const Box& want) const {
  std::vector<size_t> out;
  if (want.ndim() != ndim_ || want.numel() == 0) return out;
  if (grid_) {
    if (cell_chunk_.empty()) return out;
    // The range of cells in each dim, then every cell of their product.
    std::vector<size_t> lo(ndim_), hi(ndim_);
    for (size_t d = 0; d < ndim_; ++d) {
      const auto& c = cuts_[d];
      const int64_t a = want.offsets[d], b = want.offsets[d] + want.sizes[d];
      auto first = std::upper_bound(c.begin(), c.end(), a);
      lo[d] =
          first == c.begin() ? 0 : static_cast<size_t>(first - c.begin()) - 1;
      hi[d] = static_cast<size_t>(std::lower_bound(c.begin(), c.end(), b) -
                                  c.begin());
      hi[d] = std::min(hi[d], c.size() - 1);
      if (lo[d] >= hi[d]) return out;
    }
    std::vector<size_t> j = lo;
    for (;;) {
      size_t cell = 0;
      for (size_t d = 0; d < ndim_; ++d)
        cell = cell * (cuts_[d].size() - 1) + j[d];
      size_t i = cell_chunk_[cell];
      if (i != SIZE_MAX && Meets(chunks_[i], want)) out.push_back(i);
      size_t d = ndim_;
      for (;;) {
        if (d == 0) {
          std::sort(out.begin(), out.end());
          return out;
        }
        --d;
        if (++j[d] < hi[d]) break;
        j[d] = lo[d];
      }
    }
  }
  // Sorted by start in the sweep dim: skip the prefix whose ends all lie
  // before the wanted start, stop at the first start past the wanted end.
  const int64_t a = ndim_ ? want.offsets[sweep_] : 0;
  const int64_t b = ndim_ ? want.offsets[sweep_] + want.sizes[sweep_] : 1;
  size_t k = static_cast<size_t>(
      std::upper_bound(prefix_end_.begin(), prefix_end_.end(), a) -
      prefix_end_.begin());
  for (; k < by_start_.size(); ++k) {
    size_t i = by_start_[k];
    if (ndim_ && chunks_[i].offsets[sweep_] >= b) break;
    if (Meets(chunks_[i], want)) out.push_back(i);
  }
  std::sort(out.begin(), out.end());
  return out;
}

Result<std::optional<std::pair<size_t, size_t>>> BoxIndex::FirstOverlap(
    uint64_t max_tests) const {
  using Pair = std::pair<size_t, size_t>;
  // Each chunk exactly one cell of the grid, no two in one cell.
  if (grid_) return std::optional<Pair>();
  // Along the sweep dim, in start order: the chunks still open (end past
  // the current start) are the only ones the next chunk can meet.
  std::vector<std::pair<int64_t, size_t>> open;  // min-heap of (end, chunk)
  auto later = [](const auto& x, const auto& y) { return x.first > y.first; };
  uint64_t tests = 0;
  for (size_t i : by_start_) {
    const Box& c = chunks_[i];
    const int64_t start = ndim_ ? c.offsets[sweep_] : 0;
    while (!open.empty() && open.front().first <= start) {
      std::pop_heap(open.begin(), open.end(), later);
      open.pop_back();
    }
    tests += open.size();
    if (tests > max_tests) {
      return Status(ErrorCode::kResourceExhausted,
                    "the chunks' layout needs more than " +
                        std::to_string(max_tests) +
                        " comparisons to check that no two overlap");
    }
    for (const auto& [end, j] : open) {
      if (Meets(chunks_[j], c)) {
        return std::optional<Pair>(Pair(std::min(i, j), std::max(i, j)));
      }
    }
    // 0-d chunks all meet: the first one stays open forever.
    open.emplace_back(ndim_ ? start + c.sizes[sweep_] : INT64_MAX, i);
    std::push_heap(open.begin(), open.end(), later);
  }
  return std::optional<Pair>();
}

void ForEachRun(const RunPattern& p,
                const std::function<void(uint64_t, uint64_t, uint64_t)>& fn) {
  const size_t n = p.counts.size();
  for (uint64_t c : p.counts) {
    if (c == 0) return;
  }
  std::vector<uint64_t> j(n, 0);
  uint64_t src = p.src, dst = p.dst;
  for (;;) {
    fn(src, dst, p.length);
    // Odometer over j, innermost dim fastest.
    size_t d = n;
    for (;;) {
      if (d == 0) return;
      --d;
      if (++j[d] < p.counts[d]) {
        src += p.src_strides[d];
        dst += p.dst_strides[d];
        break;
      }
      src -= (p.counts[d] - 1) * p.src_strides[d];
      dst -= (p.counts[d] - 1) * p.dst_strides[d];
      j[d] = 0;
    }
  }
}

}  // namespace ckpt
