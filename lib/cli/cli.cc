// ckpt: inspect, extract, verify and compare ckpt files. The commands live
// here, in the ckpt_cli library, as CliMain(), so the executable
// (tools/ckpt/main.cc) and the Python binding (`python -m ckpt`) run the
// same code.
// Thin: parses arguments and calls the public library. Contract (DESIGN.md):
// errors go to stderr, usage errors exit 2, every command has --help.
#include <ckpt/ckpt.h>
#include <ckpt/dist.h>
#include <ckpt/hf.h>
#include <ckpt/pth.h>
#ifdef CKPT_WITH_CUDA
#include <ckpt/cuda.h>
#endif

#include <fnmatch.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cli.h"
#include "human.h"
#include "json.h"
#include "progress.h"

namespace {

using ckpt::Checkpoint;
using ckpt::Status;
using ckpt::Value;
using ckpt::ValueKind;
using ckpt::tool::HumanBytes;

constexpr int kExitOk = 0;
constexpr int kExitFail = 1;
constexpr int kExitUsage = 2;

const char* kMainHelp =
    "usage: ckpt <command> [options]\n"
    "\n"
    "Commands:\n"
    "  inspect FILE|DIR [--json]    summary of tensors, storages, values\n"
    "  cat FILE|DIR PATH [--rows A:B]\n"
    "                               raw little-endian elements to stdout\n"
    "  get FILE|DIR PATH            the value at PATH in the tree, as JSON\n"
    "  verify FILE|DIR              check structure and every checksum\n"
    "  diff A B                     tensors and values that differ\n"
    "  import IN.pth|DIR OUT.ckpt   convert a torch.save file (as pth2ckpt)\n"
    "                               or a Hugging Face save_pretrained DIR\n"
    "  export-hf IN.ckpt DIR [--max-shard-size 5GB]\n"
    "                               a flat state dict as save_pretrained\n"
    "                               safetensors (model.safetensors, shards)\n"
    "  load FILE [--device D] ...   load tensors to a GPU (or cpu) and time "
    "it\n"
    "  consolidate DIR OUT.ckpt     a sharded checkpoint as one ckpt file\n"
    "  shard IN DIR --ranks N ...   a ckpt file as a sharded checkpoint\n"
    "\n"
    "FILE is a ckpt file, DIR a sharded checkpoint (a directory holding\n"
    "MANIFEST.ckptm and one shard file per rank).\n"
    "\n"
    "Run 'ckpt <command> --help' for details. Exit status: 0 success,\n"
    "1 failure (message on stderr), 2 usage error.\n";

const char* kInspectHelp =
    "usage: ckpt inspect FILE|DIR [--json]\n"
    "\n"
    "Prints the file's format version, metadata, every tensor (path, dtype,\n"
    "shape, strides, storage id, offset, bytes, saved device) and every\n"
    "non-tensor value. With --json, one JSON object whose \"tensors\" is a\n"
    "list of {path, dtype, shape, strides, storage, offset, nbytes, device}\n"
    "(offset in elements of the storage; tensors sharing a storage have the\n"
    "same storage id), plus \"storages\", \"metadata\" and \"tree\".\n"
    "\n"
    "For a sharded checkpoint DIR: the manifest's version, world size and\n"
    "metadata, every shard file (name, rank, size) and every global tensor\n"
    "(path, dtype, shape, bytes, chunks per rank), and the totals. With\n"
    "--json, {\"dir\", \"kind\": \"sharded\", \"world_size\", \"files\",\n"
    "\"tensors\": [{path, dtype, shape, nbytes, chunks, chunks_per_rank,\n"
    "boxes}], \"totals\", ...} (docs/CLI.md).\n";

const char* kCatHelp =
    "usage: ckpt cat FILE|DIR PATH [--rows A:B]\n"
    "\n"
    "Writes the elements of the tensor at PATH to stdout in row-major\n"
    "contiguous order, little-endian. --rows A:B writes only rows [A, B) of\n"
    "dim 0 (A or B may be omitted: ':B', 'A:'). For a sharded checkpoint\n"
    "DIR, the global tensor at PATH, read from the shards that hold it.\n";

const char* kGetHelp =
    "usage: ckpt get FILE|DIR PATH\n"
    "\n"
    "Prints the value at PATH in the object tree as JSON: scalars (int,\n"
    "float, string, bool, null) as themselves; containers as arrays and\n"
    "objects; tensors as {\"$tensor\": path, \"dtype\", \"shape\"}. The empty\n"
    "path '' is the root. For a sharded checkpoint DIR, the value in the\n"
    "saved state dict; its global tensors show as {\"$tensor\": ...} too.\n";

const char* kVerifyHelp =
    "usage: ckpt verify FILE|DIR [--threads N] [--pread]\n"
    "\n"
    "Checks the preamble, header and every rule of docs/FORMAT.md, then\n"
    "hashes every data chunk on all cores. Exit 0 when sound; otherwise\n"
    "exit 1 and the first problem (what, byte offset, tensor) on stderr.\n"
    "For a sharded checkpoint DIR: the manifest, every shard file against\n"
    "the size and header checksum the manifest pins, and every checksum of\n"
    "every shard, the work split across the threads (--pread is for files).\n";

const char* kConsolidateHelp =
    "usage: ckpt consolidate DIR OUT.ckpt\n"
    "\n"
    "Writes the sharded checkpoint DIR as one ordinary ckpt file: every\n"
    "global tensor assembled whole at its place in the saved state dict\n"
    "(without a saved tree: nested dicts of the tensors' paths), the\n"
    "manifest's metadata as the file's. Streams tensor by tensor in about\n"
    "64 MiB of memory and checks every checksum it reads; OUT appears only\n"
    "complete (an existing OUT is replaced atomically). Rank-local state\n"
    "(each rank's own tree) has no place in one file and is dropped, with a\n"
    "note on stderr.\n";

const char* kShardHelp =
    "usage: ckpt shard IN DIR --ranks N [--dim D] [--dim GLOB=D ...] "
    "[--overwrite]\n"
    "\n"
    "Writes the ckpt file IN (or the sharded checkpoint IN, resharded) as\n"
    "the sharded checkpoint DIR of N ranks, for tensor-parallel layouts:\n"
    "each tensor cut along dim D into N near-even blocks (rank r the r-th;\n"
    "the first rows % N blocks one longer), or with D = -1 replicated\n"
    "(written once, split across the ranks). --dim GLOB=D sets D for the\n"
    "tensors whose path matches the shell pattern GLOB ('*' also matches\n"
    "'/'); the first matching one wins, then --dim D, then 0. 0-d tensors\n"
    "and tensors without dim D go replicated. IN's tree becomes the saved\n"
    "state dict and its metadata the manifest's. An existing DIR is an\n"
    "error unless --overwrite (replaced atomically).\n";

const char* kDiffHelp =
    "usage: ckpt diff A B\n"
    "\n"
    "Lists tensors and values present in only one file ('-' only in A,\n"
    "'+' only in B) or different ('~': dtype, shape or bytes; value).\n"
    "Exit 0 when the contents are the same, 1 when they differ, 3 when a\n"
    "file cannot be read. A or B may be a sharded checkpoint DIR: its\n"
    "consolidation (written to a temporary file in $TMPDIR, removed after)\n"
    "is compared.\n";

const char* kImportHelp =
    "usage: ckpt import [--no-crc] [--progress|--no-progress] IN.pth|DIR "
    "OUT.ckpt\n"
    "\n"
    "Converts a torch.save file to ckpt without running anything from it;\n"
    "the same as pth2ckpt IN OUT (see pth2ckpt --help). On refusal: exit 1,\n"
    "the reason on stderr, and no OUT file. On a terminal (stderr a TTY) a\n"
    "progress line on stderr shows the bytes converted and GB/s, erased\n"
    "when done; --progress / --no-progress force it on or off.\n"
    "\n"
    "A directory DIR is read as Hugging Face's save_pretrained layout\n"
    "(model.safetensors, or its shards and model.safetensors.index.json,\n"
    "or pytorch_model.bin or its shards and index, taken in the order\n"
    "transformers looks for them): OUT gets every tensor as one flat dict\n"
    "and config.json's text as the metadata \"hf.config\". Every header,\n"
    "size and index entry is checked before anything is written.\n";

const char* kExportHfHelp =
    "usage: ckpt export-hf IN.ckpt DIR [--max-shard-size SIZE] [--no-verify]\n"
    "\n"
    "Writes the tensors of IN.ckpt (a flat state dict, as `ckpt import DIR`\n"
    "makes) to DIR, created if missing, in Hugging Face's save_pretrained\n"
    "layout: model.safetensors, or shards of at most SIZE bytes of tensors\n"
    "(default 5GB; 500MB, 2GiB, or a byte count) named\n"
    "model-00001-of-0000N.safetensors with model.safetensors.index.json;\n"
    "config.json from IN's \"hf.config\" metadata. Every file is written\n"
    "whole before any is renamed into place, and the weight files of an\n"
    "earlier export that this one does not write are removed. Every\n"
    "checksum of IN is checked as it is read (safetensors keeps none);\n"
    "--no-verify skips that. Non-tensor values are left out (a note on\n"
    "stderr says how many). Exit 1 with the reason on stderr for a nested\n"
    "tree, a damaged chunk or a dtype safetensors cannot name.\n";

const char* kLoadHelp =
    "usage: ckpt load FILE [--device cuda:N|cpu] [--paths P...] [--rows A:B]\n"
    "                 [--strategy auto|staged|direct|register] [--threads N] "
    "[--verify]\n"
    "                 [--progress|--no-progress]\n"
    "\n"
    "Loads tensors (all, or the --paths given; --rows A:B takes rows [A, B) "
    "of\n"
    "dim 0 of each) into GPU memory through pinned staging buffers, or into\n"
    "host memory with --device cpu, and prints the time and GB/s. Staged\n"
    "fills the buffers from the page cache (warm files), direct with O_DIRECT\n"
    "reads (cold files), register page-locks the mapping and copies from it;\n"
    "auto picks staged or direct by how much of the data is cached.\n"
    "--verify checks the checksum of every chunk the tensors lie in, as it\n"
    "reads or stages them (a damaged chunk fails the load, naming the "
    "tensor).\n"
    "Without a usable GPU, --device cuda:N fails with the reason (exit 1).\n"
    "On a terminal (stderr a TTY) a progress line on stderr shows the bytes\n"
    "loaded and GB/s, erased before the result is printed; --progress /\n"
    "--no-progress force it on or off.\n";

int Usage(const char* help, const std::string& problem) {
  std::fprintf(stderr, "ckpt: %s\n\n%s", problem.c_str(), help);
  return kExitUsage;
}

int Fail(const Status& s) {
  std::fprintf(stderr, "ckpt: %s\n", s.ToString().c_str());
  return kExitFail;
}

bool WantsHelp(const std::vector<std::string>& args) {
  for (const auto& a : args) {
    if (a == "--help" || a == "-h") return true;
  }
  return false;
}

void Print(const std::string& s) { std::fwrite(s.data(), 1, s.size(), stdout); }

std::string Dims(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  return s + "]";
}

// Calls `fn(path, value)` for every node that is not a container or tensor,
// and for empty containers, in tree order.
void ForEachLeaf(
    const Value& v, const std::string& path, bool at_root,
    const std::function<void(const std::string&, const Value&)>& fn) {
  if (v.kind() == ValueKind::kTensor) return;
  if (!v.is_container() || v.size() == 0) {
    fn(path, v);
    return;
  }
  for (size_t i = 0; i < v.size(); ++i) {
    std::string seg = v.kind() == ValueKind::kDict ? v.key(i).KeySegment()
                                                   : std::to_string(i);
    ForEachLeaf(v.item(i), ckpt::PathBuilder::Child(path, at_root, seg), false,
                fn);
  }
}

std::string ValueJson(const Value& v) {
  std::string s;
  ckpt::tool::AppendValueJson(s, v);
  return s;
}

bool ParseInt(std::string_view s, int64_t* out) {
  if (s.empty()) return false;
  errno = 0;
  char* end = nullptr;
  std::string tmp(s);
  long long v = std::strtoll(tmp.c_str(), &end, 10);
  if (errno != 0 || *end != '\0') return false;
  *out = v;
  return true;
}

// ---- sharded checkpoints (directories)
// ------------------------------------------------------------------------

bool IsDirectory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

uint64_t FileSize(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

// Opens the sharded checkpoint at `dir`, with a clear message for a
// directory that is none (no manifest; a DCP directory has ".metadata").
ckpt::Result<ckpt::dist::ShardedCheckpoint> OpenDir(const std::string& dir) {
  if (!ckpt::dist::IsShardedCheckpoint(dir) &&
      ::access((dir + "/.metadata").c_str(), F_OK) != 0) {
    return ckpt::NotFound("a directory without " +
                          std::string(ckpt::dist::kManifestName) +
                          ": not a sharded checkpoint")
        .WithFile(dir);
  }
  return ckpt::dist::ShardedCheckpoint::Open(dir);
}

// Chunks of `t` held by each rank (the rank that wrote the chunk's file).
std::vector<uint64_t> ChunksPerRank(const ckpt::dist::Manifest& m,
                                    const ckpt::dist::GlobalTensorInfo& t) {
  std::vector<uint64_t> per(m.world_size, 0);
  for (const auto& c : t.chunks) {
    if (c.file < m.files.size() && m.files[c.file].rank < per.size())
      ++per[m.files[c.file].rank];
  }
  return per;
}

std::string Uints(const std::vector<uint64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  return s + "]";
}

std::string Hex64(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// A DCP directory (torch.distributed.checkpoint): its .metadata stands in
// for the manifest; it has no ckpt trees and no checksums.
bool IsDcp(const ckpt::dist::ShardedCheckpoint& ck) {
  return !ckpt::dist::IsShardedCheckpoint(ck.dir());
}

// The index file: MANIFEST.ckptm, or a DCP directory's .metadata.
std::string IndexName(const ckpt::dist::ShardedCheckpoint& ck) {
  return IsDcp(ck) ? ".metadata" : std::string(ckpt::dist::kManifestName);
}

struct DirTotals {
  uint64_t tensor_bytes = 0, chunks = 0, shard_bytes = 0, manifest_bytes = 0;
};

DirTotals TotalsOf(const ckpt::dist::ShardedCheckpoint& ck) {
  DirTotals t;
  for (const auto& g : ck.manifest().tensors) {
    t.tensor_bytes += g.nbytes();
    t.chunks += g.chunks.size();
  }
  for (const auto& f : ck.manifest().files) t.shard_bytes += f.size;
  t.manifest_bytes = FileSize(ck.dir() + "/" + IndexName(ck));
  return t;
}

// A global tensor's placeholder in a globals tree (docs/SHARDED.md 3).
bool IsPlaceholder(const Value& v) {
  return v.kind() == ValueKind::kDict && v.size() == 0 &&
         v.type_name() == "ckpt.dist.GlobalTensor";
}

// Shows placeholders in JSON as the tensors they stand for, in the form a
// file's tensors take: {"$tensor": path, "dtype", "shape"}.
ckpt::tool::ValueJsonHook PlaceholderJson(const ckpt::dist::Manifest& m) {
  return [&m](std::string& out, const Value& v, const std::string& path) {
    if (!IsPlaceholder(v)) return false;
    const auto* t = m.Find(path);
    out += "{\"$tensor\": ";
    ckpt::tool::AppendJsonString(out, path);
    if (t != nullptr) {
      out += ", \"dtype\": \"" + std::string(ckpt::DTypeName(t->dtype)) +
             "\", \"shape\": " + Dims(t->shape);
    }
    out += "}";
    return true;
  };
}

// The globals tree (the saved state dict's structure and values), or
// nullopt when no rank wrote one.
ckpt::Result<std::optional<Value>> GlobalsOf(
    const ckpt::dist::ShardedCheckpoint& ck) {
  const auto& m = ck.manifest();
  // A DCP directory (no MANIFEST.ckptm) holds no ckpt trees.
  if (!ckpt::dist::IsShardedCheckpoint(ck.dir()) ||
      m.globals_file >= m.files.size())
    return std::optional<Value>();
  CKPT_ASSIGN_OR_RETURN(Checkpoint g, ck.OpenShard(m.globals_file));
  // A Value keeps its file open by itself.
  if (g.root().kind() == ValueKind::kDict) {
    if (auto v = g.root().Child("globals"); v.ok())
      return std::optional<Value>(*v);
  }
  return std::optional<Value>();
}

// `inspect DIR --json`: one object (docs/CLI.md, "inspect DIR --json").
std::string InspectDirJson(const ckpt::dist::ShardedCheckpoint& ck,
                           const std::optional<Value>& globals) {
  using ckpt::tool::AppendJsonString;
  const auto& m = ck.manifest();
  const DirTotals tot = TotalsOf(ck);
  std::string out = "{\"dir\": ";
  AppendJsonString(out, ck.dir());
  out += IsDcp(ck) ? ", \"kind\": \"dcp\"" : ", \"kind\": \"sharded\"";
  out += ", \"manifest_version\": \"" + std::to_string(m.version_major) + "." +
         std::to_string(m.version_minor) + "\"";
  out += ", \"producer\": ";
  AppendJsonString(out, m.producer);
  out += ", \"world_size\": " + std::to_string(m.world_size);
  out += ", \"globals_file\": " + std::to_string(m.globals_file);
  out += ", \"metadata\": {";
  for (size_t i = 0; i < m.metadata.size(); ++i) {
    if (i) out += ", ";
    AppendJsonString(out, m.metadata[i].first);
    out += ": ";
    AppendJsonString(out, m.metadata[i].second);
  }
  out += "}, \"files\": [";
  for (size_t i = 0; i < m.files.size(); ++i) {
    const auto& f = m.files[i];
    if (i) out += ", ";
    out += "{\"index\": " + std::to_string(i) + ", \"name\": ";
    AppendJsonString(out, f.name);
    out += ", \"rank\": " + std::to_string(f.rank) +
           ", \"size\": " + std::to_string(f.size) + ", \"header_xxh3\": \"" +
           Hex64(f.header_xxh3) + "\"}";
  }
  out += "], \"tensors\": [";
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    const auto& t = m.tensors[i];
    if (i) out += ", ";
    out += "{\"path\": ";
    AppendJsonString(out, t.path);
    out += ", \"dtype\": \"" + std::string(ckpt::DTypeName(t.dtype)) + "\"";
    out += ", \"shape\": " + Dims(t.shape);
    out += ", \"nbytes\": " + std::to_string(t.nbytes());
    out += ", \"chunks\": " + std::to_string(t.chunks.size());
    out += ", \"chunks_per_rank\": " + Uints(ChunksPerRank(m, t));
    out += ", \"boxes\": [";
    for (size_t j = 0; j < t.chunks.size(); ++j) {
      const auto& c = t.chunks[j];
      if (j) out += ", ";
      const uint32_t rank =
          c.file < m.files.size() ? m.files[c.file].rank : c.file;
      out += "{\"rank\": " + std::to_string(rank) +
             ", \"file\": " + std::to_string(c.file) +
             ", \"offsets\": " + Dims(c.box.offsets) +
             ", \"sizes\": " + Dims(c.box.sizes) +
             ", \"offset\": " + std::to_string(c.offset) +
             ", \"length\": " + std::to_string(c.length) + "}";
    }
    out += "]}";
  }
  out += "], \"totals\": {\"tensors\": " + std::to_string(m.tensors.size()) +
         ", \"chunks\": " + std::to_string(tot.chunks) +
         ", \"tensor_bytes\": " + std::to_string(tot.tensor_bytes) +
         ", \"files\": " + std::to_string(m.files.size()) +
         ", \"file_bytes\": " +
         std::to_string(tot.shard_bytes + tot.manifest_bytes) + "}";
  out += ", \"tree\": ";
  if (globals) {
    ckpt::tool::AppendValueJson(out, *globals, "", true, PlaceholderJson(m));
  } else {
    out += "null";
  }
  out += "}\n";
  return out;
}

// `inspect DIR`: a summary, metadata, one line per shard file and per
// global tensor.
std::string InspectDirText(const ckpt::dist::ShardedCheckpoint& ck,
                           const std::optional<Value>& globals) {
  const auto& m = ck.manifest();
  const DirTotals tot = TotalsOf(ck);
  std::string out;
  char line[512];
  const std::string kind =
      IsDcp(ck) ? "DCP checkpoint (torch.distributed.checkpoint .metadata)"
                : "sharded ckpt (manifest " + std::to_string(m.version_major) +
                      "." + std::to_string(m.version_minor) + ")";
  std::snprintf(line, sizeof line,
                "%s: %s, %u ranks, %zu files (%s), producer \"%s\"\n"
                "  %zu tensors (%s) in %llu chunks\n",
                ck.dir().c_str(), kind.c_str(), m.world_size, m.files.size(),
                HumanBytes(tot.shard_bytes + tot.manifest_bytes).c_str(),
                m.producer.c_str(), m.tensors.size(),
                HumanBytes(tot.tensor_bytes).c_str(),
                static_cast<unsigned long long>(tot.chunks));
  out += line;
  if (!m.metadata.empty()) {
    out += "metadata:\n";
    for (const auto& [k, v] : m.metadata) out += "  " + k + " = " + v + "\n";
  }
  if (!m.files.empty()) out += "files:\n";
  for (size_t i = 0; i < m.files.size(); ++i) {
    const auto& f = m.files[i];
    out += "  " + f.name + "  rank " + std::to_string(f.rank) + "  " +
           HumanBytes(f.size) +
           (i == m.globals_file && globals ? "  (globals)" : "") + "\n";
  }
  if (!m.tensors.empty()) out += "tensors:\n";
  for (const auto& t : m.tensors) {
    const auto per = ChunksPerRank(m, t);
    std::string dist;
    if (per.size() <= 16) {
      dist = "chunks per rank " + Uints(per);
    } else {
      size_t holding = 0;
      for (uint64_t n : per) holding += n > 0;
      dist = std::to_string(t.chunks.size()) + " chunks on " +
             std::to_string(holding) + " ranks";
    }
    out += "  " + (t.path.empty() ? std::string("(root)") : t.path) + "  " +
           std::string(ckpt::DTypeName(t.dtype)) + " " + Dims(t.shape) + "  " +
           HumanBytes(t.nbytes()) + "  " + dist + "\n";
  }
  std::string values;
  if (globals) {
    ForEachLeaf(*globals, "", true, [&](const std::string& p, const Value& v) {
      if (IsPlaceholder(v)) return;
      values += "  " + (p.empty() ? std::string("(root)") : p) + " = " +
                ValueJson(v) + "\n";
    });
  }
  if (!values.empty()) out += "values:\n" + values;
  return out;
}

int InspectDir(const std::string& dir, bool json) {
  auto ck = OpenDir(dir);
  if (!ck.ok()) return Fail(ck.status());
  // The manifest is shown even when the shard holding the saved tree
  // cannot be read (then exit 1, with why): what verify would name.
  auto globals = GlobalsOf(*ck);
  const std::optional<Value> tree =
      globals.ok() ? *globals : std::optional<Value>();
  Print(json ? InspectDirJson(*ck, tree) : InspectDirText(*ck, tree));
  if (!globals.ok()) return Fail(globals.status());
  return kExitOk;
}

int VerifyDir(const std::string& dir, unsigned threads) {
  auto t0 = std::chrono::steady_clock::now();
  auto ck = OpenDir(dir);
  if (!ck.ok()) return Fail(ck.status());
  Status s = ck->Verify(threads);
  if (!s.ok()) return Fail(s);
  double sec =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
          .count();
  const DirTotals tot = TotalsOf(*ck);
  if (IsDcp(*ck)) {
    // Nothing to hash: DCP stores no checksums, only what its .metadata
    // implies about each file was checked.
    std::printf(
        "%s: OK (DCP: %zu tensors in %zu files, %s; .metadata and file sizes "
        "checked, DCP stores no checksums; %.3f s)\n",
        dir.c_str(), ck->manifest().tensors.size(), ck->manifest().files.size(),
        HumanBytes(tot.shard_bytes + tot.manifest_bytes).c_str(), sec);
    return kExitOk;
  }
  std::printf("%s: OK (%zu tensors in %zu shard files, %s checked in %.3f s)\n",
              dir.c_str(), ck->manifest().tensors.size(),
              ck->manifest().files.size(),
              HumanBytes(tot.shard_bytes + tot.manifest_bytes).c_str(), sec);
  return kExitOk;
}

// Ranks whose shard file holds a rank-local tree: state that one file
// cannot hold, which consolidation drops.
ckpt::Result<std::vector<uint32_t>> RanksWithLocalState(
    const ckpt::dist::ShardedCheckpoint& ck) {
  std::vector<uint32_t> ranks;
  if (!ckpt::dist::IsShardedCheckpoint(ck.dir())) return ranks;  // DCP
  for (size_t i = 0; i < ck.manifest().files.size(); ++i) {
    CKPT_ASSIGN_OR_RETURN(Checkpoint shard, ck.OpenShard(i));
    const Value root = shard.root();
    if (root.kind() == ValueKind::kDict && root.Child("rank_local").ok())
      ranks.push_back(ck.manifest().files[i].rank);
  }
  return ranks;
}

int ConsolidateCmd(const std::vector<std::string>& args) {
  if (WantsHelp(args)) return Print(kConsolidateHelp), kExitOk;
  std::vector<std::string> pos;
  bool options_done = false;
  for (const auto& a : args) {
    if (!options_done && a == "--") {
      options_done = true;
    } else if (!options_done && a.size() > 1 && a[0] == '-') {
      return Usage(kConsolidateHelp, "unknown option '" + a + "'");
    } else {
      pos.push_back(a);
    }
  }
  if (pos.size() != 2) return Usage(kConsolidateHelp, "need DIR and OUT");
  if (!IsDirectory(pos[0])) {
    return Fail(ckpt::InvalidArgument(
                    "not a directory: consolidate takes a sharded checkpoint "
                    "directory (a ckpt file is already one file)")
                    .WithFile(pos[0]));
  }
  auto ck = OpenDir(pos[0]);
  if (!ck.ok()) return Fail(ck.status());
  auto dropped = RanksWithLocalState(*ck);
  if (!dropped.ok()) return Fail(dropped.status());
  Status s = ckpt::dist::Consolidate(pos[0], pos[1]);
  if (!s.ok()) return Fail(s);
  if (!dropped->empty()) {
    std::string list;
    for (size_t i = 0; i < dropped->size() && i < 8; ++i)
      list += (i ? ", " : "") + std::to_string((*dropped)[i]);
    if (dropped->size() > 8) list += ", ...";
    std::fprintf(stderr,
                 "ckpt: note: the rank-local state of %zu rank(s) (%s) is not "
                 "in %s: one file holds no per-rank state\n",
                 dropped->size(), list.c_str(), pos[1].c_str());
  }
  const DirTotals tot = TotalsOf(*ck);
  std::printf("%s -> %s: %zu tensors, %s from %u ranks\n", pos[0].c_str(),
              pos[1].c_str(), ck->manifest().tensors.size(),
              HumanBytes(tot.tensor_bytes).c_str(), ck->manifest().world_size);
  return kExitOk;
}

// One --dim: a GLOB=D rule, or (glob empty) the default D.
struct DimRule {
  std::string glob;
  int dim = 0;
};

int ShardCmd(const std::vector<std::string>& args) {
  if (WantsHelp(args)) return Print(kShardHelp), kExitOk;
  std::vector<std::string> pos;
  std::vector<DimRule> rules;
  std::optional<int> default_dim;
  int64_t ranks = 0;
  bool overwrite = false;
  bool options_done = false;
  auto parse_dim = [](std::string_view v, int* out) {
    int64_t d = 0;
    if (!ParseInt(v, &d) || d < -1 || d >= static_cast<int64_t>(ckpt::kMaxRank))
      return false;
    *out = static_cast<int>(d);
    return true;
  };
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (options_done) {
      pos.push_back(a);
    } else if (a == "--") {
      options_done = true;
    } else if (a == "--ranks" || a.rfind("--ranks=", 0) == 0) {
      std::string v;
      if (a == "--ranks") {
        if (i + 1 >= args.size()) return Usage(kShardHelp, "--ranks needs N");
        v = args[++i];
      } else {
        v = a.substr(8);
      }
      if (!ParseInt(v, &ranks) || ranks < 1 || ranks > 99999)
        return Usage(kShardHelp, "--ranks takes a number in 1..99999");
    } else if (a == "--dim" || a.rfind("--dim=", 0) == 0) {
      std::string v;
      if (a == "--dim") {
        if (i + 1 >= args.size())
          return Usage(kShardHelp, "--dim needs D or GLOB=D");
        v = args[++i];
      } else {
        v = a.substr(6);
      }
      const size_t eq = v.rfind('=');
      DimRule r;
      if (eq == std::string::npos) {
        if (!parse_dim(v, &r.dim))
          return Usage(kShardHelp,
                       "--dim takes D (a dim >= 0, or -1 to replicate) or "
                       "GLOB=D, got '" +
                           v + "'");
        if (default_dim) return Usage(kShardHelp, "--dim D given twice");
        default_dim = r.dim;
      } else {
        r.glob = v.substr(0, eq);
        if (r.glob.empty() || !parse_dim(v.substr(eq + 1), &r.dim))
          return Usage(kShardHelp,
                       "--dim GLOB=D takes a pattern and a dim >= 0 or -1, "
                       "got '" +
                           v + "'");
        rules.push_back(std::move(r));
      }
    } else if (a == "--overwrite") {
      overwrite = true;
    } else if (a.size() > 1 && a[0] == '-') {
      return Usage(kShardHelp, "unknown option '" + a + "'");
    } else {
      pos.push_back(a);
    }
  }
  if (pos.size() != 2) return Usage(kShardHelp, "need IN and DIR");
  if (ranks == 0) return Usage(kShardHelp, "missing --ranks N");

  // A sharded IN is resharded through a consolidated temporary file
  // beside DIR (removed whatever happens).
  std::string in = pos[0], temp;
  struct Remove {
    std::string* path;
    ~Remove() {
      if (!path->empty()) ::unlink(path->c_str());
    }
  } remove_temp{&temp};
  if (IsDirectory(in)) {
    auto ck = OpenDir(in);
    if (!ck.ok()) return Fail(ck.status());
    std::string out_dir = pos[1];
    while (out_dir.size() > 1 && out_dir.back() == '/') out_dir.pop_back();
    const size_t slash = out_dir.rfind('/');
    const std::string parent = slash == std::string::npos ? "."
                               : slash == 0               ? ""
                                            : out_dir.substr(0, slash);
    temp = parent + "/.ckpt-shard-" + std::to_string(::getpid()) + ".ckpt";
    ckpt::WriteOptions wo;
    wo.sync = false;  // a temporary: its durability does not matter
    Status s = ckpt::dist::Consolidate(in, temp, wo);
    if (!s.ok()) return Fail(s);
  }
  auto ck = Checkpoint::Open(temp.empty() ? in : temp);
  if (!ck.ok()) return Fail(ck.status());
  size_t cut = 0, replicated = 0;
  auto dim_of = [&](const ckpt::TensorInfo& t) {
    int d = default_dim.value_or(0);
    for (const auto& r : rules) {
      if (::fnmatch(r.glob.c_str(), t.path.c_str(), 0) == 0) {
        d = r.dim;
        break;
      }
    }
    const bool cuts =
        d >= 0 && static_cast<size_t>(d) < t.shape.size() && t.numel() > 0;
    ++(cuts ? cut : replicated);
    return d;
  };
  ckpt::dist::SaveOptions so;
  so.overwrite = overwrite;
  Status s =
      ckpt::dist::ShardFile(*ck, pos[1], static_cast<int>(ranks), dim_of, so);
  if (!s.ok()) return Fail(s);
  uint64_t bytes = 0;
  for (size_t i = 0; i < ck->num_tensors(); ++i)
    bytes += ck->TensorInfoAt(i)->nbytes();
  std::printf(
      "%s -> %s: %zu tensors, %s on %lld ranks (%zu cut, %zu "
      "replicated)\n",
      pos[0].c_str(), pos[1].c_str(), ck->num_tensors(),
      HumanBytes(bytes).c_str(), static_cast<long long>(ranks), cut,
      replicated);
  return kExitOk;
}

// ---- inspect
// ------------------------------------------------------------------

// `inspect --json`: one object (docs/CLI.md, "JSON forms").
std::string InspectJson(const std::string& file, const Checkpoint& ck) {
  std::string out;
  using ckpt::tool::AppendJsonString;
  out += "{\"file\": ";
  AppendJsonString(out, file);
  out += ", \"file_size\": " + std::to_string(ck.file_size());
  out += ", \"format_version\": \"" + std::to_string(ck.format_major()) + "." +
         std::to_string(ck.format_minor()) + "\"";
  out += ", \"producer\": ";
  AppendJsonString(out, ck.producer());
  out += ", \"chunk_size\": " + std::to_string(ck.chunk_size());
  out += ", \"metadata\": {";
  bool first = true;
  for (const auto& [k, v] : ck.metadata()) {
    if (!first) out += ", ";
    first = false;
    AppendJsonString(out, k);
    out += ": ";
    AppendJsonString(out, v);
  }
  out += "}, \"storages\": [";
  for (size_t i = 0; i < ck.num_storages(); ++i) {
    auto s = *ck.StorageInfoAt(i);
    if (i) out += ", ";
    out += "{\"id\": " + std::to_string(i) +
           ", \"offset\": " + std::to_string(s.offset) +
           ", \"nbytes\": " + std::to_string(s.nbytes) + ", \"device\": ";
    AppendJsonString(out, s.device);
    out += "}";
  }
  out += "], \"tensors\": [";
  for (size_t i = 0; i < ck.num_tensors(); ++i) {
    auto t = *ck.TensorInfoAt(i);
    if (i) out += ", ";
    out += "{\"path\": ";
    AppendJsonString(out, t.path);
    out += ", \"dtype\": \"" + std::string(ckpt::DTypeName(t.dtype)) + "\"";
    out += ", \"shape\": " + Dims(t.shape);
    out += ", \"strides\": " + Dims(t.strides);
    out += ", \"storage\": " + std::to_string(t.storage);
    out += ", \"offset\": " + std::to_string(t.storage_offset);
    out += ", \"nbytes\": " + std::to_string(t.nbytes());
    out += ", \"device\": ";
    AppendJsonString(out, ck.StorageInfoAt(t.storage)->device);
    out += std::string(", \"requires_grad\": ") +
           (t.requires_grad ? "true" : "false");
    out += std::string(", \"is_parameter\": ") +
           (t.is_parameter ? "true" : "false") + "}";
  }
  out += "], \"tree\": ";
  ckpt::tool::AppendValueJson(out, ck.root());
  out += "}\n";
  return out;
}

// `inspect`: a summary line, metadata, one line per tensor and per value.
std::string InspectText(const std::string& file, const Checkpoint& ck) {
  std::string out;
  uint64_t tensor_bytes = 0;
  for (size_t i = 0; i < ck.num_tensors(); ++i) {
    tensor_bytes += ck.TensorInfoAt(i)->nbytes();
  }
  char line[512];
  std::snprintf(line, sizeof line,
                "%s: ckpt format %u.%u, %s, producer \"%.*s\"\n"
                "  %zu tensors (%s) in %zu storages (%s of data), header %s, "
                "checksum chunk %s\n",
                file.c_str(), ck.format_major(), ck.format_minor(),
                HumanBytes(ck.file_size()).c_str(),
                static_cast<int>(ck.producer().size()), ck.producer().data(),
                ck.num_tensors(), HumanBytes(tensor_bytes).c_str(),
                ck.num_storages(), HumanBytes(ck.layout().data_size).c_str(),
                HumanBytes(ck.layout().header_size).c_str(),
                HumanBytes(ck.chunk_size()).c_str());
  out += line;
  auto md = ck.metadata();
  if (!md.empty()) {
    out += "metadata:\n";
    for (const auto& [k, v] : md) out += "  " + k + " = " + v + "\n";
  }
  if (ck.num_tensors()) out += "tensors:\n";
  for (size_t i = 0; i < ck.num_tensors(); ++i) {
    auto t = *ck.TensorInfoAt(i);
    std::string flags;
    if (t.is_parameter) flags += " parameter";
    if (t.requires_grad) flags += " requires_grad";
    if (!t.is_contiguous()) flags += " strides=" + Dims(t.strides);
    if (t.storage_offset)
      flags += " offset=" + std::to_string(t.storage_offset);
    std::string device = ck.StorageInfoAt(t.storage)->device;
    out += "  " + (t.path.empty() ? std::string("(root)") : t.path) + "  " +
           std::string(ckpt::DTypeName(t.dtype)) + " " + Dims(t.shape) + "  " +
           HumanBytes(t.nbytes()) + "  storage " + std::to_string(t.storage) +
           (device == "cpu" ? "" : "  " + device) + flags + "\n";
  }
  std::string values;
  ForEachLeaf(ck.root(), "", true, [&](const std::string& p, const Value& v) {
    values += "  " + (p.empty() ? std::string("(root)") : p) + " = " +
              ValueJson(v) + "\n";
  });
  if (!values.empty()) out += "values:\n" + values;
  return out;
}

int Inspect(const std::vector<std::string>& args) {
  if (WantsHelp(args)) return Print(kInspectHelp), kExitOk;
  std::string file;
  bool json = false;
  bool options_done = false;
  for (const auto& a : args) {
    if (!options_done && a == "--") {
      options_done = true;
    } else if (!options_done && a == "--json") {
      json = true;
    } else if (!options_done && !a.empty() && a[0] == '-') {
      return Usage(kInspectHelp, "unknown option '" + a + "'");
    } else if (file.empty()) {
      file = a;
    } else {
      return Usage(kInspectHelp, "unexpected argument '" + a + "'");
    }
  }
  if (file.empty()) return Usage(kInspectHelp, "missing FILE");
  if (IsDirectory(file)) return InspectDir(file, json);
  auto ck = Checkpoint::Open(file);
  if (!ck.ok()) return Fail(ck.status());

  Print(json ? InspectJson(file, *ck) : InspectText(file, *ck));
  return kExitOk;
}

// ---- cat
// ------------------------------------------------------------------------

// `cat DIR PATH [--rows A:B]`: the global tensor's rows, read box by box
// (about 16 MiB each) from the shards that hold them, in row-major order.
int CatDir(const std::string& dir, const std::string& path,
           std::optional<std::string> rows) {
  auto ck = OpenDir(dir);
  if (!ck.ok()) return Fail(ck.status());
  const auto* t = ck->manifest().Find(path);
  if (t == nullptr) {
    return Fail(
        ckpt::NotFound("no such global tensor").WithFile(dir).WithTensor(path));
  }
  const size_t ndim = t->shape.size();
  int64_t a = 0, b = ndim ? t->shape[0] : 1;
  if (rows) {
    if (ndim == 0) {
      return Fail(
          ckpt::InvalidArgument("--rows on a 0-dim tensor").WithTensor(path));
    }
    const size_t colon = rows->find(':');
    const std::string as = rows->substr(0, colon),
                      bs = colon == std::string::npos ? ""
                                                      : rows->substr(colon + 1);
    if (colon == std::string::npos || (!as.empty() && !ParseInt(as, &a)) ||
        (!bs.empty() && !ParseInt(bs, &b))) {
      return Usage(kCatHelp, "--rows takes integers A:B, got '" + *rows + "'");
    }
    if (a < 0 || b < a || b > t->shape[0]) {
      return Fail(ckpt::InvalidArgument("rows " + std::to_string(a) + ":" +
                                        std::to_string(b) + " outside [0, " +
                                        std::to_string(t->shape[0]) + "]")
                      .WithTensor(path));
    }
  }
  const uint64_t el = ckpt::DTypeSize(t->dtype);
  uint64_t row_bytes = el;  // one index of dim 0
  for (size_t d = 1; d < ndim; ++d)
    row_bytes *= static_cast<uint64_t>(t->shape[d]);
  if (row_bytes == 0 || a == b) return kExitOk;
  // Whole rows per box where they fit; one row, dim 1 in blocks, where a
  // row is larger (then rows are walked one at a time).
  constexpr uint64_t kBox = 16u << 20;
  ckpt::Box box;
  box.offsets.assign(ndim, 0);
  box.sizes = t->shape;
  const int64_t step =
      static_cast<int64_t>(std::max<uint64_t>(1, kBox / row_bytes));
  const bool split_rows = ndim >= 2 && row_bytes > kBox;
  const uint64_t inner = split_rows
                             ? row_bytes / static_cast<uint64_t>(t->shape[1])
                             : row_bytes;  // one index of dim 1
  const int64_t step1 =
      split_rows ? static_cast<int64_t>(std::max<uint64_t>(1, kBox / inner))
                 : 0;
  std::vector<std::byte> buf;
  for (int64_t r = a; r < b;) {
    int64_t c = 0;
    do {
      if (ndim > 0) {
        box.offsets[0] = r;
        box.sizes[0] = split_rows ? 1 : std::min(step, b - r);
      }
      if (split_rows) {
        box.offsets[1] = c;
        box.sizes[1] = std::min(step1, t->shape[1] - c);
      }
      buf.resize(static_cast<size_t>(box.numel()) * el);
      ckpt::dist::Want want{path, box, buf};
      auto plan = ck->Plan(std::span<const ckpt::dist::Want>(&want, 1));
      if (!plan.ok()) return Fail(plan.status());
      auto stats = ck->Execute(*plan);
      if (!stats.ok()) return Fail(stats.status());
      if (std::fwrite(buf.data(), 1, buf.size(), stdout) != buf.size()) {
        return Fail(ckpt::IoError(std::string("writing to stdout: ") +
                                  std::strerror(errno)));
      }
      c += split_rows ? box.sizes[1] : 0;
    } while (split_rows && c < t->shape[1]);
    r += ndim > 0 ? box.sizes[0] : 1;
  }
  if (std::fflush(stdout) != 0) {
    return Fail(ckpt::IoError(std::string("writing to stdout: ") +
                              std::strerror(errno)));
  }
  return kExitOk;
}

// `get DIR PATH`: the value at PATH in the saved state dict (the globals
// tree), global tensors shown as {"$tensor": path, "dtype", "shape"}.
int GetDir(const std::string& dir, const std::string& path) {
  auto ck = OpenDir(dir);
  if (!ck.ok()) return Fail(ck.status());
  auto globals = GlobalsOf(*ck);
  if (!globals.ok()) return Fail(globals.status());
  if (!*globals) {
    return Fail(ckpt::NotFound("the checkpoint was saved without a tree (no "
                               "values; its tensors are listed by inspect)")
                    .WithFile(dir));
  }
  auto segs = ckpt::SplitPath(path);
  if (!segs.ok()) return Fail(segs.status());
  Value v = **globals;
  for (const auto& seg : *segs) {
    auto c = v.Child(seg);
    if (!c.ok()) {
      return Fail(ckpt::NotFound("no such path in the saved tree")
                      .WithFile(dir)
                      .WithTensor(path));
    }
    v = *c;
  }
  std::string out;
  ckpt::tool::AppendValueJson(out, v, ckpt::JoinPath(*segs), segs->empty(),
                              PlaceholderJson(ck->manifest()));
  Print(out + "\n");
  return kExitOk;
}

int Cat(const std::vector<std::string>& args) {
  if (WantsHelp(args)) return Print(kCatHelp), kExitOk;
  std::vector<std::string> pos;
  std::string rows;
  bool has_rows = false;
  bool options_done = false;
  for (size_t i = 0; i < args.size(); ++i) {
    if (options_done) {
      pos.push_back(args[i]);
    } else if (args[i] == "--") {
      options_done = true;  // PATH may start with '-': ckpt cat F -- -0
    } else if (args[i] == "--rows") {
      if (i + 1 >= args.size()) return Usage(kCatHelp, "--rows needs A:B");
      rows = args[++i];
      has_rows = true;
    } else if (args[i].rfind("--rows=", 0) == 0) {
      rows = args[i].substr(7);
      has_rows = true;
    } else if (args[i].size() > 1 && args[i][0] == '-') {
      return Usage(kCatHelp,
                   "unknown option '" + args[i] +
                       "' (put '--' before a PATH that starts with '-')");
    } else {
      pos.push_back(args[i]);
    }
  }
  if (pos.size() != 2) return Usage(kCatHelp, "need FILE and PATH");
  if (IsDirectory(pos[0])) {
    return CatDir(pos[0], pos[1],
                  has_rows ? std::optional<std::string>(rows) : std::nullopt);
  }
  auto ck = Checkpoint::Open(pos[0]);
  if (!ck.ok()) return Fail(ck.status());
  ckpt::Result<ckpt::TensorRef> t = ckpt::TensorRef();
  if (has_rows) {
    auto colon = rows.find(':');
    if (colon == std::string::npos) return Usage(kCatHelp, "--rows takes A:B");
    auto info = ck->FindTensor(pos[1]);
    if (!info.ok()) return Fail(info.status());
    if (info->shape.empty()) {
      return Fail(
          ckpt::InvalidArgument("--rows on a 0-dim tensor").WithTensor(pos[1]));
    }
    int64_t a = 0, b = info->shape[0];
    std::string as = rows.substr(0, colon), bs = rows.substr(colon + 1);
    if ((!as.empty() && !ParseInt(as, &a)) ||
        (!bs.empty() && !ParseInt(bs, &b))) {
      return Usage(kCatHelp, "--rows takes integers A:B, got '" + rows + "'");
    }
    t = ck->TensorRows(pos[1], a, b);
  } else {
    t = ck->Tensor(pos[1]);
  }
  if (!t.ok()) return Fail(t.status());
  // Piece by piece in bounded memory, whatever the tensor's size or
  // strides (a stride-0 view of 2^40 elements starts flowing at once).
  Status s = ck->StreamTensor(*t, [](std::span<const std::byte> piece) {
    if (std::fwrite(piece.data(), 1, piece.size(), stdout) != piece.size()) {
      return ckpt::IoError(std::string("writing to stdout: ") +
                           std::strerror(errno));
    }
    return Status::OK();
  });
  if (!s.ok()) return Fail(s);
  if (std::fflush(stdout) != 0) {
    return Fail(ckpt::IoError(std::string("writing to stdout: ") +
                              std::strerror(errno)));
  }
  return kExitOk;
}

// ---- get
// ------------------------------------------------------------------------

int Get(const std::vector<std::string>& args) {
  if (WantsHelp(args)) return Print(kGetHelp), kExitOk;
  if (args.size() != 2) return Usage(kGetHelp, "need FILE and PATH");
  if (IsDirectory(args[0])) return GetDir(args[0], args[1]);
  auto ck = Checkpoint::Open(args[0]);
  if (!ck.ok()) return Fail(ck.status());
  auto v = ck->Get(args[1]);
  if (!v.ok()) return Fail(v.status());
  Print(ValueJson(*v) + "\n");
  return kExitOk;
}

// ---- verify
// ---------------------------------------------------------------------

int Verify(const std::vector<std::string>& args) {
  if (WantsHelp(args)) return Print(kVerifyHelp), kExitOk;
  std::string file;
  ckpt::VerifyOptions vo;
  ckpt::ReadOptions ro;
  bool options_done = false;
  for (size_t i = 0; i < args.size(); ++i) {
    if (!options_done && args[i] == "--") {
      options_done = true;
    } else if (options_done) {
      if (!file.empty())
        return Usage(kVerifyHelp, "unexpected argument '" + args[i] + "'");
      file = args[i];
    } else if (args[i] == "--threads") {
      int64_t n = 0;
      if (i + 1 >= args.size() || !ParseInt(args[i + 1], &n) || n < 1 ||
          n > 1024) {
        return Usage(kVerifyHelp, "--threads takes a number in 1..1024");
      }
      vo.threads = static_cast<unsigned>(n);
      ++i;
    } else if (args[i] == "--pread") {
      ro.backend = ckpt::Backend::kPread;
    } else if (!args[i].empty() && args[i][0] == '-') {
      return Usage(kVerifyHelp, "unknown option '" + args[i] + "'");
    } else if (file.empty()) {
      file = args[i];
    } else {
      return Usage(kVerifyHelp, "unexpected argument '" + args[i] + "'");
    }
  }
  if (file.empty()) return Usage(kVerifyHelp, "missing FILE");
  if (IsDirectory(file)) {
    if (ro.backend == ckpt::Backend::kPread)
      return Usage(kVerifyHelp, "--pread is for files, not directories");
    return VerifyDir(file, vo.threads);
  }
  auto t0 = std::chrono::steady_clock::now();
  auto ck = Checkpoint::Open(file, ro);
  if (!ck.ok()) return Fail(ck.status());
  Status s = ck->Verify(vo);
  if (!s.ok()) return Fail(s);
  double sec =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
          .count();
  std::printf("%s: OK (%zu tensors, %s checked in %.3f s)\n", file.c_str(),
              ck->num_tensors(), HumanBytes(ck->file_size()).c_str(), sec);
  return kExitOk;
}

// ---- diff
// -----------------------------------------------------------------------

// How many elements of two tensors of one dtype and shape differ, in
// bounded memory. Views laid out alike are compared in place, each stored
// element once: a dimension of stride 0 repeats the same bytes, so it
// multiplies the count instead of being walked (a stride-0 expand of 2^40
// elements compares in one step). Views laid out differently are copied
// to row-major order piece by piece and compared.
ckpt::Result<uint64_t> DifferingElements(const ckpt::TensorRef& a,
                                         const ckpt::TensorRef& b) {
  const size_t el = ckpt::DTypeSize(a.dtype());
  if (a.numel() == 0) return uint64_t{0};
  if (a.strides() == b.strides()) {
    if (std::memcmp(a.data().data(), b.data().data(), a.data().size()) == 0) {
      return uint64_t{0};
    }
    std::vector<int64_t> shape, strides;
    uint64_t repeat = 1;
    for (size_t d = 0; d < a.shape().size(); ++d) {
      if (a.strides()[d] == 0) {
        repeat *= static_cast<uint64_t>(a.shape()[d]);
      } else {
        shape.push_back(a.shape()[d]);
        strides.push_back(a.strides()[d]);
      }
    }
    std::vector<int64_t> idx(shape.size(), 0);
    uint64_t n = 0;
    for (;;) {
      int64_t off = 0;
      for (size_t d = 0; d < idx.size(); ++d) off += idx[d] * strides[d];
      const size_t at = static_cast<size_t>(off) * el;
      n += std::memcmp(a.data().data() + at, b.data().data() + at, el) != 0;
      size_t d = idx.size();
      while (d > 0 && ++idx[d - 1] == shape[d - 1]) idx[--d] = 0;
      if (d == 0) break;
    }
    return n * repeat;
  }
  constexpr size_t kPiece = 1 << 20;
  const uint64_t total = a.info().nbytes();
  std::vector<std::byte> pa(
      static_cast<size_t>(std::min<uint64_t>(kPiece, total))),
      pb(pa.size());
  uint64_t n = 0;
  for (uint64_t off = 0; off < total; off += kPiece) {
    const size_t len =
        static_cast<size_t>(std::min<uint64_t>(kPiece, total - off));
    std::span<std::byte> sa(pa.data(), len), sb(pb.data(), len);
    CKPT_RETURN_IF_ERROR(a.CopyTo(sa, off));
    CKPT_RETURN_IF_ERROR(b.CopyTo(sb, off));
    if (std::memcmp(sa.data(), sb.data(), len) == 0) continue;
    for (size_t k = 0; k < len; k += el)
      n += std::memcmp(&sa[k], &sb[k], el) != 0;
  }
  return n;
}

int Diff(const std::vector<std::string>& args) {
  if (WantsHelp(args)) return Print(kDiffHelp), kExitOk;
  if (args.size() != 2) return Usage(kDiffHelp, "need two files");
  constexpr int kExitTrouble = 3;
  // A sharded DIR is compared as the one file it consolidates to.
  struct Temps {
    std::vector<std::string> paths;
    ~Temps() {
      for (const auto& p : paths) ::unlink(p.c_str());
    }
  } temps;
  auto open = [&](const std::string& path) -> ckpt::Result<Checkpoint> {
    if (!IsDirectory(path)) return Checkpoint::Open(path);
    const char* tmp = std::getenv("TMPDIR");
    std::string t = std::string(tmp && *tmp ? tmp : "/tmp") + "/ckpt-diff-" +
                    std::to_string(::getpid()) + "-" +
                    std::to_string(temps.paths.size()) + ".ckpt";
    ckpt::WriteOptions wo;
    wo.sync = false;  // a temporary
    temps.paths.push_back(t);
    CKPT_RETURN_IF_ERROR(ckpt::dist::Consolidate(path, t, wo));
    return Checkpoint::Open(t);
  };
  auto a = open(args[0]);
  if (!a.ok()) return Fail(a.status()), kExitTrouble;
  auto b = open(args[1]);
  if (!b.ok()) return Fail(b.status()), kExitTrouble;
  std::string out;
  int differences = 0;
  auto note = [&](char mark, const std::string& path, const std::string& what) {
    out += std::string(1, mark) + " " + (path.empty() ? "(root)" : path) +
           (what.empty() ? "" : ": " + what) + "\n";
    ++differences;
  };
  // Tensors: both lists are sorted by path, so merge.
  size_t i = 0, j = 0;
  while (i < a->num_tensors() || j < b->num_tensors()) {
    auto ta = i < a->num_tensors() ? *a->TensorInfoAt(i) : ckpt::TensorInfo{};
    auto tb = j < b->num_tensors() ? *b->TensorInfoAt(j) : ckpt::TensorInfo{};
    if (j >= b->num_tensors() || (i < a->num_tensors() && ta.path < tb.path)) {
      note('-', ta.path, "tensor only in A");
      ++i;
      continue;
    }
    if (i >= a->num_tensors() || tb.path < ta.path) {
      note('+', tb.path, "tensor only in B");
      ++j;
      continue;
    }
    ++i;
    ++j;
    if (ta.dtype != tb.dtype) {
      note('~', ta.path,
           "dtype " + std::string(ckpt::DTypeName(ta.dtype)) + " -> " +
               std::string(ckpt::DTypeName(tb.dtype)));
      continue;
    }
    if (ta.shape != tb.shape) {
      note('~', ta.path, "shape " + Dims(ta.shape) + " -> " + Dims(tb.shape));
      continue;
    }
    auto ra = a->Tensor(ta.path);
    auto rb = b->Tensor(tb.path);
    if (!ra.ok()) return Fail(ra.status()), kExitTrouble;
    if (!rb.ok()) return Fail(rb.status()), kExitTrouble;
    auto differing = DifferingElements(*ra, *rb);
    if (!differing.ok()) return Fail(differing.status()), kExitTrouble;
    if (*differing > 0) {
      note('~', ta.path,
           std::to_string(*differing) + " of " + std::to_string(ta.numel()) +
               " elements differ");
    } else if (ta.requires_grad != tb.requires_grad ||
               ta.is_parameter != tb.is_parameter) {
      note('~', ta.path, "requires_grad/parameter flags differ");
    }
  }
  // Values: compare leaves by path.
  std::map<std::string, std::string> va, vb;
  ForEachLeaf(a->root(), "", true, [&](const std::string& p, const Value& v) {
    va[p] = ValueJson(v);
  });
  ForEachLeaf(b->root(), "", true, [&](const std::string& p, const Value& v) {
    vb[p] = ValueJson(v);
  });
  for (const auto& [p, v] : va) {
    auto it = vb.find(p);
    if (it == vb.end()) {
      note('-', p, v);
    } else if (it->second != v) {
      note('~', p, v + " -> " + it->second);
    }
  }
  for (const auto& [p, v] : vb) {
    if (!va.count(p)) note('+', p, v);
  }
  auto ma = a->metadata(), mb = b->metadata();
  if (ma != mb) note('~', "(metadata)", "string metadata differs");
  Print(out);
  return differences ? 1 : kExitOk;
}

// ---- import
// ---------------------------------------------------------------------

int Import(const std::vector<std::string>& args) {
  if (WantsHelp(args)) return Print(kImportHelp), kExitOk;
  ckpt::ImportOptions opt;
  ckpt::tool::ProgressMode mode = ckpt::tool::ProgressMode::kAuto;
  std::vector<std::string> pos;
  bool options_done = false;
  for (const auto& a : args) {
    if (!options_done && a == "--") {
      options_done = true;
    } else if (!options_done && a == "--no-crc") {
      opt.check_crc = false;
    } else if (!options_done && ckpt::tool::ParseProgressFlag(a, mode)) {
    } else if (!options_done && a.size() > 1 && a[0] == '-') {
      return Usage(kImportHelp, "unknown option '" + a + "'");
    } else {
      pos.push_back(a);
    }
  }
  if (pos.size() != 2) return Usage(kImportHelp, "need IN and OUT");
  ckpt::tool::ProgressLine line(mode);
  if (line.on()) {
    opt.progress = [&](uint64_t done, uint64_t total) {
      line.Update(pos[0], done, total);
      return Status::OK();
    };
  }
  if (IsDirectory(pos[0])) {
    auto r = ckpt::ImportHfDir(pos[0], pos[1], opt);
    line.Clear();
    if (!r.ok()) return Fail(r.status());
    std::printf(
        "%s -> %s: %zu tensors, %s from %zu %s file%s "
        "(Hugging Face save_pretrained)\n",
        pos[0].c_str(), pos[1].c_str(), r->tensors,
        HumanBytes(r->tensor_bytes).c_str(), r->files.size(), r->layout.c_str(),
        r->files.size() == 1 ? "" : "s");
    return kExitOk;
  }
  auto r = ckpt::ImportPth(pos[0], pos[1], opt);
  line.Clear();
  if (!r.ok()) return Fail(r.status());
  std::printf("%s -> %s: %zu tensors, %zu storages (%s format)\n",
              pos[0].c_str(), pos[1].c_str(), r->tensors, r->storages,
              r->container.c_str());
  return kExitOk;
}

// ---- export-hf
// ------------------------------------------------------------------

int ExportHfCmd(const std::vector<std::string>& args) {
  if (WantsHelp(args)) return Print(kExportHfHelp), kExitOk;
  ckpt::HfExportOptions opt;
  std::vector<std::string> pos;
  bool options_done = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    std::optional<std::string> size;
    if (!options_done && a == "--") {
      options_done = true;
    } else if (!options_done && a == "--max-shard-size") {
      if (i + 1 >= args.size()) {
        return Usage(kExportHfHelp, "--max-shard-size needs a SIZE");
      }
      size = args[++i];
    } else if (!options_done && a.rfind("--max-shard-size=", 0) == 0) {
      size = a.substr(std::string("--max-shard-size=").size());
    } else if (!options_done && a == "--no-verify") {
      opt.verify = false;
    } else if (!options_done && a.size() > 1 && a[0] == '-') {
      return Usage(kExportHfHelp, "unknown option '" + a + "'");
    } else {
      pos.push_back(a);
    }
    if (size) {
      auto n = ckpt::ParseByteSize(*size);
      if (!n.ok()) return Usage(kExportHfHelp, n.status().message());
      opt.max_shard_bytes = *n;
    }
  }
  if (pos.size() != 2) return Usage(kExportHfHelp, "need IN.ckpt and DIR");
  size_t dropped = 0;
  auto r = ckpt::ExportHf(pos[0], pos[1], opt, &dropped);
  if (!r.ok()) return Fail(r.status());
  if (dropped) {
    std::fprintf(stderr,
                 "ckpt: note: %zu non-tensor value%s of %s left out "
                 "(safetensors holds tensors only)\n",
                 dropped, dropped == 1 ? "" : "s", pos[0].c_str());
  }
  std::printf("%s -> %s: %zu files\n", pos[0].c_str(), pos[1].c_str(),
              r->size());
  for (const auto& f : *r) std::printf("  %s\n", f.c_str());
  return kExitOk;
}

