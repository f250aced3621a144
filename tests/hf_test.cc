// Hugging Face save_pretrained directories (ckpt/hf.h) and the strict JSON
// reader under them: safetensors files crafted here byte by byte, good and
// hostile, imported, exported and read back. (tests/python/test_hf.py
// runs the same code on directories transformers itself writes.)
#include <ckpt/hf.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "json_internal.h"
#include "safetensors_internal.h"
#include "test_util.h"

namespace {

using ckpt::Checkpoint;
using ckpt::DType;
using ckpt::ErrorCode;
using ckpt::test::Fast;
using ckpt::test::Pattern;
using ckpt::test::ReadAll;
using ckpt::test::TempDir;
using ckpt::test::WriteAll;
namespace fs = std::filesystem;

// A safetensors file: the 8-byte size, `header` as given, then `data`.
std::vector<std::byte> St(const std::string& header,
                          const std::vector<std::byte>& data) {
  std::vector<std::byte> out(8);
  const uint64_t n = header.size();
  for (size_t i = 0; i < 8; ++i) out[i] = static_cast<std::byte>(n >> (8 * i));
  for (char c : header) out.push_back(static_cast<std::byte>(c));
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

void Put(const std::string& path, const std::vector<std::byte>& b) {
  WriteAll(path, b);
}

void PutText(const std::string& path, const std::string& s) {
  WriteAll(path, std::as_bytes(std::span(s.data(), s.size())));
}

ckpt::ImportOptions FastImport() {
  ckpt::ImportOptions o;
  o.write = Fast();
  return o;
}

const char* kTwo =
    R"({"__metadata__":{"format":"pt","trained_on":"tiny \"set\""},)"
    R"("b":{"dtype":"F32","shape":[2,3],"data_offsets":[8,32]},)"
    R"("a":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]}})";

TEST_CASE("json: strict RFC 8259, bounded, exact integers", "[hf]") {
  using ckpt::internal::ParseJson;
  auto ok =
      ParseJson(R"( {"a": [1, -2.5e3, true, null, "\u00e9\ud83d\ude00"]} )");
  REQUIRE(ok.ok());
  const auto* a = ok->Find("a");
  REQUIRE(a);
  REQUIRE(a->items.size() == 5);
  CHECK(a->items[4].text == "\xc3\xa9\xf0\x9f\x98\x80");
  CHECK(ParseJson("18446744073709551615")->AsUint64() == UINT64_MAX);
  // One past 2^64, a sign, a fraction: not an exact u64 (flatbuffers'
  // parser turns the first into 0).
  CHECK_FALSE(ParseJson("18446744073709551616")->AsUint64());
  CHECK_FALSE(ParseJson("-1")->AsUint64());
  CHECK_FALSE(ParseJson("1.0")->AsUint64());
  for (const char* bad :
       {"{\"a\": 1} x", "{a: 1}", "{\"a\": 1,}", "[1,]", "nan", "01", "1.",
        "\"\\ud800\"", "\"\\udc00\"", "\"\xff\"", "\"a\nb\"",
        "{\"a\":1,\"a\":2}", "", "   ", "tru", "\"\\x\""}) {
    INFO(bad);
    auto r = ParseJson(bad);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == ErrorCode::kCorrupt);
  }
  std::string deep(65, '[');
  deep += std::string(65, ']');
  auto d = ParseJson(deep);
  REQUIRE_FALSE(d.ok());
  CHECK_THAT(d.status().message(), Catch::Contains("nesting deeper than 64"));
  CHECK(ParseJson(std::string(64, '[') + std::string(64, ']')).ok());
}

