// Manifest codec and rules (docs/SHARDED.md 4-5), protocol messages.
#include <algorithm>
#include <array>
#include <cassert>
#include <cstring>
#include <limits>
#include <numeric>
#include <set>
#include <string_view>
#include <tuple>

#include "bytes_internal.h"
#include "checksum_internal.h"
#include "ckpt/box.h"
#include "ckpt/format.h"
#include "ckpt_manifest_generated.h"
#include "dist/manifest_internal.h"
#include "format_internal.h"

namespace ckpt::dist {

uint64_t GlobalTensorInfo::nbytes() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n * DTypeSize(dtype);
}

const GlobalTensorInfo* Manifest::Find(std::string_view path) const {
  auto it = std::lower_bound(
      tensors.begin(), tensors.end(), path,
      [](const GlobalTensorInfo& t, std::string_view p) { return t.path < p; });
  if (it == tensors.end() || it->path != path) return nullptr;
  return &*it;
}

}  // namespace ckpt::dist

namespace ckpt::dist::internal {

using ckpt::internal::HashToHex;
using ckpt::internal::LoadLE;
using ckpt::internal::RangeWithin;
using ckpt::internal::StoreLE;
using ckpt::internal::Utf8Problem;
using ckpt::internal::Xxh3;

namespace {

namespace fbm = ::ckpt::fbm;
using flatbuffers::FlatBufferBuilder;
using flatbuffers::Offset;

// "\x89CKPM\r\n\x1a": PNG's trick, as the ckpt file magic (FORMAT.md 3).
constexpr std::array<unsigned char, 8> kManifestMagic = {
    0x89, 'C', 'K', 'P', 'M', '\r', '\n', 0x1a};

Status At(Status s, const std::string& name, int64_t offset) {
  return s.WithFile(name).WithOffset(offset);
}

std::string Quote(std::string_view s) { return "'" + std::string(s) + "'"; }

static_assert(sizeof(ByteRun) == sizeof(fbm::ByteRange) &&
                  alignof(ByteRun) == alignof(fbm::ByteRange),
              "ByteRun must have the layout of the schema's ByteRange");

std::string ChunkName(const TensorRef& t, size_t i, const ManifestRef& m) {
  const ByteRun& c = t.data[i];
  std::string s = "chunk " + std::to_string(i) + " " + BoxString(t.box(i));
  if (c.file < m.files.size()) {
    s += " (" + m.files[c.file].name + ", rank " +
         std::to_string(m.files[c.file].rank) + ")";
  }
  return s;
}

// A plain file name: no separator, not "." or "..", no NUL, not empty.
bool PlainName(std::string_view n) {
  return !n.empty() && n.size() <= 255 && n != "." && n != ".." &&
         n.find('/') == std::string_view::npos &&
         n.find('\0') == std::string_view::npos && !Utf8Problem(n);
}

// True when `t`'s chunks (boxes already checked inside its shape) are
// slabs of whole rows, sorted by first row and pairwise disjoint.
bool RowSlabsInOrder(const TensorRef& t) {
  const size_t nd = t.ndim();
  if (nd == 0) return false;
  int64_t next = 0;  // the first row not yet covered by an earlier slab
  for (size_t i = 0; i < t.chunks; ++i) {
    const int64_t* o = t.offsets + i * nd;
    const int64_t* z = t.sizes + i * nd;
    if (o[0] < next) return false;
    for (size_t d = 1; d < nd; ++d) {
      if (o[d] != 0 || z[d] != t.shape[d]) return false;
    }
    next = o[0] + z[0];
  }
  return true;
}

// M8 (UTF-8), M9, M11, M12 for one tensor. `zeros` holds at least ndim
// zeros (the whole tensor's box offsets).
Status CheckTensor(const ManifestRef& m, const TensorRef& t,
                   const std::string& name, std::span<const int64_t> zeros) {
  auto fail = [&](const std::string& what) {
    return Corrupt(what).WithFile(name).WithTensor(std::string(t.path));
  };
  if (Utf8Problem(t.path)) return fail("tensor path is not valid UTF-8");
  const size_t elem = DTypeSize(static_cast<DType>(t.dtype));
  if (!IsKnownDType(t.dtype) || elem == 0) {
    return fail("unknown dtype code " +
                std::to_string(static_cast<unsigned>(t.dtype)));
  }
  const size_t nd = t.ndim();
  if (auto p = BoxProblem(zeros.first(nd), t.shape, t.shape, elem)) {
    return fail("shape: " + *p);
  }
  int64_t numel = 1;
  for (int64_t d : t.shape) numel *= d;
  int64_t covered = 0;  // saturates at numel + 1
  for (size_t i = 0; i < t.chunks; ++i) {
    const ByteRun& c = t.data[i];
    const auto sizes = t.sizes_of(i);
    if (auto p = BoxProblem(t.offsets_of(i), sizes, t.shape, elem)) {
      return fail("chunk " + std::to_string(i) + ": " + *p);
    }
    int64_t n = 1;
    for (int64_t z : sizes) n *= z;
    if (n == 0) {
      return fail(ChunkName(t, i, m) +
                  " is empty (empty chunks are not stored)");
    }
    if (c.length != static_cast<uint64_t>(n) * elem) {
      return fail(ChunkName(t, i, m) + " has " + std::to_string(c.length) +
                  " bytes; its box holds " + std::to_string(n) + " x " +
                  std::to_string(elem) + "-byte elements");
    }
    if (c.file >= m.files.size()) {
      return fail("chunk " + std::to_string(i) + " names file " +
                  std::to_string(c.file) + " of " +
                  std::to_string(m.files.size()));
    }
    if (!RangeWithin(c.offset, c.length, m.files[c.file].size)) {
      return fail(ChunkName(t, i, m) + ": bytes [" + std::to_string(c.offset) +
                  ", +" + std::to_string(c.length) + ") run past the file's " +
                  std::to_string(m.files[c.file].size) + " bytes");
    }
    covered = n > numel - covered ? numel + 1 : covered + n;
  }
  // M12: the chunks tile the shape: no fewer elements than the tensor has
  // (O(C), first: a hole is the common mistake), and pairwise disjoint.
  // A grid is disjoint by construction; any other layout is swept, within
  // a bound on comparisons so that a hostile manifest cannot make every
  // rank's open quadratic.
  if (covered < numel) {
    return fail("chunks hold " + std::to_string(covered) + " elements of " +
                std::to_string(numel) +
                " (a hole: some elements were saved by no rank)");
  }
  // (One chunk has nothing to overlap: the common case of replicated
  // tensors skips the index. Row slabs - every chunk whole in all dims
  // but the first - in order of their first row, as a row-sharded save
  // commits them, are disjoint when each ends before the next begins:
  // O(C) with no index, the commit's common case.)
  if (t.chunks > 1 && !RowSlabsInOrder(t)) {
    std::vector<Box> boxes;
    boxes.reserve(t.chunks);
    for (size_t i = 0; i < t.chunks; ++i) boxes.push_back(t.box(i));
    CKPT_ASSIGN_OR_RETURN(BoxIndex index, BoxIndex::Build(std::move(boxes)));
    auto overlap = index.FirstOverlap(kMaxOverlapTestsPerChunk * t.chunks +
                                      kMinOverlapTests);
    if (!overlap.ok()) return fail(overlap.status().message());
    if (overlap->has_value()) {
      const auto [i, j] = **overlap;
      return fail("chunks overlap: " + ChunkName(t, i, m) + " and " +
                  ChunkName(t, j, m));
    }
  }
  if (covered != numel) {  // disjoint boxes inside the shape cannot
    return fail("chunks hold more elements than the shape");  // (defensive)
  }
  return Status::OK();
}

// The public struct's view of a tensor (DecodeManifest's result).
GlobalTensorInfo InfoOf(const TensorRef& t) {
  GlobalTensorInfo g;
  g.path = std::string(t.path);
  g.dtype = static_cast<DType>(t.dtype);
  g.shape.assign(t.shape.begin(), t.shape.end());
  g.chunks.resize(t.chunks);
  for (size_t i = 0; i < t.chunks; ++i) {
    ChunkInfo& c = g.chunks[i];
    c.box = t.box(i);
    c.file = t.data[i].file;
    c.offset = t.data[i].offset;
    c.length = t.data[i].length;
  }
  return g;
}

ManifestRef RefOf(const Manifest& m, std::span<const TensorRef> tensors) {
  ManifestRef r;
  r.version_major = m.version_major;
  r.version_minor = m.version_minor;
  r.world_size = m.world_size;
  r.globals_file = m.globals_file;
  r.files = m.files;
  r.tensors = tensors;
  r.metadata = m.metadata;
  r.producer = m.producer;
  return r;
}

}  // namespace

// ---- the chunk table -----------------------------------------------------

Box TensorRef::box(size_t i) const {
  const auto o = offsets_of(i), z = sizes_of(i);
  return Box{{o.begin(), o.end()}, {z.begin(), z.end()}};
}

void TensorTable::AddTensor(std::string_view path, uint8_t dtype,
                            std::span<const int64_t> shape) {
  paths_.append(path);
  path_end_.push_back(static_cast<uint32_t>(paths_.size()));
  dtypes_.push_back(dtype);
  dims_.insert(dims_.end(), shape.begin(), shape.end());
  dim_end_.push_back(static_cast<uint32_t>(dims_.size()));
  chunk_end_.push_back(static_cast<uint32_t>(data_.size()));
  coord_end_.push_back(offsets_.size());
}

void TensorTable::AddChunk(std::span<const int64_t> offsets,
                           std::span<const int64_t> sizes,
                           const ByteRun& data) {
  // (Boxes of the last tensor's rank: every caller checks it first.)
  assert(!dtypes_.empty());
  assert(offsets.size() ==
         dim_end_.back() - (size() > 1 ? dim_end_[size() - 2] : 0));
  assert(sizes.size() == offsets.size());
  offsets_.insert(offsets_.end(), offsets.begin(), offsets.end());
  sizes_.insert(sizes_.end(), sizes.begin(), sizes.end());
  data_.push_back(data);
  chunk_end_.back() = static_cast<uint32_t>(data_.size());
  coord_end_.back() = offsets_.size();
}

void TensorTable::SortLastChunks() {
  if (dtypes_.empty()) return;
  const TensorRef t = at(size() - 1);
  if (t.chunks < 2 || t.ndim() == 0) return;
  auto less = [&](size_t a, size_t b) {
    const auto x = t.offsets_of(a), y = t.offsets_of(b);
    return std::lexicographical_compare(x.begin(), x.end(), y.begin(), y.end());
  };
  bool sorted = true;
  for (size_t i = 1; i < t.chunks && sorted; ++i) sorted = !less(i, i - 1);
  if (sorted) return;
  scratch_.resize(t.chunks);
  std::iota(scratch_.begin(), scratch_.end(), size_t{0});
  std::stable_sort(scratch_.begin(), scratch_.end(), less);
  const size_t nd = t.ndim();
  const size_t first = data_.size() - t.chunks;
  const size_t coord0 = offsets_.size() - t.chunks * nd;
  std::vector<int64_t> o(t.chunks * nd), z(t.chunks * nd);
  std::vector<ByteRun> d(t.chunks);
  for (size_t k = 0; k < t.chunks; ++k) {
    const size_t i = scratch_[k];
    std::copy_n(t.offsets + i * nd, nd, o.data() + k * nd);
    std::copy_n(t.sizes + i * nd, nd, z.data() + k * nd);
    d[k] = t.data[i];
  }
  std::copy(o.begin(), o.end(), offsets_.data() + coord0);
  std::copy(z.begin(), z.end(), sizes_.data() + coord0);
  std::copy(d.begin(), d.end(), data_.data() + first);
}

void TensorTable::Reserve(size_t tensors, size_t chunks, size_t coords,
                          size_t bytes) {
  paths_.reserve(bytes);
  path_end_.reserve(tensors);
  dtypes_.reserve(tensors);
  dim_end_.reserve(tensors);
  chunk_end_.reserve(tensors);
  coord_end_.reserve(tensors);
  data_.reserve(chunks);
  offsets_.reserve(coords);
  sizes_.reserve(coords);
}

TensorRef TensorTable::at(size_t i) const {
  TensorRef t;
  const size_t p0 = i ? path_end_[i - 1] : 0;
  t.path = std::string_view(paths_).substr(p0, path_end_[i] - p0);
  t.dtype = dtypes_[i];
  const size_t d0 = i ? dim_end_[i - 1] : 0;
  t.shape = std::span(dims_).subspan(d0, dim_end_[i] - d0);
  const size_t c0 = i ? chunk_end_[i - 1] : 0;
  t.chunks = chunk_end_[i] - c0;
  const size_t k0 = i ? coord_end_[i - 1] : 0;
  t.offsets = offsets_.data() + k0;
  t.sizes = sizes_.data() + k0;
  t.data = data_.data() + c0;
  return t;
}

std::vector<TensorRef> TensorTable::Refs() const {
  std::vector<TensorRef> out;
  out.reserve(size());
  for (size_t i = 0; i < size(); ++i) out.push_back(at(i));
  return out;
}

TensorTable TensorTable::Of(const Manifest& m) {
  TensorTable t;
  for (const GlobalTensorInfo& g : m.tensors) {
    t.AddTensor(g.path, static_cast<uint8_t>(g.dtype), g.shape);
    for (const ChunkInfo& c : g.chunks) {
      t.AddChunk(c.box.offsets, c.box.sizes,
                 ByteRun{c.file, 0, c.offset, c.length});
    }
  }
  return t;
}

void TensorTable::AddChunksOf(const TensorRef& t, uint32_t file,
                              bool drop_empty) {
  for (size_t i = 0; i < t.chunks; ++i) {
    const auto sizes = t.sizes_of(i);
    if (drop_empty && std::find(sizes.begin(), sizes.end(), 0) != sizes.end()) {
      continue;
    }
    AddChunk(t.offsets_of(i), sizes,
             ByteRun{file, 0, t.data[i].offset, t.data[i].length});
  }
}

// ---- the rules -----------------------------------------------------------

std::string BoxString(const Box& b) {
  std::string s = "[";
  for (size_t d = 0; d < b.ndim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(b.offsets[d]) + ":" +
         std::to_string(b.offsets[d] + b.sizes[d]);
  }
  return s + "]";
}

Status CheckManifest(const ManifestRef& m, const std::string& name) {
  auto fail = [&](const std::string& what) {
    return Corrupt(what).WithFile(name);
  };
  // M7: files, one per rank.
  if (m.world_size == 0) return fail("world size is 0");
  if (m.files.size() != m.world_size) {
    return fail("world size " + std::to_string(m.world_size) + " but " +
                std::to_string(m.files.size()) + " shard files");
  }
  std::set<std::string_view> names;
  for (size_t i = 0; i < m.files.size(); ++i) {
    const ShardFileInfo& f = m.files[i];
    if (!PlainName(f.name)) {
      return fail("shard file " + std::to_string(i) + "'s name " +
                  Quote(f.name) + " is not a plain file name");
    }
    if (f.name == kManifestName) {
      return fail("shard file " + std::to_string(i) +
                  " is named like the manifest");
    }
    if (!names.insert(f.name).second) {
      return fail("two shard files are named " + Quote(f.name));
    }
    if (f.rank != i) {
      return fail("shard file " + std::to_string(i) + " (" + f.name +
                  ") says rank " + std::to_string(f.rank) +
                  "; files are in rank order");
    }
  }
  if (m.globals_file >= m.files.size()) {
    return fail("globals file " + std::to_string(m.globals_file) + " of " +
                std::to_string(m.files.size()));
  }
  // M8-M12: tensors.
  size_t max_ndim = 0, chunks = 0;
  for (const TensorRef& t : m.tensors) {
    max_ndim = std::max(max_ndim, t.ndim());
    chunks += t.chunks;
  }
  const std::vector<int64_t> zeros(max_ndim, 0);
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    if (i > 0 && !(m.tensors[i - 1].path < m.tensors[i].path)) {
      return fail("tensors are not sorted by path with no repeats: " +
                  Quote(m.tensors[i - 1].path) + " then " +
                  Quote(m.tensors[i].path));
    }
    CKPT_RETURN_IF_ERROR(CheckTensor(m, m.tensors[i], name, zeros));
  }
  // M13: no two chunks share bytes of a file. The ranges of each file, in
  // the order the tensors give them (a writer's order: usually sorted
  // already), sorted only when they are not.
  struct Range {
    uint64_t offset, length;
    uint32_t tensor, chunk;
  };
  std::vector<size_t> per_file(m.files.size() + 1, 0);
  for (const TensorRef& t : m.tensors) {
    for (size_t j = 0; j < t.chunks; ++j) ++per_file[t.data[j].file + 1];
  }
  for (size_t f = 1; f < per_file.size(); ++f) per_file[f] += per_file[f - 1];
  std::vector<Range> ranges(chunks);
  {
    std::vector<size_t> at(per_file.begin(), per_file.end() - 1);
    for (size_t i = 0; i < m.tensors.size(); ++i) {
      const TensorRef& t = m.tensors[i];
      for (size_t j = 0; j < t.chunks; ++j) {
        const ByteRun& c = t.data[j];
        ranges[at[c.file]++] = {c.offset, c.length, static_cast<uint32_t>(i),
                                static_cast<uint32_t>(j)};
      }
    }
  }
  auto by_offset = [](const Range& a, const Range& b) {
    return a.offset < b.offset;
  };
  for (size_t f = 0; f < m.files.size(); ++f) {
    const auto first = ranges.begin() + static_cast<ptrdiff_t>(per_file[f]);
    const auto last = ranges.begin() + static_cast<ptrdiff_t>(per_file[f + 1]);
    if (!std::is_sorted(first, last, by_offset)) {
      std::sort(first, last, by_offset);
    }
    for (auto b = first; b != last && b + 1 != last; ++b) {
      const Range& x = *b;
      const Range& y = *(b + 1);
      if (y.offset < x.offset + x.length) {
        const TensorRef& ta = m.tensors[x.tensor];
        const TensorRef& tb = m.tensors[y.tensor];
        return fail("bytes of two chunks overlap in " + m.files[f].name +
                    " at offset " + std::to_string(y.offset) + ": tensor " +
                    Quote(ta.path) + " " + ChunkName(ta, x.chunk, m) +
                    " and tensor " + Quote(tb.path) + " " +
                    ChunkName(tb, y.chunk, m));
      }
    }
  }
  // M14: metadata and producer.
  for (size_t i = 0; i < m.metadata.size(); ++i) {
    const auto& [k, v] = m.metadata[i];
    if (Utf8Problem(k) || Utf8Problem(v)) {
      return fail("metadata " + std::to_string(i) + " is not valid UTF-8");
    }
    if (i > 0 && !(m.metadata[i - 1].first < k)) {
      return fail("metadata keys are not sorted with no repeats at " +
                  Quote(k));
    }
  }
  if (Utf8Problem(m.producer)) return fail("producer is not valid UTF-8");
  return Status::OK();
}

