// MpiComm: gathers and broadcasts of byte strings over MPI.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "ckpt/mpi.h"

namespace ckpt::dist {
namespace {

Status MpiError(const char* what, int rc) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) len = 0;
  return IoError(std::string("MPI ") + what + " failed: " +
                 std::string(text, static_cast<size_t>(std::max(len, 0))));
}

// MPI counts are int: big buffers travel in pieces of at most 1 GiB.
constexpr uint64_t kPiece = uint64_t{1} << 30;

Status BcastBytes(std::byte* p, uint64_t n, int root, MPI_Comm comm) {
  for (uint64_t done = 0; done < n;) {
    const auto len = static_cast<int>(std::min(kPiece, n - done));
    int rc = MPI_Bcast(p + done, len, MPI_BYTE, root, comm);
    if (rc != MPI_SUCCESS) return MpiError("Bcast", rc);
    done += static_cast<uint64_t>(len);
  }
  return Status::OK();
}

}  // namespace

Result<std::unique_ptr<MpiComm>> MpiComm::Create(MPI_Comm comm) {
  std::unique_ptr<MpiComm> c(new MpiComm());
  int rc = MPI_Comm_dup(comm, &c->comm_);
  if (rc != MPI_SUCCESS) return MpiError("Comm_dup", rc);
  MPI_Comm_set_errhandler(c->comm_, MPI_ERRORS_RETURN);
  if ((rc = MPI_Comm_rank(c->comm_, &c->rank_)) != MPI_SUCCESS ||
      (rc = MPI_Comm_size(c->comm_, &c->size_)) != MPI_SUCCESS) {
    return MpiError("Comm_rank/size", rc);
  }
  return c;
}

MpiComm::~MpiComm() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (comm_ != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm_);
}

Result<std::vector<std::vector<std::byte>>> MpiComm::Gather(
    int root, std::span<const std::byte> mine) {
  if (root < 0 || root >= size_) return InvalidArgument("Gather: bad root");
  // Sizes first, then the bytes: one Gatherv when everything fits int
  // counts, else one point-to-point exchange per rank in pieces.
  uint64_t n = mine.size();
  std::vector<uint64_t> sizes(rank_ == root ? static_cast<size_t>(size_) : 0);
  int rc = MPI_Gather(&n, 1, MPI_UINT64_T, sizes.data(), 1, MPI_UINT64_T, root,
                      comm_);
  if (rc != MPI_SUCCESS) return MpiError("Gather", rc);
  std::vector<std::vector<std::byte>> out;
  uint64_t total = 0, largest = n;
  if (rank_ == root) {
    for (uint64_t s : sizes) {
      total += s;
      largest = std::max(largest, s);
    }
  }
  // Every rank must take the same path: the root tells them which.
  int small = rank_ != root || total < INT_MAX;
  rc = MPI_Bcast(&small, 1, MPI_INT, root, comm_);
  if (rc != MPI_SUCCESS) return MpiError("Bcast", rc);
  if (small) {
    std::vector<int> counts, displs;
    std::vector<std::byte> all;
    if (rank_ == root) {
      all.resize(total);
      int at = 0;
      for (uint64_t s : sizes) {
        counts.push_back(static_cast<int>(s));
        displs.push_back(at);
        at += static_cast<int>(s);
      }
    }
    rc = MPI_Gatherv(mine.data(), static_cast<int>(n), MPI_BYTE, all.data(),
                     counts.data(), displs.data(), MPI_BYTE, root, comm_);
    if (rc != MPI_SUCCESS) return MpiError("Gatherv", rc);
    if (rank_ == root) {
      for (int r = 0; r < size_; ++r) {
        auto b = all.begin() + displs[static_cast<size_t>(r)];
        out.emplace_back(b, b + counts[static_cast<size_t>(r)]);
      }
    }
    return out;
  }
  // Large: each rank sends to the root in pieces, in rank order.
  if (rank_ == root) {
    out.resize(static_cast<size_t>(size_));
    for (int r = 0; r < size_; ++r) {
      auto& buf = out[static_cast<size_t>(r)];
      buf.resize(sizes[static_cast<size_t>(r)]);
      if (r == root) {
        std::copy(mine.begin(), mine.end(), buf.begin());
        continue;
      }
      for (uint64_t done = 0; done < buf.size();) {
        const auto len = static_cast<int>(std::min(kPiece, buf.size() - done));
        rc = MPI_Recv(buf.data() + done, len, MPI_BYTE, r, 0, comm_,
                      MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) return MpiError("Recv", rc);
        done += static_cast<uint64_t>(len);
      }
    }
  } else {
    for (uint64_t done = 0; done < n;) {
      const auto len = static_cast<int>(std::min(kPiece, n - done));
      rc = MPI_Send(mine.data() + done, len, MPI_BYTE, root, 0, comm_);
      if (rc != MPI_SUCCESS) return MpiError("Send", rc);
      done += static_cast<uint64_t>(len);
    }
  }
  return out;
}

Result<std::vector<std::byte>> MpiComm::Broadcast(
    int root, std::span<const std::byte> bytes) {
  if (root < 0 || root >= size_) return InvalidArgument("Broadcast: bad root");
  uint64_t n = bytes.size();
  int rc = MPI_Bcast(&n, 1, MPI_UINT64_T, root, comm_);
  if (rc != MPI_SUCCESS) return MpiError("Bcast", rc);
  std::vector<std::byte> out(n);
  if (rank_ == root) std::copy(bytes.begin(), bytes.end(), out.begin());
  CKPT_RETURN_IF_ERROR(BcastBytes(out.data(), n, root, comm_));
  return out;
}

}  // namespace ckpt::dist
