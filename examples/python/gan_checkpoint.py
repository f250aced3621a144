"""A GAN checkpoint: two models, two optimizers and the run's bookkeeping in
one file, reloaded and checked tensor by tensor.

    python examples/python/gan_checkpoint.py [--dir DIR]
"""
import argparse
import os
import tempfile

import torch

import ckpt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    d = a.dir or tempfile.mkdtemp(prefix="ckpt-example-")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "gan.ckpt")

    torch.manual_seed(0)
    G = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                            torch.nn.Linear(64, 32), torch.nn.Tanh())
    D = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LeakyReLU(0.2), torch.nn.Linear(64, 1))
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    real = torch.randn(128, 32)
    losses = {"g": [], "d": []}
    for _ in range(5):
        fake = G(torch.randn(128, 16))
        d_loss = bce(D(real), torch.ones(128, 1)) + bce(D(fake.detach()), torch.zeros(128, 1))
        opt_d.zero_grad(); d_loss.backward(); opt_d.step()
        g_loss = bce(D(fake), torch.ones(128, 1))
        opt_g.zero_grad(); g_loss.backward(); opt_g.step()
        losses["g"].append(g_loss.item()); losses["d"].append(d_loss.item())

    state = {"G": G.state_dict(), "D": D.state_dict(), "opt_G": opt_g.state_dict(),
             "opt_D": opt_d.state_dict(), "step": 5, "losses": losses,
             "fixed_noise": torch.randn(64, 16), "rng": ckpt.rng.get_state()}
    ckpt.save(state, path)

    back = ckpt.load(path)
    n = 0
    for key, t in ckpt.flatten(state).items():
        u = ckpt.flatten(back)[key]
        assert t.dtype == u.dtype and t.shape == u.shape and torch.equal(t, u), key
        n += 1
    assert back["losses"] == losses and back["step"] == 5
    assert list(back["opt_G"]["state"]) == list(range(len(list(G.parameters()))))
    G2 = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                             torch.nn.Linear(64, 32), torch.nn.Tanh())
    G2.load_state_dict(back["G"])
    with ckpt.open(path) as f:
        print(f"{os.path.basename(path)}: {len(f)} tensors, e.g. {f.keys()[:3]}")
    print(f"round trip: {n} tensors and every value identical; generator restored")


if __name__ == "__main__":
    main()
