// The ckpt command line as a function (the ckpt_cli library, lib/cli/),
// shared by the executable (tools/ckpt) and the Python binding
// (`python -m ckpt`). Include it as "cli/cli.h".
#pragma once

namespace ckpt::tool {

/// Runs `ckpt argv[1] ...` and returns its exit status (0 ok, 1 failure,
/// 2 usage error). Writes to stdout/stderr.
int CliMain(int argc, char** argv);

}  // namespace ckpt::tool