// ---- load
// -----------------------------------------------------------------------

struct LoadArgs {
  std::string file, device = "cuda:0", strategy = "auto";
  std::vector<std::string> paths;
  std::optional<std::pair<int64_t, int64_t>> rows;
  bool verify = false;
  unsigned threads = 0;
  ckpt::tool::ProgressMode progress = ckpt::tool::ProgressMode::kAuto;
};

// Parses `ckpt load`'s arguments into `la`; returns the usage problem, or
// an empty string.
std::string ParseLoadArgs(const std::vector<std::string>& args, LoadArgs& la) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&]() -> const std::string* {
      return i + 1 < args.size() ? &args[++i] : nullptr;
    };
    if (a == "--device") {
      auto v = value();
      if (!v) return "--device needs a value";
      la.device = *v;
    } else if (a == "--strategy") {
      auto v = value();
      if (!v || (*v != "auto" && *v != "staged" && *v != "direct" &&
                 *v != "register")) {
        return "--strategy takes auto, staged, direct or register";
      }
      la.strategy = *v;
    } else if (a == "--threads") {
      auto v = value();
      int64_t n = 0;
      if (!v || !ParseInt(*v, &n) || n < 1 || n > 256)
        return "--threads takes 1..256";
      la.threads = static_cast<unsigned>(n);
    } else if (a == "--rows") {
      auto v = value();
      auto colon = v ? v->find(':') : std::string::npos;
      int64_t r0 = 0, r1 = 0;
      if (colon == std::string::npos || !ParseInt(v->substr(0, colon), &r0) ||
          !ParseInt(v->substr(colon + 1), &r1)) {
        return "--rows takes A:B";
      }
      la.rows = std::pair<int64_t, int64_t>{r0, r1};
    } else if (a == "--verify") {
      la.verify = true;
    } else if (ckpt::tool::ParseProgressFlag(a, la.progress)) {
    } else if (a == "--paths") {
      while (i + 1 < args.size() && args[i + 1].rfind("--", 0) != 0)
        la.paths.push_back(args[++i]);
    } else if (!a.empty() && a[0] == '-') {
      return "unknown option '" + a + "'";
    } else if (la.file.empty()) {
      la.file = a;
    } else {
      return "unexpected argument '" + a + "'";
    }
  }
  if (la.file.empty()) return "missing FILE";
  return "";
}

