#include "atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

namespace ckpt::internal {
namespace {

std::string DirName(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string BaseName(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace

Status AtomicFile::Error(const std::string& what, int err) const {
  return IoError(what + ": " + std::strerror(err))
      .WithFile(target_)
      .WithOffset(static_cast<int64_t>(size_));
}

Result<AtomicFile> AtomicFile::Create(const std::string& target,
                                      unsigned mode) {
  AtomicFile f;
  f.target_ = target;
  std::string base = BaseName(target);
  if (base.empty() || base == "." || base == "..") {
    return InvalidArgument("output path names a directory").WithFile(target);
  }
  struct stat st;
  if (::stat(target.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    return InvalidArgument("output path is a directory").WithFile(target);
  }
  f.temp_ = DirName(target) + "/." + base + ".tmp-XXXXXX";
  f.fd_ = ::mkstemp(f.temp_.data());
  if (f.fd_ < 0) {
    int err = errno;
    return IoError("cannot create a temporary file in '" + DirName(target) +
                   "': " + std::strerror(err))
        .WithFile(target);
  }
  // mkstemp makes 0600; give the file the mode a plain open() would.
  mode_t mask = ::umask(0);
  ::umask(mask);
  if (::fchmod(f.fd_, static_cast<mode_t>(mode) & ~mask) != 0) {
    int err = errno;
    f.Abort();
    return f.Error("cannot set permissions", err);
  }
  return f;
}

AtomicFile::AtomicFile(AtomicFile&& o) noexcept
    : target_(std::move(o.target_)),
      temp_(std::move(o.temp_)),
      fd_(std::exchange(o.fd_, -1)),
      size_(o.size_) {}

AtomicFile& AtomicFile::operator=(AtomicFile&& o) noexcept {
  if (this != &o) {
    Abort();
    target_ = std::move(o.target_);
    temp_ = std::move(o.temp_);
    fd_ = std::exchange(o.fd_, -1);
    size_ = o.size_;
  }
  return *this;
}

AtomicFile::~AtomicFile() { Abort(); }

Status AtomicFile::Write(std::span<const std::byte> bytes) {
  if (fd_ < 0) return IoError("write after close").WithFile(target_);
  const std::byte* p = bytes.data();
  size_t left = bytes.size();
  while (left > 0) {
    ssize_t n = ::write(fd_, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Error("write failed", errno);
    }
    p += n;
    left -= static_cast<size_t>(n);
    size_ += static_cast<uint64_t>(n);
  }
  return Status::OK();
}

Status AtomicFile::CopyFrom(int src_fd, uint64_t src_offset, uint64_t len,
                            bool* copied) {
  *copied = false;
  if (fd_ < 0) return IoError("write after close").WithFile(target_);
  auto in_off = static_cast<loff_t>(src_offset);
  uint64_t done = 0;
  while (done < len) {
    ssize_t n = ::copy_file_range(src_fd, &in_off, fd_, nullptr, len - done, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      // Not supported across these file systems / kernels: the caller
      // falls back to write(), provided nothing was copied yet.
      if (done == 0 && (errno == EXDEV || errno == EINVAL || errno == ENOSYS ||
                        errno == EOPNOTSUPP || errno == EBADF)) {
        return Status::OK();
      }
      return Error("copy failed", errno);
    }
    if (n == 0) return Error("copy failed: source ended early", EIO);
    done += static_cast<uint64_t>(n);
    size_ += static_cast<uint64_t>(n);
  }
  *copied = true;
  return Status::OK();
}

Status AtomicFile::WriteAt(uint64_t offset, std::span<const std::byte> bytes) {
  if (fd_ < 0) return IoError("write after close").WithFile(target_);
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::pwrite(fd_, bytes.data() + done, bytes.size() - done,
                         static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Error("write failed", errno);
    }
    done += static_cast<size_t>(n);
  }
  return Status::OK();
}

Status AtomicFile::Commit(bool sync) {
  if (fd_ < 0) return IoError("commit after close").WithFile(target_);
  if (sync && ::fsync(fd_) != 0) return Error("fsync failed", errno);
  if (::close(fd_) != 0) {
    fd_ = -1;
    int err = errno;
    ::unlink(temp_.c_str());
    return Error("close failed", err);
  }
  fd_ = -1;
  if (::rename(temp_.c_str(), target_.c_str()) != 0) {
    int err = errno;
    ::unlink(temp_.c_str());
    return Error("cannot rename the temporary file over the target", err);
  }
  temp_.clear();
  if (sync) {
    // Without this the rename itself may be lost on power failure.
    int dfd = ::open(DirName(target_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return Error("cannot open directory to fsync it", errno);
    int rc = ::fsync(dfd);
    int err = errno;
    ::close(dfd);
    if (rc != 0) return Error("directory fsync failed", err);
  }
  return Status::OK();
}

void AtomicFile::Abort() {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
  if (!temp_.empty()) {
    ::unlink(temp_.c_str());
    temp_.clear();
  }
}

}  // namespace ckpt::internal