TEST_CASE("hf: a safetensors file imports, exports and reads back equal",
          "[hf]") {
  TempDir src, out;
  auto data = Pattern(32, 7);
  Put(src.File("model.safetensors"), St(kTwo, data));
  PutText(src.File("config.json"), R"({"model_type": "tiny"})");
  const std::string ck = out.File("m.ckpt");
  auto r = ckpt::ImportHfDir(src.path(), ck, FastImport());
  REQUIRE(r.ok());
  CHECK(r->layout == "safetensors");
  CHECK(r->tensors == 2);
  CHECK(r->tensor_bytes == 32);
  auto c = Checkpoint::Open(ck);
  REQUIRE(c.ok());
  auto a = c->Tensor("a");
  auto b = c->Tensor("b");
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(a->dtype() == DType::kBFloat16);
  CHECK(b->shape() == std::vector<int64_t>{2, 3});
  CHECK(std::memcmp(a->data().data(), data.data(), 8) == 0);
  CHECK(std::memcmp(b->data().data(), data.data() + 8, 24) == 0);
  CHECK(*c->Metadata(ckpt::kHfConfigKey) == R"({"model_type": "tiny"})");
  CHECK(*c->Metadata("format") == "pt");

  TempDir dst;
  ckpt::HfExportOptions eo;
  eo.sync = false;
  auto files = ckpt::ExportHf(ck, dst.path(), eo);
  REQUIRE(files.ok());
  CHECK(files->size() == 2);  // model.safetensors, config.json
  auto bytes = ReadAll(dst.File("model.safetensors"));
  uint64_t n = 0;
  for (size_t i = 0; i < 8; ++i)
    n |= static_cast<uint64_t>(bytes[i]) << (8 * i);
  CHECK((8 + n) % 8 == 0);  // data aligned, as safetensors writes it
  auto h = ckpt::internal::ParseSafetensorsHeader(
      std::string_view(reinterpret_cast<const char*>(bytes.data()) + 8, n),
      bytes.size());
  REQUIRE(h.ok());
  REQUIRE(h->tensors.size() == 2);
  CHECK(h->tensors[0].name == "a");  // name order
  // The metadata goes back as it came (config.json aside).
  CHECK(h->metadata == std::vector<std::pair<std::string, std::string>>{
                           {"format", "pt"}, {"trained_on", "tiny \"set\""}});
  CHECK(std::memcmp(bytes.data() + 8 + n, data.data(), 32) == 0);
  CHECK(ReadAll(dst.File("config.json")).size() == 22);
}

