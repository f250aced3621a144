// libFuzzer target: arbitrary bytes as a DCP directory through
// ReadDcpDirectory (the restricted pickle machine's DCP profile, the
// metadata walk, item zips and pickles, safetensors headers). The input
// is split: a 4-byte little-endian length, that many bytes of `.metadata`,
// and the rest as `__0_0.distcp`. Must never crash, hang, leak or
// allocate without bound.
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "pth/dcp_internal.h"

namespace {

const std::string& Dir() {
  static const std::string dir = [] {
    char tmpl[] = "/tmp/dcp_fuzz.XXXXXX";
    const char* d = mkdtemp(tmpl);
    if (!d) std::abort();
    return std::string(d);
  }();
  return dir;
}

void Write(const std::string& path, const uint8_t* data, size_t size) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data),
          static_cast<std::streamsize>(size));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  uint32_t n = 0;
  std::memcpy(&n, data, 4);
  data += 4;
  size -= 4;
  if (n > size) n = static_cast<uint32_t>(size);
  Write(Dir() + "/.metadata", data, n);
  Write(Dir() + "/__0_0.distcp", data + n, size - n);
  auto r = ckpt::internal::ReadDcpDirectory(Dir());
  if (r.ok()) {
    for (const auto& t : r->tensors) {
      for (const auto& c : t.chunks) {
        if (c.file == "__0_0.distcp" && c.offset + c.length > size - n) {
          std::abort();  // a location outside the file
        }
      }
    }
  }
  return 0;
}
