// .pth -> ckpt: container detection, persistent-id resolution, and the walk
// of the unpickled object graph that streams storages into a Writer.
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <future>
#include <map>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "bytes_internal.h"
#include "ckpt/pth.h"
#include "format_internal.h"
#include "pickle_internal.h"
#include "source_internal.h"
#include "tree_internal.h"
#include "zip_internal.h"

namespace ckpt {
namespace {

using internal::Bytes;
using internal::ByteSource;
using internal::Obj;
using internal::PyObj;
using internal::PyStorage;
using internal::ZipArchive;
using internal::ZipEntry;
using K = PyObj::K;

// Streamed storage pieces: bounded memory for any storage size.
constexpr uint64_t kPieceBytes = 16ull << 20;
// ImportOptions::progress is called at most once per this many bytes
// within a storage: a Python callback takes the GIL for each call.
constexpr uint64_t kProgressStep = 64ull << 20;

// Where a storage's bytes are in the input.
struct Payload {
  const ZipEntry* entry = nullptr;  // zip
  uint64_t offset = 0;              // legacy: absolute offset
};

struct Loaded {
  // Declared first, destroyed last: breaks reference cycles in the graph.
  std::unique_ptr<internal::PickleHeap> heap =
      std::make_unique<internal::PickleHeap>();
  std::shared_ptr<ByteSource> src;     // mapped: headers and pickles
  std::shared_ptr<ByteSource> stream;  // pread: storage bytes, copied once
  std::optional<ZipArchive> zip;
  std::string prefix;
  bool big_endian = false;
  bool check_crc = true;  // options' check_crc, off when the archive has none
  std::string crc_state;  // ImportReport::crc32
  internal::PickleLimits pickle_limits;
  std::string container;
  Obj root;
  std::unordered_map<std::string, std::shared_ptr<PyStorage>> by_key;
  std::unordered_map<const PyStorage*, Payload> payload;
};

Status Refuse(const Loaded& l, std::string msg, int64_t offset = -1) {
  Status s = InvalidArgument(std::move(msg)).WithFile(l.src->name());
  return offset >= 0 ? s.WithOffset(offset) : s;
}

uint64_t ElementSize(const PyStorage& s) {
  return s.untyped ? 1 : DTypeSize(s.dtype);
}

// Resolves ('storage', type, key, location, numel[, view_metadata]).
Result<Obj> LoadStorage(Loaded& l, const Obj& pid, bool legacy) {
  if (pid->kind != K::kTuple || pid->x().items.empty() ||
      pid->x().items[0]->kind != K::kStr) {
    return InvalidArgument("persistent id is not a ('storage', ...) tuple");
  }
  const auto& a = pid->x().items;
  if (a[0]->x().s == "module") {
    return InvalidArgument(
        "a whole nn.Module is pickled here (legacy source-code "
        "record); save model.state_dict() instead");
  }
  if (a[0]->x().s != "storage") {
    return InvalidArgument("persistent id of unknown type '" + a[0]->x().s +
                           "'");
  }
  if (a.size() != (legacy ? 6u : 5u)) {
    return InvalidArgument("storage persistent id has " +
                           std::to_string(a.size()) + " fields");
  }
  if (a[1]->kind != K::kGlobal || a[2]->kind != K::kStr ||
      a[3]->kind != K::kStr || a[4]->kind != K::kInt || a[4]->i < 0) {
    return InvalidArgument("malformed storage persistent id");
  }
  if (legacy && a[5]->kind != K::kNone) {
    return InvalidArgument(
        "legacy storage views (view_metadata) are not supported");
  }
  auto st = std::make_shared<PyStorage>();
  st->key = a[2]->x().s;
  st->location = a[3]->x().s;
  st->numel = static_cast<uint64_t>(a[4]->i);
  if (a[1]->x().s == "torch.storage") {
    st->untyped = true;
    st->dtype = DType::kUInt8;
  } else if (auto d = internal::StorageClassDType(a[1]->x().r().s2)) {
    st->dtype = *d;
  } else {
    return InvalidArgument("unknown storage type '" + a[1]->x().r().s2 + "'");
  }
  if (!IsValidDevice(st->location)) {
    return InvalidArgument("invalid storage location '" + st->location + "'");
  }
  if (st->key.empty() || st->key.find('/') != std::string::npos ||
      st->key == "." || st->key == "..") {
    return InvalidArgument("invalid storage key '" + st->key + "'");
  }
  auto it = l.by_key.find(st->key);
  if (it != l.by_key.end()) {
    const PyStorage& old = *it->second;
    if (old.dtype != st->dtype || old.numel != st->numel ||
        old.untyped != st->untyped) {
      return InvalidArgument("storage '" + st->key +
                             "' is named with two different "
                             "types or sizes");
    }
  } else {
    uint64_t bytes = 0;
    if (__builtin_mul_overflow(st->numel, ElementSize(*st), &bytes) ||
        bytes > INT64_MAX) {
      return InvalidArgument("storage '" + st->key + "' size overflows");
    }
    if (!legacy) {
      const ZipEntry* e = l.zip->Find(l.prefix + "data/" + st->key);
      if (!e) {
        return InvalidArgument("storage '" + st->key + "' has no record '" +
                               l.prefix + "data/" + st->key + "'");
      }
      if (e->size != bytes) {
        return InvalidArgument(
            "record '" + e->name + "' has " + std::to_string(e->size) +
            " bytes; its storage needs " + std::to_string(bytes) +
            (e->size < bytes ? " (truncated)" : ""));
      }
      l.payload[st.get()] = Payload{e, 0};
    }
    it = l.by_key.emplace(st->key, st).first;
  }
  auto o = std::make_shared<PyObj>();
  o->kind = K::kStorage;
  o->w().rw().storage = it->second;
  return o;
}

Status LoadZip(Loaded& l, const ImportOptions& opt) {
  CKPT_ASSIGN_OR_RETURN(ZipArchive z, ZipArchive::Open(l.src));
  l.zip = std::move(z);
  const auto& entries = l.zip->entries();
  if (entries.empty())
    return Refuse(l, "empty zip archive: not a torch.save checkpoint");
  const std::string& first = entries[0].name;
  auto slash = first.find('/');
  l.prefix = slash == std::string::npos ? "" : first.substr(0, slash + 1);
  bool has_pkl = l.zip->Find(l.prefix + "data.pkl") != nullptr;
  for (const auto& e : entries) {
    if (e.name == l.prefix + "constants.pkl" ||
        e.name.rfind(l.prefix + "code/", 0) == 0) {
      return Refuse(
          l,
          "TorchScript archive (torch.jit.save): save model.state_dict() "
          "with torch.save instead");
    }
    if (!has_pkl && (e.name.find(".data/extern_modules") != std::string::npos ||
                     e.name.find(".data/version") != std::string::npos)) {
      return Refuse(l, "torch.package archive, not supported");
    }
  }
  if (!has_pkl) {
    return Refuse(l, "zip archive without '" + l.prefix +
                         "data.pkl': not a torch.save checkpoint");
  }
  // torch 2.x can write archives without CRC-32s (compute_crc32=False):
  // every field zero means "not computed", as torch reads it. From here on
  // ckpt's own checksums protect the data.
  l.check_crc = opt.check_crc && !l.zip->crc32_absent();
  l.crc_state = !opt.check_crc ? "skipped"
                : l.check_crc  ? "checked"
                               : "not computed";
  if (const ZipEntry* bo = l.zip->Find(l.prefix + "byteorder")) {
    if (bo->size > 16) {
      return Refuse(
          l, "byteorder record of " + std::to_string(bo->size) + " bytes",
          static_cast<int64_t>(bo->local_header_offset));
    }
    CKPT_ASSIGN_OR_RETURN(Bytes b, l.zip->Read(*bo, l.check_crc));
    std::string v(reinterpret_cast<const char*>(b.data.data()), b.data.size());
    while (!v.empty() && (v.back() == '\n' || v.back() == '\r')) v.pop_back();
    if (v == "big") {
      l.big_endian = true;
    } else if (v != "little") {
      return Refuse(l, "unknown byteorder record '" + v + "'");
    }
  }
  const ZipEntry* pkl = l.zip->Find(l.prefix + "data.pkl");
  // Checked against the declared size before anything is inflated: a
  // deflated pickle of a few MiB can claim a GiB.
  if (pkl->size > opt.limits.max_pickle_bytes) {
    return Refuse(l,
                  "'" + pkl->name + "' is " + std::to_string(pkl->size) +
                      " bytes, more than the " +
                      std::to_string(opt.limits.max_pickle_bytes) +
                      "-byte pickle limit (max_pickle_bytes)",
                  static_cast<int64_t>(pkl->local_header_offset));
  }
  CKPT_ASSIGN_OR_RETURN(Bytes data, l.zip->Read(*pkl, l.check_crc));
  int64_t base = -1;
  if (pkl->method == 0) {
    CKPT_ASSIGN_OR_RETURN(uint64_t off, l.zip->PayloadOffset(*pkl));
    base = static_cast<int64_t>(off);
  }
  size_t used = 0;
  auto r = internal::Unpickle(
      data.data, l.prefix + "data.pkl", base,
      [&](const Obj& pid) { return LoadStorage(l, pid, false); }, &used,
      l.heap.get(), l.pickle_limits);
  if (!r.ok()) return r.status().WithFile(l.src->name());
  l.root = *r;
  l.container = "zip";
  return Status::OK();
}

// Legacy: magic, protocol version, sys_info, object, storage keys, then each
// storage as int64 count + raw little-endian bytes.
Status LoadLegacy(Loaded& l) {
  const ByteSource& src = *l.src;
  CKPT_ASSIGN_OR_RETURN(Bytes all, src.Read(0, src.size()));
  std::span<const std::byte> rest = all.data;
  uint64_t at = 0;
  auto next = [&](const char* what, bool with_pids) -> Result<Obj> {
    size_t used = 0;
    auto r = internal::Unpickle(
        rest, std::string("legacy ") + what, static_cast<int64_t>(at),
        with_pids ? internal::PersistentLoad([&](const Obj& pid) {
          return LoadStorage(l, pid, true);
        })
                  : internal::PersistentLoad(),
        &used, l.heap.get(), l.pickle_limits);
    if (!r.ok()) return r.status().WithFile(src.name());
    rest = rest.subspan(used);
    at += used;
    return r;
  };
  auto magic = next("magic number", false);
  // The magic is the int 0x1950a86a20f9469cfc6c (10 bytes LE).
  static const uint8_t kMagicLE[] = {0x6c, 0xfc, 0x9c, 0x46, 0xf9,
                                     0x20, 0x6a, 0xa8, 0x50, 0x19};
  if (!magic.ok() || (*magic)->kind != K::kBigInt ||
      (*magic)->x().r().bytes !=
          std::vector<uint8_t>(std::begin(kMagicLE), std::end(kMagicLE))) {
    return Refuse(l,
                  "not a torch.save file (neither a zip archive nor a legacy "
                  "pickle with torch's magic number)",
                  0);
  }
  CKPT_ASSIGN_OR_RETURN(Obj proto, next("protocol version", false));
  if (proto->kind != K::kInt || proto->i != 1001) {
    return Refuse(l, "legacy protocol version is not 1001", 0);
  }
  CKPT_ASSIGN_OR_RETURN(Obj sys_info, next("sys_info", false));
  CKPT_ASSIGN_OR_RETURN(l.root, next("object", true));
  CKPT_ASSIGN_OR_RETURN(Obj keys, next("storage keys", false));
  if (keys->kind != K::kList)
    return Refuse(l, "legacy storage key list is not a list");
  for (const auto& k : keys->x().items) {
    if (k->kind != K::kStr) return Refuse(l, "legacy storage key is not a str");
    auto it = l.by_key.find(k->x().s);
    if (it == l.by_key.end()) {
      return Refuse(
          l, "legacy storage '" + k->x().s + "' is not used by the object");
    }
    const PyStorage& st = *it->second;
    if (rest.size() < 8) {
      return Corrupt("legacy storage '" + k->x().s +
                     "': truncated before its size")
          .WithFile(src.name())
          .WithOffset(static_cast<int64_t>(at));
    }
    const auto count = internal::LoadLE<uint64_t>(rest.data());
    if (count != st.numel) {
      return Corrupt("legacy storage '" + k->x().s + "' holds " +
                     std::to_string(count) +
                     " elements, its persistent id says " +
                     std::to_string(st.numel))
          .WithFile(src.name())
          .WithOffset(static_cast<int64_t>(at));
    }
    uint64_t bytes = count * ElementSize(st);
    if (!internal::RangeWithin(8, bytes, rest.size())) {
      return Corrupt("legacy storage '" + k->x().s + "' is truncated")
          .WithFile(src.name())
          .WithOffset(static_cast<int64_t>(at));
    }
    l.payload[&st] = Payload{nullptr, at + 8};
    rest = rest.subspan(static_cast<size_t>(8 + bytes));
    at += 8 + bytes;
  }
  for (const auto& [key, st] : l.by_key) {
    if (!l.payload.count(st.get())) {
      return Refuse(l, "legacy storage '" + key + "' has no data");
    }
  }
  l.container = "legacy";
  return Status::OK();
}

constexpr uint64_t kMemoryPerInputByte = 80;

Result<Loaded> Load(const std::string& in, const ImportOptions& opt) {
  Loaded l;
  const std::string& enc = opt.encoding;
  if (enc != "utf-8" && enc != "utf8" && enc != "latin1" && enc != "latin-1") {
    return InvalidArgument("encoding '" + enc + "': use utf-8 or latin1");
  }
  l.pickle_limits.py2_latin1 = enc == "latin1" || enc == "latin-1";
  l.pickle_limits.max_bytes = opt.limits.max_pickle_bytes;
  CKPT_ASSIGN_OR_RETURN(l.src, internal::OpenSource(in, {}));
  // Real checkpoints need ~45 bytes of objects per pickle byte (a tensor
  // entry of ~100 bytes makes ~4.5 KiB of objects): allow the fixed budget
  // or a bounded multiple of the input, so a big state dict imports and a
  // small hostile file still cannot amplify itself.
  l.pickle_limits.max_memory =
      std::max(opt.limits.max_pickle_memory,
               kMemoryPerInputByte *
                   std::min(l.src->size(), opt.limits.max_pickle_bytes));
  // Storages are read with pread into one reused buffer: memory stays
  // bounded (no multi-GiB mapping resident) and no page is faulted twice.
  CKPT_ASSIGN_OR_RETURN(l.stream, internal::OpenSource(in, {.pread = true}));
  const ByteSource& src = *l.src;
  uint64_t head_len = std::min<uint64_t>(src.size(), 512);
  CKPT_ASSIGN_OR_RETURN(Bytes head, src.Read(0, head_len));
  auto starts = [&](std::string_view m, size_t at = 0) {
    return head_len >= at + m.size() &&
           std::memcmp(head.data.data() + at, m.data(), m.size()) == 0;
  };
  if (starts("PK\x03\x04")) {
    CKPT_RETURN_IF_ERROR(LoadZip(l, opt));
  } else if (starts("ustar", 257)) {
    return Refuse(
        l, "tar checkpoint from torch < 0.4: re-save it with a newer torch", 0);
  } else if (starts("PYTORCH1")) {
    return Refuse(l, "PYTORCH1 preview-release archive is not supported", 0);
  } else if (starts(std::string_view("\x89"
                                     "CKPT",
                                     5))) {
    return Refuse(l, "this is already a ckpt file", 0);
  } else if (head_len >= 9 && static_cast<char>(head.data[8]) == '{') {
    // Before the pickle test: a safetensors header length may begin with
    // 0x80, which is also a pickle's PROTO opcode.
    return Refuse(l,
                  "this is a safetensors file, not a torch.save file "
                  "(ckpt.convert or ckpt.load read it)",
                  0);
  } else if (head_len > 0 && static_cast<uint8_t>(head.data[0]) == 0x80) {
    CKPT_RETURN_IF_ERROR(LoadLegacy(l));
  } else {
    return Refuse(l, "not a torch.save file (no zip or pickle header)", 0);
  }
  return l;
}

// ---- conversion -------------------------------------------------------------

// What a walk of the whole graph decides before anything is written: the
// expanded size (memo reuse repeats a subtree in the tree as written, so a
// 1 KiB pickle can stand for 2^60 nodes) and the element type each storage
// is byte-swapped by.
struct Plan {
  std::unordered_map<const PyStorage*, DType> swap;
  // Bytes of every distinct storage a tensor or bare storage uses: what
  // the emitter will stream (ImportOptions::progress's total).
  uint64_t storage_bytes = 0;
  std::unordered_set<const PyStorage*> storages;
};

size_t SwapUnit(DType d) {
  size_t w = DTypeSize(d);
  return d == DType::kComplex32 || d == DType::kComplex64 ||
                 d == DType::kComplex128
             ? w / 2
             : w;
}

// What one object stands for in the tree as written (memo reuse
// expanded): nodes, tensor references, bytes of strings, bytes and big
// ints. Sums saturate.
struct Count {
  uint64_t nodes = 0, tensors = 0, bytes = 0;
  void Add(const Count& o) {
    auto add = [](uint64_t a, uint64_t b) {
      return a > UINT64_MAX - b ? UINT64_MAX : a + b;
    };
    nodes = add(nodes, o.nodes);
    tensors = add(tensors, o.tensors);
    bytes = add(bytes, o.bytes);
  }
};

Status CheckCount(const Loaded& l, const ImportLimits& lim, const Count& c) {
  if (c.tensors > lim.max_tensor_refs) {
    return Refuse(l, "the object expands to more than " +
                         std::to_string(lim.max_tensor_refs) +
                         " tensor references (memo reuse repeats them; limit "
                         "max_tensor_refs)");
  }
  if (c.nodes > lim.max_nodes) {
    return Refuse(l, "the object expands to more than " +
                         std::to_string(lim.max_nodes) +
                         " nodes (memo reuse repeats them; limit max_nodes)");
  }
  if (c.bytes > lim.max_expanded_bytes) {
    return Refuse(
        l, "the object expands to more than " +
               std::to_string(lim.max_expanded_bytes) +
               " bytes of strings and bytes (memo reuse repeats them; limit "
               "max_expanded_bytes)");
  }
  return Status::OK();
}

// An object's own count (its children are added by the walk), and the
// element type a big-endian storage is swapped by.
Result<Count> CountSelf(const Loaded& l, const PyObj& o, Plan* plan) {
  Count c;
  c.nodes = 1;
  switch (o.kind) {
    case K::kStr:
    case K::kBytes:
    case K::kBigInt:
      c.bytes = std::max(o.x().s.size(), o.x().r().bytes.size());
      break;
    case K::kTensor:
    case K::kStorage: {
      c.tensors = 1;
      const auto& st =
          o.kind == K::kTensor ? o.x().r().tensor->storage : o.x().r().storage;
      DType d = o.kind == K::kTensor ? o.x().r().tensor->dtype
                                     : o.x().r().storage->dtype;
      if (plan->storages.insert(st.get()).second) {
        const uint64_t n = st->numel * ElementSize(*st);
        plan->storage_bytes = plan->storage_bytes > UINT64_MAX - n
                                  ? UINT64_MAX
                                  : plan->storage_bytes + n;
      }
      if (l.big_endian && !st->inline_data) {
        auto [it, fresh] = plan->swap.emplace(st.get(), d);
        if (!fresh && SwapUnit(it->second) != SwapUnit(d)) {
          return Refuse(l, "big-endian storage '" + st->key +
                               "' is viewed as " +
                               std::string(DTypeName(it->second)) + " and as " +
                               std::string(DTypeName(d)) +
                               ": elements of different widths cannot both "
                               "be byte-swapped");
        }
      }
      break;
    }
    default:
      break;
  }
  return c;
}

Status MakePlan(const Loaded& l, const ImportLimits& lim, Plan* plan) {
  auto check = [&](const Count& c) { return CheckCount(l, lim, c); };
  // Iterative depth-first walk; each distinct object is counted once and
  // its count reused. An edge back to an object being walked (a cycle)
  // counts nothing here: the emitter refuses it, naming its path.
  std::unordered_map<const PyObj*, Count> done;
  std::unordered_set<const PyObj*> open;
  struct Frame {
    const PyObj* o;
    size_t next = 0;  // children: dict key 0, value 0, key 1, ...; else items
    Count sum;
  };
  auto child_of = [](const PyObj& o, size_t i) -> const PyObj* {
    if (o.kind == K::kDict)
      return (i % 2 ? o.x().items[i / 2] : o.x().r().keys[i / 2]).get();
    return o.x().items[i].get();
  };
  auto nchildren = [](const PyObj& o) -> size_t {
    if (o.kind == K::kDict)
      return 2 * std::min(o.x().items.size(), o.x().r().keys.size());
    const auto kind = internal::TreeKind(o.kind);
    return kind && IsContainer(*kind) ? o.x().items.size() : 0;
  };
  std::vector<Frame> stack;
  auto enter = [&](const PyObj* o) -> Status {
    CKPT_ASSIGN_OR_RETURN(Count c, CountSelf(l, *o, plan));
    open.insert(o);
    stack.push_back(Frame{o, 0, c});
    return Status::OK();
  };
  CKPT_RETURN_IF_ERROR(enter(l.root.get()));
  while (!stack.empty()) {
    Frame& f = stack.back();
    if (f.next < nchildren(*f.o)) {
      const PyObj* c = child_of(*f.o, f.next++);
      if (auto it = done.find(c); it != done.end()) {
        f.sum.Add(it->second);
        CKPT_RETURN_IF_ERROR(check(f.sum));
      } else if (!open.count(c)) {
        CKPT_RETURN_IF_ERROR(enter(c));
      }
      continue;
    }
    Count c = f.sum;
    open.erase(f.o);
    done.emplace(f.o, c);
    stack.pop_back();
    CKPT_RETURN_IF_ERROR(check(c));
    if (!stack.empty()) {
      Count& p = stack.back().sum;
      p.Add(c);
      CKPT_RETURN_IF_ERROR(check(p));
    }
  }
  return Status::OK();
}

// What the key rules (KeyClasses, KeySegmentOf) need of a PyObj.
internal::KeyNode Describe(const PyObj& o) {
  internal::KeyNode k;
  k.kind = internal::TreeKind(o.kind).value_or(ValueKind::kNone);
  k.int_value = o.i;
  k.float_value = o.f;
  k.imag_value = o.x().r().im;
  k.str = o.x().s;
  k.bytes = o.x().r().bytes;
  k.num_items = o.x().items.size();
  return k;
}

class Emitter {
 public:
  // The paths the writer keeps (one per node) may take the configured
  // bytes, but no more than a multiple of the input: a 230 KB pickle
  // reusing one tensor under ~1 M distinct long paths held ~600 MB of
  // paths before the 256 MiB limit refused it. Real trees take a few times
  // their pickle's size in paths.
  Emitter(Loaded& l, const Plan& plan, Writer* w, const ImportOptions& opt)
      : l_(l),
        plan_(plan),
        w_(w),
        opt_(opt),
        path_budget_(std::min(
            opt.limits.max_expanded_bytes,
            std::max<uint64_t>(kMinPathBudget,
                               kPathBytesPerInputByte * l.src->size()))) {}

