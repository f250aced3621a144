// libFuzzer target: arbitrary bytes as a .pth file through CheckPth (zip
// reader, legacy reader, restricted pickle machine, converter walk), and,
// when the first byte is odd, through the directory converter: the bytes
// become a file in a small tree with symlinks (to it, dangling, and out of
// the output directory) that ImportPthDir and CheckPthDir must handle
// without writing anywhere but the output directory. Must never crash,
// hang, leak or allocate without bound.
#include <ckpt/pth.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace fs = std::filesystem;

namespace {

void DirectoryCase(const uint8_t* data, size_t size) {
  char tmpl[] = "/tmp/pth_fuzz_dir.XXXXXX";
  if (!mkdtemp(tmpl)) return;
  const fs::path root(tmpl);
  const fs::path in = root / "in", out = root / "out", victim = root / "victim";
  std::error_code ec;
  fs::create_directories(in / "sub", ec);
  fs::create_directories(out, ec);
  fs::create_directories(victim, ec);
  {
    std::ofstream f(in / "sub" / "a.pth", std::ios::binary);
    f.write(reinterpret_cast<const char*>(data + 1),
            static_cast<std::streamsize>(size - 1));
  }
  const uint8_t bits = data[0];
  if (bits & 2) fs::create_symlink("sub/a.pth", in / "link.bin", ec);
  if (bits & 4) fs::create_symlink("missing.pth", in / "dangling.pt", ec);
  if (bits & 8) fs::create_directory_symlink(victim, out / "sub", ec);
  if (bits & 16) fs::create_symlink(victim / "x.ckpt", out / "link.ckpt", ec);
  if (bits & 32) fs::copy_file(in / "sub" / "a.pth", in / "sub" / "a.pt", ec);
  ckpt::ImportOptions opt;
  opt.write.sync = false;
  (void)ckpt::CheckPthDir(in.string(), out.string(), opt);
  (void)ckpt::ImportPthDir(in.string(), out.string(), opt);
  // Nothing may land outside the output directory.
  if (!fs::is_empty(victim, ec) && !ec) __builtin_trap();
  fs::remove_all(root, ec);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 0 && (data[0] & 1)) {
    DirectoryCase(data, size);
    return 0;
  }
  int fd = memfd_create("pth_fuzz", MFD_CLOEXEC);
  if (fd < 0) return 0;
  size_t done = 0;
  while (done < size) {
    ssize_t n = write(fd, data + done, size - done);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  (void)ckpt::CheckPth("/proc/self/fd/" + std::to_string(fd));
  close(fd);
  return 0;
}
