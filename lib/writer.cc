#include "ckpt/writer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <future>
#include <map>
#include <optional>

#include "atomic_file.h"
#include "checksum_internal.h"
#include "header_internal.h"
#include "tree_internal.h"

namespace ckpt {
namespace internal {

namespace {
// Small writes (padding, small blobs, the header) are gathered into one
// buffer of this size; larger appends go straight from the caller's memory.
constexpr size_t kWriteBufferBytes = 1u << 20;
constexpr uint32_t kClassNotYet = KeyClasses::kUnhashable - 1;
constexpr uint32_t kClassTooDeep = KeyClasses::kUnhashable - 2;
// Appends at least this large hash on a second thread while writing.
constexpr size_t kOverlapHashBytes = 1u << 20;
// With sync, writeback is started every time this much more is written,
// so that the fsync at Commit waits for the tail only.
constexpr uint64_t kWritebackBytes = 16u << 20;
}  // namespace

class WriterImpl {
 public:
  WriterImpl(AtomicFile file, WriteOptions options)
      : file_(std::move(file)), options_(std::move(options)) {
    buf_.reserve(kWriteBufferBytes);
  }

  Status Start() {
    // Preamble placeholder (rewritten at commit) and zeros up to the data
    // section.
    return PadTo(kPageBytes);
  }

  // ---- raw output -----------------------------------------------------------
  Status Write(std::span<const std::byte> bytes) {
    if (bytes.size() >= kWriteBufferBytes / 2) {
      CKPT_RETURN_IF_ERROR(Flush());
      CKPT_RETURN_IF_ERROR(file_.Write(bytes));
      pos_ += bytes.size();
      KickWriteback();
      return Status::OK();
    }
    if (buf_.size() + bytes.size() > kWriteBufferBytes) {
      CKPT_RETURN_IF_ERROR(Flush());
    }
    buf_.insert(buf_.end(), bytes.begin(), bytes.end());
    pos_ += bytes.size();
    return Status::OK();
  }

  Status Flush() {
    if (buf_.empty()) return Status::OK();
    Status s = file_.Write(buf_);
    buf_.clear();
    if (s.ok()) KickWriteback();
    return s;
  }

  // With sync, starts writeback of what reached the file since the last
  // kick, once that is kWritebackBytes: the disk works while we write.
  void KickWriteback() {
    uint64_t end = file_.size();
    if (options_.sync && end - kicked_ >= kWritebackBytes) {
      file_.StartWriteback(kicked_, end - kicked_);
      kicked_ = end;
    }
  }

  Status PadTo(uint64_t target) {
    static const std::array<std::byte, 4096> zeros{};
    while (pos_ < target) {
      uint64_t n = std::min<uint64_t>(zeros.size(), target - pos_);
      CKPT_RETURN_IF_ERROR(Write({zeros.data(), static_cast<size_t>(n)}));
    }
    return Status::OK();
  }

  // Any I/O failure aborts the writer: the temporary is gone, the target
  // untouched, and later calls say so.
  Status Fail(Status s) {
    if (!s.ok()) {
      failed_ = s;
      file_.Abort();
    }
    return s;
  }
  Status CheckUsable() const {
    if (committed_) {
      return InvalidArgument("writer already committed")
          .WithFile(file_.target());
    }
    if (!failed_.ok()) {
      return failed_.WithContext("writer was aborted by an earlier error");
    }
    return Status::OK();
  }

  // ---- storages
  // ---------------------------------------------------------------
  Result<StorageId> BeginStorage(uint64_t nbytes, std::string_view device) {
    CKPT_RETURN_IF_ERROR(CheckUsable());
    if (open_) {
      return InvalidArgument("BeginStorage while storage " +
                             std::to_string(storages_.size() - 1) +
                             " is still open");
    }
    if (auto problem = DeviceProblem(device)) {
      return InvalidArgument("invalid device string: " + *problem);
    }
    if (storages_.size() >= UINT32_MAX) {
      return InvalidArgument("too many storages");
    }
    auto offset = AlignUp(pos_, BlobAlignment(nbytes));
    if (!offset) return InvalidArgument("file would exceed 2^64 bytes");
    CKPT_RETURN_IF_ERROR(Fail(PadTo(*offset)));
    storages_.push_back({*offset, nbytes, std::string(device), {}});
    storages_.back().hashes.reserve(
        static_cast<size_t>(nbytes / options_.chunk_size + 1));
    open_ = true;
    remaining_ = nbytes;
    in_chunk_ = 0;
    hasher_.Reset();
    return static_cast<StorageId>(storages_.size() - 1);
  }

  // With `fd` >= 0, `bytes` are the bytes at `fd_offset` of file `fd`, and
  // the kernel copies them file to file while this process only hashes.
  Status Append(std::span<const std::byte> bytes, int fd = -1,
                uint64_t fd_offset = 0) {
    CKPT_RETURN_IF_ERROR(CheckUsable());
    if (!open_) return InvalidArgument("Append without BeginStorage");
    if (bytes.size() > remaining_) {
      return InvalidArgument("Append of " + std::to_string(bytes.size()) +
                             " bytes exceeds the storage's remaining " +
                             std::to_string(remaining_));
    }
    remaining_ -= bytes.size();
    auto write = [&]() -> Status {
      if (fd >= 0) {
        CKPT_RETURN_IF_ERROR(Flush());
        bool copied = false;
        CKPT_RETURN_IF_ERROR(
            file_.CopyFrom(fd, fd_offset, bytes.size(), &copied));
        if (copied) {
          pos_ += bytes.size();
          KickWriteback();
          return Status::OK();
        }
      }
      return Write(bytes);
    };
    if (bytes.size() < kOverlapHashBytes) {
      Hash(bytes);
      return Fail(write());
    }
    // Large pieces: hash on a second thread while this one writes the same
    // (read-only) bytes, so a save costs max(hash, write), not their sum.
    auto hashing =
        std::async(std::launch::async, [this, bytes] { Hash(bytes); });
    Status s = write();
    hashing.get();
    return Fail(s);
  }

