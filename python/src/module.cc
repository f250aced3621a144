// ckpt._ckpt: the C++ library as seen from Python. Thin and torch-free: the
// torch/numpy mapping lives in the pure-Python package (python/ckpt/), which
// is the public API. What is here:
//   Reader  an open file: its tables as TensorRecord / StorageRecord,
//           storage bytes (zero-copy buffers or pread copies with the GIL
//           released), and the object tree built into Python objects with
//           callbacks for tensors, dtypes and devices.
//   Writer  the streaming atomic writer, node by node (and a shard
//           file's chunks, placeholders and root, ckpt/dist.h).
//   DistComm, ShardedCheckpoint, dist_*  sharded checkpoints: the
//           protocol of ckpt/dist.h with its collectives carried by
//           Python callables (ckpt.distributed's torch.distributed gloo
//           group), the C++ work done with the GIL released.
//   import_pth, cli_main, dtypes, xxh3_64, SigintDeferral, format_version.
// Every ckpt::Status error becomes an exception of ckpt._errors, chosen by
// its code, with the library's message (file, offset, tensor).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <signal.h>
#include <sys/mman.h>

#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "ckpt/ckpt.h"
#include "ckpt/dist.h"
#include "ckpt/hf.h"
#include "ckpt/pth.h"
#include "cli/cli.h"
#ifdef CKPT_WITH_CUDA
#include "ckpt/cuda.h"
#include "ckpt/dist_cuda.h"
#endif

namespace py = pybind11;

namespace {

// ---- errors
// ------------------------------------------------------------------

struct StatusError {
  ckpt::Status status;
  // The Python class to raise when it is not the one the code maps to
  // (the importer's refusals are also pickle.UnpicklingError).
  const char* python_class = nullptr;
};

[[noreturn]] void Throw(const ckpt::Status& s) { throw StatusError{s}; }

void Check(const ckpt::Status& s) {
  if (!s.ok()) Throw(s);
}

template <typename T>
T Take(ckpt::Result<T> r) {
  if (!r.ok()) Throw(r.status());
  return std::move(*r);
}

// The bytes of a buffer a caller hands in to be filled (request(true)
// already made): one-dimensional, of bytes, contiguous; else ValueError
// naming `what`.
std::span<std::byte> WritableBytes(const py::buffer_info& info,
                                   const char* what) {
  if (info.ndim != 1 || info.itemsize != 1 ||
      (info.shape[0] > 1 && info.strides[0] != 1)) {
    throw py::value_error(std::string(what) + " must be contiguous bytes");
  }
  return {static_cast<std::byte*>(info.ptr),
          static_cast<size_t>(info.shape[0])};
}

const char* ErrorClass(ckpt::ErrorCode code) {
  switch (code) {
    case ckpt::ErrorCode::kIoError:
      return "CkptIOError";
    case ckpt::ErrorCode::kNotFound:
      return "NotFoundError";
    case ckpt::ErrorCode::kCorrupt:
      return "FormatError";
    case ckpt::ErrorCode::kUnsupportedVersion:
      return "UnsupportedError";
    case ckpt::ErrorCode::kInvalidArgument:
      return "InvalidArgumentError";
    case ckpt::ErrorCode::kChecksumMismatch:
      return "ChecksumError";
    case ckpt::ErrorCode::kCuda:
      return "CudaError";
    case ckpt::ErrorCode::kResourceExhausted:
      return "ResourceExhaustedError";
    default:
      return "CkptError";
  }
}

// Text from a file (or a message quoting it) as a Python str, whatever
// its bytes: invalid UTF-8 is shown escaped, never raised.
py::str Lenient(std::string_view s) {
  PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<ssize_t>(s.size()),
                                     "backslashreplace");
  if (!o) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(o);
}

// A string the format says is UTF-8, as a Python str; invalid UTF-8 is a
// FormatError naming the file and what the string is.
py::str Utf8(std::string_view s, const std::string& file,
             const std::string& what) {
  PyObject* o =
      PyUnicode_DecodeUTF8(s.data(), static_cast<ssize_t>(s.size()), "strict");
  if (o) return py::reinterpret_steal<py::str>(o);
  PyErr_Clear();
  Throw(ckpt::Corrupt(what + " is not valid UTF-8").WithFile(file));
}

// ---- buffers
// -----------------------------------------------------------------

// Bytes plus their owner, exported through the buffer protocol. A torch
// tensor or numpy array made from it keeps it (and so the mapping) alive.
struct Region {
  std::byte* data = nullptr;
  size_t size = 0;
  bool writable = false;
  std::shared_ptr<const void> owner;
  py::object keep;  // the Python bytes a buffer-backed Reader reads from
};

std::span<const std::byte> ReadableBytes(const py::buffer& b,
                                         py::buffer_info& info) {
  info = b.request();
  if (info.ndim > 1) {
    // Only C-contiguous data has a flat byte view: check it.
    ssize_t expect = info.itemsize;
    for (size_t d = static_cast<size_t>(info.ndim); d-- > 0;) {
      if (info.shape[d] != 1 && info.strides[d] != expect) {
        throw py::value_error("buffer is not C-contiguous");
      }
      expect *= info.shape[d];
    }
  } else if (info.ndim == 1 && info.shape[0] > 1 &&
             info.strides[0] != info.itemsize) {
    throw py::value_error("buffer is not contiguous");
  }
  return {static_cast<const std::byte*>(info.ptr),
          static_cast<size_t>(info.size * info.itemsize)};
}

