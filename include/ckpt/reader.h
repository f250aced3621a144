// Reading ckpt files: open in O(header), zero-copy tensor views, row slices,
// the typed object tree, and full verification.
//
//   CKPT_ASSIGN_OR_RETURN(ckpt::Checkpoint ck, ckpt::Checkpoint::Open(path));
//   CKPT_ASSIGN_OR_RETURN(ckpt::TensorRef w, ck.Tensor("model/fc.weight"));
//   const float* p = reinterpret_cast<const float*>(w.data().data());
//
// Lifetime: a Checkpoint, and every TensorRef and Value taken from it, share
// ownership of the open file (mapping or descriptor). Any of them may outlive
// the others; the file is unmapped and closed when the last one goes.
//
// Files changed under an open handle: Open() copies the verified header
// into memory the handle owns, so metadata, tables and the object tree
// never touch the file again and cannot fault, whatever happens to it.
// Tensor bytes are another matter. With the mmap backend they are the
// file's pages: if another process truncates or rewrites the file in place
// (cp over it, torch.save to the same path, rsync --inplace), touching a
// view of the lost range raises SIGBUS, as with every mmap reader
// (torch.load(mmap=True), safetensors). Avoid it by replacing files
// atomically - ckpt's writers always do: a new inode is renamed over the
// old name and existing views keep the old bytes - or read copies with
// Backend::kPread, which turns a vanished range into a kIoError.
//
// Thread safety: all const member functions may be called concurrently.
#pragma once

#include <complex>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ckpt/format.h"
#include "ckpt/status.h"

namespace ckpt {

namespace internal {
struct CheckpointImpl;
struct CheckpointAccess;
}  // namespace internal

/// How file bytes are reached.
enum class Backend {
  /// Map the whole file (Boost.Interprocess); tensors are zero-copy views.
  kMmap,
  /// pread() each requested range into memory the TensorRef owns. For
  /// network file systems (NFS, Lustre, FUSE) where page-sized mmap faults
  /// are pathological.
  kPread,
};

struct ReadOptions {
  Backend backend = Backend::kMmap;
  /// Hash every checksum chunk a tensor read touches and fail with
  /// kChecksumMismatch on a difference. Off by default: hashing a 100 GB
  /// file would defeat zero-copy. Checkpoint::Verify() checks everything.
  bool verify_checksums = false;
  /// kMmap only: pre-fault the whole mapping at open (MAP_POPULATE), which
  /// makes open O(file) but later first touches free.
  bool populate = false;
  /// kMmap only: Storage() returns writable views. The file itself stays
  /// mapped read-only and shared (no commit charge, so files larger than
  /// RAM + swap open); the storages asked for are served from private
  /// copy-on-write mappings of 1 GiB windows of the file (a storage that
  /// crosses a window boundary gets its own), made on first request, so
  /// every request for a storage returns the same pages. Views stay
  /// zero-copy and share the page cache until written; a write changes
  /// only this process's copy of the page, never the file, and is seen
  /// only through Storage() - Tensor(), CopyTo, ReadStorage and
  /// StreamTensor read the file. For callers that hand views to code
  /// expecting writable memory (the Python binding's `mmap=True`,
  /// `ckpt.open`).
  bool copy_on_write = false;
};

/// Where and how a tensor lies; no bytes.
struct TensorInfo {
  std::string path;
  DType dtype = DType::kInvalid;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  ///< in elements
  uint32_t storage = 0;          ///< index of the storage it views
  int64_t storage_offset = 0;    ///< in elements
  bool requires_grad = false;
  bool is_parameter = false;
  /// Position in the file's tensor table (sorted by path): the `index` of
  /// TensorInfoAt and TensorAt, and Value::tensor_index(). SIZE_MAX for
  /// the whole-storage byte tensors LoadStoragesToDevice makes.
  size_t index = 0;

