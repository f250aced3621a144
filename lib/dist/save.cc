// Saving a sharded checkpoint: shard files (ShardPath, AddChunk,
// SetShardRoot), the commit (CommitSave: reports, checks, manifest, one
// rename), and Save over both. docs/SHARDED.md 6 is the protocol.
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <system_error>
#include <unordered_map>
#include <vector>

#include "atomic_file.h"
#include "checksum_internal.h"
#include "ckpt/dist.h"
#include "ckpt/reader.h"
#include "ckpt/writer.h"
#include "dist/manifest_internal.h"

namespace ckpt::dist {

namespace fs = std::filesystem;

namespace internal {

namespace {
std::atomic<FaultHook> g_fault_hook{nullptr};
}  // namespace

void SetFaultHook(FaultHook hook) { g_fault_hook.store(hook); }
void Fault(const char* phase, int rank) {
  if (FaultHook h = g_fault_hook.load()) h(phase, rank);
}

std::string ShardName(int rank, int world_size) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "shard-%05d-of-%05d.ckpt", rank, world_size);
  return buf;
}

Result<std::string> TempDirOf(const std::string& dir) {
  fs::path d(dir);
  if (!d.empty() && d.filename().empty()) d = d.parent_path();  // "a/b/"
  const std::string name = d.filename().string();
  if (name.empty() || name == "." || name == "..") {
    return InvalidArgument("a sharded checkpoint needs a directory name: '" +
                           dir + "'");
  }
  fs::path parent = d.parent_path();
  if (parent.empty()) parent = ".";
  return (parent / ("." + name + ".tmp")).string();
}

}  // namespace internal

namespace {

using internal::ShardName;
using internal::TempDirOf;

Status SyncDir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("open directory " + dir, errno).WithFile(dir);
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) return ErrnoError("fsync directory " + dir, err).WithFile(dir);
  return Status::OK();
}

std::string ParentOf(const std::string& dir) {
  fs::path d(dir);
  if (!d.empty() && d.filename().empty()) d = d.parent_path();
  fs::path parent = d.parent_path();
  return parent.empty() ? "." : parent.string();
}

std::string CleanDir(const std::string& dir) {
  fs::path d(dir);
  if (!d.empty() && d.filename().empty()) d = d.parent_path();
  return d.string();
}

// An empty directory at the target (made ahead of the save, as DCP's users
// do) holds nothing to lose: a plain rename replaces it atomically.
bool IsEmptyDir(const std::string& path) {
  std::error_code ec;
  return fs::is_directory(fs::symlink_status(path, ec)) &&
         fs::is_empty(path, ec) && !ec;
}

Status CheckRank(int rank, int world_size) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return InvalidArgument("rank " + std::to_string(rank) +
                           " is not in a group of " +
                           std::to_string(world_size));
  }
  return Status::OK();
}

}  // namespace

// ---- shard files -------------------------------------------------------

std::optional<Box> ReplicaPart(std::string_view path, const Box& box,
                               uint32_t index, uint32_t count) {
  if (count == 0 || index >= count) return std::nullopt;
  if (box.ndim() == 0) {
    const uint64_t h = ckpt::internal::Xxh3(std::as_bytes(std::span(path)));
    if (h % count != index) return std::nullopt;
    return box;
  }
  if (box.numel() == 0) {
    // Nothing to split: replica 0 declares the (empty) chunk.
    if (index != 0) return std::nullopt;
    return box;
  }
  const auto rows = static_cast<uint64_t>(box.sizes[0]);
  const uint64_t base = rows / count, extra = rows % count;
  const uint64_t begin = index * base + std::min<uint64_t>(index, extra);
  const uint64_t len = base + (index < extra ? 1 : 0);
  if (len == 0) return std::nullopt;
  Box part = box;
  part.offsets[0] += static_cast<int64_t>(begin);
  part.sizes[0] = static_cast<int64_t>(len);
  return part;
}

