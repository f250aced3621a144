// SelfComm and Agree: the collectives every Comm is used through.
#include <string>
#include <vector>

#include "ckpt/dist.h"
#include "dist/manifest_internal.h"

namespace ckpt::dist {

Result<std::vector<std::vector<std::byte>>> SelfComm::Gather(
    int root, std::span<const std::byte> mine) {
  if (root != 0) return InvalidArgument("SelfComm: root must be 0");
  return std::vector<std::vector<std::byte>>{{mine.begin(), mine.end()}};
}

Result<std::vector<std::byte>> SelfComm::Broadcast(
    int root, std::span<const std::byte> bytes) {
  if (root != 0) return InvalidArgument("SelfComm: root must be 0");
  return std::vector<std::byte>(bytes.begin(), bytes.end());
}

namespace internal {

// The failure of the lowest failing rank, said to come from that rank, with
// how many others failed too: what every rank reports.
Status FirstRankFailure(const std::vector<Status>& per_rank, int world) {
  int first = -1, others = 0;
  for (size_t r = 0; r < per_rank.size(); ++r) {
    if (per_rank[r].ok()) continue;
    if (first < 0) {
      first = static_cast<int>(r);
    } else {
      ++others;
    }
  }
  if (first < 0) return Status::OK();
  const Status& s = per_rank[static_cast<size_t>(first)];
  std::string msg = "rank " + std::to_string(first) + " of " +
                    std::to_string(world) + " failed: " + s.ToString();
  if (others > 0) {
    msg += " (and " + std::to_string(others) + " more rank" +
           (others > 1 ? "s" : "") + " failed)";
  }
  Status out(s.code(), msg);
  if (s.sys_errno()) out = out.WithErrno(s.sys_errno());
  return out;
}

}  // namespace internal

Status Agree(Comm& comm, const Status& local, int root) {
  if (root < 0 || root >= comm.size()) {
    return InvalidArgument("Agree: root " + std::to_string(root) +
                           " outside the group of " +
                           std::to_string(comm.size()));
  }
  std::vector<std::byte> mine = internal::EncodeStatus(local);
  CKPT_ASSIGN_OR_RETURN(auto all, comm.Gather(root, mine));
  std::vector<std::byte> verdict;
  if (comm.rank() == root) {
    std::vector<Status> per_rank;
    for (const auto& bytes : all)
      per_rank.push_back(internal::DecodeStatus(bytes));
    verdict = internal::EncodeStatus(
        internal::FirstRankFailure(per_rank, comm.size()));
  }
  CKPT_ASSIGN_OR_RETURN(auto got, comm.Broadcast(root, verdict));
  return internal::DecodeStatus(got);
}

}  // namespace ckpt::dist
