#!/usr/bin/env python3
"""Checks the include graph against the dependency direction of DESIGN.md.

Reads every #include in lib/, include/, tools/ and python/src/, puts each
file in one layer of LAYERS, and fails when a file includes one of a layer
it may not depend on (MAY_USE), when a public header includes anything but
the standard library and ckpt/ headers, or when a third-party header is
included outside the files that own it (THIRD_PARTY). A new source file
must be given a layer here, so the table stays the map of the code.

  check_includes.py [ROOT]      check the tree at ROOT (default: the repo)
  check_includes.py --self-test check that a broken tree is caught

Prints one line per problem, "file:line includes X (why)", and exits 1 if
there is any. Standard library only.
"""

import fnmatch
import os
import re
import sys
import tempfile

SCANNED = ("lib", "include", "tools", "python/src")
SOURCE_EXT = (".h", ".hpp", ".cc", ".cpp", ".cu", ".cuh")

# Layers, low to high, and the files in each (fnmatch patterns; '*' also
# matches '/'). The first matching layer wins.
LAYERS = [
    ("schema", ["ckpt_generated.h"]),  # flatc output of schema/ckpt.fbs
    # flatc output of schema/ckpt_manifest.fbs: only lib/dist reads it.
    ("manifest_schema", ["ckpt_manifest_generated.h"]),
    ("status", ["include/ckpt/status.h", "lib/status.cc"]),
    ("box", ["include/ckpt/box.h", "lib/box.cc"]),
    ("format", ["include/ckpt/format.h", "lib/format.cc",
                "lib/format_internal.h", "lib/bytes_internal.h",
                "lib/tree_internal.h", "lib/tree.cc", "lib/checksum*"]),
    ("io", ["lib/source*", "lib/atomic_file*", "lib/parallel*"]),
    # The strict JSON reader for files from elsewhere, and the one JSON
    # string writer.
    ("json", ["lib/json.cc", "lib/json_internal.h"]),
    # The safetensors header (dtype names, the checks safetensors makes):
    # Hugging Face directories and DCP's SAFETENSORS .distcp files.
    ("safetensors", ["lib/safetensors.cc", "lib/safetensors_internal.h"]),
    ("header", ["lib/header_internal.h", "lib/header.cc"]),
    ("reader", ["include/ckpt/reader.h", "lib/reader.cc", "lib/reader_internal.h"]),
    ("writer", ["include/ckpt/writer.h", "lib/writer.cc"]),
    ("umbrella", ["include/ckpt/ckpt.h"]),
    # Sharded boxes to a GPU: the device loader over the sharded reader.
    ("dist_cuda", ["include/ckpt/dist_cuda.h", "lib/cuda/dist_device.cc"]),
    ("cuda", ["include/ckpt/cuda.h", "lib/cuda/*"]),
    ("pth", ["include/ckpt/pth.h", "lib/pth/*"]),
    # Hugging Face save_pretrained directories (safetensors) <-> ckpt.
    ("hf", ["include/ckpt/hf.h", "lib/hf/*"]),
    # MPI before dist: the one public header that includes a third-party
    # one (mpi.h), in its own target (ckpt::mpi).
    ("mpi", ["include/ckpt/mpi.h", "lib/dist/mpi_comm.cc"]),
    ("dist", ["include/ckpt/dist.h", "lib/dist/*"]),
    ("cli", ["lib/cli/*"]),
    ("tools", ["tools/*"]),
    ("python", ["python/src/*"]),
]

# What each layer may include besides its own files: a layer name allows
# all of that layer's files, "name:public" only its headers in include/.
# Anything not listed is a violation (reader and writer never include each
# other; nothing includes a layer above it).
_PUBLIC_API = ["status:public", "box:public", "format:public", "reader:public",
               "writer:public", "umbrella:public", "cuda:public",
               "pth:public", "dist:public", "dist_cuda:public", "hf:public"]
