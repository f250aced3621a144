// Hugging Face save_pretrained directories to and from ckpt (ckpt/hf.h).
#include "ckpt/hf.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <unordered_map>

#include "bytes_internal.h"
#include "ckpt/reader.h"
#include "ckpt/writer.h"
#include "json_internal.h"
#include "safetensors_internal.h"
#include "source_internal.h"

namespace ckpt {

namespace {

using internal::JsonValue;

constexpr uint64_t kPiece = 64ull << 20;
// An index or config.json: as large as a safetensors header may be.
constexpr uint64_t kMaxJsonFile = internal::kMaxSafetensorsHeader;

std::string Join(const std::string& dir, const std::string& name) {
  return dir.empty() || dir.back() == '/' ? dir + name : dir + "/" + name;
}

// Whether `path` is a regular file (following symlinks): false when
// nothing is there; an error naming it when something else is (a
// directory, a FIFO that a read would block on, a dangling link).
Result<bool> RegularFile(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) {
    if (S_ISREG(st.st_mode)) return true;
    return InvalidArgument("not a regular file (a directory, FIFO or device)")
        .WithFile(path);
  }
  const int err = errno;
  struct stat lst;
  if (err == ENOENT && ::lstat(path.c_str(), &lst) == 0) {
    return NotFound("a symlink to nothing").WithFile(path);
  }
  if (err == ENOENT) return false;
  return ErrnoError("stat " + path, err).WithFile(path);
}

// The whole of a small text file (an index, config.json), at most `cap`.
Result<std::string> ReadText(const std::string& path, uint64_t cap) {
  CKPT_ASSIGN_OR_RETURN(auto src, internal::OpenSource(path, {.pread = true}));
  if (src->size() > cap) {
    return Corrupt("larger than " + std::to_string(cap) + " bytes")
        .WithFile(path);
  }
  std::string text(static_cast<size_t>(src->size()), '\0');
  CKPT_RETURN_IF_ERROR(src->ReadInto(
      0, std::as_writable_bytes(std::span(text.data(), text.size()))));
  return text;
}

struct Layout {
  std::string kind;                               // "safetensors" or "bin"
  std::string index;                              // path of the index, or empty
  std::vector<std::string> files;                 // names in `dir`, sorted
  std::map<std::string, std::string> weight_map;  // tensor -> file name
};

Result<Layout> FindLayout(const std::string& dir) {
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return NotFound(dir +
                    ": not a directory (a save_pretrained directory holds "
                    "model.safetensors or pytorch_model.bin)");
  }
  // transformers' order (modeling_utils: SAFE_WEIGHTS_NAME first).
  const std::pair<const char*, const char*> kOrder[] = {
      {"model.safetensors", "safetensors"},
      {"model.safetensors.index.json", "safetensors"},
      {"pytorch_model.bin", "bin"},
      {"pytorch_model.bin.index.json", "bin"}};
  for (const auto& [name, kind] : kOrder) {
    const std::string path = Join(dir, name);
    CKPT_ASSIGN_OR_RETURN(bool present, RegularFile(path));
    if (!present) continue;
    Layout l;
    l.kind = kind;
    if (std::string_view(name).ends_with(".json")) {
      l.index = path;
      CKPT_ASSIGN_OR_RETURN(std::string text, ReadText(path, kMaxJsonFile));
      auto doc = internal::ParseJson(text);
      if (!doc.ok()) return doc.status().WithFile(path);
      const JsonValue* wm =
          doc->is_object() ? doc->Find("weight_map") : nullptr;
      if (!wm || !wm->is_object()) {
        return Corrupt("no weight_map of tensor names to file names")
            .WithFile(path);
      }
      std::set<std::string> files;
      for (const auto& [k, v] : wm->members) {
        if (!v.is_string() || v.text.empty() || v.text == "." ||
            v.text == ".." || v.text.find('/') != std::string::npos ||
            v.text.find('\0') != std::string::npos) {
          return Corrupt("'" + k + "' names " +
                         (v.is_string() ? "file \"" + v.text + "\""
                                        : std::string("no file")) +
                         ", not a file in " + dir)
              .WithFile(path)
              .WithOffset(static_cast<int64_t>(v.offset));
        }
        l.weight_map[k] = v.text;
        files.insert(v.text);
      }
      l.files.assign(files.begin(), files.end());
      for (const auto& f : l.files) {
        auto regular = RegularFile(Join(dir, f));
        if (!regular.ok()) return regular.status();
        if (!*regular) {
          return NotFound("names " + f + ", which is not a file in " + dir)
              .WithFile(path);
        }
      }
    } else {
      l.files = {name};
    }
    return l;
  }
  return NotFound(dir +
                  ": no model.safetensors, model.safetensors.index.json, "
                  "pytorch_model.bin or pytorch_model.bin.index.json");
}

