// Sharded checkpoints across real MPI ranks (run by tests/mpi/run.sh under
// mpirun): every rank saves its boxes of a set of global tensors laid out
// as training jobs lay them out, then any number of ranks loads them back
// in its own layout and compares bit for bit with the reference contents
// (tests/dist_reference.h). Faults: a rank killed mid-write, a rank whose
// writes fail (EFBIG from RLIMIT_FSIZE: a real kernel error), the
// coordinator killed before or after the rename.
//
//   dist_mpi_test save DIR            every rank: Save; exit 0 when all agree
//   dist_mpi_test load DIR SAVED_N    every rank: load its boxes, compare
//   dist_mpi_test fault DIR MODE      MODE: kill_mid_write | efbig |
//                                     kill_before_rename | kill_after_rename
#include <mpi.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "ckpt/dist.h"
#include "ckpt/mpi.h"
#include "dist/manifest_internal.h"
#include "dist_reference.h"

using namespace ckpt;
using namespace ckpt::dist;
using ckpt::test::ChunkBlock;
using ckpt::test::ReferenceBox;

namespace {

int g_rank = 0;

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "rank %d: FAILED: %s\n", g_rank, what.c_str());
  MPI_Abort(MPI_COMM_WORLD, 3);
  std::abort();
}

struct Layout {
  std::string path;
  DType dtype;
  std::vector<int64_t> shape;
  // This rank's box and replica numbers in a group of `world`.
  Box box;
  uint32_t replica_index = 0, replica_count = 1;
};

Box Whole(const std::vector<int64_t>& shape) {
  return Box{std::vector<int64_t>(shape.size(), 0), shape};
}

Box Split(const std::vector<int64_t>& shape, size_t dim, int part, int parts) {
  Box b = Whole(shape);
  auto [begin, len] = ChunkBlock(shape[dim], part, parts);
  b.offsets[dim] = begin;
  b.sizes[dim] = len;
  return b;
}

// The layouts of one job of `world` ranks, as rank `r` holds them.
std::vector<Layout> Layouts(int r, int world) {
  std::vector<Layout> out;
  auto add = [&](std::string p, DType dt, std::vector<int64_t> shape, Box box,
                 uint32_t ri = 0, uint32_t rc = 1) {
    out.push_back({std::move(p), dt, std::move(shape), std::move(box), ri, rc});
  };
  const auto u = static_cast<uint32_t>(r), w = static_cast<uint32_t>(world);
  // dim 0, uneven (6 rows on 4 ranks: 2, 2, 2, 0)
  add("model/row", DType::kFloat32, {6, 5}, Split({6, 5}, 0, r, world));
  // dim 1
  add("model/col", DType::kInt64, {4, 6}, Split({4, 6}, 1, r, world));
  // 2x2 grid on 4 ranks, rows on others
  {
    const int a = world == 4 ? 2 : world, b = world == 4 ? 2 : 1;
    Box g = Split({6, 6}, 0, r / b, a);
    auto [c0, cn] = ChunkBlock(6, r % b, b);
    g.offsets[1] = c0;
    g.sizes[1] = cn;
    add("model/grid", DType::kBFloat16, {6, 6}, g);
  }
  // data parallel: every rank holds it whole
  add("model/ddp", DType::kFloat32, {5, 3}, Whole({5, 3}), u, w);
  // FSDP x replicas: 2 shards x 2 replicas on 4 ranks
  {
    const int shards = world == 4 ? 2 : world;
    const int shard = r % shards, replica = r / shards;
    add("opt/fsdp", DType::kFloat32, {8, 2}, Split({8, 2}, 0, shard, shards),
        static_cast<uint32_t>(replica), static_cast<uint32_t>(world / shards));
  }
  add("mask", DType::kBool, {7}, Split({7}, 0, r, world));
  add("scalar", DType::kFloat32, {}, Box{}, u, w);
  add("empty", DType::kFloat32, {0, 3}, Split({0, 3}, 0, r, world));
  // Rows of 4 KiB: runs long enough for the pread path.
  add("big", DType::kFloat32, {257, 1031}, Split({257, 1031}, 0, r, world));
  return out;
}

std::unique_ptr<MpiComm> MakeComm() {
  auto c = MpiComm::Create(MPI_COMM_WORLD);
  if (!c.ok()) Fail(c.status().ToString());
  return std::move(*c);
}

struct SaveSetup {
  std::vector<Layout> layouts;
  std::vector<std::vector<std::byte>> data;
  std::vector<Chunk> chunks;
};