MAY_USE = {
    "schema": [],
    "status": [],
    # Geometry only: boxes and byte runs, over no file format.
    "box": ["status"],
    "format": ["schema", "status"],
    "io": ["status", "format"],
    "header": ["schema", "status", "format", "io"],
    "reader": ["schema", "status", "format", "io", "header"],
    "writer": ["schema", "status", "format", "io", "header"],
    "umbrella": ["status", "format", "reader", "writer"],
    # The loader takes reader views; it never decodes the header itself.
    "cuda": ["status", "format", "io", "reader"],
    # The importer writes through the public writer only.
    "pth": ["status", "box", "format", "io", "json", "safetensors",
            "writer:public"],
    "json": ["status", "format"],
    "safetensors": ["status", "format", "io", "json"],
    # Reads and writes ckpt files through the public reader and writer,
    # .bin shards through the public importer.
    "hf": ["status", "format", "io", "json", "safetensors", "reader:public",
           "writer:public", "pth:public"],
    # The commands are thin: the public API only.
    # Sharded checkpoints are ordinary files read and written through the
    # public reader and writer, plus the helpers loaders share (checked
    # storage ranges: reader_internal.h) and the DCP index (lib/pth).
    "manifest_schema": [],
    "dist_cuda": ["status", "box", "format", "reader:public",
                  "writer:public", "cuda:public", "dist:public"],
    "dist": ["manifest_schema", "status", "box", "format", "io", "reader",
             "writer:public", "pth"],
    "mpi": ["status", "box", "format", "reader:public", "writer:public",
            "dist:public"],
    # (json: the one JSON string writer.)
    "cli": _PUBLIC_API + ["json"],
    "tools": _PUBLIC_API + ["cli"],
    "python": _PUBLIC_API + ["cli"],
}

# Third-party headers (by prefix of the <...> name) and the only files that
# may include them (fnmatch patterns), so Boost, FlatBuffers, xxHash, zlib
# and CUDA types stay where STYLE.md puts them.
THIRD_PARTY = {
    "boost/": ["lib/source.cc"],
    "flatbuffers/": [],  # only through the generated headers
    "mpi.h": ["include/ckpt/mpi.h", "lib/dist/mpi_comm.cc"],
    "xxhash.h": ["lib/checksum.cc"],
    "zlib.h": ["lib/pth/zip.cc"],
    "cuda": ["lib/cuda/*"],
    "pybind11/": ["python/src/*"],
}

# Where a quoted include is looked for after the including file's own
# directory: the -I directories the CMake targets have or once had (tools/
# so that a file reaching into a tool is named as such, not as missing).
SEARCH_DIRS = ["include", "lib", "tools"]

# The C++20 standard library (public headers may include these and ckpt/).
STD_HEADERS = set("""
algorithm any array atomic barrier bit bitset cassert cctype cerrno cfenv
cfloat charconv chrono cinttypes climits clocale cmath codecvt compare
complex concepts condition_variable coroutine csetjmp csignal cstdarg
cstddef cstdint cstdio cstdlib cstring ctime cuchar cwchar cwctype deque
exception execution expected filesystem format forward_list fstream
functional future initializer_list iomanip ios iosfwd iostream istream
iterator latch limits list locale map memory memory_resource mutex new
numbers numeric optional ostream queue random ranges ratio regex
scoped_allocator semaphore set shared_mutex source_location span sstream
stack stdexcept stop_token streambuf string string_view syncstream
system_error thread tuple type_traits typeindex typeinfo unordered_map
unordered_set utility valarray variant vector version
""".split())

INCLUDE_RE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]')


def layer_of(rel):
    for name, patterns in LAYERS:
        if any(fnmatch.fnmatchcase(rel, p) for p in patterns):
            return name
    return None


def is_public(rel):
    return rel.startswith("include/")