// Which file holds each tensor, held to the index: no tensor in two
// files, each in the file the weight_map names, every name the index has
// held by some file. (For safetensors shards and .bin shards alike.)
class Placement {
 public:
  explicit Placement(const Layout& l) : l_(l) {}
  Status Add(const std::string& tensor, const std::string& dir,
             const std::string& file) {
    if (auto [it, fresh] = where_.emplace(tensor, file); !fresh) {
      return Corrupt("tensor '" + tensor + "' is in both " + it->second +
                     " and " + file)
          .WithFile(dir);
    }
    if (l_.weight_map.empty()) return Status::OK();
    auto it = l_.weight_map.find(tensor);
    if (it == l_.weight_map.end() || it->second != file) {
      return Corrupt("holds '" + tensor + "', which " +
                     l_.index.substr(l_.index.rfind('/') + 1) +
                     (it == l_.weight_map.end() ? " does not name"
                                                : " places in " + it->second))
          .WithFile(Join(dir, file));
    }
    return Status::OK();
  }
  Status Complete() const {
    for (const auto& [k, v] : l_.weight_map) {
      if (!where_.count(k)) {
        return Corrupt("names tensor '" + k + "', which " + v +
                       " does not hold")
            .WithFile(l_.index);
      }
    }
    return Status::OK();
  }

 private:
  const Layout& l_;
  std::map<std::string, std::string> where_;  // tensor -> file name
};

struct StFile {
  std::string path;
  std::shared_ptr<internal::ByteSource> map, stream;
  internal::SafetensorsHeader header;
};

Result<StFile> OpenSafetensors(const std::string& path) {
  StFile f;
  f.path = path;
  CKPT_ASSIGN_OR_RETURN(f.stream, internal::OpenSource(path, {.pread = true}));
  auto text = internal::ReadSafetensorsHeaderText(*f.stream, 0);
  if (!text.ok()) return text.status().WithFile(path);
  auto h = internal::ParseSafetensorsHeader(*text, f.stream->size());
  if (!h.ok()) return h.status().WithFile(path);
  f.header = std::move(*h);
  return f;
}

// Copies [offset, offset + n) of `src` (mapped) / `fd` into the open
// storage of `w`, by the kernel where it can.
Status CopyRange(Writer& w, const internal::ByteSource& map, int fd,
                 uint64_t offset, uint64_t n) {
  for (uint64_t off = 0; off < n; off += kPiece) {
    const uint64_t len = std::min(kPiece, n - off);
    CKPT_RETURN_IF_ERROR(map.Populate(offset + off, len));
    CKPT_ASSIGN_OR_RETURN(internal::Bytes view, map.Read(offset + off, len));
    CKPT_RETURN_IF_ERROR(w.AppendFromFile(fd, offset + off, view.data));
    map.Release(offset + off, len);
  }
  return Status::OK();
}

struct Progress {
  const ImportProgress& cb;
  uint64_t done = 0, total = 0;
  Status Add(uint64_t n) {
    done += n;
    return cb ? cb(done, total) : Status::OK();
  }
};

// A shard's tensors into `w`. The file is opened (mapped) only now, one
// at a time - a model of thousands of shards must not hold thousands of
// descriptors - and its header read again: it must be the one checked
// in the first pass.
Status ImportSafetensors(Writer& w, const std::string& path,
                         const internal::SafetensorsHeader& checked,
                         Progress& progress, HfImportReport& report) {
  CKPT_ASSIGN_OR_RETURN(StFile f, OpenSafetensors(path));
  auto same = [](const internal::SafetensorsEntry& a,
                 const internal::SafetensorsEntry& b) {
    return a.name == b.name && a.dtype == b.dtype && a.shape == b.shape &&
           a.begin == b.begin && a.end == b.end;
  };
  if (f.header.data_start != checked.data_start ||
      !std::equal(f.header.tensors.begin(), f.header.tensors.end(),
                  checked.tensors.begin(), checked.tensors.end(), same)) {
    return Corrupt("changed while it was imported").WithFile(path);
  }
  CKPT_ASSIGN_OR_RETURN(f.map, internal::OpenSource(path, {}));
  for (const auto& e : f.header.tensors) {
    CKPT_ASSIGN_OR_RETURN(StorageId sid, w.BeginStorage(e.end - e.begin));
    Status s = CopyRange(w, *f.map, f.stream->fd(),
                         f.header.data_start + e.begin, e.end - e.begin);
    if (!s.ok()) return s.WithFile(f.path).WithTensor(e.name);
    CKPT_RETURN_IF_ERROR(w.EndStorage());
    TensorSpec spec;
    spec.dtype = e.dtype;
    spec.shape = e.shape;
    spec.storage = sid;
    CKPT_ASSIGN_OR_RETURN(NodeId node, w.AddTensor(spec));
    CKPT_RETURN_IF_ERROR(w.PutValue(e.name, node));
    report.tensors++;
    report.tensor_bytes += e.end - e.begin;
    CKPT_RETURN_IF_ERROR(progress.Add(e.end - e.begin));
  }
  return Status::OK();
}

