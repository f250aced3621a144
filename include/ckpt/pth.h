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
#include <string>

#include "ckpt/status.h"
#include "ckpt/writer.h"

namespace ckpt {

struct ImportOptions {
  /// Check each zip entry's CRC-32 (newer torch can write files without
  /// them: turn off for those).
  bool check_crc = true;
  WriteOptions write;
};

/// What a conversion found (or would write, for a dry run).
struct ImportReport {
  std::string container;      ///< "zip" or "legacy"
  size_t tensors = 0;         ///< tensor entries in the object tree
  size_t storages = 0;        ///< distinct storages (shared ones once)
  uint64_t storage_bytes = 0; ///< bytes of all storages
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
Result<ImportReport> CheckPth(const std::string& in,
                              const ImportOptions& options = {});

}  // namespace ckpt