def resolve(root, rel, kind, target):
    """The repository-relative path an include names, or None if not ours."""
    # Angle includes are searched like quoted ones, minus the including
    # file's own directory: the build puts lib/ on some include paths, so
    # `#include <reader_internal.h>` would compile and must be judged too.
    dirs = ([] if kind == "<" else [os.path.dirname(rel)]) + SEARCH_DIRS
    for d in dirs:
        cand = os.path.normpath(os.path.join(d, target))
        if os.path.isfile(os.path.join(root, cand)):
            return cand
    return None


def allowed(src_layer, dst_layer, dst_rel):
    if src_layer == dst_layer:
        return True
    for entry in MAY_USE[src_layer]:
        name, _, scope = entry.partition(":")
        if name == dst_layer and (scope != "public" or is_public(dst_rel)):
            return True
    return False


def why_not(src_layer, dst_layer):
    if any(e == dst_layer + ":public" for e in MAY_USE[src_layer]):
        return (f"layer {src_layer} may use only the public headers of "
                f"{dst_layer}")
    return f"layer {src_layer} may not depend on {dst_layer}"


def source_files(root):
    for top in SCANNED:
        base = os.path.join(root, top)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for f in sorted(filenames):
                if f.endswith(SOURCE_EXT):
                    yield os.path.relpath(os.path.join(dirpath, f), root)


PUBLIC_ONLY = ("public headers include only the standard library and ckpt/ "
               "headers")


def external_problem(rel, target):
    """Why `rel` may not include the non-project header <target>, or None."""
    if is_public(rel):
        if target == "mpi.h" and rel == "include/ckpt/mpi.h":
            return None  # ckpt::mpi's users compile against MPI anyway
        return None if target in STD_HEADERS else PUBLIC_ONLY
    for prefix, owners in THIRD_PARTY.items():
        if target.startswith(prefix) and not any(
                fnmatch.fnmatchcase(rel, p) for p in owners):
            who = ", ".join(owners) or "no file (only the generated header)"
            return f"only {who} may include {prefix}"
    return None


def include_problem(root, rel, src_layer, kind, target):
    """Why `rel` may not include `target`, or None when it may."""
    dst = resolve(root, rel, kind, target)
    if dst is None and target in ("ckpt_generated.h",
                                  "ckpt_manifest_generated.h"):
        dst = target  # generated at build time
    if dst is None:
        if kind == '"':
            return "no such file in the project"
        return external_problem(rel, target)
    dst_layer = layer_of(dst)
    if dst_layer is None:
        return f"{dst} has no layer in the table"
    if is_public(rel) and not is_public(dst):
        return PUBLIC_ONLY
    if not allowed(src_layer, dst_layer, dst):
        return why_not(src_layer, dst_layer)
    return None


def check(root):
    """Returns the list of problems, one printable line each."""
    problems = []
    for rel in source_files(root):
        src_layer = layer_of(rel)
        if src_layer is None:
            problems.append(f"{rel}: has no layer in the LAYERS table of "
                            "tests/include_graph/check_includes.py")
            continue
        with open(os.path.join(root, rel), encoding="utf-8",
                  errors="replace") as f:
            lines = f.read().splitlines()
        for lineno, line in enumerate(lines, 1):
            m = INCLUDE_RE.match(line)
            if m:
                kind, target = m.groups()
                why = include_problem(root, rel, src_layer, kind, target)
                if why:
                    problems.append(f"{rel}:{lineno} includes {target} "
                                    f"({why})")
    return problems


