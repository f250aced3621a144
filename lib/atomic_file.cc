#include "atomic_file.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <set>
#include <string_view>
#include <utility>

namespace ckpt::internal {
namespace {

constexpr size_t kRandomChars = 6;
// Symlink hops followed before giving up, as the kernel does (ELOOP).
constexpr int kMaxLinkHops = 40;

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

std::string RandomSuffix() {
  static constexpr char kAlphabet[] =
      "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  unsigned char r[kRandomChars];
  if (::getrandom(r, sizeof r, GRND_NONBLOCK) !=
      static_cast<ssize_t>(sizeof r)) {
    // No entropy yet (early boot): pid and clock are unique enough, since
    // every use is an O_EXCL create or link that retries on a clash.
    timespec ts{};
    ::clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t x = static_cast<uint64_t>(ts.tv_nsec) ^
                 (static_cast<uint64_t>(::getpid()) << 32);
    for (auto& b : r) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      b = static_cast<unsigned char>(x >> 56);
    }
  }
  std::string out(kRandomChars, 'x');
  for (size_t i = 0; i < kRandomChars; ++i) out[i] = kAlphabet[r[i] % 62];
  return out;
}

// The path a write to `target` must replace: the target itself, or, when
// it is a symlink (chain), the file the links lead to, which may not exist
// yet. torch.save writes through links the same way.
Result<std::string> ResolveLinks(const std::string& target) {
  std::string path = target;
  for (int hop = 0; hop < kMaxLinkHops; ++hop) {
    struct stat st;
    if (::lstat(path.c_str(), &st) != 0) {
      if (errno == ENOENT) return path;
      return IoError(std::string("cannot inspect the output path: ") +
                     std::strerror(errno))
          .WithErrno(errno)
          .WithFile(target);
    }
    if (!S_ISLNK(st.st_mode)) return path;
    char buf[PATH_MAX];
    ssize_t n = ::readlink(path.c_str(), buf, sizeof buf);
    if (n < 0 || static_cast<size_t>(n) >= sizeof buf) {
      int err = n < 0 ? errno : ENAMETOOLONG;
      return IoError("cannot read the symlink '" + path +
                     "': " + std::strerror(err))
          .WithErrno(err)
          .WithFile(target);
    }
    std::string link(buf, static_cast<size_t>(n));
    path = link[0] == '/' ? link : DirName(path) + "/" + link;
  }
  return IoError("too many levels of symlinks")
      .WithErrno(ELOOP)
      .WithFile(target);
}

// Named temporaries this process is writing. flock() is per open file on
// local file systems, but NFS emulates it with POSIX locks, which belong
// to the process: a sweep from another thread would then get the lock of
// a live temporary (and, closing its descriptor, drop it). Sweeps skip
// the names listed here.
std::mutex g_live_mu;
std::set<std::string>& LiveTemporaries() {
  static auto* live = new std::set<std::string>();
  return *live;
}
void SetLive(const std::string& path, bool live) {
  std::lock_guard<std::mutex> lock(g_live_mu);
  if (live) {
    LiveTemporaries().insert(path);
  } else {
    LiveTemporaries().erase(path);
  }
}
bool IsLive(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_live_mu);
  return LiveTemporaries().count(path) > 0;
}

// True when `fd` and `path` name the same inode (a name can be unlinked or
// replaced by another process between two calls).
bool SameFile(int fd, const std::string& path) {
  struct stat a, b;
  return ::fstat(fd, &a) == 0 && ::lstat(path.c_str(), &b) == 0 &&
         a.st_ino == b.st_ino && a.st_dev == b.st_dev;
}

// Removes named temporaries of one target whose writer is gone: a live
// writer holds an exclusive flock() on its temporary from creation to
// commit, so a lock we can take belongs to nobody. Best effort: a failure
// only leaves the file for the next sweep.
void SweepStale(const std::string& dir, const std::string& prefix) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) return;
  while (dirent* e = ::readdir(d)) {
    std::string_view name = e->d_name;
    if (name.size() != prefix.size() + kRandomChars ||
        name.substr(0, prefix.size()) != prefix) {
      continue;
    }
    std::string path = dir + "/" + std::string(name);
    if (IsLive(path)) continue;
    int fd =
        ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    if (fd < 0) continue;
    struct stat st;
    if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
        ::flock(fd, LOCK_EX | LOCK_NB) == 0 && SameFile(fd, path)) {
      ::unlink(path.c_str());
    }
    ::close(fd);
  }
  ::closedir(d);
}