TEST_CASE("hf: hostile safetensors headers are refused by name", "[hf]") {
  struct Case {
    const char* name;
    std::vector<std::byte> file;
    const char* says;
    ErrorCode code = ErrorCode::kCorrupt;
  };
  auto d8 = Pattern(8, 1);
  auto hdr = [](const std::string& t) {
    return std::string(R"({"t":)") + t + "}";
  };
  std::vector<Case> cases = {
      {"short", {std::byte{1}, std::byte{2}}, "shorter than the 8-byte"},
      {"huge header", St("{}", {}), "over the limit"},
      {"past end", St("{}", {}), "runs past the end"},
      {"not an object", St("[1]", {}), "does not start with '{'"},
      {"bad json", St("{\"t\": }", {}), "JSON: expected a value"},
      {"duplicate",
       St(R"({"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},)"
          R"("t":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})",
          {}),
       "duplicate key \"t\""},
      {"unknown dtype",
       St(hdr(R"({"dtype":"F7","shape":[8],"data_offsets":[0,8]})"), d8),
       "unknown dtype \"F7\""},
      {"f4", St(hdr(R"({"dtype":"F4","shape":[16],"data_offsets":[0,8]})"), d8),
       "F4, a sub-byte type ckpt does not import", ErrorCode::kInvalidArgument},
      {"size mismatch",
       St(hdr(R"({"dtype":"F32","shape":[3],"data_offsets":[0,8]})"), d8),
       "hold 8 bytes, its shape 12"},
      {"gap", St(hdr(R"({"dtype":"U8","shape":[4],"data_offsets":[4,8]})"), d8),
       "starts at data byte 4, not 0"},
      {"short data",
       St(hdr(R"({"dtype":"U8","shape":[4],"data_offsets":[0,4]})"), d8),
       "end at data byte 4, the file's data at 8"},
      {"reversed",
       St(hdr(R"({"dtype":"U8","shape":[0],"data_offsets":[8,0]})"), d8),
       "two integers [begin, end]"},
      {"offset past 2^64",
       St(hdr(R"({"dtype":"U8","shape":[8],"data_offsets":[0,18446744073709551624]})"),
          d8),
       "two integers [begin, end]"},
      {"shape overflow",
       St(hdr(R"({"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]})"),
          d8),
       "shape's size overflows"},
      {"negative dim",
       St(hdr(R"({"dtype":"U8","shape":[-1],"data_offsets":[0,8]})"), d8),
       "integers 0..2^63-1"},
      {"metadata not strings", St(R"({"__metadata__":{"k":1}})", {}),
       "'k' is not a string"},
      {"no dtype", St(hdr(R"({"shape":[8],"data_offsets":[0,8]})"), d8),
       "lacks a string dtype"},
  };
  // The size fields that lie.
  cases[1].file[5] = std::byte{0x7f};  // ~2^47 bytes of header
  cases[2].file[0] = std::byte{200};
  for (auto& c : cases) {
    SECTION(c.name) {
      TempDir src, out;
      Put(src.File("model.safetensors"), c.file);
      const std::string ck = out.File("m.ckpt");
      auto r = ckpt::ImportHfDir(src.path(), ck, FastImport());
      REQUIRE_FALSE(r.ok());
      CHECK(r.status().code() == c.code);
      CHECK_THAT(r.status().ToString(), Catch::Contains(c.says));
      CHECK_THAT(r.status().file(), Catch::EndsWith("model.safetensors"));
      CHECK(out.List().empty());  // nothing written, no temporary left
    }
  }
}

TEST_CASE("hf: the index is held to the shards", "[hf]") {
  TempDir src, out;
  auto d8 = Pattern(8, 3);
  Put(src.File("s1.safetensors"),
      St(R"({"x":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}})", d8));
  Put(src.File("s2.safetensors"),
      St(R"({"y":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", d8));
  auto run = [&](const std::string& index) {
    PutText(src.File("model.safetensors.index.json"), index);
    return ckpt::ImportHfDir(src.path(), out.File("m.ckpt"), FastImport());
  };
  REQUIRE(run(R"({"weight_map":{"x":"s1.safetensors","y":"s2.safetensors"}})")
              .ok());
  CHECK(Checkpoint::Open(out.File("m.ckpt"))->num_tensors() == 2);
  std::vector<std::pair<std::string, std::string>> bad = {
      {R"({"weight_map":{"x":"s1.safetensors","y":"../s2.safetensors"}})",
       "not a file in"},
      {R"({"weight_map":{"x":"s1.safetensors","y":"s3.safetensors"}})",
       "names s3.safetensors, which is not a file"},
      {R"({"weight_map":{"x":"s2.safetensors","y":"s1.safetensors"}})",
       "holds 'x', which model.safetensors.index.json places in "
       "s2.safetensors"},
      {R"({"weight_map":{"x":"s1.safetensors","y":"s2.safetensors","z":"s1.safetensors"}})",
       "names tensor 'z', which s1.safetensors does not hold"},
      {R"({"weight_map":{"y":"s1.safetensors"}})",
       "holds 'x', which model.safetensors.index.json does not name"},
      {R"({"weight_map":["s1.safetensors"]})", "no weight_map"},
      {R"({"weight_map":{"x":"s1.safetensors","x":"s2.safetensors"}})",
       "duplicate key"},
  };
  for (const auto& [index, says] : bad) {
    INFO(index);
    ::unlink(out.File("m.ckpt").c_str());
    auto r = run(index);
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().ToString(), Catch::Contains(says));
    CHECK(out.List().empty());
  }
  // model.safetensors wins over an index, as in transformers.
  Put(src.File("model.safetensors"),
      St(R"({"w":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}})", d8));
  auto r = ckpt::ImportHfDir(src.path(), out.File("m.ckpt"), FastImport());
  REQUIRE(r.ok());
  CHECK(r->files.size() == 1);
  CHECK(Checkpoint::Open(out.File("m.ckpt"))->FindTensor("w").ok());
  // Not a save_pretrained directory at all.
  TempDir empty;
  auto none = ckpt::ImportHfDir(empty.path(), out.File("n.ckpt"), FastImport());
  CHECK(none.status().code() == ErrorCode::kNotFound);
}

