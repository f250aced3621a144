// The only file that includes Boost.Interprocess and catches its exceptions.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <boost/interprocess/file_mapping.hpp>
#include <boost/interprocess/mapped_region.hpp>
#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <new>

#include "bytes_internal.h"
#include "source_internal.h"

namespace ckpt::internal {
namespace bip = boost::interprocess;

namespace {

Status ErrnoStatus(const std::string& what, const std::string& path, int err) {
  return ErrnoError(what, err).WithFile(path);
}

Status PreadFull(int fd, uint64_t offset, std::span<std::byte> out,
                 const std::string& name) {
  size_t done = 0;
  while (done < out.size()) {
    ssize_t n = ::pread(fd, out.data() + done, out.size() - done,
                        static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("read failed", name, errno)
          .WithOffset(static_cast<int64_t>(offset + done));
    }
    if (n == 0) {
      return IoError("unexpected end of file (file shrank while open?)")
          .WithFile(name)
          .WithOffset(static_cast<int64_t>(offset + done));
    }
    done += static_cast<size_t>(n);
  }
  return Status::OK();
}

// A view of the mapping; the region lives as long as any Bytes from it.
class MmapSource final : public ByteSource {
 public:
  MmapSource(std::string name, uint64_t size,
             std::unique_ptr<bip::mapped_region> region, int fd)
      : ByteSource(std::move(name), size),
        region_(std::move(region)),
        fd_(fd) {}
  ~MmapSource() override { ::close(fd_); }
  int fd() const override { return fd_; }
  bool zero_copy() const override { return true; }
  Result<Bytes> DoRead(uint64_t offset, uint64_t len) const override {
    const auto* base = static_cast<const std::byte*>(region_->get_address());
    return Bytes{{base + offset, static_cast<size_t>(len)}, shared_from_this()};
  }
  Result<Bytes> DoReadWritable(uint64_t offset, uint64_t len) const override {
    if (len == 0) return DoRead(offset, len);
    // Private mappings of 1 GiB windows, made when first asked for: never
    // the whole file at once (a private writable mapping counts against
    // RAM + swap where overcommit is strict), and never one per storage
    // (64k mappings is the kernel's per-process limit, and checkpoints
    // have more tensors than that). A range that crosses a window
    // boundary gets a mapping of its own. MAP_NORESERVE: pages are charged
    // as they are written, not when mapped.
    const uint64_t first = offset / kWindow,
                   last = (offset + len - 1) / kWindow;
    const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    const uint64_t begin =
        first == last ? first * kWindow : offset / page * page;
    const uint64_t end =
        first == last ? std::min(size(), (first + 1) * kWindow) : offset + len;
    const uint64_t key = first == last ? begin : ~offset;  // windows vs. own
    std::lock_guard<std::mutex> lock(private_mu_);
    auto it = private_.find(key);
    if (it == private_.end()) {
      const uint64_t span = end - begin;
      void* p =
          ::mmap(nullptr, static_cast<size_t>(span), PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_NORESERVE, fd_, static_cast<off_t>(begin));
      if (p == MAP_FAILED) {
        return ErrnoStatus("cannot map bytes [" + std::to_string(offset) +
                               ", +" + std::to_string(len) + ") copy-on-write",
                           name(), errno)
            .WithOffset(static_cast<int64_t>(offset));
      }
      std::shared_ptr<const void> owner(p, [span](const void* q) {
        ::munmap(const_cast<void*>(q), static_cast<size_t>(span));
      });
      it = private_.emplace(key, Private{begin, std::move(owner)}).first;
    }
    const auto* base = static_cast<const std::byte*>(it->second.owner.get());
    // The view keeps the window and the source alive.
    auto keep = std::make_shared<std::pair<std::shared_ptr<const void>,
                                           std::shared_ptr<const ByteSource>>>(
        it->second.owner, shared_from_this());
    return Bytes{{base + (offset - it->second.begin), static_cast<size_t>(len)},
                 std::shared_ptr<const void>(keep, keep.get())};
  }
  Status DoReadInto(uint64_t offset, std::span<std::byte> out) const override {
    // Always through the kernel: no page fault per 4 KiB of the mapping,
    // and a file truncated under us is an error (EOF), not a SIGBUS.
    return PreadFull(fd_, offset, out, name());
  }
  Status DoPopulate(uint64_t offset, uint64_t len) const override {
    auto* base = static_cast<std::byte*>(region_->get_address());
    uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    uint64_t begin = offset / page * page;
    uint64_t end = std::min<uint64_t>(size(), offset + len);
    if (end <= begin) return Status::OK();
#ifdef MADV_POPULATE_READ
    // One call maps every page (Linux >= 5.14): no fault per page.
    if (::madvise(base + begin, end - begin, MADV_POPULATE_READ) == 0) {
      return Status::OK();
    }
    if (errno != EINVAL) {
      return ErrnoStatus("cannot populate the mapping", name(), errno)
          .WithOffset(static_cast<int64_t>(offset));
    }
#endif
    // Older kernels: fault each page in by reading one byte of it.
    volatile std::byte sink{};
    for (uint64_t o = begin; o < end; o += page) sink = base[o];
    (void)sink;
    return Status::OK();
  }