// Temporaries of .bin imports running at once in this process (threads).
std::atomic<uint64_t> g_bin_temps{0};

// A .bin shard: converted by the restricted importer to a temporary ckpt
// file beside `out` (unlinked as soon as it is open), whose flat dict is
// then copied in, shared storages (tied weights) kept shared.
Status ImportBinShard(Writer& w, const std::string& dir,
                      const std::string& name, const std::string& out,
                      const ImportOptions& options, Placement& placement,
                      Progress& progress, HfImportReport& report) {
  const std::string path = Join(dir, name);
  // (A short name: OUT's own may already be near NAME_MAX.)
  const size_t slash = out.rfind('/');
  const std::string tmp =
      (slash == std::string::npos ? std::string() : out.substr(0, slash + 1)) +
      ".ckpt-hfbin-" + std::to_string(::getpid()) + "-" +
      std::to_string(g_bin_temps.fetch_add(1)) + ".tmp";
  ImportOptions o = options;
  o.progress = nullptr;
  o.write.sync = false;
  CKPT_RETURN_IF_ERROR(ImportPth(path, tmp, o).status());
  auto ck = Checkpoint::Open(tmp);
  const int fd = ::open(tmp.c_str(), O_RDONLY | O_CLOEXEC);
  const int open_errno = errno;
  ::unlink(tmp.c_str());
  if (!ck.ok()) {
    if (fd >= 0) ::close(fd);
    return ck.status();
  }
  if (fd < 0) return ErrnoError("open " + tmp, open_errno);
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  const Value root = ck->root();
  if (root.kind() != ValueKind::kDict) {
    return InvalidArgument("not a state dict (a dict of name -> tensor)")
        .WithFile(path);
  }
  std::unordered_map<uint32_t, StorageId> storages;
  for (size_t i = 0; i < root.size(); ++i) {
    const Value key = root.key(i), item = root.item(i);
    if (key.kind() != ValueKind::kString || item.kind() != ValueKind::kTensor) {
      return InvalidArgument("not a state dict of tensors: entry " +
                             key.KeySegment() + " is not a named tensor")
          .WithFile(path);
    }
    const std::string tensor(key.as_string());
    CKPT_RETURN_IF_ERROR(placement.Add(tensor, dir, name));
    CKPT_ASSIGN_OR_RETURN(TensorInfo info, item.tensor_info());
    auto sit = storages.find(info.storage);
    if (sit == storages.end()) {
      CKPT_ASSIGN_OR_RETURN(StorageInfo si, ck->StorageInfoAt(info.storage));
      CKPT_ASSIGN_OR_RETURN(StorageId sid,
                            w.BeginStorage(si.nbytes, si.device));
      CKPT_ASSIGN_OR_RETURN(StorageView view, ck->Storage(info.storage));
      for (uint64_t off = 0; off < si.nbytes; off += kPiece) {
        const uint64_t n = std::min(kPiece, si.nbytes - off);
        CKPT_RETURN_IF_ERROR(
            w.AppendFromFile(fd, si.offset + off,
                             view.data.subspan(static_cast<size_t>(off),
                                               static_cast<size_t>(n))));
      }
      CKPT_RETURN_IF_ERROR(w.EndStorage());
      sit = storages.emplace(info.storage, sid).first;
      report.tensor_bytes += si.nbytes;
      CKPT_RETURN_IF_ERROR(progress.Add(si.nbytes));
    }
    TensorSpec spec;
    spec.dtype = info.dtype;
    spec.shape = info.shape;
    spec.strides = info.strides;
    spec.storage = sit->second;
    spec.storage_offset = info.storage_offset;
    spec.requires_grad = info.requires_grad;
    spec.is_parameter = info.is_parameter;
    CKPT_ASSIGN_OR_RETURN(NodeId node, w.AddTensor(spec));
    CKPT_RETURN_IF_ERROR(w.PutValue(tensor, node));
    report.tensors++;
  }
  return Status::OK();
}

