"""A small Lightning run (shuffled data, dropout, Adam, StepLR) that
checkpoints every epoch through ckpt.lightning.CkptCheckpointIO and resumes
from ckpt_path="last" when started again. tests/python/test_lightning.py
kills it with SIGKILL at random moments and requires the end state to be
bit-identical to an uninterrupted run.

    python lightning_train.py DIR EPOCHS OUT [RANKS]

With RANKS > 1: DDP on that many CPU processes (gloo), each rank seeded
apart (seed + rank), so that each draws its own dropout masks and only a
per-rank restore of the generators resumes bit-identically.

Prints START, SAVE_BEGIN n / SAVE_END n around each save and DONE.
"""
import os
import sys
import warnings

import torch

import ckpt
from ckpt.lightning import CkptCheckpointIO, RngState

warnings.filterwarnings("ignore")
import lightning as L  # noqa: E402


class Noisy(L.LightningModule):
    def __init__(self, lr=1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(64, 1))
        # Checkpoint ballast, so that a kill can land inside a save.
        self.register_buffer("ballast", torch.zeros(2 << 20))

    def on_train_start(self):
        # DDP reseeds every rank alike (seed_everything's seed) in its
        # setup; a fresh run then seeds each apart (restored runs keep
        # their restored generators: global_step > 0).
        if self.trainer.world_size > 1 and self.trainer.global_step == 0:
            torch.manual_seed(100 + self.global_rank)

    def training_step(self, batch, i):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)]


class Announced(CkptCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        print(f"SAVE_BEGIN {checkpoint['epoch']}", flush=True)
        super().save_checkpoint(checkpoint, path, storage_options)
        print(f"SAVE_END {checkpoint['epoch']}", flush=True)


def main(directory, epochs, out, ranks=1):
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g)
    y = x[:, :3].sum(1, keepdim=True)
    data = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
    val = torch.utils.data.DataLoader(data, batch_size=64)
    ddp = dict(devices=ranks, strategy="ddp", num_nodes=1) if ranks > 1 else dict(devices=1)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, **ddp,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        plugins=[Announced()],
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=directory, save_top_k=2,
                                                       monitor="val_loss", save_last=True),
                   RngState()])
    print("START", flush=True)
    model = Noisy()
    trainer.fit(model, train, val, ckpt_path="last")
    if trainer.global_rank != 0:
        return
    opt = trainer.optimizers[0]
    ckpt.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
               "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
               "epoch": trainer.current_epoch, "global_step": trainer.global_step}, out)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3],
         int(sys.argv[4]) if len(sys.argv) > 4 else 1)
    sys.stdout.flush()
    os._exit(0)