Result<std::string> ShardPath(const std::string& dir, int rank,
                              int world_size) {
  CKPT_RETURN_IF_ERROR(CheckRank(rank, world_size));
  CKPT_ASSIGN_OR_RETURN(std::string temp, TempDirOf(dir));
  std::error_code ec;
  fs::create_directories(ParentOf(dir), ec);
  if (ec) {
    return ErrnoError("create directory " + ParentOf(dir), ec.value())
        .WithFile(ParentOf(dir));
  }
  if (::mkdir(temp.c_str(), 0777) != 0 && errno != EEXIST) {
    return ErrnoError("create directory " + temp, errno).WithFile(temp);
  }
  struct stat st {};
  if (::stat(temp.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return IoError(temp + " exists and is not a directory").WithFile(temp);
  }
  return (fs::path(temp) / ShardName(rank, world_size)).string();
}

// ---- the record of a shard being written ---------------------------------

namespace {
// Both paths name one existing file (by device and inode).
bool SameFile(const std::string& a, const std::string& b) {
  struct stat sa {
  }, sb{};
  return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 &&
         sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}
}  // namespace

// A rank's chunks in the order its shard adds them, grouped by tensor
// and sorted into a TensorTable (tensors by path, each tensor's chunks by
// box) once their byte offsets are known: what the rank reports.
class ReportBuilder {
 public:
  // False when `path` was added before with another dtype or shape.
  bool Agrees(std::string_view path, DType dtype,
              std::span<const int64_t> shape) const {
    auto it = by_path_.find(std::string(path));
    if (it == by_path_.end()) return true;
    const Tensor& t = tensors_[it->second];
    return t.dtype == dtype && std::equal(shape.begin(), shape.end(),
                                          t.shape.begin(), t.shape.end());
  }
  // The same check and a box of the shape's rank, then the chunk
  // (`where`: a StorageId or an offset). False when either fails.
  bool Add(std::string_view path, DType dtype, std::span<const int64_t> shape,
           const Box& box, uint64_t where, uint64_t length) {
    if (box.offsets.size() != shape.size() || box.sizes.size() != shape.size())
      return false;
    if (!Agrees(path, dtype, shape)) return false;
    auto [it, fresh] =
        by_path_.try_emplace(std::string(path), uint32_t(tensors_.size()));
    if (fresh) tensors_.push_back({dtype, {shape.begin(), shape.end()}});
    chunks_.push_back({it->second, coords_.size(), where, length});
    coords_.insert(coords_.end(), box.offsets.begin(), box.offsets.end());
    coords_.insert(coords_.end(), box.sizes.begin(), box.sizes.end());
    return true;
  }
  size_t chunks() const { return chunks_.size(); }

  // The table, each chunk's `where` mapped to its byte offset by
  // offset_of (identity when it already is one). Clears the builder.
  template <class F>
  Result<internal::TensorTable> Build(F&& offset_of) {
    std::vector<std::pair<std::string_view, uint32_t>> order;
    order.reserve(by_path_.size());
    for (const auto& [path, i] : by_path_) order.emplace_back(path, i);
    std::sort(order.begin(), order.end());
    // Chunks grouped by tensor, in the order they were added.
    std::vector<size_t> first(tensors_.size() + 1, 0), grouped(chunks_.size());
    for (const auto& c : chunks_) ++first[c.tensor + 1];
    for (size_t i = 1; i < first.size(); ++i) first[i] += first[i - 1];
    {
      std::vector<size_t> at(first.begin(), first.end() - 1);
      for (size_t c = 0; c < chunks_.size(); ++c)
        grouped[at[chunks_[c].tensor]++] = c;
    }
    internal::TensorTable t;
    size_t path_bytes = 0;
    for (const auto& [path, i] : order) path_bytes += path.size();
    t.Reserve(order.size(), chunks_.size(), coords_.size() / 2, path_bytes);
    for (const auto& [path, i] : order) {
      const Tensor& g = tensors_[i];
      const size_t nd = g.shape.size();
      t.AddTensor(path, static_cast<uint8_t>(g.dtype), g.shape);
      for (size_t k = first[i]; k < first[i + 1]; ++k) {
        const Pending& c = chunks_[grouped[k]];
        CKPT_ASSIGN_OR_RETURN(uint64_t offset, offset_of(c.where));
        const std::span<const int64_t> box(coords_.data() + c.coord, 2 * nd);
        t.AddChunk(box.first(nd), box.last(nd),
                   internal::ByteRun{0, 0, offset, c.length});
      }
      t.SortLastChunks();
    }
    *this = ReportBuilder();
    return t;
  }

 private:
  struct Tensor {
    DType dtype;
    std::vector<int64_t> shape;
  };
  struct Pending {
    uint32_t tensor;
    size_t coord;    // offsets then sizes at coords_[coord, +2 ndim)
    uint64_t where;  // a StorageId or a byte offset
    uint64_t length;
  };
  std::unordered_map<std::string, uint32_t> by_path_;
  std::vector<Tensor> tensors_;
  std::vector<Pending> chunks_;
  std::vector<int64_t> coords_;
};

struct ShardRecord::Impl {
  ReportBuilder pending;          // until Seal
  internal::ReportHead head;      // rank, world, file pin (at Seal), globals
  internal::TensorTable tensors;  // at Seal
  std::string path;               // the shard file's, from its writer at Seal
  bool rooted = false;
  bool sealed = false;
};

struct ShardRecordAccess {
  using Impl = ShardRecord::Impl;
  static Impl& Of(ShardRecord& r) { return *r.impl_; }
  static const Impl& Of(const ShardRecord& r) { return *r.impl_; }
};

ShardRecord::ShardRecord() : impl_(std::make_unique<Impl>()) {}
ShardRecord::ShardRecord(ShardRecord&&) noexcept = default;
ShardRecord& ShardRecord::operator=(ShardRecord&&) noexcept = default;
ShardRecord::~ShardRecord() = default;
bool ShardRecord::sealed() const { return impl_ && impl_->sealed; }

Status ShardRecord::Seal(const Writer& w) {
  if (!impl_ || !impl_->rooted) {
    return InvalidArgument("ShardRecord::Seal before SetShardRoot recorded it");
  }
  if (impl_->sealed) {
    return InvalidArgument("ShardRecord::Seal: the record is already sealed");
  }
  auto done = w.committed();
  if (!done) return InvalidArgument("ShardRecord::Seal before Writer::Commit");
  CKPT_ASSIGN_OR_RETURN(impl_->tensors, impl_->pending.Build([&](uint64_t id) {
    return w.StorageOffset(static_cast<StorageId>(id));
  }));
  impl_->head.file.size = done->file_size;
  impl_->head.file.header_xxh3 = done->header_xxh3;
  impl_->path = w.path();
  impl_->sealed = true;
  return Status::OK();
}

Result<std::vector<std::byte>> ShardRecord::Serialize() const {
  if (!sealed())
    return InvalidArgument("ShardRecord::Serialize of an unsealed record");
  return internal::EncodeReport(impl_->head, impl_->tensors);
}

Result<ShardRecord> ShardRecord::Deserialize(std::span<const std::byte> bytes,
                                             int rank) {
  if (rank < 0) return InvalidArgument("rank " + std::to_string(rank));
  CKPT_ASSIGN_OR_RETURN(internal::DecodedReport r,
                        internal::DecodeReport({bytes.begin(), bytes.end()},
                                               static_cast<uint32_t>(rank)));
  ShardRecord out;
  out.impl_->head = std::move(r.head);
  internal::TensorTable& t = out.impl_->tensors;
  for (const internal::TensorRef& ref : r.tensors) {
    t.AddTensor(ref.path, ref.dtype, ref.shape);
    t.AddChunksOf(ref, 0, /*drop_empty=*/false);
  }
  out.impl_->rooted = out.impl_->sealed = true;
  return out;
}

Result<std::optional<NodeId>> AddChunk(Writer& w, const Chunk& c,
                                       ShardRecord* record) {
  auto bad = [&](const std::string& what) {
    return InvalidArgument("chunk of '" + c.path + "': " + what)
        .WithTensor(c.path);
  };
  const size_t elem = DTypeSize(c.dtype);
  if (elem == 0) return bad("unknown dtype");
  if (auto p = BoxProblem(c.box, c.global_shape, elem)) return bad(*p);
  const uint64_t nbytes = static_cast<uint64_t>(c.box.numel()) * elem;
  if (c.data.size() != nbytes) {
    return bad("data has " + std::to_string(c.data.size()) +
               " bytes; the box " + internal::BoxString(c.box) + " needs " +
               std::to_string(nbytes));
  }
  if (c.replica_count == 0 || c.replica_index >= c.replica_count) {
    return bad("replica " + std::to_string(c.replica_index) + " of " +
               std::to_string(c.replica_count));
  }
  std::optional<Box> part =
      ReplicaPart(c.path, c.box, c.replica_index, c.replica_count);
  if (!part) return std::optional<NodeId>();
  // The part is rows of the box: a contiguous byte range of its data.
  std::span<const std::byte> bytes = c.data;
  if (c.box.ndim() > 0 && part->numel() > 0) {
    const uint64_t row = nbytes / static_cast<uint64_t>(c.box.sizes[0]);
    const auto first =
        static_cast<uint64_t>(part->offsets[0] - c.box.offsets[0]);
    bytes = c.data.subspan(first * row,
                           static_cast<uint64_t>(part->sizes[0]) * row);
  }
  ShardRecordAccess::Impl* rec =
      record ? &ShardRecordAccess::Of(*record) : nullptr;
  if (rec && rec->rooted) return bad("added after SetShardRoot");
  if (rec && !rec->pending.Agrees(c.path, c.dtype, c.global_shape)) {
    return bad("an earlier chunk of it has another dtype or global shape");
  }
  CKPT_ASSIGN_OR_RETURN(StorageId storage, w.AddStorage(bytes));
  TensorSpec spec;
  spec.dtype = c.dtype;
  spec.shape = part->sizes;
  spec.storage = storage;
  CKPT_ASSIGN_OR_RETURN(NodeId data, w.AddTensor(spec));
  if (rec) {
    // (Checked above: a box of the shape's rank, the same dtype and shape.)
    rec->pending.Add(c.path, c.dtype, c.global_shape, *part, storage,
                     bytes.size());
  }
  auto ints = [&](const std::vector<int64_t>& v) -> Result<NodeId> {
    std::vector<NodeId> items;
    for (int64_t x : v) items.push_back(w.AddInt(x));
    return w.AddTuple(items);
  };
  CKPT_ASSIGN_OR_RETURN(NodeId shape, ints(c.global_shape));
  CKPT_ASSIGN_OR_RETURN(NodeId offsets, ints(part->offsets));
  const NodeId keys[] = {w.AddString("path"), w.AddString("shape"),
                         w.AddString("offsets"), w.AddString("data")};
  const NodeId values[] = {w.AddString(c.path), shape, offsets, data};
  CKPT_ASSIGN_OR_RETURN(NodeId dict, w.AddDict(keys, values));
  return std::optional<NodeId>(dict);
}

Result<NodeId> AddGlobalTensor(Writer& w) {
  return w.AddDict({}, {}, internal::kGlobalTensorTag);
}

Status SetShardRoot(Writer& w, std::span<const NodeId> chunks,
                    std::optional<NodeId> globals,
                    std::optional<NodeId> rank_local, int rank, int world_size,
                    ShardRecord* record) {
  CKPT_RETURN_IF_ERROR(CheckRank(rank, world_size));
  if (record) {
    ShardRecordAccess::Impl& rec = ShardRecordAccess::Of(*record);
    if (rec.rooted) {
      return InvalidArgument(
          "SetShardRoot: the record already holds a rooted shard (a record "
          "serves one shard file)");
    }
    if (rec.pending.chunks() != chunks.size()) {
      return InvalidArgument(
          "SetShardRoot: " + std::to_string(chunks.size()) +
          " chunk nodes, but the record holds " +
          std::to_string(rec.pending.chunks()) +
          " (give every chunk AddChunk returned, and only those)");
    }
    rec.head.rank = static_cast<uint32_t>(rank);
    rec.head.world_size = static_cast<uint32_t>(world_size);
    rec.head.file = {ShardName(rank, world_size), 0, 0,
                     static_cast<uint32_t>(rank)};
    rec.head.has_globals = globals.has_value();
    rec.rooted = true;
  }
  CKPT_ASSIGN_OR_RETURN(NodeId list, w.AddList(chunks));
  std::vector<NodeId> keys = {w.AddString("chunks")};
  std::vector<NodeId> values = {list};
  if (globals) {
    keys.push_back(w.AddString("globals"));
    values.push_back(*globals);
  }
  if (rank_local) {
    keys.push_back(w.AddString("rank_local"));
    values.push_back(*rank_local);
  }
  CKPT_ASSIGN_OR_RETURN(NodeId root, w.AddDict(keys, values));
  CKPT_RETURN_IF_ERROR(w.SetRoot(root));
  CKPT_RETURN_IF_ERROR(w.SetMetadata("ckpt.dist.rank", std::to_string(rank)));
  return w.SetMetadata("ckpt.dist.world_size", std::to_string(world_size));
}

// ---- commit ------------------------------------------------------------

namespace {

// Why `rec` is not the record of rank `rank` of `world`, or nullopt.
std::optional<std::string> RecordProblem(const ShardRecordAccess::Impl& rec,
                                         int rank, int world) {
  if (!rec.sealed) {
    return std::string(
        "was not sealed (ShardRecord::Seal after the Writer's Commit)");
  }
  if (rec.head.rank != static_cast<uint32_t>(rank) ||
      rec.head.world_size != static_cast<uint32_t>(world)) {
    return "is of rank " + std::to_string(rec.head.rank) + " of " +
           std::to_string(rec.head.world_size) + ", not rank " +
           std::to_string(rank) + " of " + std::to_string(world);
  }
  return std::nullopt;
}

// What a rank reports: its head and its tensors.
struct Report {
  internal::ReportHead head;
  internal::TensorTable tensors;
  std::vector<internal::TensorRef> refs;  // (CommitWritten's views)
};

// Reads back this rank's committed shard file: its pin and its chunks, as
// the tree SetShardRoot wrote says (docs/SHARDED.md 3).
Result<Report> Describe(const std::string& path, int rank, int world) {
  Report r;
  r.head.rank = static_cast<uint32_t>(rank);
  r.head.world_size = static_cast<uint32_t>(world);
  CKPT_ASSIGN_OR_RETURN(Checkpoint ck, Checkpoint::Open(path));
  auto bad = [&](const std::string& what) {
    return Corrupt("shard file: " + what).WithFile(path);
  };
  auto meta_rank = ck.Metadata("ckpt.dist.rank");
  auto meta_world = ck.Metadata("ckpt.dist.world_size");
  if (!meta_rank.ok() || !meta_world.ok() ||
      *meta_rank != std::to_string(rank) ||
      *meta_world != std::to_string(world)) {
    return bad("its metadata does not say rank " + std::to_string(rank) +
               " of " + std::to_string(world) +
               " (not written by "
               "SetShardRoot for this rank?)");
  }
  r.head.file = {fs::path(path).filename().string(), ck.file_size(),
                 ck.layout().header_xxh3, static_cast<uint32_t>(rank)};
  Value root = ck.root();
  r.head.has_globals = root.Child("globals").ok();
  CKPT_ASSIGN_OR_RETURN(Value chunks, root.Child("chunks"));
  if (chunks.kind() != ValueKind::kList) return bad("'chunks' is not a list");
  auto ints = [&](const Value& v, std::vector<int64_t>* out) {
    if (v.kind() != ValueKind::kTuple) return false;
    out->clear();
    for (size_t i = 0; i < v.size(); ++i) {
      if (v.item(i).kind() != ValueKind::kInt) return false;
      out->push_back(v.item(i).as_int());
    }
    return true;
  };
  ReportBuilder built;
  std::vector<int64_t> shape;
  Box box;
  for (size_t i = 0; i < chunks.size(); ++i) {
    Value c = chunks.item(i);
    auto p = c.Child("path");
    auto sh = c.Child("shape");
    auto offs = c.Child("offsets");
    auto data = c.Child("data");
    if (!p.ok() || p->kind() != ValueKind::kString || !sh.ok() ||
        !ints(*sh, &shape) || !offs.ok() || !ints(*offs, &box.offsets) ||
        !data.ok() || data->kind() != ValueKind::kTensor) {
      return bad("chunk " + std::to_string(i) +
                 " is not a dict of path, "
                 "shape, offsets and data");
    }
    const std::string_view tpath = p->as_string();
    CKPT_ASSIGN_OR_RETURN(TensorInfo ti, data->tensor_info());
    if (!ti.is_contiguous() || ti.shape.size() != shape.size()) {
      return bad("chunk " + std::to_string(i) + " of '" + std::string(tpath) +
                 "' is not a contiguous tensor of its rank");
    }
    if (box.offsets.size() != shape.size()) {
      return bad("chunk " + std::to_string(i) + " of '" + std::string(tpath) +
                 "' has " + std::to_string(box.offsets.size()) +
                 " offsets for a tensor of " + std::to_string(shape.size()) +
                 " dims");
    }
    CKPT_ASSIGN_OR_RETURN(StorageInfo si, ck.StorageInfoAt(ti.storage));
    box.sizes = ti.shape;
    const uint64_t offset =
        si.offset +
        static_cast<uint64_t>(ti.storage_offset) * DTypeSize(ti.dtype);
    if (!built.Add(tpath, ti.dtype, shape, box, offset, ti.nbytes())) {
      return bad("two chunks of '" + std::string(tpath) +
                 "' disagree on its dtype or global shape");
    }
  }
  CKPT_ASSIGN_OR_RETURN(r.tensors, built.Build([](uint64_t offset) {
    return Result<uint64_t>(offset);
  }));
  return r;
}

std::string Describe(const internal::TensorRef& t) {
  std::string s(DTypeName(static_cast<DType>(t.dtype)));
  s += " [";
  for (size_t d = 0; d < t.shape.size(); ++d) {
    if (d) s += ", ";
    s += std::to_string(t.shape[d]);
  }
  return s + "]";
}

// One rank's report as the coordinator reads it.
struct ReportView {
  const internal::ReportHead* head = nullptr;
  std::span<const internal::TensorRef> tensors;
};

// The ranks' tensors merged into one table sorted by path: a k-way merge
// of each report's tensors in path order (a rank's own order, sorted by
// its record: checked in O(T), sorted only if not), each tensor's chunks
// from every rank that holds some, empty ones dropped, in box order.
// O(C log W) for C chunks of W ranks, no allocation per tensor.
Result<internal::TensorTable> Merge(std::span<const ReportView> reports) {
  const size_t world = reports.size();
  std::vector<std::vector<uint32_t>> order(world);
  size_t tensors = 0, chunks = 0, coords = 0, bytes = 0;
  for (size_t r = 0; r < world; ++r) {
    const auto& ts = reports[r].tensors;
    auto& ord = order[r];
    ord.resize(ts.size());
    std::iota(ord.begin(), ord.end(), uint32_t{0});
    auto by_path = [&](uint32_t a, uint32_t b) {
      return ts[a].path < ts[b].path;
    };
    if (!std::is_sorted(ord.begin(), ord.end(), by_path)) {
      std::sort(ord.begin(), ord.end(), by_path);
    }
    for (size_t k = 1; k < ord.size(); ++k) {
      if (ts[ord[k]].path == ts[ord[k - 1]].path) {
        return InvalidArgument("rank " + std::to_string(r) +
                               "'s report lists tensor '" +
                               std::string(ts[ord[k]].path) + "' twice")
            .WithTensor(std::string(ts[ord[k]].path));
      }
    }
    tensors = std::max(tensors, ts.size());
    for (const auto& t : ts) {
      chunks += t.chunks;
      coords += t.chunks * t.ndim();
      bytes += t.path.size();
    }
  }
  internal::TensorTable out;
  out.Reserve(tensors, chunks, coords, bytes);
  std::vector<size_t> pos(world, 0);
  auto tensor_of = [&](size_t r) -> const internal::TensorRef& {
    return reports[r].tensors[order[r][pos[r]]];
  };
  // Rank r's next tensor into the tensor being built, whose first holder
  // was rank r0; then rank r moves on.
  auto take = [&](size_t r, size_t r0) -> Status {
    const internal::TensorRef& first = tensor_of(r0);
    const internal::TensorRef& t = tensor_of(r);
    if (r == r0) {
      out.AddTensor(t.path, t.dtype, t.shape);
    } else if (t.dtype != first.dtype ||
               !std::equal(t.shape.begin(), t.shape.end(), first.shape.begin(),
                           first.shape.end())) {
      return InvalidArgument("tensor '" + std::string(t.path) + "': rank " +
                             std::to_string(r0) + " saves it as " +
                             Describe(first) + ", rank " + std::to_string(r) +
                             " as " + Describe(t))
          .WithTensor(std::string(t.path));
    }
    // (Zero-size chunks declared the tensor only. Boxes have the shape's
    // rank: DecodeReport's columns say so.)
    out.AddChunksOf(t, static_cast<uint32_t>(r), /*drop_empty=*/true);
    return Status::OK();
  };
  // The common case first: every rank holds the same tensors (FSDP and
  // tensor parallel model weights), so the reports are merged in step, one
  // comparison per tensor and rank to find that out. (Replicated 0-d
  // tensors, written by one replica each, take the heap below.)
  bool in_step = true;
  for (size_t r = 1; r < world && in_step; ++r) {
    const auto& a = reports[0].tensors;
    const auto& b = reports[r].tensors;
    in_step = a.size() == b.size();
    for (size_t k = 0; k < a.size() && in_step; ++k) {
      in_step = a[order[0][k]].path == b[order[r][k]].path;
    }
  }
  if (in_step) {
    const size_t n = world ? reports[0].tensors.size() : 0;
    for (size_t k = 0; k < n; ++k) {
      for (size_t r = 0; r < world; ++r) CKPT_RETURN_IF_ERROR(take(r, 0));
      for (size_t r = 0; r < world; ++r) ++pos[r];
      out.SortLastChunks();  // box order: not dependent on rank timing
    }
    return out;
  }
  // Otherwise a min-heap of the ranks' next tensors by (path, rank).
  struct Head {
    std::string_view path;
    size_t rank;
  };
  auto after = [](const Head& a, const Head& b) {  // (a comes out after b)
    const int c = a.path.compare(b.path);
    return c != 0 ? c > 0 : a.rank > b.rank;
  };
  std::vector<Head> heap;
  for (size_t r = 0; r < world; ++r) {
    if (!reports[r].tensors.empty()) heap.push_back({tensor_of(r).path, r});
  }
  std::make_heap(heap.begin(), heap.end(), after);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), after);
    const size_t r0 = heap.back().rank;
    heap.pop_back();
    const std::string_view path = tensor_of(r0).path;
    // Every rank holding this path comes out of the heap in rank order.
    for (size_t r = r0;;) {
      CKPT_RETURN_IF_ERROR(take(r, r0));
      if (r != r0) {
        if (++pos[r] < reports[r].tensors.size()) {
          heap.push_back({tensor_of(r).path, r});
          std::push_heap(heap.begin(), heap.end(), after);
        }
      }
      if (heap.empty() || heap.front().path != path) break;
      std::pop_heap(heap.begin(), heap.end(), after);
      r = heap.back().rank;
      heap.pop_back();
    }
    // (r0 moves on last: `path` and `first` view its tensor until here.)
    if (++pos[r0] < reports[r0].tensors.size()) {
      heap.push_back({tensor_of(r0).path, r0});
      std::push_heap(heap.begin(), heap.end(), after);
    }
    out.SortLastChunks();  // box order: not dependent on rank timing
  }
  return out;
}

