// Whole files <-> sharded directories (dist.h: Consolidate, ShardFile): the
// tools' `ckpt consolidate` and `ckpt shard`. Both stream: a consolidation
// holds one block of one tensor at a time, a sharding one chunk.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "ckpt/dist.h"
#include "ckpt/reader.h"
#include "ckpt/writer.h"
#include "manifest_internal.h"

namespace ckpt::dist {

namespace {

// Consolidation reads and writes a tensor in boxes of about this many
// bytes: large enough that each read is one long pread per chunk it meets,
// small enough that a 100 GB tensor needs 64 MiB of memory, not 100 GB.
constexpr uint64_t kBlockBytes = uint64_t{64} << 20;

bool IsPlaceholder(const Value& v) {
  return v.kind() == ValueKind::kDict && v.size() == 0 &&
         v.type_name() == internal::kGlobalTensorTag;
}

// ---- copying a tree from a file into a writer -----------------------------

// Decides what a tensor node (or, in a globals tree, a placeholder) becomes
// in the new file; `path` is its tree path.
using LeafHook =
    std::function<Result<NodeId>(const Value& v, const std::string& path)>;

// A node that may be a dict key or set item: hashable, so it holds no
// tensor and no placeholder (a dict is not hashable).
Result<NodeId> CopyHashable(Writer& w, const Value& v) {
  switch (v.kind()) {
    case ValueKind::kNone:
      return w.AddNone();
    case ValueKind::kBool:
      return w.AddBool(v.as_bool());
    case ValueKind::kInt:
      return w.AddInt(v.as_int());
    case ValueKind::kBigInt:
      return w.AddBigInt(v.as_bytes());
    case ValueKind::kFloat:
      return w.AddFloat(v.as_float());
    case ValueKind::kComplex: {
      auto c = v.as_complex();
      return w.AddComplex(c.real(), c.imag());
    }
    case ValueKind::kString:
      return w.AddString(v.as_string());
    case ValueKind::kBytes:
      return w.AddBytes(v.as_bytes());
    case ValueKind::kDType:
      return w.AddDType(v.as_dtype());
    case ValueKind::kDevice:
      return w.AddDevice(v.as_string());
    case ValueKind::kTuple:
    case ValueKind::kFrozenSet: {
      std::vector<NodeId> items;
      items.reserve(v.size());
      for (size_t i = 0; i < v.size(); ++i) {
        CKPT_ASSIGN_OR_RETURN(NodeId n, CopyHashable(w, v.item(i)));
        items.push_back(n);
      }
      return v.kind() == ValueKind::kTuple ? w.AddTuple(items)
                                           : w.AddFrozenSet(items);
    }
    default:
      return InvalidArgument(std::string("a ") +
                             std::string(ValueKindName(v.kind())) +
                             " cannot be a dict key or set item");
  }
}

// Copies the tree under `v` (at `path`) into `w`, bottom-up as the writer
// builds trees; `hook` makes the tensor nodes and, where `placeholders`,
// the placeholders. Depth is bounded by the reader (kMaxTreeDepth).
Result<NodeId> CopyTree(Writer& w, const Value& v, const std::string& path,
                        bool at_root, const LeafHook& hook, bool placeholders) {
  if (v.kind() == ValueKind::kTensor || (placeholders && IsPlaceholder(v))) {
    return hook(v, path);
  }
  switch (v.kind()) {
    case ValueKind::kList:
    case ValueKind::kTuple: {
      std::vector<NodeId> items;
      items.reserve(v.size());
      for (size_t i = 0; i < v.size(); ++i) {
        CKPT_ASSIGN_OR_RETURN(
            NodeId n,
            CopyTree(w, v.item(i),
                     PathBuilder::Child(path, at_root, std::to_string(i)),
                     false, hook, placeholders));
        items.push_back(n);
      }
      return v.kind() == ValueKind::kList ? w.AddList(items)
                                          : w.AddTuple(items);
    }
    case ValueKind::kSet: {
      std::vector<NodeId> items;
      items.reserve(v.size());
      for (size_t i = 0; i < v.size(); ++i) {
        CKPT_ASSIGN_OR_RETURN(NodeId n, CopyHashable(w, v.item(i)));
        items.push_back(n);
      }
      return w.AddSet(items);
    }
    case ValueKind::kDict: {
      if (!placeholders && v.type_name() == internal::kGlobalTensorTag) {
        return InvalidArgument(
                   "a dict tagged \"" +
                   std::string(internal::kGlobalTensorTag) +
                   "\", which sharded checkpoints reserve for the places of "
                   "global tensors, cannot be sharded")
            .WithTensor(path);
      }
      std::vector<NodeId> keys, values;
      keys.reserve(v.size());
      values.reserve(v.size());
      for (size_t i = 0; i < v.size(); ++i) {
        const Value key = v.key(i);
        CKPT_ASSIGN_OR_RETURN(NodeId k, CopyHashable(w, key));
        CKPT_ASSIGN_OR_RETURN(
            NodeId n,
            CopyTree(w, v.item(i),
                     PathBuilder::Child(path, at_root, key.KeySegment()), false,
                     hook, placeholders));
        keys.push_back(k);
        values.push_back(n);
      }
      return w.AddDict(keys, values, v.type_name());
    }
    default:
      return CopyHashable(w, v);
  }
}

// ---- consolidation ----------------------------------------------------

// Streams global tensor `t` from `ck` into a new storage of `w` in boxes of
// about kBlockBytes, in row-major order: dims 0..k-1 one index at a time,
// dim k in blocks of rows, dims after k whole, with k the outermost dim
// whose inner dims fit in a block. Returns the tensor node.
Result<NodeId> AssembleTensor(const ShardedCheckpoint& ck,
                              const GlobalTensorInfo& t, Writer& w,
                              std::vector<std::byte>& buf) {
  const uint64_t el = DTypeSize(t.dtype);
  const uint64_t nbytes = t.nbytes();
  if (nbytes == 0) return w.AddTensor(t.dtype, t.shape, {});
  const size_t ndim = t.shape.size();
  // inner[d]: elements of one index of dim d-1, i.e. prod(shape[d..]).
  std::vector<uint64_t> inner(ndim + 1, 1);
  for (size_t d = ndim; d-- > 0;) {
    inner[d] = inner[d + 1] * static_cast<uint64_t>(t.shape[d]);
  }
  size_t k = 0;
  while (k + 1 < ndim && inner[k + 1] * el > kBlockBytes) ++k;
  const uint64_t row_bytes = ndim == 0 ? el : inner[k + 1] * el;
  const int64_t step =
      ndim == 0
          ? 1
          : static_cast<int64_t>(std::max<uint64_t>(
                1, std::min<uint64_t>(kBlockBytes / row_bytes,
                                      static_cast<uint64_t>(t.shape[k]))));

  CKPT_ASSIGN_OR_RETURN(StorageId sid, w.BeginStorage(nbytes));
  Box box;
  box.offsets.assign(ndim, 0);
  box.sizes = t.shape;
  for (size_t d = 0; d < k && d < ndim; ++d) box.sizes[d] = 1;
  uint64_t written = 0;
  for (;;) {
    if (ndim > 0) {
      box.sizes[k] = std::min<int64_t>(step, t.shape[k] - box.offsets[k]);
    }
    const uint64_t len =
        (ndim == 0 ? 1 : static_cast<uint64_t>(box.sizes[k])) * row_bytes;
    buf.resize(static_cast<size_t>(len));
    Want want{t.path, box, std::span<std::byte>(buf.data(), buf.size())};
    CKPT_ASSIGN_OR_RETURN(ReadPlan plan,
                          ck.Plan(std::span<const Want>(&want, 1)));
    CKPT_ASSIGN_OR_RETURN(LoadStats stats, ck.Execute(plan));
    (void)stats;
    CKPT_RETURN_IF_ERROR(w.Append(std::span<const std::byte>(buf)));
    written += len;
    if (ndim == 0) break;
    // Next box in row-major order: dim k by a block, carrying into the
    // outer dims (one index each).
    bool done = false;
    size_t d = k;
    box.offsets[d] += box.sizes[d];
    while (box.offsets[d] >= t.shape[d]) {
      if (d == 0) {
        done = true;
        break;
      }
      box.offsets[d] = 0;
      box.offsets[--d] += 1;
    }
    if (done) break;
  }
  if (written != nbytes) {
    return Corrupt("assembled " + std::to_string(written) + " of " +
                   std::to_string(nbytes) + " bytes")
        .WithTensor(t.path);
  }
  CKPT_RETURN_IF_ERROR(w.EndStorage());
  TensorSpec spec;
  spec.dtype = t.dtype;
  spec.shape = t.shape;
  spec.storage = sid;
  return w.AddTensor(spec);
}

// A real tensor found in a shard's globals tree (not a placeholder): copied
// as it is, in row-major order, with its flags and class tag.
Result<NodeId> CopyFileTensor(const Checkpoint& from, const Value& v,
                              Writer& w) {
  CKPT_ASSIGN_OR_RETURN(TensorRef t, v.tensor());
  const TensorInfo& info = t.info();
  CKPT_ASSIGN_OR_RETURN(StorageId sid, w.BeginStorage(info.nbytes()));
  CKPT_RETURN_IF_ERROR(from.StreamTensor(
      t, [&](std::span<const std::byte> piece) { return w.Append(piece); }));
  CKPT_RETURN_IF_ERROR(w.EndStorage());
  TensorSpec spec;
  spec.dtype = info.dtype;
  spec.shape = info.shape;
  spec.storage = sid;
  spec.requires_grad = info.requires_grad;
  spec.is_parameter = info.is_parameter;
  CKPT_ASSIGN_OR_RETURN(NodeId n, w.AddTensor(spec));
  if (!v.type_name().empty()) {
    CKPT_RETURN_IF_ERROR(w.SetTypeName(n, v.type_name()));
  }
  return n;
}

// Nested dicts of the tensors' paths, for a checkpoint saved without a
// globals tree: "a/b/c" is root["a"]["b"]["c"].
struct PathTrie {
  std::optional<NodeId> tensor;
  std::map<std::string, PathTrie> children;
};

Result<NodeId> WriteTrie(Writer& w, const PathTrie& node,
                         const std::string& path) {
  if (node.tensor) return *node.tensor;
  std::vector<NodeId> keys, values;
  for (const auto& [segment, child] : node.children) {
    keys.push_back(w.AddString(segment));
    CKPT_ASSIGN_OR_RETURN(
        NodeId n,
        WriteTrie(w, child, PathBuilder::Child(path, path.empty(), segment)));
    values.push_back(n);
  }
  return w.AddDict(keys, values);
}

}  // namespace

Status Consolidate(const std::string& dir, const std::string& out,
                   const WriteOptions& options) {
  CKPT_ASSIGN_OR_RETURN(ShardedCheckpoint ck, ShardedCheckpoint::Open(dir));
  const Manifest& m = ck.manifest();
  CKPT_ASSIGN_OR_RETURN(Writer w, Writer::Create(out, options));

  // The tensors first, each streamed into its own storage; the tree comes
  // after, bottom-up, when every tensor node exists.
  std::vector<NodeId> nodes(m.tensors.size());
  std::vector<std::byte> buf;
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    auto node = AssembleTensor(ck, m.tensors[i], w, buf);
    if (!node.ok()) return node.status().WithTensor(m.tensors[i].path);
    nodes[i] = *node;
  }
  buf = {};

