// Sharded checkpoints under mpirun, against the limits measured in the same
// run: every rank's write()+fsync of the same bytes (the disk's parallel
// bandwidth), a single-file ckpt load of the same bytes, and the bytes a
// reshard needs. Ratios are what to compare (bench/RESULTS.md).
//
//   mpirun -np 2 dist-bench DIR [--mib-per-rank 256] [--tensors 64] [--reps 5]
//
// Each rank holds rows of `tensors` float32 tensors (FSDP on dim 0). Per
// round (best of --reps after one untimed round, page cache warm):
//   raw       each rank write()s its bytes to a file of its own and fsyncs
//   save      ckpt::dist::Save of the same bytes, fsync on, commit included
//   commit    from the last rank's shard on disk to the step visible
//   load      each rank loads its own rows (same N), verify off / on
//   single    each rank loads the same bytes from one ordinary ckpt file
//   reshard   N -> N-1 on dim 0 and dim 0 -> dim 1: bytes read / needed,
//             from LoadStats and from /proc/self/io rchar
#include <fcntl.h>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "ckpt/dist.h"
#include "ckpt/mpi.h"
#include "ckpt/reader.h"
#include "ckpt/writer.h"

using namespace ckpt;
using namespace ckpt::dist;
namespace fs = std::filesystem;

namespace {

int g_rank = 0, g_world = 1;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "rank %d: %s\n", g_rank, what.c_str());
  MPI_Abort(MPI_COMM_WORLD, 1);
  std::abort();
}

template <class T>
T Take(Result<T> r, const char* what) {
  if (!r.ok()) Die(std::string(what) + ": " + r.status().ToString());
  return std::move(*r);
}
void Check(const Status& s, const char* what) {
  if (!s.ok()) Die(std::string(what) + ": " + s.ToString());
}

