#!/usr/bin/env bash
# Installs what ckpt needs from Debian's packages (docs/DEPENDENCIES.md says
# why each is there) and creates the Python venv .venv for the peers in
# bench/. Safe to run again: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(cmake g++ clang clang-format libflatbuffers-dev flatbuffers-compiler libxxhash-dev
      libboost-dev catch2 pybind11-dev python3-dev python3-venv python3-torch
      python3-numpy zlib1g-dev libopenmpi-dev time)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Debian's torch is importable only from /usr/bin/python3, so the venv is
# made from it and sees its site-packages. numpy stays Debian's: torch 1.13
# is built against numpy 1.x, and pip would otherwise pull numpy 2.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
np=$(/usr/bin/python3 -c 'import numpy; print(numpy.__version__)')
.venv/bin/pip install -q --disable-pip-version-check -c <(echo "numpy==$np") \
  -r bench/requirements.txt

# The main target: PyPI's current torch 2.x (with numpy 2.x and the peers)
# in a venv of its own, made from Debian's python3 so that the module the
# build makes for it loads there too. ~3 GB, a few minutes the first time.
if [ ! -x .venv-torch2/bin/python ]; then
  /usr/bin/python3 -m venv .venv-torch2
fi
# tqdm only here: the progress tests take its path under torch 2.x and the
# plain line under .venv, which lacks it.
.venv-torch2/bin/pip install -q --disable-pip-version-check torch numpy tqdm \
  -r bench/requirements.txt
# The frameworks of docs/INTEGRATIONS.md (Lightning, Hugging Face), pinned.
.venv-torch2/bin/pip install -q --disable-pip-version-check \
  -r tests/requirements-integrations.txt