  /// Emits `o` at paths_.path() (the path of `o`). The same walk and the same
  /// checks run with and without a writer: a dry run decides what a
  /// conversion decides.
  Result<NodeId> Emit(const Obj& o, int depth);
  /// Adds `n` converted bytes; calls ImportOptions::progress when `flush`
  /// or when kProgressStep bytes have passed since its last call.
  Status Progress(uint64_t n, bool flush);
  ImportReport report;

 private:
  Status Fail(Status s) {
    return s.WithFile(l_.src->name()).WithTensor(paths_.path());
  }
  Result<StorageId> WriteStorage(const std::shared_ptr<PyStorage>& st);
  Status Stream(std::span<const std::byte> bytes, DType dtype);
  Status CheckKey(const Obj& key, const char* role);
  Result<uint32_t> ClassOf(const PyObj& o, int depth);
  Result<std::vector<size_t>> DistinctItems(const PyObj& set, int depth);
  std::string KeySegment(const PyObj& key) const;
  Result<NodeId> EmitTensor(const Obj& o);
  Result<NodeId> EmitContainer(const Obj& o, int depth);

  Loaded& l_;
  const Plan& plan_;
  Writer* w_;  // nullptr for a dry run
  const ImportOptions& opt_;
  PathBuilder paths_;  // at the node being emitted
  static constexpr uint64_t kMinPathBudget = 32ull << 20;
  static constexpr uint64_t kPathBytesPerInputByte = 16;
  uint64_t path_budget_;
  uint64_t path_bytes_ = 0;                  // path bytes of every node so far
  std::unordered_set<const PyObj*> key_ok_;  // objects CheckKey accepted
  std::unordered_set<std::string> tensor_paths_;
  std::unordered_map<const PyStorage*, StorageId> written_;
  std::unordered_set<const PyObj*> on_path_;
  internal::KeyClasses classes_;  // Python's == on keys and set items
  std::unordered_map<const PyObj*, uint32_t> class_of_;
  std::vector<std::byte> swap_;
  std::vector<std::byte> buf_;  // one storage piece at a time
  uint64_t done_ = 0;           // storage bytes converted so far
  uint64_t reported_ = 0;       // done_ at the last progress call
};

Status Emitter::Progress(uint64_t n, bool flush) {
  if (!opt_.progress) return Status::OK();
  done_ += n;
  if (!flush && done_ - reported_ < kProgressStep) return Status::OK();
  reported_ = done_;
  // done == total is told only once the output is committed (Run's last
  // call), so a sink that says "saved" at 100% is right; the plan's total
  // bounds done below that.
  const uint64_t total = plan_.storage_bytes;
  return opt_.progress(std::min(done_, total > 0 ? total - 1 : 0), total);
}

Status Emitter::Stream(std::span<const std::byte> bytes, DType dtype) {
  if (!l_.big_endian) return w_->Append(bytes);
  // Swap a bounded piece at a time.
  size_t w = std::max<size_t>(1, DTypeSize(dtype));
  for (size_t off = 0; off < bytes.size();) {
    size_t n = std::min<size_t>(bytes.size() - off, kPieceBytes / w * w);
    swap_.assign(bytes.begin() + static_cast<long>(off),
                 bytes.begin() + static_cast<long>(off + n));
    internal::SwapElements(swap_, dtype);
    CKPT_RETURN_IF_ERROR(w_->Append(swap_));
    off += n;
  }
  return Status::OK();
}

Result<StorageId> Emitter::WriteStorage(const std::shared_ptr<PyStorage>& st) {
  auto it = written_.find(st.get());
  if (it != written_.end()) return it->second;
  const uint64_t bytes = st->numel * ElementSize(*st);
  report.storages++;
  report.storage_bytes += bytes;
  StorageId id = static_cast<StorageId>(written_.size());
  if (st->inline_data) {
    if (w_) {
      CKPT_ASSIGN_OR_RETURN(id, w_->AddStorage(*st->inline_data, "cpu"));
    }
    written_[st.get()] = id;
    CKPT_RETURN_IF_ERROR(Progress(bytes, true));
    return id;
  }
  const Payload& p = l_.payload.at(st.get());
  if (w_) {
    CKPT_ASSIGN_OR_RETURN(id, w_->BeginStorage(bytes, st->location));
  }
  // The element type to byte-swap by: the planned one (that of the first
  // tensor viewing it: an untyped v3 storage is uint8 by itself).
  auto sw = plan_.swap.find(st.get());
  const DType swap_dtype = sw != plan_.swap.end() ? sw->second : st->dtype;
  if (p.entry && p.entry->method != 0) {
    // Inflated piece by piece: memory stays bounded for any size.
    CKPT_RETURN_IF_ERROR(l_.zip->Inflate(
        *p.entry, l_.check_crc, static_cast<size_t>(kPieceBytes),
        [&](std::span<const std::byte> piece) {
          Status s = w_ ? Stream(piece, swap_dtype) : Status::OK();
          return s.ok() ? Progress(piece.size(), false) : s;
        }));
  } else {
    uint64_t start = p.offset;
    if (p.entry) {
      CKPT_ASSIGN_OR_RETURN(start, l_.zip->PayloadOffset(*p.entry));
    }
    uint32_t crc = 0;
    const bool direct =
        !l_.big_endian && l_.src->zero_copy() && l_.stream->fd() >= 0;
    for (uint64_t off = 0; off < bytes; off += kPieceBytes) {
      uint64_t n = std::min(kPieceBytes, bytes - off);
      std::span<const std::byte> piece;
      Bytes view;
      if (direct) {
        // Map the piece in one call; the kernel then copies it file to
        // file while the CRC and the writer's hash read the mapping.
        CKPT_RETURN_IF_ERROR(l_.src->Populate(start + off, n));
        CKPT_ASSIGN_OR_RETURN(view, l_.src->Read(start + off, n));
        piece = view.data;
      } else {
        buf_.resize(static_cast<size_t>(n));
        CKPT_RETURN_IF_ERROR(l_.stream->ReadInto(start + off, buf_));
        piece = buf_;
      }
      // The CRC runs on a second thread while the writer hashes and
      // writes the same (read-only) bytes.
      std::future<uint32_t> piece_crc;
      if (p.entry && l_.check_crc) {
        piece_crc = std::async(std::launch::async, [piece, crc] {
          return internal::Crc32(crc, piece);
        });
      }
      Status s;
      if (w_) {
        s = direct ? w_->AppendFromFile(l_.stream->fd(), start + off, piece)
                   : Stream(piece, swap_dtype);
      }
      if (piece_crc.valid()) crc = piece_crc.get();
      CKPT_RETURN_IF_ERROR(s);
      if (direct) l_.src->Release(start + off, n);
      CKPT_RETURN_IF_ERROR(Progress(n, false));
    }
    if (p.entry && l_.check_crc && crc != p.entry->crc32) {
      return ChecksumMismatch("zip: record '" + p.entry->name +
                              "': CRC-32 mismatch")
          .WithFile(l_.src->name())
          .WithOffset(static_cast<int64_t>(start));
    }
  }
  if (w_) CKPT_RETURN_IF_ERROR(w_->EndStorage());
  written_[st.get()] = id;
  CKPT_RETURN_IF_ERROR(Progress(0, true));
  return id;
}

// A dict key must be a scalar, or a tuple / frozenset of keys, at any depth:
// the writer refuses anything else, and so does a dry run, here. Each
// object is checked once, however often the memo repeats it: a tuple
// doubled 20 times inside 800 nested frozensets is 21 objects, not 800 x
// 3 M nodes (that walk took 35 s before refusing).
Status Emitter::CheckKey(const Obj& key, const char* role) {
  std::vector<std::pair<const PyObj*, bool>> todo{{key.get(), false}};
  std::vector<const PyObj*> seen;
  while (!todo.empty()) {
    auto [k, inner] = todo.back();
    todo.pop_back();
    if (!key_ok_.insert(k).second) continue;  // checked (or being checked)
    seen.push_back(k);
    auto kind = internal::TreeKind(k->kind);
    if (!kind || !IsKeyKind(*kind)) {
      for (const PyObj* x : seen) key_ok_.erase(x);
      return Fail(InvalidArgument(
          "a " +
          std::string(kind ? ValueKindName(*kind)
                           : internal::PyKindName(k->kind)) +
          (inner ? " inside a tuple" : "") + " cannot be " + role));
    }
    if (k->kind == K::kTuple || k->kind == K::kFrozenSet) {
      if (todo.size() + k->x().items.size() > opt_.limits.max_nodes) {
        for (const PyObj* x : seen) key_ok_.erase(x);
        return Fail(InvalidArgument("dict key too large"));
      }
      for (const auto& x : k->x().items) todo.emplace_back(x.get(), true);
    }
  }
  return Status::OK();
}

// The equality class of a hashable value, as Python's == sees it. The same
// object (memo reuse) is the same class, as Python's identity check makes
// one NaN object one key.
Result<uint32_t> Emitter::ClassOf(const PyObj& o, int depth) {
  if (auto it = class_of_.find(&o); it != class_of_.end()) return it->second;
  if (depth > static_cast<int>(kMaxTreeDepth) - 1) {
    return Fail(InvalidArgument("object nested deeper than " +
                                std::to_string(kMaxTreeDepth) + " levels"));
  }
  internal::KeyNode n = Describe(o);
  std::vector<uint32_t> items;
  if (o.kind == K::kTuple) {
    for (const auto& x : o.x().items) {
      CKPT_ASSIGN_OR_RETURN(uint32_t c, ClassOf(*x, depth + 1));
      items.push_back(c);
    }
  } else if (o.kind == K::kFrozenSet) {
    CKPT_ASSIGN_OR_RETURN(auto keep, DistinctItems(o, depth));
    for (size_t i : keep) items.push_back(class_of_.at(o.x().items[i].get()));
    n.num_items = items.size();
  }
  uint32_t c = classes_.Classify(n, items);
  class_of_.emplace(&o, c);
  return c;
}

// Indices of the items of a set or frozenset as Python holds them: the
// first of each group of equal items (set.add keeps the one it has).
Result<std::vector<size_t>> Emitter::DistinctItems(const PyObj& set,
                                                   int depth) {
  std::vector<size_t> keep;
  std::unordered_set<uint32_t> seen;
  for (size_t i = 0; i < set.x().items.size(); ++i) {
    CKPT_RETURN_IF_ERROR(CheckKey(set.x().items[i], "a set item"));
    CKPT_ASSIGN_OR_RETURN(uint32_t c, ClassOf(*set.x().items[i], depth + 1));
    if (seen.insert(c).second) keep.push_back(i);
  }
  return keep;
}

// The path segment of a dict key as the file spells it (docs/FORMAT.md
// 7.3), as ckpt::KeySegment forms it: a frozenset's items once each (as
// Python holds them) and in canonical order (section 10). `key` passed
// CheckKey and ClassOf, so every object in it has its class. Each distinct
// object is described once, so memo reuse costs only the segment's length.
// Why not ckpt::KeySegment(PathKey): a pickle's key is a graph (the memo
// shares objects), and a PathKey is a tree, so building one would expand
// every shared object; both go through the same grammar (KeySegmentOf) and
// the same canonical order (CompareHashable).
std::string Emitter::KeySegment(const PyObj& key) const {
  std::vector<const PyObj*> node;
  std::vector<std::vector<uint32_t>> kids;  // per id: its items' ids
  std::unordered_map<const PyObj*, uint32_t> id_of;
  auto get = [&](uint32_t id) {
    internal::KeyNode n = Describe(*node[id]);
    n.num_items = kids[id].size();
    return n;
  };
  auto item = [&](uint32_t id, size_t i) { return kids[id][i]; };
  // Post-order over distinct objects: an item's ids (and a frozenset's
  // order) are settled before its container's.
  struct Frame {
    const PyObj* o;
    bool expanded;
  };
  std::vector<Frame> todo{{&key, false}};
  while (!todo.empty()) {
    Frame f = todo.back();
    todo.pop_back();
    if (!f.expanded) {
      if (!id_of.emplace(f.o, static_cast<uint32_t>(node.size())).second) {
        continue;
      }
      node.push_back(f.o);
      kids.emplace_back();
      todo.push_back({f.o, true});
      for (const auto& x : f.o->x().items) todo.push_back({x.get(), false});
      continue;
    }
    if (f.o->kind != K::kTuple && f.o->kind != K::kFrozenSet) continue;
    const uint32_t id = id_of.at(f.o);
    std::vector<uint32_t> ids;
    std::unordered_set<uint32_t> seen;  // classes, for a frozenset
    for (const auto& x : f.o->x().items) {
      if (f.o->kind == K::kFrozenSet &&
          !seen.insert(class_of_.at(x.get())).second) {
        continue;
      }
      ids.push_back(id_of.at(x.get()));
    }
    kids[id] = std::move(ids);
    if (f.o->kind == K::kFrozenSet) {
      std::stable_sort(kids[id].begin(), kids[id].end(),
                       [&](uint32_t a, uint32_t b) {
                         return internal::CompareHashable(a, b, get, item) < 0;
                       });
    }
  }
  return internal::KeySegmentOf(0, get, item);
}

Result<NodeId> Emitter::EmitTensor(const Obj& o) {
  std::shared_ptr<internal::PyTensor> t = o->x().r().tensor;
  if (o->kind == K::kStorage) {  // a bare storage: a 1-D tensor over it
    t = std::make_shared<internal::PyTensor>();
    t->storage = o->x().r().storage;
    t->dtype = o->x().r().storage->dtype;
    t->shape = {static_cast<int64_t>(o->x().r().storage->numel)};
    t->strides = {1};
  }
  if (!tensor_paths_.insert(paths_.path()).second) {
    return Fail(InvalidArgument(
        "two tensors have the path '" + paths_.path() +
        "' (keys with the same path form, e.g. 1 and \"1\", in one dict)"));
  }
  // The writer's view check, before the storage's bytes are streamed.
  if (auto problem = internal::ViewProblem(
          static_cast<uint8_t>(t->dtype), t->shape, t->strides, t->offset,
          t->storage->numel * ElementSize(*t->storage))) {
    return Fail(InvalidArgument("bad tensor view: " + *problem));
  }
  report.tensors++;
  auto sid = WriteStorage(t->storage);
  if (!sid.ok()) return Fail(sid.status());
  if (!w_) return NodeId{0};
  TensorSpec spec{t->dtype,  t->shape,         t->strides,     *sid,
                  t->offset, t->requires_grad, t->is_parameter};
  auto n = w_->AddTensor(spec);
  if (!n.ok()) return Fail(n.status());
  if (t->numpy) {
    // torch.load gives back a numpy array; so does ckpt.load.
    Status s = w_->SetTypeName(*n, "numpy.ndarray");
    if (!s.ok()) return Fail(s);
  }
  return *n;
}

Result<NodeId> Emitter::EmitContainer(const Obj& o, int depth) {
  if (!on_path_.insert(o.get()).second) {
    return Fail(InvalidArgument("the object contains itself (a cycle)"));
  }
  // Which entries Python ends up holding: a dict keeps the first of equal
  // keys, in its place, with the last value given for it (pickle's SETITEMS
  // are d[k] = v); a set keeps the first of equal items.
  std::vector<std::pair<size_t, size_t>> entries;  // (key index, value index)
  if (o->kind == K::kDict) {
    std::unordered_map<uint32_t, size_t> slot;
    for (size_t i = 0; i < o->x().items.size(); ++i) {
      CKPT_RETURN_IF_ERROR(CheckKey(o->x().r().keys[i], "a dict key"));
      CKPT_ASSIGN_OR_RETURN(uint32_t c,
                            ClassOf(*o->x().r().keys[i], depth + 1));
      auto [it, fresh] = slot.emplace(c, entries.size());
      if (fresh) {
        entries.emplace_back(i, i);
      } else {
        entries[it->second].second = i;
      }
    }
  } else if (o->kind == K::kSet || o->kind == K::kFrozenSet) {
    CKPT_ASSIGN_OR_RETURN(auto keep, DistinctItems(*o, depth));
    for (size_t i : keep) entries.emplace_back(i, i);
  } else {
    for (size_t i = 0; i < o->x().items.size(); ++i) entries.emplace_back(i, i);
  }
  std::vector<NodeId> keys, items;
  for (size_t j = 0; j < entries.size(); ++j) {
    const auto [ki, vi] = entries[j];
    std::string seg;
    if (o->kind == K::kDict) {
      const Obj& key = o->x().r().keys[ki];
      CKPT_ASSIGN_OR_RETURN(NodeId k, Emit(key, depth + 1));
      keys.push_back(k);
      seg = KeySegment(*key);
    } else {
      seg = std::to_string(j);
    }
    paths_.Push(seg);
    auto v = Emit(o->x().items[vi], depth + 1);
    paths_.Pop();
    if (!v.ok()) return v.status();
    items.push_back(*v);
  }
  on_path_.erase(o.get());
  if (!w_) return NodeId{0};
  Result<NodeId> r = NodeId{0};
  switch (o->kind) {
    case K::kList:
      r = w_->AddList(items);
      break;
    case K::kTuple:
      r = w_->AddTuple(items);
      break;
    case K::kSet:
      r = w_->AddSet(items);
      break;
    case K::kFrozenSet:
      r = w_->AddFrozenSet(items);
      break;
    default:
      r = w_->AddDict(keys, items, o->x().r().s2);
      break;
  }
  if (!r.ok()) return Fail(r.status());
  return r;
}

Result<NodeId> Emitter::Emit(const Obj& o, int depth) {
  if (depth > static_cast<int>(kMaxTreeDepth) - 1) {
    return Fail(InvalidArgument("object nested deeper than " +
                                std::to_string(kMaxTreeDepth) + " levels"));
  }
  // The writer keeps a path per node while it builds the header: bound
  // their sum (a long key under a deep or wide tree multiplies it).
  path_bytes_ += paths_.path().size() + 1;
  if (path_bytes_ > path_budget_) {
    return Fail(InvalidArgument(
        "the paths of the tree take more than " + std::to_string(path_budget_) +
        " bytes (limit: max_expanded_bytes, or 16 bytes per input "
        "byte and at least 32 MiB)"));
  }
  Writer* w = w_;
  switch (o->kind) {
    case K::kNone:
      return w ? w->AddNone() : NodeId{0};
    case K::kBool:
      return w ? w->AddBool(o->i != 0) : NodeId{0};
    case K::kInt:
      return w ? w->AddInt(o->i) : NodeId{0};
    case K::kBigInt: {
      if (o->x().r().bytes.empty() ||
          o->x().r().bytes.size() > kMaxBigIntBytes) {
        return Fail(InvalidArgument("integer of " +
                                    std::to_string(o->x().r().bytes.size()) +
                                    " bytes"));
      }
      if (!w) return NodeId{0};
      auto r = w->AddBigInt(o->x().r().bytes);
      if (!r.ok()) return Fail(r.status());
      return r;
    }
    case K::kFloat:
      return w ? w->AddFloat(o->f) : NodeId{0};
    case K::kComplex:
      return w ? w->AddComplex(o->f, o->x().r().im) : NodeId{0};
    case K::kStr:
      if (o->i == internal::kPy2Undecodable) {
        return Fail(InvalidArgument("a Python 2 str that is not UTF-8 ('" +
                                    o->x().s.substr(0, 40) +
                                    "' as latin-1); torch.load reads it only "
                                    "with encoding='latin1': convert with "
                                    "--encoding latin1"));
      }
      return w ? w->AddString(o->x().s) : NodeId{0};
    case K::kBytes:
      return w ? w->AddBytes(o->x().r().bytes) : NodeId{0};
    case K::kDType: {
      if (!IsKnownDType(static_cast<uint8_t>(o->i))) {
        return Fail(
            InvalidArgument("unsupported dtype code " + std::to_string(o->i)));
      }
      if (!w) return NodeId{0};
      auto r = w->AddDType(static_cast<DType>(o->i));
      if (!r.ok()) return Fail(r.status());
      return r;
    }
    case K::kDevice: {
      if (!IsValidDevice(o->x().s))
        return Fail(InvalidArgument("invalid device '" + o->x().s + "'"));
      if (!w) return NodeId{0};
      auto r = w->AddDevice(o->x().s);
      if (!r.ok()) return Fail(r.status());
      return r;
    }
    case K::kStorage:
    case K::kTensor:
      return EmitTensor(o);
    case K::kList:
    case K::kTuple:
    case K::kSet:
    case K::kFrozenSet:
    case K::kDict:
      return EmitContainer(o, depth);
    case K::kGlobal:
      return Fail(InvalidArgument("a class or function object ('" + o->x().s +
                                  "." + o->x().r().s2 + "') cannot be stored"));
    case K::kNpDType:
      return Fail(
          InvalidArgument("a bare numpy dtype object cannot be stored"));
    case K::kNpArray:
      return Fail(InvalidArgument("an incomplete numpy array"));
  }
  return Fail(InvalidArgument("unsupported object"));
}

Result<ImportReport> Run(const std::string& in, const std::string* out,
                         const ImportOptions& opt) {
  CKPT_ASSIGN_OR_RETURN(Loaded l, Load(in, opt));
  Plan plan;
  CKPT_RETURN_IF_ERROR(MakePlan(l, opt.limits, &plan));
  std::optional<Writer> w;
  if (out) {
    WriteOptions wo = opt.write;
    if (wo.producer == "ckpt")
      wo.producer = "pth2ckpt (ckpt " + std::string(VersionString()) + ")";
    CKPT_ASSIGN_OR_RETURN(Writer writer, Writer::Create(*out, wo));
    w.emplace(std::move(writer));
  }
  if (opt.progress) {
    CKPT_RETURN_IF_ERROR(opt.progress(0, plan.storage_bytes));
  }
  Emitter e(l, plan, w ? &*w : nullptr, opt);
  CKPT_ASSIGN_OR_RETURN(NodeId root, e.Emit(l.root, 0));
  e.report.container = l.container;
  e.report.crc32 = l.crc_state;
  if (w) {
    CKPT_RETURN_IF_ERROR(w->SetRoot(root));
    CKPT_RETURN_IF_ERROR(
        w->SetMetadata("source_format", "torch.save " + l.container));
    if (!l.crc_state.empty()) {
      CKPT_RETURN_IF_ERROR(w->SetMetadata(
          "source_crc32",
          l.crc_state == "not computed"
              ? "not computed (every CRC-32 field of the archive is zero)"
              : l.crc_state));
    }
    Status s = w->Commit();
    if (!s.ok()) return s.WithFile(*out);
  }
  if (opt.progress) {
    // The output is committed: a Status returned now is ignored.
    (void)opt.progress(plan.storage_bytes, plan.storage_bytes);
  }
  return e.report;
}

}  // namespace

Result<ImportReport> ImportPth(const std::string& in, const std::string& out,
                               const ImportOptions& options) {
  return Run(in, &out, options);
}

Result<ImportReport> CheckPth(const std::string& in,
                              const ImportOptions& options) {
  return Run(in, nullptr, options);
}

namespace {

namespace fs = std::filesystem;

// The inputs below `in_dir`, each with the output path it would get and,
// where one applies, the reason it is refused before it is read.
std::vector<DirFileResult> PlanDir(const fs::path& in_dir,
                                   const fs::path& out_dir,
                                   std::error_code& ec) {
  std::vector<std::pair<DirFileResult, fs::path>> found;
  fs::recursive_directory_iterator it(in_dir, fs::directory_options::none, ec);
  for (; !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    const fs::path& p = it->path();
    const std::string ext = p.extension().string();
    if (ext != ".pth" && ext != ".pt" && ext != ".bin") continue;
    std::error_code e2;
    const fs::file_status ls = it->symlink_status(e2);
    DirFileResult r;
    // Named after the path under in_dir as listed, never a link's target.
    r.input = p.lexically_relative(in_dir).generic_string();
    const std::string full = p.string();
    if (fs::is_symlink(ls)) {
      const fs::file_status ts = fs::status(p, e2);
      if (!fs::exists(ts)) {
        r.status =
            NotFound("dangling symlink: its target '" +
                     fs::read_symlink(p, e2).string() + "' does not exist")
                .WithFile(full);
      } else if (fs::is_directory(ts)) {
        continue;  // directory links are not followed
      } else if (!fs::is_regular_file(ts)) {
        r.status =
            InvalidArgument("symlink to something that is not a regular file")
                .WithFile(full);
      }
    } else if (fs::is_directory(ls)) {
      continue;
    } else if (!fs::is_regular_file(ls)) {
      r.status = InvalidArgument("not a regular file (device, FIFO or socket)")
                     .WithFile(full);
    }
    found.emplace_back(std::move(r), p);
  }
  if (ec) return {};
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) {
    return a.first.input < b.first.input;
  });
  std::unordered_map<std::string, std::string> claimed;  // output -> input
  // Directories the run creates for its outputs (every parent below
  // out_dir of an output not refused yet): an output named like one of
  // them would be refused by whichever conversion comes second, so the
  // plan refuses it up front, and a dry run says the same as a run.
  std::unordered_map<std::string, std::string>
      needed_dirs;  // dir -> an input needing it
  for (const auto& [r, p] : found) {
    if (!r.status.ok()) continue;
    for (fs::path d = fs::path(r.input).parent_path(); !d.empty();
         d = d.parent_path()) {
      needed_dirs.emplace(d.generic_string(), r.input);
    }
  }
  std::vector<DirFileResult> out;
  for (auto& [r, p] : found) {
    const std::string full = p.string();
    fs::path rel(r.input);
    bool escapes = rel.empty() || rel.is_absolute();
    for (const auto& part : rel) escapes |= part == ".." || part == ".";
    fs::path dst = rel;
    dst.replace_extension(".ckpt");
    r.output = dst.generic_string();
    if (r.status.ok() && escapes) {
      r.status = InvalidArgument("path '" + r.input +
                                 "' is not below the input directory")
                     .WithFile(full);
    }
    if (auto d = needed_dirs.find(r.output);
        r.status.ok() && d != needed_dirs.end()) {
      r.status = InvalidArgument("its output '" + r.output +
                                 "' is also a directory the outputs of '" +
                                 d->second + "' go in; rename one of them")
                     .WithFile(full);
    }
    auto [c, fresh] = claimed.emplace(r.output, r.input);
    if (r.status.ok() && !fresh) {
      r.status = InvalidArgument("its output '" + r.output +
                                 "' is already the output of '" + c->second +
                                 "'; rename one of them")
                     .WithFile(full);
    }
    if (r.status.ok() && !out_dir.empty()) {
      // Never resolve out of out_dir: every existing component of the
      // output path below it must be a real directory, the output itself
      // no symlink (the writer would write through it).
      fs::path cur = out_dir;
      std::error_code e2;
      for (const auto& part : dst.parent_path()) {
        cur /= part;
        const fs::file_status st = fs::symlink_status(cur, e2);
        if (!fs::exists(st)) break;
        if (fs::is_symlink(st)) {
          r.status = InvalidArgument(
                         "its output path goes through the symlink '" +
                         cur.lexically_relative(out_dir).generic_string() +
                         "' in the output directory, which is not followed")
                         .WithFile(full);
          break;
        }
        if (!fs::is_directory(st)) {
          r.status =
              InvalidArgument("'" +
                              cur.lexically_relative(out_dir).generic_string() +
                              "' in the output directory is not a directory")
                  .WithFile(full);
          break;
        }
      }
      const fs::file_status st = fs::symlink_status(out_dir / dst, e2);
      if (r.status.ok() && fs::is_symlink(st)) {
        r.status = InvalidArgument(
                       "its output '" + r.output +
                       "' is a symlink in the output directory; not written "
                       "through")
                       .WithFile(full);
      } else if (r.status.ok() && fs::exists(st) && !fs::is_regular_file(st)) {
        r.status = InvalidArgument("its output '" + r.output +
                                   "' exists and is not a file")
                       .WithFile(full);
      }
    }
    out.push_back(std::move(r));
  }
  return out;
}