// The progress line moves at least this often within one large tensor.
constexpr uint64_t kProgressStep = 64ull << 20;

// `load --device cpu`: copies each tensor into memory of its own; returns
// the bytes copied.
ckpt::Result<uint64_t> LoadToHost(const Checkpoint& ck, const LoadArgs& la,
                                  ckpt::tool::ProgressLine& line) {
  uint64_t bytes = 0, total = 0;
  std::vector<ckpt::TensorRef> refs;  // views only: nothing read yet
  refs.reserve(la.paths.size());
  for (const auto& p : la.paths) {
    CKPT_ASSIGN_OR_RETURN(
        ckpt::TensorRef t,
        la.rows ? ck.TensorRows(p, la.rows->first, la.rows->second)
                : ck.Tensor(p));
    total += t.info().nbytes();
    refs.push_back(std::move(t));
  }
  line.Update(la.file, 0, total);
  std::vector<std::vector<std::byte>> keep;
  for (const auto& t : refs) {
    keep.emplace_back(static_cast<size_t>(t.info().nbytes()));
    std::span<std::byte> out = keep.back();
    if (!line.on() || la.verify || out.size() <= kProgressStep) {
      CKPT_RETURN_IF_ERROR(t.CopyTo(out));
    } else {
      // Whole 64 MiB windows (a multiple of every element size) so that
      // the line moves; --verify copies whole tensors, each chunk hashed
      // once.
      for (uint64_t b = 0; b < out.size(); b += kProgressStep) {
        const uint64_t n = std::min<uint64_t>(kProgressStep, out.size() - b);
        CKPT_RETURN_IF_ERROR(t.CopyTo(out.subspan(b, n), b));
        line.Update(la.file, bytes + b + n, total);
      }
    }
    bytes += out.size();
    line.Update(la.file, bytes, total);
  }
  return bytes;
}