  int64_t numel() const;
  /// numel() * element size: the bytes of a contiguous copy.
  uint64_t nbytes() const;
  /// Row-major with no gaps (size-1 dimensions ignored).
  bool is_contiguous() const;
};

/// A storage's bytes plus whatever keeps them alive.
struct StorageView {
  std::span<const std::byte> data;
  std::shared_ptr<const void> owner;
};

struct StorageInfo {
  uint64_t offset = 0;  ///< absolute byte offset of the blob
  uint64_t nbytes = 0;
  std::string device;  ///< saved device: "cpu", "cuda:1"...
};

/// A tensor's bytes plus its layout. Holds the file open; cheap to copy.
class TensorRef {
 public:
  TensorRef() = default;

  const TensorInfo& info() const { return info_; }
  DType dtype() const { return info_.dtype; }
  const std::vector<int64_t>& shape() const { return info_.shape; }
  const std::vector<int64_t>& strides() const { return info_.strides; }
  int64_t numel() const { return info_.numel(); }
  bool is_contiguous() const { return info_.is_contiguous(); }

  /// Bytes from the tensor's first element through its last, little-endian.
  /// For a contiguous tensor this is exactly nbytes() bytes in row-major
  /// order; otherwise index with strides(). Read-only: with the mmap
  /// backend these are the file's pages.
  std::span<const std::byte> data() const { return data_; }

  /// Writes the elements in row-major contiguous order into `out`, which
  /// must hold exactly info().nbytes() bytes (kInvalidArgument otherwise).
  Status CopyTo(std::span<std::byte> out) const;
  /// Writes bytes [begin, begin + out.size()) of that row-major copy:
  /// walks any view (strided, or a stride-0 expand of 2^40 elements) piece
  /// by piece through a buffer of the caller's size. `begin` and
  /// out.size() must be whole elements within nbytes() (kInvalidArgument).
  Status CopyTo(std::span<std::byte> out, uint64_t begin) const;

 private:
  friend struct internal::CheckpointImpl;
  TensorInfo info_;
  std::span<const std::byte> data_;
  std::shared_ptr<const void> owner_;
};

/// A node of the object tree. Holds the file open; cheap to copy.
/// Accessors for the wrong kind return a zero value ("", 0, empty); check
/// kind() first. Strings and byte spans point into the header and stay
/// valid while this Value (or any handle on the same file) lives.
class Value {
 public:
  ValueKind kind() const;
  bool is_container() const;  ///< List, Tuple, Dict, Set, FrozenSet

  bool as_bool() const;
  int64_t as_int() const;
  double as_float() const;
  std::complex<double> as_complex() const;
  /// String and Device nodes.
  std::string_view as_string() const;
  /// Bytes nodes; BigInt nodes (little-endian two's complement).
  std::span<const uint8_t> as_bytes() const;
  DType as_dtype() const;
  /// Class tag of a Dict ("collections.OrderedDict", "argparse.Namespace")
  /// or a Tensor ("numpy.ndarray"), or "".
  std::string_view type_name() const;

  /// Number of elements (containers) or 0.
  size_t size() const;
  /// i-th element (i-th value of a Dict). Precondition: i < size().
  Value item(size_t i) const;
  /// i-th key of a Dict. Precondition: kind() == kDict, i < size().
  Value key(size_t i) const;
  /// The child named by one unescaped path segment: a Dict key whose path
  /// form (docs/FORMAT.md 7.3) equals it, or a decimal sequence index.
  Result<Value> Child(std::string_view segment) const;

  /// The tensor a kTensor node refers to.
  Result<TensorInfo> tensor_info() const;
  /// Its index in the tensor table (TensorInfo::index; Checkpoint::TensorAt).
  Result<size_t> tensor_index() const;
  Result<TensorRef> tensor() const;

  /// Path-segment form of this node used as a Dict key (FORMAT.md 7.3).
  std::string KeySegment() const;
  /// Byte offset in the file of this node's table in the header: where an
  /// error about the node points.
  int64_t file_offset() const;
  /// Decimal digits of a BigInt (or Int) node, with '-' if negative.
  std::string BigIntToDecimal() const;

