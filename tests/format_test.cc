#include "ckpt/format.h"

#include <catch2/catch.hpp>

using namespace ckpt;

TEST_CASE("dtype table: every code has a name that maps back and a size") {
  for (uint8_t c = 1; c <= kMaxDTypeCode; ++c) {
    auto d = static_cast<DType>(c);
    INFO("code " << int(c));
    REQUIRE(!DTypeName(d).empty());
    REQUIRE(DTypeSize(d) > 0);
    REQUIRE(DTypeFromName(DTypeName(d)) == d);
  }
  CHECK(DTypeSize(DType::kInvalid) == 0);
  CHECK(DTypeSize(static_cast<DType>(kMaxDTypeCode + 1)) == 0);
  CHECK(DTypeSize(DType::kBFloat16) == 2);
  CHECK(DTypeSize(DType::kComplex128) == 16);
  CHECK(DTypeSize(DType::kComplex32) == 4);
  CHECK(DTypeSize(DType::kFloat8E4M3FN) == 1);
  CHECK(DTypeSize(DType::kUInt64) == 8);
  CHECK(DTypeName(DType::kBool) == "bool");
  CHECK(!DTypeFromName("float33").has_value());
}

TEST_CASE("tensor paths escape '~' and '/' as RFC 6901") {
  CHECK(EscapePathSegment("a/b~c") == "a~1b~0c");
  CHECK(JoinPath({"optimizer_state", "state", "0", "exp_avg"}) ==
        "optimizer_state/state/0/exp_avg");
  CHECK(JoinPath({}).empty());
  auto s = SplitPath("a~1b/~0/c");
  REQUIRE(s.ok());
  CHECK(*s == std::vector<std::string>{"a/b", "~", "c"});
  CHECK(SplitPath("").value().empty());
  CHECK(SplitPath("a//b").value() == std::vector<std::string>{"a", "", "b"});
  CHECK(SplitPath("bad~2").status().code() == ErrorCode::kInvalidArgument);
  CHECK(SplitPath("bad~").status().code() == ErrorCode::kInvalidArgument);
  for (std::string raw : {"", "~", "/", "~1", "a~/b", "x/y/z"}) {
    auto back = SplitPath(JoinPath({raw, raw}));
    REQUIRE(back.ok());
    CHECK(*back == std::vector<std::string>{raw, raw});
  }
}

TEST_CASE("device strings") {
  for (auto d : {"cpu", "cuda:0", "cuda:15", "mps", "meta", "xla:3", "_x1"}) {
    CHECK(IsValidDevice(d));
  }
  for (auto d :
       {"", "0cuda", "cuda:", "cuda:x", "cu da", "cuda:0:1", "cuda:-1"}) {
    CHECK_FALSE(IsValidDevice(d));
  }
  // The same grammar as the reader's (FORMAT.md): the importer used to
  // accept what the writer then refused with another message.
  CHECK(IsValidDevice("cuda:2147483647"));
  CHECK_FALSE(IsValidDevice("cuda:01"));
  CHECK_FALSE(IsValidDevice("cuda:2147483648"));
  CHECK_FALSE(IsValidDevice("cuda:99999999999999999999"));
}

TEST_CASE("AlignUp and blob alignment") {
  CHECK(AlignUp(0, 64) == 0u);
  CHECK(AlignUp(1, 64) == 64u);
  CHECK(AlignUp(4096, 4096) == 4096u);
  CHECK_FALSE(AlignUp(UINT64_MAX, 64).has_value());
  CHECK(BlobAlignment(100) == kMinAlignment);
  CHECK(BlobAlignment(kLargeBlobBytes) == kPageBytes);
}

TEST_CASE("Status prints file, offset, tensor and message") {
  Status s = Corrupt("blob ends past EOF")
                 .WithTensor("layer.3.w")
                 .WithOffset(1048600)
                 .WithFile("m.ckpt");
  CHECK(s.ToString() ==
        "m.ckpt:1048600: corrupt: tensor 'layer.3.w': blob ends past EOF");
  // The innermost location wins.
  CHECK(s.WithOffset(5).offset() == 1048600);
  CHECK(Status::OK().ToString() == "OK");
  Result<int> r(NotFound("x"));
  CHECK(!r.ok());
  CHECK(r.status().code() == ErrorCode::kNotFound);
}

TEST_CASE("dtype table: the minor version that added each code") {
  // Format 1.0 had codes 1..32; 1.1 added uint1..uint7 and int1..int7.
  for (uint8_t c = 1; c <= kMaxDTypeCode; ++c) {
    INFO(DTypeName(static_cast<DType>(c)));
    CHECK(DTypeSinceMinor(static_cast<DType>(c)) == (c <= 32 ? 0 : 1));
  }
  CHECK(DTypeSinceMinor(DType::kInvalid) == 0);
  for (const auto& row : kValueKinds) CHECK(row.since_minor == 0);
}