// An O_TMPFILE inode can be given a name through /proc/self/fd (or by
// linkat(AT_EMPTY_PATH), which needs CAP_DAC_READ_SEARCH - root in a user
// namespace may lack it). Without /proc, the named temporary is used
// rather than finding out at commit, after all the bytes are written.
bool CanLinkUnnamed() { return ::access("/proc/self/fd", X_OK) == 0; }

}  // namespace

std::string AtomicFile::TempPrefix(const std::string& base) {
  // "." + base + ".tmp-ckpt" + random must fit one directory entry. The
  // "ckpt" marker keeps sweeps away from a user's own ".x.tmp-backup".
  constexpr std::string_view kMarker = ".tmp-ckpt";
  constexpr size_t kMaxBase = NAME_MAX - 1 - kMarker.size() - kRandomChars;
  size_t n = std::min(base.size(), kMaxBase);
  // Cut at a UTF-8 character boundary (file systems that enforce UTF-8
  // names would refuse half a character).
  while (n < base.size() && n > 0 &&
         (static_cast<unsigned char>(base[n]) & 0xC0) == 0x80)
    --n;
  return "." + base.substr(0, n) + std::string(kMarker);
}

// Output errors are kIoError whatever errno says (a missing directory is
// not a missing input), with the errno kept for callers testing ENOSPC.
Status WriteError(const std::string& what, int err) {
  return IoError(what + ": " + std::strerror(err)).WithErrno(err);
}

Status AtomicFile::Error(const std::string& what, int err) const {
  return Error(what, err, size_);
}

Status AtomicFile::Error(const std::string& what, int err,
                         uint64_t offset) const {
  return WriteError(what, err).WithFile(target_).WithOffset(
      static_cast<int64_t>(offset));
}

Status AtomicFile::OpenNamed(const std::string& dir, const std::string& prefix,
                             unsigned mode) {
  for (int attempt = 0; attempt < 100; ++attempt) {
    std::string name = dir + "/" + prefix + RandomSuffix();
    // open() applies the umask itself: no process-wide umask() dance.
    int fd = ::open(name.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC,
                    static_cast<mode_t>(mode));
    if (fd < 0) {
      if (errno == EEXIST) continue;
      return WriteError("cannot create a temporary file in '" + dir + "'",
                        errno)
          .WithFile(target_);
    }
    // A sweep by another writer may take the file between open and flock:
    // then the name no longer names our inode, and we start again.
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0 || !SameFile(fd, name)) {
      ::close(fd);
      continue;
    }
    fd_ = fd;
    temp_ = std::move(name);
    SetLive(temp_, true);
    return Status::OK();
  }
  return IoError("cannot create a temporary file in '" + dir +
                 "': every name tried was taken")
      .WithFile(target_);
}

Result<AtomicFile> AtomicFile::Create(const std::string& target, unsigned mode,
                                      bool allow_tmpfile) {
  AtomicFile f;
  f.target_ = target;
  std::string base = BaseName(target);
  if (base.empty() || base == "." || base == "..") {
    return InvalidArgument("output path names a directory").WithFile(target);
  }
  struct stat st;
  bool keep_mode = false;
  // What the path leads to, links followed (/dev/stdout's magic link too):
  // replacing a device, FIFO or socket by a regular file would destroy it
  // (as root, /dev/null), and writing into one is not atomic.
  if (::stat(target.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) {
      return InvalidArgument("output path is a directory").WithFile(target);
    }
    if (!S_ISREG(st.st_mode)) {
      return InvalidArgument(
                 "output path is not a regular file (a device, FIFO or "
                 "socket): ckpt publishes files by atomic rename; write to a "
                 "file, or pass a file object to ckpt.save")
          .WithFile(target);
    }
    keep_mode = true;
  }
  CKPT_ASSIGN_OR_RETURN(f.final_, ResolveLinks(target));
  const std::string dir = DirName(f.final_);
  const std::string prefix = TempPrefix(BaseName(f.final_));
  SweepStale(dir, prefix);
  if (allow_tmpfile && CanLinkUnnamed()) {
    // Unsupported file systems say EOPNOTSUPP/EISDIR/EINVAL; any other
    // failure is reported by the named path below, which hits it too.
    int fd = ::open(dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC,
                    static_cast<mode_t>(mode));
    // Locked like a named temporary: at commit it gets a name (Publish)
    // for an instant, which a concurrent save's sweep must leave alone.
    if (fd >= 0 && ::flock(fd, LOCK_EX | LOCK_NB) == 0) {
      f.fd_ = fd;
      f.unnamed_ = true;
    } else if (fd >= 0) {
      ::close(fd);
    }
  }
  if (!f.unnamed_) CKPT_RETURN_IF_ERROR(f.OpenNamed(dir, prefix, mode));
  // Re-saving keeps the file's permissions, as writing it in place would
  // (not setuid/setgid/sticky: the new file belongs to whoever saves).
  if (keep_mode && ::fchmod(f.fd_, st.st_mode & 0777) != 0) {
    int err = errno;
    f.Abort();
    return f.Error("cannot set permissions", err);
  }
  return f;
}

