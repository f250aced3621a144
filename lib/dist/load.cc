// Loading a sharded checkpoint: one reader of the manifest, planning by
// BoxIndex + CopyRuns, reads of exactly the intersecting byte runs.
// docs/SHARDED.md 7.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "checksum_internal.h"
#include "ckpt/dist.h"
#include "ckpt/reader.h"
#include "dist/manifest_internal.h"
#include "parallel_internal.h"
#include "pth/dcp_internal.h"
#include "reader_internal.h"

namespace ckpt::dist {

namespace fs = std::filesystem;

bool IsShardedCheckpoint(const std::string& path) {
  struct stat st {};
  const std::string m = (fs::path(path) / kManifestName).string();
  return ::stat(m.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

namespace {

// The whole manifest file, or why not (kNotFound naming the directory
// when it has none).
Result<std::vector<std::byte>> ReadManifestBytes(const std::string& dir) {
  const std::string path = (fs::path(dir) / kManifestName).string();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    struct stat st {};
    if (err == ENOENT && ::stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
      return NotFound(dir + " has no " + std::string(kManifestName) +
                      ": not a sharded checkpoint, or its save never "
                      "committed")
          .WithFile(dir);
    }
    return ErrnoError("open " + path, err).WithFile(path);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return ErrnoError("stat " + path, err).WithFile(path);
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size > internal::kMaxManifestBytes + internal::kManifestPreambleBytes) {
    ::close(fd);
    return Corrupt("manifest of " + std::to_string(size) +
                   " bytes is larger than any this reader accepts")
        .WithFile(path);
  }
  std::vector<std::byte> bytes(size);
  uint64_t done = 0;
  while (done < size) {
    ssize_t n =
        ::pread(fd, bytes.data() + done, size - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int err = n < 0 ? errno : EIO;
      ::close(fd);
      return ErrnoError("read " + path, err)
          .WithFile(path)
          .WithOffset(static_cast<int64_t>(done));
    }
    done += static_cast<uint64_t>(n);
  }
  ::close(fd);
  return bytes;
}

// An open shard file and where its storages lie; for a DCP directory, a
// raw descriptor of one of its .distcp files.
struct Shard {
  explicit Shard(Checkpoint c) : ck(std::move(c)) {}
  explicit Shard(int raw_fd) : fd(raw_fd) {}
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;
  ~Shard() {
    if (fd >= 0) ::close(fd);
  }
  std::optional<Checkpoint> ck;
  int fd = -1;
  std::vector<uint64_t> starts;  // storage offsets, ascending
  std::vector<uint64_t> ends;
};

// pread of exactly out.size() bytes at `offset`, or kIoError naming it.
Status PreadAll(int fd, std::span<std::byte> out, uint64_t offset,
                const std::string& name) {
  for (uint64_t done = 0; done < out.size();) {
    ssize_t n = ::pread(fd, out.data() + done, out.size() - done,
                        static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return ErrnoError("read " + name, n < 0 ? errno : EIO)
          .WithFile(name)
          .WithOffset(static_cast<int64_t>(offset + done));
    }
    done += static_cast<uint64_t>(n);
  }
  return Status::OK();
}

// A DCP directory's index as a manifest: one "file" per .distcp, pinned
// by size only (DCP has no checksums), chunks as DCP's .metadata locates
// them. Checked by the same rules as a ckpt manifest.
Result<std::vector<std::byte>> DcpManifestBytes(const std::string& dir) {
  CKPT_ASSIGN_OR_RETURN(ckpt::internal::DcpIndex index,
                        ckpt::internal::ReadDcpDirectory(dir));
  Manifest m;
  std::map<std::string, uint32_t> file_index;
  for (const std::string& f : index.files) {
    const std::string path = (fs::path(dir) / f).string();
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
      return ErrnoError("stat " + path, errno).WithFile(path);
    }
    file_index[f] = static_cast<uint32_t>(m.files.size());
    m.files.push_back({f, static_cast<uint64_t>(st.st_size), 0,
                       static_cast<uint32_t>(m.files.size())});
  }
  if (m.files.empty()) {
    return InvalidArgument("DCP checkpoint " + dir + " holds no data files")
        .WithFile(dir);
  }
  m.world_size = static_cast<uint32_t>(m.files.size());
  m.producer = "torch.distributed.checkpoint";
  if (!index.version.empty()) m.metadata = {{"dcp.version", index.version}};
  for (const auto& t : index.tensors) {
    GlobalTensorInfo g;
    g.path = t.path;
    g.dtype = t.dtype;
    g.shape = t.shape;
    for (const auto& c : t.chunks) {
      if (c.box.numel() == 0) continue;
      g.chunks.push_back({c.box, file_index.at(c.file), c.offset, c.length});
    }
    m.tensors.push_back(std::move(g));
  }
  Status bad =
      internal::CheckManifest(m, (fs::path(dir) / ".metadata").string());
  if (!bad.ok()) return bad;
  return internal::SerializeManifest(m);
}

// Copies smaller than this come from the mapping; larger ones by pread,
// which costs no page faults on the destination's side of the kernel.
constexpr uint64_t kPreadMinBytes = 64 << 10;

// An open shard file and where its storages lie.
Result<std::shared_ptr<Shard>> ShardOf(Checkpoint ck) {
  auto s = std::make_shared<Shard>(std::move(ck));
  for (size_t k = 0; k < s->ck->num_storages(); ++k) {
    CKPT_ASSIGN_OR_RETURN(StorageInfo si, s->ck->StorageInfoAt(k));
    s->starts.push_back(si.offset);
    s->ends.push_back(si.offset + si.nbytes);
  }
  return s;
}

}  // namespace

struct ShardedCheckpoint::Impl {
  std::string dir;
  Manifest m;
  bool dcp = false;             // a DCP directory read through its .metadata
  std::vector<BoxIndex> index;  // per tensor
  mutable std::mutex mu;
  mutable std::vector<std::shared_ptr<const Shard>> shards;