SaveSetup MakeChunks(int rank, int world) {
  SaveSetup s;
  s.layouts = Layouts(rank, world);
  s.data.reserve(s.layouts.size());
  for (const auto& l : s.layouts) {
    s.data.push_back(ReferenceBox(l.path, l.dtype, l.shape, l.box));
    s.chunks.push_back({l.path, l.dtype, l.shape, l.box, s.data.back(),
                        l.replica_index, l.replica_count});
  }
  return s;
}

Result<CommitInfo> DoSave(Comm& comm, const std::string& dir,
                          const SaveSetup& s, bool overwrite = false) {
  SaveOptions o;
  o.overwrite = overwrite;
  o.metadata = {{"step", "200"}};
  // The globals tree: nested dicts with placeholders, and a step.
  auto globals = [&](Writer& w) -> Result<NodeId> {
    std::vector<NodeId> mk, mv, ok, ov, keys, values;
    for (const auto& l : s.layouts) {
      CKPT_ASSIGN_OR_RETURN(NodeId p, AddGlobalTensor(w));
      if (l.path.rfind("model/", 0) == 0) {
        mk.push_back(w.AddString(l.path.substr(6)));
        mv.push_back(p);
      } else if (l.path.rfind("opt/", 0) == 0) {
        ok.push_back(w.AddString(l.path.substr(4)));
        ov.push_back(p);
      } else {
        keys.push_back(w.AddString(l.path));
        values.push_back(p);
      }
    }
    CKPT_ASSIGN_OR_RETURN(NodeId model, w.AddDict(mk, mv));
    CKPT_ASSIGN_OR_RETURN(NodeId opt, w.AddDict(ok, ov));
    keys.push_back(w.AddString("model"));
    values.push_back(model);
    keys.push_back(w.AddString("opt"));
    values.push_back(opt);
    keys.push_back(w.AddString("step"));
    values.push_back(w.AddInt(200));
    return w.AddDict(keys, values);
  };
  auto rank_local = [&](Writer& w) -> Result<NodeId> {
    const NodeId k = w.AddString("rank");
    const NodeId v = w.AddInt(comm.rank());
    return w.AddDict(std::span(&k, 1), std::span(&v, 1));
  };
  return Save(comm, dir, s.chunks, o, globals, rank_local);
}

// Loads `box` of a tensor and compares it with the reference.
void Expect(const ShardedCheckpoint& ck, const std::string& path, DType dtype,
            const std::vector<int64_t>& shape, const Box& box, bool verify) {
  std::vector<std::byte> out(static_cast<size_t>(box.numel()) *
                             DTypeSize(dtype));
  Want w{path, box, out};
  auto plan = ck.Plan(std::span(&w, 1));
  if (!plan.ok()) Fail(plan.status().ToString());
  LoadOptions lo;
  lo.verify = verify;
  auto st = ck.Execute(*plan, lo);
  const std::string where = path + " " + dist::internal::BoxString(box);
  if (!st.ok()) Fail(where + ": " + st.status().ToString());
  if (st->bytes_needed != out.size()) Fail(where + ": bytes_needed");
  if (!verify && st->bytes_read != st->bytes_needed) {
    Fail(where + ": read " + std::to_string(st->bytes_read) + " of " +
         std::to_string(st->bytes_needed) + " needed");
  }
  if (out != ReferenceBox(path, dtype, shape, box))
    Fail(where + ": bytes differ");
}

int Load(const std::string& dir, int saved_world) {
  auto comm = MakeComm();
  const int r = comm->rank(), world = comm->size();
  auto ck = ShardedCheckpoint::Open(*comm, dir);
  if (!ck.ok()) Fail(ck.status().ToString());
  if (ck->manifest().world_size != static_cast<uint32_t>(saved_world)) {
    Fail("manifest says world " + std::to_string(ck->manifest().world_size));
  }
  // Each rank's own layout at this world size, verify off and on.
  for (const auto& l : Layouts(r, world)) {
    Expect(*ck, l.path, l.dtype, l.shape, l.box, false);
    Expect(*ck, l.path, l.dtype, l.shape, l.box, true);
  }
  // Saved on dim 0, loaded on dim 1.
  Expect(*ck, "model/row", DType::kFloat32, {6, 5}, Split({6, 5}, 1, r, world),
         false);
  Expect(*ck, "big", DType::kFloat32, {257, 1031},
         Split({257, 1031}, 1, r, world), false);
  // Random boxes.
  std::mt19937 rng(static_cast<unsigned>(r * 131 + saved_world));
  for (const auto& l : Layouts(0, 1)) {
    for (int k = 0; k < 5; ++k) {
      Box b;
      for (int64_t n : l.shape) {
        std::uniform_int_distribution<int64_t> d(0, n);
        int64_t x = d(rng), y = d(rng);
        b.offsets.push_back(std::min(x, y));
        b.sizes.push_back(std::max(x, y) - std::min(x, y));
      }
      Expect(*ck, l.path, l.dtype, l.shape, b, k % 2 == 0);
    }
  }
  // Trees: the globals, and this rank's own state at the same world size.
  auto g = ck->OpenShard(ck->manifest().globals_file);
  if (!g.ok()) Fail(g.status().ToString());
  auto step = g->Get("globals/step");
  if (!step.ok() || step->as_int() != 200) Fail("globals/step is not 200");
  if (world == saved_world) {
    auto mine = ck->OpenShard(static_cast<size_t>(r));
    if (!mine.ok()) Fail(mine.status().ToString());
    auto v = mine->Get("rank_local/rank");
    if (!v.ok() || v->as_int() != r) Fail("rank_local/rank is not my rank");
  }
  // Every rank reaches the same verdict.
  Status all = Agree(*comm, Status::OK());
  if (!all.ok()) Fail(all.ToString());
  if (r == 0)
    std::printf("load %s on %d ranks (saved on %d): ok\n", dir.c_str(), world,
                saved_world);
  return 0;
}

