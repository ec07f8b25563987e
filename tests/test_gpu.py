"""CUDA: the same rule on GPU tensors, checked against the CPU float64 oracle; the CUDA-graph
step against the eager step. Skipped without a CUDA device (run by bench/gpu_check.sh)."""

from __future__ import annotations

import copy
import itertools

import oracle
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo import ZOO

import ghlc

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
IDS = [e.name for e in ZOO]


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 would round convs/matmuls to 10 mantissa bits; check plain float32 here."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    target = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    return ((out - target) ** 2).mean()


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("at", ["auto", "forward", "backward"])
def test_cuda_grads_match_cpu_float64_oracle(name, at):
    check_cuda_step_against_oracle(name, at)


@pytest.mark.parametrize("name", ["resnet", "vit"], ids=["module-calls", "function-mode"])
def test_inductor_compiled_cuda_step_matches_cpu_float64_oracle(name):
    """``torch.compile`` (Inductor, Triton kernels) of a prepared model on CUDA: plastic calls
    are graph breaks, the code between them is generated; the same GHL gradients."""
    torch._dynamo.reset()
    check_cuda_step_against_oracle(name, "auto", compile_model=True)


def check_cuda_step_against_oracle(name: str, at: str, compile_model: bool = False) -> None:
    e = next(z for z in ZOO if z.name == name)
    model, x = e.make()
    plain = copy.deepcopy(model)
    names = list(e.plastic)
    h, g, _ = oracle.run_plain(plain, (x,), names, loss_fn)
    # backprop-only parameters: ghlc must leave them exactly as plain backprop on the same
    # device (float32 vs float64 alone differs by up to ~3e-3 for some BatchNorm weights)
    bp = copy.deepcopy(plain).cuda().train()
    bp.zero_grad(set_to_none=True)
    loss_fn(bp(x.cuda())).backward()
    bp_grads = {n: p.grad.detach().cpu().to(torch.float64) for n, p in bp.named_parameters()}
    cfg = ghlc.GHLConfig(**{**e.config_kwargs(), "hebbian_at": at})
    m = ghlc.prepare(model.cuda(), (x.cuda(),), config=cfg)
    m.train()
    f = torch.compile(m) if compile_model else m
    loss_fn(f(x.cuda())).backward()
    if compile_model:  # eval forwards are compiled whole: the eager model's outputs
        m.eval()
        with torch.no_grad():
            torch.testing.assert_close(f(x.cuda()), m(x.cuda()), rtol=1e-4, atol=1e-5)
        m.train()
    for n, p in m.named_parameters():
        got = p.grad.detach().cpu().to(torch.float64)
        if n not in h:
            err = (got - bp_grads[n]).norm() / bp_grads[n].norm().clamp_min(1e-30)
            tol = 1e-4 if compile_model else 1e-5  # generated kernels: own reduction order
            assert err <= tol, f"{name} {n}: rel err {err:.3g} to plain CUDA backprop"
            continue
        exp = oracle.expected_grad(h[n], g[n])
        # where G is within float32 rounding of 0 its sign is not determined by the inputs:
        # there the magnitude must match and either sign is right
        free = g[n].abs() <= 1e-5 * g[n].abs().max()  # (exact zeros agree: both give 0)
        err = (got.abs() - exp.abs()).norm() / exp.norm().clamp_min(1e-30)
        assert err <= 1e-4, f"{name} {n}: magnitude rel err {err:.3g}"
        fixed = ~free & (exp.abs() > 1e-3 * exp.abs().max())
        assert torch.equal(torch.sign(got[fixed]), torch.sign(exp[fixed])), f"{name} {n}"