TEST_CASE(
    "hf: export shards by size, refuses what safetensors cannot hold, "
    "and leaves no stale weights",
    "[hf]") {
  TempDir work;
  const std::string ck = work.File("m.ckpt");
  {
    auto w = ckpt::Writer::Create(ck, Fast());
    REQUIRE(w.ok());
    for (int i = 0; i < 5; ++i) {
      auto d = Pattern(1000, static_cast<unsigned>(i));
      REQUIRE(
          w->PutTensor("layer." + std::to_string(i), DType::kUInt8, {1000}, d)
              .ok());
    }
    REQUIRE(w->PutValue("step", w->AddInt(3)).ok());
    REQUIRE(w->SetMetadata(ckpt::kHfConfigKey, "{}").ok());
    REQUIRE(w->Commit().ok());
  }
  const std::string dir = work.File("out");
  ckpt::HfExportOptions eo;
  eo.sync = false;
  eo.max_shard_bytes = 2000;
  size_t dropped = 0;
  auto files = ckpt::ExportHf(ck, dir, eo, &dropped);
  REQUIRE(files.ok());
  CHECK(dropped == 1);  // "step"
  auto names = [&] {
    std::vector<std::string> v;
    for (const auto& e : fs::directory_iterator(dir))
      v.push_back(e.path().filename().string());
    std::sort(v.begin(), v.end());
    return v;
  };
  CHECK(names() == std::vector<std::string>{"config.json",
                                            "model-00001-of-00003.safetensors",
                                            "model-00002-of-00003.safetensors",
                                            "model-00003-of-00003.safetensors",
                                            "model.safetensors.index.json"});
  // Re-imported: the same tensors.
  auto back = ckpt::ImportHfDir(dir, work.File("back.ckpt"), FastImport());
  REQUIRE(back.ok());
  CHECK(back->tensors == 5);
  CHECK(back->files.size() == 3);
  // A single-file export over it: the shards and the index are gone.
  eo.max_shard_bytes = 1'000'000;
  REQUIRE(ckpt::ExportHf(ck, dir, eo).ok());
  CHECK(names() ==
        std::vector<std::string>{"config.json", "model.safetensors"});
  // And back to shards: model.safetensors, which transformers would read
  // first, is gone; a user's other file stays.
  PutText(dir + "/tokenizer.json", "{}");
  eo.max_shard_bytes = 3000;
  REQUIRE(ckpt::ExportHf(ck, dir, eo).ok());
  CHECK(names() == std::vector<std::string>{
                       "config.json", "model-00001-of-00002.safetensors",
                       "model-00002-of-00002.safetensors",
                       "model.safetensors.index.json", "tokenizer.json"});
  fs::remove_all(dir);

  // Nested trees and dtypes without a safetensors name: refused, no files.
  const std::string nested = work.File("nested.ckpt");
  {
    auto w = ckpt::Writer::Create(nested, Fast());
    REQUIRE(w.ok());
    auto d = Pattern(8, 1);
    auto t = w->AddTensor(DType::kUInt8, {8}, d);
    REQUIRE(t.ok());
    ckpt::NodeId k = w->AddString("w");
    auto inner = w->AddDict(std::span(&k, 1), std::span(&*t, 1));
    REQUIRE(inner.ok());
    REQUIRE(w->PutValue("model", *inner).ok());
    REQUIRE(w->Commit().ok());
  }
  auto r = ckpt::ExportHf(nested, dir, eo);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().ToString(), Catch::Contains("is nested"));
  const std::string cplx = work.File("c32.ckpt");
  {
    auto w = ckpt::Writer::Create(cplx, Fast());
    REQUIRE(w.ok());
    auto d = Pattern(8, 1);
    REQUIRE(w->PutTensor("z", DType::kComplex32, {2}, d).ok());
    REQUIRE(w->Commit().ok());
  }
  r = ckpt::ExportHf(cplx, dir, eo);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().ToString(), Catch::Contains("no safetensors name"));
  CHECK(r.status().tensor() == "z");
  CHECK((!fs::exists(dir) || fs::is_empty(dir)));
  fs::remove_all(dir);
}

