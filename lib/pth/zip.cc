#include <zlib.h>

#include <algorithm>
#include <cstring>

#include "bytes_internal.h"
#include "zip_internal.h"

namespace ckpt::internal {
namespace {

constexpr uint32_t kEocdSig = 0x06054b50;
constexpr uint32_t kZip64EocdSig = 0x06064b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr uint32_t kCentralSig = 0x02014b50;
constexpr uint32_t kLocalSig = 0x04034b50;
constexpr size_t kEocdBytes = 22;
constexpr size_t kMaxComment = 65535;
constexpr size_t kMaxEntries = 1000000;
constexpr size_t kMaxNameBytes = 4096;
constexpr uint64_t kMaxAllNameBytes = 64ull << 20;

Status Bad(const ByteSource& src, uint64_t offset, std::string msg) {
  return Corrupt("zip: " + std::move(msg))
      .WithFile(src.name())
      .WithOffset(static_cast<int64_t>(offset));
}

}  // namespace

uint32_t Crc32(uint32_t crc, std::span<const std::byte> bytes) {
  const auto* p = reinterpret_cast<const Bytef*>(bytes.data());
  size_t left = bytes.size();
  while (left > 0) {
    auto n = static_cast<uInt>(std::min<size_t>(left, 1u << 30));
    crc = static_cast<uint32_t>(::crc32(crc, p, n));
    p += n;
    left -= n;
  }
  return crc;
}

namespace {

// Where the central directory is, from one candidate end record.
struct EndRecord {
  uint64_t eocd = 0;
  uint64_t count = 0, cd_size = 0, cd_offset = 0;
  uint64_t cd_end = 0;  // where the directory must end: the end record or
                        // the zip64 end record
};

Result<EndRecord> ReadEndRecord(const ByteSource& src, uint64_t eocd,
                                const std::byte* e) {
  EndRecord r;
  r.eocd = eocd;
  r.cd_end = eocd;
  r.count = LoadLE(e + 10, 2);
  r.cd_size = LoadLE(e + 12, 4);
  r.cd_offset = LoadLE(e + 16, 4);
  // zip64: torch always writes the locator; follow it when present.
  if (eocd >= 20) {
    CKPT_ASSIGN_OR_RETURN(Bytes loc, src.Read(eocd - 20, 20));
    if (LoadLE(loc.data.data(), 4) == kZip64LocatorSig) {
      uint64_t z64 = LoadLE(loc.data.data() + 8, 8);
      if (!RangeWithin(z64, 56, src.size())) {
        return Bad(src, eocd - 20, "zip64 end record offset outside the file");
      }
      CKPT_ASSIGN_OR_RETURN(Bytes rec, src.Read(z64, 56));
      if (LoadLE(rec.data.data(), 4) != kZip64EocdSig) {
        return Bad(src, z64, "bad zip64 end-of-central-directory signature");
      }
      r.count = LoadLE(rec.data.data() + 32, 8);
      r.cd_size = LoadLE(rec.data.data() + 40, 8);
      r.cd_offset = LoadLE(rec.data.data() + 48, 8);
      r.cd_end = z64;
      return r;
    }
  }
  if (r.count == 0xFFFF || r.cd_size == 0xFFFFFFFF ||
      r.cd_offset == 0xFFFFFFFF) {
    return Bad(src, eocd, "saturated end record without a zip64 locator");
  }
  return r;
}

// 1. End of central directory: scan back over the comment area. The
// record normally ends the file; when bytes were appended after it (torch
// still reads such files), take the last record whose central directory
// ends exactly where the record (or its zip64 record) starts, so a stray
// signature in the appended bytes is not mistaken for it.
Result<EndRecord> FindEndRecord(const ByteSource& src) {
  const uint64_t size = src.size();
  uint64_t tail_len = std::min<uint64_t>(size, kEocdBytes + kMaxComment);
  CKPT_ASSIGN_OR_RETURN(Bytes tail, src.Read(size - tail_len, tail_len));
  Status first_error;  // of the candidate closest to the end
  for (int64_t i = static_cast<int64_t>(tail_len - kEocdBytes); i >= 0; --i) {
    const std::byte* p = tail.data.data() + i;
    if (LoadLE(p, 4) != kEocdSig) continue;
    const uint64_t rec_end =
        static_cast<uint64_t>(i) + kEocdBytes + LoadLE(p + 20, 2);
    if (rec_end > tail_len) continue;
    const bool exact = rec_end == tail_len;
    const uint64_t eocd = size - tail_len + static_cast<uint64_t>(i);
    auto r = ReadEndRecord(src, eocd, p);
    if (!r.ok()) {
      if (first_error.ok()) first_error = r.status();
      continue;
    }
    const bool in_file = RangeWithin(r->cd_offset, r->cd_size, size) &&
                         RangeWithin(r->cd_offset, r->cd_size, r->cd_end);
    if (exact && in_file) return *r;
    if (in_file && r->cd_offset + r->cd_size == r->cd_end) {
      return *r;  // a consistent record followed by appended bytes
    }
    if (first_error.ok()) {
      first_error =
          Bad(src, eocd,
              "central directory [" + std::to_string(r->cd_offset) + ", +" +
                  std::to_string(r->cd_size) + ") outside the file");
    }
  }
  if (!first_error.ok()) return first_error;
  return Bad(src, size, "no end-of-central-directory record (truncated?)");
}

// The zip64 extra field (id 1) of the entry at `at`: only the saturated
// fields, in order.
Status ReadZip64Extra(const ByteSource& src, uint64_t at,
                      std::span<const std::byte> extra, ZipEntry* ent) {
  const std::byte* x = extra.data();
  const uint64_t extra_len = extra.size();
  uint64_t xpos = 0;
  while (xpos + 4 <= extra_len) {
    uint64_t id = LoadLE(x + xpos, 2), len = LoadLE(x + xpos + 2, 2);
    if (!RangeWithin(xpos + 4, len, extra_len))
      return Bad(src, at, "extra field overruns its entry");
    if (id == 1) {
      const std::byte* v = x + xpos + 4;
      uint64_t vlen = len;
      auto take = [&](uint64_t* field) -> bool {
        if (*field != 0xFFFFFFFF) return true;
        if (vlen < 8) return false;
        *field = LoadLE(v, 8);
        v += 8;
        vlen -= 8;
        return true;
      };
      if (!take(&ent->size) || !take(&ent->compressed_size) ||
          !take(&ent->local_header_offset)) {
        return Bad(src, at, "zip64 extra field too short");
      }
    }
    xpos += 4 + len;
  }
  return Status::OK();
}

// The central directory entry at `pos` of `cd` (which starts at file offset
// `cd_offset`) into `ent`; returns the entry's length. `name_bytes` sums
// the names read so far.
Result<uint64_t> ReadCentralEntry(const ByteSource& src,
                                  std::span<const std::byte> cd,
                                  uint64_t cd_offset, uint64_t pos,
                                  uint64_t* name_bytes, ZipEntry* ent) {
  const uint64_t at = cd_offset + pos;
  if (cd.size() - pos < 46) return Bad(src, at, "central directory truncated");
  const std::byte* c = cd.data() + pos;
  if (LoadLE(c, 4) != kCentralSig)
    return Bad(src, at, "bad central directory signature");
  ent->flags = static_cast<uint16_t>(LoadLE(c + 8, 2));
  ent->method = static_cast<uint16_t>(LoadLE(c + 10, 2));
  ent->crc32 = static_cast<uint32_t>(LoadLE(c + 16, 4));
  ent->compressed_size = LoadLE(c + 20, 4);
  ent->size = LoadLE(c + 24, 4);
  uint64_t name_len = LoadLE(c + 28, 2), extra_len = LoadLE(c + 30, 2),
           comment_len = LoadLE(c + 32, 2);
  ent->local_header_offset = LoadLE(c + 42, 4);
  uint64_t rec = 46 + name_len + extra_len + comment_len;
  if (cd.size() - pos < rec)
    return Bad(src, at, "central directory entry truncated");
  if (name_len > kMaxNameBytes) return Bad(src, at, "entry name too long");
  *name_bytes += name_len;
  if (*name_bytes > kMaxAllNameBytes) {
    return Bad(src, at,
               "entry names exceed " + std::to_string(kMaxAllNameBytes) +
                   " bytes in all (limit)");
  }
  ent->name.assign(reinterpret_cast<const char*>(c + 46), name_len);
  CKPT_RETURN_IF_ERROR(ReadZip64Extra(
      src, at, {c + 46 + name_len, static_cast<size_t>(extra_len)}, ent));
  return rec;
}

}  // namespace

Result<ZipArchive> ZipArchive::Open(std::shared_ptr<ByteSource> source) {
  const ByteSource& src = *source;
  if (src.size() < kEocdBytes)
    return Bad(src, 0, "file too short for a zip archive");
  CKPT_ASSIGN_OR_RETURN(EndRecord end, FindEndRecord(src));
  if (end.count > kMaxEntries) {
    return Bad(src, end.eocd,
               std::to_string(end.count) + " entries (limit " +
                   std::to_string(kMaxEntries) + ")");
  }
  // The central directory.
  CKPT_ASSIGN_OR_RETURN(Bytes cd, src.Read(end.cd_offset, end.cd_size));
  ZipArchive z;
  z.source_ = std::move(source);
  z.entries_.reserve(static_cast<size_t>(end.count));
  uint64_t pos = 0, name_bytes = 0;
  for (uint64_t i = 0; i < end.count; ++i) {
    ZipEntry ent;
    CKPT_ASSIGN_OR_RETURN(
        uint64_t rec,
        ReadCentralEntry(src, cd.data, end.cd_offset, pos, &name_bytes, &ent));
    if (!z.index_.emplace(ent.name, z.entries_.size()).second) {
      return Bad(src, end.cd_offset + pos,
                 "duplicate entry '" + ent.name + "'");
    }
    if (!RangeWithin(ent.local_header_offset, 30, src.size())) {
      return Bad(src, end.cd_offset + pos,
                 "entry '" + ent.name + "': local header outside the file");
    }
    z.entries_.push_back(std::move(ent));
    pos += rec;
  }
  return z;
}

const ZipEntry* ZipArchive::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &entries_[it->second];
}