  // The globals tree, when a rank wrote one. A DCP directory (no
  // MANIFEST.ckptm: its .metadata read as a manifest) has no ckpt trees.
  std::optional<Checkpoint> gfile;
  std::optional<Value> globals;
  if (IsShardedCheckpoint(dir) && m.globals_file < m.files.size()) {
    CKPT_ASSIGN_OR_RETURN(Checkpoint g, ck.OpenShard(m.globals_file));
    if (g.root().kind() == ValueKind::kDict) {
      if (auto v = g.root().Child("globals"); v.ok()) globals = *v;
    }
    gfile = std::move(g);
  }

  NodeId root = 0;
  if (globals) {
    std::vector<bool> placed(m.tensors.size(), false);
    const std::string gname = ck.ShardFilePath(m.globals_file);
    LeafHook hook = [&](const Value& v,
                        const std::string& path) -> Result<NodeId> {
      if (v.kind() == ValueKind::kTensor) return CopyFileTensor(*gfile, v, w);
      const GlobalTensorInfo* t = m.Find(path);
      if (t == nullptr) {
        return Corrupt(
                   "the globals tree has a placeholder where the manifest "
                   "has no global tensor")
            .WithFile(gname)
            .WithOffset(v.file_offset())
            .WithTensor(path);
      }
      const size_t i = static_cast<size_t>(t - m.tensors.data());
      placed[i] = true;
      return nodes[i];
    };
    CKPT_ASSIGN_OR_RETURN(root, CopyTree(w, *globals, "", true, hook, true));
    for (size_t i = 0; i < m.tensors.size(); ++i) {
      if (!placed[i]) {
        return Corrupt("global tensor has no placeholder in the globals tree")
            .WithFile(gname)
            .WithTensor(m.tensors[i].path);
      }
    }
  } else {
    PathTrie trie;
    for (size_t i = 0; i < m.tensors.size(); ++i) {
      CKPT_ASSIGN_OR_RETURN(std::vector<std::string> segs,
                            SplitPath(m.tensors[i].path));
      PathTrie* at = &trie;
      for (const auto& s : segs) {
        if (at->tensor) break;
        at = &at->children[s];
      }
      if (at->tensor || !at->children.empty()) {
        return InvalidArgument(
                   "without a globals tree the tensors are nested dicts of "
                   "their paths, and this path is both a tensor and a dict "
                   "of others")
            .WithFile(dir)
            .WithTensor(m.tensors[i].path);
      }
      at->tensor = nodes[i];
    }
    CKPT_ASSIGN_OR_RETURN(root, WriteTrie(w, trie, ""));
  }
  CKPT_RETURN_IF_ERROR(w.SetRoot(root));
  for (const auto& [k, v] : m.metadata) {
    CKPT_RETURN_IF_ERROR(w.SetMetadata(k, v));
  }
  return w.Commit();
}

