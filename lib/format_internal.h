// Checks of the format's text rules shared by every layer that reads or
// writes them (header validation, the writer, the .pth importer): one
// definition each.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace ckpt::internal {

/// Byte offset of the first byte of `s` that is not part of well-formed
/// UTF-8 (RFC 3629: shortest form only, no surrogates U+D800..U+DFFF,
/// nothing above U+10FFFF; U+0000 is allowed), or nullopt when all is.
std::optional<size_t> Utf8Problem(std::string_view s);

/// Why `device` breaks the device grammar of docs/FORMAT.md section 6
/// (`TYPE` or `TYPE:INDEX`, TYPE = [A-Za-z_][A-Za-z0-9_]*, INDEX a decimal
/// in [0, 2^31 - 1] without leading zeros, at most 64 characters), or
/// nullopt when it is valid.
std::optional<std::string> DeviceProblem(std::string_view device);

/// Why a view (dtype, shape, strides in elements, offset in elements) does
/// not fit a storage of `storage_nbytes`, or nullopt when it fits. Checked
/// arithmetic throughout; shared by the reader (R13) and the writer.
std::optional<std::string> ViewProblem(uint8_t dtype_code,
                                       std::span<const int64_t> shape,
                                       std::span<const int64_t> strides,
                                       int64_t storage_offset,
                                       uint64_t storage_nbytes);

}  // namespace ckpt::internal
