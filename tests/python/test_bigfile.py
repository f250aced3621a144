"""Files larger than RAM + swap: ckpt.open and ckpt.load(mmap=True) of a
sparse 64 GiB file (issue 10, item 5). Before, both failed with "cannot
map: Cannot allocate memory" on a 24 GiB machine without swap: the whole
file was mapped private and writable."""
import os
import subprocess
import unittest

import ckpt
from util import TempDirCase, build_dir

GIB = 1 << 30


class BigFile(TempDirCase):
    def setUp(self):
        super().setUp()
        tool = os.path.join(build_dir(), "tests", "make_fixture")
        if not os.path.exists(tool):
            self.skipTest(f"{tool} not built")
        self.file = self.path("big.ckpt")
        # One 32 GiB tensor and 32 of 1 GiB over holes: 64 GiB, nothing on disk.
        subprocess.run([tool, "sparse", self.file, "32"] + ["1"] * 32, check=True)
        self.assertGreater(os.path.getsize(self.file), 64 * GIB)
        self.assertLess(os.stat(self.file).st_blocks * 512, 16 << 20)

    def test_open_reads_and_writes_privately(self):
        with ckpt.open(self.file) as f:
            self.assertEqual(len(f), 33)
            big = f["t0"]
            self.assertEqual(big.numel() * 4, 32 * GIB)
            self.assertEqual(float(big[-1]), 0.0)
            small = f.get_slice("t5")[10:20]
            self.assertEqual(small.shape, (10,))
            # Views are writable and private: nothing reaches the file.
            big[123] = 7.0
            self.assertEqual(float(f["t0"][123]), 7.0)  # same pages again
        with ckpt.open(self.file) as g:
            self.assertEqual(float(g["t0"][123]), 0.0)

    def test_load_mmap_maps_everything(self):
        state = ckpt.load(self.file, mmap=True)
        self.assertEqual(len(state), 33)
        self.assertEqual(sum(t.numel() * 4 for t in state.values()), 64 * GIB)
        state["t7"][0] = 1.0
        self.assertEqual(float(state["t7"][0]), 1.0)
        self.assertEqual(float(ckpt.load(self.file, mmap=True)["t7"][0]), 0.0)


if __name__ == "__main__":
    unittest.main()
