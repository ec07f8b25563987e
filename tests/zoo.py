"""A zoo of tiny architectures in plain PyTorch (no torchvision), each with what ghlc should
make of it: the plastic parameters and how each weight is used (direct / view / computed).

Every entry builds in a few milliseconds and runs forward+backward well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- VGG ------------------------------------------------------------------------------------


class VGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(16, 10)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


# ---- ResNet with 1x1 downsample --------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        idt = x if self.downsample is None else self.downsample(x)
        return F.relu(out + idt)


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ---- MobileNetV2 ------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hid, 1, bias=False),
            nn.BatchNorm2d(hid),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False),
            nn.BatchNorm2d(hid),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True)
        )
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1, 2), InvertedResidual(8, 12, 2, 2))
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))


# ---- DenseNet ---------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, feats):
        x = torch.cat(feats, 1)
        return self.conv(F.relu(self.bn(x)))


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.dense = nn.ModuleList([DenseLayer(8, 4), DenseLayer(12, 4)])
        self.trans = nn.Conv2d(16, 8, 1, bias=False)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.dense:
            feats.append(layer(feats))
        x = F.avg_pool2d(self.trans(torch.cat(feats, 1)), 2)
        return self.fc(x.mean((2, 3)))


# ---- U-Net ------------------------------------------------------------------------------------


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Conv2d(16, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e = F.relu(self.enc(x))
        m = F.relu(self.mid(F.max_pool2d(e, 2)))
        d = F.relu(self.dec(torch.cat([self.up(m), e], 1)))
        return self.out(d)


# ---- temporal Conv1d --------------------------------------------------------------------------


class TemporalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=2, dilation=2)
        self.c2 = nn.Conv1d(8, 8, 3, stride=2, padding=1, groups=2)
        self.up = nn.ConvTranspose1d(8, 6, 3, stride=2, padding=1, output_padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.up(x))
        return self.fc(x.mean(2))


# ---- Conv3d -----------------------------------------------------------------------------------


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(2, 4, 3, padding=1)
        self.c2 = nn.Conv3d(4, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), groups=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(x.mean((2, 3, 4)))


# ---- MLP --------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
        )

    def forward(self, x):
        return self.net(x)


# ---- ViT-style encoder ------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]  # self-attention: packed in_proj
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class AttnPool(nn.Module):
    """Class-attention pooling: a learned query attends to the tokens (in_proj used as views:
    q from one slice, k/v from the other)."""

    def __init__(self, d, heads):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.5)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        q = self.query.expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, need_weights=False)[0].squeeze(1)


class ViT(nn.Module):
    """Token inputs (B, T, F): a patch conv merges pairs of tokens, then encoder blocks."""

    def __init__(self, feat=6, d=16, heads=2, patch=2, n_tok=4):
        super().__init__()
        self.patch = nn.Conv1d(feat, d, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, n_tok, d) * 0.1)
        self.blocks = nn.Sequential(EncoderBlock(d, heads, 32))
        self.pool = AttnPool(d, heads)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        x = self.patch(x.transpose(1, 2)).transpose(1, 2) + self.pos
        x = self.blocks(x)
        return self.head(self.norm(self.pool(x)))


# ---- weight-standardised conv -----------------------------------------------------------------


class StdConv2d(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        m = w.mean(dim=(1, 2, 3), keepdim=True)
        v = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - m) / torch.sqrt(v + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = StdConv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = StdConv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.gn(self.c1(x)))))
        return self.fc(x.mean((2, 3)))


# ---- data-dependent branch (fx fails) ---------------------------------------------------------


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.c1(x)
        if x.sum() > 0:  # value-dependent control flow
            h = F.relu(h)
        else:
            h = torch.tanh(h)
        return self.fc(self.c2(h).mean((2, 3)))


# ---- functional conv with the model's own Parameter ------------------------------------------


class FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.weight, self.bias, padding=1))
        return self.fc(h.mean((2, 3)))


# ---- one conv used twice ----------------------------------------------------------------------


class ConvTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(self.conv(h))
        h = F.relu(self.conv(h))  # same weight, second use
        return self.fc(h.mean((2, 3)))


# ---- the zoo ----------------------------------------------------------------------------------

LINEAR = ("conv", "linear")


@dataclass
class Entry:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    plastic: dict[str, str]  # expected plastic parameter -> weight_use
    plastic_kinds: tuple[str, ...] = ("conv",)
    calls: dict[str, int] = field(default_factory=dict)  # expected calls when not 1
    fx_fails: bool = False

    def config_kwargs(self) -> dict:
        return {"plastic": self.plastic_kinds}

    def make(self, seed: int = 0):
        torch.manual_seed(seed)
        model = self.build()
        x = torch.randn(*self.input_shape)
        if self.fx_fails:
            x = x.abs() + 0.1  # take the relu branch
        return model, x


def _d(*names):
    return {n: "direct" for n in names}


ZOO: list[Entry] = [
    Entry(
        "vgg", VGG, (2, 3, 8, 8), _d("features.0.weight", "features.2.weight", "features.5.weight")
    ),
    Entry(
        "resnet",
        ResNet,
        (2, 3, 8, 8),
        _d(
            "conv1.weight",
            "layer1.conv1.weight",
            "layer1.conv2.weight",
            "layer2.conv1.weight",
            "layer2.conv2.weight",
            "layer2.downsample.0.weight",
        ),
    ),
    Entry(
        "mobilenetv2",
        MobileNetV2,
        (2, 3, 8, 8),
        _d(
            "stem.0.weight",
            "blocks.0.conv.0.weight",
            "blocks.0.conv.3.weight",
            "blocks.0.conv.6.weight",
            "blocks.1.conv.0.weight",
            "blocks.1.conv.3.weight",
            "blocks.1.conv.6.weight",
        ),
    ),
    Entry(
        "densenet",
        DenseNet,
        (2, 3, 8, 8),
        _d("stem.weight", "dense.0.conv.weight", "dense.1.conv.weight", "trans.weight"),
    ),
    Entry("unet", UNet, (2, 3, 8, 8), _d("enc.weight", "mid.weight", "up.weight", "dec.weight")),
    Entry("temporal1d", TemporalNet, (2, 4, 10), _d("c1.weight", "c2.weight", "up.weight")),
    Entry("conv3d", Conv3dNet, (2, 2, 3, 6, 6), _d("c1.weight", "c2.weight")),
    Entry("mlp", MLP, (4, 12), _d("net.0.weight", "net.2.weight"), LINEAR),
    Entry(
        "vit",
        ViT,
        (2, 8, 6),
        {
            "patch.weight": "direct",
            "blocks.0.attn.in_proj_weight": "direct",
            "blocks.0.attn.out_proj.weight": "direct",
            "blocks.0.fc1.weight": "direct",
            "blocks.0.fc2.weight": "direct",
            "pool.attn.in_proj_weight": "view",
            "pool.attn.out_proj.weight": "direct",
        },
        LINEAR,
        calls={"pool.attn.in_proj_weight": 2},
    ),
    Entry("stdconv", StdConvNet, (2, 3, 8, 8), {"c1.weight": "computed", "c2.weight": "computed"}),
    Entry("branchy", Branchy, (2, 3, 6, 6), _d("c1.weight", "c2.weight"), fx_fails=True),
    Entry("functional", FunctionalConv, (2, 3, 6, 6), _d("weight")),
    Entry(
        "conv_twice",
        ConvTwice,
        (2, 3, 6, 6),
        _d("stem.weight", "conv.weight"),
        calls={"conv.weight": 2},
    ),
]

BY_NAME = {e.name: e for e in ZOO}

# Together these hold every layer kind and weight use of the zoo: strided, 1x1 and bias-free
# convs with batch norm (resnet), depthwise (mobilenetv2), ConvTranspose2d (unet), dilated and
# grouped Conv1d with ConvTranspose1d (temporal1d), grouped Conv3d, Linear on 3-d inputs with
# attention's weight views (vit), computed weights (stdconv), one weight called twice
# (conv_twice). The other models repeat those kinds.
COVERING = ("resnet", "mobilenetv2", "unet", "temporal1d", "conv3d", "vit", "stdconv", "conv_twice")


def sweep() -> list:
    """Every zoo name as a pytest parameter, for a runtime path swept over the whole zoo:
    the models outside COVERING are marked slow (the default run keeps every kind)."""
    import pytest  # here: the zoo is also imported outside pytest (test_compile's subprocess)

    return [pytest.param(e.name, marks=() if e.name in COVERING else pytest.mark.slow) for e in ZOO]