  Result<std::shared_ptr<const Shard>> Open(size_t i) const;
  // The tensor `path`, when `box` is a box of it (kNotFound, or
  // kInvalidArgument saying what is wrong with the box).
  Result<const GlobalTensorInfo*> Wanted(std::string_view path,
                                         const Box& box) const;
  // `index` built from `m`'s chunks, one BoxIndex per tensor.
  Status BuildIndex();
  // The storage of shard `s` holding bytes [begin, end), or kCorrupt.
  Result<size_t> StorageOf(const Shard& s, size_t file, uint64_t begin,
                           uint64_t end) const;
};

Status ShardedCheckpoint::Impl::BuildIndex() {
  index.clear();
  index.reserve(m.tensors.size());
  for (const auto& t : m.tensors) {
    std::vector<Box> boxes;
    boxes.reserve(t.chunks.size());
    for (const auto& c : t.chunks) boxes.push_back(c.box);
    CKPT_ASSIGN_OR_RETURN(BoxIndex bi, BoxIndex::Build(std::move(boxes)));
    index.push_back(std::move(bi));
  }
  return Status::OK();
}

Result<const GlobalTensorInfo*> ShardedCheckpoint::Impl::Wanted(
    std::string_view path, const Box& box) const {
  const GlobalTensorInfo* t = m.Find(path);
  if (!t) {
    return NotFound("no tensor '" + std::string(path) + "' in the checkpoint")
        .WithFile(dir)
        .WithTensor(std::string(path));
  }
  if (auto p = BoxProblem(box, t->shape, DTypeSize(t->dtype))) {
    return InvalidArgument("wanted box " + internal::BoxString(box) + ": " + *p)
        .WithTensor(std::string(path));
  }
  return t;
}

Result<std::shared_ptr<const Shard>> ShardedCheckpoint::Impl::Open(
    size_t i) const {
  {
    std::lock_guard<std::mutex> lock(mu);
    if (shards[i]) return shards[i];
  }
  const ShardFileInfo& f = m.files[i];
  const std::string path = (fs::path(dir) / f.name).string();
  if (dcp) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return ErrnoError("open " + path, errno).WithFile(path);
    auto s = std::make_shared<Shard>(fd);
    struct stat st {};
    if (::fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) != f.size) {
      return Corrupt(
                 "DCP data file changed size since the checkpoint was "
                 "opened (" +
                 std::to_string(f.size) + " bytes then)")
          .WithFile(path);
    }
    std::lock_guard<std::mutex> lock(mu);
    if (!shards[i]) shards[i] = std::move(s);
    return shards[i];
  }
  CKPT_ASSIGN_OR_RETURN(Checkpoint ck, Checkpoint::Open(path));
  // S1-S2: the very file the manifest pins.
  if (ck.file_size() != f.size || ck.layout().header_xxh3 != f.header_xxh3) {
    return Corrupt("shard file is not the one the manifest pins (" +
                   std::to_string(ck.file_size()) + " bytes, header " +
                   ckpt::internal::HashToHex(ck.layout().header_xxh3) +
                   "; the manifest says " + std::to_string(f.size) +
                   " bytes, header " +
                   ckpt::internal::HashToHex(f.header_xxh3) +
                   "): replaced or from another save")
        .WithFile(path);
  }
  CKPT_ASSIGN_OR_RETURN(auto s, ShardOf(std::move(ck)));
  std::lock_guard<std::mutex> lock(mu);
  if (!shards[i]) shards[i] = std::move(s);
  return shards[i];
}