  // Feeds the open storage's bytes to the hasher in chunk-sized pieces, so
  // each chunk's digest is taken at its end.
  void Hash(std::span<const std::byte> bytes) {
    std::span<const std::byte> rest = bytes;
    while (!rest.empty()) {
      uint64_t take =
          std::min<uint64_t>(rest.size(), options_.chunk_size - in_chunk_);
      hasher_.Update(rest.first(static_cast<size_t>(take)));
      in_chunk_ += take;
      rest = rest.subspan(static_cast<size_t>(take));
      if (in_chunk_ == options_.chunk_size) {
        storages_.back().hashes.push_back(hasher_.Digest());
        hasher_.Reset();
        in_chunk_ = 0;
      }
    }
  }

  Status EndStorage() {
    CKPT_RETURN_IF_ERROR(CheckUsable());
    if (!open_) return InvalidArgument("EndStorage without BeginStorage");
    if (remaining_ != 0) {
      return InvalidArgument("storage " + std::to_string(storages_.size() - 1) +
                             " ended with " + std::to_string(remaining_) +
                             " of its bytes missing");
    }
    if (in_chunk_ > 0) storages_.back().hashes.push_back(hasher_.Digest());
    open_ = false;
    const StorageRec& s = storages_.back();
    if (s.nbytes >= kLargeBlobBytes) {
      return Fail(PadTo(*AlignUp(s.offset + s.nbytes, kPageBytes)));
    }
    return Status::OK();
  }

  // ---- nodes
  // --------------------------------------------------------------------
  // A node, in 56 bytes: a converted pickle of millions of numbers makes
  // millions of them. Children live in one shared array (ids_), and text,
  // bytes and class tags, which most nodes lack, in a side table
  // (extras_); a node's value fields are format.h's NodeValue spread out.
  struct NodeRec {
    ValueKind kind = ValueKind::kNone;
    // For an unhashable node, the kind that makes it so.
    ValueKind unhashable_kind = ValueKind::kNone;
    // Equality class as a dict key or set item (KeyClasses), computed when
    // first needed.
    uint32_t cls = kClassNotYet;
    int64_t int_value = 0;
    double float_value = 0;
    double imag_value = 0;
    uint64_t items_at = 0;  // items: ids_[items_at, +num_items)
    uint32_t num_items = 0;
    uint32_t extra = kNoExtra;  // index into extras_
    // A dict's keys follow its items in ids_.
  };
  struct Extra {
    std::string text;
    std::vector<uint8_t> bytes;
    std::string type_name;
  };
  static constexpr uint32_t kNoExtra = UINT32_MAX;

  std::span<const NodeId> Items(const NodeRec& r) const {
    return {ids_.data() + r.items_at, r.num_items};
  }
  std::span<const NodeId> Keys(const NodeRec& r) const {
    if (r.kind != ValueKind::kDict) return {};
    return {ids_.data() + r.items_at + r.num_items, r.num_items};
  }
  const Extra& ExtraOf(const NodeRec& r) const {
    static const Extra kNone;
    return r.extra == kNoExtra ? kNone : extras_[r.extra];
  }
  Extra& MutableExtra(NodeRec& r) {
    if (r.extra == kNoExtra) {
      r.extra = static_cast<uint32_t>(extras_.size());
      extras_.emplace_back();
    }
    return extras_[r.extra];
  }

  KeyNode Describe(const NodeRec& r) const {
    const Extra& x = ExtraOf(r);
    return KeyNode{r.kind, r.int_value, r.float_value, r.imag_value,
                   x.text, x.bytes,     r.num_items};
  }
  KeyNode DescribeId(uint32_t id) const { return Describe(nodes_[id]); }
  uint32_t ItemOf(uint32_t id, size_t i) const { return Items(nodes_[id])[i]; }

  std::string KeySegment(NodeId id) const {
    return KeySegmentOf(
        id, [this](uint32_t i) { return DescribeId(i); },
        [this](uint32_t i, size_t k) { return ItemOf(i, k); });
  }

  NodeId Add(const NodeRec& n) {
    nodes_.push_back(n);
    return static_cast<NodeId>(nodes_.size() - 1);
  }

