"""Training script run by the DDP test, once alone and once under torchrun with 2 processes."""

import sys

import torch
from torch import nn

from proxnets.data import load_dataset
from proxnets.engine import TrainConfig, fit

run_dir = sys.argv[1]
ds = load_dataset("digits", n_train=600, n_test=100)
torch.manual_seed(3)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, optimizer="sgd", log_every=1, progress=False, device="cpu")
fit(model, ds, cfg, run_dir=run_dir)
