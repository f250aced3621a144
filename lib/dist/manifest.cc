// Manifest codec and rules (docs/SHARDED.md 4-5), protocol messages.
#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <numeric>
#include <set>
#include <string_view>
#include <tuple>

#include "bytes_internal.h"
#include "checksum_internal.h"
#include "ckpt/box.h"
#include "ckpt/format.h"
#include "ckpt_manifest_generated.h"
#include "dist/manifest_internal.h"
#include "format_internal.h"

namespace ckpt::dist {

uint64_t GlobalTensorInfo::nbytes() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n * DTypeSize(dtype);
}

const GlobalTensorInfo* Manifest::Find(std::string_view path) const {
  auto it = std::lower_bound(
      tensors.begin(), tensors.end(), path,
      [](const GlobalTensorInfo& t, std::string_view p) { return t.path < p; });
  if (it == tensors.end() || it->path != path) return nullptr;
  return &*it;
}

}  // namespace ckpt::dist

namespace ckpt::dist::internal {

using ckpt::internal::HashToHex;
using ckpt::internal::LoadLE;
using ckpt::internal::RangeWithin;
using ckpt::internal::StoreLE;
using ckpt::internal::Utf8Problem;
using ckpt::internal::Xxh3;

namespace {

namespace fbm = ::ckpt::fbm;
using flatbuffers::FlatBufferBuilder;
using flatbuffers::Offset;

// "\x89CKPM\r\n\x1a": PNG's trick, as the ckpt file magic (FORMAT.md 3).
constexpr std::array<unsigned char, 8> kManifestMagic = {
    0x89, 'C', 'K', 'P', 'M', '\r', '\n', 0x1a};

Status At(Status s, const std::string& name, int64_t offset) {
  return s.WithFile(name).WithOffset(offset);
}

std::string Quote(std::string_view s) { return "'" + std::string(s) + "'"; }

std::string ChunkName(const GlobalTensorInfo& t, size_t i, const Manifest& m) {
  const ChunkInfo& c = t.chunks[i];
  std::string s = "chunk " + std::to_string(i) + " " + BoxString(c.box);
  if (c.file < m.files.size()) {
    s += " (" + m.files[c.file].name + ", rank " +
         std::to_string(m.files[c.file].rank) + ")";
  }
  return s;
}

// A plain file name: no separator, not "." or "..", no NUL, not empty.
bool PlainName(std::string_view n) {
  return !n.empty() && n.size() <= 255 && n != "." && n != ".." &&
         n.find('/') == std::string_view::npos &&
         n.find('\0') == std::string_view::npos && !Utf8Problem(n);
}

// True when `t`'s chunks (boxes already checked inside its shape) are
// slabs of whole rows, sorted by first row and pairwise disjoint.
bool RowSlabsInOrder(const GlobalTensorInfo& t) {
  int64_t next = 0;  // the first row not yet covered by an earlier slab
  for (const ChunkInfo& c : t.chunks) {
    const Box& b = c.box;
    if (b.ndim() == 0 || b.offsets[0] < next) return false;
    for (size_t d = 1; d < b.ndim(); ++d) {
      if (b.offsets[d] != 0 || b.sizes[d] != t.shape[d]) return false;
    }
    next = b.offsets[0] + b.sizes[0];
  }
  return true;
}

Status CheckTensor(const Manifest& m, const GlobalTensorInfo& t,
                   const std::string& name) {
  auto fail = [&](const std::string& what) {
    return Corrupt(what).WithFile(name).WithTensor(t.path);
  };
  if (Utf8Problem(t.path)) return fail("tensor path is not valid UTF-8");
  const size_t elem = DTypeSize(t.dtype);
  if (!IsKnownDType(static_cast<uint8_t>(t.dtype)) || elem == 0) {
    return fail("unknown dtype code " +
                std::to_string(static_cast<unsigned>(t.dtype)));
  }
  Box whole{std::vector<int64_t>(t.shape.size(), 0), t.shape};
  if (auto p = BoxProblem(whole, t.shape, elem)) return fail("shape: " + *p);
  const int64_t numel = whole.numel();
  int64_t covered = 0;  // saturates at numel + 1
  std::vector<Box> boxes;
  if (t.chunks.size() > 1) boxes.reserve(t.chunks.size());
  for (size_t i = 0; i < t.chunks.size(); ++i) {
    const ChunkInfo& c = t.chunks[i];
    if (auto p = BoxProblem(c.box, t.shape, elem)) {
      return fail("chunk " + std::to_string(i) + ": " + *p);
    }
    const int64_t n = c.box.numel();
    if (n == 0) {
      return fail(ChunkName(t, i, m) +
                  " is empty (empty chunks are not stored)");
    }
    if (c.length != static_cast<uint64_t>(n) * elem) {
      return fail(ChunkName(t, i, m) + " has " + std::to_string(c.length) +
                  " bytes; its box holds " + std::to_string(n) + " x " +
                  std::to_string(elem) + "-byte elements");
    }
    if (c.file >= m.files.size()) {
      return fail("chunk " + std::to_string(i) + " names file " +
                  std::to_string(c.file) + " of " +
                  std::to_string(m.files.size()));
    }
    if (!RangeWithin(c.offset, c.length, m.files[c.file].size)) {
      return fail(ChunkName(t, i, m) + ": bytes [" + std::to_string(c.offset) +
                  ", +" + std::to_string(c.length) + ") run past the file's " +
                  std::to_string(m.files[c.file].size) + " bytes");
    }
    covered = n > numel - covered ? numel + 1 : covered + n;
    if (t.chunks.size() > 1) boxes.push_back(c.box);
  }
  // M12: the chunks tile the shape: no fewer elements than the tensor has
  // (O(C), first: a hole is the common mistake), and pairwise disjoint.
  // A grid is disjoint by construction; any other layout is swept, within
  // a bound on comparisons so that a hostile manifest cannot make every
  // rank's open quadratic.
  if (covered < numel) {
    return fail("chunks hold " + std::to_string(covered) + " elements of " +
                std::to_string(numel) +
                " (a hole: some elements were saved by no rank)");
  }
  // (One chunk has nothing to overlap: the common case of replicated
  // tensors skips the index. Row slabs - every chunk whole in all dims
  // but the first - in order of their first row, as a row-sharded save
  // commits them, are disjoint when each ends before the next begins:
  // O(C) with no index, the commit's common case.)
  if (t.chunks.size() > 1 && !RowSlabsInOrder(t)) {
    CKPT_ASSIGN_OR_RETURN(BoxIndex index, BoxIndex::Build(std::move(boxes)));
    auto overlap = index.FirstOverlap(
        kMaxOverlapTestsPerChunk * t.chunks.size() + kMinOverlapTests);
    if (!overlap.ok()) return fail(overlap.status().message());
    if (overlap->has_value()) {
      const auto [i, j] = **overlap;
      return fail("chunks overlap: " + ChunkName(t, i, m) + " and " +
                  ChunkName(t, j, m));
    }
  }
  if (covered != numel) {  // disjoint boxes inside the shape cannot
    return fail("chunks hold more elements than the shape");  // (defensive)
  }
  return Status::OK();
}

}  // namespace

std::string BoxString(const Box& b) {
  std::string s = "[";
  for (size_t d = 0; d < b.ndim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(b.offsets[d]) + ":" +
         std::to_string(b.offsets[d] + b.sizes[d]);
  }
  return s + "]";
}

Status CheckManifest(const Manifest& m, const std::string& name) {
  auto fail = [&](const std::string& what) {
    return Corrupt(what).WithFile(name);
  };
  // M7: files, one per rank.
  if (m.world_size == 0) return fail("world size is 0");
  if (m.files.size() != m.world_size) {
    return fail("world size " + std::to_string(m.world_size) + " but " +
                std::to_string(m.files.size()) + " shard files");
  }
  std::set<std::string_view> names;
  for (size_t i = 0; i < m.files.size(); ++i) {
    const ShardFileInfo& f = m.files[i];
    if (!PlainName(f.name)) {
      return fail("shard file " + std::to_string(i) + "'s name " +
                  Quote(f.name) + " is not a plain file name");
    }
    if (f.name == kManifestName) {
      return fail("shard file " + std::to_string(i) +
                  " is named like the manifest");
    }
    if (!names.insert(f.name).second) {
      return fail("two shard files are named " + Quote(f.name));
    }
    if (f.rank != i) {
      return fail("shard file " + std::to_string(i) + " (" + f.name +
                  ") says rank " + std::to_string(f.rank) +
                  "; files are in rank order");
    }
  }
  if (m.globals_file >= m.files.size()) {
    return fail("globals file " + std::to_string(m.globals_file) + " of " +
                std::to_string(m.files.size()));
  }
  // M8-M12: tensors.
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    if (i > 0 && !(m.tensors[i - 1].path < m.tensors[i].path)) {
      return fail("tensors are not sorted by path with no repeats: " +
                  Quote(m.tensors[i - 1].path) + " then " +
                  Quote(m.tensors[i].path));
    }
    CKPT_RETURN_IF_ERROR(CheckTensor(m, m.tensors[i], name));
  }
  // M13: no two chunks share bytes of a file.
  struct Range {
    uint32_t file;
    uint64_t offset, length;
    size_t tensor, chunk;
  };
  std::vector<Range> ranges;
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    for (size_t j = 0; j < m.tensors[i].chunks.size(); ++j) {
      const ChunkInfo& c = m.tensors[i].chunks[j];
      ranges.push_back({c.file, c.offset, c.length, i, j});
    }
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return std::tie(a.file, a.offset) < std::tie(b.file, b.offset);
  });
  for (size_t k = 1; k < ranges.size(); ++k) {
    const Range& a = ranges[k - 1];
    const Range& b = ranges[k];
    if (a.file == b.file && b.offset < a.offset + a.length) {
      const auto& ta = m.tensors[a.tensor];
      const auto& tb = m.tensors[b.tensor];
      return fail("bytes of two chunks overlap in " + m.files[a.file].name +
                  " at offset " + std::to_string(b.offset) + ": tensor " +
                  Quote(ta.path) + " " + ChunkName(ta, a.chunk, m) +
                  " and tensor " + Quote(tb.path) + " " +
                  ChunkName(tb, b.chunk, m));
    }
  }
  // M14: metadata and producer.
  for (size_t i = 0; i < m.metadata.size(); ++i) {
    const auto& [k, v] = m.metadata[i];
    if (Utf8Problem(k) || Utf8Problem(v)) {
      return fail("metadata " + std::to_string(i) + " is not valid UTF-8");
    }
    if (i > 0 && !(m.metadata[i - 1].first < k)) {
      return fail("metadata keys are not sorted with no repeats at " +
                  Quote(k));
    }
  }
  if (Utf8Problem(m.producer)) return fail("producer is not valid UTF-8");
  return Status::OK();
}

