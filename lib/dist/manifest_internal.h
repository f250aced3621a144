// The manifest's bytes (docs/SHARDED.md 4-5) and the protocol messages:
// the one place that encodes and checks them. The save protocol, the
// loader, the tools and the fuzz target all come through here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ckpt/box.h"
#include "ckpt/dist.h"
#include "ckpt/status.h"

namespace ckpt::dist::internal {

/// Manifest file preamble: magic, versions, flags, size and checksum of the
/// FlatBuffers bytes that follow, checksum of the preamble.
inline constexpr size_t kManifestPreambleBytes = 48;
inline constexpr uint16_t kManifestMajor = 1;
inline constexpr uint16_t kManifestMinor = 0;
/// Refused above this (FlatBuffers 2.0 can neither build nor verify 2 GiB;
/// a manifest of 10^6 2-D chunks is ~60 MB).
inline constexpr uint64_t kMaxManifestBytes = uint64_t{1} << 30;
/// M12's bound on box comparisons for layouts that are not a grid: this
/// many per chunk plus kMinOverlapTests (a row or column sharding needs
/// about one per chunk).
inline constexpr uint64_t kMaxOverlapTestsPerChunk = 16;
inline constexpr uint64_t kMinOverlapTests = uint64_t{1} << 20;

struct ReportHead;
class TensorTable;
std::vector<std::byte> EncodeReport(const ReportHead& head,
                                    const TensorTable& tensors);

/// Where one chunk's bytes lie. The layout of the schema's ByteRange
/// struct (manifest.cc asserts it), so that a table built in memory and a
/// verified FlatBuffers vector are read through the same view.
struct ByteRun {
  uint32_t file = 0;  ///< index into the files
  uint32_t padding = 0;
  uint64_t offset = 0;  ///< absolute byte offset in that file
  uint64_t length = 0;  ///< box elements x element size
};

/// One global tensor and its chunks as the rules and the codecs see it:
/// views into a TensorTable or a verified FlatBuffers buffer, which must
/// outlive it. Chunk i's box has offsets[i*ndim, (i+1)*ndim) and
/// sizes[same], its bytes data[i].
struct TensorRef {
  std::string_view path;
  uint8_t dtype = 0;
  std::span<const int64_t> shape;
  size_t chunks = 0;
  const int64_t* offsets = nullptr;
  const int64_t* sizes = nullptr;
  const ByteRun* data = nullptr;

  size_t ndim() const { return shape.size(); }
  std::span<const int64_t> offsets_of(size_t i) const {
    return {offsets + i * ndim(), ndim()};
  }
  std::span<const int64_t> sizes_of(size_t i) const {
    return {sizes + i * ndim(), ndim()};
  }
  Box box(size_t i) const;  ///< (built for errors and rare paths only)
};

/// Global tensors and their chunks in columns: what the commit builds,
/// merges, checks and writes with no allocation per tensor or chunk (10^4
/// tensors x N ranks at every save; a tree of per-chunk vectors made the
/// commit 3x slower). Tensors are appended in order, each followed by its
/// chunks.
class TensorTable {
 public:
  void AddTensor(std::string_view path, uint8_t dtype,
                 std::span<const int64_t> shape);
  /// A chunk of the last tensor added (offsets and sizes of its rank:
  /// the caller checks).
  void AddChunk(std::span<const int64_t> offsets,
                std::span<const int64_t> sizes, const ByteRun& data);
  /// The chunks of `t` (boxes of the last tensor's rank) to the last
  /// tensor, naming `file`; without the empty ones when `drop_empty`.
  void AddChunksOf(const TensorRef& t, uint32_t file, bool drop_empty);
  /// Sorts the last tensor's chunks by box offsets (lexicographic).
  void SortLastChunks();
  void Reserve(size_t tensors, size_t chunks, size_t coords, size_t bytes);

  size_t size() const { return dtypes_.size(); }
  size_t chunks() const { return data_.size(); }
  TensorRef at(size_t i) const;
  std::vector<TensorRef> Refs() const;
  /// A table of `m`'s tensors, whose boxes must have their tensor's rank
  /// (CheckManifest(const Manifest&) checks that first).
  static TensorTable Of(const Manifest& m);

