// Writes the input files of tests/dist_cli_test.sh (tests/dist_fixture.h):
//   dist_fixture KIND OUT     KIND: mixed, numpy, tagged, big
#include "dist_fixture.h"

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: dist_fixture mixed|numpy|tagged|big OUT\n");
    return 2;
  }
  ckpt::Status s = ckpt::test::WriteDistFixture(argv[2], argv[1]);
  if (!s.ok()) {
    std::fprintf(stderr, "dist_fixture: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