// ---- codec -------------------------------------------------------------

namespace {

Offset<fbm::GlobalTensor> BuildTensor(FlatBufferBuilder& b,
                                      const GlobalTensorInfo& t) {
  std::vector<int64_t> offs, sizes;
  std::vector<fbm::ByteRange> data;
  offs.reserve(t.chunks.size() * t.shape.size());
  sizes.reserve(offs.capacity());
  data.reserve(t.chunks.size());
  for (const ChunkInfo& c : t.chunks) {
    offs.insert(offs.end(), c.box.offsets.begin(), c.box.offsets.end());
    sizes.insert(sizes.end(), c.box.sizes.begin(), c.box.sizes.end());
    data.emplace_back(c.file, c.offset, c.length);
  }
  auto path = b.CreateString(t.path);
  auto shape = b.CreateVector(t.shape);
  auto o = b.CreateVector(offs);
  auto s = b.CreateVector(sizes);
  auto d = b.CreateVectorOfStructs(data);
  return fbm::CreateGlobalTensor(b, path, static_cast<uint8_t>(t.dtype), shape,
                                 o, s, d);
}

Offset<fbm::ShardFile> BuildFile(FlatBufferBuilder& b, const ShardFileInfo& f) {
  auto n = b.CreateString(f.name);
  return fbm::CreateShardFile(b, n, f.size, f.header_xxh3, f.rank);
}

Offset<fbm::StatusMsg> BuildStatus(FlatBufferBuilder& b, const Status& s) {
  if (s.ok()) return fbm::CreateStatusMsg(b);
  auto msg = b.CreateString(s.message());
  auto file = b.CreateString(s.file());
  auto tensor = b.CreateString(s.tensor());
  return fbm::CreateStatusMsg(b, static_cast<int32_t>(s.code()), s.sys_errno(),
                              msg, file, s.offset(), tensor, s.has_tensor());
}

Status ReadStatus(const fbm::StatusMsg* m) {
  if (!m || m->code() == 0) return Status::OK();
  int code = m->code();
  ErrorCode ec =
      code > 0 && code <= static_cast<int>(ErrorCode::kResourceExhausted)
          ? static_cast<ErrorCode>(code)
          : ErrorCode::kIoError;
  Status s(ec, m->message() ? m->message()->str() : "(no message)");
  if (m->file() && m->file()->size()) s = s.WithFile(m->file()->str());
  if (m->offset() >= 0) s = s.WithOffset(m->offset());
  if (m->has_tensor()) s = s.WithTensor(m->tensor() ? m->tensor()->str() : "");
  if (m->sys_errno()) s = s.WithErrno(m->sys_errno());
  return s;
}

std::vector<std::byte> Bytes(const FlatBufferBuilder& b) {
  const auto* p = reinterpret_cast<const std::byte*>(b.GetBufferPointer());
  return {p, p + b.GetSize()};
}

std::string Str(const flatbuffers::String* s) { return s ? s->str() : ""; }

template <typename T>
std::vector<T> Vec(const flatbuffers::Vector<T>* v) {
  if (!v) return {};
  return {v->begin(), v->end()};
}

// A vector's 8-byte elements must be 8-aligned to be read as such (the
// Verifier checks only the 4-byte length prefix; FORMAT.md R10 likewise).
template <typename T>
bool Misaligned(const flatbuffers::Vector<T>* v) {
  return v && v->size() > 0 &&
         reinterpret_cast<uintptr_t>(v->data()) % alignof(int64_t) != 0;
}

template <typename T>
bool ZeroElement(const flatbuffers::Vector<flatbuffers::Offset<T>>* v) {
  if (!v) return false;
  const auto* raw = reinterpret_cast<const uint8_t*>(v->Data());
  for (flatbuffers::uoffset_t i = 0; i < v->size(); ++i) {
    if (flatbuffers::ReadScalar<flatbuffers::uoffset_t>(raw + 4 * i) == 0)
      return true;
  }
  return false;
}

// Decodes one GlobalTensor table (already verified) into `out`; only the
// array shapes are checked here, the rest by CheckTensor.
Status ReadTensor(const fbm::GlobalTensor* t, GlobalTensorInfo* out) {
  out->path = Str(t->path());
  out->dtype = static_cast<DType>(t->dtype());
  if (Misaligned(t->shape()) || Misaligned(t->chunk_offsets()) ||
      Misaligned(t->chunk_sizes()) || Misaligned(t->chunk_data())) {
    return Corrupt("8-byte elements that are not 8-aligned")
        .WithTensor(out->path);
  }
  out->shape = Vec(t->shape());
  const size_t ndim = out->shape.size();
  const size_t n = t->chunk_data() ? t->chunk_data()->size() : 0;
  const size_t no = t->chunk_offsets() ? t->chunk_offsets()->size() : 0;
  const size_t ns = t->chunk_sizes() ? t->chunk_sizes()->size() : 0;
  // M10: n_chunks x ndim offsets and sizes.
  if (no != ns || (ndim == 0 ? no != 0 : no != n * ndim)) {
    return Corrupt(std::to_string(n) + " chunks of a " + std::to_string(ndim) +
                   "-d tensor but " + std::to_string(no) + " offsets and " +
                   std::to_string(ns) + " sizes")
        .WithTensor(out->path);
  }
  out->chunks.resize(n);
  for (size_t i = 0; i < n; ++i) {
    ChunkInfo& c = out->chunks[i];
    const fbm::ByteRange* r = t->chunk_data()->Get(static_cast<uint32_t>(i));
    c.file = r->file();
    c.offset = r->offset();
    c.length = r->length();
    const int64_t* offs =
        t->chunk_offsets() ? t->chunk_offsets()->data() : nullptr;
    const int64_t* sizes =
        t->chunk_sizes() ? t->chunk_sizes()->data() : nullptr;
    if (ndim > 0) {
      c.box.offsets.assign(offs + i * ndim, offs + (i + 1) * ndim);
      c.box.sizes.assign(sizes + i * ndim, sizes + (i + 1) * ndim);
    }
  }
  return Status::OK();
}

flatbuffers::Verifier::Options VerifierOptions(size_t size) {
  flatbuffers::Verifier::Options o;
  o.max_depth = 8;  // Manifest > vector > table > vector
  o.max_tables = static_cast<flatbuffers::uoffset_t>(
      std::min<size_t>(size / 4 + 16, std::numeric_limits<uint32_t>::max()));
  o.check_alignment = true;
  return o;
}

}  // namespace