Status CheckManifest(const Manifest& m, const std::string& name) {
  // (A table holds boxes of their tensor's rank: one of another rank is
  // refused here, as M10/M11 would refuse it in a manifest's bytes.)
  for (const GlobalTensorInfo& g : m.tensors) {
    for (size_t i = 0; i < g.chunks.size(); ++i) {
      const Box& b = g.chunks[i].box;
      if (b.offsets.size() != g.shape.size() ||
          b.sizes.size() != g.shape.size()) {
        return Corrupt("chunk " + std::to_string(i) + ": " +
                       *BoxProblem(b, g.shape))
            .WithFile(name)
            .WithTensor(g.path);
      }
    }
  }
  const TensorTable table = TensorTable::Of(m);
  const std::vector<TensorRef> refs = table.Refs();
  return CheckManifest(RefOf(m, refs), name);
}

// ---- codec -------------------------------------------------------------

namespace {

template <typename T>
Offset<flatbuffers::Vector<T>> Column(FlatBufferBuilder& b, const T* p,
                                      size_t n) {
  return b.CreateVector(p, n);
}

// A GlobalTensor table from arrays: `offsets` and `sizes` hold every
// chunk's box in turn (whatever their rank: tests write bad ones).
Offset<fbm::GlobalTensor> BuildTensor(FlatBufferBuilder& b,
                                      std::string_view path, uint8_t dtype,
                                      std::span<const int64_t> shape,
                                      std::span<const int64_t> offsets,
                                      std::span<const int64_t> sizes,
                                      std::span<const ByteRun> data) {
  auto p = b.CreateString(path.data(), path.size());
  auto sh = Column(b, shape.data(), shape.size());
  auto o = Column(b, offsets.data(), offsets.size());
  auto z = Column(b, sizes.data(), sizes.size());
  auto d = b.CreateVectorOfStructs(
      reinterpret_cast<const fbm::ByteRange*>(data.data()), data.size());
  return fbm::CreateGlobalTensor(b, p, dtype, sh, o, z, d);
}

Offset<fbm::GlobalTensor> BuildTensor(FlatBufferBuilder& b,
                                      const TensorRef& t) {
  const size_t coords = t.chunks * t.ndim();
  return BuildTensor(b, t.path, t.dtype, t.shape, {t.offsets, coords},
                     {t.sizes, coords}, {t.data, t.chunks});
}

Offset<fbm::ShardFile> BuildFile(FlatBufferBuilder& b, const ShardFileInfo& f) {
  auto n = b.CreateString(f.name);
  return fbm::CreateShardFile(b, n, f.size, f.header_xxh3, f.rank);
}

Offset<fbm::StatusMsg> BuildStatus(FlatBufferBuilder& b, const Status& s) {
  if (s.ok()) return fbm::CreateStatusMsg(b);
  auto msg = b.CreateString(s.message());
  auto file = b.CreateString(s.file());
  auto tensor = b.CreateString(s.tensor());
  return fbm::CreateStatusMsg(b, static_cast<int32_t>(s.code()), s.sys_errno(),
                              msg, file, s.offset(), tensor, s.has_tensor());
}

Status ReadStatus(const fbm::StatusMsg* m) {
  if (!m || m->code() == 0) return Status::OK();
  int code = m->code();
  ErrorCode ec =
      code > 0 && code <= static_cast<int>(ErrorCode::kResourceExhausted)
          ? static_cast<ErrorCode>(code)
          : ErrorCode::kIoError;
  Status s(ec, m->message() ? m->message()->str() : "(no message)");
  if (m->file() && m->file()->size()) s = s.WithFile(m->file()->str());
  if (m->offset() >= 0) s = s.WithOffset(m->offset());
  if (m->has_tensor()) s = s.WithTensor(m->tensor() ? m->tensor()->str() : "");
  if (m->sys_errno()) s = s.WithErrno(m->sys_errno());
  return s;
}

std::vector<std::byte> Bytes(const FlatBufferBuilder& b) {
  const auto* p = reinterpret_cast<const std::byte*>(b.GetBufferPointer());
  return {p, p + b.GetSize()};
}

std::string Str(const flatbuffers::String* s) { return s ? s->str() : ""; }

std::string_view View(const flatbuffers::String* s) {
  return s ? std::string_view(s->c_str(), s->size()) : std::string_view();
}

// `bytes` as 8-aligned memory for the Verifier's alignment checks: the
// bytes themselves when they are, else a copy kept in `copy`.
const uint8_t* Aligned(std::span<const std::byte> bytes,
                       std::vector<uint64_t>* copy) {
  const auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  if (reinterpret_cast<uintptr_t>(data) % 8 == 0) return data;
  copy->resize((bytes.size() + 7) / 8);
  std::memcpy(copy->data(), bytes.data(), bytes.size());
  return reinterpret_cast<const uint8_t*>(copy->data());
}

// A vector's 8-byte elements must be 8-aligned to be read as such (the
// Verifier checks only the 4-byte length prefix; FORMAT.md R10 likewise).
template <typename T>
bool Misaligned(const flatbuffers::Vector<T>* v) {
  return v && v->size() > 0 &&
         reinterpret_cast<uintptr_t>(v->data()) % alignof(int64_t) != 0;
}

template <typename T>
bool ZeroElement(const flatbuffers::Vector<flatbuffers::Offset<T>>* v) {
  if (!v) return false;
  const auto* raw = reinterpret_cast<const uint8_t*>(v->Data());
  for (flatbuffers::uoffset_t i = 0; i < v->size(); ++i) {
    if (flatbuffers::ReadScalar<flatbuffers::uoffset_t>(raw + 4 * i) == 0)
      return true;
  }
  return false;
}

template <typename T>
size_t Size(const flatbuffers::Vector<T>* v) {
  return v ? v->size() : 0;
}
template <typename T>
const T* Data(const flatbuffers::Vector<T>* v) {
  return v && v->size() ? v->data() : nullptr;
}
const ByteRun* Runs(const flatbuffers::Vector<const fbm::ByteRange*>* v) {
  return v && v->size() ? reinterpret_cast<const ByteRun*>(v->Data()) : nullptr;
}

// Views one GlobalTensor table (already verified); only the array shapes
// are checked here (M10), the rest by CheckTensor.
Result<TensorRef> RefOf(const fbm::GlobalTensor* t) {
  TensorRef r;
  r.path = View(t->path());
  r.dtype = t->dtype();
  if (Misaligned(t->shape()) || Misaligned(t->chunk_offsets()) ||
      Misaligned(t->chunk_sizes()) || Misaligned(t->chunk_data())) {
    return Corrupt("8-byte elements that are not 8-aligned")
        .WithTensor(std::string(r.path));
  }
  r.shape = {Data(t->shape()), Size(t->shape())};
  const size_t ndim = r.shape.size();
  const size_t n = Size(t->chunk_data());
  const size_t no = Size(t->chunk_offsets());
  const size_t ns = Size(t->chunk_sizes());
  // M10: n_chunks x ndim offsets and sizes.
  if (no != ns || (ndim == 0 ? no != 0 : no != n * ndim)) {
    return Corrupt(std::to_string(n) + " chunks of a " + std::to_string(ndim) +
                   "-d tensor but " + std::to_string(no) + " offsets and " +
                   std::to_string(ns) + " sizes")
        .WithTensor(std::string(r.path));
  }
  r.chunks = n;
  r.offsets = Data(t->chunk_offsets());
  r.sizes = Data(t->chunk_sizes());
  r.data = Runs(t->chunk_data());
  return r;
}

flatbuffers::Verifier::Options VerifierOptions(size_t size) {
  flatbuffers::Verifier::Options o;
  o.max_depth = 8;  // Manifest > vector > table > vector
  o.max_tables = static_cast<flatbuffers::uoffset_t>(
      std::min<size_t>(size / 4 + 16, std::numeric_limits<uint32_t>::max()));
  o.check_alignment = true;
  return o;
}

}  // namespace

