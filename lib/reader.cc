#include "ckpt/reader.h"

#include <fcntl.h>

#include <algorithm>
#include <charconv>
#include <cstring>

#include "bytes_internal.h"
#include "checksum_internal.h"
#include "header_internal.h"
#include "parallel_internal.h"
#include "reader_internal.h"
#include "source_internal.h"
#include "tree_internal.h"

namespace ckpt {

// ---- TensorInfo
// ---------------------------------------------------------------

int64_t TensorInfo::numel() const {
  // A 0 size first: [2^33, 2^33, 0] is a valid empty view whose partial
  // products would overflow. Otherwise validated not to overflow at open.
  for (int64_t s : shape) {
    if (s == 0) return 0;
  }
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

uint64_t TensorInfo::nbytes() const {
  return static_cast<uint64_t>(numel()) * DTypeSize(dtype);
}

bool TensorInfo::is_contiguous() const {
  int64_t expected = 1;
  for (size_t d = shape.size(); d-- > 0;) {
    if (shape[d] == 1) continue;
    if (strides[d] != expected) return numel() == 0;
    expected *= shape[d];
  }
  return true;
}

namespace {

// Byte range [begin, end) of a view's elements within its storage.
struct Extent {
  uint64_t begin = 0;
  uint64_t end = 0;
};

Extent ExtentOf(const TensorInfo& t) {
  const uint64_t elsize = DTypeSize(t.dtype);
  const uint64_t first = static_cast<uint64_t>(t.storage_offset);
  uint64_t last = first;
  for (size_t d = 0; d < t.shape.size(); ++d) {
    if (t.shape[d] == 0) return {first * elsize, first * elsize};
    last += static_cast<uint64_t>(t.shape[d] - 1) *
            static_cast<uint64_t>(t.strides[d]);
  }
  return {first * elsize, (last + 1) * elsize};
}

// Writes row-major elements [first, first + count) of a strided view,
// innermost dimension as one contiguous run where its stride is 1. Walks
// from any starting element, so callers can stream a view of any size
// (a stride-0 expand of 2^40 elements) through a small buffer.
void GatherRange(const std::byte* base, const TensorInfo& t, size_t elsize,
                 uint64_t first, uint64_t count, std::byte* out) {
  const size_t rank = t.shape.size();
  if (count == 0) return;
  if (rank == 0) {
    std::memcpy(out, base, elsize);
    return;
  }
  // Multi-index of element `first` (shapes validated at open: no overflow).
  std::vector<int64_t> idx(rank, 0);
  uint64_t rest = first;
  for (size_t d = rank; d-- > 0;) {
    const auto extent = static_cast<uint64_t>(t.shape[d]);
    idx[d] = static_cast<int64_t>(rest % extent);
    rest /= extent;
  }
  const int64_t inner = t.shape[rank - 1];
  const int64_t inner_stride = t.strides[rank - 1];
  while (count > 0) {
    int64_t off = 0;
    for (size_t d = 0; d < rank; ++d) off += idx[d] * t.strides[d];
    const std::byte* src = base + static_cast<size_t>(off) * elsize;
    const uint64_t n =
        std::min<uint64_t>(count, static_cast<uint64_t>(inner - idx[rank - 1]));
    if (inner_stride == 1) {
      std::memcpy(out, src, static_cast<size_t>(n) * elsize);
      out += static_cast<size_t>(n) * elsize;
    } else {
      const size_t step = static_cast<size_t>(inner_stride) * elsize;
      for (uint64_t i = 0; i < n; ++i, src += step, out += elsize) {
        std::memcpy(out, src, elsize);
      }
    }
    count -= n;
    idx[rank - 1] += static_cast<int64_t>(n);
    for (size_t d = rank - 1; d > 0 && idx[d] == t.shape[d]; --d) {
      idx[d] = 0;
      ++idx[d - 1];
    }
  }
}

}  // namespace

Status TensorRef::CopyTo(std::span<std::byte> out) const {
  if (out.size() != info_.nbytes()) {
    return InvalidArgument("CopyTo needs a buffer of " +
                           std::to_string(info_.nbytes()) + " bytes, got " +
                           std::to_string(out.size()))
        .WithTensor(info_.path);
  }
  return CopyTo(out, 0);
}

Status TensorRef::CopyTo(std::span<std::byte> out, uint64_t begin) const {
  const uint64_t total = info_.nbytes();
  const size_t elsize = DTypeSize(info_.dtype);
  if (begin > total || out.size() > total - begin || begin % elsize != 0 ||
      out.size() % elsize != 0) {
    return InvalidArgument("bytes [" + std::to_string(begin) + ", +" +
                           std::to_string(out.size()) +
                           ") are not whole elements within the tensor's " +
                           std::to_string(total) + " bytes")
        .WithTensor(info_.path);
  }
  if (out.empty()) return Status::OK();
  if (info_.is_contiguous()) {
    std::memcpy(out.data(), data_.data() + begin, out.size());
  } else {
    GatherRange(data_.data(), info_, elsize, begin / elsize,
                out.size() / elsize, out.data());
  }
  return Status::OK();
}

// ---- CheckpointImpl
// -----------------------------------------------------------

namespace internal {

using flatbuffers::uoffset_t;

struct CheckpointImpl : std::enable_shared_from_this<CheckpointImpl> {
  std::shared_ptr<ByteSource> source;
  // The verified header, copied out of the file at open: metadata, tree
  // and table access never touch the mapping again, so they cannot fault
  // when someone overwrites or truncates the file in place. 8-aligned for
  // FlatBuffers.
  std::vector<uint64_t> header_copy;
  Preamble pre;
  const fb::Header* h = nullptr;
  ReadOptions options;

  const std::string& name() const { return source->name(); }
  uoffset_t ntensors() const { return h->tensors() ? h->tensors()->size() : 0; }
  uoffset_t nstorages() const {
    return h->storages() ? h->storages()->size() : 0;
  }
  const fb::Node* node(uint32_t i) const { return h->nodes()->Get(i); }

  TensorInfo Info(uoffset_t i) const {
    const fb::Tensor* t = h->tensors()->Get(i);
    TensorInfo info;
    info.path = t->path()->str();
    info.dtype = static_cast<DType>(t->dtype());
    if (t->shape()) info.shape.assign(t->shape()->begin(), t->shape()->end());
    if (t->strides()) {
      info.strides.assign(t->strides()->begin(), t->strides()->end());
    }
    info.storage = t->storage();
    info.storage_offset = t->storage_offset();
    info.requires_grad = t->requires_grad();
    info.is_parameter = t->is_parameter();
    info.index = i;
    return info;
  }

  // Storage `i`, which the caller has checked exists.
  StorageInfo StorageInfoOf(uoffset_t i) const {
    const fb::Storage* s = h->storages()->Get(i);
    return {s->offset(), s->nbytes(), s->device()->str()};
  }

  Result<uoffset_t> Find(std::string_view path) const {
    const auto* ts = h->tensors();
    if (ts) {
      // Binary search with byte-wise compare, the order the writer sorts in
      // (FlatBuffers' own LookupByKey uses strcmp, which stops at a NUL).
      uoffset_t lo = 0, hi = ts->size();
      while (lo < hi) {
        uoffset_t mid = lo + (hi - lo) / 2;
        std::string_view p = ts->Get(mid)->path()->string_view();
        if (p < path) {
          lo = mid + 1;
        } else {
          hi = mid;
        }
      }
      if (lo < ts->size() && ts->Get(lo)->path()->string_view() == path) {
        return lo;
      }
    }
    return NotFound("no tensor at path '" + std::string(path) + "'")
        .WithFile(name());
  }

  // Hashes the chunks of storage `s` that overlap [begin, end).
  Status VerifyChunks(uoffset_t s, uint64_t begin, uint64_t end,
                      const std::string& tensor) const {
    const fb::Storage* st = h->storages()->Get(s);
    const uint64_t chunk = h->chunk_size();
    if (end <= begin) return Status::OK();
    for (uint64_t c = begin / chunk; c * chunk < end; ++c) {
      uint64_t off = c * chunk;
      uint64_t len = std::min(chunk, st->nbytes() - off);
      CKPT_ASSIGN_OR_RETURN(Bytes b, source->Read(st->offset() + off, len));
      uint64_t got = Xxh3(b.data);
      uint64_t want = st->chunk_hashes()->Get(static_cast<uoffset_t>(c));
      if (got != want) {
        return ChecksumMismatch("chunk " + std::to_string(c) + " of storage " +
                                std::to_string(s) + ": stored " +
                                HashToHex(want) + ", computed " +
                                HashToHex(got))
            .WithFile(name())
            .WithOffset(static_cast<int64_t>(st->offset() + off))
            .WithTensor(tensor);
      }
    }
    return Status::OK();
  }

  Result<TensorRef> Ref(TensorInfo info) const {
    const fb::Storage* st = h->storages()->Get(info.storage);
    Extent e = ExtentOf(info);
    if (options.verify_checksums) {
      CKPT_RETURN_IF_ERROR(
          VerifyChunks(info.storage, e.begin, e.end, info.path));
    }
    TensorRef ref;
    if (e.end > e.begin) {
      auto bytes = source->Read(st->offset() + e.begin, e.end - e.begin);
      if (!bytes.ok()) return bytes.status().WithTensor(info.path);
      ref.data_ = bytes->data;
      ref.owner_ = std::move(bytes->owner);
    } else {
      ref.owner_ = source;
    }
    ref.info_ = std::move(info);
    return ref;
  }

  Value MakeValue(uint32_t n) const {
    Value v;
    v.impl_ = shared_from_this();
    v.node_ = n;
    return v;
  }

  KeyNode Describe(uint32_t i) const { return DescribeNode(*node(i)); }

  // In the float form of the file's minor version (1.0 files keep theirs).
  std::string KeySegment(uint32_t i) const {
    return KeySegmentOf(
        i, [this](uint32_t id) { return Describe(id); },
        [this](uint32_t id, size_t k) {
          return node(id)->items()->Get(static_cast<uoffset_t>(k));
        },
        FloatKeyFormFor(pre.minor));
  }

  Status VerifyTreePaths() const;
  Status VerifyData(unsigned threads) const;
};

}  // namespace internal

// ---- Value
// ----------------------------------------------------------------------

namespace {
const fb::Node* N(const std::shared_ptr<const internal::CheckpointImpl>& impl,
                  uint32_t i) {
  return impl->node(i);
}
}  // namespace

ValueKind Value::kind() const {
  return static_cast<ValueKind>(N(impl_, node_)->kind());
}
bool Value::is_container() const { return IsContainer(kind()); }
bool Value::as_bool() const {
  return kind() == ValueKind::kBool && N(impl_, node_)->int_value() != 0;
}
int64_t Value::as_int() const {
  return kind() == ValueKind::kInt ? N(impl_, node_)->int_value() : 0;
}
double Value::as_float() const {
  return kind() == ValueKind::kFloat || kind() == ValueKind::kComplex
             ? N(impl_, node_)->float_value()
             : 0.0;
}
std::complex<double> Value::as_complex() const {
  if (kind() != ValueKind::kComplex) return {};
  return {N(impl_, node_)->float_value(), N(impl_, node_)->imag_value()};
}
std::string_view Value::as_string() const {
  auto k = kind();
  const auto* s = N(impl_, node_)->str_value();
  return (k == ValueKind::kString || k == ValueKind::kDevice) && s
             ? s->string_view()
             : std::string_view();
}
std::span<const uint8_t> Value::as_bytes() const {
  auto k = kind();
  const auto* b = N(impl_, node_)->bytes_value();
  if ((k != ValueKind::kBytes && k != ValueKind::kBigInt) || !b) return {};
  return {b->data(), b->size()};
}
DType Value::as_dtype() const {
  return kind() == ValueKind::kDType
             ? static_cast<DType>(N(impl_, node_)->int_value())
             : DType::kInvalid;
}
std::string_view Value::type_name() const {
  const auto* s = N(impl_, node_)->type_name();
  return s ? s->string_view() : std::string_view();
}
size_t Value::size() const {
  const auto* items = N(impl_, node_)->items();
  return items ? items->size() : 0;
}
Value Value::item(size_t i) const {
  return impl_->MakeValue(
      N(impl_, node_)->items()->Get(static_cast<flatbuffers::uoffset_t>(i)));
}
Value Value::key(size_t i) const {
  return impl_->MakeValue(
      N(impl_, node_)->keys()->Get(static_cast<flatbuffers::uoffset_t>(i)));
}
std::string Value::KeySegment() const { return impl_->KeySegment(node_); }
int64_t Value::file_offset() const {
  const auto* base =
      reinterpret_cast<const uint8_t*>(impl_->header_copy.data());
  const auto* at = reinterpret_cast<const uint8_t*>(N(impl_, node_));
  return static_cast<int64_t>(impl_->pre.header_offset) + (at - base);
}
std::string Value::BigIntToDecimal() const {
  if (kind() == ValueKind::kInt) return std::to_string(as_int());
  return internal::BigIntDecimal(as_bytes());
}

Result<Value> Value::Child(std::string_view segment) const {
  ValueKind k = kind();
  if (k == ValueKind::kDict) {
    const auto* keys = N(impl_, node_)->keys();
    for (flatbuffers::uoffset_t i = 0; keys && i < keys->size(); ++i) {
      uint32_t kn = keys->Get(i);
      const fb::Node* key_node = impl_->node(kn);
      // Fast path: string keys compare directly (an absent str_value is
      // "", FORMAT.md 6.1).
      bool match = key_node->kind() == fb::ValueKind::String
                       ? (key_node->str_value()
                              ? key_node->str_value()->string_view() == segment
                              : segment.empty())
                       : impl_->KeySegment(kn) == segment;
      if (match) return item(i);
    }
    return NotFound("no key '" + std::string(segment) + "' in dict")
        .WithFile(impl_->name());
  }
  if (is_container()) {
    uint64_t index = 0;
    auto [ptr, ec] =
        std::from_chars(segment.data(), segment.data() + segment.size(), index);
    bool canonical = !segment.empty() && ec == std::errc() &&
                     ptr == segment.data() + segment.size() &&
                     (segment.size() == 1 || segment[0] != '0');
    if (!canonical || index >= size()) {
      return NotFound("no element '" + std::string(segment) + "' in " +
                      std::string(ValueKindName(k)) + " of " +
                      std::to_string(size()))
          .WithFile(impl_->name());
    }
    return item(static_cast<size_t>(index));
  }
  return NotFound("'" + std::string(segment) + "' is below a " +
                  std::string(ValueKindName(k)) + ", which has no children")
      .WithFile(impl_->name());
}

Result<TensorInfo> Value::tensor_info() const {
  if (kind() != ValueKind::kTensor) {
    return InvalidArgument("value is a " + std::string(ValueKindName(kind())) +
                           ", not a tensor");
  }
  return impl_->Info(
      static_cast<flatbuffers::uoffset_t>(N(impl_, node_)->int_value()));
}

Result<size_t> Value::tensor_index() const {
  if (kind() != ValueKind::kTensor) {
    return InvalidArgument("value is a " + std::string(ValueKindName(kind())) +
                           ", not a tensor");
  }
  return static_cast<size_t>(N(impl_, node_)->int_value());
}

Result<TensorRef> Value::tensor() const {
  CKPT_ASSIGN_OR_RETURN(TensorInfo info, tensor_info());
  return impl_->Ref(std::move(info));
}

// ---- Checkpoint
// -------------------------------------------------------------------

namespace {

Result<std::shared_ptr<internal::CheckpointImpl>> OpenImpl(
    std::shared_ptr<internal::ByteSource> source, const ReadOptions& options) {
  auto impl = std::make_shared<internal::CheckpointImpl>();
  impl->source = std::move(source);
  impl->options = options;
  const auto& src = *impl->source;
  auto with_file = [&](Status s) { return s.WithFile(src.name()); };

  uint64_t pre_len = std::min<uint64_t>(kPreambleBytes, src.size());
  auto pre_bytes = src.Read(0, pre_len);
  if (!pre_bytes.ok()) return pre_bytes.status();
  auto pre = internal::DecodePreamble(pre_bytes->data, src.size());
  if (!pre.ok()) return with_file(pre.status());
  impl->pre = *pre;

  // Copied before it is checked, so what is verified is what is used.
  // (The preamble caps header_size; the copy is small next to the data.)
  try {
    impl->header_copy.resize(static_cast<size_t>((pre->header_size + 7) / 8));
  } catch (const std::bad_alloc&) {
    return with_file(ResourceExhausted("cannot allocate " +
                                       std::to_string(pre->header_size) +
                                       " bytes for the header"));
  }
  std::span<std::byte> hb{
      reinterpret_cast<std::byte*>(impl->header_copy.data()),
      static_cast<size_t>(pre->header_size)};
  CKPT_RETURN_IF_ERROR(src.ReadInto(pre->header_offset, hb));
  auto h = internal::ValidateHeader(hb, *pre);
  if (!h.ok()) return with_file(h.status());
  impl->h = *h;
  return impl;
}

}  // namespace

Result<Checkpoint> Checkpoint::Open(const std::string& path,
                                    const ReadOptions& options) {
  CKPT_ASSIGN_OR_RETURN(
      auto source,
      internal::OpenSource(path, {.pread = options.backend == Backend::kPread,
                                  .populate = options.populate}));
  CKPT_ASSIGN_OR_RETURN(auto impl, OpenImpl(std::move(source), options));
  return Checkpoint(std::move(impl));
}

Result<Checkpoint> Checkpoint::OpenBuffer(std::span<const std::byte> bytes,
                                          std::string name) {
  CKPT_ASSIGN_OR_RETURN(
      auto impl,
      OpenImpl(internal::BufferSource(bytes, std::move(name)), ReadOptions{}));
  return Checkpoint(std::move(impl));
}

Checkpoint::~Checkpoint() = default;

const std::string& Checkpoint::path() const { return impl_->name(); }
uint64_t Checkpoint::file_size() const { return impl_->source->size(); }
Backend Checkpoint::backend() const {
  return impl_->source->zero_copy() && impl_->options.backend == Backend::kMmap
             ? Backend::kMmap
             : Backend::kPread;
}
uint16_t Checkpoint::format_major() const { return impl_->pre.major; }
uint16_t Checkpoint::format_minor() const { return impl_->pre.minor; }
uint64_t Checkpoint::chunk_size() const { return impl_->h->chunk_size(); }
std::string_view Checkpoint::producer() const {
  return impl_->h->producer() ? impl_->h->producer()->string_view()
                              : std::string_view();
}
Checkpoint::Layout Checkpoint::layout() const {
  const internal::Preamble& p = impl_->pre;
  return {p.data_offset, p.data_size, p.header_offset, p.header_size,
          p.header_hash};
}

size_t Checkpoint::num_tensors() const { return impl_->ntensors(); }
std::vector<std::string_view> Checkpoint::TensorPaths() const& {
  std::vector<std::string_view> out;
  if (const auto* tensors = impl_->h->tensors()) {
    out.reserve(tensors->size());
    for (const fb::Tensor* t : *tensors)
      out.push_back(t->path()->string_view());
  }
  return out;
}
Result<TensorInfo> Checkpoint::TensorInfoAt(size_t index) const {
  if (index >= num_tensors()) {
    return InvalidArgument("tensor index " + std::to_string(index) +
                           " out of range (" + std::to_string(num_tensors()) +
                           " tensors)")
        .WithFile(impl_->name());
  }
  return impl_->Info(static_cast<flatbuffers::uoffset_t>(index));
}
Result<TensorInfo> Checkpoint::FindTensor(std::string_view path) const {
  CKPT_ASSIGN_OR_RETURN(auto i, impl_->Find(path));
  return impl_->Info(i);
}
Result<TensorRef> Checkpoint::Tensor(std::string_view path) const {
  CKPT_ASSIGN_OR_RETURN(auto i, impl_->Find(path));
  return impl_->Ref(impl_->Info(i));
}
Result<TensorRef> Checkpoint::TensorAt(size_t index) const {
  CKPT_ASSIGN_OR_RETURN(TensorInfo info, TensorInfoAt(index));
  return impl_->Ref(std::move(info));
}

Result<TensorRef> Checkpoint::TensorRows(std::string_view path, int64_t begin,
                                         int64_t end) const {
  CKPT_ASSIGN_OR_RETURN(auto i, impl_->Find(path));
  TensorInfo info = impl_->Info(i);
  if (info.shape.empty()) {
    return InvalidArgument("a 0-dim tensor has no rows")
        .WithFile(impl_->name())
        .WithTensor(info.path);
  }
  if (begin < 0 || end < begin || end > info.shape[0]) {
    return InvalidArgument("rows [" + std::to_string(begin) + ", " +
                           std::to_string(end) + ") outside [0, " +
                           std::to_string(info.shape[0]) + ")")
        .WithFile(impl_->name())
        .WithTensor(info.path);
  }
  info.storage_offset += begin * info.strides[0];
  info.shape[0] = end - begin;
  return impl_->Ref(std::move(info));
}

size_t Checkpoint::num_storages() const { return impl_->nstorages(); }
Result<StorageInfo> Checkpoint::StorageInfoAt(size_t index) const {
  if (index >= num_storages()) {
    return InvalidArgument("storage " + std::to_string(index) +
                           " does not exist (" +
                           std::to_string(num_storages()) + " storages)")
        .WithFile(impl_->name());
  }
  return impl_->StorageInfoOf(static_cast<flatbuffers::uoffset_t>(index));
}

Result<StorageView> Checkpoint::Storage(size_t index) const {
  CKPT_ASSIGN_OR_RETURN(StorageInfo st, StorageInfoAt(index));
  auto b = impl_->options.copy_on_write
               ? impl_->source->ReadWritable(st.offset, st.nbytes)
               : impl_->source->Read(st.offset, st.nbytes);
  if (!b.ok()) return b.status();
  return StorageView{b->data, std::move(b->owner)};
}

Status Checkpoint::ReadStorage(size_t index, uint64_t begin,
                               std::span<std::byte> out) const {
  CKPT_ASSIGN_OR_RETURN(StorageInfo st, StorageInfoAt(index));
  if (!internal::RangeWithin(begin, out.size(), st.nbytes)) {
    return InvalidArgument("range [" + std::to_string(begin) + ", +" +
                           std::to_string(out.size()) + ") outside storage " +
                           std::to_string(index) + " of " +
                           std::to_string(st.nbytes) + " bytes")
        .WithFile(impl_->name());
  }
  return impl_->source->ReadInto(st.offset + begin, out);
}

Status Checkpoint::ReadStorages(std::span<const StorageRead> reads,
                                unsigned threads) const {
  // Checked up front so a bad request copies nothing.
  for (size_t i = 0; i < reads.size(); ++i) {
    const StorageRead& r = reads[i];
    if (r.storage >= num_storages() ||
        !internal::RangeWithin(
            r.begin, r.out.size(),
            impl_->StorageInfoOf(static_cast<flatbuffers::uoffset_t>(r.storage))
                .nbytes)) {
      return ReadStorage(r.storage, r.begin, r.out)
          .WithContext("read " + std::to_string(i));
    }
  }
  constexpr uint64_t kPiece = 8ull << 20;
  struct Piece {
    size_t read;
    uint64_t offset;  // within the read
  };
  std::vector<Piece> pieces;
  try {
    for (size_t i = 0; i < reads.size(); ++i) {
      for (uint64_t off = 0; off < reads[i].out.size(); off += kPiece) {
        pieces.push_back({i, off});
      }
    }
  } catch (const std::bad_alloc&) {
    return ResourceExhausted("cannot plan " + std::to_string(reads.size()) +
                             " reads")
        .WithFile(impl_->name());
  }
  return internal::ParallelFor(pieces.size(), threads, [&](size_t k) -> Status {
    const StorageRead& r = reads[pieces[k].read];
    const uint64_t off = pieces[k].offset;
    const auto n =
        static_cast<size_t>(std::min<uint64_t>(kPiece, r.out.size() - off));
    return ReadStorage(r.storage, r.begin + off,
                       r.out.subspan(static_cast<size_t>(off), n));
  });
}

Status Checkpoint::StreamTensor(
    const TensorRef& tensor,
    const std::function<Status(std::span<const std::byte>)>& sink,
    size_t piece) const {
  const TensorInfo& info = tensor.info();
  const size_t elsize = DTypeSize(info.dtype);
  const uint64_t total = info.nbytes();
  if (info.storage >= num_storages()) {
    return InvalidArgument("tensor is not from this file")
        .WithTensor(info.path);
  }
  piece = std::max(elsize, piece / elsize * elsize);
  // File range the view's bytes come from: released from the mapping as
  // the walk passes it (all of it after each piece when the view is
  // strided, since a piece may touch any of its pages).
  const Extent e = ExtentOf(info);
  const uint64_t file_begin =
      impl_->StorageInfoOf(static_cast<flatbuffers::uoffset_t>(info.storage))
          .offset +
      e.begin;
  const uint64_t extent = e.end - e.begin;
  constexpr uint64_t kKeepMapped = 64ull << 20;
  const auto& src = *impl_->source;
  if (tensor.is_contiguous()) {
    std::span<const std::byte> all =
        tensor.data().first(static_cast<size_t>(total));
    for (uint64_t off = 0; off < total; off += piece) {
      const size_t n =
          static_cast<size_t>(std::min<uint64_t>(piece, total - off));
      CKPT_RETURN_IF_ERROR(sink(all.subspan(static_cast<size_t>(off), n)));
      src.Release(file_begin + off, n);
    }
    return Status::OK();
  }
  std::vector<std::byte> buf;
  try {
    buf.resize(static_cast<size_t>(std::min<uint64_t>(piece, total)));
  } catch (const std::bad_alloc&) {
    return ResourceExhausted("cannot allocate a " + std::to_string(piece) +
                             "-byte piece buffer")
        .WithTensor(info.path);
  }
  uint64_t since_release = 0;
  for (uint64_t off = 0; off < total; off += piece) {
    const size_t n =
        static_cast<size_t>(std::min<uint64_t>(piece, total - off));
    std::span<std::byte> out(buf.data(), n);
    CKPT_RETURN_IF_ERROR(tensor.CopyTo(out, off));
    CKPT_RETURN_IF_ERROR(sink(out));
    since_release += n;
    if (extent > kKeepMapped && since_release >= kKeepMapped) {
      src.Release(file_begin, extent);
      since_release = 0;
    }
  }
  return Status::OK();
}

Value Checkpoint::root() const {
  return impl_->MakeValue(impl_->h->nodes()->size() - 1);
}

Result<Value> Checkpoint::Get(std::string_view path) const {
  CKPT_ASSIGN_OR_RETURN(auto segments, SplitPath(path));
  Value v = root();
  PathBuilder walked;
  for (const auto& seg : segments) {
    auto child = v.Child(seg);
    if (!child.ok()) {
      return child.status().WithContext(
          walked.depth() == 0 ? "at the root" : "at '" + walked.path() + "'");
    }
    v = *child;
    walked.Push(seg);
  }
  return v;
}

std::vector<std::pair<std::string, std::string>> Checkpoint::metadata() const {
  std::vector<std::pair<std::string, std::string>> out;
  if (const auto* md = impl_->h->metadata()) {
    for (const auto* kv : *md) {
      out.emplace_back(kv->key()->str(), kv->value() ? kv->value()->str() : "");
    }
  }
  return out;
}

Result<std::string> Checkpoint::Metadata(std::string_view key) const {
  for (auto& [k, v] : metadata()) {
    if (k == key) return v;
  }
  return NotFound("no metadata key '" + std::string(key) + "'")
      .WithFile(impl_->name());
}

// ---- Verify
// -------------------------------------------------------------------------

namespace internal {

// R16: each tensor's stored path is the path of its node in the tree.
Status CheckpointImpl::VerifyTreePaths() const {
  struct Frame {
    uint32_t node;
    std::string path;
  };
  std::vector<Frame> stack;
  stack.push_back({h->nodes()->size() - 1, ""});
  while (!stack.empty()) {
    Frame f = std::move(stack.back());
    stack.pop_back();
    const fb::Node* n = node(f.node);
    auto child_path = [&](const std::string& seg) {
      return PathBuilder::Child(f.path, f.node == h->nodes()->size() - 1, seg);
    };
    switch (static_cast<ValueKind>(n->kind())) {
      case ValueKind::kTensor: {
        auto t = h->tensors()->Get(static_cast<uoffset_t>(n->int_value()));
        if (t->path()->string_view() != f.path) {
          return Corrupt(
                     "tensor's stored path differs from its place in the "
                     "tree, '" +
                     f.path + "'")
              .WithFile(name())
              .WithOffset(static_cast<int64_t>(pre.header_offset))
              .WithTensor(t->path()->str());
        }
        break;
      }
      case ValueKind::kDict:
        // An empty container may have no items/keys vectors at all (the
        // writer omits empty vectors): never dereference them unchecked.
        for (uoffset_t i = 0; n->items() && n->keys() && i < n->items()->size();
             ++i) {
          stack.push_back(
              {n->items()->Get(i), child_path(KeySegment(n->keys()->Get(i)))});
        }
        break;
      case ValueKind::kList:
      case ValueKind::kTuple:
      case ValueKind::kSet:
      case ValueKind::kFrozenSet:
        for (uoffset_t i = 0; n->items() && i < n->items()->size(); ++i) {
          stack.push_back({n->items()->Get(i), child_path(std::to_string(i))});
        }
        break;
      default:
        break;
    }
  }
  return Status::OK();
}

// R17 (chunk checksums) and R18 (zero padding), in parallel.
Status CheckpointImpl::VerifyData(unsigned threads) const {
  struct Task {
    uint64_t offset;  // absolute
    uint64_t len;
    int64_t storage;  // -1 for padding that must be zero
    uint64_t chunk;
    uint64_t hash;
  };
  std::vector<Task> tasks;
  const uint64_t chunk = h->chunk_size();
  auto add_padding = [&](uint64_t from, uint64_t to) {
    for (uint64_t o = from; o < to; o += chunk) {
      tasks.push_back({o, std::min(chunk, to - o), -1, 0, 0});
    }
  };
  add_padding(kPreambleBytes, pre.data_offset);
  uint64_t cursor = pre.data_offset;
  for (uoffset_t s = 0; s < nstorages(); ++s) {
    const fb::Storage* st = h->storages()->Get(s);
    add_padding(cursor, st->offset());
    // An empty storage has no chunk hashes (and may have no vector).
    const auto* hashes = st->chunk_hashes();
    for (uoffset_t c = 0; hashes && c < hashes->size(); ++c) {
      uint64_t off = uint64_t{c} * chunk;
      tasks.push_back({st->offset() + off, std::min(chunk, st->nbytes() - off),
                       s, c, hashes->Get(c)});
    }
    cursor = st->offset() + st->nbytes();
  }
  add_padding(cursor, pre.header_offset);

  // Tasks are in offset order, so the lowest failing index is the problem
  // at the lowest byte offset.
  Status first = ParallelFor(tasks.size(), threads, [&](size_t i) -> Status {
    const Task& t = tasks[i];
    // Copied with pread (ReadInto), never read through the mapping: a file
    // truncated while it is verified is an I/O error naming the offset,
    // not a SIGBUS. In 256 KiB pieces into one per-thread buffer, which
    // stays in cache, so the copy costs little next to the hash.
    constexpr size_t kPiece = 256 << 10;
    thread_local std::vector<std::byte> buf(kPiece);
    Xxh3Stream hash;
    for (uint64_t done = 0; done < t.len; done += kPiece) {
      const size_t n =
          static_cast<size_t>(std::min<uint64_t>(kPiece, t.len - done));
      std::span<std::byte> bytes(buf.data(), n);
      CKPT_RETURN_IF_ERROR(source->ReadInto(t.offset + done, bytes));
      if (t.storage >= 0) {
        hash.Update(bytes);
        continue;
      }
      auto it = std::find_if(bytes.begin(), bytes.end(),
                             [](std::byte b) { return b != std::byte{0}; });
      if (it != bytes.end()) {
        return Corrupt("padding byte is not zero")
            .WithOffset(static_cast<int64_t>(
                t.offset + done + static_cast<uint64_t>(it - bytes.begin())));
      }
    }
    if (t.storage < 0) return Status::OK();
    uint64_t got = hash.Digest();
    if (got != t.hash) {
      return ChecksumMismatch(
                 "chunk " + std::to_string(t.chunk) + " of storage " +
                 std::to_string(t.storage) + " ([" + std::to_string(t.offset) +
                 ", +" + std::to_string(t.len) + ")): stored " +
                 HashToHex(t.hash) + ", computed " + HashToHex(got))
          .WithOffset(static_cast<int64_t>(t.offset));
    }
    return Status::OK();
  });
  if (first.ok()) return first;
  // Name the tensors that view the damaged chunk.
  if (first.code() == ErrorCode::kChecksumMismatch) {
    uint64_t off = static_cast<uint64_t>(first.offset());
    std::string names;
    int count = 0;
    for (uoffset_t i = 0; i < ntensors(); ++i) {
      TensorInfo info = Info(i);
      const fb::Storage* st = h->storages()->Get(info.storage);
      Extent e = ExtentOf(info);
      uint64_t c0 = (off - st->offset()) / chunk * chunk;
      if (off >= st->offset() && off < st->offset() + st->nbytes() &&
          e.begin < c0 + chunk && e.end > c0) {
        if (count++ < 4)
          names += (names.empty() ? "'" : ", '") + info.path + "'";
      }
    }
    if (count > 4) names += " and " + std::to_string(count - 4) + " more";
    if (count == 1) {
      first = first.WithTensor(names.substr(1, names.size() - 2));
    } else if (count > 1) {
      first = first.WithContext("tensors " + names);
    }
  }
  return first.WithFile(name());
}

}  // namespace internal

Status Checkpoint::Prefetch(unsigned threads) const {
  const auto& src = *impl_->source;
  if (!src.zero_copy()) return Status::OK();
  // 64 MiB pieces handed out in order keep every thread busy to the end.
  constexpr uint64_t kPiece = 64ull << 20;
  const uint64_t begin = impl_->pre.data_offset;
  const uint64_t end = begin + impl_->pre.data_size;
  const size_t pieces =
      static_cast<size_t>((end - begin + kPiece - 1) / kPiece);
  return internal::ParallelFor(pieces, threads, [&](size_t i) {
    uint64_t off = begin + i * kPiece;
    return src.Populate(off, std::min(kPiece, end - off));
  });
}

Status Checkpoint::Verify(const VerifyOptions& options) const {
  CKPT_RETURN_IF_ERROR(impl_->VerifyTreePaths());
  return impl_->VerifyData(options.threads);
}

// ---- CheckpointAccess (lib/reader_internal.h) -------------------------------

namespace internal {

Result<TensorRef> CheckpointAccess::StorageTensor(const Checkpoint& ck,
                                                  size_t index) {
  CKPT_ASSIGN_OR_RETURN(StorageInfo st, ck.StorageInfoAt(index));
  TensorInfo info;
  info.path = "<storage " + std::to_string(index) + ">";
  info.dtype = DType::kUInt8;
  info.shape = {static_cast<int64_t>(st.nbytes)};
  info.strides = {1};
  info.storage = static_cast<uint32_t>(index);
  info.index = SIZE_MAX;  // not a tensor of the file's table
  return ck.impl_->Ref(std::move(info));
}

Status CheckpointAccess::VerifyStorageRange(const Checkpoint& ck,
                                            size_t storage, uint64_t begin,
                                            uint64_t end,
                                            const std::string& tensor) {
  CKPT_ASSIGN_OR_RETURN(StorageInfo st, ck.StorageInfoAt(storage));
  if (begin > end || end > st.nbytes) {
    return InvalidArgument("range [" + std::to_string(begin) + ", " +
                           std::to_string(end) + ") outside storage " +
                           std::to_string(storage))
        .WithFile(ck.impl_->name());
  }
  return ck.impl_->VerifyChunks(static_cast<flatbuffers::uoffset_t>(storage),
                                begin, end, tensor);
}

Result<int> CheckpointAccess::ReopenFile(const Checkpoint& ck, int flags) {
  const int fd = ck.impl_->source->fd();
  if (fd < 0) {
    return IoError(
               "reading by descriptor needs a checkpoint opened from a "
               "file (this one is a buffer)")
        .WithFile(ck.impl_->name());
  }
  const std::string self = "/proc/self/fd/" + std::to_string(fd);
  int again = ::open(self.c_str(), flags | O_RDONLY | O_CLOEXEC);
  if (again < 0 && errno == ENOENT && (flags & ~O_CLOEXEC) == 0) {
    again = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  }
  if (again < 0) {
    return ErrnoError("cannot reopen the open file", errno)
        .WithFile(ck.impl_->name());
  }
  return again;
}

}  // namespace internal

}  // namespace ckpt