Result<std::vector<std::byte>> EncodeManifest(const Manifest& m) {
  Status bad = CheckManifest(m, "manifest");
  if (!bad.ok()) return InvalidArgument(bad.ToString());
  Manifest now = m;  // written as the version this library writes
  now.version_major = kManifestMajor;
  now.version_minor = kManifestMinor;
  return SerializeManifest(now);
}

std::vector<std::byte> SerializeManifest(const Manifest& m) {
  FlatBufferBuilder b(1024);
  std::vector<Offset<fbm::ShardFile>> files;
  for (const auto& f : m.files) files.push_back(BuildFile(b, f));
  std::vector<Offset<fbm::GlobalTensor>> tensors;
  tensors.reserve(m.tensors.size());
  for (const auto& t : m.tensors) tensors.push_back(BuildTensor(b, t));
  std::vector<Offset<fbm::KeyValue>> meta;
  for (const auto& [k, v] : m.metadata) {
    auto ko = b.CreateString(k);
    auto vo = b.CreateString(v);
    meta.push_back(fbm::CreateKeyValue(b, ko, vo));
  }
  auto fo = b.CreateVector(files);
  auto to = b.CreateVector(tensors);
  auto mo = b.CreateVector(meta);
  auto po = b.CreateString(m.producer);
  auto root = fbm::CreateManifest(b, m.version_major, m.version_minor,
                                  m.world_size, m.globals_file, fo, to, mo, po);
  fbm::FinishManifestBuffer(b, root);
  return SealManifest(
      {reinterpret_cast<const std::byte*>(b.GetBufferPointer()), b.GetSize()},
      m.version_major, m.version_minor);
}

