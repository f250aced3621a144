// libFuzzer target: arbitrary bytes as a safetensors file (the 8-byte
// header size, the JSON header, the data) through the checks ImportHfDir
// runs before it writes anything, and as text for the strict JSON reader.
// Must never crash, hang or leak; an accepted header must describe ranges
// back to back that end at the end of the input.
#include <cstdint>
#include <string_view>

#include "json_internal.h"
#include "safetensors_internal.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view all(reinterpret_cast<const char*>(data), size);
  (void)ckpt::internal::ParseJson(all);
  if (size < 8) return 0;
  uint64_t n = 0;
  for (size_t i = 0; i < 8; ++i) n |= static_cast<uint64_t>(data[i]) << (8 * i);
  if (n > size - 8) return 0;
  auto h = ckpt::internal::ParseSafetensorsHeader(all.substr(8, n), size);
  if (h.ok()) {
    uint64_t at = 0;
    for (const auto& t : h->tensors) {
      if (t.begin != at || t.end < t.begin) __builtin_trap();
      at = t.end;
    }
    if (h->data_start + at != size) __builtin_trap();
  }
  return 0;
}