// OUT must not be one of the files it is made from (an existing OUT is
// replaced only at the commit, but the import would read a file it is
// about to replace).
Status NotAnInput(const std::string& out, const std::vector<std::string>& in) {
  struct stat o;
  if (::stat(out.c_str(), &o) != 0) return Status::OK();
  for (const auto& path : in) {
    struct stat st;
    if (::stat(path.c_str(), &st) == 0 && st.st_dev == o.st_dev &&
        st.st_ino == o.st_ino) {
      return InvalidArgument("the output " + out + " is the input " + path)
          .WithFile(out);
    }
  }
  return Status::OK();
}

}  // namespace

Result<HfImportReport> ImportHfDir(const std::string& dir,
                                   const std::string& out,
                                   const ImportOptions& options) {
  CKPT_ASSIGN_OR_RETURN(Layout l, FindLayout(dir));
  HfImportReport report;
  report.layout = l.kind;
  Progress progress{options.progress};
  std::vector<std::string> inputs;
  for (const auto& f : l.files) inputs.push_back(Join(dir, f));
  if (!l.index.empty()) inputs.push_back(l.index);
  // Every safetensors header is read and checked before anything is
  // written, against the index too; the files are closed again.
  std::vector<internal::SafetensorsHeader> headers;
  std::vector<std::pair<std::string, std::string>> meta;
  Placement placement(l);
  if (l.kind == "safetensors") {
    for (const auto& name : l.files) {
      const std::string path = Join(dir, name);
      CKPT_ASSIGN_OR_RETURN(StFile f, OpenSafetensors(path));
      for (const auto& e : f.header.tensors) {
        CKPT_RETURN_IF_ERROR(placement.Add(e.name, dir, name));
        progress.total += e.end - e.begin;
      }
      for (auto& [k, v] : f.header.metadata) {
        if (k == kHfConfigKey) {
          // The key that holds config.json: a file may not set it.
          return Corrupt("__metadata__ sets '" + std::string(kHfConfigKey) +
                         "', the key ckpt keeps config.json under")
              .WithFile(path);
        }
        meta.emplace_back(k, v);
      }
      headers.push_back(std::move(f.header));
    }
    CKPT_RETURN_IF_ERROR(placement.Complete());
  } else {
    for (const auto& name : l.files) {
      struct stat sb;
      if (::stat(Join(dir, name).c_str(), &sb) == 0) {
        progress.total += static_cast<uint64_t>(sb.st_size);
      }
    }
  }
  std::string config;
  const std::string config_path = Join(dir, "config.json");
  CKPT_ASSIGN_OR_RETURN(bool has_config, RegularFile(config_path));
  if (has_config) {
    inputs.push_back(config_path);
    CKPT_ASSIGN_OR_RETURN(config, ReadText(config_path, kMaxJsonFile));
    auto doc = internal::ParseJson(config);
    if (!doc.ok()) return doc.status().WithFile(config_path);
  }
  CKPT_RETURN_IF_ERROR(NotAnInput(out, inputs));
  CKPT_ASSIGN_OR_RETURN(Writer w, Writer::Create(out, options.write));
  if (progress.cb) CKPT_RETURN_IF_ERROR(progress.cb(0, progress.total));
  if (l.kind == "safetensors") {
    for (size_t i = 0; i < l.files.size(); ++i) {
      CKPT_RETURN_IF_ERROR(ImportSafetensors(w, Join(dir, l.files[i]),
                                             headers[i], progress, report));
    }
    // (A key in several shards: the last file's value, as ckpt.hf's.)
    for (const auto& [k, v] : meta) CKPT_RETURN_IF_ERROR(w.SetMetadata(k, v));
  } else {
    for (const auto& name : l.files) {
      CKPT_RETURN_IF_ERROR(ImportBinShard(w, dir, name, out, options, placement,
                                          progress, report));
    }
    CKPT_RETURN_IF_ERROR(placement.Complete());
  }
  for (const auto& f : l.files) report.files.push_back(Join(dir, f));
  if (!config.empty()) {
    CKPT_RETURN_IF_ERROR(w.SetMetadata(kHfConfigKey, config));
  }
  CKPT_RETURN_IF_ERROR(w.Commit());
  if (progress.cb) (void)progress.cb(progress.total, progress.total);
  return report;
}

// ---- export ------------------------------------------------------------