def two_steps_against_oracle(
    name: str, memory_format=None, oracle_rule=None, **cfg
) -> torch.nn.Module:
    """Two CUDA steps at lr 0 of a zoo model (config overrides ``cfg``; ``memory_format``:
    the model and input in that layout), every plastic gradient against the CPU float64
    oracle (``oracle_rule``: its rule settings, if any); returns the prepared model."""
    e = next(z for z in ZOO if z.name == name)
    model, x = e.make()
    if memory_format is not None:
        model, x = model.to(memory_format=memory_format), x.contiguous(memory_format=memory_format)
    names = list(e.plastic)
    h, g, _ = oracle.run_plain(copy.deepcopy(model), (x,), names, loss_fn, rule=oracle_rule)
    m = ghlc.prepare(
        model.cuda(), (x.cuda(),), config=ghlc.GHLConfig(**{**e.config_kwargs(), **cfg})
    ).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    norm = cfg.get("normalisation", "layer")
    for _ in range(2):
        opt.zero_grad()
        loss_fn(m(x.cuda())).backward()
        for n in names:
            got = m.get_parameter(n).grad.detach().cpu().to(torch.float64)
            exp = oracle.expected_grad(h[n], g[n], normalisation=norm)
            err = (got.abs() - exp.abs()).norm() / exp.norm().clamp_min(1e-30)
            assert err <= 1e-4, f"{name} {n}: magnitude rel err {err:.3g}"
            free = g[n].abs() <= 1e-5 * g[n].abs().max()
            fixed = ~free & (exp.abs() > 1e-3 * exp.abs().max())
            assert torch.equal(torch.sign(got[fixed]), torch.sign(exp[fixed])), f"{name} {n}"
    return m


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16, affine=False)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn1(self.c1(x))), 2)
        h = F.relu(self.c2(h))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize(
    ("sample", "over", "stack"),
    [
        (1.0, "batch", False),
        (0.5, "batch", False),
        (0.25, "batch", False),
        (0.25, "positions", False),
        (1.0, "batch", True),
    ],
)
def test_cuda_graph_step_equals_eager_steps(sample, over, stack, monkeypatch):
    """The captured step against eager steps; the sampled modes draw the last block of the
    batch or grid offset every time (patched), so that the graph's window, fixed at capture,
    is eager's too. (At 0.25 over the batch, c2 keeps a copy of its output's block instead of
    H: the block timing.)"""
    from ghlc.runtime import sampled

    monkeypatch.setattr(sampled, "draw", lambda n: n - 1)
    torch.manual_seed(0)
    base = Small().cuda()
    xs = [torch.randn(8, 3, 16, 16, device="cuda") for _ in range(3)]
    ys = [torch.randint(0, 10, (8,), device="cuda") for _ in range(3)]
    cfg = ghlc.GHLConfig(sample_fraction=sample, sample_over=over)
    eager = ghlc.prepare(copy.deepcopy(base), (xs[0][:2],), cfg).train()
    graphed = ghlc.prepare(copy.deepcopy(base), (xs[0][:2],), cfg).train()
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.05)
    step = ghlc.cuda_graph_step(
        graphed, opt_g, F.cross_entropy, (xs[0],), ys[0], stack_weight_grads=stack
    )
    for p, q in zip(eager.parameters(), graphed.parameters()):
        assert torch.equal(p, q)  # capturing did not train
    for x, y in zip(xs, ys):
        opt_e.zero_grad(set_to_none=True)
        loss_e = F.cross_entropy(eager(x), y)
        loss_e.backward()
        opt_e.step()
        loss_g = step(x, target=y)
        assert torch.allclose(loss_g, loss_e, rtol=1e-5, atol=1e-6)
        for (n, p), q in zip(eager.named_parameters(), graphed.parameters()):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), n
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), n


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_step_without_the_optimiser(amp):
    """optimizer_step=False: the graph holds forward, loss and backward, the optimiser steps
    eagerly after each replay; an eager step of another batch size in between does not
    detach the graph's gradients. Against eager steps (under the same autocast)."""
    torch.manual_seed(0)
    base = Small().cuda()
    xs = [torch.randn(8, 3, 16, 16, device="cuda") for _ in range(4)]
    ys = [torch.randint(0, 10, (8,), device="cuda") for _ in range(4)]
    xs[2], ys[2] = xs[2][:5], ys[2][:5]  # a smaller batch: eager in both runs
    eager = ghlc.prepare(copy.deepcopy(base), (xs[0][:2],)).train()
    graphed = ghlc.prepare(copy.deepcopy(base), (xs[0][:2],)).train()
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.05)
    step = ghlc.cuda_graph_step(
        graphed, opt_g, F.cross_entropy, (xs[0],), ys[0], optimizer_step=False, autocast=amp
    )

    def eager_step(m, opt, x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        return loss

    tol = {"rtol": 1e-5, "atol": 1e-6} if amp is None else {"rtol": 1e-3, "atol": 1e-4}
    for x, y in zip(xs, ys):
        loss_e = eager_step(eager, opt_e, x, y)
        if x.shape[0] == 8:
            loss_g = step(x, target=y)
            opt_g.step()
        else:
            loss_g = eager_step(graphed, opt_g, x, y)
        assert torch.allclose(loss_g, loss_e, **tol)
        for (n, p), q in zip(eager.named_parameters(), graphed.parameters()):
            assert torch.allclose(p, q, **tol), n


@pytest.mark.parametrize("method", ["bp", "ghl"])
def test_train_with_cuda_graph_matches_eager_training(tmp_path, method):
    """ghlc.train(cuda_graph=True) on CUDA against the eager loop: 61 samples in batches of
    16 (three replays and an eager batch of 13 per epoch), two epochs."""
    from ghlc.runtime import runtime_of
    from ghlc.train import train

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(61, 3, 16, 16, generator=g), torch.randint(0, 10, (61,), generator=g)
    runs = []
    for graph in (False, True):
        torch.manual_seed(0)
        m = Small()
        if method == "ghl":
            m = ghlc.prepare(m, (x[:2],))
        plastic = set(runtime_of(m).sites) if method == "ghl" else set()
        m = m.cuda()
        res = train(
            m,
            x,
            y,
            x[:16],
            y[:16],
            plastic=plastic,
            epochs=2,
            batch_size=16,
            out_dir=tmp_path / str(graph),
            progress=False,
            lr=0.05,
            lr_plastic=0.05,
            cuda_graph=graph,
        )
        runs.append((m, res))
    (m_e, r_e), (m_g, r_g) = runs
    for a, b in zip(r_e.history, r_g.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
    for (n, p), q in zip(m_e.named_parameters(), m_g.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), n


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.Conv2d(8, 16, 3, padding=1), (4, 8, 16, 16)),
        (nn.Conv2d(8, 16, 5, padding="same"), (4, 8, 15, 16)),
        (nn.Conv2d(8, 16, 3, stride=2, padding=1), (4, 8, 17, 16)),
        (nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=2), (4, 8, 16, 16)),
        (nn.Conv2d(8, 16, 7, stride=2, padding=3), (4, 8, 32, 32)),
        (nn.Conv1d(8, 16, 3, padding=1), (4, 8, 31)),
        (nn.Conv3d(4, 8, 3, padding=1), (2, 4, 6, 8, 8)),
    ],
    ids=["3x3", "5x5-same", "stride2", "dil2-g2", "7x7-s2", "1d", "3d"],
)
def test_cuda_sampled_positions_match_cpu_float64(layer, shape, monkeypatch):
    """The positions grid on CUDA (every offset) against the same grid on CPU in float64
    (itself checked against the reference in test_rule_parity)."""
    from ghlc.graph import HebbianRule
    from ghlc.runtime import rule as rule_module
    from ghlc.runtime import sampled
    from ghlc.runtime.calls import CallSpec

    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    nd = x.dim() - 2
    pad = layer.padding
    if pad == "same":
        pad = tuple(d * (k - 1) // 2 for d, k in zip(layer.dilation, layer.kernel_size))
    spec = CallSpec("conv", nd, False, layer.stride, pad, layer.dilation, (), layer.groups)
    rule = HebbianRule(sample_fraction=0.25, sample_over="positions")
    steps = sampled.grid_steps(0.25, nd)
    u = spec.run(x, w, b)
    for offsets in itertools.product(*[range(min(q, o)) for q, o in zip(steps, u.shape[2:])]):
        it = iter(offsets * 2)
        monkeypatch.setattr(sampled, "draw", lambda n, it=it: next(it))
        ref = rule_module.hebbian_raw(spec, x, u, w, b, rule)
        xc, wc, bc = x.float().cuda(), w.float().cuda(), b.float().cuda()
        got = rule_module.hebbian_raw(spec, xc, spec.run(xc, wc, bc), wc, bc, rule)
        err = ((got.double().cpu() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-4, (offsets, err)


@pytest.mark.parametrize("name", IDS)
def test_cuda_sampled_batch_matches_oracle(name, monkeypatch):
    """The sampled mode over the batch on CUDA (the block timing where the block is smaller
    than H and backprop does not keep u) against the oracle's sums over the same block."""
    from ghlc.runtime import sampled

    monkeypatch.setattr(sampled, "draw", lambda n: n - 1)
    rule = {"sample_fraction": 0.25, "sample_over": "batch", "draw": lambda n: n - 1}
    two_steps_against_oracle(name, oracle_rule=rule, sample_fraction=0.25)


@pytest.mark.parametrize("name", ["vgg", "resnet"])
@pytest.mark.parametrize("norm", ["layer", "unit"])
def test_cuda_in_call_combine_and_normalisation_match_oracle(monkeypatch, name, norm, override):
    """Every weight takes the in-call (blockwise) combine from the second step on, with the
    compiled kernels (as inside cuda_graph_step); two steps at lr 0 against the float64
    oracle."""
    from ghlc.runtime.status import STATUS

    override(in_call_combine_min_numel=0)
    override(in_call_combine_devices=("cpu", "cuda"))  # off on CUDA by default
    monkeypatch.setattr(STATUS, "capturing", 1)  # as in cuda_graph_step
    m = two_steps_against_oracle(name, normalisation=norm)
    sites = ghlc.runtime.runtime_of(m).sites
    assert any(s.state.single_use for s in sites.values())


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2"])
@pytest.mark.parametrize("kernels", ["eager", "fused"])
def test_cuda_channels_last_models_match_oracle(monkeypatch, name, kernels):
    """A channels-last model and input on CUDA, with the eager formulas or the fused kernels
    (Triton softmax, compiled decay and combination, as inside cuda_graph_step): two steps
    against the float64 oracle, each plastic gradient in its weight's layout."""
    from ghlc.runtime.status import STATUS

    if kernels == "fused":
        monkeypatch.setattr(STATUS, "capturing", 1)
    m = two_steps_against_oracle(name, memory_format=torch.channels_last)
    for n in ghlc.runtime.runtime_of(m).sites:
        assert m.get_parameter(n).grad.is_contiguous(memory_format=torch.channels_last), n


def test_cuda_compiled_kernels_equal_eager_formulas(monkeypatch, override):
    from ghlc.runtime import fused
    from ghlc.runtime.status import STATUS

    assert not fused.active(torch.zeros(1, device="cuda"))  # eager steps: eager formulas
    gen = torch.Generator(device="cuda").manual_seed(1)
    for shape, dim, cl in [
        ((16, 64, 9, 9), 1, False),
        ((8, 96, 7, 7), 1, True),
        ((4, 4, 8, 6, 6), 2, False),
        ((8, 600, 5), 1, False),
    ]:
        v = torch.randn(shape, device="cuda", generator=gen) * 4
        if cl:
            v = v.contiguous(memory_format=torch.channels_last)
        if fused._triton_softmax(v) is None:  # eager step, small output: the eager formula
            override(triton_eager_min_numel=0)
        if fused._triton_softmax(v) is None:
            break  # no Triton here
        y = fused.softmax(v, dim, 0.7)
        assert y.stride() == v.stride()
        torch.testing.assert_close(
            y.double(), torch.softmax(v.double() * 0.7, dim), rtol=1e-5, atol=1e-7
        )
    assert STATUS.triton_broken is None
    monkeypatch.setattr(STATUS, "capturing", 1)
    if not fused.active(torch.zeros(1, device="cuda")):
        pytest.skip("no Triton: the compiled kernels are off on this machine")
    gen = torch.Generator(device="cuda").manual_seed(0)
    v = torch.randn(16, 64, 9, 9, device="cuda", generator=gen) * 4
    for t in (1.0, 0.7):
        torch.testing.assert_close(fused.softmax(v, 1, t), fused.softmax_eager(v, 1, t))
    h = torch.randn(64, 32, 3, 3, device="cuda", generator=gen)
    gr = torch.randn(64, 32, 3, 3, device="cuda", generator=gen)
    ref = fused.sign_combine_eager_(h.clone(), gr)
    buf = h.clone()
    assert fused.sign_combine_(buf, gr).data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf, ref)
    assert STATUS.compile_broken is None


def test_cuda_triton_softmax_into_a_channel_slice():
    """The softmax written straight into the second half of a stacked (N, 2C, H, W) buffer,
    as the stacked weight gradients use it."""
    from ghlc.runtime import fused

    gen = torch.Generator(device="cuda").manual_seed(2)
    v = torch.randn(8, 24, 7, 5, device="cuda", generator=gen) * 3
    buf = torch.full((8, 48, 7, 5), 7.0, device="cuda")
    with fused.capturing(stack=True):
        wrote = fused.softmax_into(v, 1, 0.6, buf[:, 24:])
    if not wrote:
        pytest.skip("no Triton: the stacked path copies compete()'s output instead")
    torch.testing.assert_close(
        buf[:, 24:].double(), torch.softmax(v.double() * 0.6, 1), rtol=1e-5, atol=1e-7
    )
    assert (buf[:, :24] == 7.0).all()  # the other half is untouched


@pytest.mark.parametrize("name", ["resnet", "vgg"])
def test_cuda_stacked_weight_gradients_match_oracle(monkeypatch, name):
    """Inside a stacking capture scope (cuda_graph_step(..., stack_weight_grads=True))
    stackable convs compute backprop's weight gradient and the Hebbian correlation in one
    call; two steps at lr 0 against the float64 oracle."""
    import ghlc.runtime.function as fn
    from ghlc.runtime.status import STATUS

    calls = []
    orig = fn.stacked_wgrads

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(fn, "stacked_wgrads", spy)
    monkeypatch.setattr(STATUS, "capturing", 1)
    monkeypatch.setattr(STATUS, "stacking", 1)
    two_steps_against_oracle(name, hebbian_at="backward")
    assert calls