// `load --device cuda:N`: the device loader, waited for; returns the bytes
// loaded and appends the strategy that ran to `device`.
ckpt::Result<uint64_t> LoadToGpu(const Checkpoint& ck, const LoadArgs& la,
                                 std::string& device,
                                 ckpt::tool::ProgressLine& line) {
#ifdef CKPT_WITH_CUDA
  std::vector<ckpt::TensorRequest> req;
  for (const auto& p : la.paths) req.push_back({p, la.rows});
  ckpt::DeviceLoadOptions o;
  o.device = la.device;
  o.threads = la.threads;
  o.strategy = la.strategy == "staged"     ? ckpt::LoadStrategy::kStaged
               : la.strategy == "direct"   ? ckpt::LoadStrategy::kDirect
               : la.strategy == "register" ? ckpt::LoadStrategy::kRegister
                                           : ckpt::LoadStrategy::kAuto;
  o.verify_checksums = la.verify;
  CKPT_ASSIGN_OR_RETURN(auto load, ckpt::LoadToDevice(ck, req, o));
  uint64_t bytes = 0;
  for (size_t i = 0; i < load->size(); ++i) bytes += load->tensor(i).nbytes;
  if (line.on()) {
    // Tensors in request order: a lower bound of what has arrived. A
    // failed tensor ends the display; Wait() below reports it.
    line.Update(la.file, 0, bytes);
    uint64_t done = 0;
    for (size_t i = 0; i < load->size() && load->WaitTensor(i).ok(); ++i) {
      done += load->tensor(i).nbytes;
      line.Update(la.file, done, bytes);
    }
  }
  CKPT_RETURN_IF_ERROR(load->Wait());
  device += ", " + load->strategy();
  return bytes;
#else
  (void)ck;
  (void)la;
  (void)device;
  (void)line;
  return ckpt::InvalidArgument(
      "this ckpt was built without the CUDA toolkit; only --device cpu works");
#endif
}

