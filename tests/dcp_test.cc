// Reading DCP (torch.distributed.checkpoint) directories: every chunk's
// located bytes against the reference bytes tests/dcp/make_dcp.py wrote
// for each full tensor, and the refusals (variants, hostile .metadata,
// truncation and bit flips). The fixtures need torch 2.x to generate:
// CKPT_DCP_FIXTURES names their directory; without it these tests only
// check what needs no fixture.
#include <ckpt/box.h>
#include <ckpt/pth.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "pth/dcp_internal.h"
#include "test_util.h"

namespace {

using ckpt::Box;
using ckpt::internal::DcpIndex;
using ckpt::internal::DcpTensor;
using ckpt::internal::IsDcpDirectory;
using ckpt::internal::ReadDcpDirectory;
using ckpt::test::ReadAll;
using ckpt::test::TempDir;
using ckpt::test::WriteAll;
namespace fs = std::filesystem;

// The fixture directory, or "" (the test then says so and returns).
std::string Fixtures() {
  const char* d = std::getenv("CKPT_DCP_FIXTURES");
  if (!d || !*d || !std::filesystem::is_directory(d)) {
    WARN("CKPT_DCP_FIXTURES is not set or not a directory ("
         << (d ? d : "unset")
         << "): DCP fixture checks skipped (tests/dcp/make_dcp.py writes "
            "them)");
    return "";
  }
  return d;
}

std::vector<std::vector<std::string>> Lines(const std::string& path) {
  std::ifstream f(path);
  std::vector<std::vector<std::string>> out;
  std::string line;
  while (std::getline(f, line)) {
    std::vector<std::string> cols;
    std::stringstream ss(line);
    std::string c;
    while (std::getline(ss, c, '\t')) cols.push_back(c);
    if (line.ends_with('\t')) cols.push_back("");
    out.push_back(cols);
  }
  return out;
}

std::vector<int64_t> Shape(const std::string& s) {
  std::vector<int64_t> v;
  std::stringstream ss(s);
  std::string c;
  while (std::getline(ss, c, ',')) v.push_back(std::stoll(c));
  return v;
}

// A copy of `src`'s files (flat) in a fresh temp dir.
void CopyDir(const std::string& src, const TempDir& dst) {
  for (const auto& e : fs::directory_iterator(src)) {
    if (e.is_regular_file()) {
      fs::copy_file(e.path(), dst.File(e.path().filename().string()));
    }
  }
}

// Every ref.txt tensor: found by path, its dtype and shape as saved, and
// its chunks' bytes, put together, equal to the reference bytes.
void CheckAgainstReference(const std::string& dir) {
  auto idx = ReadDcpDirectory(dir);
  INFO(dir);
  REQUIRE(idx.ok());
  INFO((idx.ok() ? "" : idx.status().ToString()));
  std::map<std::string, const DcpTensor*> by_path;
  for (const auto& t : idx->tensors) by_path[t.path] = &t;
  for (size_t i = 1; i < idx->tensors.size(); ++i) {
    CHECK(idx->tensors[i - 1].path < idx->tensors[i].path);
  }
  const auto refs = Lines(dir + "/ref.txt");
  REQUIRE(!refs.empty());
  CHECK(refs.size() == idx->tensors.size());
  for (const auto& r : refs) {
    REQUIRE(r.size() == 5);
    INFO("tensor " << r[0]);
    REQUIRE(by_path.count(r[1]));
    const DcpTensor& t = *by_path[r[1]];
    CHECK(t.fqn == r[0]);
    CHECK(std::string(ckpt::DTypeName(t.dtype)) == r[2]);
    CHECK(t.shape == Shape(r[3]));
    const auto ref = ReadAll(dir + "/" + r[4]);
    const uint64_t elem = ckpt::DTypeSize(t.dtype);
    const Box whole{std::vector<int64_t>(t.shape.size(), 0), t.shape};
    REQUIRE(ref.size() == static_cast<size_t>(whole.numel()) * elem);
    std::vector<std::byte> got(ref.size(), std::byte{0xAA});
    for (const auto& c : t.chunks) {
      const auto file = ReadAll(dir + "/" + c.file);
      REQUIRE(c.offset + c.length <= file.size());
      REQUIRE(c.length == static_cast<uint64_t>(c.box.numel()) * elem);
      auto runs = ckpt::CopyRuns(c.box, whole, elem);
      REQUIRE(runs.ok());
      if (!*runs) continue;  // an empty chunk
      ckpt::ForEachRun(**runs, [&](uint64_t s, uint64_t d, uint64_t n) {
        REQUIRE(s + n <= c.length);
        std::memcpy(got.data() + d, file.data() + c.offset + s, n);
      });
    }
    CHECK(got == ref);
  }
}

TEST_CASE("dcp: IsDcpDirectory wants a regular .metadata") {
  TempDir d;
  CHECK_FALSE(IsDcpDirectory(d.path()));
  WriteAll(d.File("target"), {});
  REQUIRE(::symlink("target", d.File(".metadata").c_str()) == 0);
  CHECK_FALSE(IsDcpDirectory(d.path()));
  ::unlink(d.File(".metadata").c_str());
  WriteAll(d.File(".metadata"), {});
  CHECK(IsDcpDirectory(d.path()));
  auto r = ReadDcpDirectory(d.path());
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().file() == d.File(".metadata"));
}

