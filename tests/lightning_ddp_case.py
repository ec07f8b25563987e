"""Run by tests/test_loops.py: one Lightning step on 2 CPU processes with GHLDDPStrategy;
each process saves the gradients on_before_optimizer_step saw to OUT/rank{N}.pt."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_loops import MICRO, data, net  # noqa: E402

from examples.lightning_module import GHLModule  # noqa: E402
from ghlc.integrations.lightning import GHLDDPStrategy  # noqa: E402


class Recorded(GHLModule):
    def on_before_optimizer_step(self, optimizer):
        grads = {n: p.grad.clone() for n, p in self.named_parameters()}
        torch.save(grads, Path(sys.argv[1]) / f"rank{self.global_rank}.pt")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=MICRO)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=2,
        strategy=GHLDDPStrategy(process_group_backend="gloo"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Recorded(net(), x[:1], lr=0.1), loader)