  // A node's class, computed once when a parent first uses it as a key or
  // set item: nodes are immutable once added (SetTypeName touches only
  // unhashable kinds) and their children exist before them. The recursion
  // follows the key down; a key nested deeper than the format allows
  // (kClassTooDeep) would be refused at Commit anyway, and stopping here
  // keeps a hostile caller (a converted pickle) from exhausting the stack.
  uint32_t ClassOf(NodeId id, uint32_t depth = 1) {
    NodeRec& r = nodes_[id];
    if (r.cls != kClassNotYet) return r.cls;
    if (depth > kMaxTreeDepth) return kClassTooDeep;
    uint32_t c = KeyClasses::kUnhashable;
    if (r.kind == ValueKind::kTuple || r.kind == ValueKind::kFrozenSet) {
      std::vector<uint32_t> item_classes;
      item_classes.reserve(r.num_items);
      bool ok = true;
      for (NodeId item : Items(r)) {
        uint32_t ic = ClassOf(item, depth + 1);
        if (ic == kClassTooDeep) return ic;
        if (ic == KeyClasses::kUnhashable) {
          nodes_[id].unhashable_kind = nodes_[item].unhashable_kind;
          ok = false;
          break;
        }
        item_classes.push_back(ic);
      }
      if (ok) c = classes_.Classify(Describe(nodes_[id]), item_classes);
    } else if (IsKeyKind(r.kind)) {
      c = classes_.Classify(Describe(r), {});
    } else {
      r.unhashable_kind = r.kind;
    }
    nodes_[id].cls = c;
    return c;
  }

  // Dict keys and set items: hashable at every depth (no List, Dict, Set or
  // Tensor, even inside a tuple) and pairwise unequal by Python's ==.
  Status CheckHashableDistinct(std::span<const NodeId> ids, const char* role) {
    bool all_str = true;
    for (NodeId id : ids) {
      const ValueKind k = nodes_[id].kind;
      all_str = all_str && k == ValueKind::kString;
      const bool nested = k == ValueKind::kTuple || k == ValueKind::kFrozenSet;
      const uint32_t c = nested ? ClassOf(id) : 0;
      if (c == kClassTooDeep) {
        return InvalidArgument(std::string(role) + " nested deeper than " +
                               std::to_string(kMaxTreeDepth) + " levels");
      }
      if (nested ? c != KeyClasses::kUnhashable : IsKeyKind(k)) continue;
      std::string what = "a " + std::string(ValueKindName(k));
      if (nested) {
        what += " holding a " +
                std::string(ValueKindName(nodes_[id].unhashable_kind));
      }
      return InvalidArgument(what + " cannot be " + role);
    }
    std::optional<std::pair<size_t, size_t>> dup;
    if (all_str) {
      // The common case (state dicts) without building classes.
      auto str = [&](size_t i) -> const std::string& {
        return ExtraOf(nodes_[ids[i]]).text;
      };
      dup = FirstRepeat(
          ids.size(),
          [&](size_t i) { return std::hash<std::string>()(str(i)); },
          [&](size_t a, size_t b) { return str(a) == str(b); });
    } else {
      std::vector<uint32_t> item_classes;
      item_classes.reserve(ids.size());
      for (NodeId id : ids) item_classes.push_back(ClassOf(id));
      dup = FirstDuplicate(item_classes);
    }
    if (dup) {
      return InvalidArgument(
          std::string(role) + "s " + std::to_string(dup->first) + " ('" +
          KeySegment(ids[dup->first]) + "') and " +
          std::to_string(dup->second) + " ('" + KeySegment(ids[dup->second]) +
          "') are equal in Python (==), so a dict or set cannot hold both");
    }
    return Status::OK();
  }

  Status CheckIds(std::span<const NodeId> ids) const {
    for (NodeId id : ids) {
      if (id >= nodes_.size()) {
        return InvalidArgument("node id " + std::to_string(id) +
                               " does not exist");
      }
    }
    return Status::OK();
  }

  // A node without children: `set` fills the fields its kind uses.
  template <typename Set>
  NodeId AddValue(ValueKind kind, Set&& set) {
    NodeValue v;
    v.kind = kind;
    set(v);
    NodeRec r;
    r.kind = kind;
    r.int_value = v.int_value;
    r.float_value = v.float_value;
    r.imag_value = v.imag_value;
    if (!v.text.empty() || !v.bytes.empty()) {
      Extra& x = MutableExtra(r);
      x.text = std::move(v.text);
      x.bytes = std::move(v.bytes);
    }
    return Add(r);
  }
  Result<NodeId> AddContainer(ValueKind kind, std::span<const NodeId> items,
                              std::span<const NodeId> keys,
                              std::string_view type_name) {
    CKPT_RETURN_IF_ERROR(CheckIds(items));
    CKPT_RETURN_IF_ERROR(CheckIds(keys));
    if (auto bad = Utf8Problem(type_name)) {
      return InvalidArgument("type name is not valid UTF-8 (byte " +
                             std::to_string(*bad) + ")");
    }
    CKPT_RETURN_IF_ERROR(CheckHashableDistinct(keys, "a dict key"));
    const bool is_set =
        kind == ValueKind::kSet || kind == ValueKind::kFrozenSet;
    if (is_set) {
      CKPT_RETURN_IF_ERROR(CheckHashableDistinct(
          items, kind == ValueKind::kSet ? "a set item" : "a frozenset item"));
    }
    if (items.size() > UINT32_MAX) {
      return InvalidArgument("a container of " + std::to_string(items.size()) +
                             " items (at most 2^32 - 1)");
    }
    NodeRec n;
    n.kind = kind;
    n.items_at = ids_.size();
    n.num_items = static_cast<uint32_t>(items.size());
    ids_.insert(ids_.end(), items.begin(), items.end());
    ids_.insert(ids_.end(), keys.begin(), keys.end());
    if (!type_name.empty()) MutableExtra(n).type_name = type_name;
    if (is_set) {
      // A set has no order of its own (Python's follows per-process string
      // hashes): store its items in the canonical order, so equal sets give
      // equal bytes (docs/FORMAT.md 10).
      auto first = ids_.begin() + static_cast<std::ptrdiff_t>(n.items_at);
      std::stable_sort(first, first + n.num_items, [this](NodeId a, NodeId b) {
        return CompareHashable(
                   a, b, [this](uint32_t i) { return DescribeId(i); },
                   [this](uint32_t i, size_t k) { return ItemOf(i, k); }) < 0;
      });
    }
    return Add(n);
  }

