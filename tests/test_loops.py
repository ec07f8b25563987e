"""ghlc inside the training loops people already use: PyTorch Lightning, the Hugging Face
Trainer and Accelerate. Each checks that the gradient the optimiser sees is GHL's on the
step's whole batch (accumulation included), and that clipping leaves the plastic gradients
as the rule made them. Each loop's tests skip when its package is absent."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ghlc
from ghlc.runtime.clip import RescaledGradientWarning
from ghlc.runtime.status import STATUS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N, MICRO, LR = 8, 4, 0.1  # 8 samples per optimiser step: two micro-batches of 4


def net() -> nn.Module:
    torch.manual_seed(0)  # no BatchNorm: H and G of the step then sum over its samples
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, 8, 8, generator=g), torch.randint(0, 3, (N,), generator=g)


def expected_grads() -> dict[str, torch.Tensor]:
    """GHL's gradients on the union batch, by one backward pass outside any loop."""
    x, y = data()
    m = ghlc.prepare(net(), (x[:1],))
    F.cross_entropy(m(x), y).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def check(got: dict[str, torch.Tensor], prefix: str = "") -> None:
    want = expected_grads()
    for n, g in want.items():
        assert torch.allclose(got[prefix + n], g, rtol=1e-4, atol=1e-6), n
    assert got[prefix + "0.weight"].abs().max() == 1  # plastic: |H_n| * sign(G)


@pytest.fixture(autouse=True)
def _fresh_warning():
    STATUS.rescale_warned = False
    yield
    STATUS.rescale_warned = False


# ---- PyTorch Lightning --------------------------------------------------------------------
def _lightning_fit(clip: float | None) -> tuple[dict, dict, dict]:
    L = pytest.importorskip("lightning")
    from examples.lightning_module import GHLModule

    seen: dict[str, torch.Tensor] = {}

    class Recorded(GHLModule):
        def on_before_optimizer_step(self, optimizer):
            seen.update({n: p.grad.clone() for n, p in self.named_parameters()})

    x, y = data()
    mod = Recorded(net(), x[:1], lr=LR)
    before = {n: p.detach().clone() for n, p in mod.named_parameters()}
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=MICRO)
    trainer = L.Trainer(
        max_steps=1,
        accumulate_grad_batches=2,
        gradient_clip_val=clip,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", RescaledGradientWarning)
        trainer.fit(mod, loader)
    after = {n: p.detach().clone() for n, p in mod.named_parameters()}
    return seen, before, after


def test_lightning_optimiser_sees_the_ghl_gradient_with_accumulation():
    seen, before, after = _lightning_fit(clip=None)
    check(seen, "net.")
    for n in seen:  # plain SGD: the step is -lr times what on_before_optimizer_step saw
        assert torch.allclose(after[n] - before[n], -LR * seen[n], atol=1e-6), n


def test_lightning_gradient_clipping_clips_the_backprop_gradients_only():
    seen, before, after = _lightning_fit(clip=0.05)
    check(seen, "net.")  # (on_before_optimizer_step runs before Lightning clips)
    step = {n: (before[n] - after[n]) / LR for n in seen}
    assert torch.allclose(step["net.0.weight"], seen["net.0.weight"], atol=1e-6)
    plain = ["net.0.bias", "net.3.weight", "net.3.bias"]
    norm = torch.linalg.vector_norm(torch.cat([seen[n].flatten() for n in plain]))
    assert norm > 0.05
    for n in plain:
        assert torch.allclose(step[n], seen[n] * 0.05 / norm, rtol=1e-3, atol=1e-7), n


# ---- Hugging Face Trainer -----------------------------------------------------------------
class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        x, _ = data()
        self.net = ghlc.prepare(net(), (x[:1],))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def _hf_fit(tmp_path: Path, max_grad_norm: float, callbacks: list) -> dict:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    seen: dict[str, torch.Tensor] = {}

    class Record(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            seen.update({n: p.grad.clone() for n, p in model.named_parameters()})

    x, y = data()
    ds = [{"x": x[i], "labels": y[i]} for i in range(N)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        optim="sgd",
        weight_decay=0.0,
        max_grad_norm=max_grad_norm,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    model = _Classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", RescaledGradientWarning)
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=ds, callbacks=[*callbacks, Record()]
        )
        trainer.train()
    return seen


def test_hf_trainer_optimiser_sees_the_ghl_gradient_with_accumulation(tmp_path):
    check(_hf_fit(tmp_path, max_grad_norm=0.0, callbacks=[]), "net.")


def test_hf_trainer_max_grad_norm_is_warned_and_the_callback_clips_backprop_only(tmp_path):
    with pytest.raises(RescaledGradientWarning):
        _hf_fit(tmp_path, max_grad_norm=0.05, callbacks=[])
    STATUS.rescale_warned = False
    from ghlc.integrations.transformers import ClipBackpropGradients

    seen = _hf_fit(tmp_path, max_grad_norm=0.0, callbacks=[ClipBackpropGradients(0.05)])
    want = expected_grads()
    assert torch.allclose(seen["net.0.weight"], want["0.weight"], atol=1e-6)
    plain = ["0.bias", "3.weight", "3.bias"]
    norm = torch.linalg.vector_norm(torch.cat([want[n].flatten() for n in plain]))
    for n in plain:
        assert torch.allclose(seen["net." + n], want[n] * 0.05 / norm, rtol=1e-3, atol=1e-7)


# ---- Accelerate ---------------------------------------------------------------------------
def test_accelerate_accumulate_context_gives_the_ghl_gradient():
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    x, y = data()
    model = ghlc.prepare(net(), (x[:1],))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model, opt = acc.prepare(model, opt)
    seen: dict[str, torch.Tensor] = {}
    inner = opt.optimizer if hasattr(opt, "optimizer") else opt
    inner.register_step_pre_hook(
        lambda o, a, k: seen.update({n: p.grad.clone() for n, p in model.named_parameters()})
    )
    before = copy.deepcopy({n: p.detach() for n, p in model.named_parameters()})
    for i in range(2):
        with acc.accumulate(model):
            loss = F.cross_entropy(model(x[i * MICRO : (i + 1) * MICRO]), y[i * MICRO :][:MICRO])
            acc.backward(loss)
            if acc.sync_gradients:
                ghlc.clip_grad_norm_(model, 1e9)
            opt.step()
            opt.zero_grad()
    check(seen)
    for n, p in model.named_parameters():
        assert torch.allclose(p.detach() - before[n], -LR * seen[n], atol=1e-6), n


@pytest.mark.slow
def test_lightning_ddp_on_two_cpu_processes_gives_the_union_batch_gradient(tmp_path):
    pytest.importorskip("lightning")
    import os
    import subprocess

    case = Path(__file__).resolve().parent / "lightning_ddp_case.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, str(case), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for rank in (0, 1):  # each process's 4 samples: DistributedSampler's 0,2,4,6 and 1,3,5,7
        check(torch.load(tmp_path / f"rank{rank}.pt"), "net.")