// The coordinator's half: reports in rank order -> manifest -> commit.
Result<CommitInfo> Finalize(const std::string& dir,
                            std::span<const ReportView> reports,
                            int coordinator, const SaveOptions& o) {
  const int world = static_cast<int>(reports.size());
  CKPT_ASSIGN_OR_RETURN(std::string temp, TempDirOf(dir));
  std::vector<Status> per_rank;
  for (const auto& rv : reports) {
    const internal::ReportHead& r = *rv.head;
    Status s = r.status;
    if (s.ok() && r.world_size != static_cast<uint32_t>(world)) {
      s = InvalidArgument("it saved for a group of " +
                          std::to_string(r.world_size) + " ranks, not " +
                          std::to_string(world));
    }
    if (s.ok() && r.file.name != ShardName(static_cast<int>(r.rank), world)) {
      s = InvalidArgument("its shard file is named '" + r.file.name + "'");
    }
    if (s.ok() && r.dir != CleanDir(dir)) {
      // Ranks that name different directories (a per-rank step counter,
      // a timestamp) would commit a checkpoint missing their shards.
      s = InvalidArgument("it saved to '" + r.dir + "', the coordinator to '" +
                          CleanDir(dir) + "'");
    }
    per_rank.push_back(s);
  }
  CKPT_RETURN_IF_ERROR(internal::FirstRankFailure(per_rank, world));

  std::vector<ShardFileInfo> files;
  uint32_t globals_file = static_cast<uint32_t>(coordinator);
  for (int r = world - 1; r >= 0; --r) {
    if (reports[static_cast<size_t>(r)].head->has_globals) {
      globals_file = static_cast<uint32_t>(r);
    }
  }
  for (const auto& rv : reports) files.push_back(rv.head->file);
  CKPT_ASSIGN_OR_RETURN(internal::TensorTable table, Merge(reports));
  const std::vector<internal::TensorRef> refs = table.Refs();
  std::map<std::string, std::string> sorted(o.metadata.begin(),
                                            o.metadata.end());
  const std::vector<std::pair<std::string, std::string>> meta(sorted.begin(),
                                                              sorted.end());
  const std::string producer = "ckpt " + std::string(VersionString());
  internal::ManifestRef m;
  m.version_major = internal::kManifestMajor;
  m.version_minor = internal::kManifestMinor;
  m.world_size = static_cast<uint32_t>(world);
  m.globals_file = globals_file;
  m.files = files;
  m.tensors = refs;
  m.metadata = meta;
  m.producer = producer;
  Status bad = internal::CheckManifest(m, dir);
  if (!bad.ok()) {
    // The ranks' chunks do not fit together: a caller's mistake.
    return Status(ErrorCode::kInvalidArgument,
                  "the ranks' chunks do not make a valid checkpoint: " +
                      bad.message())
        .WithFile(CleanDir(dir))
        .WithTensor(bad.tensor());
  }
  // Checked above: serialize without checking it again.
  std::vector<std::byte> bytes = internal::SerializeManifest(m);

  if (bytes.size() > internal::kMaxManifestBytes) {
    return Status(ErrorCode::kResourceExhausted,
                  "the manifest would take " + std::to_string(bytes.size()) +
                      " bytes, over the limit of " +
                      std::to_string(internal::kMaxManifestBytes) +
                      " (too many chunks)")
        .WithFile(CleanDir(dir));
  }

  // Sweep what the manifest does not name (leftovers of a crashed attempt:
  // shards of another world size, writers' temporaries), and find each
  // named shard here at the size its rank pinned: ranks that wrote to
  // another file system (node-local disks) or another directory must not
  // commit a checkpoint that no one can load.
  std::map<std::string, uint64_t> found;
  for (const auto& f : m.files) found.emplace(f.name, UINT64_MAX);
  std::error_code ec;
  fs::directory_iterator it(temp, ec), end;
  if (ec) return ErrnoError("list " + temp, ec.value()).WithFile(temp);
  for (; it != end; it.increment(ec)) {
    auto name = it->path().filename().string();
    auto f = found.find(name);
    if (f == found.end()) {
      std::error_code ignored;
      fs::remove_all(it->path(), ignored);
    } else {
      struct stat fst {};
      if (::lstat(it->path().c_str(), &fst) == 0 && S_ISREG(fst.st_mode))
        f->second = static_cast<uint64_t>(fst.st_size);
    }
  }
  if (ec) return ErrnoError("list " + temp, ec.value()).WithFile(temp);
  for (const auto& f : m.files) {
    const uint64_t size = found[f.name];
    if (size == f.size) continue;
    const std::string where = (fs::path(temp) / f.name).string();
    return IoError("rank " + std::to_string(f.rank) + " of " +
                   std::to_string(world) + " wrote " + where + " (" +
                   std::to_string(f.size) + " bytes) but the coordinator " +
                   (size == UINT64_MAX
                        ? std::string("does not find it there")
                        : "finds " + std::to_string(size) + " bytes there") +
                   " (do the ranks share this file system?)")
        .WithFile(where);
  }
  internal::Fault("before_manifest", coordinator);
  {
    const std::string mpath = (fs::path(temp) / kManifestName).string();
    CKPT_ASSIGN_OR_RETURN(auto f,
                          ckpt::internal::AtomicFile::Create(mpath, 0666));
    CKPT_RETURN_IF_ERROR(f.Write(bytes));
    // fsyncs the manifest and then the temporary directory, which makes
    // every entry in it durable (each shard's writer fsynced it as well).
    CKPT_RETURN_IF_ERROR(f.Commit(o.write.sync));
  }
  internal::Fault("before_rename", coordinator);
  const std::string target = CleanDir(dir);
  struct stat st {};
  if (IsEmptyDir(target)) {
    // (rename(2) fails, ENOTEMPTY, if something appeared in it since.)
    if (::rename(temp.c_str(), target.c_str()) != 0) {
      return ErrnoError(
                 "rename " + temp + " over the empty directory " + target,
                 errno)
          .WithFile(target);
    }
  } else if (::lstat(target.c_str(), &st) == 0) {
    if (!o.overwrite) {
      return InvalidArgument(target + " exists (pass overwrite to replace it)")
          .WithFile(target);
    }
    if (!S_ISDIR(st.st_mode) || !IsShardedCheckpoint(target)) {
      return InvalidArgument(target +
                             " exists and is not a sharded "
                             "checkpoint; refusing to replace it")
          .WithFile(target);
    }
    // One atomic exchange: the new directory takes the name, the old one
    // lands at the temporary name and is removed after.
    if (::renameat2(AT_FDCWD, temp.c_str(), AT_FDCWD, target.c_str(),
                    RENAME_EXCHANGE) != 0) {
      return ErrnoError("exchange " + temp + " with " + target, errno)
          .WithFile(target);
    }
  } else if (::renameat2(AT_FDCWD, temp.c_str(), AT_FDCWD, target.c_str(),
                         RENAME_NOREPLACE) != 0) {
    // (NOREPLACE: a directory made at `target` since the lstat is not
    // silently replaced.)
    return ErrnoError("rename " + temp + " to " + target, errno)
        .WithFile(target);
  }
  if (o.write.sync) {
    Status synced = SyncDir(ParentOf(dir));
    if (!synced.ok()) {
      // Past the commit point: the checkpoint is complete and visible,
      // only its durability is in doubt. Said so, not reported as a save
      // that left nothing behind.
      return Status(synced.code(),
                    target +
                        " is committed and visible, but fsync of its parent "
                        "directory failed (a power loss may undo the "
                        "commit): " +
                        synced.message())
          .WithFile(target);
    }
  }
  internal::Fault("after_rename", coordinator);
  if (o.overwrite) fs::remove_all(temp, ec);  // the old checkpoint, if any

  CommitInfo info;
  info.path = target;
  info.files = static_cast<uint32_t>(files.size());
  info.total_bytes = bytes.size();
  for (const auto& f : files) info.total_bytes += f.size;
  info.tensors = table.size();
  info.chunks = table.chunks();
  return info;
}