  Result<NodeId> AddTensor(const TensorSpec& spec) {
    CKPT_RETURN_IF_ERROR(CheckUsable());
    if (spec.storage >= storages_.size() ||
        (open_ && spec.storage == storages_.size() - 1)) {
      return InvalidArgument("tensor views storage " +
                             std::to_string(spec.storage) +
                             ", which does not exist or is still open");
    }
    TensorSpec t = spec;
    if (t.strides.empty() && !t.shape.empty()) {
      t.strides.resize(t.shape.size());
      int64_t s = 1;
      for (size_t d = t.shape.size(); d-- > 0;) {
        t.strides[d] = s;
        s *= std::max<int64_t>(t.shape[d], 1);
      }
    }
    if (auto problem =
            ViewProblem(static_cast<uint8_t>(t.dtype), t.shape, t.strides,
                        t.storage_offset, storages_[t.storage].nbytes)) {
      return InvalidArgument("bad tensor view: " + *problem);
    }
    tensors_.push_back(std::move(t));
    NodeRec n;
    n.kind = ValueKind::kTensor;
    n.int_value = static_cast<int64_t>(tensors_.size() - 1);
    return Add(n);
  }

  // ---- commit
  // ----------------------------------------------------------------------
  Status Commit();

  const std::string& target() const { return file_.target(); }

  Result<uint64_t> StorageOffset(StorageId id) const {
    if (id >= storages_.size()) {
      return InvalidArgument("no storage " + std::to_string(id));
    }
    return storages_[id].offset;
  }

  WriteOptions& options() { return options_; }
  std::optional<NodeId> root_;
  std::vector<std::pair<NodeId, NodeId>> implicit_root_;
  std::map<std::string, std::string> metadata_;
  std::vector<NodeRec> nodes_;
  std::vector<NodeId> ids_;    // every node's children (NodeRec::items_at)
  std::vector<Extra> extras_;  // text, bytes, class tags (NodeRec::extra)
  KeyClasses classes_;
  bool committed_ = false;
  uint64_t committed_size_ = 0, committed_header_xxh3_ = 0;
  Status failed_;
  uint64_t pos_ = 0;
  uint64_t kicked_ = 0;  // writeback was started for [0, kicked_)

 private:
  struct StorageRec {
    uint64_t offset;
    uint64_t nbytes;
    std::string device;
    std::vector<uint64_t> hashes;
  };

  // The tree as the header stores it (BuildHeader's steps).
  struct Layout {
    std::vector<uint32_t> new_index;  // node id -> index in the header
    std::vector<NodeId> order;        // header order: children first
    std::vector<std::string> tensor_path;
    std::vector<uint32_t> by_path;      // tensor ids sorted by path
    std::vector<uint32_t> tensor_rank;  // tensor id -> index in the header
  };
  Result<Layout> LayOutTree(NodeId root);
  Status NoteNode(const NodeRec& r, const std::string& path, bool in_key);
  Status RankTensors(Layout& lay) const;
  flatbuffers::Offset<fb::Node> EncodeNode(flatbuffers::FlatBufferBuilder& fbb,
                                           const NodeRec& r,
                                           const Layout& lay) const;
  Result<flatbuffers::DetachedBuffer> BuildHeader(NodeId root);

  // The format minor version the file needs: the lowest whose features it
  // uses, so a file without 1.1 features stays byte-identical to 1.0.
  uint16_t minor_ = 0;

