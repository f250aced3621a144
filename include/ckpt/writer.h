// Writing ckpt files: streaming, atomic, checksummed.
//
//   CKPT_ASSIGN_OR_RETURN(ckpt::Writer w, ckpt::Writer::Create("m.ckpt"));
//   CKPT_RETURN_IF_ERROR(w.PutTensor("fc.weight", ckpt::DType::kFloat32,
//                                    {2, 3}, std::as_bytes(std::span(buf))));
//   CKPT_RETURN_IF_ERROR(w.Commit());
//
// Storages are written to a temporary file in the target's directory as they
// are added; the writer keeps no tensor bytes beyond a 1 MiB write buffer.
// Commit() writes the header, fsyncs, renames over the target and fsyncs the
// directory. A Writer destroyed before Commit() succeeds, or whose Commit()
// fails, removes its temporary file and leaves any existing target untouched.
//
// Object tree: Add*() calls create nodes and return their ids; containers
// take the ids of existing nodes, so a tree is built bottom-up and SetRoot()
// names its root. Each node may be placed in the tree once. Without SetRoot(),
// the root is a dict of everything given to PutTensor()/PutValue().
//
// The writer holds the tree to the rules of docs/FORMAT.md 7 that readers
// check: dict keys and set items hashable at every depth and pairwise
// unequal by Python's == (7.4); strings valid UTF-8; device strings in the
// grammar of 6.2. Set and frozenset items are stored in the canonical order
// (FORMAT.md 10), so the bytes do not depend on the order they were given
// in. Each file is stamped with the lowest format minor version its
// contents need (FORMAT.md 9).
//
// Not thread-safe: use one Writer from one thread at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ckpt/format.h"
#include "ckpt/status.h"

namespace ckpt {

namespace internal {
class WriterImpl;
}  // namespace internal

struct WriteOptions {
  /// Checksum chunk size, a power of two in [kMinChunkBytes, kMaxChunkBytes].
  uint64_t chunk_size = kDefaultChunkBytes;
  /// fsync the file and its directory at Commit(). Turning it off loses the
  /// crash-safety guarantee; only for tests and throwaway files.
  bool sync = true;
  /// Written to the header's producer field; must be valid UTF-8.
  std::string producer = "ckpt";
  /// Permission bits of the new file, before the umask.
  unsigned mode = 0666;
};

using NodeId = uint32_t;
using StorageId = uint32_t;

/// A tensor as a view on a storage already added.
struct TensorSpec {
  DType dtype = DType::kInvalid;
  std::vector<int64_t> shape;
  /// In elements; empty means contiguous row-major.
  std::vector<int64_t> strides;
  StorageId storage = 0;
  int64_t storage_offset = 0;  ///< in elements
  bool requires_grad = false;
  bool is_parameter = false;
};

class Writer {
 public:
  /// Creates the temporary file next to `path`. Errors: kIoError naming the
  /// directory (missing, not writable), kInvalidArgument (bad options).
  static Result<Writer> Create(const std::string& path,
                               const WriteOptions& options = {});

  Writer(Writer&&) noexcept;
  Writer& operator=(Writer&&) noexcept;
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;
  /// Removes the temporary file unless Commit() succeeded.
  ~Writer();

  // ---- storages -----------------------------------------------------------
  /// Writes a whole storage now; `bytes` may be released after the call.
  /// kInvalidArgument for a device string outside FORMAT.md 6.2 (`cpu`,
  /// `cuda`, `cuda:N` with N < 2^31 and no leading zero...).
  Result<StorageId> AddStorage(std::span<const std::byte> bytes,
                               std::string_view device = "cpu");
  /// Streams a storage of exactly `nbytes` in Append() pieces, then
  /// EndStorage(). Only one storage is open at a time.
  Result<StorageId> BeginStorage(uint64_t nbytes,
                                 std::string_view device = "cpu");
  Status Append(std::span<const std::byte> bytes);
  /// Like Append(bytes), for bytes that are also in a file: `bytes` must be
  /// the bytes.size() bytes at `offset` of the open file `fd` (typically a
  /// mapping of it). The kernel copies them file to file (copy_file_range)
  /// while the writer hashes `bytes`, so they cross user memory once, read
  /// only. Falls back to writing `bytes` where the kernel cannot copy.
  Status AppendFromFile(int fd, uint64_t offset,
                        std::span<const std::byte> bytes);
  Status EndStorage();

