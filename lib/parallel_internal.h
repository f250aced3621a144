// One thread pool shape for the whole library: run a job over indices on
// several threads and report the first failure as a Status, never throwing.
#pragma once

#include <cstddef>
#include <functional>

#include "ckpt/status.h"

namespace ckpt::internal {

/// Calls fn(i) for every i in [0, n) on up to `threads` threads (0 = all
/// cores; the calling thread is one of them). Once some fn(k) fails,
/// indices above k are skipped; returns the failure with the lowest index,
/// or OK. Never throws: a thread the system cannot start means fewer
/// threads (at worst the caller alone), and std::bad_alloc from fn becomes
/// kResourceExhausted.
Status ParallelFor(size_t n, unsigned threads,
                   const std::function<Status(size_t)>& fn);

}  // namespace ckpt::internal