Result<std::vector<std::byte>> EncodeManifest(const Manifest& m) {
  Status bad = CheckManifest(m, "manifest");
  if (!bad.ok()) return InvalidArgument(bad.ToString());
  Manifest now = m;  // written as the version this library writes
  now.version_major = kManifestMajor;
  now.version_minor = kManifestMinor;
  return SerializeManifest(now);
}

namespace {

// The manifest's bytes around `n` tensors that tensor(b, i) builds.
template <class F>
std::vector<std::byte> Serialize(const ManifestRef& m, size_t n,
                                 size_t estimate, F&& tensor) {
  FlatBufferBuilder b(estimate);
  std::vector<Offset<fbm::ShardFile>> files;
  for (const auto& f : m.files) files.push_back(BuildFile(b, f));
  std::vector<Offset<fbm::GlobalTensor>> tensors;
  tensors.reserve(n);
  for (size_t i = 0; i < n; ++i) tensors.push_back(tensor(b, i));
  std::vector<Offset<fbm::KeyValue>> meta;
  for (const auto& [k, v] : m.metadata) {
    auto ko = b.CreateString(k);
    auto vo = b.CreateString(v);
    meta.push_back(fbm::CreateKeyValue(b, ko, vo));
  }
  auto fo = b.CreateVector(files);
  auto to = b.CreateVector(tensors);
  auto mo = b.CreateVector(meta);
  auto po = b.CreateString(m.producer.data(), m.producer.size());
  auto root = fbm::CreateManifest(b, m.version_major, m.version_minor,
                                  m.world_size, m.globals_file, fo, to, mo, po);
  fbm::FinishManifestBuffer(b, root);
  return SealManifest(
      {reinterpret_cast<const std::byte*>(b.GetBufferPointer()), b.GetSize()},
      m.version_major, m.version_minor);
}

}  // namespace

