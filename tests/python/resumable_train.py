"""A small deterministic training run that checkpoints every epoch with
ckpt.CheckpointManager and resumes from the latest checkpoint when started
again. tests/python/test_training.py kills it with SIGKILL at random
moments and requires the result to be bit-identical to an uninterrupted run.

    python resumable_train.py DIR EPOCHS OUT

Prints SAVE_BEGIN n / SAVE_END n around each save and DONE at the end.
"""
import random
import sys

import numpy as np
import torch

import ckpt


def main(directory, epochs, out):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 32, generator=g)
    y = (x[:, :4].sum(1, keepdim=True) > 0).float()
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    # Checkpoint ballast (think of a replay buffer): makes each save long
    # enough that a kill can land in the middle of it.
    buffer = torch.randn(4 << 20, generator=g)
    losses, start = [], 0

    mgr = ckpt.CheckpointManager(directory, keep_last=2)
    state = mgr.load_latest()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        losses = state["losses"]
        buffer = state["buffer"]
        ckpt.rng.set_state(state["rng"])
        start = state["epoch"] + 1
        print(f"RESUMED {start}", flush=True)

    print(f"START {start}", flush=True)
    for epoch in range(start, epochs):
        model.train()
        total = 0.0
        perm = torch.randperm(len(x))  # the global torch RNG
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            # numpy and python RNGs take part too (augmentation noise).
            noise = torch.from_numpy(np.random.normal(0, 0.01, (len(idx), 32)).astype(np.float32))
            xb = x[idx] + noise * random.random()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        sched.step()
        losses.append(total)
        print(f"SAVE_BEGIN {epoch}", flush=True)
        mgr.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                  "scheduler": sched.state_dict(), "epoch": epoch, "losses": losses,
                  "buffer": buffer, "rng": ckpt.rng.get_state()},
                 step=epoch, metrics={"loss": total})
        print(f"SAVE_END {epoch}", flush=True)

    ckpt.save({"model": model.state_dict(), "losses": losses}, out)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