// Removes the temporary directory of a failed save, unless the commit
// already made it visible (then there is none).
void Discard(const std::string& dir) {
  auto temp = TempDirOf(dir);
  if (!temp.ok()) return;
  std::error_code ec;
  fs::remove_all(*temp, ec);
}

}  // namespace

Result<CommitInfo> CommitSave(Comm& comm, const std::string& dir,
                              const Status& local, const SaveOptions& o,
                              const ShardRecord* record) {
  const int rank = comm.rank(), world = comm.size();
  if (o.coordinator < 0 || o.coordinator >= world) {
    // Every rank sees the same options and fails alike, without a
    // collective that could not complete; each removes its own shard
    // (not the directory: with no barrier, another rank's next save may
    // already be writing there; the next save of this name sweeps it).
    if (auto path = ShardPath(dir, rank, world); path.ok()) {
      std::error_code ec;
      fs::remove(*path, ec);
    }
    return InvalidArgument("coordinator " + std::to_string(o.coordinator) +
                           " outside the group of " + std::to_string(world));
  }
  internal::Fault("committing", rank);
  internal::ReportHead head;
  head.rank = static_cast<uint32_t>(rank);
  head.world_size = static_cast<uint32_t>(world);
  head.status = local;
  const internal::TensorTable none;
  const internal::TensorTable* tensors = &none;
  Report described;  // without a record: the shard read back
  if (local.ok() && record) {
    const ShardRecordAccess::Impl& rec = ShardRecordAccess::Of(*record);
    if (auto p = RecordProblem(rec, rank, world)) {
      head.status = InvalidArgument("the shard's record " + *p);
    } else if (auto path = ShardPath(dir, rank, world);
               !path.ok() || !SameFile(*path, rec.path)) {
      head.status = InvalidArgument(
          "the shard's record is of " + rec.path + ", not this save's " +
          (path.ok() ? *path : dir) + " (a record from another save?)");
    } else {
      // (The coordinator checks each file's size on disk against it.)
      head.file = rec.head.file;
      head.has_globals = rec.head.has_globals;
      tensors = &rec.tensors;
    }
  } else if (local.ok()) {
    auto path = ShardPath(dir, rank, world);
    Result<Report> r = path.ok() ? Describe(*path, rank, world)
                                 : Result<Report>(path.status());
    if (r.ok()) {
      described = std::move(*r);
      head = described.head;
      tensors = &described.tensors;
    } else {
      head.status = r.status();
    }
  }
  head.dir = CleanDir(dir);
  internal::Fault("described", rank);
  CKPT_ASSIGN_OR_RETURN(
      auto all,
      comm.Gather(o.coordinator, internal::EncodeReport(head, *tensors)));
  std::vector<std::byte> outcome;
  if (rank == o.coordinator) {
    Result<CommitInfo> result = [&]() -> Result<CommitInfo> {
      if (all.size() != static_cast<size_t>(world)) {
        return IoError("gathered " + std::to_string(all.size()) +
                       " reports from a group of " + std::to_string(world));
      }
      std::vector<internal::DecodedReport> decoded;
      decoded.reserve(all.size());
      for (size_t r = 0; r < all.size(); ++r) {
        auto rep =
            internal::DecodeReport(std::move(all[r]), static_cast<uint32_t>(r));
        if (!rep.ok()) {
          internal::DecodedReport failed;
          failed.head.rank = static_cast<uint32_t>(r);
          failed.head.status = rep.status();
          decoded.push_back(std::move(failed));
        } else {
          decoded.push_back(std::move(*rep));
        }
      }
      std::vector<ReportView> views;
      for (const auto& d : decoded) views.push_back({&d.head, d.tensors});
      return internal::Guarded("the coordinator", CleanDir(dir), [&] {
        return Finalize(dir, views, o.coordinator, o);
      });
    }();
    if (!result.ok()) Discard(dir);
    outcome = internal::EncodeOutcome(result);
  }
  CKPT_ASSIGN_OR_RETURN(auto got, comm.Broadcast(o.coordinator, outcome));
  Result<CommitInfo> result = internal::DecodeOutcome(got, CleanDir(dir));
  if (!result.ok()) {
    // The coordinator removed its temporary directory; a rank that saved
    // to another one (the failure may be just that) removes its own shard
    // there, and the directory once empty. Then a barrier (failures only),
    // so that no rank's next save starts in a directory another rank is
    // still cleaning up.
    if (rank != o.coordinator) {
      if (auto path = ShardPath(head.dir, rank, world); path.ok()) {
        std::error_code ec;
        fs::remove(*path, ec);
        fs::remove(fs::path(*path).parent_path(), ec);
      }
    }
    if (comm.Gather(o.coordinator, {}).ok()) {
      (void)comm.Broadcast(o.coordinator, {});
    }
  }
  return result;
}