Result<size_t> ShardedCheckpoint::Impl::StorageOf(const Shard& s, size_t file,
                                                  uint64_t begin,
                                                  uint64_t end) const {
  auto it = std::upper_bound(s.starts.begin(), s.starts.end(), begin);
  if (it != s.starts.begin()) {
    size_t k = static_cast<size_t>(it - s.starts.begin()) - 1;
    if (end <= s.ends[k]) return k;
  }
  // S3: a chunk's bytes lie inside one storage, so its checksums cover it.
  return Corrupt("chunk bytes [" + std::to_string(begin) + ", " +
                 std::to_string(end) + ") are not inside one storage")
      .WithFile((fs::path(dir) / m.files[file].name).string())
      .WithOffset(static_cast<int64_t>(begin));
}

ShardedCheckpoint::ShardedCheckpoint(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}
ShardedCheckpoint::ShardedCheckpoint(ShardedCheckpoint&&) noexcept = default;
ShardedCheckpoint& ShardedCheckpoint::operator=(ShardedCheckpoint&&) noexcept =
    default;
ShardedCheckpoint::~ShardedCheckpoint() = default;

const std::string& ShardedCheckpoint::dir() const { return impl_->dir; }
const Manifest& ShardedCheckpoint::manifest() const { return impl_->m; }

Result<Manifest> ReadManifest(const std::string& dir) {
  if (!IsShardedCheckpoint(dir) && ckpt::internal::IsDcpDirectory(dir)) {
    CKPT_ASSIGN_OR_RETURN(auto bytes, DcpManifestBytes(dir));
    return internal::DecodeManifest(bytes,
                                    (fs::path(dir) / ".metadata").string());
  }
  CKPT_ASSIGN_OR_RETURN(auto bytes, ReadManifestBytes(dir));
  return internal::DecodeManifest(bytes,
                                  (fs::path(dir) / kManifestName).string());
}

namespace {

// The index of `dir` as manifest bytes, and whether it came from a DCP
// directory's .metadata (a directory with a manifest is never DCP).
Result<std::pair<std::vector<std::byte>, bool>> IndexBytes(
    const std::string& dir) {
  if (!IsShardedCheckpoint(dir) && ckpt::internal::IsDcpDirectory(dir)) {
    CKPT_ASSIGN_OR_RETURN(auto bytes, DcpManifestBytes(dir));
    return std::make_pair(std::move(bytes), true);
  }
  CKPT_ASSIGN_OR_RETURN(auto bytes, ReadManifestBytes(dir));
  return std::make_pair(std::move(bytes), false);
}

}  // namespace

Result<ShardedCheckpoint> ShardedCheckpoint::Open(const std::string& dir) {
  CKPT_ASSIGN_OR_RETURN(auto index, IndexBytes(dir));
  return FromBytes(index.first, dir, index.second);
}

