// MpiComm: the Comm of ckpt/dist.h over an MPI communicator (target
// ckpt::mpi, which links MPI). The collectives run on a duplicate of the
// communicator given, made once, so they never interleave with the
// application's own messages, and with MPI_ERRORS_RETURN on it, so a
// failed collective is a Status rather than an abort.
//
// examples/sharded_mpi.cc is a whole program: MPI_Init, then
// MpiComm::Create(MPI_COMM_WORLD), then Save and ShardedCheckpoint::Open
// with *comm, the MpiComm destroyed before MPI_Finalize.
#pragma once

#include <mpi.h>

#include <memory>

#include "ckpt/dist.h"

namespace ckpt::dist {

class MpiComm final : public Comm {
 public:
  /// Collective over `comm`: duplicates it. kIoError when MPI refuses.
  static Result<std::unique_ptr<MpiComm>> Create(MPI_Comm comm);
  ~MpiComm() override;  // frees the duplicate (before MPI_Finalize)
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  /// Message sizes of any length (sent in pieces below 2^31 bytes).
  Result<std::vector<std::vector<std::byte>>> Gather(
      int root, std::span<const std::byte> mine) override;
  Result<std::vector<std::byte>> Broadcast(
      int root, std::span<const std::byte> bytes) override;

 private:
  MpiComm() = default;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
};

}  // namespace ckpt::dist