Result<CommitInfo> CommitWritten(const std::string& dir, int world_size,
                                 const SaveOptions& o,
                                 std::span<const ShardRecord> records) {
  if (world_size < 1) return InvalidArgument("world size must be >= 1");
  if (o.coordinator < 0 || o.coordinator >= world_size) {
    return InvalidArgument("coordinator outside the group");
  }
  if (!records.empty() && records.size() != static_cast<size_t>(world_size)) {
    return InvalidArgument(std::to_string(records.size()) +
                           " shard records for " + std::to_string(world_size) +
                           " ranks");
  }
  std::vector<Report> reports(static_cast<size_t>(world_size));
  std::vector<ReportView> views;
  for (int r = 0; r < world_size; ++r) {
    Report& rep = reports[static_cast<size_t>(r)];
    rep.head.rank = static_cast<uint32_t>(r);
    rep.head.world_size = static_cast<uint32_t>(world_size);
    const internal::TensorTable* tensors = &rep.tensors;
    if (!records.empty()) {
      // (The sweep in Finalize checks each named file's size on disk.)
      const auto& rec = ShardRecordAccess::Of(records[static_cast<size_t>(r)]);
      if (auto p = RecordProblem(rec, r, world_size)) {
        rep.head.status =
            InvalidArgument("shard record " + std::to_string(r) + " " + *p);
      } else {
        rep.head = rec.head;
        tensors = &rec.tensors;
      }
    } else {
      auto path = ShardPath(dir, r, world_size);
      Result<Report> got = path.ok() ? Describe(*path, r, world_size)
                                     : Result<Report>(path.status());
      if (got.ok()) {
        rep = std::move(*got);
      } else {
        rep.head.status = got.status();
      }
    }
    rep.head.dir = CleanDir(dir);
    rep.refs = tensors->Refs();
    views.push_back({&rep.head, rep.refs});
  }
  auto result = Finalize(dir, views, o.coordinator, o);
  if (!result.ok()) Discard(dir);
  return result;
}

