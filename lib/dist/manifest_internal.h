// The manifest's bytes (docs/SHARDED.md 4-5) and the protocol messages:
// the one place that encodes and checks them. The save protocol, the
// loader, the tools and the fuzz target all come through here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ckpt/dist.h"
#include "ckpt/status.h"

namespace ckpt::dist::internal {

/// Manifest file preamble: magic, versions, flags, size and checksum of the
/// FlatBuffers bytes that follow, checksum of the preamble.
inline constexpr size_t kManifestPreambleBytes = 48;
inline constexpr uint16_t kManifestMajor = 1;
inline constexpr uint16_t kManifestMinor = 0;
/// Refused above this (FlatBuffers 2.0 can neither build nor verify 2 GiB;
/// a manifest of 10^6 2-D chunks is ~60 MB).
inline constexpr uint64_t kMaxManifestBytes = uint64_t{1} << 30;
/// M12's bound on box comparisons for layouts that are not a grid: this
/// many per chunk plus kMinOverlapTests (a row or column sharding needs
/// about one per chunk).
inline constexpr uint64_t kMaxOverlapTestsPerChunk = 16;
inline constexpr uint64_t kMinOverlapTests = uint64_t{1} << 20;

/// The semantic rules of SHARDED.md 5 over a decoded manifest (M6-M14):
/// why it is not valid, or OK. `name` is what errors call it.
Status CheckManifest(const Manifest& m, const std::string& name);

/// Preamble + FlatBuffers bytes of a manifest that CheckManifest accepts
/// (kInvalidArgument with its problem otherwise).
Result<std::vector<std::byte>> EncodeManifest(const Manifest& m);
/// The same bytes without the checks: for tests that need a manifest
/// breaking one rule, sealed with valid checksums.
std::vector<std::byte> SerializeManifest(const Manifest& m);
/// A preamble with valid checksums around FlatBuffers bytes (any bytes:
/// for tests of the Verifier rules).
std::vector<std::byte> SealManifest(std::span<const std::byte> flatbuffer,
                                    uint16_t major = kManifestMajor,
                                    uint16_t minor = kManifestMinor);

/// Every rule of SHARDED.md 5: preamble, checksums, Verifier, semantics.
/// Errors are kCorrupt / kUnsupportedVersion / kChecksumMismatch naming
/// `name` and the byte offset.
Result<Manifest> DecodeManifest(std::span<const std::byte> bytes,
                                const std::string& name);

/// A Status on the wire and back.
std::vector<std::byte> EncodeStatus(const Status& s);
Status DecodeStatus(std::span<const std::byte> bytes);

/// What a rank tells the coordinator at commit.
struct RankReport {
  uint32_t rank = 0;
  uint32_t world_size = 0;
  Status status;
  ShardFileInfo file;
  /// This rank's chunks, ChunkInfo::file 0 meaning its own file. Zero-size
  /// chunks declare a tensor's dtype and shape without bytes.
  std::vector<GlobalTensorInfo> tensors;
  bool has_globals = false;
  /// The checkpoint directory the rank saved to (CleanDir of its `dir`).
  std::string dir;
};
std::vector<std::byte> EncodeReport(const RankReport& r);
/// kCorrupt naming `rank` when the bytes are not a report.
Result<RankReport> DecodeReport(std::span<const std::byte> bytes,
                                uint32_t rank);

/// What the coordinator broadcasts after the commit (or its failure).
std::vector<std::byte> EncodeOutcome(const Result<CommitInfo>& r);
Result<CommitInfo> DecodeOutcome(std::span<const std::byte> bytes,
                                 const std::string& dir);

/// "[0:3, 4:8]": a box in errors.
std::string BoxString(const Box& b);

}  // namespace ckpt::dist::internal

namespace ckpt::dist::internal {

/// The failure of the lowest failing rank ("rank R of W failed: ..."),
/// noting how many more failed; OK when none did.
Status FirstRankFailure(const std::vector<Status>& per_rank, int world);

/// Test builds' fault injection: called at the named phases of a save
/// ("committing" on every rank as CommitSave starts, "described" on every
/// rank once its report is made, "before_manifest", "before_rename",
/// "after_rename" on the coordinator). Not for users.
using FaultHook = void (*)(const char* phase, int rank);
void SetFaultHook(FaultHook hook);
void Fault(const char* phase, int rank);

/// The class tag of a global tensor's placeholder in the globals tree
/// (docs/SHARDED.md 3): an empty dict carrying it (AddGlobalTensor, which
/// the Python package calls too).
inline constexpr std::string_view kGlobalTensorTag = "ckpt.dist.GlobalTensor";

/// f() (a Result) with any exception it throws returned as the IoError
/// "<what> failed: ...": for the coordinator's work between two
/// collectives, which no exception may skip (the others would wait in the
/// broadcast forever).
template <class F>
auto Guarded(const std::string& what, const std::string& file, F&& f)
    -> decltype(f()) {
  try {
    return f();
  } catch (const std::exception& e) {
    return IoError(what + " failed: " + e.what()).WithFile(file);
  } catch (...) {
    return IoError(what + " failed").WithFile(file);
  }
}

/// "shard-RRRRR-of-WWWWW.ckpt".
std::string ShardName(int rank, int world_size);
/// "<parent>/.<name>.tmp" for a save to `dir`; kInvalidArgument for a dir
/// without a name.
Result<std::string> TempDirOf(const std::string& dir);

}  // namespace ckpt::dist::internal