 private:
  std::string paths_;
  friend std::vector<std::byte> EncodeReport(const ReportHead&,
                                             const TensorTable&);
  // (The columns of the schema's TensorColumns, plus where each tensor's
  // chunk coordinates end.)
  std::vector<uint32_t> path_end_;
  std::vector<uint8_t> dtypes_;
  std::vector<uint32_t> dim_end_;
  std::vector<int64_t> dims_;
  std::vector<uint32_t> chunk_end_;
  std::vector<size_t> coord_end_;
  std::vector<int64_t> offsets_, sizes_;
  std::vector<ByteRun> data_;
  std::vector<size_t> scratch_;
};

/// A manifest as views: what CheckManifest and SerializeManifest take,
/// whether it was decoded, merged at a commit or built by a caller.
struct ManifestRef {
  uint16_t version_major = 1;
  uint16_t version_minor = 0;
  uint32_t world_size = 0;
  uint32_t globals_file = 0;
  std::span<const ShardFileInfo> files;
  std::span<const TensorRef> tensors;
  std::span<const std::pair<std::string, std::string>> metadata;
  std::string_view producer;
};

/// The semantic rules of SHARDED.md 5 over a decoded manifest (M7-M14):
/// why it is not valid, or OK. `name` is what errors call it.
Status CheckManifest(const ManifestRef& m, const std::string& name);
Status CheckManifest(const Manifest& m, const std::string& name);

/// Preamble + FlatBuffers bytes of a manifest that CheckManifest accepts
/// (kInvalidArgument with its problem otherwise).
Result<std::vector<std::byte>> EncodeManifest(const Manifest& m);
/// The same bytes without the checks: for the commit (which checked) and
/// for tests that need a manifest breaking one rule, sealed with valid
/// checksums.
std::vector<std::byte> SerializeManifest(const ManifestRef& m);
std::vector<std::byte> SerializeManifest(const Manifest& m);
/// A preamble with valid checksums around FlatBuffers bytes (any bytes:
/// for tests of the Verifier rules).
std::vector<std::byte> SealManifest(std::span<const std::byte> flatbuffer,
                                    uint16_t major = kManifestMajor,
                                    uint16_t minor = kManifestMinor);

/// Every rule of SHARDED.md 5: preamble, checksums, Verifier, semantics.
/// Errors are kCorrupt / kUnsupportedVersion / kChecksumMismatch naming
/// `name` and the byte offset.
Result<Manifest> DecodeManifest(std::span<const std::byte> bytes,
                                const std::string& name);

/// A Status on the wire and back.
std::vector<std::byte> EncodeStatus(const Status& s);
Status DecodeStatus(std::span<const std::byte> bytes);

/// What a rank tells the coordinator at commit, besides its tensors.
struct ReportHead {
  uint32_t rank = 0;
  uint32_t world_size = 0;
  Status status;
  ShardFileInfo file;
  bool has_globals = false;
  /// The checkpoint directory the rank saved to (CleanDir of its `dir`).
  std::string dir;
};
/// A rank's report: its head and its tensors, chunk file 0 meaning its
/// own file. A tensor may have no chunks (it declares dtype and shape);
/// zero-size chunks declare the same and are dropped at the merge.
std::vector<std::byte> EncodeReport(const ReportHead& head,
                                    const TensorTable& tensors);
/// A decoded report: views of its tensors into the bytes it keeps (moves
/// keep them valid; copies would not).
struct DecodedReport {
  DecodedReport() = default;
  DecodedReport(DecodedReport&&) = default;
  DecodedReport& operator=(DecodedReport&&) = default;
  DecodedReport(const DecodedReport&) = delete;
  DecodedReport& operator=(const DecodedReport&) = delete;
  ReportHead head;
  std::vector<TensorRef> tensors;
  std::vector<std::byte> bytes;
  std::vector<uint64_t> aligned;  // a copy of `bytes` when misaligned
};
/// kCorrupt naming `rank` when the bytes are not a report of that rank
/// (the Verifier, and columns that do not add up).
Result<DecodedReport> DecodeReport(std::vector<std::byte> bytes, uint32_t rank);

/// What the coordinator broadcasts after the commit (or its failure).
std::vector<std::byte> EncodeOutcome(const Result<CommitInfo>& r);
Result<CommitInfo> DecodeOutcome(std::span<const std::byte> bytes,
                                 const std::string& dir);

/// "[0:3, 4:8]": a box in errors.
std::string BoxString(const Box& b);

}  // namespace ckpt::dist::internal

namespace ckpt::dist::internal {

/// The failure of the lowest failing rank ("rank R of W failed: ..."),
/// noting how many more failed; OK when none did.
Status FirstRankFailure(const std::vector<Status>& per_rank, int world);

/// Test builds' fault injection: called at the named phases of a save
/// ("committing" on every rank as CommitSave starts, "described" on every
/// rank once its report is made, "before_manifest", "before_rename",
/// "after_rename" on the coordinator). Not for users.
using FaultHook = void (*)(const char* phase, int rank);
void SetFaultHook(FaultHook hook);
void Fault(const char* phase, int rank);

/// The class tag of a global tensor's placeholder in the globals tree
/// (docs/SHARDED.md 3): an empty dict carrying it (AddGlobalTensor, which
/// the Python package calls too).
inline constexpr std::string_view kGlobalTensorTag = "ckpt.dist.GlobalTensor";

/// f() (a Result) with any exception it throws returned as the IoError
/// "<what> failed: ...": for the coordinator's work between two
/// collectives, which no exception may skip (the others would wait in the
/// broadcast forever).
template <class F>
auto Guarded(const std::string& what, const std::string& file, F&& f)
    -> decltype(f()) {
  try {
    return f();
  } catch (const std::exception& e) {
    return IoError(what + " failed: " + e.what()).WithFile(file);
  } catch (...) {
    return IoError(what + " failed").WithFile(file);
  }
}

/// "shard-RRRRR-of-WWWWW.ckpt".
std::string ShardName(int rank, int world_size);
/// "<parent>/.<name>.tmp" for a save to `dir`; kInvalidArgument for a dir
/// without a name.
Result<std::string> TempDirOf(const std::string& dir);

}  // namespace ckpt::dist::internal
