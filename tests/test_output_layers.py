"""Which layers are output layers (kept backprop unless named): those whose outputs reach the
model's output and no other conv/linear layer. Checked on a headless residual transformer
(only the last block's MLP output qualifies, not every block's projections that reach the
output along the residual stream) and on a two-head model (both heads)."""

import torch
import torch.nn as nn
from test_cli import cli

import ghlc
from ghlc.graph import Role


class Block(nn.Module):
    """A pre-norm transformer block with explicit q/k/v, projection and MLP layers."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v
        x = x + self.proj(a)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class HeadlessViT(nn.Module):
    """Patch embedding, three residual blocks, a final norm, no classifier (num_classes=0)."""

    def __init__(self, d: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.norm(self.blocks(x)).mean(1)


class TwoHeads(nn.Module):
    """A shared trunk with a class head and a distillation head (both returned)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.hidden = nn.Linear(8, 8)
        self.head, self.head_dist = nn.Linear(8, 10), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.hidden(self.conv(x).mean((2, 3))))
        return self.head(f), self.head_dist(f)


LINEAR = ghlc.GHLConfig(plastic=("conv", "linear"))


def outputs(lg) -> set[str]:
    return {i.name for i in lg.layers() if i.is_output}


def test_a_headless_transformer_has_one_output_layer_the_last_mlp_output():
    lg = ghlc.passes.select_plastic(
        ghlc.trace(HeadlessViT(), (torch.randn(2, 3, 16, 16),), config=LINEAR)
    ).graph
    assert outputs(lg) == {"blocks.2.fc2.weight"}
    backprop = {i.name for i in lg.layers() if i.role is Role.BACKPROP}
    assert backprop == {"blocks.2.fc2.weight"}
    assert len(lg.plastic()) == 1 + 3 * 4 - 1  # patch conv and every block layer but one
    # each earlier projection feeds the next block's layers along the residual stream
    data = {(u, v) for u, v, d in lg.g.edges(data=True) if d["type"] == "data"}
    assert ("blocks.0.proj.weight", "blocks.0.fc1.weight") in data
    assert ("blocks.1.fc2.weight", "blocks.2.qkv.weight") in data


def test_every_head_of_a_two_head_model_is_an_output_layer():
    lg = ghlc.passes.select_plastic(
        ghlc.trace(TwoHeads(), (torch.randn(2, 3, 8, 8),), config=LINEAR)
    ).graph
    assert outputs(lg) == {"head.weight", "head_dist.weight"}
    roles = {i.name: i.role for i in lg.layers()}
    assert roles == {
        "conv.weight": Role.PLASTIC,
        "hidden.weight": Role.PLASTIC,
        "head.weight": Role.BACKPROP,
        "head_dist.weight": Role.BACKPROP,
    }


def test_a_classifier_is_still_the_only_output_layer():
    vit = nn.Sequential(HeadlessViT(), nn.Linear(16, 10))
    lg = ghlc.trace(vit, (torch.randn(2, 3, 16, 16),), config=LINEAR)
    assert outputs(lg) == {"1.weight"}


def test_convert_explain_lists_the_output_layers(tmp_path):
    (tmp_path / "vit.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})\n"
        "from test_output_layers import HeadlessViT\n"
        "def vit():\n    return HeadlessViT()\n"
        "def example_inputs():\n    import torch\n    return (torch.randn(2, 3, 16, 16),)\n"
    )
    (tmp_path / "ghl.toml").write_text('plastic = ["conv", "linear"]\n')
    r = cli("convert", "vit.py", "--config", "ghl.toml", "--explain", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    not_plastic = r.stdout.split("not plastic:")[1].splitlines()
    listed = [line.strip() for line in not_plastic if line.startswith("  ")]
    assert listed == ["blocks.2.fc2: output layer (name it in config.include to make it plastic)"]
    assert "12 of 13 layers plastic" in r.stdout
