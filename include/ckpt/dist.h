// Sharded checkpoints: N ranks save the pieces of their tensors in
// parallel, one ordinary ckpt file each plus a manifest that indexes them;
// any M ranks load any box of any tensor, reading only the bytes it needs.
// docs/SHARDED.md is the normative spec of the directory and the manifest.
//
// Saving, on every rank (MPI: ckpt/mpi.h's MpiComm; one process: SelfComm):
//
//   ckpt::dist::SelfComm comm;
//   std::vector<ckpt::dist::Chunk> mine = {...};   // boxes of global tensors
//   CKPT_ASSIGN_OR_RETURN(auto info, ckpt::dist::Save(comm, "run/step-200",
//   mine));
//
// or, to add trees (the state dict's structure and non-tensor values, and
// each rank's own state such as its RNG), in two phases:
//
//   CKPT_ASSIGN_OR_RETURN(std::string shard, ShardPath(dir, rank, world));
//   Writer w = ...Writer::Create(shard)...;  AddChunk(w, c)...;
//   SetShardRoot(w, ...);  Status local = w.Commit();
//   CKPT_ASSIGN_OR_RETURN(auto info, CommitSave(comm, dir, local));
//
// No communication happens before the data is written. CommitSave gathers
// one small report per rank on the coordinator, which checks that the
// chunks tile every tensor, writes the manifest and renames the temporary
// directory to `dir`: the one commit point. Every rank returns the same
// result; a failure on any rank (its message names the rank) leaves
// nothing visible.
//
// Loading, on every rank:
//
//   CKPT_ASSIGN_OR_RETURN(auto ck, ckpt::dist::ShardedCheckpoint::Open(comm,
//   dir)); std::vector<ckpt::dist::Want> wants = {{"model/w", box, out_bytes}};
//   CKPT_ASSIGN_OR_RETURN(auto plan, ck.Plan(wants));
//   CKPT_ASSIGN_OR_RETURN(auto stats, ck.Execute(plan));
//
// The coordinator reads the manifest and broadcasts it; each rank plans
// alone, in O(log C + k) per wanted box for C chunks of which k meet it,
// and reads exactly the byte runs of those intersections.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ckpt/box.h"
#include "ckpt/format.h"
#include "ckpt/reader.h"
#include "ckpt/status.h"
#include "ckpt/writer.h"

namespace ckpt::dist {

// ---- communication -----------------------------------------------------

/// The few collectives the protocol needs, over bytes. Implementations:
/// SelfComm (one process), MpiComm (ckpt/mpi.h, target ckpt::mpi), and the
/// Python package's torch.distributed adapter. Every rank of the group
/// must make the same calls in the same order. A failure of the transport
/// itself is a kIoError on the rank that sees it.
class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// Every rank passes `mine`; rank `root` gets everyone's, in rank order
  /// (its own included); the others get an empty vector.
  virtual Result<std::vector<std::vector<std::byte>>> Gather(
      int root, std::span<const std::byte> mine) = 0;
  /// Rank `root`'s `bytes` reach every rank (`bytes` is ignored elsewhere).
  virtual Result<std::vector<std::byte>> Broadcast(
      int root, std::span<const std::byte> bytes) = 0;
};

/// A group of one: rank 0 of 1.
class SelfComm final : public Comm {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  Result<std::vector<std::vector<std::byte>>> Gather(
      int root, std::span<const std::byte> mine) override;
  Result<std::vector<std::byte>> Broadcast(
      int root, std::span<const std::byte> bytes) override;
};

/// Collective: every rank returns the same Status, OK only when every
/// rank's `local` is OK; otherwise the failure of the lowest failing rank,
/// its message prefixed by "rank R" and followed by how many other ranks
/// failed. A transport failure is returned as is.
Status Agree(Comm& comm, const Status& local, int root = 0);

// ---- saving --------------------------------------------------------------

/// One box of a global tensor, as a rank holds it: `data` is the box's
/// elements, dense and row-major (C order). A tensor held whole by several
/// ranks (data parallelism) is a chunk with replica_count > 1 on each of
/// them, with replica_index 0..count-1: each replica then writes only its
/// ReplicaPart, so the bytes are written once and by all of them.
struct Chunk {
  std::string path;  ///< the tensor's path (DESIGN.md contract)
  DType dtype = DType::kInvalid;
  std::vector<int64_t> global_shape;
  Box box;
  std::span<const std::byte> data;
  uint32_t replica_index = 0;
  uint32_t replica_count = 1;
};