int SaveMode(const std::string& dir) {
  auto comm = MakeComm();
  SaveSetup s = MakeChunks(comm->rank(), comm->size());
  auto info = DoSave(*comm, dir, s);
  if (!info.ok()) Fail(info.status().ToString());
  if (comm->rank() == 0) {
    std::printf("save %s on %d ranks: %u files, %llu bytes\n", dir.c_str(),
                comm->size(), info->files,
                static_cast<unsigned long long>(info->total_bytes));
  }
  return 0;
}

std::string g_mode;
void Hook(const char* phase, int rank) {
  if ((g_mode == "kill_before_rename" &&
       std::strcmp(phase, "before_rename") == 0) ||
      (g_mode == "kill_after_rename" &&
       std::strcmp(phase, "after_rename") == 0)) {
    if (rank == g_rank) ::raise(SIGKILL);
  }
}

int FaultMode(const std::string& dir, const std::string& mode) {
  auto comm = MakeComm();
  const int r = comm->rank(), world = comm->size();
  g_mode = mode;
  dist::internal::SetFaultHook(&Hook);
  SaveSetup s = MakeChunks(r, world);
  if (mode == "kill_mid_write" && r == world - 1) {
    // Write part of the shard, then die as a crash would.
    auto shard = ShardPath(dir, r, world);
    auto w = Writer::Create(*shard);
    if (!w.ok() || !AddChunk(*w, s.chunks.back()).ok()) Fail("partial write");
    ::raise(SIGKILL);
  }
  if (mode == "efbig" && r == 1) {
    // The kernel refuses writes past 64 KiB: this rank's shard cannot be
    // written (a real write error, as ENOSPC or EIO would be).
    ::signal(SIGXFSZ, SIG_IGN);
    rlimit lim{64 << 10, 64 << 10};
    ::setrlimit(RLIMIT_FSIZE, &lim);
  }
  auto info = DoSave(*comm, dir, s);
  if (mode == "efbig") {
    // Every rank fails, naming rank 1 and the kernel's reason.
    if (info.ok()) Fail("the save succeeded despite rank 1's write errors");
    const std::string msg = info.status().ToString();
    if (msg.find("rank 1 of") == std::string::npos ||
        msg.find("too large") == std::string::npos) {
      Fail("unexpected error: " + msg);
    }
    if (std::filesystem::exists(dir))
      Fail("a failed save left " + dir + " visible");
    if (r == 0)
      std::printf("efbig on rank 1: every rank says: %s\n", msg.c_str());
    return 0;
  }
  if (!info.ok()) Fail(info.status().ToString());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // A rank whose mpirun is killed (run.sh's kill -9s pick mpirun too)
  // waits in a collective for peers that are gone, busy-polling: Open MPI
  // does not always end it (seen under ASan: one spun 40 s, starving the
  // rest of the suite on 2 cores). The test ends it with its parent.
  const pid_t parent = getppid();
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) _exit(1);  // (the parent died before prctl)
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  int rc = 2;
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "save" && argc == 3) {
    rc = SaveMode(argv[2]);
  } else if (mode == "load" && argc == 4) {
    rc = Load(argv[2], std::atoi(argv[3]));
  } else if (mode == "fault" && argc == 4) {
    rc = FaultMode(argv[2], argv[3]);
  } else if (g_rank == 0) {
    std::fprintf(
        stderr,
        "usage: dist_mpi_test save DIR | load DIR SAVED_N | fault DIR MODE\n");
  }
  MPI_Finalize();
  return rc;
}
