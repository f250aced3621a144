// A DCP directory (torch.distributed.checkpoint's FileSystemWriter
// output): `.metadata` through the restricted pickle reader's DCP
// profile, and every tensor chunk located as raw bytes inside the
// torch.save archive that DCP wrote for it in a `.distcp` file.
#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string_view>
#include <tuple>

#include "bytes_internal.h"
#include "dcp_internal.h"
#include "json_internal.h"
#include "pickle_internal.h"
#include "safetensors_internal.h"
#include "source_internal.h"
#include "zip_internal.h"

namespace ckpt::internal {
namespace {

using K = PyObj::K;

constexpr std::string_view kMetadataModule =
    "torch.distributed.checkpoint.metadata.";
constexpr std::string_view kStorageInfoClass =
    "torch.distributed.checkpoint.filesystem._StorageInfo";
// A tensor item's pickle is a few hundred bytes; anything near this is not
// what DCP writes for one tensor.
constexpr uint64_t kMaxItemPickleBytes = 1u << 20;
constexpr uint64_t kMaxMetadataBytes = 1ull << 31;

// A window [base, base + size) of another source: a DCP item, read as the
// whole torch.save archive it is. Offsets in errors from inside are
// relative to the window (Rebase makes them absolute).
class WindowSource : public ByteSource {
 public:
  WindowSource(std::shared_ptr<ByteSource> parent, uint64_t base, uint64_t size)
      : ByteSource(parent->name(), size),
        parent_(std::move(parent)),
        base_(base) {}
  bool zero_copy() const override { return parent_->zero_copy(); }

 private:
  Result<Bytes> DoRead(uint64_t offset, uint64_t len) const override {
    return parent_->Read(base_ + offset, len);
  }
  Status DoReadInto(uint64_t offset, std::span<std::byte> out) const override {
    return parent_->ReadInto(base_ + offset, out);
  }
  std::shared_ptr<ByteSource> parent_;
  uint64_t base_;
};

std::string Quote(const std::string& s) { return "'" + s + "'"; }

std::string IntsText(const std::vector<int64_t>& v) {
  std::string out = "(";
  for (size_t i = 0; i < v.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(v[i]);
  }
  return out + (v.size() == 1 ? ",)" : ")");
}

// The last value of field `name` of a tagged dict (a dataclass's fields;
// BUILD sets them in order, so the last wins as in Python), or nullptr.
const PyObj* Field(const PyObj& o, std::string_view name) {
  if (o.kind != K::kDict) return nullptr;
  const auto& keys = o.x().r().keys;
  const auto& items = o.x().items;
  const PyObj* found = nullptr;
  for (size_t i = 0; i < keys.size() && i < items.size(); ++i) {
    if (keys[i]->kind == K::kStr && keys[i]->x().s == name) {
      found = items[i].get();
    }
  }
  return found;
}

bool IsMetadataClass(const PyObj* o, std::string_view cls) {
  if (!o || o->kind != K::kDict) return false;
  const std::string& tag = o->x().r().s2;
  return tag.size() == kMetadataModule.size() + cls.size() &&
         tag.starts_with(kMetadataModule) && tag.ends_with(cls);
}

std::string Describe(const PyObj* o) {
  if (!o) return "nothing";
  if (o->kind == K::kDict && !o->x().r().s2.empty()) return o->x().r().s2;
  return std::string(PyKindName(o->kind));
}

std::optional<std::vector<int64_t>> Ints(const PyObj* o) {
  if (!o || (o->kind != K::kTuple && o->kind != K::kList)) return std::nullopt;
  std::vector<int64_t> v;
  for (const auto& x : o->x().items) {
    if (x->kind != K::kInt) return std::nullopt;
    v.push_back(x->i);
  }
  return v;
}

std::optional<int64_t> Int(const PyObj* o) {
  if (!o || o->kind != K::kInt) return std::nullopt;
  return o->i;
}

// An error inside an item (its window): absolute offset, the file's path
// and the fqn in the message.
Status Rebase(const Status& s, const std::string& path, uint64_t base,
              const std::string& what) {
  Status out(s.code(), what + ": " + s.message());
  out = out.WithFile(path);
  return out.WithOffset(static_cast<int64_t>(base) +
                        std::max<int64_t>(s.offset(), 0));
}

// ---- safetensors headers (SAFETENSORS-format .distcp files) ---------------

// One safetensors blob of a .distcp file: its header and where its data
// starts (absolute).
struct SafetensorsBlob {
  JsonValue header;
  uint64_t data_start = 0;
  uint64_t data_size = 0;
};

struct StorageLoc {
  std::string file;
  uint64_t offset = 0, length = 0;
};

// (fqn, has offset, offset) -> where the item is.
using StorageKey = std::tuple<std::string, bool, std::vector<int64_t>>;

class DcpReader {
 public:
  explicit DcpReader(std::string dir) : dir_(std::move(dir)) {}
  Result<DcpIndex> Read();