std::vector<std::byte> SealManifest(std::span<const std::byte> fb,
                                    uint16_t major, uint16_t minor) {
  std::vector<std::byte> out(kManifestPreambleBytes + fb.size());
  std::memcpy(out.data() + kManifestPreambleBytes, fb.data(), fb.size());
  std::byte* p = out.data();
  std::memcpy(p, kManifestMagic.data(), 8);
  StoreLE(p + 8, major, 2);
  StoreLE(p + 10, minor, 2);
  StoreLE(p + 12, 0, 4);  // flags
  StoreLE(p + 16, fb.size(), 8);
  StoreLE(p + 24, Xxh3(fb), 8);
  StoreLE(p + 32, 0, 8);  // reserved
  StoreLE(p + 40, Xxh3({p, 40}), 8);
  return out;
}

Result<Manifest> DecodeManifest(std::span<const std::byte> bytes,
                                const std::string& name) {
  const std::byte* p = bytes.data();
  // M1: size and magic.
  if (bytes.size() < kManifestPreambleBytes) {
    return At(Corrupt("manifest is " + std::to_string(bytes.size()) +
                      " bytes, shorter than its 48-byte preamble"),
              name, 0);
  }
  if (std::memcmp(p, kManifestMagic.data(), 8) != 0) {
    return At(Corrupt("bad magic: not a ckpt manifest"), name, 0);
  }
  // M2: the preamble checksum, before any other field is trusted.
  uint64_t stored = LoadLE(p + 40, 8);
  uint64_t computed = Xxh3({p, 40});
  if (stored != computed) {
    return At(ChecksumMismatch("manifest preamble checksum mismatch: stored " +
                               HashToHex(stored) + ", computed " +
                               HashToHex(computed)),
              name, 40);
  }
  // M3: versions, flags, reserved bytes.
  const auto major = static_cast<uint16_t>(LoadLE(p + 8, 2));
  const auto minor = static_cast<uint16_t>(LoadLE(p + 10, 2));
  if (major != kManifestMajor) {
    return At(UnsupportedVersion("manifest version " + std::to_string(major) +
                                 "." + std::to_string(minor) +
                                 "; this reader knows version " +
                                 std::to_string(kManifestMajor) + ".x"),
              name, 8);
  }
  if (LoadLE(p + 12, 4) != 0) {
    return At(UnsupportedVersion("unknown manifest flags " +
                                 std::to_string(LoadLE(p + 12, 4))),
              name, 12);
  }
  if (LoadLE(p + 32, 8) != 0) {
    return At(Corrupt("reserved preamble bytes are not zero"), name, 32);
  }
  // M4: the FlatBuffers bytes fill the rest of the file exactly.
  const uint64_t size = LoadLE(p + 16, 8);
  if (size != bytes.size() - kManifestPreambleBytes ||
      size > kMaxManifestBytes) {
    return At(Corrupt("manifest says " + std::to_string(size) +
                      " bytes follow its preamble; the file has " +
                      std::to_string(bytes.size() - kManifestPreambleBytes)),
              name, 16);
  }
  auto body = bytes.subspan(kManifestPreambleBytes);
  // M5: the checksum of the FlatBuffers bytes.
  stored = LoadLE(p + 24, 8);
  computed = Xxh3(body);
  if (stored != computed) {
    return At(ChecksumMismatch("manifest checksum mismatch: stored " +
                               HashToHex(stored) + ", computed " +
                               HashToHex(computed)),
              name, static_cast<int64_t>(kManifestPreambleBytes));
  }
  // M6: FlatBuffers structure. The body must be 8-aligned in memory for
  // the alignment checks to mean anything; copy it if it is not.
  std::vector<uint64_t> aligned;
  const auto* data = reinterpret_cast<const uint8_t*>(body.data());
  if (reinterpret_cast<uintptr_t>(data) % 8 != 0) {
    aligned.resize((body.size() + 7) / 8);
    std::memcpy(aligned.data(), body.data(), body.size());
    data = reinterpret_cast<const uint8_t*>(aligned.data());
  }
  flatbuffers::Verifier v(data, body.size(), VerifierOptions(body.size()));
  const int64_t body_at = static_cast<int64_t>(kManifestPreambleBytes);
  if (!fbm::ManifestBufferHasIdentifier(data) ||
      !fbm::VerifyManifestBuffer(v)) {
    return At(Corrupt("manifest fails FlatBuffers verification (wrong "
                      "identifier, bad offsets or bad alignment)"),
              name, body_at);
  }
  const fbm::Manifest* fm = fbm::GetManifest(data);
  if (ZeroElement(fm->files()) || ZeroElement(fm->tensors()) ||
      ZeroElement(fm->metadata())) {
    return At(Corrupt("a table vector holds a zero offset"), name, body_at);
  }
  if (fm->version_major() != major || fm->version_minor() != minor) {
    return At(Corrupt("the manifest's version fields disagree with its "
                      "preamble"),
              name, body_at);
  }
  Manifest m;
  m.version_major = major;
  m.version_minor = minor;
  m.world_size = fm->world_size();
  m.globals_file = fm->globals_file();
  m.producer = Str(fm->producer());
  if (const auto* files = fm->files()) {
    m.files.reserve(files->size());
    for (const fbm::ShardFile* f : *files) {
      m.files.push_back(
          {Str(f->name()), f->size(), f->header_xxh3(), f->rank()});
    }
  }
  if (const auto* tensors = fm->tensors()) {
    m.tensors.resize(tensors->size());
    for (flatbuffers::uoffset_t i = 0; i < tensors->size(); ++i) {
      Status s = ReadTensor(tensors->Get(i), &m.tensors[i]);
      if (!s.ok()) return At(s, name, body_at);
    }
  }
  if (const auto* meta = fm->metadata()) {
    for (const fbm::KeyValue* kv : *meta) {
      m.metadata.emplace_back(Str(kv->key()), Str(kv->value()));
    }
  }
  CKPT_RETURN_IF_ERROR(CheckManifest(m, name));
  return m;
}