Result<ShardedCheckpoint> ShardedCheckpoint::Open(Comm& comm,
                                                  const std::string& dir,
                                                  int coordinator) {
  if (coordinator < 0 || coordinator >= comm.size()) {
    return InvalidArgument("coordinator " + std::to_string(coordinator) +
                           " outside the group of " +
                           std::to_string(comm.size()));
  }
  // One reader of the index (the coordinator), one byte of verdict in
  // front: 0 and a manifest, 2 and a DCP directory's index as a manifest,
  // or 1 and the Status of its failure.
  std::vector<std::byte> msg;
  if (comm.rank() == coordinator) {
    auto index = internal::Guarded("reading the index", dir,
                                   [&] { return IndexBytes(dir); });
    if (index.ok()) {
      msg.reserve(index->first.size() + 1);
      msg.push_back(std::byte{index->second ? uint8_t{2} : uint8_t{0}});
      msg.insert(msg.end(), index->first.begin(), index->first.end());
    } else {
      msg.push_back(std::byte{1});
      auto s = internal::EncodeStatus(index.status());
      msg.insert(msg.end(), s.begin(), s.end());
    }
  }
  CKPT_ASSIGN_OR_RETURN(auto got, comm.Broadcast(coordinator, msg));
  if (got.empty()) return IoError("empty manifest broadcast").WithFile(dir);
  if (got[0] == std::byte{1}) {
    return internal::DecodeStatus(std::span(got).subspan(1));
  }
  return FromBytes(std::span(got).subspan(1), dir, got[0] == std::byte{2});
}

Result<ShardedCheckpoint> ShardedCheckpoint::OpenFile(const std::string& path) {
  CKPT_ASSIGN_OR_RETURN(Checkpoint ck, Checkpoint::Open(path));
  const fs::path p(path);
  Manifest m;
  m.world_size = 1;
  m.files.push_back(
      {p.filename().string(), ck.file_size(), ck.layout().header_xxh3, 0});
  m.producer = std::string(ck.producer());
  m.metadata = ck.metadata();
  CKPT_ASSIGN_OR_RETURN(auto shard, ShardOf(ck.Share()));
  // Each row-major tensor is one chunk where its bytes lie; views in
  // another layout have no place in a manifest and are left out. Tensors
  // sharing a storage (tied weights) may share bytes: built here from a
  // checked file, this index is not held to M13, which only a manifest
  // read from disk must meet.
  m.tensors.reserve(ck.num_tensors());
  for (size_t i = 0; i < ck.num_tensors(); ++i) {
    CKPT_ASSIGN_OR_RETURN(TensorInfo t, ck.TensorInfoAt(i));
    if (!t.is_contiguous()) continue;
    GlobalTensorInfo g;
    g.path = std::move(t.path);
    g.dtype = t.dtype;
    g.shape = t.shape;
    if (t.numel() > 0) {
      CKPT_ASSIGN_OR_RETURN(StorageInfo si, ck.StorageInfoAt(t.storage));
      Box whole{std::vector<int64_t>(t.shape.size(), 0), t.shape};
      g.chunks.push_back({std::move(whole), 0,
                          si.offset + static_cast<uint64_t>(t.storage_offset) *
                                          DTypeSize(t.dtype),
                          t.nbytes()});
    }
    m.tensors.push_back(std::move(g));
  }
  auto impl = std::make_unique<ShardedCheckpoint::Impl>();
  impl->dir = p.has_parent_path() ? p.parent_path().string() : ".";
  impl->shards = {std::move(shard)};
  impl->m = std::move(m);
  CKPT_RETURN_IF_ERROR(impl->BuildIndex());
  return ShardedCheckpoint(std::move(impl));
}

Result<ShardedCheckpoint> ShardedCheckpoint::FromBytes(
    std::span<const std::byte> bytes, const std::string& dir, bool dcp) {
  const std::string name = (fs::path(dir) / (dcp ? std::string(".metadata")
                                                 : std::string(kManifestName)))
                               .string();
  CKPT_ASSIGN_OR_RETURN(Manifest m, internal::DecodeManifest(bytes, name));
  auto impl = std::make_unique<ShardedCheckpoint::Impl>();
  impl->dir = dir;
  impl->dcp = dcp;
  impl->shards.resize(m.files.size());
  impl->m = std::move(m);
  CKPT_RETURN_IF_ERROR(impl->BuildIndex());
  return ShardedCheckpoint(std::move(impl));
}