TEST_CASE("hf: byte sizes", "[hf]") {
  CHECK(*ckpt::ParseByteSize("5GB") == 5'000'000'000ull);
  CHECK(*ckpt::ParseByteSize("500MiB") == 500ull << 20);
  CHECK(*ckpt::ParseByteSize("2.5 kb") == 2500);
  CHECK(*ckpt::ParseByteSize("1000") == 1000);
  for (const char* bad : {"", "GB", "5XB", "-1", "0", "1.2.3GB", "0.1"}) {
    INFO(bad);
    CHECK_FALSE(ckpt::ParseByteSize(bad).ok());
  }
}

}  // namespace

namespace {

std::vector<std::string> Names(const std::string& dir) {
  std::vector<std::string> v;
  for (const auto& e : fs::directory_iterator(dir))
    v.push_back(e.path().filename().string());
  std::sort(v.begin(), v.end());
  return v;
}

TEST_CASE("hf: what the adversarial review found", "[hf]") {
  TempDir work;
  ckpt::HfExportOptions eo;
  eo.sync = false;
  auto one = [&](const std::string& name, DType dt, size_t n) {
    const std::string path = work.File(name + ".ckpt");
    auto w = ckpt::Writer::Create(path, Fast());
    REQUIRE(w.ok());
    REQUIRE(
        w->PutTensor(name, dt, {static_cast<int64_t>(n)}, Pattern(n, 3)).ok());
    REQUIRE(w->Commit().ok());
    return path;
  };
  SECTION("a tensor named __metadata__ is refused, not written twice") {
    auto r = ckpt::ExportHf(one("__metadata__", DType::kUInt8, 4),
                            work.File("out"), eo);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().tensor() == "__metadata__");
  }
  SECTION("the FNUZ float8s round-trip") {
    for (DType dt : {DType::kFloat8E4M3FNUZ, DType::kFloat8E5M2FNUZ}) {
      const std::string out = work.File("fnuz");
      REQUIRE(ckpt::ExportHf(one("f", dt, 4), out, eo).ok());
      auto back = ckpt::ImportHfDir(out, work.File("back.ckpt"), FastImport());
      REQUIRE(back.ok());
      CHECK(Checkpoint::Open(work.File("back.ckpt"))->Tensor("f")->dtype() ==
            dt);
      fs::remove_all(out);
    }
  }
  SECTION("a damaged byte is not exported; nothing is published") {
    const std::string path = one("w", DType::kUInt8, 1 << 16);
    auto ck = Checkpoint::Open(path);
    REQUIRE(ck.ok());
    const uint64_t at = ck->StorageInfoAt(0)->offset + 100;
    auto bytes = ReadAll(path);
    bytes[at] ^= std::byte{1};
    WriteAll(path, bytes);
    const std::string out = work.File("bad");
    auto r = ckpt::ExportHf(path, out, eo);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == ErrorCode::kChecksumMismatch);
    CHECK((!fs::exists(out) || Names(out).empty()));  // no temporary either
    fs::remove_all(out);
  }
  SECTION("OUT may not be one of its inputs") {
    const std::string out = work.File("dir");
    REQUIRE(ckpt::ExportHf(one("w", DType::kUInt8, 8), out, eo).ok());
    auto r = ckpt::ImportHfDir(out, out + "/model.safetensors", FastImport());
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().ToString(), Catch::Contains("is the input"));
    CHECK(ckpt::ImportHfDir(out, out + "/x.ckpt", FastImport()).ok());
    fs::remove_all(out);
  }
  SECTION("a model.safetensors that is not a file is named, not skipped") {
    const std::string dir = work.File("odd");
    fs::create_directories(dir + "/model.safetensors");
    auto r = ckpt::ImportHfDir(dir, work.File("o.ckpt"), FastImport());
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().ToString(), Catch::Contains("not a regular file"));
    CHECK_THAT(r.status().file(), Catch::EndsWith("model.safetensors"));
    fs::remove_all(dir);
  }
  SECTION("a __metadata__ entry may not pose as config.json") {
    const std::string dir = work.File("poison");
    fs::create_directories(dir);
    Put(dir + "/model.safetensors",
        St(R"({"__metadata__":{"hf.config":"evil"},)"
           R"("w":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}})",
           Pattern(8, 1)));
    auto r = ckpt::ImportHfDir(dir, work.File("p.ckpt"), FastImport());
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().ToString(), Catch::Contains("'hf.config'"));
    fs::remove_all(dir);
  }
  SECTION("only exact shard names are swept; a killed export's temporary is") {
    const std::string out = work.File("sweep");
    fs::create_directories(out + "/.ckpt-export-dead");
    PutText(out + "/model-7-of-9.safetensors", "mine");
    PutText(out + "/model-00001-of-00009.safetensors", "stale");
    REQUIRE(ckpt::ExportHf(one("w", DType::kUInt8, 8), out, eo).ok());
    CHECK(Names(out) == std::vector<std::string>{"model-7-of-9.safetensors",
                                                 "model.safetensors"});
    fs::remove_all(out);
  }
  SECTION("thousands of shards need no descriptor each") {
    // 300 one-tensor shards under a limit of 64 descriptors.
    const std::string path = work.File("many.ckpt");
    {
      auto w = ckpt::Writer::Create(path, Fast());
      REQUIRE(w.ok());
      for (int i = 0; i < 300; ++i) {
        REQUIRE(w->PutTensor("t" + std::to_string(1000 + i), DType::kUInt8,
                             {16}, Pattern(16, static_cast<unsigned>(i)))
                    .ok());
      }
      REQUIRE(w->Commit().ok());
    }
    struct rlimit old;
    REQUIRE(::getrlimit(RLIMIT_NOFILE, &old) == 0);
    struct rlimit low = old;
    low.rlim_cur = 64;
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &low) == 0);
    eo.max_shard_bytes = 16;
    const std::string out = work.File("manyout");
    auto e = ckpt::ExportHf(path, out, eo);
    auto i = ckpt::ImportHfDir(out, work.File("many2.ckpt"), FastImport());
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &old) == 0);
    REQUIRE(e.ok());
    CHECK(e->size() == 301);
    REQUIRE(i.ok());
    CHECK(i->tensors == 300);
    fs::remove_all(out);
  }
}

TEST_CASE("json: a bound on values bounds memory", "[hf]") {
  std::string many = "[";
  for (int i = 0; i < 1000; ++i) many += i ? ",0" : "0";
  many += "]";
  CHECK(ckpt::internal::ParseJson(many, 64, 1001).ok());
  auto r = ckpt::internal::ParseJson(many, 64, 1000);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().message(), Catch::Contains("more than 1000 values"));
}

}  // namespace