 private:
  friend class Checkpoint;
  friend struct internal::CheckpointImpl;
  std::shared_ptr<const internal::CheckpointImpl> impl_;
  uint32_t node_ = 0;
};

struct VerifyOptions {
  /// Worker threads hashing chunks; 0 = std::thread::hardware_concurrency().
  unsigned threads = 0;
};

/// An open ckpt file. Move-only handle; Share() gives another handle on the
/// same open file (the mapping lives until the last handle, TensorRef,
/// StorageView and Value from it is gone). All const members are safe to
/// call from several threads at once.
class Checkpoint {
 public:
  /// Opens `path`, checks the preamble, verifies the header (checksum,
  /// FlatBuffers Verifier, every rule of docs/FORMAT.md that needs no data
  /// bytes) and bounds-checks every storage and tensor extent. Cost is
  /// O(header), independent of the data size.
  /// Errors: kNotFound (no such file), kIoError, kCorrupt,
  /// kUnsupportedVersion, kChecksumMismatch (header); each names the file
  /// and byte offset.
  static Result<Checkpoint> Open(const std::string& path,
                                 const ReadOptions& options = {});
  /// Same checks over bytes in memory. Borrows `bytes`: the caller keeps
  /// them alive and unchanged while anything from this Checkpoint lives.
  static Result<Checkpoint> OpenBuffer(std::span<const std::byte> bytes,
                                       std::string name = "<buffer>");

  Checkpoint(Checkpoint&&) noexcept = default;
  Checkpoint& operator=(Checkpoint&&) noexcept = default;
  Checkpoint(const Checkpoint&) = delete;
  Checkpoint& operator=(const Checkpoint&) = delete;
  ~Checkpoint();

  /// Another handle on the same open file, sharing its mapping (no I/O):
  /// for a component that must keep the file open on its own, as the GPU
  /// loader does.
  Checkpoint Share() const { return Checkpoint(impl_); }

  // Facts of the open file, read from the verified preamble and header
  // (no I/O, never fail).

  /// The path given to Open, or OpenBuffer's name: what errors call it.
  const std::string& path() const;
  /// How the bytes are reached (kMmap: TensorRef data points into the
  /// file's mapping).
  Backend backend() const;
  /// Size in bytes when opened.
  uint64_t file_size() const;
  /// The format version the file says (docs/FORMAT.md 11).
  uint16_t format_major() const;
  uint16_t format_minor() const;
  /// Bytes per checksum chunk (a power of two in [4096, 2^30]).
  uint64_t chunk_size() const;
  /// The writer's free-text producer ("ckpt 0.2.0"); "" if absent. Valid
  /// while any handle on the file lives.
  std::string_view producer() const;
  /// Where the sections lie (docs/FORMAT.md 2), from the preamble.
  struct Layout {
    uint64_t data_offset = 0;  ///< start of the data section
    uint64_t data_size = 0;
    uint64_t header_offset = 0;  ///< start of the FlatBuffers header
    uint64_t header_size = 0;
    /// XXH3-64 of the header, as the preamble holds it (verified at
    /// open): what pins a shard file in a sharded checkpoint's manifest.
    uint64_t header_xxh3 = 0;
  };
  Layout layout() const;

  /// Tensors sorted by path.
  size_t num_tensors() const;
  /// Every tensor path, sorted (the table's order): views into the header,
  /// valid while this Checkpoint (or a Share() of it) lives. The cheap way
  /// to list names: no TensorInfo is built. Not on a temporary Checkpoint.
  std::vector<std::string_view> TensorPaths() const&;
  std::vector<std::string_view> TensorPaths() const&& = delete;
  /// What the tensor at position `index` is (no data read): for listing
  /// every tensor, `for (i < num_tensors()) TensorInfoAt(i)`.
  /// kInvalidArgument for index >= num_tensors().
  Result<TensorInfo> TensorInfoAt(size_t index) const;
  /// What the tensor at `path` is (no data read), by an O(log n) search of
  /// the sorted table. kNotFound if absent.
  Result<TensorInfo> FindTensor(std::string_view path) const;
  /// Bytes of the tensor at `path` (zero-copy with kMmap).
  Result<TensorRef> Tensor(std::string_view path) const;
  /// Rows [begin, end) of dim 0 as a tensor of shape (end-begin, ...).
  /// kInvalidArgument for a 0-dim tensor or a range outside [0, shape[0]].
  Result<TensorRef> TensorRows(std::string_view path, int64_t begin,
                               int64_t end) const;
  /// Bytes of the tensor at position `index` (TensorInfo::index).
  /// kInvalidArgument for index >= num_tensors().
  Result<TensorRef> TensorAt(size_t index) const;