std::vector<std::byte> SerializeManifest(const ManifestRef& m) {
  size_t estimate = 1024;
  for (const TensorRef& t : m.tensors) {
    estimate += 64 + t.path.size() + 8 * t.ndim() +
                t.chunks * (16 * t.ndim() + sizeof(ByteRun));
  }
  return Serialize(m, m.tensors.size(), estimate,
                   [&](FlatBufferBuilder& b, size_t i) {
                     return BuildTensor(b, m.tensors[i]);
                   });
}

std::vector<std::byte> SerializeManifest(const Manifest& m) {
  // The boxes as they are, of whatever rank (not through a TensorTable,
  // which holds boxes of their tensor's rank only).
  std::vector<int64_t> offsets, sizes;
  std::vector<ByteRun> data;
  return Serialize(
      RefOf(m, {}), m.tensors.size(), 1024,
      [&](FlatBufferBuilder& b, size_t i) {
        const GlobalTensorInfo& g = m.tensors[i];
        offsets.clear();
        sizes.clear();
        data.clear();
        for (const ChunkInfo& c : g.chunks) {
          offsets.insert(offsets.end(), c.box.offsets.begin(),
                         c.box.offsets.end());
          sizes.insert(sizes.end(), c.box.sizes.begin(), c.box.sizes.end());
          data.push_back({c.file, 0, c.offset, c.length});
        }
        return BuildTensor(b, g.path, static_cast<uint8_t>(g.dtype), g.shape,
                           offsets, sizes, data);
      });
}