  AtomicFile file_;
  WriteOptions options_;
  std::vector<std::byte> buf_;
  std::vector<StorageRec> storages_;
  std::vector<TensorSpec> tensors_;
  bool open_ = false;
  uint64_t remaining_ = 0;
  uint64_t in_chunk_ = 0;
  Xxh3Stream hasher_;
};

// Post-order walk from the root: renumbers nodes so children precede
// parents and the root is last, checks each node is placed once, each
// string is UTF-8 and the nesting bounded, computes every tensor's path,
// and raises the format minor to what the tree needs.
Result<WriterImpl::Layout> WriterImpl::LayOutTree(NodeId root) {
  const size_t n = nodes_.size();
  constexpr uint32_t kUnseen = UINT32_MAX;
  Layout lay;
  lay.new_index.assign(n, kUnseen);
  lay.tensor_path.resize(tensors_.size());
  lay.order.reserve(n);
  std::vector<uint8_t> entered(n, 0);
  std::vector<uint8_t> tensor_placed(tensors_.size(), 0);

  // One frame per level (children are entered one at a time, so a list of
  // millions of numbers costs one frame, not one per element). A frame's
  // `next` counts the child slots done: a dict has two per entry, its key
  // then its value, so nodes are numbered key, value, key, ..., parent.
  struct Frame {
    NodeId node;
    std::string path;
    uint32_t depth;
    bool in_key;  // the node is, or is inside, a dict key
    size_t next = 0;
  };
  std::vector<Frame> stack;
  auto enter = [&](NodeId id, std::string path, uint32_t depth,
                   bool in_key) -> Status {
    if (entered[id]) {
      return InvalidArgument("node " + std::to_string(id) +
                             " is placed in the tree more than once; add a "
                             "separate node for each place");
    }
    entered[id] = 1;
    if (depth > kMaxTreeDepth) {
      return InvalidArgument("object tree nested deeper than " +
                             std::to_string(kMaxTreeDepth) + " at '" + path +
                             "'");
    }
    const NodeRec& r = nodes_[id];
    if (r.kind == ValueKind::kTensor) {
      auto t = static_cast<size_t>(r.int_value);
      lay.tensor_path[t] = path;
      tensor_placed[t] = 1;
    }
    CKPT_RETURN_IF_ERROR(NoteNode(r, path, in_key));
    stack.push_back({id, std::move(path), depth, in_key});
    return Status::OK();
  };
  CKPT_RETURN_IF_ERROR(enter(root, "", 1, false));
  while (!stack.empty()) {
    Frame& f = stack.back();
    const NodeRec& r = nodes_[f.node];
    const bool dict = r.kind == ValueKind::kDict;
    if (f.next == (dict ? 2 * size_t{r.num_items} : r.num_items)) {
      lay.new_index[f.node] = static_cast<uint32_t>(lay.order.size());
      lay.order.push_back(f.node);
      stack.pop_back();
      continue;
    }
    const size_t slot = f.next++;
    const size_t i = dict ? slot / 2 : slot;
    // Copies: enter() may grow the stack and move `f`.
    const std::string parent = f.path;
    const uint32_t depth = f.depth + 1;
    const bool in_key = f.in_key;
    const bool at_root = f.node == root;
    if (dict && slot % 2 == 0) {
      CKPT_RETURN_IF_ERROR(enter(Keys(r)[i], parent, depth, true));
      continue;
    }
    const std::string seg = dict ? KeySegment(Keys(r)[i]) : std::to_string(i);
    CKPT_RETURN_IF_ERROR(enter(
        Items(r)[i], PathBuilder::Child(parent, at_root, seg), depth, in_key));
  }
  for (size_t t = 0; t < tensors_.size(); ++t) {
    if (!tensor_placed[t]) {
      return InvalidArgument("tensor " + std::to_string(t) +
                             " was added but never placed in the object tree");
    }
  }
  return lay;
}

// What one node asks of the file: valid UTF-8, and the minor version its
// kind or dtype needs.
Status WriterImpl::NoteNode(const NodeRec& r, const std::string& path,
                            bool in_key) {
  if (r.kind == ValueKind::kString) {
    if (auto bad = Utf8Problem(ExtraOf(r).text)) {
      return InvalidArgument("the string at '" + path +
                             "' is not valid UTF-8 (byte " +
                             std::to_string(*bad) + ")");
    }
  }
  // The lowest minor that holds the tree (FORMAT.md 11): each kind's and
  // dtype's row says which minor added it.
  uint16_t need = TraitsOf(r.kind).since_minor;
  if (r.kind == ValueKind::kTensor) {
    const DType dt = tensors_[static_cast<size_t>(r.int_value)].dtype;
    need = std::max(need, DTypeSinceMinor(dt));
  } else if (r.kind == ValueKind::kDType) {
    need = std::max(need, DTypeSinceMinor(static_cast<DType>(r.int_value)));
  }
  // Float keys are written as Python's repr() since 1.1 (7.3).
  if (in_key &&
      (r.kind == ValueKind::kFloat || r.kind == ValueKind::kComplex)) {
    need = std::max<uint16_t>(need, 1);
  }
  minor_ = std::max(minor_, need);
  return Status::OK();
}

// Tensors sorted by path (binary search at open): the rank of each, and
// the order; two tensors with one path are refused.
Status WriterImpl::RankTensors(Layout& lay) const {
  lay.by_path.resize(tensors_.size());
  for (uint32_t i = 0; i < lay.by_path.size(); ++i) lay.by_path[i] = i;
  std::sort(lay.by_path.begin(), lay.by_path.end(),
            [&](uint32_t a, uint32_t b) {
              return lay.tensor_path[a] < lay.tensor_path[b];
            });
  lay.tensor_rank.resize(tensors_.size());
  for (uint32_t i = 0; i < lay.by_path.size(); ++i) {
    const std::string& p = lay.tensor_path[lay.by_path[i]];
    if (i > 0 && p == lay.tensor_path[lay.by_path[i - 1]]) {
      return InvalidArgument("two tensors have the path '" + p +
                             "' (keys with the same path form, e.g. 1 and "
                             "\"1\", in one dict)");
    }
    lay.tensor_rank[lay.by_path[i]] = i;
  }
  return Status::OK();
}

// One node as the schema has it: only the fields its kind uses
// (kValueKinds), children renumbered.
flatbuffers::Offset<fb::Node> WriterImpl::EncodeNode(
    flatbuffers::FlatBufferBuilder& fbb, const NodeRec& r,
    const Layout& lay) const {
  std::vector<uint32_t> items, keys;
  items.reserve(r.num_items);
  keys.reserve(Keys(r).size());
  for (NodeId c : Items(r)) items.push_back(lay.new_index[c]);
  for (NodeId c : Keys(r)) keys.push_back(lay.new_index[c]);
  const Extra& x = ExtraOf(r);
  const ValueKind k = r.kind;
  int64_t int_value = k == ValueKind::kTensor
                          ? lay.tensor_rank[static_cast<size_t>(r.int_value)]
                          : r.int_value;
  auto str = KindUsesField(k, kFieldStr) ? fbb.CreateString(x.text) : 0;
  auto bytes = KindUsesField(k, kFieldBytes) ? fbb.CreateVector(x.bytes) : 0;
  auto it = items.empty() ? 0 : fbb.CreateVector(items);
  auto ks = keys.empty() ? 0 : fbb.CreateVector(keys);
  auto tn = x.type_name.empty() ? 0 : fbb.CreateString(x.type_name);
  // FlatBuffers omits a field equal to its default, and -0.0 == 0.0:
  // force the fields of such a node out so the sign survives.
  fbb.ForceDefaults(std::signbit(r.float_value) || std::signbit(r.imag_value));
  auto node =
      fb::CreateNode(fbb, static_cast<fb::ValueKind>(k), int_value,
                     r.float_value, r.imag_value, str, bytes, it, ks, tn);
  fbb.ForceDefaults(false);
  return node;
}

Result<flatbuffers::DetachedBuffer> WriterImpl::BuildHeader(NodeId root) {
  CKPT_ASSIGN_OR_RETURN(Layout lay, LayOutTree(root));
  CKPT_RETURN_IF_ERROR(RankTensors(lay));
  flatbuffers::FlatBufferBuilder fbb(1 << 16);
  std::vector<flatbuffers::Offset<fb::Storage>> storages;
  storages.reserve(storages_.size());
  for (const auto& s : storages_) {
    storages.push_back(fb::CreateStorage(fbb, s.offset, s.nbytes,
                                         fbb.CreateString(s.device),
                                         fbb.CreateVector(s.hashes)));
  }
  std::vector<flatbuffers::Offset<fb::Tensor>> tensors;
  tensors.reserve(tensors_.size());
  for (uint32_t i : lay.by_path) {
    const TensorSpec& t = tensors_[i];
    tensors.push_back(fb::CreateTensor(
        fbb, fbb.CreateString(lay.tensor_path[i]),
        static_cast<fb::DType>(t.dtype), fbb.CreateVector(t.shape),
        fbb.CreateVector(t.strides), t.storage, t.storage_offset,
        t.requires_grad, t.is_parameter));
  }
  std::vector<flatbuffers::Offset<fb::Node>> nodes;
  nodes.reserve(lay.order.size());
  for (NodeId id : lay.order) nodes.push_back(EncodeNode(fbb, nodes_[id], lay));
  std::vector<flatbuffers::Offset<fb::KeyValue>> md;
  for (const auto& [k, v] : metadata_) {
    md.push_back(
        fb::CreateKeyValue(fbb, fbb.CreateString(k), fbb.CreateString(v)));
  }
  auto header = fb::CreateHeader(
      fbb, options_.chunk_size, fbb.CreateVector(storages),
      fbb.CreateVector(tensors), fbb.CreateVector(nodes), fbb.CreateVector(md),
      fbb.CreateString(options_.producer));
  fb::FinishHeaderBuffer(fbb, header);
  return fbb.Release();
}

Status WriterImpl::Commit() {
  CKPT_RETURN_IF_ERROR(CheckUsable());
  if (open_) {
    return InvalidArgument("Commit while storage " +
                           std::to_string(storages_.size() - 1) +
                           " is still open")
        .WithFile(file_.target());
  }
  NodeId root;
  if (root_) {
    root = *root_;
  } else {
    std::vector<NodeId> keys, values;
    for (auto [k, v] : implicit_root_) {
      keys.push_back(k);
      values.push_back(v);
    }
    CKPT_ASSIGN_OR_RETURN(root,
                          AddContainer(ValueKind::kDict, values, keys, ""));
  }
  auto header = BuildHeader(root);
  if (!header.ok()) return Fail(header.status().WithFile(file_.target()));
  if (header->size() > kMaxHeaderBytes) {
    return Fail(InvalidArgument("header of " + std::to_string(header->size()) +
                                " bytes exceeds the format's limit")
                    .WithFile(file_.target()));
  }
  Preamble p;
  p.major = kFormatMajor;
  p.minor = minor_;
  p.data_offset = kPageBytes;
  p.data_size = pos_ - kPageBytes;
  p.header_offset = *AlignUp(pos_, kMinAlignment);
  p.header_size = header->size();
  p.header_hash = Xxh3(
      {reinterpret_cast<const std::byte*>(header->data()), header->size()});
  CKPT_RETURN_IF_ERROR(Fail(PadTo(p.header_offset)));
  CKPT_RETURN_IF_ERROR(Fail(Write(
      {reinterpret_cast<const std::byte*>(header->data()), header->size()})));
  CKPT_RETURN_IF_ERROR(Fail(Flush()));
  auto pre = EncodePreamble(p);
  CKPT_RETURN_IF_ERROR(Fail(file_.WriteAt(0, pre)));
  CKPT_RETURN_IF_ERROR(Fail(file_.Commit(options_.sync)));
  committed_ = true;
  committed_size_ = pos_;
  committed_header_xxh3_ = p.header_hash;
  return Status::OK();
}

}  // namespace internal

// ---- Writer
// -------------------------------------------------------------------------

Writer::Writer(std::unique_ptr<internal::WriterImpl> impl)
    : impl_(std::move(impl)) {}
Writer::Writer(Writer&&) noexcept = default;
Writer& Writer::operator=(Writer&&) noexcept = default;
Writer::~Writer() = default;

Result<Writer> Writer::Create(const std::string& path,
                              const WriteOptions& options) {
  uint64_t c = options.chunk_size;
  if (c < kMinChunkBytes || c > kMaxChunkBytes || (c & (c - 1)) != 0) {
    return InvalidArgument("chunk_size " + std::to_string(c) +
                           " is not a power of two in [4096, 2^30]");
  }
  if (auto bad = internal::Utf8Problem(options.producer)) {
    return InvalidArgument("producer is not valid UTF-8 (byte " +
                           std::to_string(*bad) + ")");
  }
  CKPT_ASSIGN_OR_RETURN(auto file,
                        internal::AtomicFile::Create(path, options.mode));
  auto impl = std::make_unique<internal::WriterImpl>(std::move(file), options);
  CKPT_RETURN_IF_ERROR(impl->Fail(impl->Start()));
  return Writer(std::move(impl));
}

Result<StorageId> Writer::AddStorage(std::span<const std::byte> bytes,
                                     std::string_view device) {
  CKPT_ASSIGN_OR_RETURN(StorageId id,
                        impl_->BeginStorage(bytes.size(), device));
  CKPT_RETURN_IF_ERROR(impl_->Append(bytes));
  CKPT_RETURN_IF_ERROR(impl_->EndStorage());
  return id;
}
Result<StorageId> Writer::BeginStorage(uint64_t nbytes,
                                       std::string_view device) {
  return impl_->BeginStorage(nbytes, device);
}
Status Writer::Append(std::span<const std::byte> bytes) {
  return impl_->Append(bytes);
}
Status Writer::AppendFromFile(int fd, uint64_t offset,
                              std::span<const std::byte> bytes) {
  if (fd < 0) return InvalidArgument("AppendFromFile needs an open file");
  return impl_->Append(bytes, fd, offset);
}
Status Writer::EndStorage() { return impl_->EndStorage(); }

Result<NodeId> Writer::AddTensor(const TensorSpec& spec) {
  return impl_->AddTensor(spec);
}

Result<NodeId> Writer::AddTensor(DType dtype, std::vector<int64_t> shape,
                                 std::span<const std::byte> data,
                                 std::string_view device) {
  TensorSpec spec;
  spec.dtype = dtype;
  spec.shape = std::move(shape);
  uint64_t numel = 1;
  for (int64_t s : spec.shape) {
    if (s < 0 ||
        __builtin_mul_overflow(numel, static_cast<uint64_t>(s), &numel)) {
      return InvalidArgument("bad shape: negative or overflowing size");
    }
  }
  uint64_t need = 0;
  if (DTypeSize(dtype) == 0 ||
      __builtin_mul_overflow(numel, DTypeSize(dtype), &need) ||
      need != data.size()) {
    return InvalidArgument("tensor of dtype '" + std::string(DTypeName(dtype)) +
                           "' needs " + std::to_string(need) +
                           " bytes for its shape, got " +
                           std::to_string(data.size()));
  }
  CKPT_ASSIGN_OR_RETURN(spec.storage, AddStorage(data, device));
  return impl_->AddTensor(spec);
}

NodeId Writer::AddNone() {
  return impl_->AddValue(ValueKind::kNone, [](NodeValue&) {});
}
NodeId Writer::AddBool(bool v) {
  return impl_->AddValue(ValueKind::kBool,
                         [&](NodeValue& n) { n.int_value = v ? 1 : 0; });
}
NodeId Writer::AddInt(int64_t v) {
  return impl_->AddValue(ValueKind::kInt,
                         [&](NodeValue& n) { n.int_value = v; });
}
Result<NodeId> Writer::AddBigInt(std::span<const uint8_t> le) {
  // Canonical form (docs/FORMAT.md 8): the fewest bytes, and an Int node for
  // a value that fits 64 bits. Redundant sign bytes are dropped before the
  // size limit applies, so -(2**32767) (4096 bytes) passes in 4097.
  if (le.empty()) return InvalidArgument("big int with no bytes");
  le = le.first(internal::MinimalTwosComplementSize(le));
  if (le.size() > kMaxBigIntBytes) {
    return InvalidArgument("big int of " + std::to_string(le.size()) +
                           " bytes; the format holds at most " +
                           std::to_string(kMaxBigIntBytes) +
                           " (|v| < 2^32767)");
  }
  if (le.size() <= 8) {
    uint64_t v = (le.back() & 0x80) ? ~uint64_t{0} : 0;
    for (size_t i = 0; i < le.size(); ++i) {
      v &= ~(uint64_t{0xff} << (8 * i));
      v |= uint64_t{le[i]} << (8 * i);
    }
    return AddInt(static_cast<int64_t>(v));
  }
  return impl_->AddValue(ValueKind::kBigInt, [&](NodeValue& n) {
    n.bytes.assign(le.begin(), le.end());
  });
}
NodeId Writer::AddFloat(double v) {
  return impl_->AddValue(ValueKind::kFloat,
                         [&](NodeValue& n) { n.float_value = v; });
}
NodeId Writer::AddComplex(double re, double im) {
  return impl_->AddValue(ValueKind::kComplex, [&](NodeValue& n) {
    n.float_value = re;
    n.imag_value = im;
  });
}
NodeId Writer::AddString(std::string_view s) {
  return impl_->AddValue(ValueKind::kString, [&](NodeValue& n) { n.text = s; });
}
NodeId Writer::AddBytes(std::span<const uint8_t> b) {
  return impl_->AddValue(ValueKind::kBytes, [&](NodeValue& n) {
    n.bytes.assign(b.begin(), b.end());
  });
}
Result<NodeId> Writer::AddDType(DType dtype) {
  if (!IsKnownDType(static_cast<uint8_t>(dtype))) {
    return InvalidArgument("unknown dtype code " +
                           std::to_string(static_cast<int>(dtype)));
  }
  return impl_->AddValue(ValueKind::kDType, [&](NodeValue& n) {
    n.int_value = static_cast<int64_t>(dtype);
  });
}
Result<NodeId> Writer::AddDevice(std::string_view device) {
  if (auto problem = internal::DeviceProblem(device)) {
    return InvalidArgument("invalid device string: " + *problem);
  }
  return impl_->AddValue(ValueKind::kDevice,
                         [&](NodeValue& n) { n.text = device; });
}
Result<NodeId> Writer::AddList(std::span<const NodeId> items) {
  return impl_->AddContainer(ValueKind::kList, items, {}, "");
}
Result<NodeId> Writer::AddTuple(std::span<const NodeId> items) {
  return impl_->AddContainer(ValueKind::kTuple, items, {}, "");
}
Result<NodeId> Writer::AddSet(std::span<const NodeId> items) {
  return impl_->AddContainer(ValueKind::kSet, items, {}, "");
}
Result<NodeId> Writer::AddFrozenSet(std::span<const NodeId> items) {
  return impl_->AddContainer(ValueKind::kFrozenSet, items, {}, "");
}
Result<NodeId> Writer::AddDict(std::span<const NodeId> keys,
                               std::span<const NodeId> values,
                               std::string_view type_name) {
  if (keys.size() != values.size()) {
    return InvalidArgument("dict with " + std::to_string(keys.size()) +
                           " keys and " + std::to_string(values.size()) +
                           " values");
  }
  return impl_->AddContainer(ValueKind::kDict, values, keys, type_name);
}

Status Writer::SetTypeName(NodeId node, std::string_view type_name) {
  NodeId ids[] = {node};
  CKPT_RETURN_IF_ERROR(impl_->CheckIds(ids));
  auto& n = impl_->nodes_[node];
  if (n.kind != ValueKind::kTensor && n.kind != ValueKind::kDict) {
    return InvalidArgument("a type name tags a Tensor or Dict node, not " +
                           std::string(ValueKindName(n.kind)));
  }
  if (auto bad = internal::Utf8Problem(type_name)) {
    return InvalidArgument("type name is not valid UTF-8 (byte " +
                           std::to_string(*bad) + ")");
  }
  impl_->MutableExtra(n).type_name = type_name;
  return Status::OK();
}

Status Writer::SetRoot(NodeId node) {
  NodeId ids[] = {node};
  CKPT_RETURN_IF_ERROR(impl_->CheckIds(ids));
  if (!impl_->implicit_root_.empty()) {
    return InvalidArgument(
        "SetRoot cannot be combined with PutTensor/PutValue");
  }
  impl_->root_ = node;
  return Status::OK();
}

Status Writer::PutValue(std::string_view name, NodeId node) {
  NodeId ids[] = {node};
  CKPT_RETURN_IF_ERROR(impl_->CheckIds(ids));
  if (impl_->root_) {
    return InvalidArgument(
        "PutTensor/PutValue cannot be combined with SetRoot");
  }
  impl_->implicit_root_.emplace_back(AddString(name), node);
  return Status::OK();
}

Status Writer::PutTensor(std::string_view name, DType dtype,
                         std::vector<int64_t> shape,
                         std::span<const std::byte> data,
                         std::string_view device) {
  CKPT_ASSIGN_OR_RETURN(NodeId t,
                        AddTensor(dtype, std::move(shape), data, device));
  return PutValue(name, t).WithTensor(std::string(name));
}

Status Writer::SetMetadata(std::string_view key, std::string_view value) {
  for (auto [what, s] : {std::pair{"key", key}, std::pair{"value", value}}) {
    if (auto bad = internal::Utf8Problem(s)) {
      return InvalidArgument("metadata " + std::string(what) +
                             " is not valid UTF-8 (byte " +
                             std::to_string(*bad) + ")");
    }
  }
  impl_->metadata_[std::string(key)] = std::string(value);
  return Status::OK();
}

Status Writer::Commit() { return impl_->Commit(); }

void Writer::Abort() {
  if (!impl_->committed_ && impl_->failed_.ok()) {
    (void)impl_->Fail(InvalidArgument("writer aborted"));
  }
}

uint64_t Writer::bytes_written() const { return impl_->pos_; }

Result<uint64_t> Writer::StorageOffset(StorageId id) const {
  return impl_->StorageOffset(id);
}

const std::string& Writer::path() const { return impl_->target(); }

std::optional<Writer::Committed> Writer::committed() const {
  if (!impl_->committed_) return std::nullopt;
  return Committed{impl_->committed_size_, impl_->committed_header_xxh3_};
}

}  // namespace ckpt