Result<uint64_t> ParseByteSize(const std::string& text) {
  size_t i = 0;
  while (i < text.size() && text[i] == ' ') ++i;
  const size_t num_start = i;
  while (i < text.size() &&
         ((text[i] >= '0' && text[i] <= '9') || text[i] == '.')) {
    ++i;
  }
  const std::string num = text.substr(num_start, i - num_start);
  while (i < text.size() && text[i] == ' ') ++i;
  std::string unit = text.substr(i);
  while (!unit.empty() && unit.back() == ' ') unit.pop_back();
  for (auto& c : unit) c = static_cast<char>(std::toupper(c));
  static const std::map<std::string, double> kUnits = {
      {"", 1},
      {"B", 1},
      {"KB", 1e3},
      {"MB", 1e6},
      {"GB", 1e9},
      {"TB", 1e12},
      {"KIB", 1024.0},
      {"MIB", 1048576.0},
      {"GIB", 1073741824.0},
      {"TIB", 1099511627776.0}};
  auto u = kUnits.find(unit);
  char* end = nullptr;
  const double v = num.empty() ? 0 : std::strtod(num.c_str(), &end);
  if (num.empty() || end != num.c_str() + num.size() || u == kUnits.end() ||
      std::count(num.begin(), num.end(), '.') > 1) {
    return InvalidArgument("size '" + text +
                           "': a byte count, or a number with KB, MB, GB, "
                           "TB, KiB, MiB, GiB or TiB ('5GB', '500MiB')");
  }
  const double bytes = v * u->second;
  if (!(bytes >= 1) || bytes > 9.2e18) {
    return InvalidArgument("size '" + text +
                           "' must be between one byte and 9.2e18 bytes");
  }
  return static_cast<uint64_t>(bytes);
}

namespace {

struct ExportTensor {
  std::string name;
  TensorRef ref;
  std::string_view dtype;
};

void AppendUint(std::string& out, uint64_t v) { out += std::to_string(v); }

// The header of one safetensors file: "__metadata__" first (the string
// metadata, sorted), then tensors in the order given, back to back; padded with
// spaces to a multiple of 8 so that the data starts aligned (as safetensors'
// serializer does).
std::string StHeader(
    const std::vector<const ExportTensor*>& tensors,
    const std::vector<std::pair<std::string, std::string>>& metadata) {
  std::string h = "{\"__metadata__\":{";
  for (size_t i = 0; i < metadata.size(); ++i) {
    if (i) h += ',';
    internal::AppendJsonString(h, metadata[i].first);
    h += ':';
    internal::AppendJsonString(h, metadata[i].second);
  }
  h += '}';
  uint64_t at = 0;
  for (const ExportTensor* t : tensors) {
    h += ',';
    internal::AppendJsonString(h, t->name);
    h += ":{\"dtype\":\"";
    h += t->dtype;
    h += "\",\"shape\":[";
    for (size_t i = 0; i < t->ref.shape().size(); ++i) {
      if (i) h += ',';
      AppendUint(h, static_cast<uint64_t>(t->ref.shape()[i]));
    }
    h += "],\"data_offsets\":[";
    AppendUint(h, at);
    h += ',';
    at += t->ref.info().nbytes();
    AppendUint(h, at);
    h += "]}";
  }
  h += '}';
  while ((8 + h.size()) % 8 != 0) h += ' ';
  return h;
}

// A file written whole into the export's temporary directory and closed
// (thousands of shards must not hold thousands of descriptors).
class TempOut {
 public:
  static Result<TempOut> Create(const std::string& path) {
    int fd =
        ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0) return ErrnoError("create " + path, errno).WithFile(path);
    return TempOut(path, fd);
  }
  TempOut(TempOut&& o) noexcept : path_(std::move(o.path_)), fd_(o.fd_) {
    o.fd_ = -1;
  }
  ~TempOut() {
    if (fd_ >= 0) ::close(fd_);
  }
  Status Write(std::span<const std::byte> b) {
    for (size_t done = 0; done < b.size();) {
      ssize_t n = ::write(fd_, b.data() + done, b.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        return ErrnoError("write " + path_, n < 0 ? errno : EIO)
            .WithFile(path_)
            .WithOffset(static_cast<int64_t>(at_ + done));
      }
      done += static_cast<size_t>(n);
    }
    at_ += b.size();
    return Status::OK();
  }
  Status Write(std::string_view s) {
    return Write(std::as_bytes(std::span(s.data(), s.size())));
  }
  Status Close(bool sync) {
    if (sync && ::fsync(fd_) != 0) {
      return ErrnoError("fsync " + path_, errno).WithFile(path_);
    }
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) {
      return ErrnoError("close " + path_, errno).WithFile(path_);
    }
    return Status::OK();
  }

 private:
  TempOut(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  std::string path_;
  int fd_ = -1;
  uint64_t at_ = 0;
};

