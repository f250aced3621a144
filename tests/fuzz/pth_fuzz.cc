// libFuzzer target: arbitrary bytes as a .pth file through CheckPth (zip
// reader, legacy reader, restricted pickle machine, converter walk). Must
// never crash, hang, leak or allocate without bound.
#include <ckpt/pth.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
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