std::vector<std::byte> SealManifest(std::span<const std::byte> fb,
                                    uint16_t major, uint16_t minor) {
  std::vector<std::byte> out(kManifestPreambleBytes + fb.size());
  std::memcpy(out.data() + kManifestPreambleBytes, fb.data(), fb.size());
  std::byte* p = out.data();
  std::memcpy(p, kManifestMagic.data(), 8);
  StoreLE(p + 8, major, 2);
  StoreLE(p + 10, minor, 2);
  StoreLE(p + 12, 0, 4);  // flags
  StoreLE(p + 16, fb.size(), 8);
  StoreLE(p + 24, Xxh3(fb), 8);
  StoreLE(p + 32, 0, 8);  // reserved
  StoreLE(p + 40, Xxh3({p, 40}), 8);
  return out;
}

Result<Manifest> DecodeManifest(std::span<const std::byte> bytes,
                                const std::string& name) {
  const std::byte* p = bytes.data();
  // M1: size and magic.
  if (bytes.size() < kManifestPreambleBytes) {
    return At(Corrupt("manifest is " + std::to_string(bytes.size()) +
                      " bytes, shorter than its 48-byte preamble"),
              name, 0);
  }
  if (std::memcmp(p, kManifestMagic.data(), 8) != 0) {
    return At(Corrupt("bad magic: not a ckpt manifest"), name, 0);
  }
  // M2: the preamble checksum, before any other field is trusted.
  uint64_t stored = LoadLE(p + 40, 8);
  uint64_t computed = Xxh3({p, 40});
  if (stored != computed) {
    return At(ChecksumMismatch("manifest preamble checksum mismatch: stored " +
                               HashToHex(stored) + ", computed " +
                               HashToHex(computed)),
              name, 40);
  }
  // M3: versions, flags, reserved bytes.
  const auto major = static_cast<uint16_t>(LoadLE(p + 8, 2));
  const auto minor = static_cast<uint16_t>(LoadLE(p + 10, 2));
  if (major != kManifestMajor) {
    return At(UnsupportedVersion("manifest version " + std::to_string(major) +
                                 "." + std::to_string(minor) +
                                 "; this reader knows version " +
                                 std::to_string(kManifestMajor) + ".x"),
              name, 8);
  }
  if (LoadLE(p + 12, 4) != 0) {
    return At(UnsupportedVersion("unknown manifest flags " +
                                 std::to_string(LoadLE(p + 12, 4))),
              name, 12);
  }
  if (LoadLE(p + 32, 8) != 0) {
    return At(Corrupt("reserved preamble bytes are not zero"), name, 32);
  }
  // M4: the FlatBuffers bytes fill the rest of the file exactly.
  const uint64_t size = LoadLE(p + 16, 8);
  if (size != bytes.size() - kManifestPreambleBytes ||
      size > kMaxManifestBytes) {
    return At(Corrupt("manifest says " + std::to_string(size) +
                      " bytes follow its preamble; the file has " +
                      std::to_string(bytes.size() - kManifestPreambleBytes)),
              name, 16);
  }
  auto body = bytes.subspan(kManifestPreambleBytes);
  // M5: the checksum of the FlatBuffers bytes.
  stored = LoadLE(p + 24, 8);
  computed = Xxh3(body);
  if (stored != computed) {
    return At(ChecksumMismatch("manifest checksum mismatch: stored " +
                               HashToHex(stored) + ", computed " +
                               HashToHex(computed)),
              name, static_cast<int64_t>(kManifestPreambleBytes));
  }
  // M6: FlatBuffers structure. The body must be 8-aligned in memory for
  // the alignment checks to mean anything; copy it if it is not.
  std::vector<uint64_t> aligned;
  const uint8_t* data = Aligned(body, &aligned);
  flatbuffers::Verifier v(data, body.size(), VerifierOptions(body.size()));
  const int64_t body_at = static_cast<int64_t>(kManifestPreambleBytes);
  if (!fbm::ManifestBufferHasIdentifier(data) ||
      !fbm::VerifyManifestBuffer(v)) {
    return At(Corrupt("manifest fails FlatBuffers verification (wrong "
                      "identifier, bad offsets or bad alignment)"),
              name, body_at);
  }
  const fbm::Manifest* fm = fbm::GetManifest(data);
  if (ZeroElement(fm->files()) || ZeroElement(fm->tensors()) ||
      ZeroElement(fm->metadata())) {
    return At(Corrupt("a table vector holds a zero offset"), name, body_at);
  }
  if (fm->version_major() != major || fm->version_minor() != minor) {
    return At(Corrupt("the manifest's version fields disagree with its "
                      "preamble"),
              name, body_at);
  }
  Manifest m;
  m.version_major = major;
  m.version_minor = minor;
  m.world_size = fm->world_size();
  m.globals_file = fm->globals_file();
  m.producer = Str(fm->producer());
  if (const auto* files = fm->files()) {
    m.files.reserve(files->size());
    for (const fbm::ShardFile* f : *files) {
      m.files.push_back(
          {Str(f->name()), f->size(), f->header_xxh3(), f->rank()});
    }
  }
  if (const auto* meta = fm->metadata()) {
    for (const fbm::KeyValue* kv : *meta) {
      m.metadata.emplace_back(Str(kv->key()), Str(kv->value()));
    }
  }
  // The rules run on views of the verified buffer; the public structs are
  // built once it passed.
  std::vector<TensorRef> refs;
  if (const auto* tensors = fm->tensors()) {
    refs.reserve(tensors->size());
    for (const fbm::GlobalTensor* t : *tensors) {
      Result<TensorRef> r = RefOf(t);
      if (!r.ok()) return At(r.status(), name, body_at);
      refs.push_back(*r);
    }
  }
  CKPT_RETURN_IF_ERROR(CheckManifest(RefOf(m, refs), name));
  m.tensors.reserve(refs.size());
  for (const TensorRef& t : refs) m.tensors.push_back(InfoOf(t));
  return m;
}

