"""ckpt.hf against PyPI's transformers and accelerate: tiny models built
from a config in the test (nothing downloaded) round-trip through the
save_pretrained layouts (model.safetensors, its shards and index, legacy
pytorch_model.bin and its shards) into ckpt and back, and their logits
stay equal bit for bit, loaded by ckpt.hf.load_into, transformers'
from_pretrained and accelerate's load_checkpoint_in_model. Hostile
directories are refused by name. Skipped, visibly, without transformers
(scripts/install_deps.sh installs it into .venv-torch2)."""
import json
import os
import pickle
import subprocess
import sys
import unittest

import torch

import ckpt
from util import TempDirCase, build_dir, python_env

try:
    import accelerate  # noqa: F401
    import transformers  # noqa: F401
    HAVE = True
except Exception:  # noqa: BLE001 - any failure to import is a skip
    HAVE = False


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def gpt2():  # tied embeddings: save_pretrained stores lm_head once
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(1)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def logits(model):
    with torch.no_grad():
        return model(torch.arange(12).reshape(1, 12)).logits


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ckpt", *args], env=python_env(),
                          capture_output=True, text=True, timeout=300)


@unittest.skipUnless(HAVE, "transformers/accelerate not installed (scripts/install_deps.sh "
                     "puts them in .venv-torch2)")
