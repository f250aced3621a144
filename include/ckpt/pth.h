// Importing PyTorch .pth / .pt files (torch.save) without Python and
// without running anything from the file.
//
// Supported containers: the zip format (torch >= 1.6; data descriptors,
// zip64, any top-level folder, any record order, STORED or DEFLATE entries)
// and the legacy format (torch < 1.6 or _use_new_zipfile_serialization=
// False). The pickle is read by a restricted reader that only knows an
// allowlist of torch / numpy / builtin names (docs/PTH.md); anything else is
// refused with its name and byte offset. TorchScript, torch.package, tar
// (torch < 0.4) and other files are refused naming what they are.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "ckpt/status.h"
#include "ckpt/writer.h"

namespace ckpt {

/// Bounds on what one input may cost, so that a hostile file is refused
/// early (peak memory well under 256 MiB, seconds) instead of exhausting
/// the machine. Each refusal names the limit it hit.
struct ImportLimits {
  /// Largest pickle (data.pkl, or a legacy file's object pickle), checked
  /// against the declared size before anything is inflated.
  uint64_t max_pickle_bytes = 32ull << 20;
  /// Memory the pickle's objects, stack and memo may take while it is read
  /// (counted as allocated): this, or 80 bytes per byte of the input file
  /// (at most 80 x max_pickle_bytes) when that is more - a real state dict
  /// needs ~45 bytes of objects per pickle byte (50,000 tensors: ~225 MiB),
  /// and no file can make the importer take more than 80x its size.
  uint64_t max_pickle_memory = 192ull << 20;
  /// The object graph as written, with every memo reuse expanded: nodes of
  /// the tree, tensor references, and bytes of strings, bytes, big ints and
  /// tensor paths.
  uint64_t max_nodes = 1ull << 22;
  uint64_t max_tensor_refs = 1ull << 20;
  /// (The tree's paths, which the writer keeps one per node, are also held
  /// to 16 bytes per input byte, at least 32 MiB, when that is less.)
  uint64_t max_expanded_bytes = 256ull << 20;
};

/// A conversion's progress: `done` of `total` bytes of tensor storage
/// converted (read, checked and, for ImportPth, written). Return a non-OK
/// Status to stop the conversion: it then fails with that Status and
/// writes nothing (a cancelled ImportPth leaves no output, as on any error).
using ImportProgress = std::function<Status(uint64_t done, uint64_t total)>;

struct ImportOptions {
  /// Check each zip entry's CRC-32. An archive whose CRC-32 fields are all
  /// zero (torch 2.x with compute_crc32=False) is read as "not computed"
  /// either way, as torch does; turn this off for other writers that omit
  /// them.
  bool check_crc = true;
  /// How Python 2 `str` values (pickle BINSTRING) become text, as
  /// torch.load's `encoding`: "utf-8" (torch.load's default; a str that is
  /// not UTF-8 is refused) or "latin1" (each byte one code point). Raw
  /// bytes of numpy arrays are kept as bytes under either.
  std::string encoding = "utf-8";
  ImportLimits limits;
  WriteOptions write;
  /// Called, when set, on the thread that runs the conversion: once with
  /// (0, total) after the input is parsed and checked (total: the bytes of
  /// every distinct storage the file's tensors use), then as storages are
  /// converted (after each storage and every 64 MiB within a larger one),
  /// and last with (total, total) once the output is committed (that
  /// call's Status is ignored: the file is in place). `done` never
  /// decreases (a value may repeat). Not called for a file refused while
  /// it is parsed. Unset: no cost. Directory conversions call it per file,
  /// with that file's bytes. CheckPth (a dry run) calls it as it reads.
  ImportProgress progress;
};

/// What a conversion found (or would write, for a dry run).
struct ImportReport {
  std::string container;       ///< "zip" or "legacy"
  size_t tensors = 0;          ///< tensor entries in the object tree
  size_t storages = 0;         ///< distinct storages (shared ones once)
  uint64_t storage_bytes = 0;  ///< bytes of all storages
  /// zip only: "checked", "not computed" (all CRC-32 fields zero) or
  /// "skipped" (check_crc off); also the output's `source_crc32` metadata.
  std::string crc32;
};

/// Converts `in` to a new ckpt file `out`, written atomically: on any error
/// nothing is left at `out` (an existing file there is untouched) and no
/// temporary remains. Errors: kNotFound / kIoError for the files,
/// kCorrupt for malformed input, kInvalidArgument for input refused by
/// policy (forbidden globals, unsupported tensor kinds), kChecksumMismatch
/// for a CRC mismatch; each names the file and byte offset.
Result<ImportReport> ImportPth(const std::string& in, const std::string& out,
                               const ImportOptions& options = {});

/// Parses and checks `in` completely (every record, size and CRC) without
/// writing anything: what ImportPth would convert, or why it would refuse.
/// It runs the same walk and the same checks as ImportPth, so the two
/// decide alike (short of I/O errors writing the output).
Result<ImportReport> CheckPth(const std::string& in,
                              const ImportOptions& options = {});

/// One file of a directory conversion.
struct DirFileResult {
  std::string input;   ///< path under the input directory, as found there
  std::string output;  ///< path under the output directory (input's, .ckpt)
  Status status;       ///< OK, or why it was refused
  ImportReport report;
};

/// Called before (done = false) and after (done = true) each file.
using DirProgress = std::function<void(size_t index, size_t total,
                                       const DirFileResult& file, bool done)>;

/// Converts every .pth, .pt and .bin file below `in_dir` (symlinks to
/// files are read, directory symlinks are not followed) to
/// `out_dir`/<path under in_dir, extension .ckpt>. Outputs are named after
/// the path under `in_dir`, never after a link's target, and never land
/// outside `out_dir`: an output whose path would pass through a symlink or
/// a non-directory in `out_dir`, or that is itself a symlink there, or that
/// another input already claimed (a.pt and a.pth), is refused by name, as
/// are dangling links and inputs that are not regular files. Files are
/// taken in byte order of their paths. An error Result only when `in_dir`
/// cannot be listed; each file's outcome is in its DirFileResult.
Result<std::vector<DirFileResult>> ImportPthDir(
    const std::string& in_dir, const std::string& out_dir,
    const ImportOptions& options = {}, const DirProgress& progress = {});

/// ImportPthDir without writing: the same decisions, CheckPth per file.
/// With a non-empty `out_dir`, the output paths are checked there too.
Result<std::vector<DirFileResult>> CheckPthDir(
    const std::string& in_dir, const std::string& out_dir = "",
    const ImportOptions& options = {}, const DirProgress& progress = {});

}  // namespace ckpt