  void DoRelease(uint64_t offset, uint64_t len) const override {
    // The mapping is shared and read-only: dropping pages loses nothing.
    auto* base = static_cast<std::byte*>(region_->get_address());
    uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    uint64_t begin = (offset + page - 1) / page * page;  // whole pages only
    uint64_t end = std::min<uint64_t>(size(), offset + len) / page * page;
    if (end > begin) ::madvise(base + begin, end - begin, MADV_DONTNEED);
  }

 private:
  static constexpr uint64_t kWindow = 1ull << 30;
  struct Private {
    uint64_t begin;                     // file offset of the mapping
    std::shared_ptr<const void> owner;  // munmaps it
  };
  std::unique_ptr<bip::mapped_region> region_;
  int fd_;
  // Writable windows, kept while the source lives: every request for the
  // same bytes returns the same pages.
  mutable std::mutex private_mu_;
  mutable std::map<uint64_t, Private> private_;
};

class PreadSource final : public ByteSource {
 public:
  PreadSource(std::string name, uint64_t size, int fd)
      : ByteSource(std::move(name), size), fd_(fd) {}
  ~PreadSource() override { ::close(fd_); }
  int fd() const override { return fd_; }
  bool zero_copy() const override { return false; }
  Result<Bytes> DoRead(uint64_t offset, uint64_t len) const override {
    // 64-byte aligned so FlatBuffers alignment checks and vector loads hold.
    size_t n = static_cast<size_t>(len);
    auto* raw = new (std::align_val_t(64), std::nothrow) std::byte[n ? n : 1];
    if (!raw) {
      return ResourceExhausted("cannot allocate " + std::to_string(len) +
                               " bytes to read into (the pread backend copies "
                               "what it reads; the mmap backend does not)")
          .WithFile(name())
          .WithOffset(static_cast<int64_t>(offset));
    }
    std::shared_ptr<std::byte[]> buf(raw, [](std::byte* p) {
      ::operator delete[](p, std::align_val_t(64));
    });
    CKPT_RETURN_IF_ERROR(PreadFull(fd_, offset, {buf.get(), n}, name()));
    return Bytes{{buf.get(), n}, buf};
  }
  Status DoReadInto(uint64_t offset, std::span<std::byte> out) const override {
    return PreadFull(fd_, offset, out, name());
  }

 private:
  int fd_;
};

class BorrowedSource final : public ByteSource {
 public:
  BorrowedSource(std::span<const std::byte> bytes, std::string name)
      : ByteSource(std::move(name), bytes.size()), bytes_(bytes) {}
  bool zero_copy() const override { return true; }
  Result<Bytes> DoRead(uint64_t offset, uint64_t len) const override {
    return Bytes{bytes_.subspan(offset, len), shared_from_this()};
  }
  Status DoReadInto(uint64_t offset, std::span<std::byte> out) const override {
    std::memcpy(out.data(), bytes_.data() + offset, out.size());
    return Status::OK();
  }

 private:
  std::span<const std::byte> bytes_;
};

}  // namespace

Status ByteSource::CheckRange(uint64_t offset, uint64_t len) const {
  if (RangeWithin(offset, len, size_)) return Status::OK();
  return Corrupt("bytes [" + std::to_string(offset) + ", +" +
                 std::to_string(len) + ") lie past the end of the file (" +
                 std::to_string(size_) + " bytes)")
      .WithFile(name_)
      .WithOffset(static_cast<int64_t>(std::min<uint64_t>(offset, INT64_MAX)));
}

Result<std::shared_ptr<ByteSource>> OpenSource(const std::string& path,
                                               const SourceOptions& options) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus("cannot open", path, errno);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return ErrnoStatus("cannot stat", path, err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return IoError("not a regular file").WithFile(path);
  }
  auto size = static_cast<uint64_t>(st.st_size);
  if (options.pread || size == 0) {
    // An empty file cannot be mapped; the pread source reports it as too
    // short like any other truncated file.
    return std::shared_ptr<ByteSource>(
        std::make_shared<PreadSource>(path, size, fd));
  }
  // The descriptor stays open beside the mapping for pread copies; both
  // must name one inode (the path could be renamed over in between).
  try {
    bip::file_mapping file(path.c_str(), bip::read_only);
    struct stat mapped;
    if (::fstat(file.get_mapping_handle().handle, &mapped) != 0 ||
        mapped.st_ino != st.st_ino || mapped.st_dev != st.st_dev) {
      ::close(fd);
      return IoError("file replaced while being opened").WithFile(path);
    }
    // Always read-only and shared: it costs no commit charge, so files
    // larger than RAM + swap open. Writable views come from ReadWritable.
    int flags = options.populate ? MAP_POPULATE : 0;
    auto region = std::make_unique<bip::mapped_region>(
        file, bip::read_only, 0, static_cast<size_t>(size), nullptr, flags);
    // The file may have changed between fstat and mapping; trust the map.
    if (region->get_size() != size) {
      ::close(fd);
      return IoError("file changed size while being opened").WithFile(path);
    }
    return std::shared_ptr<ByteSource>(
        std::make_shared<MmapSource>(path, size, std::move(region), fd));
  } catch (const bip::interprocess_exception& e) {
    ::close(fd);
    return IoError(std::string("cannot map: ") + e.what()).WithFile(path);
  }
}

std::shared_ptr<ByteSource> BufferSource(std::span<const std::byte> bytes,
                                         std::string name) {
  return std::make_shared<BorrowedSource>(bytes, std::move(name));
}

}  // namespace ckpt::internal
