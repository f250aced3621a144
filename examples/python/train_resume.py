"""Train, checkpoint every epoch, and resume after an interruption.

    python examples/python/train_resume.py --dir runs/demo --epochs 6
    python examples/python/train_resume.py --dir runs/demo --epochs 6 --stop-after 3
    (run again: it resumes at epoch 3 and ends exactly where an
     uninterrupted run ends)

The whole training state goes into one file per epoch: model, optimizer,
scheduler, epoch, loss history and every RNG. CheckpointManager keeps the
last two plus the best by validation loss, removing old files only after
the new one is safely on disk.
"""
import argparse
import os

import torch

import ckpt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--stop-after", type=int, default=None,
                    help="exit after this many epochs, as if the job were preempted")
    a = ap.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.epochs)
    history, start = [], 0

    mgr = ckpt.CheckpointManager(a.dir, keep_last=2, keep_best=1, metric="val_loss")
    state = mgr.load_latest()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = state["history"]
        ckpt.rng.set_state(state["rng"])
        start = state["epoch"] + 1
        print(f"resumed from {mgr.latest().path} at epoch {start}")

    for epoch in range(start, a.epochs):
        perm = torch.randperm(200)
        for i in range(0, 200, 20):
            idx = perm[i:i + 20]
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            val = torch.nn.functional.mse_loss(model(x[200:]), y[200:]).item()
        history.append(val)
        mgr.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                  "scheduler": sched.state_dict(), "epoch": epoch, "history": history,
                  "rng": ckpt.rng.get_state()}, step=epoch, metrics={"val_loss": val})
        print(f"epoch {epoch}: val_loss {val:.5f}")
        if a.stop_after is not None and epoch + 1 >= a.stop_after:
            print("stopping early (simulated preemption)")
            return
    print("kept:", [os.path.basename(i.path) for i in mgr.list()],
          "| best:", mgr.best().step, "| final val_loss", f"{history[-1]:.5f}")


if __name__ == "__main__":
    main()
