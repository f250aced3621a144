// Status and Result<T>: the one error convention of the ckpt library.
//
// Every fallible call returns a Status or a Result<T>. Neither throws; bad
// input is an expected outcome for a file reader. A Status names the file,
// the byte offset (or -1) and the tensor path (or empty) where a problem was
// found, so a printed error tells a user what and where:
//
//   model.ckpt:1048600: corrupt: tensor 'layer.3.w': blob ends at 1048600,
//   past end of file (1048576)
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace ckpt {

/// A small closed set of error classes. Tools map them onto exit codes.
enum class ErrorCode : int {
  kOk = 0,
  kIoError,             ///< the OS refused a read, write, open, rename...
  kNotFound,            ///< a file, tensor path or tree path does not exist
  kCorrupt,             ///< the file breaks a rule of docs/FORMAT.md
  kUnsupportedVersion,  ///< a newer major format version, or unknown flags
  kInvalidArgument,     ///< the caller passed something impossible
  kChecksumMismatch,    ///< stored and computed XXH3 differ
  kCuda,                ///< a CUDA runtime call failed
  kResourceExhausted,   ///< out of memory or threads, or a size limit hit
};

/// Short lower-case name of a code ("corrupt", "checksum mismatch"...).
std::string_view ErrorCodeName(ErrorCode code);

/// The outcome of an operation. Success costs one null pointer.
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(ErrorCode code, std::string message);

  static Status OK() { return Status(); }

  bool ok() const { return state_ == nullptr; }
  ErrorCode code() const { return state_ ? state_->code : ErrorCode::kOk; }
  /// The message alone, without file, offset or tensor.
  const std::string& message() const;
  /// File the error concerns, or empty.
  const std::string& file() const;
  /// Byte offset in `file()` the error concerns, or -1.
  int64_t offset() const { return state_ ? state_->offset : -1; }
  /// Tensor path the error concerns, or empty (the empty path is also a
  /// valid tensor path; `has_tensor()` tells them apart).
  const std::string& tensor() const;
  bool has_tensor() const { return state_ && state_->has_tensor; }
  /// The OS error number behind a kIoError/kNotFound (ENOSPC, EACCES...),
  /// or 0.
  int sys_errno() const { return state_ ? state_->sys_errno : 0; }

  /// Returns a copy with context added; fields already set are kept, so the
  /// innermost (most precise) location wins.
  Status WithFile(std::string file) const;
  Status WithOffset(int64_t offset) const;
  Status WithTensor(std::string path) const;
  Status WithErrno(int err) const;
  /// Prefixes the message with `context + ": "`; code is kept.
  Status WithContext(std::string_view context) const;

  /// "file:offset: code: tensor 'p': message" (absent parts omitted).
  std::string ToString() const;

 private:
  struct State {
    ErrorCode code;
    std::string message;
    std::string file;
    int64_t offset = -1;
    std::string tensor;
    bool has_tensor = false;
    int sys_errno = 0;
  };
  std::shared_ptr<const State> state_;
};

// Convenience constructors.
Status IoError(std::string message);
Status NotFound(std::string message);
Status Corrupt(std::string message);
Status UnsupportedVersion(std::string message);
Status InvalidArgument(std::string message);
Status ChecksumMismatch(std::string message);
Status ResourceExhausted(std::string message);
/// kNotFound for ENOENT, kIoError otherwise: "what: strerror(err)", with
/// sys_errno() = err.
Status ErrnoError(std::string what, int err);

/// Either a value or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}        // NOLINT(runtime/explicit)
  Result(Status status) : v_(std::move(status)) {  // NOLINT(runtime/explicit)
    if (std::get<Status>(v_).ok()) {
      v_ = Status(ErrorCode::kInvalidArgument, "Result built from OK Status");
    }
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  /// OK when a value is held.
  Status status() const { return ok() ? Status::OK() : std::get<Status>(v_); }
  /// Precondition: ok().
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace ckpt

#define CKPT_CONCAT_INNER_(a, b) a##b
#define CKPT_CONCAT_(a, b) CKPT_CONCAT_INNER_(a, b)

/// Returns from the enclosing function if `expr` (a Status) is not OK.
#define CKPT_RETURN_IF_ERROR(expr)               \
  do {                                           \
    ::ckpt::Status ckpt_status_ = (expr);        \
    if (!ckpt_status_.ok()) return ckpt_status_; \
  } while (0)

#define CKPT_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                                \
  if (!tmp.ok()) return tmp.status();                \
  lhs = std::move(tmp).value()

/// `CKPT_ASSIGN_OR_RETURN(auto x, F())`: assigns the value of a Result or
/// returns its Status from the enclosing function.
#define CKPT_ASSIGN_OR_RETURN(lhs, rexpr) \
  CKPT_ASSIGN_OR_RETURN_IMPL_(CKPT_CONCAT_(ckpt_result_, __LINE__), lhs, rexpr)
