// ckpt-bench: one executable, a subcommand per question (like db_bench).
//   synth OUT.ckpt --tensors N --total-mb M [--dtype D] [--seed S] [--no-sync]
//   cpu FILE [--repeat R] [--json OUT] [--tmpdir DIR]
// Timings are best of R runs with a warm page cache (the file is read once
// before timing). bench/run_cpu.py runs the peers beside it.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "synth.h"

namespace {

using Clock = std::chrono::steady_clock;

int Usage(const std::string& problem = "") {
  if (!problem.empty())
    std::fprintf(stderr, "ckpt-bench: %s\n\n", problem.c_str());
  std::fprintf(
      stderr,
      "usage: ckpt-bench synth OUT.ckpt --tensors N --total-mb M "
      "[--dtype D] [--seed S] [--no-sync]\n"
      "       ckpt-bench cpu FILE [--repeat R] [--json OUT] [--tmpdir DIR]\n"
      "       ckpt-bench gpu FILE [--repeat R] [--json OUT] [--device "
      "cuda:N]\n");
  return 2;
}

// A whole decimal number in [lo, hi], or nullopt.
std::optional<int64_t> ParseCount(const char* v, int64_t lo, int64_t hi) {
  if (!v || !*v) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  long long n = std::strtoll(v, &end, 10);
  if (errno != 0 || *end != '\0' || n < lo || n > hi) return std::nullopt;
  return n;
}

int Die(const ckpt::Status& s) {
  std::fprintf(stderr, "ckpt-bench: %s\n", s.ToString().c_str());
  return 1;
}

volatile uint64_t g_sink;

// Reads every byte (as 64-bit words) so a mapping is really faulted in.
void Touch(std::span<const std::byte> b) {
  uint64_t acc = 0;
  size_t words = b.size() / 8;
  const auto* p = reinterpret_cast<const uint64_t*>(b.data());
  for (size_t i = 0; i < words; ++i) acc += p[i];
  for (size_t i = words * 8; i < b.size(); ++i)
    acc += static_cast<uint64_t>(b[i]);
  g_sink = g_sink + acc;
}

double Best(int repeat, const std::function<void()>& fn) {
  double best = 1e30;
  for (int i = 0; i < repeat; ++i) {
    auto t0 = Clock::now();
    fn();
    best = std::min(best,
                    std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

struct Row {
  std::string name;
  double seconds;
  uint64_t bytes;
};

int Synth(int argc, char** argv) {
  if (argc < 1) return Usage("synth needs OUT.ckpt");
  std::string out = argv[0];
  ckpt::bench::SynthOptions o;
  o.tensors = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
    if (a == "--tensors") {
      auto n = ParseCount(v, 4, 10'000'000);
      if (!n)
        return Usage(
            "--tensors takes a whole number from 4 (a model needs embed, norm, "
            "head and RNG state)");
      o.tensors = static_cast<int>(*n);
    } else if (a == "--total-mb") {
      char* end = nullptr;
      double mb = v ? std::strtod(v, &end) : 0;
      if (!v || *end != '\0' || !(mb > 0) || mb > 1e9) {
        return Usage("--total-mb takes a positive size in MiB");
      }
      o.total_bytes = static_cast<uint64_t>(mb * 1048576.0);
    } else if (a == "--dtype") {
      auto d = v ? ckpt::DTypeFromName(v) : std::nullopt;
      if (!d)
        return Usage("--dtype takes a dtype name (float32, bfloat16, ...)");
      o.dtype = *d;
    } else if (a == "--seed") {
      auto n = ParseCount(v, 0, INT64_MAX);
      if (!n) return Usage("--seed takes a whole number");
      o.seed = static_cast<uint64_t>(*n);
    } else if (a == "--no-sync") {
      o.sync = false;
      continue;
    } else {
      return Usage("unknown option '" + a + "'");
    }
    ++i;
  }
  if (o.tensors == 0) return Usage("synth needs --tensors N");
  if (o.total_bytes == 0) return Usage("synth needs --total-mb M");
  ckpt::Status s = ckpt::bench::WriteSynthetic(out, o);
  if (!s.ok()) return Die(s);
  return 0;
}

struct CpuArgs {
  std::string file;
  int repeat = 5;
  std::string json, tmpdir = "/tmp";
};

// What the measurements need to know about the file, read once up front.
struct FileFacts {
  uint64_t file_size = 0;
  uint64_t tensor_bytes = 0;
  std::string big;       // the largest tensor's path
  int64_t big_rows = 1;  // its dim 0
};

ckpt::Result<FileFacts> Probe(const std::string& file) {
  CKPT_ASSIGN_OR_RETURN(ckpt::Checkpoint probe, ckpt::Checkpoint::Open(file));
  FileFacts f;
  f.file_size = probe.file_size();
  size_t largest = 0;
  for (size_t i = 0; i < probe.num_tensors(); ++i) {
    auto info = *probe.TensorInfoAt(i);
    f.tensor_bytes += info.nbytes();
    if (info.nbytes() > probe.TensorInfoAt(largest)->nbytes()) largest = i;
  }
  f.big = probe.TensorInfoAt(largest)->path;
  const std::vector<int64_t> shape = probe.TensorInfoAt(largest)->shape;
  f.big_rows = shape.empty() ? 1 : shape[0];
  return f;
}

// The baselines: read() into one reused buffer, and into one allocation
// of the whole file. The first read warms the page cache.
void MeasureRaw(const CpuArgs& a, const FileFacts& f, std::vector<Row>& rows) {
  std::vector<std::byte> buf(16 << 20);
  auto raw_read = [&] {
    int fd = ::open(a.file.c_str(), O_RDONLY);
    while (::read(fd, buf.data(), buf.size()) > 0) Touch({buf.data(), 64});
    ::close(fd);
  };
  raw_read();  // warm the page cache
  rows.push_back({"raw_read", Best(a.repeat, raw_read), f.file_size});
  rows.push_back({"raw_read_alloc",
                  Best(a.repeat,
                       [&] {
                         std::vector<std::byte> all(f.file_size);
                         int fd = ::open(a.file.c_str(), O_RDONLY);
                         uint64_t done = 0;
                         ssize_t n;
                         while ((n = ::read(fd, all.data() + done,
                                            f.file_size - done)) > 0)
                           done += static_cast<uint64_t>(n);
                         ::close(fd);
                         Touch({all.data(), 64});
                       }),
                  f.file_size});
}

// Open alone, then open and reach the largest tensor: all of it, its first
// bytes (time to first tensor: a view, not a copy), and 16 rows of it.
void MeasureOpen(const CpuArgs& a, const FileFacts& f, std::vector<Row>& rows) {
  const std::string& file = a.file;
  rows.push_back({"open",
                  Best(a.repeat * 4,
                       [&] {
                         auto ck = ckpt::Checkpoint::Open(file);
                         if (!ck.ok()) std::abort();
                       }),
                  0});
  uint64_t big_bytes = 0;
  rows.push_back({"open_one_tensor",
                  Best(a.repeat,
                       [&] {
                         auto ck = ckpt::Checkpoint::Open(file);
                         auto t = ck->Tensor(f.big);
                         big_bytes = t->data().size();
                         Touch(t->data());
                       }),
                  0});
  rows.back().bytes = big_bytes;
  rows.push_back({"open_one_tensor_view",
                  Best(a.repeat * 4,
                       [&] {
                         auto ck = ckpt::Checkpoint::Open(file);
                         auto t = ck->Tensor(f.big);
                         Touch(t->data().first(64));
                       }),
                  0});
  uint64_t slice_bytes = 0;
  rows.push_back({"open_row_slice",
                  Best(a.repeat,
                       [&] {
                         auto ck = ckpt::Checkpoint::Open(file);
                         int64_t r0 = f.big_rows / 2,
                                 r1 = std::min(f.big_rows, r0 + 16);
                         auto t = ck->TensorRows(f.big, r0, r1);
                         slice_bytes = t->data().size();
                         Touch(t->data());
                       }),
                  0});
  rows.back().bytes = slice_bytes;
}

// Every tensor's bytes reached: mapped with MAP_POPULATE, after Prefetch,
// faulted in by two threads, and copied by the pread backend.
void MeasureLoad(const CpuArgs& a, const FileFacts& f, std::vector<Row>& rows) {
  const std::string& file = a.file;
  rows.push_back({"load_view",
                  Best(a.repeat,
                       [&] {
                         ckpt::ReadOptions ro;
                         ro.populate = true;
                         auto ck = ckpt::Checkpoint::Open(file, ro);
                         for (size_t i = 0; i < ck->num_tensors(); ++i)
                           Touch(ck->TensorAt(i)->data());
                       }),
                  f.tensor_bytes});
  rows.push_back({"load_prefetch",
                  Best(a.repeat,
                       [&] {
                         // Checkpoint::Prefetch (parallel MADV_POPULATE_READ),
                         // then touch all.
                         auto ck = ckpt::Checkpoint::Open(file);
                         if (!ck->Prefetch().ok()) std::abort();
                         for (size_t i = 0; i < ck->num_tensors(); ++i)
                           Touch(ck->TensorAt(i)->data());
                       }),
                  f.tensor_bytes});
  rows.push_back({"load_view_2threads",
                  Best(a.repeat,
                       [&] {
                         // No MAP_POPULATE: two threads fault their halves of
                         // the tensors in.
                         auto ck = ckpt::Checkpoint::Open(file);
                         std::vector<ckpt::TensorRef> refs;
                         for (size_t i = 0; i < ck->num_tensors(); ++i)
                           refs.push_back(*ck->TensorAt(i));
                         auto half = [&](size_t part) {
                           for (size_t i = part; i < refs.size(); i += 2)
                             Touch(refs[i].data());
                         };
                         std::thread other(half, 1);
                         half(0);
                         other.join();
                       }),
                  f.tensor_bytes});
  rows.push_back({"load_copy",
                  Best(a.repeat,
                       [&] {
                         ckpt::ReadOptions ro;
                         ro.backend = ckpt::Backend::kPread;
                         auto ck = ckpt::Checkpoint::Open(file, ro);
                         std::vector<ckpt::TensorRef> keep;
                         for (size_t i = 0; i < ck->num_tensors(); ++i)
                           keep.push_back(*ck->TensorAt(i));
                       }),
                  f.tensor_bytes});
}

// Hashing: XXH3 over every tensor on one thread, Verify on one and on all.
void MeasureVerify(const CpuArgs& a, const FileFacts& f,
                   const ckpt::Checkpoint& ck, std::vector<Row>& rows) {
  rows.push_back({"xxh3_1thread",
                  Best(a.repeat,
                       [&] {
                         for (size_t i = 0; i < ck.num_tensors(); ++i) {
                           auto d = ck.TensorAt(i)->data();
                           g_sink = g_sink + XXH3_64bits(d.data(), d.size());
                         }
                       }),
                  f.tensor_bytes});
  rows.push_back({"verify_1thread",
                  Best(a.repeat,
                       [&] {
                         if (!ck.Verify({1}).ok()) std::abort();
                       }),
                  f.file_size});
  rows.push_back({"verify",
                  Best(a.repeat,
                       [&] {
                         if (!ck.Verify().ok()) std::abort();
                       }),
                  f.file_size});
}

// Saving every tensor with the Writer (fsync'd, atomic), against write()
// of the same bytes and one fsync.
void MeasureSave(const CpuArgs& a, const FileFacts& f,
                 const ckpt::Checkpoint& ck, std::vector<Row>& rows) {
  // Finish any writeback first, so it does not slow the timed saves.
  ::sync();
  std::string out = a.tmpdir + "/ckpt-bench-save.ckpt";
  rows.push_back({"save_fsync",
                  Best(a.repeat,
                       [&] {
                         auto w = ckpt::Writer::Create(out);
                         if (!w.ok()) std::abort();
                         for (size_t i = 0; i < ck.num_tensors(); ++i) {
                           auto t = ck.TensorAt(i);
                           if (!w->PutTensor(t->info().path, t->dtype(),
                                             t->shape(), t->data())
                                    .ok())
                             std::abort();
                         }
                         if (!w->Commit().ok()) std::abort();
                       }),
                  f.tensor_bytes});
  ::unlink(out.c_str());
  std::string raw = a.tmpdir + "/ckpt-bench-raw.bin";
  rows.push_back(
      {"raw_write_fsync",
       Best(a.repeat,
            [&] {
              int fd = ::open(raw.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
              for (size_t i = 0; i < ck.num_tensors(); ++i) {
                auto d = ck.TensorAt(i)->data();
                size_t done = 0;
                while (done < d.size()) {
                  ssize_t n = ::write(fd, d.data() + done, d.size() - done);
                  if (n <= 0) std::abort();
                  done += static_cast<size_t>(n);
                }
              }
              ::fsync(fd);
              ::close(fd);
            }),
       f.tensor_bytes});
  ::unlink(raw.c_str());
}

void PrintRows(const std::vector<Row>& rows) {
  std::printf("%-18s %12s %14s %10s\n", "measure", "seconds", "bytes", "GB/s");
  for (const auto& r : rows) {
    double gbps = r.bytes && r.seconds > 0
                      ? static_cast<double>(r.bytes) / r.seconds / 1e9
                      : 0;
    std::printf("%-18s %12.6f %14llu %10.2f\n", r.name.c_str(), r.seconds,
                static_cast<unsigned long long>(r.bytes), gbps);
  }
}

ckpt::Status WriteJson(const std::string& json, const std::string& file,
                       const FileFacts& f, const std::vector<Row>& rows) {
  FILE* out = std::fopen(json.c_str(), "w");
  if (!out) return ckpt::IoError("cannot write " + json);
  std::fprintf(out,
               "{\"file\": \"%s\", \"file_size\": %llu, \"tensors_bytes\": "
               "%llu, \"results\": [",
               file.c_str(), static_cast<unsigned long long>(f.file_size),
               static_cast<unsigned long long>(f.tensor_bytes));
  for (size_t i = 0; i < rows.size(); ++i) {
    std::fprintf(out,
                 "%s{\"name\": \"%s\", \"seconds\": %.9f, \"bytes\": %llu}",
                 i ? ", " : "", rows[i].name.c_str(), rows[i].seconds,
                 static_cast<unsigned long long>(rows[i].bytes));
  }
  std::fprintf(out, "]}\n");
  std::fclose(out);
  return ckpt::Status::OK();
}

int Cpu(int argc, char** argv) {
  if (argc < 1) return Usage();
  CpuArgs a;
  a.file = argv[0];
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--repeat" && i + 1 < argc) {
      a.repeat = std::max(1, std::atoi(argv[++i]));
    } else if (arg == "--json" && i + 1 < argc) {
      a.json = argv[++i];
    } else if (arg == "--tmpdir" && i + 1 < argc) {
      a.tmpdir = argv[++i];
    } else {
      return Usage();
    }
  }
  auto facts = Probe(a.file);
  if (!facts.ok()) return Die(facts.status());
  std::vector<Row> rows;
  MeasureRaw(a, *facts, rows);
  MeasureOpen(a, *facts, rows);
  MeasureLoad(a, *facts, rows);
  {
    auto ck = ckpt::Checkpoint::Open(a.file);
    if (!ck.ok()) return Die(ck.status());
    MeasureVerify(a, *facts, *ck, rows);
    MeasureSave(a, *facts, *ck, rows);
  }
  PrintRows(rows);
  if (!a.json.empty()) {
    ckpt::Status s = WriteJson(a.json, a.file, *facts, rows);
    if (!s.ok()) return Die(s);
  }
  return 0;
}

}  // namespace

#ifdef CKPT_WITH_CUDA
int GpuBench(int argc, char** argv);  // bench/gpu_bench.cc
#endif

int main(int argc, char** argv) {
  if (argc < 2) return Usage();
  std::string cmd = argv[1];
  if (cmd == "--help" || cmd == "-h") {
    Usage();
    return 0;
  }
  if (cmd == "synth") return Synth(argc - 2, argv + 2);
  if (cmd == "cpu") return Cpu(argc - 2, argv + 2);
  if (cmd == "gpu") {
#ifdef CKPT_WITH_CUDA
    return GpuBench(argc - 2, argv + 2);
#else
    std::fprintf(stderr, "ckpt-bench: built without the CUDA toolkit\n");
    return 77;
#endif
  }
  return Usage("unknown command '" + cmd + "'");
}