TEST_CASE("dcp: chunks of single-process and multi-rank saves match") {
  const std::string fx = Fixtures();
  if (fx.empty()) return;
  for (const char* name :
       {"single", "ranks2", "ranks4", "single_st", "ranks2_st", "per_item",
        "proto2", "proto5", "enum_by_value"}) {
    SECTION(name) { CheckAgainstReference(fx + "/" + name); }
  }
}

TEST_CASE("dcp: sharding layouts as saved") {
  const std::string fx = Fixtures();
  if (fx.empty()) return;
  for (const auto& [world, name] : std::vector<std::pair<int, std::string>>{
           {2, "ranks2"}, {4, "ranks4"}, {2, "ranks2_st"}}) {
    INFO(name);
    auto idx = ReadDcpDirectory(fx + "/" + name);
    REQUIRE(idx.ok());
    std::map<std::string, const DcpTensor*> by;
    for (const auto& t : idx->tensors) by[t.path] = &t;
    REQUIRE(by.count("rows"));
    CHECK(by["rows"]->chunks.size() == static_cast<size_t>(world));
    for (size_t r = 0; r < by["rows"]->chunks.size(); ++r) {
      const Box& b = by["rows"]->chunks[r].box;
      CHECK(b.sizes == std::vector<int64_t>{8 / world, 6});
    }
    CHECK(by["cols"]->chunks.size() == static_cast<size_t>(world));
    CHECK(by["cols"]->chunks[0].box.sizes[0] == 6);
    // Replicated: saved once, by one rank.
    CHECK(by["repl"]->chunks.size() == 1);
    CHECK(by["nested/plain"]->chunks.size() == 1);
    if (world == 4) {
      CHECK(by["grid"]->chunks.size() == 4);
      // Replicas of a row block: saved once each.
      CHECK(by["hsdp"]->chunks.size() == 2);
    }
    CHECK(idx->files.size() == static_cast<size_t>(world));
    // The one non-tensor value, located as a torch.save'd object.
    REQUIRE(idx->objects.size() == 1);
    CHECK(idx->objects[0].path == "step");
  }
}

TEST_CASE("dcp: non-tensor values are located, not decoded") {
  const std::string fx = Fixtures();
  if (fx.empty()) return;
  for (const char* name : {"single", "single_st"}) {
    INFO(name);
    const std::string dir = fx + "/" + name;
    auto idx = ReadDcpDirectory(dir);
    REQUIRE(idx.ok());
    std::vector<std::string> paths;
    for (const auto& o : idx->objects) {
      paths.push_back(o.path);
      const auto file = ReadAll(dir + "/" + o.file);
      REQUIRE(o.offset + o.length <= file.size());
      REQUIRE(o.length > 4);
      CHECK(std::memcmp(file.data() + o.offset, "PK\x03\x04", 4) == 0);
    }
    CHECK(paths ==
          std::vector<std::string>{"lst/0", "opt/lr", "opt/name", "opt/step"});
    CHECK(idx->files == std::vector<std::string>{"__0_0.distcp"});
    CHECK(idx->version == "1.0.0");
  }
}

TEST_CASE("dcp: items the reader cannot give as raw bytes are refused") {
  const std::string fx = Fixtures();
  if (fx.empty()) return;
  const auto cases = Lines(fx + "/variants/expect.txt");
  REQUIRE(cases.size() >= 12);
  for (const auto& c : cases) {
    REQUIRE(c.size() == 2);
    INFO("variant " << c[0]);
    auto r = ReadDcpDirectory(fx + "/variants/" + c[0]);
    REQUIRE_FALSE(r.ok());
    const std::string msg = r.status().ToString();
    INFO(msg);
    CHECK(msg.find(c[1]) != std::string::npos);
    CHECK(!r.status().file().empty());
  }
  // The base they were made from reads.
  CHECK(ReadDcpDirectory(fx + "/variants/_base").ok());
}