double Now() {
  return std::chrono::duration<double>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Wall time of `fn` across all ranks: from a barrier to the last rank done.
template <class F>
double Timed(F fn) {
  MPI_Barrier(MPI_COMM_WORLD);
  const double t0 = Now();
  fn();
  double local = Now() - t0, worst = 0;
  MPI_Allreduce(&local, &worst, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return worst;
}

uint64_t Rchar() {
  std::ifstream f("/proc/self/io");
  std::string key;
  uint64_t v = 0;
  while (f >> key >> v) {
    if (key == "rchar:") return v;
  }
  return 0;
}

struct Args {
  std::string dir;
  uint64_t mib = 256;
  int tensors = 64;
  int reps = 5;
};

std::pair<int64_t, int64_t> Block(int64_t n, int r, int parts) {
  const int64_t base = n / parts, extra = n % parts;
  const int64_t begin = r * base + std::min<int64_t>(r, extra);
  return {begin, base + (r < extra ? 1 : 0)};
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_world);
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) Die("missing value after " + s);
      return argv[++i];
    };
    if (s == "--mib-per-rank") {
      a.mib = std::stoull(next());
    } else if (s == "--tensors") {
      a.tensors = std::stoi(next());
    } else if (s == "--reps") {
      a.reps = std::stoi(next());
    } else if (a.dir.empty()) {
      a.dir = s;
    } else {
      Die("usage: dist-bench DIR [--mib-per-rank N] [--tensors N] [--reps N]");
    }
  }
  if (a.dir.empty()) Die("usage: dist-bench DIR [--mib-per-rank N] ...");
  auto comm = Take(MpiComm::Create(MPI_COMM_WORLD), "MpiComm");

  // Global tensors [rows, cols] f32; this rank holds a block of rows.
  const int64_t cols = 1024;
  const uint64_t per_tensor = (a.mib << 20) / static_cast<uint64_t>(a.tensors);
  const int64_t local_rows =
      std::max<int64_t>(1, static_cast<int64_t>(per_tensor / (cols * 4)));
  const int64_t rows = local_rows * g_world;
  std::vector<std::string> names;
  for (int t = 0; t < a.tensors; ++t)
    names.push_back("model/layer" + std::to_string(t) + ".weight");
  std::vector<std::vector<std::byte>> data(names.size());
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < names.size(); ++t) {
    data[t].resize(static_cast<size_t>(local_rows * cols * 4));
    for (size_t i = 0; i < data[t].size(); ++i) {
      data[t][i] = static_cast<std::byte>(
          (i * 131 + t * 7 + static_cast<size_t>(g_rank)) & 0xff);
    }
    chunks.push_back({names[t],
                      DType::kFloat32,
                      {rows, cols},
                      Box{{local_rows * g_rank, 0}, {local_rows, cols}},
                      data[t]});
  }
  uint64_t bytes = 0;
  for (const auto& d : data) bytes += d.size();
  if (g_rank == 0) fs::create_directories(a.dir);
  MPI_Barrier(MPI_COMM_WORLD);

  double best_raw = 1e30, best_save = 1e30, best_load = 1e30,
         best_load_v = 1e30, best_single = 1e30;
  std::vector<double> commits;
  const std::string single =
      a.dir + "/single-" + std::to_string(g_rank) + ".ckpt";
  {
    auto w = Take(Writer::Create(single), "single");
    for (size_t t = 0; t < names.size(); ++t) {
      Check(w.PutTensor(names[t], DType::kFloat32, {local_rows, cols}, data[t]),
            "put");
    }
    Check(w.Commit(), "single commit");
  }
  for (int rep = 0; rep <= a.reps; ++rep) {
    // raw: write() + fsync of the same bytes, a file per rank.
    const std::string raw = a.dir + "/raw-" + std::to_string(g_rank);
    double t_raw = Timed([&] {
      int fd =
          ::open(raw.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd < 0) Die("open raw");
      for (const auto& d : data) {
        for (size_t done = 0; done < d.size();) {
          ssize_t n = ::write(fd, d.data() + done, d.size() - done);
          if (n <= 0) Die("write raw");
          done += static_cast<size_t>(n);
        }
      }
      if (::fsync(fd) != 0) Die("fsync raw");
      ::close(fd);
    });
    ::unlink(raw.c_str());
    // save, and the commit alone.
    const std::string step = a.dir + "/step-" + std::to_string(rep);
    double t_commit = 0;
    double t_save = Timed([&] {
      const std::string shard =
          Take(ShardPath(step, g_rank, g_world), "ShardPath");
      ShardRecord record;  // what the commit takes instead of a read-back
      Status local = [&]() -> Status {
        CKPT_ASSIGN_OR_RETURN(Writer w, Writer::Create(shard));
        std::vector<NodeId> nodes;
        for (const auto& c : chunks) {
          CKPT_ASSIGN_OR_RETURN(auto n, AddChunk(w, c, &record));
          nodes.push_back(*n);
        }
        CKPT_RETURN_IF_ERROR(SetShardRoot(w, nodes, std::nullopt, std::nullopt,
                                          g_rank, g_world, &record));
        CKPT_RETURN_IF_ERROR(w.Commit());
        return record.Seal(w);
      }();
      MPI_Barrier(MPI_COMM_WORLD);  // every shard is on disk
      const double t1 = Now();
      Take(CommitSave(*comm, step, local, {}, &record), "CommitSave");
      t_commit = Now() - t1;
    });
    // same-N load into fresh buffers, verify off and on.
    auto ck = Take(ShardedCheckpoint::Open(*comm, step), "Open");
    auto load = [&](bool verify) {
      std::vector<std::vector<std::byte>> out(names.size());
      std::vector<Want> wants;
      for (size_t t = 0; t < names.size(); ++t) {
        out[t].resize(data[t].size());
        wants.push_back({names[t],
                         Box{{local_rows * g_rank, 0}, {local_rows, cols}},
                         out[t]});
      }
      auto plan = Take(ck.Plan(wants), "Plan");
      LoadOptions lo;
      lo.verify = verify;
      Take(ck.Execute(plan, lo), "Execute");
    };
    double t_load = Timed([&] { load(false); });
    double t_load_v = Timed([&] { load(true); });
    double t_single = Timed([&] {
      auto c1 = Take(Checkpoint::Open(single), "open single");
      std::vector<std::vector<std::byte>> out(c1.num_storages());
      std::vector<Checkpoint::StorageRead> reads;
      for (size_t s = 0; s < c1.num_storages(); ++s) {
        out[s].resize(Take(c1.StorageInfoAt(s), "info").nbytes);
        reads.push_back({s, 0, out[s]});
      }
      Check(c1.ReadStorages(reads), "read single");
    });
    if (rep > 0) {  // round 0 warms up
      best_raw = std::min(best_raw, t_raw);
      best_save = std::min(best_save, t_save);
      best_load = std::min(best_load, t_load);
      best_load_v = std::min(best_load_v, t_load_v);
      best_single = std::min(best_single, t_single);
      commits.push_back(t_commit);
    }
    if (rep + 1 <= a.reps && g_rank == 0) fs::remove_all(step);
  }
  // Reshards of the last step: N -> N-1 ranks on dim 0 (rank N-1 idle), and
  // rows saved -> columns loaded on N ranks. Read ratios, verify off.
  const std::string last = a.dir + "/step-" + std::to_string(a.reps);
  auto ck = Take(ShardedCheckpoint::Open(*comm, last), "Open");
  auto ratio = [&](auto box_of) {
    std::vector<std::vector<std::byte>> out(names.size());
    std::vector<Want> wants;
    for (size_t t = 0; t < names.size(); ++t) {
      Box b = box_of();
      out[t].resize(static_cast<size_t>(b.numel()) * 4);
      wants.push_back({names[t], b, out[t]});
    }
    auto plan = Take(ck.Plan(wants), "Plan");
    LoadOptions lo;
    lo.verify = false;
    const uint64_t r0 = Rchar();
    auto st = Take(ck.Execute(plan, lo), "Execute");
    uint64_t sums[3] = {st.bytes_needed, st.bytes_read, Rchar() - r0}, tot[3];
    MPI_Allreduce(sums, tot, 3, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    return std::array<double, 2>{
        double(tot[1]) / double(std::max<uint64_t>(1, tot[0])),
        double(tot[2]) / double(std::max<uint64_t>(1, tot[0]))};
  };
  const int m = std::max(1, g_world - 1);
  auto dim0 = ratio([&] {
    if (g_rank >= m) return Box{{0, 0}, {0, cols}};
    auto [b, n] = Block(rows, g_rank, m);
    return Box{{b, 0}, {n, cols}};
  });
  auto dim1 = ratio([&] {
    auto [b, n] = Block(cols, g_rank, g_world);
    return Box{{0, b}, {rows, n}};
  });
  if (g_rank == 0) {
    std::sort(commits.begin(), commits.end());
    const double total = double(bytes) * g_world;
    auto gbs = [&](double t) { return total / t / 1e9; };
    std::printf(
        "dist-bench: np %d, %d tensors, %.0f MiB per rank (%.0f MiB total), "
        "best of %d, page cache warm\n",
        g_world, a.tensors, double(bytes) / (1 << 20), total / (1 << 20),
        a.reps);
    std::printf("  raw write()+fsync, a file per rank   %8.3f s  %6.2f GB/s\n",
                best_raw, gbs(best_raw));
    std::printf(
        "  ckpt Save (fsync, commit)            %8.3f s  %6.2f GB/s   %.2f of "
        "raw\n",
        best_save, gbs(best_save), best_raw / best_save);
    std::printf(
        "  commit (last shard on disk -> visible) p50 %.1f ms  max %.1f ms\n",
        commits[commits.size() / 2] * 1e3, commits.back() * 1e3);
    std::printf(
        "  same-N load, verify off              %8.3f s  %6.2f GB/s   %.2f of "
        "single-file\n",
        best_load, gbs(best_load), best_single / best_load);
    std::printf(
        "  same-N load, verify on               %8.3f s  %6.2f GB/s   %.2f of "
        "single-file\n",
        best_load_v, gbs(best_load_v), best_single / best_load_v);
    std::printf("  single-file ckpt load (ReadStorages)  %8.3f s  %6.2f GB/s\n",
                best_single, gbs(best_single));
    std::printf(
        "  reshard %d -> %d on dim 0: read/needed %.4f (LoadStats), %.4f "
        "(rchar)\n",
        g_world, m, dim0[0], dim0[1]);
    std::printf(
        "  dim 0 saved -> dim 1 loaded on %d:     read/needed %.4f "
        "(LoadStats), %.4f (rchar)\n",
        g_world, dim1[0], dim1[1]);
    std::printf(
        "  (rchar counts pread only: runs under 64 KiB, such as a column "
        "slice's rows, are copied from the mapping)\n");
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (g_rank == 0) fs::remove_all(a.dir);
  comm.reset();
  MPI_Finalize();
  return 0;
}