Status SyncDirectory(const std::string& dir) {
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return ErrnoError("open " + dir, errno).WithFile(dir);
  const int rc = ::fsync(dfd);
  const int err = errno;
  ::close(dfd);
  if (rc != 0) return ErrnoError("fsync " + dir, err).WithFile(dir);
  return Status::OK();
}

constexpr std::string_view kTempPrefix = ".ckpt-export-";

// The export's temporary directory inside `dir`, held under flock() while
// it lives; earlier ones whose exporter is gone (their lock is free) are
// removed first, never a live exporter's.
class TempDir {
 public:
  static Result<TempDir> Create(const std::string& dir) {
    // Made under a name the sweep below ignores, locked, then renamed to
    // its swept name: another export's sweep never sees it unlocked.
    std::string tmpl = Join(dir, ".ckpt-exporting-XXXXXX");
    if (!::mkdtemp(tmpl.data())) {
      return ErrnoError("create a temporary directory in " + dir, errno)
          .WithFile(dir);
    }
    int fd = ::open(tmpl.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      ::rmdir(tmpl.c_str());
      return ErrnoError("open " + tmpl, err).WithFile(tmpl);
    }
    // File systems without flock (some NFS and Lustre mounts): no lock,
    // and no sweeping of others' temporaries, which could be live.
    bool locking = true;
    if (::flock(fd, LOCK_EX) != 0) {
      const int err = errno;
      if (err != ENOSYS && err != ENOLCK && err != EOPNOTSUPP) {
        ::close(fd);
        ::rmdir(tmpl.c_str());
        return ErrnoError("lock " + tmpl, err).WithFile(tmpl);
      }
      locking = false;
    }
    const std::string name = tmpl.substr(tmpl.rfind('/') + 1);
    const std::string path =
        Join(dir, std::string(kTempPrefix) +
                      name.substr(std::string(".ckpt-exporting-").size()));
    if (::rename(tmpl.c_str(), path.c_str()) != 0) {
      const int err = errno;
      ::close(fd);
      ::rmdir(tmpl.c_str());
      return ErrnoError("rename " + tmpl, err).WithFile(tmpl);
    }
    if (locking) Sweep(dir, path);
    return TempDir(path, fd);
  }
  TempDir(TempDir&& o) noexcept : path_(std::move(o.path_)), fd_(o.fd_) {
    o.fd_ = -1;
  }
  ~TempDir() {
    if (fd_ < 0) return;
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
    ::close(fd_);
  }
  const std::string& path() const { return path_; }