/// The part of `box` that replica `index` of `count` writes: dim 0 cut into
/// `count` blocks of near-equal rows (the first rows % count blocks one row
/// longer), block `index`; a 0-d box goes whole to replica
/// XXH3(path) % count. nullopt when that replica writes nothing (fewer rows
/// than replicas, or an empty box).
std::optional<Box> ReplicaPart(std::string_view path, const Box& box,
                               uint32_t index, uint32_t count);

struct SaveOptions {
  /// The rank that validates, writes the manifest and commits.
  int coordinator = 0;
  /// Replace an existing sharded checkpoint at `dir` atomically (renameat2
  /// RENAME_EXCHANGE, then the old directory is removed, whatever else it
  /// held). Off: an existing `dir` is an error. Either way an empty
  /// directory at `dir` is replaced (one rename), and anything that is
  /// not a sharded checkpoint is never replaced.
  bool overwrite = false;
  /// Options of the shard files Save writes (sync off is for tests only:
  /// it gives up durability, for the manifest and directories too).
  WriteOptions write;
  /// String metadata of the manifest (docs/SHARDED.md), e.g. "step".
  std::vector<std::pair<std::string, std::string>> metadata;
};

/// Where rank `rank` of `world_size` writes its shard file for a save to
/// `dir`: "<parent>/.<name>.tmp/shard-RRRRR-of-WWWWW.ckpt". Creates the
/// temporary directory (and `dir`'s parent) if needed. kInvalidArgument
/// for a bad rank or a `dir` without a name; kIoError (directory not
/// writable) naming the directory.
Result<std::string> ShardPath(const std::string& dir, int rank, int world_size);

/// What a rank's shard file holds, recorded while it is written (given to
/// AddChunk and SetShardRoot) and sealed once the Writer committed, so
/// that CommitSave takes the rank's report from memory instead of opening
/// the file again and walking its tree (for a 10k-chunk shard that read
/// back was most of the commit's latency). Optional: CommitSave without
/// one reads the file back as before.
class ShardRecord {
 public:
  ShardRecord();
  ShardRecord(ShardRecord&&) noexcept;
  ShardRecord& operator=(ShardRecord&&) noexcept;
  ~ShardRecord();
  /// After `w.Commit()` succeeded: takes the file's size and header
  /// checksum and each chunk's byte offset from `w`. kInvalidArgument if
  /// `w` has not committed or SetShardRoot was not given this record.
  Status Seal(const Writer& w);
  bool sealed() const;

  /// A sealed record as bytes, to carry it to the process that commits
  /// (ckpt.dcp: DCP gathers each rank's write results to its coordinator).
  /// kInvalidArgument if not sealed.
  Result<std::vector<std::byte>> Serialize() const;
  /// The record of rank `rank` from Serialize()'s bytes, sealed (its
  /// path is not carried: the commit finds the file by name and size).
  /// kCorrupt for bytes that are not one.
  static Result<ShardRecord> Deserialize(std::span<const std::byte> bytes,
                                         int rank);

