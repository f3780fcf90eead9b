"""Training run killed with SIGKILL by test_kill9.py: ``kill9_train.py RUN_DIR [--resume]``."""

import sys

import torch
from torch import nn

from proxnets.data import load_dataset
from proxnets.engine import TrainConfig, fit

ds = load_dataset("digits", n_train=800, n_test=100)
torch.manual_seed(3)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
cfg = TrainConfig(epochs=20, batch_size=50, lr=0.05, optimizer="sgd", log_every=1, progress=False, device="cpu",
                  checkpoint_every=1, schedule="cosine")
fit(model, ds, cfg, run_dir=sys.argv[1], resume="--resume" in sys.argv, log=lambda m: None)