 private:
  TempDir(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  // Removes the temporaries of exports that are gone (their lock is free).
  static void Sweep(const std::string& dir, const std::string& mine) {
    std::vector<std::string> old;
    if (DIR* d = ::opendir(dir.c_str())) {
      while (dirent* e = ::readdir(d)) {
        if (std::string_view(e->d_name).starts_with(kTempPrefix)) {
          old.push_back(Join(dir, e->d_name));
        }
      }
      ::closedir(d);
    }
    for (const auto& o : old) {
      if (o == mine) continue;
      int fd = ::open(o.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      if (fd < 0) continue;
      if (::flock(fd, LOCK_EX | LOCK_NB) == 0) {
        std::error_code ec;
        std::filesystem::remove_all(o, ec);
      }
      ::close(fd);
    }
  }
  std::string path_;
  int fd_ = -1;
};

// "model-00001-of-00003.safetensors": five digits, five digits, exactly.
bool IsShardName(std::string_view n) {
  constexpr std::string_view kHead = "model-", kMid = "-of-",
                             kTail = ".safetensors";
  if (n.size() != kHead.size() + 5 + kMid.size() + 5 + kTail.size()) {
    return false;
  }
  auto digits = [&](size_t at) {
    for (size_t i = at; i < at + 5; ++i) {
      if (n[i] < '0' || n[i] > '9') return false;
    }
    return true;
  };
  return n.starts_with(kHead) && digits(kHead.size()) &&
         n.substr(kHead.size() + 5, kMid.size()) == kMid &&
         digits(kHead.size() + 5 + kMid.size()) && n.ends_with(kTail);
}

}  // namespace

Result<std::vector<std::string>> ExportHf(const std::string& in,
                                          const std::string& dir,
                                          const HfExportOptions& options,
                                          size_t* dropped) {
  if (options.max_shard_bytes == 0) {
    return InvalidArgument("max shard size must be positive");
  }
  // Checksums checked as the tensors stream out: safetensors keeps none,
  // so a damaged byte exported would be for good.
  ReadOptions ro;
  ro.verify_checksums = options.verify;
  CKPT_ASSIGN_OR_RETURN(Checkpoint ck, Checkpoint::Open(in, ro));
  const Value root = ck.root();
  if (root.kind() != ValueKind::kDict) {
    return InvalidArgument(
               "not a state dict: export takes a flat dict of name -> tensor")
        .WithFile(in);
  }
  std::vector<ExportTensor> tensors;
  size_t skipped = 0;
  for (size_t i = 0; i < root.size(); ++i) {
    const Value key = root.key(i), item = root.item(i);
    if (item.kind() != ValueKind::kTensor) {
      if (item.is_container()) {
        // A nested dict of tensors would lose its structure: refuse it.
        std::vector<Value> todo = {item};
        while (!todo.empty()) {
          Value v = todo.back();
          todo.pop_back();
          if (v.kind() == ValueKind::kTensor) {
            return InvalidArgument(
                       "tensor '" + std::string(v.tensor_info()->path) +
                       "' is nested; export takes a flat state dict "
                       "(ImportHfDir's, or ckpt.flatten's)")
                .WithFile(in);
          }
          for (size_t k = 0; v.is_container() && k < v.size(); ++k)
            todo.push_back(v.item(k));
        }
      }
      skipped++;
      continue;
    }
    if (key.kind() != ValueKind::kString) {
      return InvalidArgument("tensor key " + key.KeySegment() +
                             " is not a string")
          .WithFile(in);
    }
    if (key.as_string() == "__metadata__") {
      return InvalidArgument(
                 "a tensor named __metadata__: safetensors keeps its "
                 "metadata under that name")
          .WithFile(in)
          .WithTensor("__metadata__");
    }
    CKPT_ASSIGN_OR_RETURN(TensorRef ref, item.tensor());
    auto st = internal::SafetensorsDTypeName(ref.dtype());
    if (!st) {
      return InvalidArgument("dtype " + std::string(DTypeName(ref.dtype())) +
                             " has no safetensors name")
          .WithFile(in)
          .WithTensor(std::string(key.as_string()));
    }
    tensors.push_back({std::string(key.as_string()), std::move(ref), *st});
  }
  if (dropped) *dropped = skipped;
  std::sort(tensors.begin(), tensors.end(),
            [](const auto& a, const auto& b) { return a.name < b.name; });
  // Shards in name order, each up to the limit (a larger tensor alone).
  std::vector<std::vector<const ExportTensor*>> shards(1);
  uint64_t size = 0, total = 0;
  for (const auto& t : tensors) {
    const uint64_t nb = t.ref.info().nbytes();
    if (!shards.back().empty() && size + nb > options.max_shard_bytes) {
      shards.emplace_back();
      size = 0;
    }
    shards.back().push_back(&t);
    size += nb;
    total += nb;
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  struct stat dst;
  if (::stat(dir.c_str(), &dst) != 0 || !S_ISDIR(dst.st_mode)) {
    return (ec ? ErrnoError("cannot create directory " + dir, ec.value())
               : InvalidArgument(dir + " is not a directory"))
        .WithFile(dir);
  }
  // The file's string metadata back as __metadata__ (what import kept of
  // the safetensors files'), config.json aside; "format": "pt" unless the
  // file says otherwise (transformers checks it).
  std::vector<std::pair<std::string, std::string>> st_meta;
  bool has_format = false;
  for (auto& [k, v] : ck.metadata()) {
    if (k == kHfConfigKey) continue;
    has_format |= k == "format";
    st_meta.emplace_back(k, v);
  }
  if (!has_format) st_meta.emplace_back("format", "pt");
  std::sort(st_meta.begin(), st_meta.end());

  // Every file written whole and closed in a temporary directory before
  // any is renamed into place.
  CKPT_ASSIGN_OR_RETURN(TempDir temp, TempDir::Create(dir));
  std::vector<std::string> names;  // in the order they are published
  const size_t n = shards.size();
  char buf[64];
  for (size_t i = 0; i < n; ++i) {
    if (n == 1) {
      names.push_back("model.safetensors");
    } else {
      std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1,
                    n);
      names.push_back(buf);
    }
    CKPT_ASSIGN_OR_RETURN(TempOut f,
                          TempOut::Create(Join(temp.path(), names.back())));
    const std::string header = StHeader(shards[i], st_meta);
    std::byte n8[8];
    internal::StoreLE(n8, header.size(), 8);
    CKPT_RETURN_IF_ERROR(f.Write(n8));
    CKPT_RETURN_IF_ERROR(f.Write(header));
    for (const ExportTensor* t : shards[i]) {
      Status s = ck.StreamTensor(
          t->ref,
          [&](std::span<const std::byte> piece) { return f.Write(piece); },
          size_t{8} << 20);
      if (!s.ok()) return s.WithTensor(t->name);
    }
    CKPT_RETURN_IF_ERROR(f.Close(options.sync));
  }
  const std::string kIndex = "model.safetensors.index.json";
  if (n > 1) {
    std::string idx =
        "{\n  \"metadata\": {\n    \"total_size\": " + std::to_string(total) +
        "\n  },\n  \"weight_map\": {";
    bool first = true;
    for (size_t i = 0; i < n; ++i) {
      for (const ExportTensor* t : shards[i]) {
        idx += first ? "\n    " : ",\n    ";
        first = false;
        internal::AppendJsonString(idx, t->name);
        idx += ": ";
        internal::AppendJsonString(idx, names[i]);
      }
    }
    // (Tensors are in name order across the shards, so the weight_map is
    // sorted as transformers writes it.)
    idx += "\n  }\n}\n";
    CKPT_ASSIGN_OR_RETURN(TempOut f,
                          TempOut::Create(Join(temp.path(), kIndex)));
    CKPT_RETURN_IF_ERROR(f.Write(idx));
    CKPT_RETURN_IF_ERROR(f.Close(options.sync));
  }
  auto config = ck.Metadata(kHfConfigKey);
  if (config.ok()) {
    CKPT_ASSIGN_OR_RETURN(TempOut f,
                          TempOut::Create(Join(temp.path(), "config.json")));
    CKPT_RETURN_IF_ERROR(f.Write(*config));
    CKPT_RETURN_IF_ERROR(f.Close(options.sync));
  }
  if (options.sync) CKPT_RETURN_IF_ERROR(SyncDirectory(temp.path()));

  // Publish. transformers reads model.safetensors before an index, so a
  // sharded export removes an old model.safetensors before its index
  // appears (a crash between leaves shards without an index: an error,
  // never the old weights), and a single-file export needs nothing
  // removed first (its model.safetensors wins at once).
  std::set<std::string> keep(names.begin(), names.end());
  if (n > 1) keep.insert(kIndex);
  std::vector<std::string> stale;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) {
      const std::string name = e->d_name;
      if ((name == "model.safetensors" || name == kIndex ||
           IsShardName(name)) &&
          !keep.count(name)) {
        stale.push_back(name);
      }
    }
    ::closedir(d);
  }
  std::vector<std::string> written;
  auto publish = [&](const std::string& name) -> Status {
    const std::string to = Join(dir, name);
    if (::rename(Join(temp.path(), name).c_str(), to.c_str()) != 0) {
      return ErrnoError("rename into " + to, errno).WithFile(to);
    }
    written.push_back(to);
    return Status::OK();
  };
  auto remove = [&](const std::string& name) -> Status {
    const std::string path = Join(dir, name);
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      return ErrnoError("remove the stale " + path, errno).WithFile(path);
    }
    return Status::OK();
  };
  // An old index stays valid while shards of the same names are replaced
  // one by one (the same shard count): it goes first, so that a crash or
  // a reader meanwhile finds shards without an index (an error), never a
  // mix of old and new weights under one.
  if (n > 1) {
    struct stat ist;
    if (::lstat(Join(dir, kIndex).c_str(), &ist) == 0) {
      CKPT_RETURN_IF_ERROR(remove(kIndex));
      if (options.sync) CKPT_RETURN_IF_ERROR(SyncDirectory(dir));
    }
  }
  for (const auto& name : names) CKPT_RETURN_IF_ERROR(publish(name));
  if (n > 1) {
    if (std::count(stale.begin(), stale.end(), "model.safetensors")) {
      CKPT_RETURN_IF_ERROR(remove("model.safetensors"));
      if (options.sync) CKPT_RETURN_IF_ERROR(SyncDirectory(dir));
    }
    CKPT_RETURN_IF_ERROR(publish(kIndex));
  }
  if (config.ok()) CKPT_RETURN_IF_ERROR(publish("config.json"));
  for (const auto& name : stale) CKPT_RETURN_IF_ERROR(remove(name));
  if (options.sync) CKPT_RETURN_IF_ERROR(SyncDirectory(dir));
  return written;
}

}  // namespace ckpt
