// A read-only zip reader for torch.save archives: EOCD and zip64, central
// directory, payloads located from each local header, STORED (zero-copy)
// and DEFLATE (bounded inflate), CRC-32 checks. Every offset and size from
// the file is checked against the file size before use.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "ckpt/status.h"
#include "source_internal.h"

namespace ckpt::internal {

struct ZipEntry {
  std::string name;
  uint16_t method = 0;  // 0 stored, 8 deflate
  uint16_t flags = 0;
  uint32_t crc32 = 0;
  uint64_t compressed_size = 0;
  uint64_t size = 0;
  uint64_t local_header_offset = 0;
};

class ZipArchive {
 public:
  /// Reads the end records and the central directory. kCorrupt naming the
  /// byte offset for anything malformed; limits: 1,000,000 entries, names
  /// up to 4096 bytes and 64 MiB in all, no duplicate names. Bytes after
  /// the end record (appended by some tools; torch reads such files) are
  /// ignored: the last end record whose central directory ends where it
  /// starts is used.
  static Result<ZipArchive> Open(std::shared_ptr<ByteSource> source);

  const std::vector<ZipEntry>& entries() const { return entries_; }
  /// nullptr if absent. Constant time (hashed), so resolving every storage
  /// of a million-entry archive stays linear.
  const ZipEntry* Find(const std::string& name) const;
  /// True when every entry with data has a CRC-32 field of zero: the
  /// writer did not compute them (torch 2.x with compute_crc32=False).
  bool crc32_absent() const;

  /// Absolute offset of the entry's payload, from its local header.
  Result<uint64_t> PayloadOffset(const ZipEntry& e) const;
  /// The whole uncompressed payload: a view of the file when STORED, an
  /// inflated buffer (never larger than the declared size) when DEFLATE.
  /// Checks the CRC-32 unless `check_crc` is false.
  Result<Bytes> Read(const ZipEntry& e, bool check_crc = true) const;
  /// Inflates a DEFLATE entry in pieces of at most `piece` bytes (each a
  /// multiple of `piece`'s alignment except the last), calling `sink` for
  /// each, so memory stays bounded whatever the entry's size. Checks the
  /// total size, and the CRC-32 unless `check_crc` is false.
  Status Inflate(
      const ZipEntry& e, bool check_crc, size_t piece,
      const std::function<Status(std::span<const std::byte>)>& sink) const;

  const ByteSource& source() const { return *source_; }

 private:
  Status CheckRatio(const ZipEntry& e, uint64_t payload) const;
  std::shared_ptr<ByteSource> source_;
  std::vector<ZipEntry> entries_;
  std::unordered_map<std::string, size_t> index_;
};

/// CRC-32 (zlib) of `bytes`, continuing from `crc`.
uint32_t Crc32(uint32_t crc, std::span<const std::byte> bytes);

}  // namespace ckpt::internal
