// A one-line progress display for the command-line tools (`ckpt load`,
// `ckpt import`, pth2ckpt). Header-only, like human.h, so pth2ckpt uses it
// without linking the commands.
//
// The line goes to stderr, never stdout: stdout stays exactly what a piped
// run prints. It is shown on a terminal only (stderr a TTY) unless a
// --progress / --no-progress flag says otherwise, redrawn with '\r' at
// most ten times a second, and erased (overwritten with spaces) before the
// tool prints its result, so what stays on the terminal is the same text a
// piped run writes.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include "cli/human.h"

namespace ckpt::tool {

/// --progress / --no-progress / neither (a terminal decides).
enum class ProgressMode { kAuto, kOn, kOff };

/// Parses a progress flag: true (and sets `mode`) for --progress or
/// --no-progress, false for any other argument.
inline bool ParseProgressFlag(std::string_view arg, ProgressMode& mode) {
  if (arg == "--progress") {
    mode = ProgressMode::kOn;
    return true;
  }
  if (arg == "--no-progress") {
    mode = ProgressMode::kOff;
    return true;
  }
  return false;
}

/// The progress line of one run. Not thread-safe: call it from the thread
/// that does the work. Costs one clock read per Update when shown and
/// nothing when not.
class ProgressLine {
 public:
  explicit ProgressLine(ProgressMode mode)
      : on_(mode == ProgressMode::kOn ||
            (mode == ProgressMode::kAuto && isatty(STDERR_FILENO) == 1)) {}
  ProgressLine(const ProgressLine&) = delete;
  ProgressLine& operator=(const ProgressLine&) = delete;
  ~ProgressLine() { Clear(); }

  bool on() const { return on_; }

  /// `done` of `total` bytes of the work called `label`. A new label
  /// restarts the rate. Drawn at once for a new label and for done ==
  /// total, otherwise at most every 100 ms.
  void Update(std::string_view label, uint64_t done, uint64_t total) {
    if (!on_) return;
    const auto now = std::chrono::steady_clock::now();
    const bool fresh = label != label_;
    if (fresh) {
      label_ = label;
      start_ = now;
    } else if (done == drawn_done_ ||
               (done < total &&
                now - drawn_at_ < std::chrono::milliseconds(100))) {
      return;
    }
    drawn_at_ = now;
    drawn_done_ = done;
    const double sec = std::chrono::duration<double>(now - start_).count();
    std::string line = Shorten(label_);
    line += "  " + HumanBytes(done) + " / " + HumanBytes(total);
    char tail[64];
    std::snprintf(tail, sizeof tail, "  %3.0f%%",
                  total ? 100.0 * static_cast<double>(std::min(done, total)) /
                              static_cast<double>(total)
                        : 100.0);
    line += tail;
    if (sec > 0 && done > 0) {
      std::snprintf(tail, sizeof tail, "  %.2f GB/s",
                    static_cast<double>(done) / sec / 1e9);
      line += tail;
    }
    // Pad over the longer line drawn before.
    const size_t len = line.size();
    if (len < width_) line.append(width_ - len, ' ');
    width_ = std::max(width_, len);
    std::fputc('\r', stderr);
    std::fwrite(line.data(), 1, line.size(), stderr);
    std::fflush(stderr);
  }

  /// Erases the line (if one was drawn); the next Update draws afresh.
  void Clear() {
    if (!on_ || width_ == 0) return;
    std::fputc('\r', stderr);
    std::fwrite(std::string(width_, ' ').data(), 1, width_, stderr);
    std::fputc('\r', stderr);
    std::fflush(stderr);
    width_ = 0;
    label_.clear();
  }

 private:
  // Labels are file names: keep the line within ~80 columns. A leading
  // "[i/n] " counter (pth2ckpt DIR) is kept whole; the name is shortened.
  static std::string Shorten(const std::string& label) {
    constexpr size_t kMax = 40;
    if (label.size() <= kMax) return label;
    std::string head;
    std::string s = label;
    if (size_t close = label.find("] ");
        label[0] == '[' && close != std::string::npos && close < 24) {
      head = label.substr(0, close + 2);
      s = label.substr(close + 2);
    }
    size_t keep = kMax > head.size() + 3 ? kMax - head.size() - 3 : 8;
    size_t from = s.size() - keep;
    // Never start inside a UTF-8 sequence.
    while (from < s.size() &&
           (static_cast<unsigned char>(s[from]) & 0xC0) == 0x80)
      ++from;
    return head + "..." + s.substr(from);
  }

  bool on_;
  std::string label_;
  size_t width_ = 0;         // columns of the widest line drawn since Clear()
  uint64_t drawn_done_ = 0;  // `done` of the last line drawn
  std::chrono::steady_clock::time_point start_, drawn_at_;
};

}  // namespace ckpt::tool