// ---- sharding a file ----------------------------------------------------

namespace {

// Block `r` of `n` near-even blocks of `rows` (the first rows % n one
// longer), as ReplicaPart cuts.
std::pair<int64_t, int64_t> EvenBlock(int64_t rows, int r, int n) {
  const int64_t base = rows / n, extra = rows % n;
  const int64_t start = r * base + std::min<int64_t>(r, extra);
  return {start, base + (r < extra ? 1 : 0)};
}

// The row-major bytes of `box` of tensor `t`: a view of the file where they
// are one run of a contiguous tensor, else gathered into `buf`.
Result<std::span<const std::byte>> BoxBytes(const TensorRef& t, const Box& box,
                                            std::vector<std::byte>& buf) {
  const TensorInfo& info = t.info();
  const uint64_t el = DTypeSize(info.dtype);
  Box whole;
  whole.offsets.assign(info.shape.size(), 0);
  whole.sizes = info.shape;
  const uint64_t len = static_cast<uint64_t>(box.numel()) * el;
  if (len == 0) return std::span<const std::byte>();
  CKPT_ASSIGN_OR_RETURN(std::optional<RunPattern> p, CopyRuns(whole, box, el));
  if (!p) return std::span<const std::byte>();
  if (info.is_contiguous() && p->runs() == 1) {
    return t.data().subspan(static_cast<size_t>(p->src),
                            static_cast<size_t>(p->length));
  }
  buf.resize(static_cast<size_t>(len));
  Status s;
  if (info.is_contiguous()) {
    ForEachRun(*p, [&](uint64_t src, uint64_t dst, uint64_t n) {
      std::memcpy(buf.data() + dst, t.data().data() + src,
                  static_cast<size_t>(n));
    });
  } else {
    // A strided view or a part of a shared storage: its row-major copy,
    // run by run (CopyTo walks any layout).
    ForEachRun(*p, [&](uint64_t src, uint64_t dst, uint64_t n) {
      if (!s.ok()) return;
      s = t.CopyTo(
          std::span<std::byte>(buf.data() + dst, static_cast<size_t>(n)), src);
    });
  }
  CKPT_RETURN_IF_ERROR(s);
  return std::span<const std::byte>(buf);
}

// Writes rank r's shard file.
Status WriteShard(const Checkpoint& in, const std::string& dir, int r,
                  int world, const std::vector<int>& dims,
                  const SaveOptions& options) {
  CKPT_ASSIGN_OR_RETURN(std::string shard, ShardPath(dir, r, world));
  CKPT_ASSIGN_OR_RETURN(Writer w, Writer::Create(shard, options.write));
  std::vector<NodeId> chunks;
  std::vector<std::byte> buf;
  for (size_t i = 0; i < in.num_tensors(); ++i) {
    CKPT_ASSIGN_OR_RETURN(TensorRef t, in.TensorAt(i));
    const TensorInfo& info = t.info();
    Box whole;
    whole.offsets.assign(info.shape.size(), 0);
    whole.sizes = info.shape;
    std::optional<Box> box;
    if (info.numel() == 0) {
      // Nothing to cut: rank 0 declares the tensor (a zero-size chunk).
      if (r == 0) box = whole;
    } else if (dims[i] < 0) {
      box = ReplicaPart(info.path, whole, static_cast<uint32_t>(r),
                        static_cast<uint32_t>(world));
    } else {
      const size_t d = static_cast<size_t>(dims[i]);
      auto [start, len] = EvenBlock(info.shape[d], r, world);
      if (len > 0) {
        box = whole;
        box->offsets[d] = start;
        box->sizes[d] = len;
      }
    }
    if (!box) continue;
    CKPT_ASSIGN_OR_RETURN(std::span<const std::byte> data,
                          BoxBytes(t, *box, buf));
    Chunk c;
    c.path = info.path;
    c.dtype = info.dtype;
    c.global_shape = info.shape;
    c.box = *box;
    c.data = data;
    CKPT_ASSIGN_OR_RETURN(std::optional<NodeId> n, AddChunk(w, c));
    if (n) chunks.push_back(*n);
  }
  std::optional<NodeId> globals;
  if (r == options.coordinator) {
    LeafHook hook = [&](const Value&, const std::string&) {
      return AddGlobalTensor(w);
    };
    CKPT_ASSIGN_OR_RETURN(NodeId g, CopyTree(w, in.root(), "", true, hook,
                                             /*placeholders=*/false));
    globals = g;
  }
  CKPT_RETURN_IF_ERROR(
      SetShardRoot(w, chunks, globals, std::nullopt, r, world));
  return w.Commit();
}

}  // namespace