 private:
  friend struct ShardRecordAccess;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Adds one chunk to a shard file being written: its part (ReplicaPart) as
/// a contiguous tensor plus its place in the global tensor. Returns the
/// node to pass to SetShardRoot, or nullopt when this replica writes
/// nothing of it. kInvalidArgument naming the path for a bad dtype, a box
/// outside the global shape, data of the wrong size, or (with `record`) a
/// chunk of a path added before with another dtype or global shape.
Result<std::optional<NodeId>> AddChunk(Writer& w, const Chunk& chunk,
                                       ShardRecord* record = nullptr);

/// A placeholder for a global tensor in the globals tree (where the
/// tensor sits in the state dict): its tree path must be the path its
/// chunks give. Consolidation puts the assembled tensor there.
Result<NodeId> AddGlobalTensor(Writer& w);

/// Sets the shard file's root (docs/SHARDED.md 3): the chunks added, the
/// globals tree (written by one rank, the coordinator by default) and this
/// rank's own tree, either may be absent. Records rank and world size in
/// the file's metadata.
Status SetShardRoot(Writer& w, std::span<const NodeId> chunks,
                    std::optional<NodeId> globals,
                    std::optional<NodeId> rank_local, int rank, int world_size,
                    ShardRecord* record = nullptr);

struct CommitInfo {
  std::string path;          ///< the committed directory
  uint64_t total_bytes = 0;  ///< shard files and manifest
  uint32_t files = 0;        ///< shard files
  uint64_t tensors = 0;
  uint64_t chunks = 0;
};

/// Collective, after each rank committed (or failed to write) its shard
/// file at ShardPath(): `local` is that outcome. Checks and commits as the
/// header comment says; every rank returns the same result. With a sealed
/// `record` of the shard this rank wrote, its report comes from it (a
/// record of another rank, world size or directory is this rank's error).
Result<CommitInfo> CommitSave(Comm& comm, const std::string& dir,
                              const Status& local,
                              const SaveOptions& options = {},
                              const ShardRecord* record = nullptr);

/// Commits a save whose `world_size` shard files one process wrote itself
/// (tools: `ckpt shard`) or gathered the ranks' results of (ckpt.dcp):
/// CommitSave's checks and commit without a group. With `records` (one
/// sealed record per rank, in rank order) the reports come from them;
/// without, each shard file is read back.
Result<CommitInfo> CommitWritten(const std::string& dir, int world_size,
                                 const SaveOptions& options = {},
                                 std::span<const ShardRecord> records = {});

/// Builds a tree in a shard's writer; returns its root.
using TreeBuilder = std::function<Result<NodeId>(Writer&)>;

/// Both phases for a rank: writes `chunks` (and the trees, `globals` on
/// the coordinator only), then CommitSave. Without `globals`, the
/// coordinator writes nested dicts of the tensors' paths.
Result<CommitInfo> Save(Comm& comm, const std::string& dir,
                        std::span<const Chunk> chunks,
                        const SaveOptions& options = {},
                        const TreeBuilder& globals = {},
                        const TreeBuilder& rank_local = {});

// ---- the manifest ------------------------------------------------------

struct ShardFileInfo {
  std::string name;  ///< file name inside the directory
  uint64_t size = 0;
  uint64_t header_xxh3 = 0;  ///< its preamble's header checksum
  uint32_t rank = 0;         ///< the rank that wrote it
};

struct ChunkInfo {
  Box box;
  uint32_t file = 0;    ///< index into Manifest::files
  uint64_t offset = 0;  ///< absolute byte offset of the box's bytes
  uint64_t length = 0;  ///< box.numel() * element size
};

struct GlobalTensorInfo {
  std::string path;
  DType dtype = DType::kInvalid;
  std::vector<int64_t> shape;
  std::vector<ChunkInfo> chunks;  ///< non-empty boxes tiling `shape`
  uint64_t nbytes() const;
};

/// A decoded, validated manifest (docs/SHARDED.md 4).
struct Manifest {
  uint16_t version_major = 1;
  uint16_t version_minor = 0;
  uint32_t world_size = 0;
  uint32_t globals_file = 0;              ///< file holding the globals tree
  std::vector<ShardFileInfo> files;       ///< in rank order
  std::vector<GlobalTensorInfo> tensors;  ///< sorted by path
  std::vector<std::pair<std::string, std::string>> metadata;  ///< by key
  std::string producer;

  /// The tensor at `path` by binary search, or nullptr.
  const GlobalTensorInfo* Find(std::string_view path) const;
};

/// The manifest's file name inside a sharded checkpoint directory.
inline constexpr std::string_view kManifestName = "MANIFEST.ckptm";

/// True when `path` is a directory holding a manifest (no validation).
bool IsShardedCheckpoint(const std::string& path);

/// Reads and validates `dir`'s manifest alone (every rule of SHARDED.md 5
/// that needs no shard file). Errors name the manifest and byte offset.
Result<Manifest> ReadManifest(const std::string& dir);

// ---- loading -----------------------------------------------------------

/// A box of a global tensor wanted in `out`: exactly box.numel() * element
/// size bytes, filled dense and row-major.
struct Want {
  std::string path;
  Box box;
  std::span<std::byte> out;
};

/// What Plan() decided: the wants, and the strided copy patterns of their
/// intersections with saved chunks, sorted by (file, offset).
struct ReadPlan {
  struct Copy {
    uint32_t want = 0;
    uint32_t file = 0;
    RunPattern runs;  ///< src offsets absolute in the file; dst in `out`
  };
  std::vector<Want> wants;
  std::vector<Copy> copies;
  uint64_t bytes_needed = 0;  ///< sum of the wants' bytes
};

struct LoadOptions {
  /// Check the XXH3 of every checksum chunk a read touches before copying
  /// from it (at most one chunk beyond each end of a run is read extra).
  bool verify = true;
  /// Copy threads; 0 = all cores.
  unsigned threads = 0;
};

struct LoadStats {
  uint64_t bytes_needed = 0;    ///< bytes of the boxes asked for
  uint64_t bytes_read = 0;      ///< bytes read from shard files for them
  uint64_t bytes_verified = 0;  ///< bytes hashed (verify on)
  uint64_t runs = 0;            ///< contiguous reads
  uint32_t files_opened = 0;
};

/// An open sharded checkpoint. Shard files open on first use, each checked
/// against its size and header checksum in the manifest. Const members may
/// be called from several threads.
class ShardedCheckpoint {
 public:
  /// Collective: the coordinator reads the manifest and broadcasts it;
  /// every rank validates it and returns the same Status.
  static Result<ShardedCheckpoint> Open(Comm& comm, const std::string& dir,
                                        int coordinator = 0);
  /// One process: no group.
  static Result<ShardedCheckpoint> Open(const std::string& dir);
  /// One ordinary ckpt file seen as a sharded checkpoint of one rank, so
  /// that the box loaders (Plan/Execute, LoadBoxesToDevice) read slices of
  /// its tensors: each row-major tensor is one chunk, where its bytes lie
  /// in the file; tensors stored as views in another layout (a transpose
  /// saved as is) are not in its manifest. OpenShard(0) is the file.
  static Result<ShardedCheckpoint> OpenFile(const std::string& path);

