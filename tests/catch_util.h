// Catch2 assertions shared by the C++ tests.
#pragma once

#include <catch2/catch.hpp>
#include <string>

#include "ckpt/status.h"

namespace ckpt::test {

/// `s` failed with `code`, and its printed form mentions `needle`.
inline void RequireError(const Status& s, ErrorCode code,
                         const std::string& needle) {
  INFO(s.ToString());
  REQUIRE_FALSE(s.ok());
  CHECK(s.code() == code);
  CHECK(s.ToString().find(needle) != std::string::npos);
}

}  // namespace ckpt::test
