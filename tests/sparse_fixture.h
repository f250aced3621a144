// A sparse checkpoint of any size for tests of files larger than memory:
// a real header over data never written (holes read as zeros). Shared by
// tests/hardening_test.cc and tests/tools/make_fixture.cc.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "craft.h"

namespace ckpt::test {

// A sparse file of float32 tensors "t0", "t1"... of `sizes` bytes: a real
// header over data that was never written (holes read as zeros). Checksums of
// the data are not valid; Open does not read them.
inline Status WriteSparse(const std::string& path,
                          const std::vector<uint64_t>& sizes) {
  const int n = static_cast<int>(sizes.size());
  // Build the header with the writer over tiny storages, then move the
  // storages apart and re-seal.
  std::vector<std::byte> small;
  {
    CKPT_ASSIGN_OR_RETURN(Writer w, Writer::Create(path, Fast()));
    std::vector<float> v(1024, 0.0f);
    for (int i = 0; i < n; ++i) {
      CKPT_RETURN_IF_ERROR(w.PutTensor("t" + std::to_string(i), DType::kFloat32,
                                       {1024}, Bytes(v)));
    }
    CKPT_RETURN_IF_ERROR(w.Commit());
    small = ReadAll(path);
  }
  uint64_t hoff = GetU64(small, internal::kOffHeaderOffset);
  auto* h =
      fb::GetHeader(reinterpret_cast<const uint8_t*>(small.data() + hoff));
  fb::HeaderT obj;
  h->UnPackTo(&obj);
  const uint64_t data_offset = GetU64(small, internal::kOffDataOffset);
  const uint64_t chunk = obj.chunk_size;
  uint64_t at = data_offset;
  if (obj.storages.size() != sizes.size())
    return InvalidArgument("storage count");
  for (size_t i = 0; i < sizes.size(); ++i) {
    auto& st = obj.storages[i];
    st->offset = at;
    st->nbytes = sizes[i];
    st->chunk_hashes.assign((sizes[i] + chunk - 1) / chunk, 0);
    at += sizes[i];
  }
  // Tensors are sorted by path; each views its own storage.
  for (auto& t : obj.tensors) {
    t->shape = {static_cast<int64_t>(sizes[t->storage] / 4)};
  }
  flatbuffers::FlatBufferBuilder fbb;
  fb::FinishHeaderBuffer(fbb, fb::Header::Pack(fbb, &obj));
  internal::Preamble pre;
  pre.major = kFormatMajor;
  pre.minor = kFormatMinor;
  pre.data_offset = data_offset;
  pre.data_size = at - data_offset;
  pre.header_offset = at;
  pre.header_size = fbb.GetSize();
  auto* hb = reinterpret_cast<const std::byte*>(fbb.GetBufferPointer());
  pre.header_hash = internal::Xxh3({hb, static_cast<size_t>(fbb.GetSize())});
  auto preamble = internal::EncodePreamble(pre);
  int fd = ::open(path.c_str(), O_WRONLY | O_TRUNC);
  if (fd < 0) return IoError("cannot open " + path);
  bool ok = ::pwrite(fd, preamble.data(), preamble.size(), 0) == 64 &&
            ::pwrite(fd, hb, fbb.GetSize(), static_cast<off_t>(at)) ==
                static_cast<ssize_t>(fbb.GetSize());
  ::close(fd);
  return ok ? Status::OK() : IoError("cannot write " + path);
}

}  // namespace ckpt::test
