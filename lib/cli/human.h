// Small formatting helpers shared by the CLI library (lib/cli) and the
// command-line tools.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace ckpt::tool {

/// "512 B", "4.0 KiB", "1.2 GiB".
inline std::string HumanBytes(uint64_t n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
  return buf;
}

}  // namespace ckpt::tool