// ---- messages ----------------------------------------------------------

std::vector<std::byte> EncodeStatus(const Status& s) {
  FlatBufferBuilder b(256);
  b.Finish(BuildStatus(b, s));
  return Bytes(b);
}

Status DecodeStatus(std::span<const std::byte> bytes) {
  std::vector<uint64_t> aligned((bytes.size() + 7) / 8);
  std::memcpy(aligned.data(), bytes.data(), bytes.size());
  const auto* data = reinterpret_cast<const uint8_t*>(aligned.data());
  flatbuffers::Verifier v(data, bytes.size(), VerifierOptions(bytes.size()));
  if (bytes.size() < 8 || !v.VerifyBuffer<fbm::StatusMsg>(nullptr)) {
    return IoError("a rank sent a status message that does not decode");
  }
  return ReadStatus(flatbuffers::GetRoot<fbm::StatusMsg>(data));
}

std::vector<std::byte> EncodeReport(const RankReport& r) {
  FlatBufferBuilder b(1024);
  auto st = BuildStatus(b, r.status);
  auto file = BuildFile(b, r.file);
  std::vector<Offset<fbm::GlobalTensor>> tensors;
  for (const auto& t : r.tensors) tensors.push_back(BuildTensor(b, t));
  auto to = b.CreateVector(tensors);
  auto dir = b.CreateString(r.dir);
  b.Finish(fbm::CreateRankReport(b, r.rank, r.world_size, st, file, to,
                                 r.has_globals, dir));
  return Bytes(b);
}

