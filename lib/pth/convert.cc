// .pth -> ckpt: container detection, persistent-id resolution, and the walk
// of the unpickled object graph that streams storages into a Writer.
#include <algorithm>
#include <cstring>
#include <future>
#include <map>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "ckpt/pth.h"
#include "ckpt/reader.h"
#include "header_internal.h"
#include "pickle_internal.h"
#include "source_internal.h"
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

// Where a storage's bytes are in the input.
struct Payload {
  const ZipEntry* entry = nullptr;  // zip
  uint64_t offset = 0;              // legacy: absolute offset
};

struct Loaded {
  // Declared first, destroyed last: breaks reference cycles in the graph.
  std::unique_ptr<internal::PickleHeap> heap = std::make_unique<internal::PickleHeap>();
  std::shared_ptr<ByteSource> src;     // mapped: headers and pickles
  std::shared_ptr<ByteSource> stream;  // pread: storage bytes, copied once
  std::optional<ZipArchive> zip;
  std::string prefix;
  bool big_endian = false;
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
  if (pid->kind != K::kTuple || pid->items.empty() || pid->items[0]->kind != K::kStr) {
    return InvalidArgument("persistent id is not a ('storage', ...) tuple");
  }
  const auto& a = pid->items;
  if (a[0]->s == "module") {
    return InvalidArgument("a whole nn.Module is pickled here (legacy source-code "
                           "record); save model.state_dict() instead");
  }
  if (a[0]->s != "storage") {
    return InvalidArgument("persistent id of unknown type '" + a[0]->s + "'");
  }
  if (a.size() != (legacy ? 6u : 5u)) {
    return InvalidArgument("storage persistent id has " + std::to_string(a.size()) +
                           " fields");
  }
  if (a[1]->kind != K::kGlobal || a[2]->kind != K::kStr || a[3]->kind != K::kStr ||
      a[4]->kind != K::kInt || a[4]->i < 0) {
    return InvalidArgument("malformed storage persistent id");
  }
  if (legacy && a[5]->kind != K::kNone) {
    return InvalidArgument("legacy storage views (view_metadata) are not supported");
  }
  auto st = std::make_shared<PyStorage>();
  st->key = a[2]->s;
  st->location = a[3]->s;
  st->numel = static_cast<uint64_t>(a[4]->i);
  if (a[1]->s == "torch.storage") {
    st->untyped = true;
    st->dtype = DType::kUInt8;
  } else if (auto d = internal::StorageClassDType(a[1]->s2)) {
    st->dtype = *d;
  } else {
    return InvalidArgument("unknown storage type '" + a[1]->s2 + "'");
  }
  if (!IsValidDevice(st->location)) {
    return InvalidArgument("invalid storage location '" + st->location + "'");
  }
  if (st->key.empty() || st->key.find('/') != std::string::npos || st->key == "." ||
      st->key == "..") {
    return InvalidArgument("invalid storage key '" + st->key + "'");
  }
  auto it = l.by_key.find(st->key);
  if (it != l.by_key.end()) {
    const PyStorage& old = *it->second;
    if (old.dtype != st->dtype || old.numel != st->numel || old.untyped != st->untyped) {
      return InvalidArgument("storage '" + st->key + "' is named with two different "
                             "types or sizes");
    }
  } else {
    uint64_t bytes = 0;
    if (__builtin_mul_overflow(st->numel, ElementSize(*st), &bytes) || bytes > INT64_MAX) {
      return InvalidArgument("storage '" + st->key + "' size overflows");
    }
    if (!legacy) {
      const ZipEntry* e = l.zip->Find(l.prefix + "data/" + st->key);
      if (!e) {
        return InvalidArgument("storage '" + st->key + "' has no record '" + l.prefix +
                               "data/" + st->key + "'");
      }
      if (e->size != bytes) {
        return InvalidArgument("record '" + e->name + "' has " + std::to_string(e->size) +
                               " bytes; its storage needs " + std::to_string(bytes) +
                               (e->size < bytes ? " (truncated)" : ""));
      }
      l.payload[st.get()] = Payload{e, 0};
    }
    it = l.by_key.emplace(st->key, st).first;
  }
  auto o = std::make_shared<PyObj>();
  o->kind = K::kStorage;
  o->storage = it->second;
  return o;
}