int Load(const std::vector<std::string>& args) {
  if (WantsHelp(args)) return Print(kLoadHelp), kExitOk;
  LoadArgs la;
  if (std::string problem = ParseLoadArgs(args, la); !problem.empty())
    return Usage(kLoadHelp, problem);
  auto t0 = std::chrono::steady_clock::now();
  // --verify checks each checksum chunk as its tensor is read (cpu) or just
  // before it is staged for the GPU: no separate pass over the file.
  ckpt::ReadOptions ro;
  ro.verify_checksums = la.verify && la.device == "cpu";
  auto ck = Checkpoint::Open(la.file, ro);
  if (!ck.ok()) return Fail(ck.status());
  if (la.paths.empty()) {
    for (size_t i = 0; i < ck->num_tensors(); ++i)
      la.paths.push_back(ck->TensorInfoAt(i)->path);
  }
  std::string device = la.device;
  ckpt::tool::ProgressLine line(la.progress);
  auto bytes = device == "cpu" ? LoadToHost(*ck, la, line)
                               : LoadToGpu(*ck, la, device, line);
  line.Clear();
  if (!bytes.ok()) return Fail(bytes.status());
  double sec =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
          .count();
  std::printf("loaded %zu tensors, %s to %s in %.4f s (%.2f GB/s)\n",
              la.paths.size(), HumanBytes(*bytes).c_str(), device.c_str(), sec,
              sec > 0 ? static_cast<double>(*bytes) / sec / 1e9 : 0.0);
  return kExitOk;
}

}  // namespace

