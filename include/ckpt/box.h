// Boxes of a tensor and the byte runs that copy one box's elements out of
// another's: the geometry under sharded checkpoints (a chunk saved by one
// rank is a box of the global tensor; a rank that loads asks for a box)
// and under slicing a tensor for tensor-parallel ranks.
//
// Both boxes' bytes are row-major and dense (C order, no gaps). The copy
// of their intersection is described by one RunPattern of at most
// ndim - 1 strided dims around a contiguous run, never by a list with one
// entry per row: planning a load is O(ndim) per pair of boxes whatever
// their sizes, and the pattern maps onto one cudaMemcpy2DAsync when it has
// at most one strided dim.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "ckpt/status.h"

namespace ckpt {

/// The elements offsets[d] <= i[d] < offsets[d] + sizes[d] of a tensor,
/// in every dim d. A 0-d tensor's box has no dims and holds one element.
struct Box {
  std::vector<int64_t> offsets;
  std::vector<int64_t> sizes;

  size_t ndim() const { return sizes.size(); }
  /// Elements in the box (1 for 0-d; 0 when some size is 0). Valid boxes
  /// only (see BoxProblem).
  int64_t numel() const;
  bool operator==(const Box&) const = default;
};

/// Why `b` is not a valid box inside a tensor of `shape` (offsets and
/// sizes of the tensor's rank, sizes >= 0, inside the shape, element
/// count and byte size of `elem_size`-byte elements within int64), or
/// nullopt. `elem_size` 0 skips the byte check.
std::optional<std::string> BoxProblem(const Box& b,
                                      const std::vector<int64_t>& shape,
                                      uint64_t elem_size = 0);
/// The same for a box given as offsets and sizes (views into a chunk
/// table: no Box built per chunk).
std::optional<std::string> BoxProblem(std::span<const int64_t> offsets,
                                      std::span<const int64_t> sizes,
                                      std::span<const int64_t> shape,
                                      uint64_t elem_size = 0);

/// The common elements of two boxes of the same rank; nullopt when they
/// share none (a box with a zero size shares nothing). Ranks must match.
std::optional<Box> Intersect(const Box& a, const Box& b);

/// Copies between two dense row-major buffers: runs of `length` bytes, one
/// for each multi-index j with 0 <= j[d] < counts[d], the run j going from
/// byte src + sum(j[d] * src_strides[d]) of the source to byte
/// dst + sum(j[d] * dst_strides[d]) of the destination. No strided dims:
/// one run. Strided dims are outermost first, so runs come in increasing
/// source (and destination) order.
struct RunPattern {
  uint64_t src = 0;
  uint64_t dst = 0;
  uint64_t length = 0;
  std::vector<uint64_t> counts;
  std::vector<uint64_t> src_strides;
  std::vector<uint64_t> dst_strides;

  uint64_t runs() const;  ///< product of counts
  uint64_t bytes() const { return runs() * length; }
  /// One past the last source byte a run reads (src + length when there is
  /// one run).
  uint64_t src_end() const;
  bool operator==(const RunPattern&) const = default;
};

/// The pattern copying the elements `from` and `to` share from `from`'s
/// dense row-major bytes into `to`'s (boxes of one tensor, elements of
/// `elem_size` bytes): the contiguous run spans every inner dim that both
/// boxes hold whole, and dims where the intersection is one element wide
/// are folded away. nullopt when the boxes share no element.
/// kInvalidArgument when the ranks differ, elem_size is 0 or a size is
/// negative; byte counts are assumed to fit (BoxProblem checks that).
Result<std::optional<RunPattern>> CopyRuns(const Box& from, const Box& to,
                                           uint64_t elem_size);

/// The chunks of one tensor (boxes saved by different ranks), indexed to
/// find the ones a wanted box shares elements with, without testing every
/// chunk: planning a load stays O(log C + k) for C chunks of which k meet
/// the request, as DCP's pairwise test of every chunk is not.
class BoxIndex {
 public:
  /// Indexes `chunks` (one rank each; zero-size boxes allowed and never
  /// met). Chunks that tile a grid (each the cell between consecutive cut
  /// points of every dim: row, column, 2-D and uneven shardings) are found
  /// by bisecting the cuts; any other layout by its ranges along the dim
  /// where the chunks start at the most distinct offsets.
  /// Overlaps between chunks are not checked here. kInvalidArgument when
  /// the ranks differ or a size is negative.
  static Result<BoxIndex> Build(std::vector<Box> chunks);

  /// Indices (into the chunks given to Build) of those sharing at least
  /// one element with `want`, ascending. `want` must have their rank.
  std::vector<size_t> Overlapping(const Box& want) const;

  /// The first pair (i < j) of chunks that share an element, or nullopt
  /// when they are pairwise disjoint. A grid is disjoint by construction;
  /// any other layout is swept, comparing each chunk with those still
  /// open along the sweep dim: kResourceExhausted past `max_tests`
  /// comparisons (a layout too irregular to check in bounded time).
  Result<std::optional<std::pair<size_t, size_t>>> FirstOverlap(
      uint64_t max_tests) const;

  /// True when the chunks were found to tile a grid.
  bool is_grid() const { return grid_; }
  size_t size() const { return chunks_.size(); }

 private:
  BoxIndex() = default;
  std::vector<Box> chunks_;
  size_t ndim_ = 0;
  bool grid_ = false;
  // Grid: the cut points of each dim, and the chunk of each cell (row-major
  // over the cells), SIZE_MAX for none.
  std::vector<std::vector<int64_t>> cuts_;
  std::vector<size_t> cell_chunk_;
  // Otherwise: non-empty chunks sorted by their offset in the sweep dim,
  // with the largest end in that dim of each prefix (to bisect where
  // overlaps can begin).
  size_t sweep_ = 0;
  std::vector<size_t> by_start_;
  std::vector<int64_t> prefix_end_;
};

/// Calls fn(src, dst, length) for each run of `p`, in increasing order.
void ForEachRun(
    const RunPattern& p,
    const std::function<void(uint64_t src, uint64_t dst, uint64_t length)>& fn);

}  // namespace ckpt
