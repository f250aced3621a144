#include <algorithm>
#include <atomic>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

#include "parallel_internal.h"

namespace ckpt::internal {

Status ParallelFor(size_t n, unsigned threads,
                   const std::function<Status(size_t)>& fn) {
  if (n == 0) return Status::OK();
  unsigned want =
      threads ? threads : std::max(1u, std::thread::hardware_concurrency());
  want = static_cast<unsigned>(std::min<size_t>(want, n));
  std::atomic<size_t> next{0};
  std::atomic<size_t> failed_at{SIZE_MAX};
  std::mutex mu;
  Status first;
  auto fail = [&](size_t i, Status s) {
    std::lock_guard<std::mutex> lock(mu);
    if (i < failed_at.load()) {
      failed_at = i;
      first = std::move(s);
    }
  };
  auto work = [&]() noexcept {
    for (;;) {
      size_t i = next.fetch_add(1);
      if (i >= n) return;
      if (i > failed_at.load()) continue;
      Status s;
      try {
        s = fn(i);
      } catch (const std::bad_alloc&) {
        s = ResourceExhausted("out of memory");
      } catch (const std::exception& e) {
        s = IoError(std::string("unexpected error: ") + e.what());
      }
      if (!s.ok()) fail(i, std::move(s));
    }
  };
  std::vector<std::thread> pool;
  try {
    pool.reserve(want - 1);
    for (unsigned t = 1; t < want; ++t) pool.emplace_back(work);
  } catch (const std::exception&) {
    // std::system_error (no more threads) or bad_alloc: go on with the
    // threads that did start; the calling thread always works.
  }
  work();
  for (auto& t : pool) t.join();
  return first;
}

}  // namespace ckpt::internal