def self_test():
    """A small tree with one of each kind of problem, and a clean variant."""
    files = {
        "include/ckpt/status.h": "#include <string>\n",
        "include/ckpt/format.h": '#include "ckpt/status.h"\n',
        "include/ckpt/reader.h": "#include <ckpt/format.h>\n",
        "include/ckpt/writer.h": ("#include <ckpt/format.h>\n"
                                  "#include <vector>\n"),
        "lib/format_internal.h": "",
        "lib/source_internal.h": "#include <ckpt/status.h>\n",
        "lib/header_internal.h": ('#include "ckpt_generated.h"\n'
                                  '#include "source_internal.h"\n'),
        "lib/writer.cc": ('#include <ckpt/writer.h>\n'
                          '#include "header_internal.h"\n'),
        "lib/pth/convert.cc": '#include "source_internal.h"\n',
        "lib/cli/cli.h": "",
        "tools/ckpt/main.cc": ('#include "cli/cli.h"\n'
                               "#include <ckpt/writer.h>\n"),
    }
    broken = {
        # writer.cc includes reader.h: the sibling rule.
        "lib/writer.cc": files["lib/writer.cc"] + "#include <ckpt/reader.h>\n",
        # pth reaches into the header decoder.
        "lib/pth/convert.cc": '#include "header_internal.h"\n',
        # A low layer includes a high one (through the file's own directory).
        "lib/source_internal.h": '#include "format_internal.h"\n'
                                 '#include "cli/cli.h"\n',
        # A public header leaks a third-party type.
        "include/ckpt/reader.h": "#include <xxhash.h>\n",
        # A third-party header outside its owner.
        "lib/format_internal.h": "#include <boost/interprocess/sync.hpp>\n",
        # A file nobody placed in the table, and a missing include.
        "lib/stray.cc": '#include "no_such.h"\n',
        # An internal header reached with angle brackets, and the schema
        # from the importer.
        "lib/cli/cli.cc": "#include <header_internal.h>\n",
        "lib/pth/zip.cc": '#include "ckpt_generated.h"\n',
    }
    expected = [
        "lib/writer.cc:3 includes ckpt/reader.h "
        "(layer writer may not depend on reader)",
        "lib/pth/convert.cc:1 includes header_internal.h "
        "(layer pth may not depend on header)",
        "lib/source_internal.h:2 includes cli/cli.h "
        "(layer io may not depend on cli)",
        "include/ckpt/reader.h:1 includes xxhash.h (public headers include "
        "only the standard library and ckpt/ headers)",
        "lib/format_internal.h:1 includes boost/interprocess/sync.hpp "
        "(only lib/source.cc may include boost/)",
        "lib/stray.cc: has no layer",
        "lib/cli/cli.cc:1 includes header_internal.h "
        "(layer cli may not depend on header)",
        "lib/pth/zip.cc:1 includes ckpt_generated.h "
        "(layer pth may not depend on schema)",
    ]

    def write(root, tree):
        for rel, text in tree.items():
            path = os.path.join(root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)

    ok = True
    with tempfile.TemporaryDirectory() as clean:
        write(clean, files)
        got = check(clean)
        if got:
            ok = False
            print("self-test: the clean tree reports problems:", *got,
                  sep="\n  ")
    with tempfile.TemporaryDirectory() as bad:
        write(bad, {**files, **broken})
        got = check(bad)
        for want in expected:
            if not any(line.startswith(want) for line in got):
                ok = False
                print(f"self-test: not reported: {want}")
        extra = [line for line in got
                 if not any(line.startswith(w) for w in expected)]
        # The stray file's include is not read (it has no layer), so every
        # problem is one of the expected ones.
        if extra:
            ok = False
            print("self-test: unexpected:", *extra, sep="\n  ")
    print("include graph self-test:", "ok" if ok else "FAILED")
    return 0 if ok else 1


def main(argv):
    if len(argv) > 1 and argv[1] == "--self-test":
        return self_test()
    root = argv[1] if len(argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..")
    root = os.path.abspath(root)
    problems = check(root)
    for p in problems:
        print(p)
    if problems:
        print(f"include graph: {len(problems)} problem(s); the layers and "
              "what each may use are the tables at the top of "
              "tests/include_graph/check_includes.py")
        return 1
    print("include graph: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