namespace {

int Dispatch(int argc, char** argv) {
  if (argc < 2) return Usage(kMainHelp, "missing command");
  std::string cmd = argv[1];
  std::vector<std::string> args(argv + 2, argv + argc);
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    Print(kMainHelp);
    return kExitOk;
  }
  if (cmd == "--version") {
    std::printf("ckpt %s (format %u.%u)\n",
                std::string(ckpt::VersionString()).c_str(), ckpt::kFormatMajor,
                ckpt::kFormatMinor);
    return kExitOk;
  }
  if (cmd == "inspect") return Inspect(args);
  if (cmd == "cat") return Cat(args);
  if (cmd == "get") return Get(args);
  if (cmd == "verify") return Verify(args);
  if (cmd == "diff") return Diff(args);
  if (cmd == "import") return Import(args);
  if (cmd == "export-hf") return ExportHfCmd(args);
  if (cmd == "load") return Load(args);
  if (cmd == "consolidate") return ConsolidateCmd(args);
  if (cmd == "shard") return ShardCmd(args);
  return Usage(kMainHelp, "unknown command '" + cmd + "'");
}

}  // namespace

int ckpt::tool::CliMain(int argc, char** argv) {
  // The library returns Status, never throws; what is left here is this
  // file's own containers (a whole-tensor copy for `load --device cpu`).
  try {
    return Dispatch(argc, argv);
  } catch (const std::bad_alloc&) {
    return Fail(ckpt::ResourceExhausted("out of memory"));
  } catch (const std::exception& e) {
    return Fail(ckpt::IoError(std::string("unexpected error: ") + e.what()));
  }
}