Result<RankReport> DecodeReport(std::span<const std::byte> bytes,
                                uint32_t rank) {
  auto bad = [&](const std::string& what) {
    return Corrupt("rank " + std::to_string(rank) + "'s commit report " + what);
  };
  std::vector<uint64_t> aligned((bytes.size() + 7) / 8);
  std::memcpy(aligned.data(), bytes.data(), bytes.size());
  const auto* data = reinterpret_cast<const uint8_t*>(aligned.data());
  flatbuffers::Verifier v(data, bytes.size(), VerifierOptions(bytes.size()));
  if (bytes.size() < 8 || !v.VerifyBuffer<fbm::RankReport>(nullptr)) {
    return bad("does not decode");
  }
  const auto* fr = flatbuffers::GetRoot<fbm::RankReport>(data);
  if (ZeroElement(fr->tensors())) return bad("holds a zero offset");
  RankReport r;
  r.rank = fr->rank();
  r.world_size = fr->world_size();
  r.status = ReadStatus(fr->status());
  r.has_globals = fr->has_globals();
  r.dir = Str(fr->dir());
  if (const auto* f = fr->file()) {
    r.file = {Str(f->name()), f->size(), f->header_xxh3(), f->rank()};
  }
  if (const auto* ts = fr->tensors()) {
    r.tensors.resize(ts->size());
    for (flatbuffers::uoffset_t i = 0; i < ts->size(); ++i) {
      Status s = ReadTensor(ts->Get(i), &r.tensors[i]);
      if (!s.ok()) return bad(s.ToString());
    }
  }
  if (r.rank != rank) {
    return bad("says rank " + std::to_string(r.rank));
  }
  return r;
}

