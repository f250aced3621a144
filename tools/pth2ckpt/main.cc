// pth2ckpt: convert torch.save .pth/.pt files to ckpt, without Python and
// without running anything from the input. Thin: the work is ckpt::ImportPth.
#include <ckpt/ckpt.h>
#include <ckpt/pth.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "cli/human.h"
#include "cli/progress.h"

namespace fs = std::filesystem;

namespace {

const char* kHelp =
    "usage: pth2ckpt [options] IN.pth OUT.ckpt\n"
    "       pth2ckpt [options] DIR_IN DIR_OUT\n"
    "       pth2ckpt --dry-run [options] IN.pth | DIR_IN [DIR_OUT]\n"
    "\n"
    "Converts a file written by torch.save (zip or legacy format) to ckpt.\n"
    "Nothing in the input is executed: the pickle is read by an allowlist\n"
    "of torch, numpy and builtin types, and anything else is refused with\n"
    "its name. The output is written atomically: on refusal there is no\n"
    "OUT file and no temporary.\n"
    "\n"
    "With two directories, converts every .pth, .pt and .bin file below\n"
    "DIR_IN to DIR_OUT/<same path>.ckpt, printing a progress line per file\n"
    "and a summary of what was refused and why. Outputs are named after the\n"
    "path under DIR_IN (a symlink's name, not its target's) and never\n"
    "written through a symlink in DIR_OUT; such files, dangling links and\n"
    "two inputs with one output name are refused by name.\n"
    "\n"
    "Options:\n"
    "  --dry-run         parse and check everything a conversion checks;\n"
    "                    report what would be converted, or why not; write\n"
    "                    nothing (with DIR_OUT, check the output paths too)\n"
    "  --no-crc          skip zip CRC-32 checks (for writers that omit them;\n"
    "                    archives whose CRC-32s are all zero are read as\n"
    "                    'not computed' without it)\n"
    "  --encoding ENC    Python 2 str values: utf-8 (default, as torch.load)\n"
    "                    or latin1 (as torch.load(..., encoding='latin1'))\n"
    "  --max-pickle-mib N   refuse pickles larger than N MiB (default 32)\n"
    "  --max-memory-mib N   memory the pickle's objects may take (default "
    "192)\n"
    "  --no-sync         do not fsync the output (faster; not crash-safe)\n"
    "  --progress, --no-progress\n"
    "                    show (or not) a progress line on stderr: bytes\n"
    "                    converted and GB/s, erased when a file is done;\n"
    "                    default: shown when stderr is a terminal\n"
    "  -h, --help        this text\n"
    "\n"
    "Exit status: 0 converted, 1 refused or failed, 2 usage error.\n";

std::string Describe(const ckpt::ImportReport& r) {
  std::string s = std::to_string(r.tensors) + " tensors, " +
                  std::to_string(r.storages) + " storages, " +
                  ckpt::tool::HumanBytes(r.storage_bytes) + " (" + r.container +
                  " format)";
  if (r.crc32 == "not computed")
    s += "; CRC-32: not computed by the writer (all fields zero)";
  if (r.crc32 == "skipped") s += "; CRC-32: not checked (--no-crc)";
  return s;
}

// Reports a file's bytes on `line` (when it is shown) under `label`.
void ShowBytes(ckpt::ImportOptions& opt, ckpt::tool::ProgressLine& line,
               const std::string* label) {
  if (!line.on()) return;
  opt.progress = [&line, label](uint64_t done, uint64_t total) {
    line.Update(*label, done, total);
    return ckpt::Status::OK();
  };
}

int ConvertDir(const std::string& in, const std::string& out, bool dry,
               ckpt::ImportOptions opt, ckpt::tool::ProgressLine& line) {
  // The progress line names the file; its "[i/n] FILE ... " goes to stdout
  // with the outcome once the line is erased, so stdout's bytes are the
  // same with or without it.
  std::string label;
  ShowBytes(opt, line, &label);
  auto progress = [&](size_t i, size_t n, const ckpt::DirFileResult& f,
                      bool done) {
    char head[32];
    std::snprintf(head, sizeof head, "[%zu/%zu] ", i + 1, n);
    if (!done) {
      label = head + f.input;
      if (!line.on()) std::printf("%s%s ... ", head, f.input.c_str());
      std::fflush(stdout);
      return;
    }
    if (line.on()) {
      line.Clear();
      std::printf("%s%s ... ", head, f.input.c_str());
    }
    if (f.status.ok()) {
      std::printf("%s: %s\n", dry ? "would convert" : "ok",
                  Describe(f.report).c_str());
    } else {
      std::printf("refused\n");
    }
    std::fflush(stdout);
  };
  auto r = dry ? ckpt::CheckPthDir(in, out, opt, progress)
               : ckpt::ImportPthDir(in, out, opt, progress);
  if (!r.ok()) {
    std::fprintf(stderr, "pth2ckpt: %s\n", r.status().ToString().c_str());
    return 1;
  }
  uint64_t bytes = 0;
  size_t ok = 0, refused = 0;
  for (const auto& f : *r) {
    if (f.status.ok()) {
      ++ok;
      bytes += f.report.storage_bytes;
    } else {
      ++refused;
    }
  }
  std::printf("%s %zu of %zu files (%s)", dry ? "would convert" : "converted",
              ok, r->size(), ckpt::tool::HumanBytes(bytes).c_str());
  std::printf(refused == 0 ? "\n" : "; refused %zu:\n", refused);
  for (const auto& f : *r) {
    if (!f.status.ok())
      std::printf("  %s: %s\n", f.input.c_str(), f.status.ToString().c_str());
  }
  return refused == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  ckpt::ImportOptions opt;
  ckpt::tool::ProgressMode mode = ckpt::tool::ProgressMode::kAuto;
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
    } else if (ckpt::tool::ParseProgressFlag(a, mode)) {
    } else if (a == "--encoding" || a.rfind("--encoding=", 0) == 0) {
      std::string v =
          a.size() > 10 ? a.substr(11) : (i + 1 < argc ? argv[++i] : "");
      if (v != "utf-8" && v != "utf8" && v != "latin1" && v != "latin-1") {
        std::fprintf(
            stderr,
            "pth2ckpt: --encoding takes utf-8 or latin1, not '%s'\n\n%s",
            v.c_str(), kHelp);
        return 2;
      }
      opt.encoding = v;
    } else if (a == "--max-pickle-mib" || a == "--max-memory-mib") {
      char* end = nullptr;
      const char* v = i + 1 < argc ? argv[++i] : "";
      unsigned long long n = std::strtoull(v, &end, 10);
      if (*v == '\0' || *end != '\0' || n == 0 || n > (1ull << 20)) {
        std::fprintf(
            stderr,
            "pth2ckpt: %s takes a number of MiB (1..1048576), not '%s'\n",
            a.c_str(), v);
        return 2;
      }
      (a == "--max-pickle-mib" ? opt.limits.max_pickle_bytes
                               : opt.limits.max_pickle_memory) = n << 20;
    } else if (a == "--") {
      for (++i; i < argc; ++i) pos.push_back(argv[i]);
    } else if (a.size() > 1 && a[0] == '-') {
      std::fprintf(stderr, "pth2ckpt: unknown option '%s'\n\n%s", a.c_str(),
                   kHelp);
      return 2;
    } else {
      pos.push_back(a);
    }
  }
  std::error_code ec;
  const bool dir = !pos.empty() && fs::is_directory(pos[0], ec);
  const bool usage_ok =
      dry ? (pos.size() == 1 || (dir && pos.size() == 2)) : pos.size() == 2;
  if (!usage_ok) {
    std::fprintf(stderr, "pth2ckpt: %s\n\n%s",
                 dry ? "--dry-run takes one input (or DIR_IN [DIR_OUT])"
                     : "need IN and OUT",
                 kHelp);
    return 2;
  }
  ckpt::tool::ProgressLine line(mode);
  if (dir) {
    if (pos.size() == 2 && fs::exists(pos[1], ec) &&
        !fs::is_directory(pos[1], ec)) {
      std::fprintf(stderr, "pth2ckpt: %s is a directory but %s is not\n",
                   pos[0].c_str(), pos[1].c_str());
      return 2;
    }
    return ConvertDir(pos[0], pos.size() == 2 ? pos[1] : "", dry, opt, line);
  }
  ShowBytes(opt, line, &pos[0]);
  if (dry) {
    auto r = ckpt::CheckPth(pos[0], opt);
    line.Clear();
    if (!r.ok()) {
      std::fprintf(stderr, "pth2ckpt: refused: %s\n",
                   r.status().ToString().c_str());
      return 1;
    }
    std::printf("%s: would convert %s\n", pos[0].c_str(), Describe(*r).c_str());
    return 0;
  }
  auto t0 = std::chrono::steady_clock::now();
  auto r = ckpt::ImportPth(pos[0], pos[1], opt);
  line.Clear();
  if (!r.ok()) {
    std::fprintf(stderr, "pth2ckpt: refused: %s\n",
                 r.status().ToString().c_str());
    return 1;
  }
  double s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
          .count();
  std::printf("%s -> %s: %s in %.3f s\n", pos[0].c_str(), pos[1].c_str(),
              Describe(*r).c_str(), s);
  return 0;
}