Result<std::vector<DirFileResult>> RunDir(const std::string& in_dir,
                                          const std::string& out_dir,
                                          bool write, const ImportOptions& opt,
                                          const DirProgress& progress) {
  std::error_code ec;
  if (!fs::is_directory(in_dir, ec)) {
    return InvalidArgument("not a directory").WithFile(in_dir);
  }
  std::vector<DirFileResult> files = PlanDir(in_dir, out_dir, ec);
  if (ec)
    return IoError("cannot list the directory: " + ec.message())
        .WithFile(in_dir);
  const fs::path in(in_dir), out(out_dir);
  for (size_t i = 0; i < files.size(); ++i) {
    DirFileResult& f = files[i];
    if (progress) progress(i, files.size(), f, false);
    if (f.status.ok()) {
      const std::string src = (in / f.input).string();
      Result<ImportReport> r = ImportReport{};
      if (write) {
        const fs::path dst = out / f.output;
        fs::create_directories(dst.parent_path(), ec);
        r = ec ? Result<ImportReport>(
                     IoError("cannot create directory: " + ec.message())
                         .WithFile(dst.parent_path().string()))
               : ImportPth(src, dst.string(), opt);
      } else {
        r = CheckPth(src, opt);
      }
      if (r.ok()) {
        f.report = *r;
      } else {
        f.status = r.status();
      }
    }
    if (progress) progress(i, files.size(), f, true);
  }
  return files;
}

}  // namespace

Result<std::vector<DirFileResult>> ImportPthDir(const std::string& in_dir,
                                                const std::string& out_dir,
                                                const ImportOptions& options,
                                                const DirProgress& progress) {
  if (out_dir.empty()) return InvalidArgument("no output directory");
  return RunDir(in_dir, out_dir, true, options, progress);
}

Result<std::vector<DirFileResult>> CheckPthDir(const std::string& in_dir,
                                               const std::string& out_dir,
                                               const ImportOptions& options,
                                               const DirProgress& progress) {
  return RunDir(in_dir, out_dir, false, options, progress);
}

}  // namespace ckpt