Status ShardFile(const Checkpoint& in, const std::string& dir, int world_size,
                 const ShardDimFn& dim_of, const SaveOptions& options) {
  if (world_size < 1) {
    return InvalidArgument("world size must be at least 1, not " +
                           std::to_string(world_size));
  }
  if (options.coordinator < 0 || options.coordinator >= world_size) {
    return InvalidArgument("coordinator " +
                           std::to_string(options.coordinator) +
                           " is not a rank of " + std::to_string(world_size));
  }
  std::error_code ec;
  if (!options.overwrite && std::filesystem::exists(dir, ec)) {
    return InvalidArgument("already exists (overwrite not asked for)")
        .WithFile(dir);
  }
  // Every refusal before anything is written: how each tensor is cut, and
  // the layouts a sharded checkpoint cannot hold.
  std::vector<int> dims(in.num_tensors(), -1);
  for (size_t i = 0; i < in.num_tensors(); ++i) {
    CKPT_ASSIGN_OR_RETURN(TensorInfo info, in.TensorInfoAt(i));
    if (DTypeSize(info.dtype) == 0) {
      return InvalidArgument("unknown dtype").WithTensor(info.path);
    }
    CKPT_ASSIGN_OR_RETURN(Value v, in.Get(info.path));
    if (v.type_name() == "numpy.ndarray") {
      // The placeholder of a global tensor carries no class tag, so it
      // would come back as a torch tensor: refused rather than changed.
      return InvalidArgument(
                 "a numpy array (class tag numpy.ndarray) cannot be a global "
                 "tensor of a sharded checkpoint, which loads as a torch "
                 "tensor")
          .WithFile(in.path())
          .WithTensor(info.path);
    }
    const int d = dim_of ? dim_of(info) : 0;
    if (d < -1) {
      return InvalidArgument("dim " + std::to_string(d) +
                             " (a dim >= 0, or -1 to replicate)")
          .WithTensor(info.path);
    }
    // 0-d tensors, and a dim the tensor does not have, go replicated.
    dims[i] = d >= 0 && static_cast<size_t>(d) < info.shape.size() ? d : -1;
  }
  SaveOptions opt = options;
  // The input's string metadata travels in the manifest (and back out of
  // Consolidate); the caller's keys win.
  for (const auto& [k, v] : in.metadata()) {
    bool given = false;
    for (const auto& [ok, ov] : opt.metadata) given = given || ok == k;
    if (!given) opt.metadata.emplace_back(k, v);
  }
  for (int r = 0; r < world_size; ++r) {
    Status s = WriteShard(in, dir, r, world_size, dims, opt);
    if (!s.ok()) {
      // Nothing of a failed sharding stays: its temporary directory goes.
      if (auto shard = ShardPath(dir, 0, world_size); shard.ok()) {
        std::filesystem::remove_all(std::filesystem::path(*shard).parent_path(),
                                    ec);
      }
      return s.WithContext("shard " + std::to_string(r) + " of " +
                           std::to_string(world_size));
    }
  }
  CKPT_ASSIGN_OR_RETURN(CommitInfo info, CommitWritten(dir, world_size, opt));
  (void)info;
  return Status::OK();
}

}  // namespace ckpt::dist