class HuggingFaceTest(TempDirCase):
    def empty(self, model):
        from accelerate import init_empty_weights
        with init_empty_weights():
            return type(model)(model.config)

    def test_every_save_pretrained_layout_imports_and_loads_equal(self):
        import ckpt.hf
        for make in (llama, gpt2):
            m = make()
            want = logits(m)
            layouts = {
                "single": dict(),
                "shards": dict(max_shard_size="20KB"),
            }
            for name, kw in layouts.items():
                with self.subTest(model=make.__name__, layout=name):
                    d = self.path(f"{make.__name__}-{name}")
                    m.save_pretrained(d, **kw)
                    out = self.path(f"{make.__name__}-{name}.ckpt")
                    r = cli("import", d, out)  # the shell command
                    self.assertEqual(r.returncode, 0, r.stderr)
                    self.assertRegex(r.stdout, r": \d+ tensors, .* from \d+ safetensors files? "
                                     r"\(Hugging Face save_pretrained\)")
                    got = ckpt.hf.load_into(self.empty(m), out).eval()
                    self.assertTrue(torch.equal(logits(got), want))
                    self.assertEqual(json.loads(ckpt.open(out).metadata[ckpt.hf.CONFIG_KEY]),
                                     json.loads(open(os.path.join(d, "config.json")).read()))
                    # transformers itself, from the ckpt's state dict.
                    t = type(m).from_pretrained(None, config=m.config,
                                                state_dict=ckpt.load(out, mmap=True)).eval()
                    self.assertTrue(torch.equal(logits(t), want))

    def test_legacy_pytorch_model_bin_and_its_shards(self):
        import ckpt.hf
        m = llama()
        want, sd = logits(m), m.state_dict()
        one = self.path("bin")
        os.makedirs(one)
        m.config.save_pretrained(one)
        torch.save(sd, os.path.join(one, "pytorch_model.bin"))
        shards = self.path("bin-shards")
        os.makedirs(shards)
        m.config.save_pretrained(shards)
        names = sorted(sd)
        half = len(names) // 2
        wm = {}
        for i, part in enumerate((names[:half], names[half:])):
            f = f"pytorch_model-{i + 1:05d}-of-00002.bin"
            torch.save({k: sd[k] for k in part}, os.path.join(shards, f))
            wm.update({k: f for k in part})
        with open(os.path.join(shards, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": wm}, f)
        for d in (one, shards):
            out = d + ".ckpt"
            self.assertEqual(ckpt.hf.import_pretrained(d, out), len(sd))
            got = ckpt.hf.load_into(self.empty(m), out).eval()
            self.assertTrue(torch.equal(logits(got), want), d)

    def test_export_loads_in_transformers_and_accelerate(self):
        import ckpt.hf
        from accelerate.utils import load_checkpoint_in_model
        for make in (llama, gpt2):
            m = make()
            want = logits(m)
            d = self.path(f"{make.__name__}-src")
            m.save_pretrained(d)
            src = self.path(f"{make.__name__}.ckpt")
            ckpt.hf.import_pretrained(d, src)
            for shard in ("5GB", "30KB"):
                with self.subTest(model=make.__name__, max_shard_size=shard):
                    out = self.path(f"{make.__name__}-out-{shard}")
                    r = cli("export-hf", src, out, "--max-shard-size", shard)
                    self.assertEqual(r.returncode, 0, r.stderr)
                    files = sorted(os.listdir(out))
                    if shard == "30KB":
                        self.assertIn("model.safetensors.index.json", files)
                        self.assertGreater(len(files), 3)
                    else:
                        self.assertIn("model.safetensors", files)
                    self.assertEqual([n for n in files if ".tmp-" in n], [])
                    t = type(m).from_pretrained(out).eval()
                    self.assertTrue(torch.equal(logits(t), want))
                    a = self.empty(m)
                    target = out if shard == "30KB" else os.path.join(out, "model.safetensors")
                    # (device_map=None takes torch's set_model_state_dict, which
                    # wants a process group for a model on the meta device.)
                    load_checkpoint_in_model(a, target, device_map={"": "cpu"})
                    a.tie_weights()
                    self.assertTrue(torch.equal(logits(a.eval()), want))

    def test_export_over_an_earlier_export_serves_the_new_weights(self):
        # transformers reads model.safetensors before an index: an export
        # that left an earlier one behind would load the old weights.
        import ckpt.hf
        a, b = llama(), llama()
        with torch.no_grad():
            for p in b.parameters():
                p.add_(1.0)
        want_a, want_b = logits(a), logits(b)
        files = {}
        for name, m in (("a", a), ("b", b)):
            d = self.path(f"src-{name}")
            m.save_pretrained(d)
            files[name] = self.path(f"{name}.ckpt")
            ckpt.hf.import_pretrained(d, files[name])
        out = self.path("served")
        os.makedirs(out)
        with open(os.path.join(out, "tokenizer.json"), "w") as f:
            f.write("{}")
        steps = [("a", "30KB", want_a), ("b", "5GB", want_b), ("a", "30KB", want_a),
                 ("b", "40KB", want_b)]
        for name, shard, want in steps:
            with self.subTest(export=name, max_shard_size=shard):
                ckpt.hf.export_pretrained(files[name], out, max_shard_size=shard)
                names = set(os.listdir(out))
                self.assertIn("tokenizer.json", names)  # the user's file stays
                if shard == "5GB":
                    self.assertEqual({n for n in names if "safetensors" in n},
                                     {"model.safetensors"})
                else:
                    self.assertNotIn("model.safetensors", names)
                    wm = json.load(open(os.path.join(out, "model.safetensors.index.json")))
                    self.assertEqual({n for n in names if n.endswith(".safetensors")},
                                     set(wm["weight_map"].values()))
                t = type(a).from_pretrained(out).eval()
                self.assertTrue(torch.equal(logits(t), want))

    def test_load_into_strict_refuses_a_file_that_lacks_weights(self):
        # On a real (not meta) model a missing weight stays at its init:
        # strict=True must say so, not return a half-loaded model.
        import ckpt.hf
        m = llama()
        sd = m.state_dict()
        dropped = "model.layers.1.mlp.down_proj.weight"
        part = {k: v for k, v in sd.items() if k != dropped}
        p = self.path("part.ckpt")
        ckpt.save(part, p, sync=False)
        with self.assertRaises(ckpt.InvalidArgumentError) as cm:
            ckpt.hf.load_into(llama(), p)
        self.assertIn(dropped, str(cm.exception))
        ckpt.hf.load_into(llama(), p, strict=False)  # asked for: allowed
        # Tied weights the file stores once are not missing (gpt2's lm_head).
        g = gpt2()
        gsd = {k: v for k, v in g.state_dict().items() if k != "lm_head.weight"}
        gp = self.path("gpt2.ckpt")
        ckpt.save(gsd, gp, sync=False)
        got = ckpt.hf.load_into(gpt2(), gp).eval()
        self.assertTrue(torch.equal(logits(got), logits(g)))

    def test_the_ckpt_executable_imports_and_exports_without_python(self):
        exe = os.path.join(build_dir(), "ckpt") if build_dir() else ""
        if not os.path.exists(exe):
            self.skipTest("CKPT_BUILD_DIR does not hold the ckpt executable")
        m = gpt2()
        d = self.path("src")
        m.save_pretrained(d, max_shard_size="30KB")
        out = self.path("m.ckpt")
        r = subprocess.run([exe, "import", d, out], capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        e = self.path("exported")
        r = subprocess.run([exe, "export-hf", out, e, "--max-shard-size", "50KB"],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        t = type(m).from_pretrained(e).eval()
        self.assertTrue(torch.equal(logits(t), logits(m)))
        # The safetensors package reads every file it wrote.
        from safetensors import safe_open
        for n in os.listdir(e):
            if n.endswith(".safetensors"):
                with safe_open(os.path.join(e, n), framework="pt") as f:
                    self.assertGreater(len(list(f.keys())), 0)
        r = subprocess.run([exe, "export-hf", out, e, "--max-shard-size", "lots"],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 2)
        self.assertIn("size 'lots'", r.stderr)

    def test_hostile_directories_are_refused_by_name(self):
        import ckpt.hf
        m = llama()
        d = self.path("shards")
        m.save_pretrained(d, max_shard_size="20KB")
        index = os.path.join(d, "model.safetensors.index.json")
        doc = json.load(open(index))

        def with_index(weight_map):
            bad = self.path(f"bad{len(os.listdir(self.dir))}")
            os.makedirs(bad)
            for n in os.listdir(d):
                if n.endswith(".safetensors"):
                    os.link(os.path.join(d, n), os.path.join(bad, n))
            with open(os.path.join(bad, "model.safetensors.index.json"), "w") as f:
                json.dump({"weight_map": weight_map}, f)
            return bad
        wm = doc["weight_map"]
        first = next(iter(wm))
        cases = {
            "outside": ({**wm, first: "../model.safetensors"}, "not a file in"),
            "ghost": ({**wm, "ghost.weight": wm[first]}, "names tensor 'ghost.weight', which"),
            "moved": ({**wm, first: next(f for f in sorted(set(wm.values()))
                                         if f != wm[first])}, "places in"),
        }
        for name, (weight_map, says) in cases.items():
            with self.subTest(name):
                with self.assertRaises(ckpt.CkptError) as cm:
                    ckpt.hf.import_pretrained(with_index(weight_map), self.path(name + ".ckpt"))
                self.assertIn(says, str(cm.exception))
                self.assertFalse(os.path.exists(self.path(name + ".ckpt")))
        # A pytorch_model.bin that would run code when unpickled: refused,
        # nothing runs.
        evil = self.path("evil")
        os.makedirs(evil)
        marker = self.path("ran")

        class Boom:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))
        torch.save({"w": torch.ones(2), "x": Boom()}, os.path.join(evil, "pytorch_model.bin"),
                   pickle_protocol=pickle.HIGHEST_PROTOCOL)
        with self.assertRaises(ckpt.PickleRefusedError):
            ckpt.hf.import_pretrained(evil, self.path("evil.ckpt"))
        self.assertFalse(os.path.exists(marker))
        r = cli("import", evil, self.path("evil2.ckpt"))
        self.assertEqual(r.returncode, 1)
        self.assertIn("forbidden global 'posix system'", r.stderr)
        self.assertFalse(os.path.exists(marker))
        with self.assertRaises(ckpt.NotFoundError):
            ckpt.hf.import_pretrained(self.dir, self.path("none.ckpt"))
        # A FIFO where a shard or config.json should be: named, never
        # opened (a read would block for ever).
        for victim in ("model-00001-of-00006.safetensors", "config.json"):
            with self.subTest(fifo=victim):
                f = self.path(f"fifo-{victim}")
                os.makedirs(f)
                for n in os.listdir(d):
                    if n != victim:
                        os.link(os.path.join(d, n), os.path.join(f, n))
                os.mkfifo(os.path.join(f, victim))
                with self.assertRaises(ckpt.CkptError) as cm:
                    ckpt.hf.state_dict(f)
                self.assertIn("not a regular file", str(cm.exception))
                with self.assertRaises(ckpt.CkptError) as cm:
                    ckpt.hf.import_pretrained(f, self.path("fifo.ckpt"))
                self.assertIn("not a regular file", str(cm.exception))