Result<std::vector<ReadPlan::Copy>> ShardedCheckpoint::PlanBox(
    std::string_view path, const Box& box) const {
  const Manifest& m = impl_->m;
  CKPT_ASSIGN_OR_RETURN(const GlobalTensorInfo* t, impl_->Wanted(path, box));
  const size_t elem = DTypeSize(t->dtype);
  std::vector<ReadPlan::Copy> copies;
  const size_t ti = static_cast<size_t>(t - m.tensors.data());
  for (size_t c : impl_->index[ti].Overlapping(box)) {
    const ChunkInfo& chunk = t->chunks[c];
    CKPT_ASSIGN_OR_RETURN(std::optional<RunPattern> p,
                          CopyRuns(chunk.box, box, elem));
    if (!p) continue;
    p->src += chunk.offset;
    copies.push_back({0, chunk.file, *p});
  }
  return copies;
}

Result<ReadPlan> ShardedCheckpoint::Plan(std::span<const Want> wants) const {
  ReadPlan plan;
  plan.wants.assign(wants.begin(), wants.end());
  for (size_t w = 0; w < wants.size(); ++w) {
    const Want& want = wants[w];
    CKPT_ASSIGN_OR_RETURN(auto copies, PlanBox(want.path, want.box));
    const GlobalTensorInfo* t = impl_->m.Find(want.path);
    const uint64_t bytes =
        static_cast<uint64_t>(want.box.numel()) * DTypeSize(t->dtype);
    if (want.out.size() != bytes) {
      return InvalidArgument("buffer of " + std::to_string(want.out.size()) +
                             " bytes for box " + internal::BoxString(want.box) +
                             " of " + std::to_string(bytes))
          .WithTensor(want.path);
    }
    plan.bytes_needed += bytes;
    for (auto& c : copies) {
      c.want = static_cast<uint32_t>(w);
      plan.copies.push_back(std::move(c));
    }
  }
  std::sort(plan.copies.begin(), plan.copies.end(),
            [](const ReadPlan::Copy& a, const ReadPlan::Copy& b) {
              return std::tie(a.file, a.runs.src) <
                     std::tie(b.file, b.runs.src);
            });
  return plan;
}

