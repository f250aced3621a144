"""Seeds for tests/fuzz/dcp_fuzz.cc from make_dcp.py's output.

fuzz_seeds.py FIXTURES OUT: one file per fixture directory, in the fuzz
target's input form: a 4-byte little-endian length, that many bytes of
.metadata, then __0_0.distcp (absent for the hostile .metadata files).
Plain Python, no torch needed.
"""
import os
import struct
import sys


def main():
    fx, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    dirs = ["single", "single_st", "ranks2", "ranks2_st", "proto2",
            "enum_by_value"]
    dirs += ["variants/" + v for v in sorted(os.listdir(os.path.join(fx, "variants")))
             if os.path.isdir(os.path.join(fx, "variants", v))]
    n = 0
    for name in dirs:
        d = os.path.join(fx, name)
        with open(os.path.join(d, ".metadata"), "rb") as f:
            md = f.read()
        item = os.path.join(d, "__0_0.distcp")
        data = open(item, "rb").read() if os.path.exists(item) else b""
        with open(os.path.join(out, name.replace("/", "_")), "wb") as f:
            f.write(struct.pack("<I", len(md)) + md + data)
        n += 1
    h = os.path.join(fx, "hostile")
    for name in sorted(os.listdir(h)):
        if name.endswith(".metadata"):
            with open(os.path.join(h, name), "rb") as f:
                md = f.read()
            with open(os.path.join(out, "hostile_" + name), "wb") as f:
                f.write(struct.pack("<I", len(md)) + md)
            n += 1
    print(f"fuzz_seeds: {n} seeds in {out}")


if __name__ == "__main__":
    main()