AtomicFile::AtomicFile(AtomicFile&& o) noexcept
    : target_(std::move(o.target_)),
      final_(std::move(o.final_)),
      temp_(std::move(o.temp_)),
      fd_(std::exchange(o.fd_, -1)),
      unnamed_(o.unnamed_),
      size_(o.size_) {}

AtomicFile& AtomicFile::operator=(AtomicFile&& o) noexcept {
  if (this != &o) {
    Abort();
    target_ = std::move(o.target_);
    final_ = std::move(o.final_);
    temp_ = std::move(o.temp_);
    fd_ = std::exchange(o.fd_, -1);
    unnamed_ = o.unnamed_;
    size_ = o.size_;
  }
  return *this;
}

AtomicFile::~AtomicFile() { Abort(); }

Status AtomicFile::Write(std::span<const std::byte> bytes) {
  // pwrite at the end this object tracks, never the descriptor's offset:
  // one position (size_) for Write, WriteAt and CopyFrom alike.
  CKPT_RETURN_IF_ERROR(WriteAt(size_, bytes));
  size_ += bytes.size();
  return Status::OK();
}

void AtomicFile::StartWriteback(uint64_t offset, uint64_t len) const {
  if (fd_ >= 0 && len > 0) {
    (void)::sync_file_range(fd_, static_cast<off_t>(offset),
                            static_cast<off_t>(len), SYNC_FILE_RANGE_WRITE);
  }
}

Status AtomicFile::CopyFrom(int src_fd, uint64_t src_offset, uint64_t len,
                            bool* copied) {
  *copied = false;
  if (fd_ < 0) return IoError("write after close").WithFile(target_);
  auto in_off = static_cast<loff_t>(src_offset);
  auto out_off = static_cast<loff_t>(size_);
  uint64_t done = 0;
  while (done < len) {
    ssize_t n =
        ::copy_file_range(src_fd, &in_off, fd_, &out_off, len - done, 0);
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
      return Error("write failed", errno, offset + done);
    }
    // A regular file never takes 0 bytes of a non-empty write; don't spin.
    if (n == 0) return Error("write failed: no progress", EIO, offset + done);
    done += static_cast<size_t>(n);
  }
  return Status::OK();
}

// Gives the unnamed inode a temporary name beside the target (rename()
// then replaces the target atomically; linkat cannot). Only a kill in the
// instant between this and the rename leaves a named temporary, which the
// next save of the target sweeps.
Status AtomicFile::Publish() {
  const std::string dir = DirName(final_);
  const std::string prefix = TempPrefix(BaseName(final_));
  const std::string proc = "/proc/self/fd/" + std::to_string(fd_);
  for (int attempt = 0; attempt < 100; ++attempt) {
    std::string name = dir + "/" + prefix + RandomSuffix();
    int rc = ::linkat(fd_, "", AT_FDCWD, name.c_str(), AT_EMPTY_PATH);
    if (rc != 0 && errno != EEXIST) {
      rc = ::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, name.c_str(),
                    AT_SYMLINK_FOLLOW);
    }
    if (rc == 0) {
      temp_ = std::move(name);
      unnamed_ = false;
      SetLive(temp_, true);
      return Status::OK();
    }
    if (errno != EEXIST)
      return Error("cannot link the new file into '" + dir + "'", errno);
  }
  return Error("cannot link the new file: every name tried was taken", EEXIST);
}

Status AtomicFile::Commit(bool sync) {
  if (fd_ < 0) return IoError("commit after close").WithFile(target_);
  if (sync && ::fsync(fd_) != 0) return Error("fsync failed", errno);
  if (unnamed_) {
    Status s = Publish();
    if (!s.ok()) {
      Abort();
      return s;
    }
  }
  // The descriptor (and its flock) stays open across the rename, so a
  // concurrent sweep never takes the name from under us.
  if (::rename(temp_.c_str(), final_.c_str()) != 0) {
    int err = errno;
    Abort();
    return Error("cannot rename the temporary file over the target", err);
  }
  SetLive(temp_, false);
  temp_.clear();
  // With sync, fsync above already reported write-back errors; without it
  // the caller asked for no durability.
  ::close(fd_);
  fd_ = -1;
  if (sync) {
    // Without this the rename itself may be lost on power failure.
    int dfd =
        ::open(DirName(final_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
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
    SetLive(temp_, false);
    temp_.clear();
  }
}

}  // namespace ckpt::internal