Result<LoadStats> ShardedCheckpoint::Execute(const ReadPlan& plan,
                                             const LoadOptions& o) const {
  LoadStats stats;
  stats.bytes_needed = plan.bytes_needed;
  const Manifest& m = impl_->m;
  if (impl_->dcp) return ExecuteRaw(plan, o);
  // Open the files the plan touches; find each copy's storage.
  std::vector<std::shared_ptr<const Shard>> open(m.files.size());
  std::vector<size_t> storage(plan.copies.size());
  for (size_t i = 0; i < plan.copies.size(); ++i) {
    const ReadPlan::Copy& c = plan.copies[i];
    if (c.file >= m.files.size() || c.want >= plan.wants.size()) {
      return InvalidArgument("a read plan from another checkpoint");
    }
    if (!open[c.file]) {
      CKPT_ASSIGN_OR_RETURN(open[c.file], impl_->Open(c.file));
      ++stats.files_opened;
    }
    CKPT_ASSIGN_OR_RETURN(
        storage[i],
        impl_->StorageOf(*open[c.file], c.file, c.runs.src, c.runs.src_end()));
  }
  auto where = [&](size_t i) {
    const ReadPlan::Copy& c = plan.copies[i];
    const Want& w = plan.wants[c.want];
    return "loading box " + internal::BoxString(w.box) + " of '" + w.path + "'";
  };
  // Verify every checksum chunk a run touches, each once.
  if (o.verify) {
    std::set<std::tuple<uint32_t, size_t, uint64_t>> touched;
    std::vector<std::tuple<uint32_t, size_t, uint64_t, size_t>> todo;
    for (size_t i = 0; i < plan.copies.size(); ++i) {
      const ReadPlan::Copy& c = plan.copies[i];
      const Shard& s = *open[c.file];
      const uint64_t cs = s.ck->chunk_size();
      const uint64_t base = s.starts[storage[i]];
      ForEachRun(c.runs, [&](uint64_t src, uint64_t, uint64_t len) {
        for (uint64_t k = (src - base) / cs; k * cs < src - base + len; ++k) {
          if (touched.emplace(c.file, storage[i], k).second) {
            todo.emplace_back(c.file, storage[i], k, i);
          }
        }
      });
    }
    std::vector<uint64_t> hashed(todo.size());
    Status v = ckpt::internal::ParallelFor(
        todo.size(), o.threads, [&](size_t j) -> Status {
          auto [file, st, k, copy] = todo[j];
          const Shard& s = *open[file];
          const uint64_t cs = s.ck->chunk_size();
          const uint64_t size = s.ends[st] - s.starts[st];
          const uint64_t end = std::min(size, (k + 1) * cs);
          hashed[j] = end - k * cs;
          Status r = ckpt::internal::CheckpointAccess::VerifyStorageRange(
              *s.ck, st, k * cs, end, plan.wants[plan.copies[copy].want].path);
          return r.ok() ? r : r.WithContext(where(copy));
        });
    CKPT_RETURN_IF_ERROR(v);
    for (uint64_t h : hashed) stats.bytes_verified += h;
  }
  // Copy: large runs by pread (parallel), small ones from the mapping.
  std::vector<std::vector<Checkpoint::StorageRead>> reads(m.files.size());
  for (size_t i = 0; i < plan.copies.size(); ++i) {
    const ReadPlan::Copy& c = plan.copies[i];
    const Shard& s = *open[c.file];
    std::span<std::byte> out = plan.wants[c.want].out;
    const uint64_t base = s.starts[storage[i]];
    Status bad;
    if (c.runs.length >= kPreadMinBytes) {
      ForEachRun(c.runs, [&](uint64_t src, uint64_t dst, uint64_t len) {
        if (!bad.ok()) return;
        if (dst > out.size() || len > out.size() - dst) {
          bad = InvalidArgument("a read plan run outside its buffer");
          return;
        }
        reads[c.file].push_back(
            {storage[i], src - base, out.subspan(dst, len)});
      });
    } else {
      CKPT_ASSIGN_OR_RETURN(StorageView view, s.ck->Storage(storage[i]));
      ForEachRun(c.runs, [&](uint64_t src, uint64_t dst, uint64_t len) {
        if (!bad.ok()) return;
        if (dst > out.size() || len > out.size() - dst) {
          bad = InvalidArgument("a read plan run outside its buffer");
          return;
        }
        std::memcpy(out.data() + dst, view.data.data() + (src - base), len);
      });
    }
    CKPT_RETURN_IF_ERROR(bad);
    stats.runs += c.runs.runs();
    stats.bytes_read += c.runs.bytes();
  }
  for (size_t f = 0; f < reads.size(); ++f) {
    if (reads[f].empty()) continue;
    Status s = open[f]->ck->ReadStorages(reads[f], o.threads);
    CKPT_RETURN_IF_ERROR(s);
  }
  return stats;
}

Result<LoadStats> ShardedCheckpoint::ExecuteRaw(const ReadPlan& plan,
                                                const LoadOptions& o) const {
  // DCP's .distcp files: no checksums to verify, so pread every run.
  LoadStats stats;
  stats.bytes_needed = plan.bytes_needed;
  std::vector<std::shared_ptr<const Shard>> open(impl_->m.files.size());
  for (const ReadPlan::Copy& c : plan.copies) {
    if (c.file >= open.size() || c.want >= plan.wants.size()) {
      return InvalidArgument("a read plan from another checkpoint");
    }
    if (!open[c.file]) {
      CKPT_ASSIGN_OR_RETURN(open[c.file], impl_->Open(c.file));
      ++stats.files_opened;
    }
    stats.runs += c.runs.runs();
    stats.bytes_read += c.runs.bytes();
  }
  Status st = ckpt::internal::ParallelFor(
      plan.copies.size(), o.threads, [&](size_t i) -> Status {
        const ReadPlan::Copy& c = plan.copies[i];
        std::span<std::byte> out = plan.wants[c.want].out;
        const std::string name = ShardFilePath(c.file);
        Status bad;
        ForEachRun(c.runs, [&](uint64_t src, uint64_t dst, uint64_t len) {
          if (!bad.ok()) return;
          if (dst > out.size() || len > out.size() - dst) {
            bad = InvalidArgument("a read plan run outside its buffer");
            return;
          }
          bad = PreadAll(open[c.file]->fd, out.subspan(dst, len), src, name);
        });
        return bad;
      });
  CKPT_RETURN_IF_ERROR(st);
  return stats;
}

