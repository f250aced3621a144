// Writes the input files of tests/dist_cli_test.sh (tests/dist_fixture.h):
//   dist_fixture KIND OUT        KIND: mixed, numpy, tagged, big
//   dist_fixture ranklocal DIR   a 2-rank sharded checkpoint whose ranks
//                                each saved a rank-local tree: {"w": f32
//                                [4,2] cut on dim 0, "epoch": 3}, rank r's
//                                own tree {"rng": r}
#include "dist_fixture.h"

#include <ckpt/dist.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

ckpt::Status WriteRankLocal(const std::string& dir) {
  std::vector<float> w = {0, 1, 2, 3, 4, 5, 6, 7};
  ckpt::WriteOptions wo;
  wo.sync = false;
  for (int r = 0; r < 2; ++r) {
    CKPT_ASSIGN_OR_RETURN(std::string shard, ckpt::dist::ShardPath(dir, r, 2));
    CKPT_ASSIGN_OR_RETURN(ckpt::Writer wr, ckpt::Writer::Create(shard, wo));
    ckpt::dist::Chunk c;
    c.path = "w";
    c.dtype = ckpt::DType::kFloat32;
    c.global_shape = {4, 2};
    c.box = {{2 * r, 0}, {2, 2}};
    c.data =
        std::as_bytes(std::span(w)).subspan(static_cast<size_t>(16 * r), 16);
    CKPT_ASSIGN_OR_RETURN(std::optional<ckpt::NodeId> chunk,
                          ckpt::dist::AddChunk(wr, c));
    std::vector<ckpt::NodeId> chunks;
    if (chunk) chunks.push_back(*chunk);
    std::optional<ckpt::NodeId> globals;
    if (r == 0) {
      CKPT_ASSIGN_OR_RETURN(ckpt::NodeId p, ckpt::dist::AddGlobalTensor(wr));
      std::vector<ckpt::NodeId> keys = {wr.AddString("w"),
                                        wr.AddString("epoch")};
      std::vector<ckpt::NodeId> values = {p, wr.AddInt(3)};
      CKPT_ASSIGN_OR_RETURN(ckpt::NodeId g, wr.AddDict(keys, values));
      globals = g;
    }
    std::vector<ckpt::NodeId> lk = {wr.AddString("rng")};
    std::vector<ckpt::NodeId> lv = {wr.AddInt(r)};
    CKPT_ASSIGN_OR_RETURN(ckpt::NodeId local, wr.AddDict(lk, lv));
    CKPT_RETURN_IF_ERROR(
        ckpt::dist::SetShardRoot(wr, chunks, globals, local, r, 2));
    CKPT_RETURN_IF_ERROR(wr.Commit());
  }
  ckpt::dist::SaveOptions so;
  so.write.sync = false;
  return ckpt::dist::CommitWritten(dir, 2, so).status();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr,
                 "usage: dist_fixture mixed|numpy|tagged|big OUT | ranklocal "
                 "DIR\n");
    return 2;
  }
  const std::string kind = argv[1];
  ckpt::Status s = kind == "ranklocal"
                       ? WriteRankLocal(argv[2])
                       : ckpt::test::WriteDistFixture(argv[2], kind);
  if (!s.ok()) {
    std::fprintf(stderr, "dist_fixture: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