bool ZipArchive::crc32_absent() const {
  bool any = false;
  for (const auto& e : entries_) {
    if (e.size == 0) continue;  // the CRC-32 of no bytes is zero anyway
    if (e.crc32 != 0) return false;
    any = true;
  }
  return any;
}

Result<uint64_t> ZipArchive::PayloadOffset(const ZipEntry& e) const {
  const ByteSource& src = *source_;
  CKPT_ASSIGN_OR_RETURN(Bytes h, src.Read(e.local_header_offset, 30));
  const std::byte* p = h.data.data();
  if (LoadLE(p, 4) != kLocalSig) {
    return Bad(src, e.local_header_offset,
               "entry '" + e.name + "': bad local header signature");
  }
  uint64_t name_len = LoadLE(p + 26, 2), extra_len = LoadLE(p + 28, 2);
  uint64_t payload = e.local_header_offset + 30 + name_len + extra_len;
  if (!RangeWithin(e.local_header_offset + 30, name_len, src.size())) {
    return Bad(src, e.local_header_offset,
               "entry '" + e.name + "': truncated local header");
  }
  CKPT_ASSIGN_OR_RETURN(Bytes n,
                        src.Read(e.local_header_offset + 30, name_len));
  if (std::string_view(reinterpret_cast<const char*>(n.data.data()),
                       name_len) != e.name) {
    return Bad(src, e.local_header_offset,
               "entry '" + e.name +
                   "': local name differs from the central directory");
  }
  if (!RangeWithin(payload, e.compressed_size, src.size())) {
    return Bad(src, payload,
               "entry '" + e.name + "': payload of " +
                   std::to_string(e.compressed_size) +
                   " bytes runs past the end of the file (truncated?)");
  }
  return payload;
}