  /// Storages (the blobs tensors view) in offset order.
  size_t num_storages() const;
  /// Offset, size and saved device of storage `index` (no data read).
  /// kInvalidArgument for index >= num_storages().
  Result<StorageInfo> StorageInfoAt(size_t index) const;
  /// All bytes of storage `index`: a view of the mapping (kMmap), or a copy
  /// owned by the result (kPread). With ReadOptions::copy_on_write the
  /// view's pages may be written (privately; every call for the same
  /// storage returns the same pages). kInvalidArgument for a bad index;
  /// kIoError if the kernel refuses the private mapping.
  Result<StorageView> Storage(size_t index) const;
  /// Copies bytes [begin, begin + out.size()) of storage `index` into
  /// `out` with pread(), which costs no page faults on the mapping: the
  /// fast way to fill freshly allocated memory from a warm or cold file.
  /// kInvalidArgument for a bad index or range, kIoError naming the offset.
  Status ReadStorage(size_t index, uint64_t begin,
                     std::span<std::byte> out) const;
  /// One copy for ReadStorages: bytes [begin, begin + out.size()) of
  /// storage `storage` into `out`.
  struct StorageRead {
    size_t storage = 0;
    uint64_t begin = 0;
    std::span<std::byte> out;
  };
  /// ReadStorage for many ranges at once, `threads` copies at a time (0 =
  /// all cores), each range cut into 8 MiB pieces so that one big storage
  /// also spreads over the threads. Every range is checked before anything
  /// is copied (kInvalidArgument naming the read); otherwise the first
  /// error by position in `reads`. Never throws; safe to call from several
  /// threads. What a loader filling freshly allocated tensors calls.
  Status ReadStorages(std::span<const StorageRead> reads,
                      unsigned threads = 0) const;

  /// Calls `sink` with the elements of `tensor` (a TensorRef of this file)
  /// in row-major contiguous order, little-endian, in pieces of at most
  /// `piece` bytes (whole elements), in bounded memory whatever the
  /// tensor's size or strides: mapped pages already passed are released
  /// from this process as it goes, so RSS stays about `piece` plus a few
  /// MiB. Stops at, and returns, the first non-OK status from `sink`.
  Status StreamTensor(
      const TensorRef& tensor,
      const std::function<Status(std::span<const std::byte>)>& sink,
      size_t piece = size_t{1} << 20) const;

  /// Root of the object tree.
  Value root() const;
  /// The node at a tensor path (DESIGN.md contract). kNotFound naming the
  /// first missing segment.
  Result<Value> Get(std::string_view path) const;

  /// String metadata, sorted by key.
  std::vector<std::pair<std::string, std::string>> metadata() const;
  /// kNotFound if absent.
  Result<std::string> Metadata(std::string_view key) const;

  /// Makes the whole data section resident and mapped now, with
  /// `threads` threads (0 = all cores), so later reads of any tensor take
  /// no page faults: a full load into memory without a copy. No-op with the
  /// pread backend. kIoError if the kernel refuses.
  Status Prefetch(unsigned threads = 0) const;

  /// Checks every checksum chunk, zero padding, and the rules that need the
  /// tree walked (each tensor's path is its tree position), using all cores.
  /// Returns the problem at the lowest byte offset: kChecksumMismatch
  /// naming the tensor(s) on the chunk and the chunk's offset, or kCorrupt.
  Status Verify(const VerifyOptions& options = {}) const;

 private:
  // What the library's own loaders need beyond this API (whole storages as
  // tensors, checksums of a range): lib/reader_internal.h.
  friend struct internal::CheckpointAccess;
  explicit Checkpoint(std::shared_ptr<const internal::CheckpointImpl> impl)
      : impl_(std::move(impl)) {}
  std::shared_ptr<const internal::CheckpointImpl> impl_;
};

}  // namespace ckpt