// ---- messages ----------------------------------------------------------

std::vector<std::byte> EncodeStatus(const Status& s) {
  FlatBufferBuilder b(256);
  b.Finish(BuildStatus(b, s));
  return Bytes(b);
}

Status DecodeStatus(std::span<const std::byte> bytes) {
  std::vector<uint64_t> aligned;
  const uint8_t* data = Aligned(bytes, &aligned);
  flatbuffers::Verifier v(data, bytes.size(), VerifierOptions(bytes.size()));
  if (bytes.size() < 8 || !v.VerifyBuffer<fbm::StatusMsg>(nullptr)) {
    return IoError("a rank sent a status message that does not decode");
  }
  return ReadStatus(flatbuffers::GetRoot<fbm::StatusMsg>(data));
}

std::vector<std::byte> EncodeReport(const ReportHead& h, const TensorTable& t) {
  FlatBufferBuilder b(1024 + t.paths_.size() + 24 * t.size() +
                      16 * t.offsets_.size() + sizeof(ByteRun) * t.chunks());
  auto st = BuildStatus(b, h.status);
  auto file = BuildFile(b, h.file);
  auto paths = b.CreateVector(reinterpret_cast<const uint8_t*>(t.paths_.data()),
                              t.paths_.size());
  auto path_ends = b.CreateVector(t.path_end_);
  auto dtypes = b.CreateVector(t.dtypes_);
  auto dim_ends = b.CreateVector(t.dim_end_);
  auto dims = b.CreateVector(t.dims_);
  auto chunk_ends = b.CreateVector(t.chunk_end_);
  auto offs = b.CreateVector(t.offsets_);
  auto sizes = b.CreateVector(t.sizes_);
  auto data = b.CreateVectorOfStructs(
      reinterpret_cast<const fbm::ByteRange*>(t.data_.data()), t.chunks());
  auto cols = fbm::CreateTensorColumns(b, paths, path_ends, dtypes, dim_ends,
                                       dims, chunk_ends, offs, sizes, data);
  auto dir = b.CreateString(h.dir);
  fbm::RankReportBuilder rb(b);
  rb.add_rank(h.rank);
  rb.add_world_size(h.world_size);
  rb.add_status(st);
  rb.add_file(file);
  rb.add_has_globals(h.has_globals);
  rb.add_dir(dir);
  rb.add_columns(cols);
  b.Finish(rb.Finish());
  return Bytes(b);
}

