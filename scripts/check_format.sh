#!/usr/bin/env bash
# Fails when a tracked C++ source differs from what the checked-in
# .clang-format makes of it. A check, never a rewrite: fix with
#   git ls-files '*.cc' '*.h' '*.cu' | xargs clang-format -i
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clang-format >/dev/null; then
  echo "format: clang-format not found (scripts/install_deps.sh installs it)" >&2
  exit 1
fi
git ls-files -z '*.cc' '*.h' '*.cu' | xargs -0 clang-format --dry-run --Werror
echo "format: $(git ls-files '*.cc' '*.h' '*.cu' | wc -l) files match .clang-format ($(clang-format --version | grep -o 'version [0-9.]*'))"