std::vector<std::byte> EncodeOutcome(const Result<CommitInfo>& r) {
  FlatBufferBuilder b(256);
  auto st = BuildStatus(b, r.status());
  if (r.ok()) {
    b.Finish(fbm::CreateOutcome(b, st, r->total_bytes, r->files, r->tensors,
                                r->chunks));
  } else {
    b.Finish(fbm::CreateOutcome(b, st));
  }
  return Bytes(b);
}

Result<CommitInfo> DecodeOutcome(std::span<const std::byte> bytes,
                                 const std::string& dir) {
  std::vector<uint64_t> aligned((bytes.size() + 7) / 8);
  std::memcpy(aligned.data(), bytes.data(), bytes.size());
  const auto* data = reinterpret_cast<const uint8_t*>(aligned.data());
  flatbuffers::Verifier v(data, bytes.size(), VerifierOptions(bytes.size()));
  if (bytes.size() < 8 || !v.VerifyBuffer<fbm::Outcome>(nullptr)) {
    return IoError("the coordinator's commit outcome does not decode")
        .WithFile(dir);
  }
  const auto* o = flatbuffers::GetRoot<fbm::Outcome>(data);
  Status s = ReadStatus(o->status());
  if (!s.ok()) return s;
  CommitInfo info;
  info.path = dir;
  info.total_bytes = o->total_bytes();
  info.files = o->files();
  info.tensors = o->tensors();
  info.chunks = o->chunks();
  return info;
}

}  // namespace ckpt::dist::internal