TEST_CASE("dcp: hostile .metadata is refused by naming the global") {
  const std::string fx = Fixtures();
  if (fx.empty()) return;
  const auto cases = Lines(fx + "/hostile/expect.txt");
  REQUIRE(cases.size() >= 6);
  for (const auto& c : cases) {
    INFO("hostile " << c[0]);
    TempDir d;
    fs::copy_file(fx + "/hostile/" + c[0] + ".metadata", d.File(".metadata"));
    auto r = ReadDcpDirectory(d.path());
    REQUIRE_FALSE(r.ok());
    const std::string msg = r.status().ToString();
    INFO(msg);
    CHECK(r.status().code() == ckpt::ErrorCode::kInvalidArgument);
    CHECK(msg.find(c[1]) != std::string::npos);
    CHECK(r.status().file() == d.File(".metadata"));
    CHECK(r.status().offset() >= 0);
  }
}

TEST_CASE("dcp: the .pth importer still refuses DCP's classes") {
  const std::string fx = Fixtures();
  if (fx.empty()) return;
  auto r = ckpt::CheckPth(fx + "/hostile/dcp_class.pth");
  REQUIRE_FALSE(r.ok());
  INFO(r.status().ToString());
  CHECK(r.status().message().find(
            "forbidden global 'torch.distributed.checkpoint.metadata "
            "Metadata': not on the allowlist of torch.save checkpoint "
            "types") != std::string::npos);
}

TEST_CASE("dcp: every truncation of .metadata is refused") {
  const std::string fx = Fixtures();
  if (fx.empty()) return;
  TempDir d;
  CopyDir(fx + "/single", d);
  const auto meta = ReadAll(d.File(".metadata"));
  for (size_t n = 0; n < meta.size(); ++n) {
    WriteAll(d.File(".metadata"), std::span(meta).first(n));
    auto r = ReadDcpDirectory(d.path());
    INFO("truncated to " << n);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().file() == d.File(".metadata"));
  }
}

TEST_CASE("dcp: bit flips in .metadata never read out of bounds") {
  const std::string fx = Fixtures();
  if (fx.empty()) return;
  TempDir d;
  CopyDir(fx + "/ranks2", d);
  REQUIRE(ReadDcpDirectory(d.path()).ok());
  const auto meta = ReadAll(d.File(".metadata"));
  size_t refused = 0;
  for (size_t i = 0; i < meta.size(); ++i) {
    auto m = meta;
    m[i] ^= std::byte{static_cast<unsigned char>(1u << (i % 8))};
    WriteAll(d.File(".metadata"), m);
    auto r = ReadDcpDirectory(d.path());
    if (!r.ok()) {
      ++refused;
      continue;
    }
    // What still reads must locate bytes inside its files.
    for (const auto& t : r->tensors) {
      for (const auto& c : t.chunks) {
        CHECK(c.offset + c.length <= fs::file_size(d.File(c.file)));
      }
    }
  }
  CHECK(refused > meta.size() / 4);
}

TEST_CASE("dcp: a truncated or damaged .distcp names the file and offset") {
  const std::string fx = Fixtures();
  if (fx.empty()) return;
  for (const char* name : {"single", "single_st"}) {
    INFO(name);
    TempDir d;
    CopyDir(fx + "/" + name, d);
    const std::string f = d.File("__0_0.distcp");
    const auto bytes = ReadAll(f);
    WriteAll(f, std::span(bytes).first(bytes.size() / 2));
    auto r = ReadDcpDirectory(d.path());
    REQUIRE_FALSE(r.ok());
    INFO(r.status().ToString());
    CHECK(r.status().file() == f);
    CHECK(r.status().offset() >= 0);
    CHECK(r.status().message().find("fqn '") != std::string::npos);
    // Flips through the items' zip headers and pickles, or the safetensors
    // header: an error or a location inside the file, never a crash.
    size_t refused = 0;
    for (size_t i = 0; i < bytes.size(); i += 3) {
      auto m = bytes;
      m[i] ^= std::byte{0x10};
      WriteAll(f, m);
      auto q = ReadDcpDirectory(d.path());
      if (!q.ok()) {
        ++refused;
        CHECK(q.status().file().find(d.path()) == 0);
        continue;
      }
      for (const auto& t : q->tensors) {
        for (const auto& c : t.chunks) CHECK(c.offset + c.length <= m.size());
      }
    }
    CHECK(refused > 0);
  }
}

}  // namespace