  // ---- tree nodes ---------------------------------------------------------
  /// A tensor node viewing a storage; checks the view fits the storage.
  Result<NodeId> AddTensor(const TensorSpec& spec);
  /// Convenience: a contiguous tensor with its own new storage.
  Result<NodeId> AddTensor(DType dtype, std::vector<int64_t> shape,
                           std::span<const std::byte> data,
                           std::string_view device = "cpu");
  NodeId AddNone();
  NodeId AddBool(bool v);
  NodeId AddInt(int64_t v);
  /// Arbitrary-size int, little-endian two's complement. Stored canonically
  /// (FORMAT.md 7.1): redundant sign bytes are dropped, and a value that
  /// fits 64 bits becomes an Int node. kInvalidArgument when no bytes are
  /// given or the value needs more than 4096 bytes (|v| > 2^32767).
  Result<NodeId> AddBigInt(std::span<const uint8_t> le_twos_complement);
  NodeId AddFloat(double v);
  NodeId AddComplex(double re, double im);
  /// `utf8` must be valid UTF-8 (FORMAT.md 6.1); Commit() refuses a tree
  /// that places a string that is not, naming its path.
  NodeId AddString(std::string_view utf8);
  NodeId AddBytes(std::span<const uint8_t> bytes);
  Result<NodeId> AddDType(DType dtype);
  /// kInvalidArgument for a device string outside FORMAT.md 6.2.
  Result<NodeId> AddDevice(std::string_view device);
  Result<NodeId> AddList(std::span<const NodeId> items);
  Result<NodeId> AddTuple(std::span<const NodeId> items);
  /// Items must be hashable (no List, Dict, Set or Tensor, not even inside
  /// a tuple) and pairwise unequal by Python's ==, else kInvalidArgument.
  /// They are stored in the canonical order, not the order given.
  Result<NodeId> AddSet(std::span<const NodeId> items);
  Result<NodeId> AddFrozenSet(std::span<const NodeId> items);
  /// keys and values are parallel. Keys must be hashable and pairwise
  /// unequal by Python's == (1, 1.0 and True are one key; 1 and "1" are
  /// two), else kInvalidArgument naming both. `type_name` must be UTF-8.
  Result<NodeId> AddDict(std::span<const NodeId> keys,
                         std::span<const NodeId> values,
                         std::string_view type_name = "");
  /// Sets the class tag of a Tensor or Dict node (docs/FORMAT.md 7.1):
  /// "numpy.ndarray" marks a tensor that loads back as a numpy array;
  /// "collections.OrderedDict" a dict. kInvalidArgument for another kind.
  Status SetTypeName(NodeId node, std::string_view type_name);
  /// Makes `node` the root of the tree.
  Status SetRoot(NodeId node);

  /// Convenience for flat state dicts: adds `name -> tensor` to the implicit
  /// root dict (only when SetRoot() is not used).
  Status PutTensor(std::string_view name, DType dtype,
                   std::vector<int64_t> shape, std::span<const std::byte> data,
                   std::string_view device = "cpu");
  /// Adds `name -> node` to the implicit root dict.
  Status PutValue(std::string_view name, NodeId node);

  /// String metadata (safetensors' __metadata__); a key set twice keeps the
  /// last value. kInvalidArgument if key or value is not valid UTF-8.
  Status SetMetadata(std::string_view key, std::string_view value);

  /// Finishes the file and publishes it atomically under its final name.
  /// Errors: kInvalidArgument (a tensor not in the tree, a node used twice,
  /// two tensors with one path, equal keys given to PutTensor/PutValue, a
  /// string that is not UTF-8, nesting deeper than 1000, an open storage),
  /// kIoError (disk full...).
  /// After an error the writer is aborted.
  Status Commit();
  /// Drops everything written; the target is untouched. Idempotent.
  void Abort();

  /// Bytes written to the temporary file so far.
  uint64_t bytes_written() const;

  /// The absolute byte offset at which storage `id` lies in the file (the
  /// offset a reader's StorageInfo gives once it is committed), known from
  /// BeginStorage()/AddStorage() on. kInvalidArgument for an unknown id.
  Result<uint64_t> StorageOffset(StorageId id) const;
  /// After a successful Commit(): the file's size and its header checksum
  /// (the preamble's XXH3-64 of the header), as a reader of it finds them.
  struct Committed {
    uint64_t file_size = 0;
    uint64_t header_xxh3 = 0;
  };
  std::optional<Committed> committed() const;
  /// The path the file is published at (Create()'s `path`).
  const std::string& path() const;

 private:
  explicit Writer(std::unique_ptr<internal::WriterImpl> impl);
  std::unique_ptr<internal::WriterImpl> impl_;
};

}  // namespace ckpt