Result<Bytes> ZipArchive::Read(const ZipEntry& e, bool check_crc) const {
  const ByteSource& src = *source_;
  if (e.flags & 1)
    return Bad(src, e.local_header_offset,
               "entry '" + e.name + "' is encrypted");
  CKPT_ASSIGN_OR_RETURN(uint64_t payload, PayloadOffset(e));
  Bytes out;
  if (e.method == 0) {
    if (e.compressed_size != e.size) {
      return Bad(src, payload,
                 "stored entry '" + e.name + "' with different sizes");
    }
    CKPT_ASSIGN_OR_RETURN(out, src.Read(payload, e.size));
  } else if (e.method == 8) {
    CKPT_RETURN_IF_ERROR(CheckRatio(e, payload));  // before sizing the buffer
    auto buf = std::shared_ptr<std::byte[]>(new std::byte[e.size ? e.size : 1]);
    uint64_t filled = 0;
    CKPT_RETURN_IF_ERROR(
        Inflate(e, false, static_cast<size_t>(std::max<uint64_t>(e.size, 1)),
                [&](std::span<const std::byte> piece) {
                  std::memcpy(buf.get() + filled, piece.data(), piece.size());
                  filled += piece.size();
                  return Status::OK();
                }));
    out.data = {buf.get(), static_cast<size_t>(e.size)};
    out.owner = buf;
  } else {
    return Bad(src, e.local_header_offset,
               "entry '" + e.name + "' uses compression method " +
                   std::to_string(e.method) +
                   " (only stored and deflate are supported)");
  }
  if (check_crc) {
    uint32_t crc = Crc32(0, out.data);
    if (crc != e.crc32) {
      return ChecksumMismatch("zip: entry '" + e.name + "': CRC-32 mismatch")
          .WithFile(src.name())
          .WithOffset(static_cast<int64_t>(payload));
    }
  }
  return out;
}

