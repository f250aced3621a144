#include "ckpt/status.h"

#include <cerrno>
#include <cstring>

namespace ckpt {

std::string_view ErrorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::kOk:
      return "ok";
    case ErrorCode::kIoError:
      return "I/O error";
    case ErrorCode::kNotFound:
      return "not found";
    case ErrorCode::kCorrupt:
      return "corrupt";
    case ErrorCode::kUnsupportedVersion:
      return "unsupported version";
    case ErrorCode::kInvalidArgument:
      return "invalid argument";
    case ErrorCode::kChecksumMismatch:
      return "checksum mismatch";
    case ErrorCode::kCuda:
      return "CUDA error";
    case ErrorCode::kResourceExhausted:
      return "resource exhausted";
  }
  return "unknown error";
}

namespace {
const std::string& EmptyString() {
  static const std::string* empty = new std::string();
  return *empty;
}
}  // namespace

Status::Status(ErrorCode code, std::string message) {
  if (code == ErrorCode::kOk) return;
  auto s = std::make_shared<State>();
  s->code = code;
  s->message = std::move(message);
  state_ = std::move(s);
}

const std::string& Status::message() const {
  return state_ ? state_->message : EmptyString();
}
const std::string& Status::file() const {
  return state_ ? state_->file : EmptyString();
}
const std::string& Status::tensor() const {
  return state_ ? state_->tensor : EmptyString();
}

Status Status::WithFile(std::string file) const {
  if (!state_ || !state_->file.empty()) return *this;
  auto s = std::make_shared<State>(*state_);
  s->file = std::move(file);
  Status out;
  out.state_ = std::move(s);
  return out;
}

Status Status::WithOffset(int64_t offset) const {
  if (!state_ || state_->offset >= 0) return *this;
  auto s = std::make_shared<State>(*state_);
  s->offset = offset;
  Status out;
  out.state_ = std::move(s);
  return out;
}

Status Status::WithTensor(std::string path) const {
  if (!state_ || state_->has_tensor) return *this;
  auto s = std::make_shared<State>(*state_);
  s->tensor = std::move(path);
  s->has_tensor = true;
  Status out;
  out.state_ = std::move(s);
  return out;
}

Status Status::WithErrno(int err) const {
  if (!state_ || state_->sys_errno != 0) return *this;
  auto s = std::make_shared<State>(*state_);
  s->sys_errno = err;
  Status out;
  out.state_ = std::move(s);
  return out;
}

Status Status::WithContext(std::string_view context) const {
  if (!state_) return *this;
  auto s = std::make_shared<State>(*state_);
  s->message = std::string(context) + ": " + s->message;
  Status out;
  out.state_ = std::move(s);
  return out;
}

std::string Status::ToString() const {
  if (!state_) return "OK";
  std::string out;
  if (!state_->file.empty()) {
    out += state_->file;
    if (state_->offset >= 0) out += ":" + std::to_string(state_->offset);
    out += ": ";
  } else if (state_->offset >= 0) {
    out += "offset " + std::to_string(state_->offset) + ": ";
  }
  out += ErrorCodeName(state_->code);
  out += ": ";
  if (state_->has_tensor) out += "tensor '" + state_->tensor + "': ";
  out += state_->message;
  return out;
}

Status IoError(std::string m) {
  return Status(ErrorCode::kIoError, std::move(m));
}
Status NotFound(std::string m) {
  return Status(ErrorCode::kNotFound, std::move(m));
}
Status Corrupt(std::string m) {
  return Status(ErrorCode::kCorrupt, std::move(m));
}
Status UnsupportedVersion(std::string m) {
  return Status(ErrorCode::kUnsupportedVersion, std::move(m));
}
Status InvalidArgument(std::string m) {
  return Status(ErrorCode::kInvalidArgument, std::move(m));
}
Status ChecksumMismatch(std::string m) {
  return Status(ErrorCode::kChecksumMismatch, std::move(m));
}
Status ResourceExhausted(std::string m) {
  return Status(ErrorCode::kResourceExhausted, std::move(m));
}
Status ErrnoError(std::string what, int err) {
  std::string msg = std::move(what) + ": " + std::strerror(err);
  Status s = err == ENOENT ? NotFound(std::move(msg)) : IoError(std::move(msg));
  return s.WithErrno(err);
}

}  // namespace ckpt