Result<DecodedReport> DecodeReport(std::vector<std::byte> bytes,
                                   uint32_t rank) {
  auto bad = [&](const std::string& what) {
    return Corrupt("rank " + std::to_string(rank) + "'s commit report " + what);
  };
  DecodedReport out;
  out.bytes = std::move(bytes);
  const uint8_t* data = Aligned(out.bytes, &out.aligned);
  const size_t size = out.bytes.size();
  flatbuffers::Verifier v(data, size, VerifierOptions(size));
  if (size < 8 || !v.VerifyBuffer<fbm::RankReport>(nullptr)) {
    return bad("does not decode");
  }
  const auto* fr = flatbuffers::GetRoot<fbm::RankReport>(data);
  ReportHead& h = out.head;
  h.rank = fr->rank();
  h.world_size = fr->world_size();
  h.status = ReadStatus(fr->status());
  h.has_globals = fr->has_globals();
  h.dir = Str(fr->dir());
  if (const auto* f = fr->file()) {
    h.file = {Str(f->name()), f->size(), f->header_xxh3(), f->rank()};
  }
  if (h.rank != rank) return bad("says rank " + std::to_string(h.rank));
  const fbm::TensorColumns* c = fr->columns();
  if (!c) {
    // (Every report this library encodes has columns, empty ones for a
    // rank that failed: one without them that says OK is not a report.)
    if (!h.status.ok()) return out;
    return bad("has no tensor columns");
  }
  if (Misaligned(c->dims()) || Misaligned(c->chunk_offsets()) ||
      Misaligned(c->chunk_sizes()) || Misaligned(c->chunk_data())) {
    return bad("holds 8-byte elements that are not 8-aligned");
  }
  // The columns must add up: one entry per tensor in each, ends that
  // never decrease and end at their column's size.
  const size_t n = Size(c->path_ends());
  if (Size(c->dtypes()) != n || Size(c->dim_ends()) != n ||
      Size(c->chunk_ends()) != n) {
    return bad("has columns of different lengths");
  }
  auto ends_ok = [&](const flatbuffers::Vector<uint32_t>* ends, size_t total) {
    if (!ends) return total == 0;
    uint32_t last = 0;
    for (uint32_t e : *ends) {
      if (e < last) return false;
      last = e;
    }
    return last == total;
  };
  const size_t nchunks = Size(c->chunk_data());
  if (!ends_ok(c->path_ends(), Size(c->path_bytes())) ||
      !ends_ok(c->dim_ends(), Size(c->dims())) ||
      !ends_ok(c->chunk_ends(), nchunks)) {
    return bad("has ends that do not add up to its columns");
  }
  const char* paths = reinterpret_cast<const char*>(Data(c->path_bytes()));
  const int64_t* dims = Data(c->dims());
  const int64_t* offs = Data(c->chunk_offsets());
  const int64_t* sizes = Data(c->chunk_sizes());
  const ByteRun* runs = Runs(c->chunk_data());
  const uint64_t ncoords = Size(c->chunk_offsets());
  if (Size(c->chunk_sizes()) != ncoords) {
    return bad("has " + std::to_string(ncoords) + " offsets but " +
               std::to_string(Size(c->chunk_sizes())) + " sizes");
  }
  out.tensors.reserve(n);
  uint32_t p0 = 0, d0 = 0, c0 = 0;
  uint64_t k0 = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t p1 = c->path_ends()->Get(static_cast<uint32_t>(i));
    const uint32_t d1 = c->dim_ends()->Get(static_cast<uint32_t>(i));
    const uint32_t c1 = c->chunk_ends()->Get(static_cast<uint32_t>(i));
    TensorRef t;
    t.path = std::string_view(paths ? paths + p0 : "", p1 - p0);
    t.dtype = c->dtypes()->Get(static_cast<uint32_t>(i));
    t.shape = std::span<const int64_t>(dims ? dims + d0 : nullptr, d1 - d0);
    t.chunks = c1 - c0;
    const uint64_t k1 = k0 + uint64_t{t.chunks} * t.ndim();
    if (k1 > ncoords) return bad("has fewer box coordinates than its chunks");
    t.offsets = offs ? offs + k0 : nullptr;
    t.sizes = sizes ? sizes + k0 : nullptr;
    t.data = runs ? runs + c0 : nullptr;
    out.tensors.push_back(t);
    p0 = p1;
    d0 = d1;
    c0 = c1;
    k0 = k1;
  }
  if (k0 != ncoords) return bad("has more box coordinates than its chunks");
  return out;
}