Result<StorageView> ShardedCheckpoint::Read(std::string_view path,
                                            const Box& box,
                                            const LoadOptions& o) const {
  CKPT_ASSIGN_OR_RETURN(const GlobalTensorInfo* t, impl_->Wanted(path, box));
  const size_t elem = DTypeSize(t->dtype);
  const uint64_t bytes = static_cast<uint64_t>(box.numel()) * elem;
  // Zero copy when one run of one chunk holds the whole box.
  const size_t ti = static_cast<size_t>(t - impl_->m.tensors.data());
  auto hits = impl_->index[ti].Overlapping(box);
  if (hits.size() == 1 && bytes > 0 && !impl_->dcp) {
    const ChunkInfo& c = t->chunks[hits[0]];
    CKPT_ASSIGN_OR_RETURN(std::optional<RunPattern> p,
                          CopyRuns(c.box, box, elem));
    if (p && p->runs() == 1 && p->length == bytes) {
      CKPT_ASSIGN_OR_RETURN(auto shard, impl_->Open(c.file));
      const uint64_t src = c.offset + p->src;
      CKPT_ASSIGN_OR_RETURN(size_t st,
                            impl_->StorageOf(*shard, c.file, src, src + bytes));
      const uint64_t begin = src - shard->starts[st];
      if (o.verify) {
        CKPT_RETURN_IF_ERROR(
            ckpt::internal::CheckpointAccess::VerifyStorageRange(
                *shard->ck, st, begin, begin + bytes, std::string(path)));
      }
      CKPT_ASSIGN_OR_RETURN(StorageView view, shard->ck->Storage(st));
      view.data = view.data.subspan(begin, bytes);
      return view;
    }
  }
  auto buf = std::make_shared<std::vector<std::byte>>(bytes);
  Want w{std::string(path), box, std::span(*buf)};
  CKPT_ASSIGN_OR_RETURN(ReadPlan plan, Plan(std::span(&w, 1)));
  CKPT_RETURN_IF_ERROR(Execute(plan, o).status());
  StorageView out;
  out.data = std::span<const std::byte>(*buf);
  out.owner = buf;
  return out;
}

Result<Checkpoint> ShardedCheckpoint::OpenShard(size_t index) const {
  if (index >= impl_->m.files.size()) {
    return InvalidArgument("shard file " + std::to_string(index) + " of " +
                           std::to_string(impl_->m.files.size()));
  }
  if (impl_->dcp) {
    return InvalidArgument(
               "a DCP checkpoint has no ckpt shard files (and so no trees: "
               "its non-tensor values are torch.save'd objects)")
        .WithFile(impl_->dir);
  }
  CKPT_ASSIGN_OR_RETURN(auto shard, impl_->Open(index));
  return shard->ck->Share();
}

std::string ShardedCheckpoint::ShardFilePath(size_t index) const {
  if (index >= impl_->m.files.size()) return "";
  return (fs::path(impl_->dir) / impl_->m.files[index].name).string();
}

Status ShardedCheckpoint::Verify(unsigned threads) const {
  const Manifest& m = impl_->m;
  for (size_t f = 0; f < m.files.size(); ++f) {
    CKPT_ASSIGN_OR_RETURN(auto shard, impl_->Open(f));
    // A DCP file has no checksums: its size is all there is to check.
    if (shard->ck) CKPT_RETURN_IF_ERROR(shard->ck->Verify({threads}));
  }
  if (impl_->dcp) return Status::OK();
  for (const auto& t : m.tensors) {
    for (const auto& c : t.chunks) {
      CKPT_ASSIGN_OR_RETURN(auto shard, impl_->Open(c.file));
      Status s = impl_->StorageOf(*shard, c.file, c.offset, c.offset + c.length)
                     .status();
      if (!s.ok()) return s.WithTensor(t.path);
    }
  }
  return Status::OK();
}

}  // namespace ckpt::dist
