// A sharded checkpoint under MPI: every rank saves its rows of one tensor,
// then loads a block of columns of it (another sharding: a reshard), and
// checks every element. Run it with any number of ranks:
//
//   mpirun -np 2 example_sharded_mpi DIR
//
// DIR must not exist yet; afterwards `ckpt inspect DIR` shows the chunks.
#include <mpi.h>

#include <cstdio>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "ckpt/dist.h"
#include "ckpt/mpi.h"

namespace {

constexpr int64_t kRows = 8, kCols = 6;

int Run(const std::string& dir) {
  auto comm = ckpt::dist::MpiComm::Create(MPI_COMM_WORLD);
  if (!comm.ok()) {
    std::fprintf(stderr, "%s\n", comm.status().ToString().c_str());
    return 1;
  }
  const int64_t rank = (*comm)->rank(), world = (*comm)->size();

  // The global tensor w[i][j] = i * kCols + j, cut into near-even row
  // blocks (a rank may hold none).
  const int64_t r0 = kRows * rank / world, r1 = kRows * (rank + 1) / world;
  std::vector<float> rows;
  for (int64_t i = r0; i < r1; ++i)
    for (int64_t j = 0; j < kCols; ++j)
      rows.push_back(static_cast<float>(i * kCols + j));
  ckpt::dist::Chunk chunk{"w",
                          ckpt::DType::kFloat32,
                          {kRows, kCols},
                          ckpt::Box{{r0, 0}, {r1 - r0, kCols}},
                          std::as_bytes(std::span(rows))};
  // Collective: every rank returns the same result.
  auto saved = ckpt::dist::Save(**comm, dir, std::span(&chunk, 1));
  if (!saved.ok()) {
    std::fprintf(stderr, "rank %ld: %s\n", static_cast<long>(rank),
                 saved.status().ToString().c_str());
    return 1;
  }

  // Load columns [c0, c1) of every row: only those bytes are read.
  auto ck = ckpt::dist::ShardedCheckpoint::Open(**comm, dir);
  if (!ck.ok()) {
    std::fprintf(stderr, "%s\n", ck.status().ToString().c_str());
    return 1;
  }
  const int64_t c0 = kCols * rank / world, c1 = kCols * (rank + 1) / world;
  auto cols = ck->Read("w", ckpt::Box{{0, c0}, {kRows, c1 - c0}});
  if (!cols.ok()) {
    std::fprintf(stderr, "%s\n", cols.status().ToString().c_str());
    return 1;
  }
  std::vector<float> got((cols->data.size()) / sizeof(float));
  std::memcpy(got.data(), cols->data.data(), cols->data.size());
  size_t k = 0;
  for (int64_t i = 0; i < kRows; ++i)
    for (int64_t j = c0; j < c1; ++j, ++k)
      if (k >= got.size() || got[k] != static_cast<float>(i * kCols + j)) {
        std::fprintf(stderr, "rank %ld: w[%ld][%ld] differs\n",
                     static_cast<long>(rank), static_cast<long>(i),
                     static_cast<long>(j));
        return 1;
      }
  std::printf(
      "rank %ld of %ld: saved rows [%ld, %ld), loaded columns "
      "[%ld, %ld) of %s\n",
      static_cast<long>(rank), static_cast<long>(world), static_cast<long>(r0),
      static_cast<long>(r1), static_cast<long>(c0), static_cast<long>(c1),
      dir.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rc = 2;
  if (argc == 2) {
    rc = Run(argv[1]);  // MpiComm is gone before MPI_Finalize
  } else {
    std::fprintf(stderr, "usage: mpirun -np N %s DIR\n", argv[0]);
  }
  MPI_Finalize();
  return rc;
}