// DEFLATE cannot expand more than 1032:1: a larger declared size is a lie
// (a zip bomb) and must not size an allocation or drive the output.
Status ZipArchive::CheckRatio(const ZipEntry& e, uint64_t payload) const {
  if (e.size / 1032 > e.compressed_size + 1) {
    return Bad(*source_, payload,
               "entry '" + e.name + "' claims " + std::to_string(e.size) +
                   " bytes from " + std::to_string(e.compressed_size) +
                   " compressed: impossible ratio");
  }
  return Status::OK();
}

Status ZipArchive::Inflate(
    const ZipEntry& e, bool check_crc, size_t piece,
    const std::function<Status(std::span<const std::byte>)>& sink) const {
  const ByteSource& src = *source_;
  if (e.method != 8)
    return Bad(src, e.local_header_offset,
               "entry '" + e.name + "' is not deflated");
  if (e.flags & 1)
    return Bad(src, e.local_header_offset,
               "entry '" + e.name + "' is encrypted");
  CKPT_ASSIGN_OR_RETURN(uint64_t payload, PayloadOffset(e));
  CKPT_RETURN_IF_ERROR(CheckRatio(e, payload));
  CKPT_ASSIGN_OR_RETURN(Bytes in, src.Read(payload, e.compressed_size));
  std::vector<std::byte> buf(
      std::min<uint64_t>(piece, std::max<uint64_t>(e.size, 1)));
  z_stream zs{};
  if (inflateInit2(&zs, -MAX_WBITS) != Z_OK) {
    return IoError("zlib: inflateInit2 failed").WithFile(src.name());
  }
  struct End {
    z_stream* z;
    ~End() { inflateEnd(z); }
  } end{&zs};
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data.data()));
  uint64_t in_left = e.compressed_size, produced = 0, released = 0;
  uint32_t crc = 0;
  size_t fill = 0;
  int rc = Z_OK;
  auto corrupt = [&] {
    return Bad(src, payload,
               "entry '" + e.name + "': deflate data is corrupt or does not " +
                   "inflate to its declared " + std::to_string(e.size) +
                   " bytes");
  };
  while (rc != Z_STREAM_END) {
    auto ni = static_cast<uInt>(std::min<uint64_t>(in_left, 1u << 30));
    // Never let zlib write past the declared size.
    uint64_t room = std::min<uint64_t>(buf.size() - fill, e.size - produced);
    if (room == 0 && produced == e.size) {
      // Declared size reached: the stream must end with no more output.
      std::byte probe{};
      zs.next_out = reinterpret_cast<Bytef*>(&probe);
      zs.avail_out = 1;
      zs.avail_in = ni;
      rc = inflate(&zs, Z_NO_FLUSH);
      if (rc != Z_STREAM_END || zs.avail_out != 1) return corrupt();
      break;
    }
    zs.next_out = reinterpret_cast<Bytef*>(buf.data() + fill);
    zs.avail_out = static_cast<uInt>(room);
    zs.avail_in = ni;
    rc = inflate(&zs, Z_NO_FLUSH);
    if (rc != Z_OK && rc != Z_STREAM_END) return corrupt();
    size_t got = static_cast<size_t>(room - zs.avail_out);
    in_left -= ni - zs.avail_in;
    if (got == 0 && ni - zs.avail_in == 0 && rc != Z_STREAM_END)
      return corrupt();  // stuck
    fill += got;
    produced += got;
    if (fill == buf.size() || rc == Z_STREAM_END) {
      std::span<const std::byte> out(buf.data(), fill);
      if (check_crc) crc = Crc32(crc, out);
      if (fill) CKPT_RETURN_IF_ERROR(sink(out));
      fill = 0;
      // Drop the compressed input consumed so far from the mapping, so a
      // huge entry does not stay resident in this process.
      uint64_t consumed = e.compressed_size - in_left;
      src.Release(payload + released, consumed - released);
      released = consumed;
    }
  }
  if (produced != e.size) return corrupt();
  if (check_crc && crc != e.crc32) {
    return ChecksumMismatch("zip: entry '" + e.name + "': CRC-32 mismatch")
        .WithFile(src.name())
        .WithOffset(static_cast<int64_t>(payload));
  }
  return Status::OK();
}

}  // namespace ckpt::internal