Result<CommitInfo> Save(Comm& comm, const std::string& dir,
                        std::span<const Chunk> chunks, const SaveOptions& o,
                        const TreeBuilder& globals,
                        const TreeBuilder& rank_local) {
  const int rank = comm.rank(), world = comm.size();
  ShardRecord record;
  Status local = [&]() -> Status {
    struct stat st {};
    if (!o.overwrite && ::lstat(CleanDir(dir).c_str(), &st) == 0 &&
        !IsEmptyDir(CleanDir(dir))) {
      return InvalidArgument(CleanDir(dir) +
                             " exists (pass overwrite to replace it)")
          .WithFile(CleanDir(dir));
    }
    CKPT_ASSIGN_OR_RETURN(std::string shard, ShardPath(dir, rank, world));
    CKPT_ASSIGN_OR_RETURN(Writer w, Writer::Create(shard, o.write));
    std::vector<NodeId> nodes;
    for (const Chunk& c : chunks) {
      CKPT_ASSIGN_OR_RETURN(std::optional<NodeId> n, AddChunk(w, c, &record));
      if (n) nodes.push_back(*n);
    }
    std::optional<NodeId> g, l;
    if (globals && rank == o.coordinator) {
      CKPT_ASSIGN_OR_RETURN(NodeId n, globals(w));
      g = n;
    }
    if (rank_local) {
      CKPT_ASSIGN_OR_RETURN(NodeId n, rank_local(w));
      l = n;
    }
    CKPT_RETURN_IF_ERROR(SetShardRoot(w, nodes, g, l, rank, world, &record));
    CKPT_RETURN_IF_ERROR(w.Commit());
    return record.Seal(w);
  }();
  return CommitSave(comm, dir, local, o, &record);
}

}  // namespace ckpt::dist