  ShardedCheckpoint(ShardedCheckpoint&&) noexcept;
  ShardedCheckpoint& operator=(ShardedCheckpoint&&) noexcept;
  ~ShardedCheckpoint();

  const std::string& dir() const;
  const Manifest& manifest() const;

  /// Plans the reads of `wants` (each box inside its tensor's shape, `out`
  /// of its size). kNotFound naming a missing path; kInvalidArgument for a
  /// bad box or buffer. O(log C + k) per want.
  Result<ReadPlan> Plan(std::span<const Want> wants) const;
  /// The copies Plan() makes for one box, with no destination: for
  /// loaders that bring their own memory (LoadBoxesToDevice). `dst`
  /// offsets are into the box's dense row-major bytes; `want` is 0.
  Result<std::vector<ReadPlan::Copy>> PlanBox(std::string_view path,
                                              const Box& box) const;
  /// Reads what `plan` says into the wants' buffers. Errors name the file,
  /// offset, tensor and box (a checksum mismatch in a chunk a read
  /// touches; a shard file missing, truncated or not the one the manifest
  /// pins). Local: call Agree() to make all ranks fail together.
  Result<LoadStats> Execute(const ReadPlan& plan,
                            const LoadOptions& options = {}) const;

  /// The box of `path` as bytes: a zero-copy view of the mapping when the
  /// box is one contiguous run of one shard file, else a buffer the result
  /// owns.
  Result<StorageView> Read(std::string_view path, const Box& box,
                           const LoadOptions& options = {}) const;

  /// Shard file `index` as an ordinary checkpoint (checked against its
  /// pin): for its trees (root "globals", "rank_local").
  Result<Checkpoint> OpenShard(size_t index) const;
  /// Full path of shard file `index`.
  std::string ShardFilePath(size_t index) const;

  /// Checks the manifest, every shard file against its pin and every
  /// checksum, `threads` at a time (0 = all cores). The first problem.
  Status Verify(unsigned threads = 0) const;

 private:
  struct Impl;
  explicit ShardedCheckpoint(std::unique_ptr<Impl> impl);
  static Result<ShardedCheckpoint> FromBytes(std::span<const std::byte> bytes,
                                             const std::string& dir, bool dcp);
  Result<LoadStats> ExecuteRaw(const ReadPlan& plan,
                               const LoadOptions& options) const;
  std::unique_ptr<Impl> impl_;
};

// ---- whole files <-> sharded directories ---------------------------------

/// Writes the sharded checkpoint (or DCP directory) at `dir` as one
/// ordinary ckpt file at `out`: every global tensor assembled whole where
/// its placeholder sits in the globals tree, the "universal checkpoint".
/// Streams tensor by tensor in bounded memory; `out` appears only
/// complete. Errors name the file, tensor and box.
Status Consolidate(const std::string& dir, const std::string& out,
                   const WriteOptions& options = {});

/// How ShardFile cuts a tensor: along `dim` into world_size near-even
/// blocks (rank r the r-th), or, with dim -1, held whole by every rank
/// (replicated: written once, split across the ranks by ReplicaPart).
using ShardDimFn = std::function<int(const TensorInfo&)>;

/// The reverse of Consolidate: writes `in`'s tensors as the sharded
/// checkpoint `dir` of `world_size` ranks, cut as `dim_of` says (0-d and
/// tensors that cannot be cut go replicated), with `in`'s tree as the
/// globals tree. For tensor-parallel inference layouts.
Status ShardFile(const Checkpoint& in, const std::string& dir, int world_size,
                 const ShardDimFn& dim_of, const SaveOptions& options = {});

}  // namespace ckpt::dist