 private:
  Status Bad(std::string msg) const {
    return Corrupt(std::move(msg)).WithFile(meta_path_);
  }
  Status ReadStorageData(const PyObj& storage);
  void ReadPlannerData(const PyObj* planner);
  std::string PathOf(const std::string& fqn) const;
  Result<std::shared_ptr<ByteSource>> File(const std::string& name);
  Result<StorageLoc> Locate(const std::string& fqn, const std::string& what,
                            const StorageKey& key);
  Status ReadTensor(const std::string& fqn, const PyObj& md, DcpIndex* out);
  Status LocateChunk(const std::string& fqn, DType dtype, DcpChunk* chunk);
  Status LocateSafetensors(const std::string& fqn, const std::string& what,
                           DType dtype, const StorageLoc& loc, DcpChunk* chunk);
  Status CheckCoverage(const DcpTensor& t) const;

  std::string dir_;
  std::string meta_path_;
  std::map<StorageKey, StorageLoc> storage_;
  std::map<std::string, std::string> planner_paths_;
  std::map<std::string, std::shared_ptr<ByteSource>> files_;
  std::map<std::pair<std::string, uint64_t>, SafetensorsBlob> blobs_;
};

Result<std::shared_ptr<ByteSource>> DcpReader::File(const std::string& name) {
  auto it = files_.find(name);
  if (it != files_.end()) return it->second;
  CKPT_ASSIGN_OR_RETURN(auto src, OpenSource(dir_ + "/" + name, {}));
  files_.emplace(name, src);
  return src;
}

Status DcpReader::ReadStorageData(const PyObj& storage) {
  const auto& keys = storage.x().r().keys;
  const auto& items = storage.x().items;
  for (size_t i = 0; i < keys.size() && i < items.size(); ++i) {
    const PyObj* k = keys[i].get();
    const PyObj* v = items[i].get();
    if (!IsMetadataClass(k, "MetadataIndex")) {
      return Bad("storage_data key is a " + Describe(k) +
                 ", not a MetadataIndex");
    }
    const PyObj* fqn = Field(*k, "fqn");
    if (!fqn || fqn->kind != K::kStr) {
      return Bad("storage_data key without a str fqn");
    }
    const PyObj* off = Field(*k, "offset");
    StorageKey key{fqn->x().s, false, {}};
    if (off && off->kind != K::kNone) {
      auto o = Ints(off);
      if (!o)
        return Bad("storage_data key of " + Quote(fqn->x().s) +
                   ": offset is not a tuple of ints");
      key = StorageKey{fqn->x().s, true, *o};
    }
    if (!v || v->kind != K::kDict || v->x().r().s2 != kStorageInfoClass) {
      return Bad("storage_data of " + Quote(fqn->x().s) + " is a " +
                 Describe(v) + ", not a _StorageInfo");
    }
    const PyObj* rel = Field(*v, "relative_path");
    auto o = Int(Field(*v, "offset"));
    auto n = Int(Field(*v, "length"));
    if (!rel || rel->kind != K::kStr || !o || !n || *o < 0 || *n < 0) {
      return Bad("_StorageInfo of " + Quote(fqn->x().s) +
                 " lacks a str relative_path or a non-negative int offset "
                 "and length");
    }
    const std::string& file = rel->x().s;
    // DCP writes flat names (__R_N.distcp); nothing may leave the dir.
    if (file.empty() || file == "." || file == ".." ||
        file.find_first_of(std::string("/\\\0", 3)) != std::string::npos) {
      return Bad("_StorageInfo of " + Quote(fqn->x().s) + " names file " +
                 Quote(file) +
                 ": not a plain file name in the checkpoint directory");
    }
    if (const PyObj* td = Field(*v, "transform_descriptors");
        td && td->kind != K::kNone &&
        !((td->kind == K::kList || td->kind == K::kTuple) &&
          td->x().items.empty())) {
      std::string names;
      for (const auto& x : td->x().items) {
        names += (names.empty() ? "" : ", ") +
                 (x->kind == K::kStr ? x->x().s : Describe(x.get()));
      }
      return InvalidArgument("item of " + Quote(fqn->x().s) +
                             " is stored through stream transforms [" + names +
                             "] (compressed or otherwise transformed, a DCP "
                             "_extensions writer): not readable as raw bytes")
          .WithFile(dir_ + "/" + file)
          .WithOffset(*o);
    }
    if (!storage_
             .emplace(key, StorageLoc{file, static_cast<uint64_t>(*o),
                                      static_cast<uint64_t>(*n)})
             .second) {
      return Bad("storage_data names " + Quote(fqn->x().s) +
                 (std::get<1>(key) ? " offset " + IntsText(std::get<2>(key))
                                   : std::string()) +
                 " twice");
    }
  }
  return Status::OK();
}

// DefaultSavePlanner's planner_data: fqn -> the key tuple of the value in
// the nested state dict ("model.w" -> ("model", "w")). Any other form is
// the planner's own business: fqns are then used as single keys.
void DcpReader::ReadPlannerData(const PyObj* planner) {
  if (!planner || planner->kind != K::kDict) return;
  const auto& keys = planner->x().r().keys;
  const auto& items = planner->x().items;
  for (size_t i = 0; i < keys.size() && i < items.size(); ++i) {
    if (keys[i]->kind != K::kStr) continue;
    const PyObj* v = items[i].get();
    if (v->kind != K::kTuple || v->x().items.empty()) continue;
    PathBuilder b;
    bool ok = true;
    for (const auto& seg : v->x().items) {
      if (seg->kind == K::kStr) {
        b.Push(seg->x().s);
      } else if (seg->kind == K::kInt) {
        b.Push(std::to_string(seg->i));
      } else {
        ok = false;
        break;
      }
    }
    if (ok) planner_paths_[keys[i]->x().s] = b.path();
  }
}

std::string DcpReader::PathOf(const std::string& fqn) const {
  auto it = planner_paths_.find(fqn);
  if (it != planner_paths_.end()) return it->second;
  PathBuilder b;
  b.Push(fqn);
  return b.path();
}

Result<StorageLoc> DcpReader::Locate(const std::string& fqn,
                                     const std::string& what,
                                     const StorageKey& key) {
  auto it = storage_.find(key);
  if (it == storage_.end()) {
    return Bad(what + " has no storage_data entry: its bytes are in no file");
  }
  const StorageLoc& loc = it->second;
  CKPT_ASSIGN_OR_RETURN(auto src, File(loc.file));
  if (!RangeWithin(loc.offset, loc.length, src->size())) {
    return Corrupt(what + ": item of " + std::to_string(loc.length) +
                   " bytes at offset " + std::to_string(loc.offset) +
                   " does not lie within the file (" +
                   std::to_string(src->size()) + " bytes)")
        .WithFile(dir_ + "/" + loc.file)
        .WithOffset(static_cast<int64_t>(loc.offset));
  }
  (void)fqn;
  return loc;
}

// A chunk's item is a whole torch.save archive of one tensor: find its
// storage record (STORED) and check that the pickled tensor is a
// contiguous view of it with the chunk's dtype and sizes.
Status DcpReader::LocateChunk(const std::string& fqn, DType dtype,
                              DcpChunk* chunk) {
  const std::string what =
      "fqn " + Quote(fqn) + " chunk at " + IntsText(chunk->box.offsets);
  CKPT_ASSIGN_OR_RETURN(StorageLoc loc,
                        Locate(fqn, what, {fqn, true, chunk->box.offsets}));
  CKPT_ASSIGN_OR_RETURN(auto src, File(loc.file));
  const std::string path = dir_ + "/" + loc.file;
  chunk->file = loc.file;
  auto fail = [&](Status s, uint64_t at) {
    return std::move(s).WithFile(path).WithOffset(
        static_cast<int64_t>(loc.offset + at));
  };
  // A torch.save archive (zip) of the item's length, or a safetensors
  // blob whose header (8-byte length, then '{') starts at the offset and
  // runs past the item (which is only the tensor's bytes).
  CKPT_ASSIGN_OR_RETURN(
      Bytes head,
      src->Read(loc.offset, std::min<uint64_t>(src->size() - loc.offset, 9)));
  const auto* h = reinterpret_cast<const unsigned char*>(head.data.data());
  if (head.data.size() == 9 && std::memcmp(h, "PK\x03\x04", 4) != 0 &&
      h[8] == '{') {
    return LocateSafetensors(fqn, what, dtype, loc, chunk);
  }
  if (loc.length < 4 || std::memcmp(h, "PK\x03\x04", 4) != 0) {
    return fail(Corrupt(what + ": the item is not a torch.save archive "
                               "(no zip local header)"),
                0);
  }
  auto window = std::make_shared<WindowSource>(src, loc.offset, loc.length);
  auto zr = ZipArchive::Open(window);
  if (!zr.ok()) return Rebase(zr.status(), path, loc.offset, what);
  const ZipArchive& zip = *zr;
  if (zip.entries().empty()) {
    return fail(Corrupt(what + ": empty zip archive"), 0);
  }
  const std::string& first = zip.entries()[0].name;
  const auto slash = first.find('/');
  const std::string prefix =
      slash == std::string::npos ? "" : first.substr(0, slash + 1);
  const bool check_crc = !zip.crc32_absent();
  if (const ZipEntry* bo = zip.Find(prefix + "byteorder")) {
    if (bo->size > 16) {
      return fail(Corrupt(what + ": byteorder record of " +
                          std::to_string(bo->size) + " bytes"),
                  bo->local_header_offset);
    }
    auto b = zip.Read(*bo, check_crc);
    if (!b.ok()) return Rebase(b.status(), path, loc.offset, what);
    std::string v(reinterpret_cast<const char*>(b->data.data()),
                  b->data.size());
    while (!v.empty() && (v.back() == '\n' || v.back() == '\r')) v.pop_back();
    if (v != "little") {
      return fail(InvalidArgument(what + ": byteorder " + Quote(v) +
                                  ": only little-endian items are read "
                                  "as raw bytes"),
                  bo->local_header_offset);
    }
  }
  const ZipEntry* pkl = zip.Find(prefix + "data.pkl");
  if (!pkl) {
    return fail(Corrupt(what + ": the item's archive has no " +
                        Quote(prefix + "data.pkl")),
                0);
  }
  if (pkl->size > kMaxItemPickleBytes) {
    return fail(
        InvalidArgument(what + ": the item's pickle is " +
                        std::to_string(pkl->size) + " bytes: not one tensor"),
        pkl->local_header_offset);
  }
  auto data = zip.Read(*pkl, check_crc);
  if (!data.ok()) return Rebase(data.status(), path, loc.offset, what);
  int64_t base = -1;
  if (pkl->method == 0) {
    auto off = zip.PayloadOffset(*pkl);
    if (!off.ok()) return Rebase(off.status(), path, loc.offset, what);
    base = static_cast<int64_t>(*off);
  }
  // ('storage', class, key, location, numel): its record must be STORED
  // (raw bytes in the file) and hold exactly numel elements.
  std::map<std::string, const ZipEntry*> records;
  auto load = [&](const Obj& pid) -> Result<Obj> {
    const auto& a = pid->x().items;
    if (pid->kind != K::kTuple || a.size() != 5 || a[0]->kind != K::kStr ||
        a[0]->x().s != "storage" || a[1]->kind != K::kGlobal ||
        a[2]->kind != K::kStr || a[4]->kind != K::kInt || a[4]->i < 0) {
      return InvalidArgument("malformed storage persistent id");
    }
    auto st = std::make_shared<PyStorage>();
    st->key = a[2]->x().s;
    st->numel = static_cast<uint64_t>(a[4]->i);
    if (a[1]->x().s == "torch.storage") {
      st->untyped = true;
    } else if (auto d = StorageClassDType(a[1]->x().r().s2)) {
      st->dtype = *d;
    } else {
      return InvalidArgument("unknown storage type " + Quote(a[1]->x().r().s2));
    }
    const ZipEntry* e = zip.Find(prefix + "data/" + st->key);
    if (!e) {
      return InvalidArgument("storage " + Quote(st->key) + " has no record");
    }
    records[st->key] = e;
    auto o = std::make_shared<PyObj>();
    o->kind = K::kStorage;
    o->w().rw().storage = std::move(st);
    return o;
  };
  PickleHeap heap;
  PickleLimits lim;
  lim.max_bytes = pkl->size;
  lim.max_memory = 64u << 20;
  size_t used = 0;
  auto root =
      Unpickle(data->data, prefix + "data.pkl", base, load, &used, &heap, lim);
  if (!root.ok()) return Rebase(root.status(), path, loc.offset, what);
  const PyObj& r = **root;
  if (r.kind != K::kTensor || !r.x().r().tensor || r.x().r().tensor->numpy) {
    return fail(InvalidArgument(what + ": the item holds a " + Describe(&r) +
                                ", not a tensor"),
                pkl->local_header_offset);
  }
  const PyTensor& t = *r.x().r().tensor;
  auto rit = t.storage ? records.find(t.storage->key) : records.end();
  if (rit == records.end()) {
    return fail(Corrupt(what + ": the item's tensor has no storage record"),
                pkl->local_header_offset);
  }
  const PyStorage& st = *t.storage;
  const ZipEntry& rec = *rit->second;
  const uint64_t at = rec.local_header_offset;
  if (t.dtype != dtype) {
    return fail(
        InvalidArgument(what + ": the item holds " +
                        std::string(DTypeName(t.dtype)) + ", .metadata says " +
                        std::string(DTypeName(dtype))),
        at);
  }
  if (t.shape != chunk->box.sizes) {
    return fail(InvalidArgument(what + ": the item's tensor has shape " +
                                IntsText(t.shape) + ", the chunk sizes " +
                                IntsText(chunk->box.sizes)),
                at);
  }
  const uint64_t elem = DTypeSize(dtype);
  const int64_t numel = chunk->box.numel();
  if (numel > 0) {
    int64_t want = 1;
    for (size_t d = t.shape.size(); d-- > 0;) {
      if (t.shape[d] != 1 && t.strides[d] != want) {
        return fail(
            InvalidArgument(what + ": the item's tensor has strides " +
                            IntsText(t.strides) + ": not contiguous row-major"),
            at);
      }
      want *= t.shape[d];
    }
  }
  if (rec.method != 0) {
    return fail(
        InvalidArgument(what + ": storage record " + Quote(rec.name) +
                        " is compressed (zip method " +
                        std::to_string(rec.method) + "), not raw bytes"),
        at);
  }
  const uint64_t st_elem = st.untyped ? 1 : DTypeSize(st.dtype);
  uint64_t st_bytes = 0;
  if (__builtin_mul_overflow(st.numel, st_elem, &st_bytes) ||
      rec.size != st_bytes) {
    return fail(
        Corrupt(what + ": storage record " + Quote(rec.name) + " has " +
                std::to_string(rec.size) + " bytes; its storage needs " +
                std::to_string(st.numel) + " elements of " +
                std::to_string(st_elem) + " bytes"),
        at);
  }
  const uint64_t bytes = static_cast<uint64_t>(numel) * elem;
  uint64_t first_byte = 0;
  if (t.offset < 0 ||
      __builtin_mul_overflow(static_cast<uint64_t>(t.offset), elem,
                             &first_byte) ||
      !RangeWithin(first_byte, bytes, rec.size)) {
    return fail(
        Corrupt(what + ": the tensor (offset " + std::to_string(t.offset) +
                ", " + std::to_string(bytes) +
                " bytes) does not lie within its storage of " +
                std::to_string(rec.size) + " bytes"),
        at);
  }
  auto payload = zip.PayloadOffset(rec);
  if (!payload.ok()) return Rebase(payload.status(), path, loc.offset, what);
  chunk->offset = loc.offset + *payload + first_byte;
  chunk->length = bytes;
  return Status::OK();
}

// FileSystemWriter(serialization_format=SAFETENSORS) writes each file's
// tensors as one safetensors blob after its byte items, keyed by fqn (one
// chunk per fqn per file), and gives every tensor item the blob's start
// as its offset: the blob's header locates the chunk.
Status DcpReader::LocateSafetensors(const std::string& fqn,
                                    const std::string& what, DType dtype,
                                    const StorageLoc& loc, DcpChunk* chunk) {
  CKPT_ASSIGN_OR_RETURN(auto src, File(loc.file));
  const std::string path = dir_ + "/" + loc.file;
  auto at = [&](Status s, uint64_t off) {
    return std::move(s).WithFile(path).WithOffset(static_cast<int64_t>(off));
  };
  auto key = std::make_pair(loc.file, loc.offset);
  auto it = blobs_.find(key);
  if (it == blobs_.end()) {
    auto text = ReadSafetensorsHeaderText(*src, loc.offset);
    if (!text.ok()) return text.status().WithContext(what).WithFile(path);
    const uint64_t n = text->size();
    auto header = ParseJson(*text);
    if (!header.ok()) {
      return at(
          Corrupt(what + ": safetensors header: " + header.status().message()),
          loc.offset + 8);
    }
    if (!header->is_object()) {
      return at(Corrupt(what + ": safetensors header is not an object"),
                loc.offset + 8);
    }
    SafetensorsBlob blob;
    blob.header = std::move(*header);
    blob.data_start = loc.offset + 8 + n;
    blob.data_size = src->size() - blob.data_start;
    it = blobs_.emplace(key, std::move(blob)).first;
  }
  const SafetensorsBlob& blob = it->second;
  const uint64_t hdr = loc.offset + 8;
  const JsonValue* e = blob.header.Find(fqn);
  if (!e || !e->is_object()) {
    return at(
        Corrupt(what + ": the safetensors header has no entry " + Quote(fqn)),
        hdr);
  }
  const JsonValue* dt = e->Find("dtype");
  const JsonValue* shape = e->Find("shape");
  const JsonValue* offs = e->Find("data_offsets");
  std::optional<uint64_t> b, end;
  if (offs && offs->is_array() && offs->items.size() == 2) {
    b = offs->items[0].AsUint64();
    end = offs->items[1].AsUint64();
  }
  if (!dt || !dt->is_string() || !shape || !shape->is_array() || !b || !end) {
    return at(Corrupt(what + ": safetensors entry " + Quote(fqn) +
                      " lacks dtype, shape or data_offsets"),
              hdr);
  }
  auto d = SafetensorsDTypeFromName(dt->text);
  if (!d || *d != dtype) {
    return at(
        InvalidArgument(what + ": the safetensors entry holds " + dt->text +
                        ", .metadata says " + std::string(DTypeName(dtype))),
        hdr);
  }
  std::vector<int64_t> dims;
  for (const auto& x : shape->items) {
    auto n = x.AsUint64();
    if (!n || *n > static_cast<uint64_t>(INT64_MAX)) {
      return at(Corrupt(what + ": safetensors shape is not integers"), hdr);
    }
    dims.push_back(static_cast<int64_t>(*n));
  }
  if (dims != chunk->box.sizes) {
    return at(InvalidArgument(what + ": the safetensors entry has shape " +
                              IntsText(dims) + ", the chunk sizes " +
                              IntsText(chunk->box.sizes)),
              hdr);
  }
  const uint64_t bytes =
      static_cast<uint64_t>(chunk->box.numel()) * DTypeSize(dtype);
  if (*end < *b || *end - *b != bytes ||
      !RangeWithin(*b, bytes, blob.data_size)) {
    return at(
        Corrupt(what + ": safetensors data_offsets [" + std::to_string(*b) +
                ", " + std::to_string(*end) + ") do not hold " +
                std::to_string(bytes) + " bytes inside the file"),
        hdr);
  }
  chunk->file = loc.file;
  chunk->offset = blob.data_start + *b;
  chunk->length = bytes;
  return Status::OK();
}

// The chunks must tile the tensor: no element in two, none in none.
Status DcpReader::CheckCoverage(const DcpTensor& t) const {
  std::vector<Box> boxes;
  int64_t covered = 0;
  for (const auto& c : t.chunks) {
    boxes.push_back(c.box);
    covered += c.box.numel();  // each within the tensor: no overflow
  }
  const int64_t total =
      Box{std::vector<int64_t>(t.shape.size(), 0), t.shape}.numel();
  auto index = BoxIndex::Build(boxes);
  if (!index.ok()) return index.status().WithFile(meta_path_);
  for (size_t i = 0; i < boxes.size(); ++i) {
    if (boxes[i].numel() == 0) continue;
    for (size_t j : index->Overlapping(boxes[i])) {
      if (j != i) {
        return Bad("fqn " + Quote(t.fqn) + ": chunks at " +
                   IntsText(boxes[i].offsets) + " and " +
                   IntsText(boxes[j].offsets) + " overlap");
      }
    }
  }
  if (covered != total) {
    return Bad("fqn " + Quote(t.fqn) + ": its chunks cover " +
               std::to_string(covered) + " of its " + std::to_string(total) +
               " elements");
  }
  return Status::OK();
}

Status DcpReader::ReadTensor(const std::string& fqn, const PyObj& md,
                             DcpIndex* out) {
  const std::string what = "fqn " + Quote(fqn);
  const PyObj* props = Field(md, "properties");
  if (!IsMetadataClass(props, "TensorProperties")) {
    return Bad(what + ": properties is a " + Describe(props));
  }
  const PyObj* dt = Field(*props, "dtype");
  if (!dt || dt->kind != K::kDType) return Bad(what + ": dtype is missing");
  const auto dtype = static_cast<DType>(dt->i);
  const uint64_t elem = DTypeSize(dtype);
  if (elem == 0) return Bad(what + ": unknown dtype");
  if (const PyObj* layout = Field(*props, "layout");
      layout &&
      !(layout->kind == K::kStr && layout->x().s == "torch.strided")) {
    return InvalidArgument(
               what + ": layout " +
               (layout->kind == K::kStr ? layout->x().s : Describe(layout)) +
               " is not torch.strided")
        .WithFile(meta_path_);
  }
  auto shape = Ints(Field(md, "size"));
  if (!shape) return Bad(what + ": size is not a tuple of ints");
  const Box whole{std::vector<int64_t>(shape->size(), 0), *shape};
  if (auto p = BoxProblem(whole, *shape, elem)) {
    return Bad(what + ": shape " + IntsText(*shape) + ": " + *p);
  }
  const PyObj* chunks = Field(md, "chunks");
  if (!chunks || chunks->kind != K::kList) {
    return Bad(what + ": chunks is not a list");
  }
  DcpTensor t;
  t.fqn = fqn;
  t.path = PathOf(fqn);
  t.dtype = dtype;
  t.shape = *shape;
  for (const auto& c : chunks->x().items) {
    if (!IsMetadataClass(c.get(), "ChunkStorageMetadata")) {
      return Bad(what + ": a chunk is a " + Describe(c.get()));
    }
    auto offsets = Ints(Field(*c, "offsets"));
    auto sizes = Ints(Field(*c, "sizes"));
    if (!offsets || !sizes) {
      return Bad(what + ": chunk offsets or sizes are not tuples of ints");
    }
    DcpChunk chunk;
    chunk.box = Box{*offsets, *sizes};
    if (auto p = BoxProblem(chunk.box, t.shape, elem)) {
      return Bad(what + ": chunk at " + IntsText(*offsets) + " sizes " +
                 IntsText(*sizes) + ": " + *p);
    }
    CKPT_RETURN_IF_ERROR(LocateChunk(fqn, dtype, &chunk));
    t.chunks.push_back(std::move(chunk));
  }
  CKPT_RETURN_IF_ERROR(CheckCoverage(t));
  out->tensors.push_back(std::move(t));
  return Status::OK();
}

Result<DcpIndex> DcpReader::Read() {
  meta_path_ = dir_ + "/.metadata";
  CKPT_ASSIGN_OR_RETURN(auto src, OpenSource(meta_path_, {}));
  if (src->size() > kMaxMetadataBytes) {
    return InvalidArgument(".metadata of " + std::to_string(src->size()) +
                           " bytes is larger than the " +
                           std::to_string(kMaxMetadataBytes) + "-byte limit")
        .WithFile(meta_path_);
  }
  CKPT_ASSIGN_OR_RETURN(Bytes all, src->Read(0, src->size()));
  PickleHeap heap;  // outlives `root`
  PickleLimits lim;
  lim.profile = PickleProfile::kDcpMetadata;
  lim.max_bytes = src->size();
  // Objects cost ~45 bytes per pickle byte (docs/PTH.md); as the importer.
  lim.max_memory = std::max<uint64_t>(192ull << 20, 80 * src->size());
  size_t used = 0;
  auto r =
      Unpickle(all.data, ".metadata", 0, PersistentLoad(), &used, &heap, lim);
  if (!r.ok()) return r.status().WithFile(meta_path_);
  Obj root = *r;
  if (used != all.data.size()) {
    return Bad(std::to_string(all.data.size() - used) +
               " bytes after the pickle's STOP")
        .WithOffset(static_cast<int64_t>(used));
  }
  if (!IsMetadataClass(root.get(), "Metadata")) {
    return Bad(".metadata holds a " + Describe(root.get()) +
               ", not a torch.distributed.checkpoint Metadata");
  }
  DcpIndex out;
  if (const PyObj* v = Field(*root, "version"); v && v->kind == K::kStr) {
    out.version = v->x().s;
  }
  const PyObj* sdm = Field(*root, "state_dict_metadata");
  if (!sdm || sdm->kind != K::kDict || !sdm->x().r().s2.empty()) {
    return Bad("state_dict_metadata is a " + Describe(sdm) + ", not a dict");
  }
  const PyObj* storage = Field(*root, "storage_data");
  if (!storage || storage->kind != K::kDict) {
    return Bad("storage_data is a " + Describe(storage) +
               ", not a dict (not written by FileSystemWriter)");
  }
  CKPT_RETURN_IF_ERROR(ReadStorageData(*storage));
  ReadPlannerData(Field(*root, "planner_data"));

  const auto& keys = sdm->x().r().keys;
  const auto& items = sdm->x().items;
  std::set<std::string> fqns;
  for (size_t i = 0; i < keys.size() && i < items.size(); ++i) {
    if (keys[i]->kind != K::kStr) {
      return Bad("state_dict_metadata key is a " + Describe(keys[i].get()) +
                 ", not a str");
    }
    const std::string& fqn = keys[i]->x().s;
    if (!fqns.insert(fqn).second) {
      return Bad("state_dict_metadata names " + Quote(fqn) + " twice");
    }
    const PyObj* md = items[i].get();
    if (IsMetadataClass(md, "TensorStorageMetadata")) {
      CKPT_RETURN_IF_ERROR(ReadTensor(fqn, *md, &out));
    } else if (IsMetadataClass(md, "BytesStorageMetadata")) {
      const std::string what = "fqn " + Quote(fqn);
      CKPT_ASSIGN_OR_RETURN(StorageLoc loc,
                            Locate(fqn, what, {fqn, false, {}}));
      out.objects.push_back(
          DcpObject{fqn, PathOf(fqn), loc.file, loc.offset, loc.length});
    } else {
      return Bad("fqn " + Quote(fqn) + " has a " + Describe(md) +
                 ", not Tensor- or BytesStorageMetadata");
    }
  }
  // Two fqns with one path (planner_data mapping both to one key tuple)
  // would make one path mean two values.
  std::map<std::string, std::string> by_path;
  for (const auto& t : out.tensors) {
    if (!by_path.emplace(t.path, t.fqn).second) {
      return Bad("fqns " + Quote(by_path[t.path]) + " and " + Quote(t.fqn) +
                 " have one path " + Quote(t.path));
    }
  }
  for (const auto& o : out.objects) {
    if (!by_path.emplace(o.path, o.fqn).second) {
      return Bad("fqns " + Quote(by_path[o.path]) + " and " + Quote(o.fqn) +
                 " have one path " + Quote(o.path));
    }
  }
  std::sort(
      out.tensors.begin(), out.tensors.end(),
      [](const DcpTensor& a, const DcpTensor& b) { return a.path < b.path; });
  std::sort(
      out.objects.begin(), out.objects.end(),
      [](const DcpObject& a, const DcpObject& b) { return a.path < b.path; });
  std::set<std::string> files;
  for (const auto& t : out.tensors) {
    for (const auto& c : t.chunks) files.insert(c.file);
  }
  for (const auto& o : out.objects) files.insert(o.file);
  out.files.assign(files.begin(), files.end());
  return out;
}

}  // namespace

bool IsDcpDirectory(const std::string& dir) {
  struct stat st;
  return ::lstat((dir + "/.metadata").c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

Result<DcpIndex> ReadDcpDirectory(const std::string& dir) {
  return DcpReader(dir).Read();
}

}  // namespace ckpt::internal
