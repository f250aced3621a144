// pth2ckpt: convert torch.save .pth/.pt files to ckpt, without Python and
// without running anything from the input. Thin: the work is ckpt::ImportPth.
#include <ckpt/ckpt.h>
#include <ckpt/pth.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "common/human.h"

namespace fs = std::filesystem;

namespace {

const char* kHelp =
    "usage: pth2ckpt [options] IN.pth OUT.ckpt\n"
    "       pth2ckpt [options] DIR_IN DIR_OUT\n"
    "       pth2ckpt --dry-run IN.pth\n"
    "\n"
    "Converts a file written by torch.save (zip or legacy format) to ckpt.\n"
    "Nothing in the input is executed: the pickle is read by an allowlist\n"
    "of torch, numpy and builtin types, and anything else is refused with\n"
    "its name. The output is written atomically: on refusal there is no\n"
    "OUT file and no temporary.\n"
    "\n"
    "With two directories, converts every .pth, .pt and .bin file below\n"
    "DIR_IN to DIR_OUT/<same path>.ckpt, printing a progress line per file\n"
    "and a summary of what was refused and why.\n"
    "\n"
    "Options:\n"
    "  --dry-run   parse and check IN completely; report what would be\n"
    "              converted, or why not; write nothing\n"
    "  --no-crc    skip zip CRC-32 checks (for files written without them)\n"
    "  --no-sync   do not fsync the output (faster; not crash-safe)\n"
    "  -h, --help  this text\n"
    "\n"
    "Exit status: 0 converted, 1 refused or failed, 2 usage error.\n";

std::string Describe(const ckpt::ImportReport& r) {
  return std::to_string(r.tensors) + " tensors, " + std::to_string(r.storages) +
         " storages, " + ckpt::tool::HumanBytes(r.storage_bytes) + " (" + r.container + " format)";
}

int ConvertDir(const fs::path& in, const fs::path& out, const ckpt::ImportOptions& opt) {
  std::vector<fs::path> files;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(in, ec); !ec && it != fs::end(it);
       it.increment(ec)) {
    if (!it->is_regular_file()) continue;
    auto ext = it->path().extension().string();
    if (ext == ".pth" || ext == ".pt" || ext == ".bin") files.push_back(it->path());
  }
  if (ec) {
    std::fprintf(stderr, "pth2ckpt: %s: %s\n", in.c_str(), ec.message().c_str());
    return 1;
  }
  std::sort(files.begin(), files.end());
  std::vector<std::pair<std::string, std::string>> refused;
  uint64_t bytes = 0;
  size_t ok = 0;
  for (size_t i = 0; i < files.size(); ++i) {
    fs::path rel = fs::relative(files[i], in);
    fs::path dst = out / rel;
    dst.replace_extension(".ckpt");
    std::printf("[%zu/%zu] %s ... ", i + 1, files.size(), rel.c_str());
    std::fflush(stdout);
    fs::create_directories(dst.parent_path(), ec);
    auto r = ec ? ckpt::Result<ckpt::ImportReport>(ckpt::IoError(
                      "cannot create " + dst.parent_path().string() + ": " + ec.message()))
                : ckpt::ImportPth(files[i].string(), dst.string(), opt);
    if (r.ok()) {
      ++ok;
      bytes += r->storage_bytes;
      std::printf("ok: %s\n", Describe(*r).c_str());
    } else {
      std::printf("refused\n");
      refused.emplace_back(rel.string(), r.status().ToString());
    }
  }
  std::printf("converted %zu of %zu files (%s)", ok, files.size(), ckpt::tool::HumanBytes(bytes).c_str());
  std::printf(refused.empty() ? "\n" : "; refused %zu:\n", refused.size());
  for (const auto& [f, why] : refused) std::printf("  %s: %s\n", f.c_str(), why.c_str());
  return refused.empty() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  ckpt::ImportOptions opt;
  bool dry = false;
  std::vector<std::string> pos;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kHelp, stdout);
      return 0;
    } else if (a == "--dry-run") {
      dry = true;
    } else if (a == "--no-crc") {
      opt.check_crc = false;
    } else if (a == "--no-sync") {
      opt.write.sync = false;
    } else if (a.size() > 1 && a[0] == '-') {
      std::fprintf(stderr, "pth2ckpt: unknown option '%s'\n\n%s", a.c_str(), kHelp);
      return 2;
    } else {
      pos.push_back(a);
    }
  }
  if (dry ? pos.size() != 1 : pos.size() != 2) {
    std::fprintf(stderr, "pth2ckpt: %s\n\n%s",
                 dry ? "--dry-run takes one input" : "need IN and OUT", kHelp);
    return 2;
  }
  if (dry) {
    auto r = ckpt::CheckPth(pos[0], opt);
    if (!r.ok()) {
      std::fprintf(stderr, "pth2ckpt: refused: %s\n", r.status().ToString().c_str());
      return 1;
    }
    std::printf("%s: would convert %s\n", pos[0].c_str(), Describe(*r).c_str());
    return 0;
  }
  std::error_code ec;
  if (fs::is_directory(pos[0], ec)) {
    if (fs::exists(pos[1], ec) && !fs::is_directory(pos[1], ec)) {
      std::fprintf(stderr, "pth2ckpt: %s is a directory but %s is not\n", pos[0].c_str(),
                   pos[1].c_str());
      return 2;
    }
    return ConvertDir(pos[0], pos[1], opt);
  }
  auto t0 = std::chrono::steady_clock::now();
  auto r = ckpt::ImportPth(pos[0], pos[1], opt);
  if (!r.ok()) {
    std::fprintf(stderr, "pth2ckpt: refused: %s\n", r.status().ToString().c_str());
    return 1;
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s -> %s: %s in %.3f s\n", pos[0].c_str(), pos[1].c_str(),
              Describe(*r).c_str(), s);
  return 0;
}