std::vector<std::byte> EncodeOutcome(const Result<CommitInfo>& r) {
  FlatBufferBuilder b(256);
  auto st = BuildStatus(b, r.status());
  if (r.ok()) {
    b.Finish(fbm::CreateOutcome(b, st, r->total_bytes, r->files, r->tensors,
                                r->chunks));
  } else {
    b.Finish(fbm::CreateOutcome(b, st));
  }
  return Bytes(b);
}

Result<CommitInfo> DecodeOutcome(std::span<const std::byte> bytes,
                                 const std::string& dir) {
  std::vector<uint64_t> aligned;
  const uint8_t* data = Aligned(bytes, &aligned);
  flatbuffers::Verifier v(data, bytes.size(), VerifierOptions(bytes.size()));
  if (bytes.size() < 8 || !v.VerifyBuffer<fbm::Outcome>(nullptr)) {
    return IoError("the coordinator's commit outcome does not decode")
        .WithFile(dir);
  }
  const auto* o = flatbuffers::GetRoot<fbm::Outcome>(data);
  Status s = ReadStatus(o->status());
  if (!s.ok()) return s;
  CommitInfo info;
  info.path = dir;
  info.total_bytes = o->total_bytes();
  info.files = o->files();
  info.tensors = o->tensors();
  info.chunks = o->chunks();
  return info;
}

}  // namespace ckpt::dist::internal