// Fresh destination memory costs a page fault per 4 KiB on first write,
// which dominates a copy from the page cache; with transparent huge pages
// in "madvise" mode, asking for them makes it one fault per 2 MiB. Advice
// only: harmless where THP is off or the range is not eligible.
void AdviseHugePages(std::byte* p, uint64_t n) {
  constexpr uintptr_t kHuge = 2u << 20;
  auto begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  auto end = (reinterpret_cast<uintptr_t>(p) + n) & ~(kHuge - 1);
  if (end > begin) {
    ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
}

// ---- records
// -----------------------------------------------------------------

// A tensor's or a storage's table entry as Python gets it: a struct
// sequence (the C API's named tuple, like os.stat_result), read-only fields
// by name. For 10k tensors it builds as fast as a plain tuple and reads as
// fast as a collections.namedtuple; a pybind11 class read 10x slower.
PyStructSequence_Field kTensorFields[] = {
    {"path", "the tensor path (DESIGN.md), str"},
    {"dtype", "the format's dtype code"},
    {"shape", "tuple of ints"},
    {"strides", "tuple of ints, in elements"},
    {"storage", "index of the storage holding the elements"},
    {"storage_offset", "first element's offset in the storage, in elements"},
    {"requires_grad", "bool"},
    {"is_parameter", "bool: saved as a torch.nn.Parameter"},
    {nullptr, nullptr}};
PyStructSequence_Desc kTensorRecord = {"ckpt._ckpt.TensorRecord",
                                       "One entry of a file's tensor table.",
                                       kTensorFields, 8};

PyStructSequence_Field kStorageFields[] = {
    {"offset", "byte offset of the storage's blob in the file"},
    {"nbytes", "its size in bytes"},
    {"device", "the device it was saved on, str ('cpu', 'cuda:0')"},
    {nullptr, nullptr}};
PyStructSequence_Desc kStorageRecord = {"ckpt._ckpt.StorageRecord",
                                        "One entry of a file's storage table.",
                                        kStorageFields, 3};

// Made once when the module loads; never freed (as the module's own types).
PyTypeObject* g_tensor_record = nullptr;
PyTypeObject* g_storage_record = nullptr;

template <typename T>
py::object AsObject(T&& v) {
  if constexpr (std::is_base_of_v<py::handle, std::decay_t<T>>) {
    return py::reinterpret_borrow<py::object>(v);
  } else {
    return py::cast(std::forward<T>(v));
  }
}

template <typename... T>
py::object NewRecord(PyTypeObject* type, T&&... fields) {
  py::object items[] = {AsObject(std::forward<T>(fields))...};
  PyObject* o = PyStructSequence_New(type);
  if (!o) throw py::error_already_set();
  for (size_t i = 0; i < sizeof...(T); ++i) {
    PyStructSequence_SET_ITEM(o, static_cast<ssize_t>(i),
                              items[i].release().ptr());
  }
  return py::reinterpret_steal<py::object>(o);
}

// ---- Reader
// ------------------------------------------------------------------

class Reader {
 public:
  Reader(const std::string& path, bool copy_on_write)
      : writable_(copy_on_write) {
    ckpt::ReadOptions o;
    o.copy_on_write = copy_on_write;
    py::gil_scoped_release nogil;
    ck_ = std::make_unique<ckpt::Checkpoint>(
        Take(ckpt::Checkpoint::Open(path, o)));
  }

  // Over an immutable bytes object (kept alive by the Reader and by every
  // Region taken from it); views are read-only. `name` is what errors call
  // it (the stream's file name, or "<stream>").
  Reader(py::bytes data, const std::string& name) : keep_(data) {
    std::string_view v = data;
    std::span<const std::byte> bytes{
        reinterpret_cast<const std::byte*>(v.data()), v.size()};
    ck_ = std::make_unique<ckpt::Checkpoint>(
        Take(ckpt::Checkpoint::OpenBuffer(bytes, name)));
  }

  // Over a Checkpoint opened elsewhere (a sharded checkpoint's shard file,
  // checked against its pin).
  explicit Reader(ckpt::Checkpoint ck)
      : ck_(std::make_unique<ckpt::Checkpoint>(std::move(ck))) {}

  const ckpt::Checkpoint& ck() const { return *ck_; }

  py::dict Metadata() const {
    py::dict d;
    for (auto& [k, v] : ck_->metadata()) {
      d[Utf8(k, ck_->path(), "a metadata key")] =
          Utf8(v, ck_->path(),
               "the metadata value of '" + EscapedForMessage(k) + "'");
    }
    return d;
  }

  static py::tuple Ints(const std::vector<int64_t>& v) {
    py::tuple t(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      PyTuple_SET_ITEM(t.ptr(), static_cast<ssize_t>(i),
                       PyLong_FromLongLong(v[i]));
    }
    return t;
  }

  py::object TensorRecordOf(const ckpt::TensorInfo& t) const {
    return NewRecord(
        g_tensor_record, Utf8(t.path, ck_->path(), "a tensor path"),
        static_cast<int>(t.dtype), Ints(t.shape), Ints(t.strides), t.storage,
        t.storage_offset, t.requires_grad, t.is_parameter);
  }

  py::list Storages() const {
    py::list out;
    for (size_t i = 0; i < ck_->num_storages(); ++i) out.append(StorageAt(i));
    return out;
  }

  py::list Tensors() const {
    py::list out;
    for (size_t i = 0; i < ck_->num_tensors(); ++i)
      out.append(TensorRecordOf(*ck_->TensorInfoAt(i)));
    return out;
  }

  // The tensor paths as str, sorted, without a record per tensor
  // (File.keys(), safe_open's keys()).
  py::list Paths() const {
    std::vector<std::string_view> paths = ck_->TensorPaths();
    py::list out(paths.size());
    for (size_t i = 0; i < paths.size(); ++i)
      out[i] = Utf8(paths[i], ck_->path(), "a tensor path");
    return out;
  }

  py::object TensorAt(size_t index) const {
    if (index >= ck_->num_tensors())
      throw py::index_error("tensor index out of range");
    return TensorRecordOf(Take(ck_->TensorInfoAt(index)));
  }

  py::object StorageAt(size_t index) const {
    if (index >= ck_->num_storages())
      throw py::index_error("storage index out of range");
    auto s = Take(ck_->StorageInfoAt(index));
    return NewRecord(g_storage_record, s.offset, s.nbytes,
                     Utf8(s.device, ck_->path(),
                          "the device of storage " + std::to_string(index)));
  }

  size_t TensorIndex(const std::string& path) const {
    return Take(ck_->FindTensor(path)).index;
  }

  Region StorageRegion(size_t index) const {
    auto v = Take(ck_->Storage(index));
    return Region{const_cast<std::byte*>(v.data.data()), v.data.size(),
                  writable_, std::move(v.owner), keep_};
  }

  // Rows [begin, end) of dim 0 of a tensor: the tensor's record with the
  // offset and shape of the rows.
  py::object Rows(const std::string& path, int64_t begin, int64_t end) const {
    auto ref = Take(ck_->TensorRows(path, begin, end));
    return TensorRecordOf(ref.info());
  }

  // Copies storages into caller buffers with pread (Checkpoint::
  // ReadStorages: `threads` at a time, in 8 MiB pieces), without the GIL.
  void ReadStorages(const std::vector<size_t>& indices,
                    const std::vector<py::buffer>& outs,
                    unsigned threads) const {
    if (indices.size() != outs.size())
      throw py::value_error("one buffer per storage");
    std::vector<py::buffer_info> infos;  // hold the buffers until done
    infos.reserve(outs.size());
    std::vector<ckpt::Checkpoint::StorageRead> reads;
    reads.reserve(outs.size());
    for (size_t i = 0; i < outs.size(); ++i) {
      infos.push_back(outs[i].request(true));
      std::span<std::byte> out = WritableBytes(infos.back(), "storage buffers");
      if (indices[i] >= ck_->num_storages() ||
          out.size() != ck_->StorageInfoAt(indices[i])->nbytes) {
        throw py::value_error("buffer " + std::to_string(i) +
                              " does not match storage " +
                              std::to_string(indices[i]));
      }
      AdviseHugePages(out.data(), out.size());
      reads.push_back({indices[i], 0, out});
    }
    ckpt::Status s;
    {
      py::gil_scoped_release nogil;
      s = ck_->ReadStorages(reads, threads);
    }
    Check(s);
  }

  // Byte ranges of storages into buffers, one pread each (ReadStorages):
  // for loaders that read parts of tensors (ckpt.serving's slices).
  // Returns the bytes read.
  uint64_t ReadRanges(const std::vector<size_t>& storages,
                      const std::vector<uint64_t>& begins,
                      const std::vector<py::buffer>& outs,
                      unsigned threads) const {
    if (storages.size() != outs.size() || begins.size() != outs.size())
      throw py::value_error("one storage and one begin per buffer");
    std::vector<py::buffer_info> infos;  // hold the buffers until done
    infos.reserve(outs.size());
    std::vector<ckpt::Checkpoint::StorageRead> reads;
    reads.reserve(outs.size());
    uint64_t total = 0;
    for (size_t i = 0; i < outs.size(); ++i) {
      infos.push_back(outs[i].request(true));
      std::span<std::byte> out = WritableBytes(infos.back(), "range buffers");
      // ReadStorages checks every range against its storage first.
      reads.push_back({storages[i], begins[i], out});
      total += out.size();
    }
    ckpt::Status s;
    {
      py::gil_scoped_release nogil;
      s = ck_->ReadStorages(reads, threads);
    }
    Check(s);
    return total;
  }

  void Verify(unsigned threads) const {
    py::gil_scoped_release nogil;
    Check(ck_->Verify(ckpt::VerifyOptions{threads}));
  }

  // The node at `path` ("" = the root) as Python objects. Tensors become
  // on_tensor(index, type_name), dtypes on_dtype(code), devices
  // on_device(str, where, offset) (the tree path and the node's byte
  // offset, for messages).
  py::object Tree(const std::string& path, const py::function& on_tensor,
                  const py::function& on_dtype,
                  const py::function& on_device) const {
    ckpt::Value v = Node(path);
    Builder b{on_tensor,
              on_dtype,
              on_device,
              py::module_::import("collections").attr("OrderedDict"),
              py::module_::import("argparse").attr("Namespace"),
              py::module_::import("builtins").attr("int").attr("from_bytes"),
              ck_->path(),
              path,
              {},
              {}};
    return b.Build(v);
  }

  std::string Kind(const std::string& path) const {
    return std::string(ckpt::ValueKindName(Node(path).kind()));
  }

  std::string Path() const { return ck_->path(); }

 private:
  // A string from the file, made printable for an error message: control
  // characters escaped; other bytes kept (the file's strings are UTF-8,
  // checked at open, so "é" stays "é").
  static std::string EscapedForMessage(std::string_view s) {
    std::string out;
    for (char ch : s) {
      const auto c = static_cast<unsigned char>(ch);
      if (c >= 0x20 && c != 0x7f) {
        out += static_cast<char>(c);
      } else {
        char b[5];
        std::snprintf(b, sizeof b, "\\x%02x", c);
        out += b;
      }
    }
    return out;
  }

  // The node at a tree path; "" is the root.
  ckpt::Value Node(const std::string& path) const {
    return path.empty() ? ck_->root() : Take(ck_->Get(path));
  }

  // Builds Python objects from a (sub)tree without recursion: an explicit
  // stack of open containers, so a tree of the format's full depth (1000,
  // R14) costs neither C++ stack nor Python recursion. Every problem a
  // hostile but well-formed file can cause here (a set or key holding an
  // unhashable, invalid UTF-8, a device torch refuses) is a FormatError
  // naming the file and the tree path.
  struct Builder {
    const py::function& on_tensor;
    const py::function& on_dtype;
    const py::function& on_device;
    py::object ordered_dict;
    py::object namespace_;
    py::object int_from_bytes;
    std::string file;
    std::string base;  // the tree path of the node being built
    ckpt::Value root;  // the node Build() was given

    using K = ckpt::ValueKind;

    struct Frame {
      ckpt::Value v;
      size_t next =
          0;  // next step: items, or for a dict key 0, value 0, key 1...
      py::object out;  // list, or dict for dicts; items of tuples and sets go
                       // in a list
      py::object key;  // a dict's key waiting for its value
    };
    std::vector<Frame> stack;

    static size_t Steps(const Frame& f) {
      return f.v.kind() == K::kDict ? 2 * f.v.size() : f.v.size();
    }

    // The segment (raw) of the child taken at step `s` of frame `f`; a key
    // itself, which has no path of its own, is labelled "<key K>".
    static std::string Segment(const Frame& f, size_t s) {
      if (f.v.kind() != K::kDict) return std::to_string(s);
      std::string key = EscapedForMessage(f.v.key(s / 2).KeySegment());
      return s % 2 == 0 ? "<key " + key + ">" : key;
    }

    // The tree path of the node being built (`child`) or of the open
    // container on top, as f.get() takes it (PathBuilder: escaped
    // segments), for messages.
    std::string Where(bool child) const {
      std::string p = base;
      bool at_root = base.empty();
      for (size_t k = 0; k < stack.size(); ++k) {
        bool last = k + 1 == stack.size();
        if (last && !child) break;
        p = ckpt::PathBuilder::Child(p, at_root,
                                     Segment(stack[k], stack[k].next - 1));
        at_root = false;
      }
      return p.empty() ? "<root>" : p;
    }

    // The node a failure is about: the child being built, or the open
    // container on top.
    ckpt::Value Culprit(bool child) const {
      if (stack.empty()) return root;
      const Frame& f = stack.back();
      if (!child || f.next == 0) return f.v;
      size_t s = f.next - 1;
      return f.v.kind() == K::kDict
                 ? (s % 2 == 0 ? f.v.key(s / 2) : f.v.item(s / 2))
                 : f.v.item(s);
    }

    [[noreturn]] void Fail(const std::string& what, bool child) const {
      Throw(ckpt::Corrupt("tree path '" + Where(child) + "': " + what)
                .WithFile(file)
                .WithOffset(Culprit(child).file_offset()));
    }

    // A Python exception our own building raised (unhashable, bad text):
    // replaced by a FormatError saying where.
    [[noreturn]] void FailFromPython(const std::string& what,
                                     bool child) const {
      py::error_already_set e;  // fetches and clears the Python error
      std::string why = py::str(e.value()).cast<std::string>();
      Fail(what + " (" + why + ")", child);
    }

    py::object Scalar(const ckpt::Value& v) {
      switch (v.kind()) {
        case K::kNone:
          return py::none();
        case K::kBool:
          return py::bool_(v.as_bool());
        case K::kInt:
          return py::int_(v.as_int());
        case K::kBigInt: {
          auto b = v.as_bytes();
          py::bytes raw(reinterpret_cast<const char*>(b.data()), b.size());
          return int_from_bytes(raw, "little", py::arg("signed") = true);
        }
        case K::kFloat:
          return py::float_(v.as_float());
        case K::kComplex: {
          auto c = v.as_complex();
          return py::reinterpret_steal<py::object>(
              PyComplex_FromDoubles(c.real(), c.imag()));
        }
        case K::kString:
          return Text(v.as_string(), "a string");
        case K::kBytes: {
          auto b = v.as_bytes();
          return py::bytes(reinterpret_cast<const char*>(b.data()), b.size());
        }
        case K::kTensor:
          return on_tensor(Take(v.tensor_index()),
                           Text(v.type_name(), "a tensor's type name"));
        case K::kDType:
          return on_dtype(static_cast<int>(v.as_dtype()), v.file_offset());
        case K::kDevice:
          return on_device(Text(v.as_string(), "a device string"),
                           Lenient(Where(true)), v.file_offset());
        // Containers are built by the walk, never here; listed (not
        // defaulted) so a new kind is a -Wswitch error in this switch.
        case K::kList:
        case K::kTuple:
        case K::kDict:
        case K::kSet:
        case K::kFrozenSet:
          break;
      }
      Fail("unknown node kind " + std::to_string(static_cast<int>(v.kind())),
           true);
    }

    py::object Text(std::string_view s, const char* what) {
      PyObject* o = PyUnicode_DecodeUTF8(
          s.data(), static_cast<ssize_t>(s.size()), "strict");
      if (!o) FailFromPython(std::string(what) + " is not valid UTF-8", true);
      return py::reinterpret_steal<py::object>(o);
    }

    void Open(const ckpt::Value& v) {
      Frame f{v, 0, py::object(), py::object()};
      if (v.kind() == K::kDict) {
        f.out = v.type_name() == "collections.OrderedDict" ? ordered_dict()
                                                           : py::dict();
      } else {
        f.out = py::list();
      }
      stack.push_back(std::move(f));
    }

    // The finished container of the top frame.
    py::object Close() {
      Frame& f = stack.back();
      switch (f.v.kind()) {
        case K::kList:
          return f.out;
        case K::kTuple: {
          PyObject* t = PyList_AsTuple(f.out.ptr());
          if (!t) throw py::error_already_set();
          return py::reinterpret_steal<py::object>(t);
        }
        case K::kSet:
        case K::kFrozenSet: {
          PyObject* s = f.v.kind() == K::kSet ? PySet_New(f.out.ptr())
                                              : PyFrozenSet_New(f.out.ptr());
          if (!s)
            FailFromPython("a set holds an item Python cannot put in a set",
                           false);
          return py::reinterpret_steal<py::object>(s);
        }
        case K::kDict: {
          if (f.v.type_name() != "argparse.Namespace") return f.out;
          py::object ns = namespace_();
          for (auto item : py::reinterpret_borrow<py::dict>(f.out)) {
            if (!py::isinstance<py::str>(item.first)) {
              Fail("an argparse.Namespace with a key that is not a str", false);
            }
            py::setattr(ns, item.first, item.second);
          }
          return ns;
        }
        default:
          Fail("not a container", false);
      }
    }

    void Deliver(py::object obj) {
      Frame& f = stack.back();
      if (f.v.kind() != K::kDict) {
        if (PyList_Append(f.out.ptr(), obj.ptr()) != 0)
          throw py::error_already_set();
        return;
      }
      if ((f.next - 1) % 2 == 0) {
        f.key = std::move(obj);
        return;
      }
      if (PyObject_SetItem(f.out.ptr(), f.key.ptr(), obj.ptr()) != 0) {
        // Report the key's own path, not the value's.
        --f.next;
        FailFromPython("a dict key Python cannot hash", true);
      }
      f.key = py::object();
    }

    py::object Build(const ckpt::Value& top) {
      root = top;
      if (!root.is_container()) return Scalar(root);
      Open(root);
      for (;;) {
        Frame& f = stack.back();
        if (f.next == Steps(f)) {
          py::object done = Close();
          stack.pop_back();
          if (stack.empty()) return done;
          Deliver(std::move(done));
          continue;
        }
        size_t s = f.next++;
        ckpt::Value child =
            f.v.kind() == K::kDict
                ? (s % 2 == 0 ? f.v.key(s / 2) : f.v.item(s / 2))
                : f.v.item(s);
        if (child.is_container()) {
          if (stack.size() >= ckpt::kMaxTreeDepth)
            Fail("nested too deeply", true);
          Open(child);  // invalidates f
        } else {
          Deliver(Scalar(child));
        }
      }
    }
  };

  std::unique_ptr<ckpt::Checkpoint> ck_;
  bool writable_ = false;
  py::object keep_;
};

// ---- dict keys as path segments
// ----------------------------------------------

// A Python dict key as the library's PathKey, for KeySegment: None, bool,
// int (any size), float, complex, str, bytes/bytearray, tuple, frozenset.
// Anything else goes to on_object(obj), which returns (kind code, payload)
// for what this torch-free module cannot recognise (a torch.dtype: dtype
// code; a torch.device: its string; a numpy scalar: the Python number of
// its kind), or None when it is no key.
class KeyConverter {
 public:
  explicit KeyConverter(py::object on_object)
      : on_object_(std::move(on_object)) {}

  ckpt::PathKey Convert(py::handle key, size_t depth = 1) const {
    using K = ckpt::ValueKind;
    if (depth > ckpt::kMaxTreeDepth) {
      throw py::value_error("dict key: nested deeper than " +
                            std::to_string(ckpt::kMaxTreeDepth) + " levels");
    }
    ckpt::PathKey out;
    PyObject* o = key.ptr();
    if (o == Py_None) {
      out.kind = K::kNone;
    } else if (PyBool_Check(o)) {
      out.kind = K::kBool;
      out.int_value = o == Py_True;
    } else if (PyLong_Check(o)) {
      Int(key, out);
    } else if (PyFloat_Check(o)) {
      out.kind = K::kFloat;
      out.float_value = PyFloat_AsDouble(o);
    } else if (PyComplex_Check(o)) {
      out.kind = K::kComplex;
      out.float_value = PyComplex_RealAsDouble(o);
      out.imag_value = PyComplex_ImagAsDouble(o);
    } else if (PyUnicode_Check(o)) {
      out.kind = K::kString;
      Py_ssize_t n = 0;
      const char* p = PyUnicode_AsUTF8AndSize(o, &n);
      if (!p) throw py::error_already_set();  // a lone surrogate
      out.text.assign(p, static_cast<size_t>(n));
    } else if (PyBytes_Check(o) || PyByteArray_Check(o)) {
      out.kind = K::kBytes;
      std::string_view b =
          PyBytes_Check(o)
              ? std::string_view(PyBytes_AS_STRING(o),
                                 static_cast<size_t>(PyBytes_GET_SIZE(o)))
              : std::string_view(PyByteArray_AS_STRING(o),
                                 static_cast<size_t>(PyByteArray_GET_SIZE(o)));
      out.bytes.assign(b.begin(), b.end());
    } else if (PyTuple_CheckExact(o) || PyFrozenSet_CheckExact(o)) {
      out.kind = PyTuple_CheckExact(o) ? K::kTuple : K::kFrozenSet;
      for (py::handle item : key) out.items.push_back(Convert(item, depth + 1));
    } else {
      Other(key, out, depth);
    }
    return out;
  }

 private:
  static void Int(py::handle v, ckpt::PathKey& out) {
    int overflow = 0;
    long long i = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
    if (i == -1 && PyErr_Occurred()) throw py::error_already_set();
    if (!overflow) {
      out.kind = ckpt::ValueKind::kInt;
      out.int_value = i;
      return;
    }
    // Minimal two's complement, as the writer stores a BigInt.
    py::int_ n = py::reinterpret_borrow<py::int_>(v);
    py::object magnitude = overflow > 0 ? py::object(n) : py::object(~n);
    size_t len = (magnitude.attr("bit_length")().cast<size_t>() + 8) / 8;
    if (len > ckpt::kMaxBigIntBytes) {
      Throw(ckpt::InvalidArgument("dict key: an int of " + std::to_string(len) +
                                  " bytes; the format holds ints of at most " +
                                  std::to_string(ckpt::kMaxBigIntBytes) +
                                  " bytes"));
    }
    py::bytes le = n.attr("to_bytes")(len, "little", py::arg("signed") = true);
    std::string_view b = le;
    out.kind = ckpt::ValueKind::kBigInt;
    out.bytes.assign(b.begin(), b.end());
  }

  // `depth` counts on: on_object's payload is converted one level down, so
  // a callback that hands back its own argument cannot recurse forever.
  void Other(py::handle key, ckpt::PathKey& out, size_t depth) const {
    using K = ckpt::ValueKind;
    py::object r = on_object_.is_none() ? py::none() : on_object_(key);
    if (r.is_none()) {
      throw py::type_error(
          "dict key: a " +
          py::str(py::type::handle_of(key).attr("__qualname__"))
              .cast<std::string>() +
          " is not a key ckpt can store");
    }
    auto [code, payload] = r.cast<std::pair<int, py::object>>();
    auto kind = code >= 0 && code <= ckpt::kMaxValueKindCode
                    ? ckpt::ValueKindFromCode(static_cast<uint8_t>(code))
                    : std::nullopt;
    switch (kind.value_or(K::kList)) {
      case K::kDType:
        out.kind = K::kDType;
        out.int_value = payload.cast<int64_t>();
        return;
      case K::kDevice:
        out.kind = K::kDevice;
        out.text = payload.cast<std::string>();
        return;
      case K::kBool:
      case K::kInt:
      case K::kFloat:
      case K::kComplex:
        out = Convert(payload, depth + 1);
        if (out.kind == *kind || (*kind == K::kInt && out.kind == K::kBigInt)) {
          return;
        }
        break;
      default:
        break;
    }
    throw py::value_error("key_segment: on_object gave kind " +
                          std::to_string(code) + " with a payload of another");
  }

  py::object on_object_;
};

// ---- Writer
// ------------------------------------------------------------------

class PyWriter {
 public:
  PyWriter(const std::string& path, bool sync, uint64_t chunk_size,
           const std::string& producer) {
    ckpt::WriteOptions o;
    o.sync = sync;
    if (chunk_size) o.chunk_size = chunk_size;
    o.producer = producer;
    w_ = std::make_unique<ckpt::Writer>(Take(ckpt::Writer::Create(path, o)));
  }

  ckpt::Writer& w() {
    if (!w_) throw py::value_error("the writer is closed");
    return *w_;
  }

  uint32_t AddStorage(const py::buffer& b, const std::string& device) {
    py::buffer_info info;
    auto bytes = ReadableBytes(b, info);
    py::gil_scoped_release nogil;
    return Take(w().AddStorage(bytes, device));
  }
  uint32_t BeginStorage(uint64_t nbytes, const std::string& device) {
    return Take(w().BeginStorage(nbytes, device));
  }
  void Append(const py::buffer& b) {
    py::buffer_info info;
    auto bytes = ReadableBytes(b, info);
    py::gil_scoped_release nogil;
    Check(w().Append(bytes));
  }
  void EndStorage() { Check(w().EndStorage()); }

  uint32_t AddTensor(int dtype, std::vector<int64_t> shape,
                     std::vector<int64_t> strides, uint32_t storage,
                     int64_t offset, bool requires_grad, bool is_parameter) {
    ckpt::TensorSpec s;
    s.dtype = static_cast<ckpt::DType>(dtype);
    s.shape = std::move(shape);
    s.strides = std::move(strides);
    s.storage = storage;
    s.storage_offset = offset;
    s.requires_grad = requires_grad;
    s.is_parameter = is_parameter;
    return Take(w().AddTensor(s));
  }

  uint32_t AddBigInt(const py::bytes& le) {
    std::string_view s = le;
    return Take(
        w().AddBigInt({reinterpret_cast<const uint8_t*>(s.data()), s.size()}));
  }
  // A container of items only (List, Tuple, Set, FrozenSet; Dict has keys
  // and a class tag: add_dict), by its kind code (value_kinds()).
  uint32_t AddItems(int code, const std::vector<uint32_t>& items) {
    using K = ckpt::ValueKind;
    auto kind = code >= 0 && code <= ckpt::kMaxValueKindCode
                    ? ckpt::ValueKindFromCode(static_cast<uint8_t>(code))
                    : std::nullopt;
    switch (kind.value_or(K::kNone)) {
      case K::kList:
        return Take(w().AddList(items));
      case K::kTuple:
        return Take(w().AddTuple(items));
      case K::kSet:
        return Take(w().AddSet(items));
      case K::kFrozenSet:
        return Take(w().AddFrozenSet(items));
      default:
        throw py::value_error("add_items: kind " + std::to_string(code) +
                              " is not a container of items");
    }
  }

  uint32_t AddBytes(const py::bytes& b) {
    std::string_view s = b;
    return w().AddBytes({reinterpret_cast<const uint8_t*>(s.data()), s.size()});
  }

  void Commit() {
    {
      py::gil_scoped_release nogil;
      Check(w().Commit());
      // A shard file's record, for the commit of the save (CommitSave);
      // a writer used without set_shard_root (ckpt.dcp's) has none, and
      // its commit reads the file back instead.
      if (record_ && !record_->Seal(w()).ok()) record_.reset();
    }
    w_.reset();
  }
  void Abort() {
    if (w_) w_->Abort();
    w_.reset();
    record_.reset();
  }

  // The sealed record as bytes (ckpt.dcp carries it to its coordinator
  // in DCP's write results), or None.
  py::object RecordBytes() const {
    if (!record_ || !record_->sealed()) return py::none();
    auto b = Take(record_->Serialize());
    return py::bytes(reinterpret_cast<const char*>(b.data()), b.size());
  }

  // What add_chunk / set_shard_root record of a shard file, made at the
  // first chunk; outlives the writer (dist_commit_save takes it).
  ckpt::dist::ShardRecord* record(bool create) {
    if (!record_ && create)
      record_ = std::make_unique<ckpt::dist::ShardRecord>();
    return record_.get();
  }

 private:
  std::unique_ptr<ckpt::Writer> w_;
  std::unique_ptr<ckpt::dist::ShardRecord> record_;
};

// ---- sharded checkpoints (ckpt/dist.h)
// -----------------------------------------------

// The collectives of ckpt::dist::Comm carried by Python callables, which
// ckpt.distributed makes over a torch.distributed gloo group (sizes first,
// then padded uint8 tensors: never pickled objects):
//   gather(root, mine: bytes) -> list of buffers on root, [] elsewhere
//   broadcast(root, data: bytes | None) -> buffer
// The protocol runs with the GIL released; each collective takes it back
// for the call. A Python exception from a callable (a peer gone, a
// timeout) is a kIoError naming the collective, as the interface asks.
class PyComm final : public ckpt::dist::Comm {
 public:
  PyComm(int rank, int size, py::function gather, py::function broadcast)
      : rank_(rank),
        size_(size),
        gather_(std::move(gather)),
        broadcast_(std::move(broadcast)) {
    if (size < 1 || rank < 0 || rank >= size)
      throw py::value_error("Comm: rank " + std::to_string(rank) +
                            " of a group of " + std::to_string(size));
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  ckpt::Result<std::vector<std::vector<std::byte>>> Gather(
      int root, std::span<const std::byte> mine) override {
    py::gil_scoped_acquire gil;
    try {
      py::object r = gather_(root, AsBytes(mine));
      std::vector<std::vector<std::byte>> out;
      if (rank_ != root) return out;
      for (py::handle item : r) out.push_back(Copy(item));
      if (out.size() != static_cast<size_t>(size_)) {
        return ckpt::IoError("gather: " + std::to_string(out.size()) +
                             " answers for a group of " +
                             std::to_string(size_));
      }
      return out;
    } catch (py::error_already_set& e) {
      return ckpt::IoError("gather over torch.distributed failed on rank " +
                           std::to_string(rank_) + ": " + Describe(e));
    }
  }

  ckpt::Result<std::vector<std::byte>> Broadcast(
      int root, std::span<const std::byte> bytes) override {
    py::gil_scoped_acquire gil;
    try {
      py::object arg =
          rank_ == root ? py::object(AsBytes(bytes)) : py::object(py::none());
      return Copy(broadcast_(root, arg));
    } catch (py::error_already_set& e) {
      return ckpt::IoError("broadcast over torch.distributed failed on rank " +
                           std::to_string(rank_) + ": " + Describe(e));
    }
  }

 private:
  // "RuntimeError: message", without the traceback e.what() appends.
  static std::string Describe(const py::error_already_set& e) {
    std::string type = py::str(e.type().attr("__name__")).cast<std::string>();
    return type + ": " + py::str(e.value()).cast<std::string>();
  }
  static py::bytes AsBytes(std::span<const std::byte> b) {
    return py::bytes(reinterpret_cast<const char*>(b.data()), b.size());
  }
  static std::vector<std::byte> Copy(py::handle obj) {
    py::buffer_info info;
    auto bytes = ReadableBytes(py::reinterpret_borrow<py::buffer>(obj), info);
    return {bytes.begin(), bytes.end()};
  }

  int rank_;
  int size_;
  py::function gather_;
  py::function broadcast_;
};

// A rank's local outcome from Python: None (OK) or (class name, message),
// the class one of ckpt._errors' (its code kept) or any other exception's
// (kInvalidArgument: the caller's state dict was refused).
ckpt::Status LocalStatus(const py::object& err) {
  if (err.is_none()) return ckpt::Status::OK();
  auto [cls, msg] = err.cast<std::pair<std::string, std::string>>();
  using E = ckpt::ErrorCode;
  for (E code : {E::kIoError, E::kNotFound, E::kCorrupt, E::kUnsupportedVersion,
                 E::kInvalidArgument, E::kChecksumMismatch, E::kCuda,
                 E::kResourceExhausted}) {
    if (cls == ErrorClass(code)) return ckpt::Status(code, msg);
  }
  return ckpt::InvalidArgument(msg);
}

ckpt::Box BoxOf(std::vector<int64_t> offsets, std::vector<int64_t> sizes) {
  if (offsets.size() != sizes.size())
    throw py::value_error("a box needs as many offsets as sizes");
  return ckpt::Box{std::move(offsets), std::move(sizes)};
}

// One want of ShardedCheckpoint.load / load_to_device: (path, offsets,
// sizes, X), X being `last` (a buffer or a device pointer).
struct WantTuple {
  std::string path;
  ckpt::Box box;
  py::object last;
};
WantTuple ParseWant(py::handle item, const char* last) {
  auto t = item.cast<py::tuple>();
  if (t.size() != 4) {
    throw py::value_error(std::string("a want is (path, offsets, sizes, ") +
                          last + ")");
  }
  return {t[0].cast<std::string>(),
          BoxOf(t[1].cast<std::vector<int64_t>>(),
                t[2].cast<std::vector<int64_t>>()),
          t[3]};
}

py::tuple Ints(const std::vector<int64_t>& v) { return Reader::Ints(v); }

py::dict CommitInfoDict(const ckpt::dist::CommitInfo& c) {
  py::dict d;
  d["path"] = Lenient(c.path);
  d["total_bytes"] = c.total_bytes;
  d["files"] = c.files;
  d["tensors"] = c.tensors;
  d["chunks"] = c.chunks;
  return d;
}

ckpt::dist::SaveOptions SaveOptionsOf(int coordinator, bool overwrite,
                                      bool sync, const py::dict& metadata) {
  ckpt::dist::SaveOptions o;
  o.coordinator = coordinator;
  o.overwrite = overwrite;
  o.write.sync = sync;
  o.write.producer = "ckpt-python " + std::string(ckpt::VersionString());
  for (auto item : metadata) {
    o.metadata.emplace_back(item.first.cast<std::string>(),
                            item.second.cast<std::string>());
  }
  return o;
}

// The manifest as plain Python values (ckpt.distributed makes its
// dataclasses of them): strings from the file are checked UTF-8.
py::dict ManifestDict(const ckpt::dist::Manifest& m, const std::string& dir) {
  const std::string file = dir + "/" + std::string(ckpt::dist::kManifestName);
  py::dict d;
  d["version"] = py::make_tuple(m.version_major, m.version_minor);
  d["world_size"] = m.world_size;
  d["globals_file"] = m.globals_file;
  d["producer"] = Utf8(m.producer, file, "the producer");
  py::list files;
  for (const auto& f : m.files) {
    py::dict e;
    e["name"] = Utf8(f.name, file, "a shard file name");
    e["size"] = f.size;
    e["header_xxh3"] = f.header_xxh3;
    e["rank"] = f.rank;
    files.append(e);
  }
  d["files"] = files;
  py::list tensors;
  for (const auto& t : m.tensors) {
    py::list chunks;
    for (const auto& c : t.chunks) {
      chunks.append(py::make_tuple(Ints(c.box.offsets), Ints(c.box.sizes),
                                   c.file, c.offset, c.length));
    }
    tensors.append(py::make_tuple(Utf8(t.path, file, "a tensor path"),
                                  static_cast<int>(t.dtype), Ints(t.shape),
                                  chunks));
  }
  d["tensors"] = tensors;
  py::dict meta;
  for (const auto& [k, v] : m.metadata) {
    meta[Utf8(k, file, "a metadata key")] = Utf8(v, file, "a metadata value");
  }
  d["metadata"] = meta;
  return d;
}

py::dict LoadStatsDict(const ckpt::dist::LoadStats& s) {
  py::dict d;
  d["bytes_needed"] = s.bytes_needed;
  d["bytes_read"] = s.bytes_read;
  d["bytes_verified"] = s.bytes_verified;
  d["runs"] = s.runs;
  d["files_opened"] = s.files_opened;
  return d;
}

// An open sharded checkpoint; collective to open when given a Comm.
class PySharded {
 public:
  PySharded(const std::string& dir, PyComm* comm, int coordinator) {
    py::gil_scoped_release nogil;
    ck_ = std::make_unique<ckpt::dist::ShardedCheckpoint>(
        Take(comm ? ckpt::dist::ShardedCheckpoint::Open(*comm, dir, coordinator)
                  : ckpt::dist::ShardedCheckpoint::Open(dir)));
  }

  explicit PySharded(ckpt::dist::ShardedCheckpoint ck)
      : ck_(std::make_unique<ckpt::dist::ShardedCheckpoint>(std::move(ck))) {}

  // One ckpt file as a one-rank sharded checkpoint (OpenFile).
  static PySharded OpenFile(const std::string& path) {
    ckpt::Result<ckpt::dist::ShardedCheckpoint> r =
        ckpt::Status(ckpt::ErrorCode::kInvalidArgument, "unset");
    {
      py::gil_scoped_release nogil;
      r = ckpt::dist::ShardedCheckpoint::OpenFile(path);
    }
    return PySharded(Take(std::move(r)));
  }

  const ckpt::dist::ShardedCheckpoint& ck() const { return *ck_; }

#ifdef CKPT_WITH_CUDA
  // The wants (path, offsets, sizes, device pointer of the box's dense
  // row-major bytes) by LoadBoxesToDevice: row runs through the pinned
  // ring, column slices with one cudaMemcpy2DAsync per strided pattern.
  py::dict LoadToDevice(const py::list& wants, int device, bool verify,
                        unsigned threads) const {
    std::vector<ckpt::dist::DeviceWant> ws;
    ws.reserve(wants.size());
    for (py::handle item : wants) {
      WantTuple w = ParseWant(item, "pointer");
      ws.push_back({std::move(w.path), std::move(w.box),
                    reinterpret_cast<void*>(w.last.cast<uintptr_t>())});
    }
    ckpt::DeviceLoadOptions o;
    o.device = "cuda:" + std::to_string(device);
    o.verify_checksums = verify;
    o.threads = threads;
    ckpt::Result<ckpt::dist::LoadStats> r = ckpt::dist::LoadStats{};
    {
      py::gil_scoped_release nogil;
      r = ckpt::dist::LoadBoxesToDevice(*ck_, ws, o);
    }
    return LoadStatsDict(Take(std::move(r)));
  }
#endif

  // Plans and reads the wants (path, offsets, sizes, writable buffer of
  // the box's bytes) into their buffers, the GIL released. Local: the
  // caller agrees on the outcome across ranks.
  py::dict Load(const py::list& wants, bool verify, unsigned threads) const {
    std::vector<py::buffer_info> infos;  // hold the buffers until done
    infos.reserve(wants.size());
    std::vector<ckpt::dist::Want> ws;
    ws.reserve(wants.size());
    for (py::handle item : wants) {
      WantTuple w = ParseWant(item, "buffer");
      infos.push_back(w.last.cast<py::buffer>().request(true));
      std::span<std::byte> out = WritableBytes(infos.back(), "want buffers");
      AdviseHugePages(out.data(), out.size());
      ws.push_back({std::move(w.path), std::move(w.box), out});
    }
    ckpt::dist::LoadOptions o;
    o.verify = verify;
    o.threads = threads;
    ckpt::Result<ckpt::dist::LoadStats> r = ckpt::dist::LoadStats{};
    {
      py::gil_scoped_release nogil;
      auto plan = ck_->Plan(ws);
      r = plan.ok() ? ck_->Execute(*plan, o)
                    : ckpt::Result<ckpt::dist::LoadStats>(plan.status());
    }
    return LoadStatsDict(Take(std::move(r)));
  }

  Region Read(const std::string& path, std::vector<int64_t> offsets,
              std::vector<int64_t> sizes, bool verify) const {
    ckpt::dist::LoadOptions o;
    o.verify = verify;
    ckpt::Box box = BoxOf(std::move(offsets), std::move(sizes));
    ckpt::Result<ckpt::StorageView> v = ckpt::StorageView{};
    {
      py::gil_scoped_release nogil;
      v = ck_->Read(path, box, o);
    }
    auto view = Take(std::move(v));
    // A view of the mapping is read-only; a buffer the result owns too
    // (the caller copies out of it or keeps it as is).
    return Region{const_cast<std::byte*>(view.data.data()), view.data.size(),
                  false, std::move(view.owner), py::object()};
  }

  Reader OpenShard(size_t index) const {
    py::gil_scoped_release nogil;
    return Reader(Take(ck_->OpenShard(index)));
  }

  void Verify(unsigned threads) const {
    py::gil_scoped_release nogil;
    Check(ck_->Verify(threads));
  }

 private:
  std::unique_ptr<ckpt::dist::ShardedCheckpoint> ck_;
};

void BindDist(py::module_& m, py::class_<PyWriter>& writer) {
  py::class_<PyComm>(m, "DistComm")
      .def(py::init<int, int, py::function, py::function>(), py::arg("rank"),
           py::arg("size"), py::arg("gather"), py::arg("broadcast"))
      .def_property_readonly("rank", &PyComm::rank)
      .def_property_readonly("size", &PyComm::size);

  // Shard files: chunks (their ReplicaPart, contiguous), the globals
  // tree's placeholders and the root of docs/SHARDED.md 3.
  writer
      .def(
          "add_chunk",
          [](PyWriter& w, const std::string& path, int dtype,
             std::vector<int64_t> global_shape, std::vector<int64_t> offsets,
             std::vector<int64_t> sizes, const py::buffer& data,
             uint32_t replica_index,
             uint32_t replica_count) -> std::optional<uint32_t> {
            py::buffer_info info;
            ckpt::dist::Chunk c;
            c.path = path;
            c.dtype = static_cast<ckpt::DType>(dtype);
            c.global_shape = std::move(global_shape);
            c.box = BoxOf(std::move(offsets), std::move(sizes));
            c.data = ReadableBytes(data, info);
            c.replica_index = replica_index;
            c.replica_count = replica_count;
            ckpt::Result<std::optional<ckpt::NodeId>> r =
                std::optional<ckpt::NodeId>();
            {
              py::gil_scoped_release nogil;
              r = ckpt::dist::AddChunk(w.w(), c, w.record(true));
            }
            return Take(std::move(r));
          },
          py::arg("path"), py::arg("dtype"), py::arg("global_shape"),
          py::arg("offsets"), py::arg("sizes"), py::arg("data"),
          py::arg("replica_index") = 0, py::arg("replica_count") = 1)
      .def("add_global_tensor",
           [](PyWriter& w) { return Take(ckpt::dist::AddGlobalTensor(w.w())); })
      .def(
          "set_shard_root",
          [](PyWriter& w, const std::vector<uint32_t>& chunks,
             std::optional<uint32_t> globals,
             std::optional<uint32_t> rank_local, int rank, int world_size) {
            Check(ckpt::dist::SetShardRoot(w.w(), chunks, globals, rank_local,
                                           rank, world_size, w.record(true)));
          },
          py::arg("chunks"), py::arg("globals"), py::arg("rank_local"),
          py::arg("rank"), py::arg("world_size"));

  m.def(
      "dist_shard_path",
      [](const std::string& dir, int rank, int world_size) {
        return Take(ckpt::dist::ShardPath(dir, rank, world_size));
      },
      py::arg("dir"), py::arg("rank"), py::arg("world_size"));

  // Collective: `error` is this rank's outcome (None or (class, message)).
  m.def(
      "dist_commit_save",
      [](PyComm& comm, const std::string& dir, const py::object& error,
         int coordinator, bool overwrite, bool sync, const py::dict& metadata,
         PyWriter* shard) {
        ckpt::Status local = LocalStatus(error);
        auto o = SaveOptionsOf(coordinator, overwrite, sync, metadata);
        // The shard's writer, committed: its record stands for reading
        // the file back.
        const ckpt::dist::ShardRecord* record =
            shard ? shard->record(false) : nullptr;
        ckpt::Result<ckpt::dist::CommitInfo> r = ckpt::dist::CommitInfo{};
        {
          py::gil_scoped_release nogil;
          r = ckpt::dist::CommitSave(comm, dir, local, o, record);
        }
        return CommitInfoDict(Take(std::move(r)));
      },
      py::arg("comm"), py::arg("dir"), py::arg("error"),
      py::arg("coordinator") = 0, py::arg("overwrite") = false,
      py::arg("sync") = true, py::arg("metadata") = py::dict(),
      py::arg("writer") = nullptr);

  // The commit of shard files that ranks wrote and reported elsewhere
  // (ckpt.dcp.Writer.finish: DCP gathers the ranks' results itself and
  // calls it on its coordinator alone).
  m.def(
      "dist_commit_written",
      [](const std::string& dir, int world_size, int coordinator,
         bool overwrite, bool sync, const py::dict& metadata,
         const std::optional<std::vector<py::bytes>>& records) {
        auto o = SaveOptionsOf(coordinator, overwrite, sync, metadata);
        // Each rank's record (Writer.record_bytes), in rank order: the
        // shards are then not read back here.
        std::vector<ckpt::dist::ShardRecord> recs;
        if (records) {
          for (size_t i = 0; i < records->size(); ++i) {
            std::string_view b = (*records)[i];
            recs.push_back(Take(ckpt::dist::ShardRecord::Deserialize(
                std::as_bytes(std::span(b.data(), b.size())),
                static_cast<int>(i))));
          }
        }
        ckpt::Result<ckpt::dist::CommitInfo> r = ckpt::dist::CommitInfo{};
        {
          py::gil_scoped_release nogil;
          r = ckpt::dist::CommitWritten(dir, world_size, o, recs);
        }
        return CommitInfoDict(Take(std::move(r)));
      },
      py::arg("dir"), py::arg("world_size"), py::arg("coordinator") = 0,
      py::arg("overwrite") = false, py::arg("sync") = true,
      py::arg("metadata") = py::dict(), py::arg("records") = py::none());

  m.def(
      "dist_agree",
      [](PyComm& comm, const py::object& error, int root) {
        ckpt::Status local = LocalStatus(error);
        ckpt::Status s;
        {
          py::gil_scoped_release nogil;
          s = ckpt::dist::Agree(comm, local, root);
        }
        Check(s);
      },
      py::arg("comm"), py::arg("error"), py::arg("root") = 0);

  m.def(
      "dist_replica_part",
      [](const std::string& path, std::vector<int64_t> offsets,
         std::vector<int64_t> sizes, uint32_t index,
         uint32_t count) -> std::optional<py::tuple> {
        auto b = ckpt::dist::ReplicaPart(
            path, BoxOf(std::move(offsets), std::move(sizes)), index, count);
        if (!b) return std::nullopt;
        return py::make_tuple(Ints(b->offsets), Ints(b->sizes));
      },
      py::arg("path"), py::arg("offsets"), py::arg("sizes"), py::arg("index"),
      py::arg("count"));

  m.def("is_sharded_checkpoint", [](const std::string& path) {
    return ckpt::dist::IsShardedCheckpoint(path);
  });
  m.def("dist_read_manifest", [](const std::string& dir) {
    ckpt::Result<ckpt::dist::Manifest> r = ckpt::dist::Manifest{};
    {
      py::gil_scoped_release nogil;
      r = ckpt::dist::ReadManifest(dir);
    }
    return ManifestDict(Take(std::move(r)), dir);
  });

  py::class_<PySharded>(m, "ShardedCheckpoint")
      .def(py::init<const std::string&, PyComm*, int>(), py::arg("dir"),
           py::arg("comm") = nullptr, py::arg("coordinator") = 0)
      .def_property_readonly("dir",
                             [](const PySharded& s) { return s.ck().dir(); })
      .def("manifest",
           [](const PySharded& s) {
             return ManifestDict(s.ck().manifest(), s.ck().dir());
           })
      // What a load checks, without the chunks: world_size, globals_file,
      // files (rank of each) and tensors {path: (dtype code, shape)}.
      .def("summary",
           [](const PySharded& s) {
             const auto& mf = s.ck().manifest();
             const std::string file =
                 s.ck().dir() + "/" + std::string(ckpt::dist::kManifestName);
             py::dict d;
             d["world_size"] = mf.world_size;
             d["globals_file"] = mf.globals_file;
             py::list ranks;
             for (const auto& f : mf.files) ranks.append(f.rank);
             d["file_ranks"] = ranks;
             py::dict tensors;
             for (const auto& t : mf.tensors) {
               tensors[Utf8(t.path, file, "a tensor path")] =
                   py::make_tuple(static_cast<int>(t.dtype), Ints(t.shape));
             }
             d["tensors"] = tensors;
             return d;
           })
      .def_static("open_file", &PySharded::OpenFile, py::arg("path"))
      .def("load", &PySharded::Load, py::arg("wants"), py::arg("verify") = true,
           py::arg("threads") = 0)
#ifdef CKPT_WITH_CUDA
      .def("load_to_device", &PySharded::LoadToDevice, py::arg("wants"),
           py::arg("device"), py::arg("verify") = false, py::arg("threads") = 0)
#endif
      .def("read", &PySharded::Read, py::arg("path"), py::arg("offsets"),
           py::arg("sizes"), py::arg("verify") = true)
      .def("open_shard", &PySharded::OpenShard, py::arg("index"))
      .def("shard_file_path",
           [](const PySharded& s, size_t i) { return s.ck().ShardFilePath(i); })
      .def("verify", &PySharded::Verify, py::arg("threads") = 0);

  m.def(
      "dist_consolidate",
      [](const std::string& dir, const std::string& out, bool sync) {
        ckpt::WriteOptions o;
        o.sync = sync;
        o.producer = "ckpt-python " + std::string(ckpt::VersionString());
        py::gil_scoped_release nogil;
        Check(ckpt::dist::Consolidate(dir, out, o));
      },
      py::arg("dir"), py::arg("out"), py::arg("sync") = true);

  // dims: tensor path -> the dim to cut, -1 replicated; paths it does not
  // name get `default_dim` (the caller decides in Python first, so no
  // callback can fail halfway through the save).
  m.def(
      "dist_shard_file",
      [](const std::string& in, const std::string& dir, int world_size,
         const std::map<std::string, int>& dims, int default_dim,
         bool overwrite, bool sync) {
        ckpt::dist::SaveOptions o = SaveOptionsOf(0, overwrite, sync, {});
        ckpt::dist::ShardDimFn fn = [&](const ckpt::TensorInfo& t) {
          auto it = dims.find(t.path);
          return it == dims.end() ? default_dim : it->second;
        };
        py::gil_scoped_release nogil;
        ckpt::Checkpoint ck = Take(ckpt::Checkpoint::Open(in));
        Check(ckpt::dist::ShardFile(ck, dir, world_size, fn, o));
      },
      py::arg("src"), py::arg("dir"), py::arg("world_size"),
      py::arg("dims") = std::map<std::string, int>(),
      py::arg("default_dim") = 0, py::arg("overwrite") = false,
      py::arg("sync") = true);
}

// ---- SIGINT around a commit
// ---------------------------------------------------

// Holds SIGINT back while a save commits (rename, fsyncs): a Ctrl-C then
// cannot surface as KeyboardInterrupt from a save whose file is already in
// place. Constructed just before Commit(), it swaps SIGINT's Python handler
// for one that only records the signal; release() (or destruction, when the
// last reference goes, typically as the saving function's frame is freed on
// return) puts the caller's handler back and, if a SIGINT came in
// meanwhile, re-raises it with PyErr_SetInterrupt, which Python delivers at
// its next check: after save() has returned. Does nothing outside the main
// thread (signals only reach the main thread's handlers) or when SIGINT's
// handler is not a Python callable (SIG_IGN, SIG_DFL, set from C).
class SigintDeferral {
 public:
  SigintDeferral() {
    // _signal's C functions, not signal.py's wrappers: after the wrapper
    // swaps handlers it runs Python code, where a SIGINT would be handled
    // by the handler just restored, inside our destructor, and be lost.
    py::module_ sig = py::module_::import("_signal");
    py::module_ threading = py::module_::import("threading");
    if (!threading.attr("current_thread")().is(threading.attr("main_thread")()))
      return;
    py::object old = sig.attr("getsignal")(SIGINT);
    if (old.is_none() || !PyCallable_Check(old.ptr())) return;
    auto pending = pending_;
    py::cpp_function record(
        [pending](py::handle, py::handle) { *pending = true; });
    set_ = sig.attr("signal");
    set_(SIGINT, record);
    old_ = std::move(old);
  }
  SigintDeferral(const SigintDeferral&) = delete;
  SigintDeferral& operator=(const SigintDeferral&) = delete;

  ~SigintDeferral() {
    if (!old_) return;
    py::error_scope keep;  // an exception in flight stays as it is
    try {
      Release();
    } catch (py::error_already_set& e) {
      e.discard_as_unraisable(
          "ckpt: restoring the SIGINT handler after a save");
    }
  }

  void Release() {
    if (!old_) return;
    py::object old = std::move(old_);
    old_ = py::object();
    // _signal.signal() first runs the handlers of signals already pending
    // (a SIGINT that just came is recorded by ours), then swaps, and runs
    // no Python code after: a SIGINT from now on waits, tripped, for the
    // caller's next check.
    set_(SIGINT, old);
    if (*pending_) {
      *pending_ = false;
      PyErr_SetInterrupt();
    }
  }

  bool active() const { return static_cast<bool>(old_); }
  bool pending() const { return *pending_; }

 private:
  std::shared_ptr<bool> pending_ = std::make_shared<bool>(false);
  py::object set_;  // _signal.signal
  py::object old_;
};

}  // namespace

PYBIND11_MODULE(_ckpt, m) {
  m.doc() = "ckpt C++ core (use the ckpt package, not this module)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const StatusError& e) {
      py::object errors = py::module_::import("ckpt._errors");
      py::object cls = errors.attr(
          e.python_class ? e.python_class : ErrorClass(e.status.code()));
      py::object exc = cls(Lenient(e.status.ToString()));
      int err = e.status.sys_errno();
      if (err != 0 &&
          py::isinstance(exc,
                         py::module_::import("builtins").attr("OSError"))) {
        exc.attr("errno") = err;  // str(exc) stays the message naming the file
      }
      PyErr_SetObject(cls.ptr(), exc.ptr());
    }
  });

  py::class_<Region>(m, "Region", py::buffer_protocol())
      .def_buffer([](Region& r) {
        return py::buffer_info(r.data, 1,
                               py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<ssize_t>(r.size)},
                               {static_cast<ssize_t>(1)}, !r.writable);
      })
      .def("__len__", [](const Region& r) { return r.size; })
      .def_property_readonly("writable",
                             [](const Region& r) { return r.writable; });

  g_tensor_record = PyStructSequence_NewType(&kTensorRecord);
  g_storage_record = PyStructSequence_NewType(&kStorageRecord);
  if (!g_tensor_record || !g_storage_record) throw py::error_already_set();
  m.attr("TensorRecord") =
      py::handle(reinterpret_cast<PyObject*>(g_tensor_record));
  m.attr("StorageRecord") =
      py::handle(reinterpret_cast<PyObject*>(g_storage_record));

  py::class_<Reader>(m, "Reader")
      .def(py::init<const std::string&, bool>(), py::arg("path"),
           py::arg("copy_on_write") = true)
      .def(py::init<py::bytes, const std::string&>(), py::arg("data"),
           py::arg("name") = "<bytes>")
      .def("metadata", &Reader::Metadata)
      .def("storages", &Reader::Storages)
      .def("tensors", &Reader::Tensors)
      .def("paths", &Reader::Paths)
      .def("tensor_index", &Reader::TensorIndex)
      .def("tensor", &Reader::TensorAt)
      .def("storage", &Reader::StorageAt)
      .def("storage_region", &Reader::StorageRegion)
      .def("rows", &Reader::Rows)
      .def("read_storages", &Reader::ReadStorages, py::arg("indices"),
           py::arg("buffers"), py::arg("threads") = 4)
      .def("read_ranges", &Reader::ReadRanges, py::arg("storages"),
           py::arg("begins"), py::arg("buffers"), py::arg("threads") = 4)
      .def("verify", &Reader::Verify, py::arg("threads") = 0)
      .def("tree", &Reader::Tree)
      .def("kind", &Reader::Kind)
      .def_property_readonly(
          "num_tensors", [](const Reader& r) { return r.ck().num_tensors(); })
      .def_property_readonly("path", &Reader::Path);

  py::class_<PyWriter> writer(m, "Writer");
  writer
      .def(py::init<const std::string&, bool, uint64_t, const std::string&>(),
           py::arg("path"), py::arg("sync") = true, py::arg("chunk_size") = 0,
           py::arg("producer") = "ckpt")
      .def("add_storage", &PyWriter::AddStorage)
      .def("begin_storage", &PyWriter::BeginStorage)
      .def("append", &PyWriter::Append)
      .def("end_storage", &PyWriter::EndStorage)
      .def("add_tensor", &PyWriter::AddTensor)
      .def("add_none", [](PyWriter& w) { return w.w().AddNone(); })
      .def("add_bool", [](PyWriter& w, bool v) { return w.w().AddBool(v); })
      .def("add_int", [](PyWriter& w, int64_t v) { return w.w().AddInt(v); })
      .def("add_bigint", &PyWriter::AddBigInt)
      .def("add_float", [](PyWriter& w, double v) { return w.w().AddFloat(v); })
      .def("add_complex", [](PyWriter& w, double re,
                             double im) { return w.w().AddComplex(re, im); })
      .def("add_string",
           [](PyWriter& w, const std::string& s) { return w.w().AddString(s); })
      .def("add_bytes", &PyWriter::AddBytes)
      .def("add_dtype",
           [](PyWriter& w, int code) {
             return Take(w.w().AddDType(static_cast<ckpt::DType>(code)));
           })
      .def("add_device",
           [](PyWriter& w, const std::string& d) {
             return Take(w.w().AddDevice(d));
           })
      .def("add_items", &PyWriter::AddItems, py::arg("kind"), py::arg("items"))
      .def("add_dict",
           [](PyWriter& w, const std::vector<uint32_t>& keys,
              const std::vector<uint32_t>& values,
              const std::string& type_name) {
             return Take(w.w().AddDict(keys, values, type_name));
           })
      .def("set_type_name",
           [](PyWriter& w, uint32_t node, const std::string& t) {
             Check(w.w().SetTypeName(node, t));
           })
      .def("set_root",
           [](PyWriter& w, uint32_t node) { Check(w.w().SetRoot(node)); })
      .def("set_metadata",
           [](PyWriter& w, const std::string& k, const std::string& v) {
             Check(w.w().SetMetadata(k, v));
           })
      .def("commit", &PyWriter::Commit)
      .def("record_bytes", &PyWriter::RecordBytes)
      .def("abort", &PyWriter::Abort);
  BindDist(m, writer);

  m.def("dtypes", [] {
    py::list out;
    for (int code = 1; code <= ckpt::kMaxDTypeCode; ++code) {
      auto d = static_cast<ckpt::DType>(code);
      out.append(py::make_tuple(code, std::string(ckpt::DTypeName(d)),
                                ckpt::DTypeSize(d)));
    }
    return out;
  });

  // A dict key's path form (FORMAT.md 7.3), as the file names its entry;
  // on_object: see KeyConverter. TypeError for a key of no storable kind,
  // InvalidArgumentError for one the format refuses (a list inside, a
  // BigInt over kMaxBigIntBytes...).
  m.def(
      "key_segment",
      [](py::handle key, py::object on_object) {
        ckpt::PathKey k = KeyConverter(std::move(on_object)).Convert(key);
        std::string seg = Take(ckpt::KeySegment(k));
        return Lenient(seg);
      },
      py::arg("key"), py::arg("on_object") = py::none());
  // The path of child `segment` (raw) of the node at `parent`
  // (ckpt::PathBuilder::Child: '/'-joined, escaped; none before the
  // root's children).
  m.def(
      "child_path",
      [](std::string_view parent, bool parent_is_root,
         std::string_view segment) {
        return ckpt::PathBuilder::Child(parent, parent_is_root, segment);
      },
      py::arg("parent"), py::arg("parent_is_root"), py::arg("segment"));

  // The node kinds of format.h's table: (code, name, container, hashable),
  // hashable = may be a dict key or set item (tuple and frozenset: when
  // all they hold may be).
  m.attr("max_bigint_bytes") = ckpt::kMaxBigIntBytes;
  m.def("value_kinds", [] {
    py::list out;
    for (const ckpt::ValueKindTraits& k : ckpt::kValueKinds) {
      out.append(py::make_tuple(static_cast<int>(k.kind), std::string(k.name),
                                k.container, k.hashable));
    }
    return out;
  });

  // The importer's refusals (a global off the allowlist, an object it does
  // not convert) are PickleRefusedError, also a pickle.UnpicklingError, as
  // torch.load(weights_only=True) raises for them.
  m.def(
      "import_pth",
      [](const std::string& in, const std::string& out, bool sync,
         const std::string& encoding, const py::object& progress) {
        ckpt::ImportOptions o;
        o.write.sync = sync;
        o.encoding = encoding;
        // progress(done, total) runs on this thread with the GIL taken
        // back; an exception from it (KeyboardInterrupt too) stops the
        // conversion and is raised here. No output is left, unless it came
        // from the last call, made once the output is committed.
        std::optional<py::error_already_set> raised;
        if (!progress.is_none()) {
          o.progress = [&](uint64_t done, uint64_t total) -> ckpt::Status {
            py::gil_scoped_acquire gil;
            try {
              progress(done, total);
            } catch (py::error_already_set& e) {
              raised.emplace(std::move(e));
              return ckpt::InvalidArgument("stopped by the progress callback");
            }
            return ckpt::Status::OK();
          };
        }
        ckpt::Result<ckpt::ImportReport> r = ckpt::ImportReport{};
        {
          py::gil_scoped_release nogil;
          r = ckpt::ImportPth(in, out, o);
        }
        if (raised) throw std::move(*raised);
        if (!r.ok()) {
          StatusError e{r.status()};
          if (e.status.code() == ckpt::ErrorCode::kInvalidArgument)
            e.python_class = "PickleRefusedError";
          throw e;
        }
        return r->tensors;
      },
      py::arg("src"), py::arg("dst"), py::arg("sync") = true,
      py::arg("encoding") = "utf-8", py::arg("progress") = py::none());

  // Hugging Face save_pretrained directories (ckpt/hf.h), for ckpt.hf.
  m.def(
      "import_hf",
      [](const std::string& dir, const std::string& out, bool sync) {
        ckpt::ImportOptions o;
        o.write.sync = sync;
        ckpt::Result<ckpt::HfImportReport> r = ckpt::HfImportReport{};
        {
          py::gil_scoped_release nogil;
          r = ckpt::ImportHfDir(dir, out, o);
        }
        if (!r.ok()) {
          // A .bin shard the restricted importer refused, as import_pth.
          StatusError e{r.status()};
          if (e.status.code() == ckpt::ErrorCode::kInvalidArgument &&
              std::string_view(e.status.file()).ends_with(".bin"))
            e.python_class = "PickleRefusedError";
          throw e;
        }
        return r->tensors;
      },
      py::arg("dir"), py::arg("dst"), py::arg("sync") = true);
  m.def(
      "export_hf",
      [](const std::string& in, const std::string& dir, uint64_t max_shard,
         bool sync) {
        ckpt::HfExportOptions o;
        o.max_shard_bytes = max_shard;
        o.sync = sync;
        ckpt::Result<std::vector<std::string>> r = std::vector<std::string>{};
        size_t dropped = 0;
        {
          py::gil_scoped_release nogil;
          r = ckpt::ExportHf(in, dir, o, &dropped);
        }
        if (!r.ok()) Throw(r.status());
        return py::make_tuple(*r, dropped);
      },
      py::arg("src"), py::arg("dir"), py::arg("max_shard_bytes"),
      py::arg("sync") = true);
  m.def("parse_byte_size", [](const std::string& text) {
    auto r = ckpt::ParseByteSize(text);
    if (!r.ok()) Throw(r.status());
    return *r;
  });

  py::class_<SigintDeferral>(m, "SigintDeferral")
      .def(py::init<>())
      .def("release", &SigintDeferral::Release)
      .def_property_readonly("active", &SigintDeferral::active)
      .def_property_readonly("pending", &SigintDeferral::pending);

  // XXH3-64 (seed 0) of a buffer: the format's checksum (docs/FORMAT.md 2),
  // for tools and tests that build or check files byte by byte.
  m.def("xxh3_64", [](const py::buffer& b) {
    py::buffer_info info;
    auto bytes = ReadableBytes(b, info);
    return ckpt::Checksum(bytes);
  });
  m.attr("max_tree_depth") = ckpt::kMaxTreeDepth;

  m.def("cli_main", [](const std::vector<std::string>& args) {
    std::vector<std::string> copy = args;
    std::vector<char*> argv;
    for (auto& a : copy) argv.push_back(a.data());
    argv.push_back(nullptr);
    int rc;
    {
      py::gil_scoped_release nogil;
      rc = ckpt::tool::CliMain(static_cast<int>(copy.size()), argv.data());
      std::fflush(stdout);
      std::fflush(stderr);
    }
    return rc;
  });

#ifdef CKPT_WITH_CUDA
  // Whole storages into device memory the caller (torch) allocated, by the
  // C++ GPU loader; returns the strategy that ran.
  m.def("load_storages_to_device",
        [](const Reader& r, const std::vector<size_t>& storages,
           const std::vector<uintptr_t>& pointers, int device) {
          if (storages.size() != pointers.size())
            throw py::value_error("one pointer per storage");
          ckpt::DeviceLoadOptions o;
          o.device = "cuda:" + std::to_string(device);
          for (uintptr_t p : pointers)
            o.destinations.push_back(reinterpret_cast<void*>(p));
          py::gil_scoped_release nogil;
          auto load = Take(ckpt::LoadStoragesToDevice(r.ck(), storages, o));
          Check(load->Wait());
          return load->strategy();
        });
  m.attr("has_gpu_loader") = true;
#else
  m.attr("has_gpu_loader") = false;
#endif
  m.attr("magic") = py::bytes(
      reinterpret_cast<const char*>(ckpt::kMagic.data()), ckpt::kMagic.size());
  m.attr("format_version") =
      py::make_tuple(ckpt::kFormatMajor, ckpt::kFormatMinor);
  m.attr("version") = std::string(ckpt::VersionString());
}
