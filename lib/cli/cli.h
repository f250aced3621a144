// The ckpt command line as a function, shared by the executable and the
// Python binding.
#pragma once

namespace ckpt::tool {

/// Runs `ckpt argv[1] ...` and returns its exit status (0 ok, 1 failure,
/// 2 usage error). Writes to stdout/stderr.
int CliMain(int argc, char** argv);

}  // namespace ckpt::tool