Status LoadZip(Loaded& l, const ImportOptions& opt) {
  CKPT_ASSIGN_OR_RETURN(ZipArchive z, ZipArchive::Open(l.src));
  l.zip = std::move(z);
  const auto& entries = l.zip->entries();
  if (entries.empty()) return Refuse(l, "empty zip archive: not a torch.save checkpoint");
  const std::string& first = entries[0].name;
  auto slash = first.find('/');
  l.prefix = slash == std::string::npos ? "" : first.substr(0, slash + 1);
  bool has_pkl = l.zip->Find(l.prefix + "data.pkl") != nullptr;
  for (const auto& e : entries) {
    if (e.name == l.prefix + "constants.pkl" || e.name.rfind(l.prefix + "code/", 0) == 0) {
      return Refuse(l, "TorchScript archive (torch.jit.save): save model.state_dict() "
                       "with torch.save instead");
    }
    if (!has_pkl && (e.name.find(".data/extern_modules") != std::string::npos ||
                     e.name.find(".data/version") != std::string::npos)) {
      return Refuse(l, "torch.package archive, not supported");
    }
  }
  if (!has_pkl) {
    return Refuse(l, "zip archive without '" + l.prefix + "data.pkl': not a torch.save checkpoint");
  }
  if (const ZipEntry* bo = l.zip->Find(l.prefix + "byteorder")) {
    CKPT_ASSIGN_OR_RETURN(Bytes b, l.zip->Read(*bo, opt.check_crc));
    std::string v(reinterpret_cast<const char*>(b.data.data()), b.data.size());
    while (!v.empty() && (v.back() == '\n' || v.back() == '\r')) v.pop_back();
    if (v == "big") {
      l.big_endian = true;
    } else if (v != "little") {
      return Refuse(l, "unknown byteorder record '" + v + "'");
    }
  }
  const ZipEntry* pkl = l.zip->Find(l.prefix + "data.pkl");
  CKPT_ASSIGN_OR_RETURN(Bytes data, l.zip->Read(*pkl, opt.check_crc));
  int64_t base = -1;
  if (pkl->method == 0) {
    CKPT_ASSIGN_OR_RETURN(uint64_t off, l.zip->PayloadOffset(*pkl));
    base = static_cast<int64_t>(off);
  }
  size_t used = 0;
  auto r = internal::Unpickle(
      data.data, l.prefix + "data.pkl", base,
      [&](const Obj& pid) { return LoadStorage(l, pid, false); }, &used, l.heap.get());
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
        with_pids ? internal::PersistentLoad(
                        [&](const Obj& pid) { return LoadStorage(l, pid, true); })
                  : internal::PersistentLoad(),
        &used, l.heap.get());
    if (!r.ok()) return r.status().WithFile(src.name());
    rest = rest.subspan(used);
    at += used;
    return r;
  };
  auto magic = next("magic number", false);
  // The magic is the int 0x1950a86a20f9469cfc6c (10 bytes LE).
  static const uint8_t kMagicLE[] = {0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
  if (!magic.ok() || (*magic)->kind != K::kBigInt ||
      (*magic)->bytes != std::vector<uint8_t>(std::begin(kMagicLE), std::end(kMagicLE))) {
    return Refuse(l, "not a torch.save file (neither a zip archive nor a legacy "
                     "pickle with torch's magic number)", 0);
  }
  CKPT_ASSIGN_OR_RETURN(Obj proto, next("protocol version", false));
  if (proto->kind != K::kInt || proto->i != 1001) {
    return Refuse(l, "legacy protocol version is not 1001", 0);
  }
  CKPT_ASSIGN_OR_RETURN(Obj sys_info, next("sys_info", false));
  CKPT_ASSIGN_OR_RETURN(l.root, next("object", true));
  CKPT_ASSIGN_OR_RETURN(Obj keys, next("storage keys", false));
  if (keys->kind != K::kList) return Refuse(l, "legacy storage key list is not a list");
  for (const auto& k : keys->items) {
    if (k->kind != K::kStr) return Refuse(l, "legacy storage key is not a str");
    auto it = l.by_key.find(k->s);
    if (it == l.by_key.end()) {
      return Refuse(l, "legacy storage '" + k->s + "' is not used by the object");
    }
    const PyStorage& st = *it->second;
    if (rest.size() < 8) {
      return Corrupt("legacy storage '" + k->s + "': truncated before its size")
          .WithFile(src.name()).WithOffset(static_cast<int64_t>(at));
    }
    uint64_t count = 0;
    std::memcpy(&count, rest.data(), 8);
    if (count != st.numel) {
      return Corrupt("legacy storage '" + k->s + "' holds " + std::to_string(count) +
                     " elements, its persistent id says " + std::to_string(st.numel))
          .WithFile(src.name()).WithOffset(static_cast<int64_t>(at));
    }
    uint64_t bytes = count * ElementSize(st);
    if (rest.size() - 8 < bytes) {
      return Corrupt("legacy storage '" + k->s + "' is truncated")
          .WithFile(src.name()).WithOffset(static_cast<int64_t>(at));
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

Result<Loaded> Load(const std::string& in, const ImportOptions& opt) {
  Loaded l;
  CKPT_ASSIGN_OR_RETURN(l.src, internal::OpenSource(in, ReadOptions{}));
  // Storages are read with pread into one reused buffer: memory stays
  // bounded (no multi-GiB mapping resident) and no page is faulted twice.
  ReadOptions pread;
  pread.backend = Backend::kPread;
  CKPT_ASSIGN_OR_RETURN(l.stream, internal::OpenSource(in, pread));
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
    return Refuse(l, "tar checkpoint from torch < 0.4: re-save it with a newer torch", 0);
  } else if (starts("PYTORCH1")) {
    return Refuse(l, "PYTORCH1 preview-release archive is not supported", 0);
  } else if (starts(std::string_view("\x89" "CKPT", 5))) {
    return Refuse(l, "this is already a ckpt file", 0);
  } else if (head_len > 0 && static_cast<uint8_t>(head.data[0]) == 0x80) {
    CKPT_RETURN_IF_ERROR(LoadLegacy(l));
  } else {
    return Refuse(l, "not a torch.save file (no zip or pickle header)", 0);
  }
  return l;
}

// ---- conversion -------------------------------------------------------------

class Emitter {
 public:
  Emitter(Loaded& l, Writer* w, const ImportOptions& opt) : l_(l), w_(w), opt_(opt) {}

  Result<NodeId> Emit(const Obj& o, const std::string& path, int depth);
  ImportReport report;

 private:
  Status Fail(const std::string& path, Status s) {
    return s.WithFile(l_.src->name()).WithTensor(path);
  }
  Result<StorageId> WriteStorage(const std::shared_ptr<PyStorage>& st,
                                 const std::string& path);
  Status Stream(std::span<const std::byte> bytes, DType dtype);

  Loaded& l_;
  Writer* w_;  // nullptr for a dry run
  const ImportOptions& opt_;
  std::unordered_map<const PyStorage*, StorageId> written_;
  std::unordered_set<const PyObj*> on_path_;
  std::vector<std::byte> swap_;
  std::vector<std::byte> buf_;  // one storage piece at a time
};

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

Result<StorageId> Emitter::WriteStorage(const std::shared_ptr<PyStorage>& st,
                                        const std::string& path) {
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
    return id;
  }
  const Payload& p = l_.payload.at(st.get());
  if (w_) {
    CKPT_ASSIGN_OR_RETURN(id, w_->BeginStorage(bytes, st->location));
  }
  // The element width that matters for byte swapping: v3 storages are
  // untyped, so use the dtype of the tensor that views them.
  DType swap_dtype = st->dtype;
  (void)path;
  if (p.entry && p.entry->method != 0) {
    // Inflated piece by piece: memory stays bounded for any size.
    CKPT_RETURN_IF_ERROR(l_.zip->Inflate(
        *p.entry, opt_.check_crc, static_cast<size_t>(kPieceBytes),
        [&](std::span<const std::byte> piece) {
          return w_ ? Stream(piece, swap_dtype) : Status::OK();
        }));
  } else {
    uint64_t start = p.offset;
    if (p.entry) {
      CKPT_ASSIGN_OR_RETURN(start, l_.zip->PayloadOffset(*p.entry));
    }
    uint32_t crc = 0;
    const bool direct = !l_.big_endian && l_.src->zero_copy() && l_.stream->fd() >= 0;
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
      if (p.entry && opt_.check_crc) {
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
    }
    if (p.entry && opt_.check_crc && crc != p.entry->crc32) {
      return ChecksumMismatch("zip: record '" + p.entry->name + "': CRC-32 mismatch")
          .WithFile(l_.src->name())
          .WithOffset(static_cast<int64_t>(start));
    }
  }
  if (w_) CKPT_RETURN_IF_ERROR(w_->EndStorage());
  written_[st.get()] = id;
  return id;
}

Result<NodeId> Emitter::Emit(const Obj& o, const std::string& path, int depth) {
  if (depth > static_cast<int>(kMaxTreeDepth) - 1) {
    return Fail(path, InvalidArgument("object nested deeper than " +
                                      std::to_string(kMaxTreeDepth) + " levels"));
  }
  auto child = [&](const std::string& seg) {
    return (depth == 0 ? std::string() : path + "/") + EscapePathSegment(seg);
  };
  auto need_writer = [&]() -> NodeId { return 0; };
  switch (o->kind) {
    case K::kNone: return w_ ? w_->AddNone() : need_writer();
    case K::kBool: return w_ ? w_->AddBool(o->i != 0) : need_writer();
    case K::kInt: return w_ ? w_->AddInt(o->i) : need_writer();
    case K::kBigInt: return w_ ? w_->AddBigInt(o->bytes) : Result<NodeId>(need_writer());
    case K::kFloat: return w_ ? w_->AddFloat(o->f) : need_writer();
    case K::kComplex: return w_ ? w_->AddComplex(o->f, o->im) : need_writer();
    case K::kStr: return w_ ? w_->AddString(o->s) : need_writer();
    case K::kBytes: return w_ ? w_->AddBytes(o->bytes) : need_writer();
    case K::kDType:
      return w_ ? w_->AddDType(static_cast<DType>(o->i)) : Result<NodeId>(need_writer());
    case K::kDevice: return w_ ? w_->AddDevice(o->s) : Result<NodeId>(need_writer());
    case K::kStorage:
    case K::kTensor: {
      std::shared_ptr<internal::PyTensor> t = o->tensor;
      if (o->kind == K::kStorage) {  // a bare storage: a 1-D tensor over it
        t = std::make_shared<internal::PyTensor>();
        t->storage = o->storage;
        t->dtype = o->storage->dtype;
        t->shape = {static_cast<int64_t>(o->storage->numel)};
        t->strides = {1};
      }
      report.tensors++;
      auto sid = WriteStorage(t->storage, path);
      if (!sid.ok()) return Fail(path, sid.status());
      if (!w_) {
        // Dry run: the same view check the writer makes.
        if (auto problem = internal::ViewProblem(
                static_cast<uint8_t>(t->dtype), t->shape, t->strides, t->offset,
                t->storage->numel * ElementSize(*t->storage))) {
          return Fail(path, InvalidArgument("bad tensor view: " + *problem));
        }
        return NodeId{0};
      }
      TensorSpec spec{t->dtype, t->shape, t->strides, *sid, t->offset,
                      t->requires_grad, t->is_parameter};
      auto n = w_->AddTensor(spec);
      if (!n.ok()) return Fail(path, n.status());
      if (t->numpy) {
        // torch.load gives back a numpy array; so does ckpt.load.
        Status s = w_->SetTypeName(*n, "numpy.ndarray");
        if (!s.ok()) return Fail(path, s);
      }
      return *n;
    }
    case K::kList:
    case K::kTuple:
    case K::kSet:
    case K::kFrozenSet:
    case K::kDict: {
      if (!on_path_.insert(o.get()).second) {
        return Fail(path, InvalidArgument("the object contains itself (a cycle)"));
      }
      std::vector<NodeId> keys, items;
      for (size_t i = 0; i < o->items.size(); ++i) {
        std::string seg;
        if (o->kind == K::kDict) {
          CKPT_ASSIGN_OR_RETURN(NodeId k, Emit(o->keys[i], path, depth + 1));
          keys.push_back(k);
          const Obj& key = o->keys[i];
          seg = key->kind == K::kStr ? key->s
                : key->kind == K::kInt ? std::to_string(key->i)
                                        : "<key " + std::to_string(i) + ">";
        } else {
          seg = std::to_string(i);
        }
        CKPT_ASSIGN_OR_RETURN(NodeId v, Emit(o->items[i], child(seg), depth + 1));
        items.push_back(v);
      }
      on_path_.erase(o.get());
      if (!w_) return NodeId{0};
      Result<NodeId> r = NodeId{0};
      switch (o->kind) {
        case K::kList: r = w_->AddList(items); break;
        case K::kTuple: r = w_->AddTuple(items); break;
        case K::kSet: r = w_->AddSet(items); break;
        case K::kFrozenSet: r = w_->AddFrozenSet(items); break;
        default: r = w_->AddDict(keys, items, o->type_name); break;
      }
      if (!r.ok()) return Fail(path, r.status());
      return r;
    }
    case K::kGlobal:
      return Fail(path, InvalidArgument("a class or function object ('" + o->s + "." +
                                        o->s2 + "') cannot be stored"));
    case K::kNpDType:
      return Fail(path, InvalidArgument("a bare numpy dtype object cannot be stored"));
    case K::kNpArray:
      return Fail(path, InvalidArgument("an incomplete numpy array"));
  }
  return Fail(path, InvalidArgument("unsupported object"));
}

Result<ImportReport> Run(const std::string& in, const std::string* out,
                         const ImportOptions& opt) {
  CKPT_ASSIGN_OR_RETURN(Loaded l, Load(in, opt));
  std::optional<Writer> w;
  if (out) {
    WriteOptions wo = opt.write;
    if (wo.producer == "ckpt") wo.producer = "pth2ckpt (ckpt " + std::string(VersionString()) + ")";
    CKPT_ASSIGN_OR_RETURN(Writer writer, Writer::Create(*out, wo));
    w.emplace(std::move(writer));
  }
  Emitter e(l, w ? &*w : nullptr, opt);
  CKPT_ASSIGN_OR_RETURN(NodeId root, e.Emit(l.root, "", 0));
  e.report.container = l.container;
  if (w) {
    CKPT_RETURN_IF_ERROR(w->SetRoot(root));
    CKPT_RETURN_IF_ERROR(w->SetMetadata("source_format", "torch.save " + l.container));
    Status s = w->Commit();
    if (!s.ok()) return s.WithFile(*out);
  }
  return e.report;
}

}  // namespace

Result<ImportReport> ImportPth(const std::string& in, const std::string& out,
                               const ImportOptions& options) {
  return Run(in, &out, options);
}

Result<ImportReport> CheckPth(const std::string& in, const ImportOptions& options) {
  return Run(in, nullptr, options);
}

}  // namespace ckpt
