"""A long DDP training run for the fault tests: writes its pid to <run_dir>.pid.<rank>, then trains."""

import os
import sys
from pathlib import Path

import torch
from torch import nn

from proxnets.data import load_dataset
from proxnets.engine import TrainConfig, fit

run_dir, timeout = sys.argv[1], float(sys.argv[2])
Path(f"{run_dir}.pid.{os.environ['RANK']}").write_text(str(os.getpid()))
ds = load_dataset("digits", n_train=600, n_test=100)
torch.manual_seed(3)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
cfg = TrainConfig(epochs=100_000, batch_size=64, lr=0.05, optimizer="sgd", log_every=1, progress=False, device="cpu",
                  ddp_timeout=timeout, eval_every_epoch=False)
fit(model, ds, cfg, run_dir=run_dir)
