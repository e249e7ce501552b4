"""Small models shared by the tests of the eager frontend (``tests/torch/test_eager*.py``) and of
the torch.export frontend (``tests/torch/test_export*.py``): the same model is folded by both,
each test file checking what its frontend must make of it.

Models take C_IN input channels unless they say otherwise. Layers draw their initialisation from
torch's global generator: a test that needs the same weights each run seeds it first.
"""

from __future__ import annotations

import torch
from torch import nn

from bnfold.core import rules
from bnfold.demo import DemoNet, randomize_batchnorms

C_IN = 4

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (11,), 2: (7, 6), 3: (5, 4, 5)}


# --------------------------------------------------------------------------------------------
# producer -> BatchNorm


class Net(nn.Module):
    """producer -> BatchNorm (its output is the BatchNorm's), with a user attribute and method
    that must survive an eager fold."""

    def __init__(self, producer: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.producer = producer
        self.bn = bn
        self.tag = "user attribute"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.producer(x))

    def user_method(self) -> str:
        return "user method of Net"


FOLDED = {"bn": ("folded", "producer")}


def skipped(rule) -> dict:
    """The report of a Net whose BatchNorm is kept under ``rule`` (or one of a set of rules)."""
    return {"bn": ("skipped", rule)}


# Conv(Transpose)Nd(C_IN, out, k, **rest) for every dimension: strides, paddings (modes, "same"),
# dilations, groups (depthwise, channel multipliers), with and without bias
CONV_CASES = {
    "plain": dict(
        out=6, k=3, stride=1, padding=0, padding_mode="zeros", dilation=1, groups=1, bias=True
    ),
    "stride2-reflect-groups2-nobias": dict(
        out=6, k=3, stride=2, padding=1, padding_mode="reflect", dilation=1, groups=2, bias=False
    ),
    "circular-dilated-depthwise": dict(
        out=4, k=3, stride=1, padding=2, padding_mode="circular", dilation=2, groups=4, bias=True
    ),
    "same-replicate-evenkernel-nobias": dict(
        out=8,
        k=2,
        stride=1,
        padding="same",
        padding_mode="replicate",
        dilation=1,
        groups=1,
        bias=False,
    ),
    "stride2-groups4-multiplier2": dict(
        out=8, k=3, stride=2, padding=1, padding_mode="zeros", dilation=1, groups=4, bias=True
    ),
}

CONV_T_CASES = {
    "plain": dict(
        out=6, k=3, stride=1, padding=0, output_padding=0, dilation=1, groups=1, bias=True
    ),
    "stride2-outpad1-groups2-nobias": dict(
        out=6, k=3, stride=2, padding=1, output_padding=1, dilation=1, groups=2, bias=False
    ),
    "dilated-depthwise": dict(
        out=4, k=3, stride=2, padding=0, output_padding=1, dilation=2, groups=4, bias=True
    ),
    "stride3-outpad2-groups2": dict(
        out=6, k=2, stride=3, padding=2, output_padding=2, dilation=1, groups=2, bias=True
    ),
    "groups4-cout-per-group2-nobias": dict(
        out=8, k=3, stride=2, padding=1, output_padding=0, dilation=1, groups=4, bias=False
    ),
}


def conv_net(dims: int, transposed: bool, case: dict) -> Net:
    """A conv (or conv-transpose) described by a CONV_CASES (CONV_T_CASES) entry, then BN."""
    c = dict(case)
    out, k = c.pop("out"), c.pop("k")
    return Net((CONV_T if transposed else CONV)[dims](C_IN, out, k, **c), BN[dims](out))


# BatchNorm2d keyword arguments
BN_VARIANTS = {
    "affine": dict(affine=True, momentum=0.1, eps=1e-5),
    "no-affine": dict(affine=False, momentum=0.1, eps=1e-5),
    "momentum-none-eps1e-3": dict(affine=True, momentum=None, eps=1e-3),
    "no-affine-momentum-none-eps0.1": dict(affine=False, momentum=None, eps=0.1),
    "eps0.1": dict(affine=True, momentum=0.1, eps=0.1),
}


class ExtremeStatistics(Net):
    """Tiny and huge variances, large means, zero and negative gamma, var slightly below 0
    (set by ``set_statistics``, after any randomisation)."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(C_IN, 8, 3), nn.BatchNorm2d(8, eps=1e-5))

    def set_statistics(self) -> None:
        with torch.no_grad():
            self.bn.running_var.copy_(torch.tensor([1e-7, 1e4, 3e-6, 1.0, 0.5, -5e-6, 1e-3, 2.0]))
            self.bn.running_mean.copy_(
                torch.tensor([100.0, -250.0, 0.0, 1e-3, 3.0, -0.5, 40.0, 0.0])
            )
            self.bn.weight.copy_(torch.tensor([50.0, 1e-3, 0.0, -2.0, 1.0, 0.3, -20.0, 1e3]))
            self.bn.bias.copy_(torch.tensor([10.0, -3.0, 0.5, 0.0, 1e3, -1.0, 2.0, 0.1]))


def float16_overflow_net(seed: int, bias: bool = True) -> Net:
    """A float16 Net in eval() whose folded weights would overflow float16 (gamma 1e4 over
    sqrt(1e-7)): the fold must be refused. ``seed`` draws the conv's weight."""
    model = Net(nn.Conv2d(C_IN, 6, 3, bias=bias), nn.BatchNorm2d(6)).eval()
    with torch.no_grad():
        model.producer.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
        model.bn.weight.fill_(1e4)
        model.bn.running_var.fill_(1e-7)
        model.bn.running_mean.zero_()
    return model.half()


# --------------------------------------------------------------------------------------------
# Subclasses of BatchNorm2d and Conv2d


class MyBatchNorm2d(nn.BatchNorm2d):
    """A subclass that adds a method but keeps BatchNorm2d's forward."""

    def describe(self) -> str:
        return "my bn"


class MyConv2d(nn.Conv2d):
    def describe(self) -> str:
        return "my conv"


class BNReLU2d(nn.BatchNorm2d):
    """BatchNorm + activation in one module, as some model libraries have."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class BNPlusInput2d(nn.BatchNorm2d):
    """A BatchNorm subclass whose forward also uses its raw input: not a BatchNorm + something."""

    def forward(self, x):
        return super().forward(x) + 0.25 * x


class ReLUThenBN2d(nn.BatchNorm2d):
    """Does something to its input before normalising it."""

    def forward(self, x):
        return super().forward(torch.relu(x))


class ClampedConv2d(nn.Conv2d):
    """A conv subclass whose forward does more than the convolution."""

    def forward(self, x):
        return super().forward(x).clamp(min=-0.5)


class WSConv2d(nn.Conv2d):
    """Weight-standardised convolution: overrides _conv_forward, inherits Conv2d.forward; its
    weight is computed at run time."""

    def _conv_forward(self, x, weight, bias):
        mean = weight.mean((1, 2, 3), keepdim=True)
        std = weight.std((1, 2, 3), keepdim=True)
        return super()._conv_forward(x, (weight - mean) / (std + 1e-5), bias)


# --------------------------------------------------------------------------------------------
# Whole models


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + x)


class ResNetish(nn.Module):
    """Nested Sequentials, residual blocks, a ConvTranspose head and a Linear head; 3 input
    channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.layers = nn.Sequential(Block(8), Block(8))
        self.up = nn.ConvTranspose2d(8, 4, 2, 2, groups=4)
        self.bn_up = nn.BatchNorm2d(4)
        self.fc = nn.Linear(8, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor):
        y = self.layers(self.stem(x))
        seg = self.bn_up(self.up(y))
        return self.bn_fc(self.fc(y.mean((2, 3)))), seg


RESNETISH_FOLDED = {
    "stem.1": ("folded", "stem.0"),
    "layers.0.body.1": ("folded", "layers.0.body.0"),
    "layers.0.body.3.1": ("folded", "layers.0.body.3.0"),
    "layers.1.body.1": ("folded", "layers.1.body.0"),
    "layers.1.body.3.1": ("folded", "layers.1.body.3.0"),
    "bn_up": ("folded", "up"),
    "bn_fc": ("folded", "fc"),
}


def calibrated_demo_net(seed: int) -> DemoNet:
    """DemoNet (16 BatchNorms, 3 input channels) initialised from ``seed``, with statistics
    measured in training mode on inputs drawn from ``seed + 1``."""
    torch.manual_seed(seed)
    model = DemoNet(num_classes=5, width=8)
    gen = torch.Generator().manual_seed(seed + 1)
    randomize_batchnorms(
        model, lambda: (torch.randn(4, 3, 16, 16, generator=gen),), seed=seed, batches=2
    )
    return model


def conv_and_conv_transpose() -> nn.Sequential:
    """Conv2d -> BatchNorm2d -> ReLU -> grouped ConvTranspose2d -> BatchNorm2d."""
    return nn.Sequential(
        nn.Conv2d(C_IN, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2),
        nn.BatchNorm2d(6),
    )


SEQUENTIAL_FOLDED = {"1": ("folded", "0"), "4": ("folded", "3")}


class Mixed(nn.Module):
    """Conv, ConvTranspose and Linear folds plus a Linear without BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C_IN, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
        self.bn_up = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.bn_fc = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        y = torch.relu(self.bn_up(self.up(torch.relu(self.bn(self.conv(x))))))
        return self.head(torch.relu(self.bn_fc(self.fc(y.mean((2, 3))))))


MIXED_FOLDED = {"bn": ("folded", "conv"), "bn_up": ("folded", "up"), "bn_fc": ("folded", "fc")}


def mixed_selected(decisions: dict[str, str]) -> dict[str, tuple[str, object]]:
    """The report of a Mixed folded with ``producers=``: bn -> "folded" or "not-selected"."""
    return {
        bn: ("folded", MIXED_FOLDED[bn][1]) if what == "folded" else ("skipped", rules.NOT_SELECTED)
        for bn, what in decisions.items()
    }


class LowPrecisionNet(nn.Module):
    """Two convs and a Linear, each with a BatchNorm, for 6 x 6 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(C_IN, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 36, 16)
        self.bn_fc = nn.BatchNorm1d(16)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.bn_fc(self.fc(y.flatten(1)))


class DataDependent(nn.Module):
    """Branches on a shape: torch.fx cannot trace it; torch.export (non-strict) sees a plain int
    and specialises it. conv2's output also feeds an add, so bn2 must stay."""

    def __init__(self, conv2_bias: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(C_IN, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=conv2_bias)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(x))
        if x.shape[0] > 1:
            y = torch.relu(y)
        z = self.conv2(y)
        return self.bn2(z) + z

    def user_method(self) -> str:
        return "still here"


class TrainBnAndLinear(nn.Module):
    """A BatchNorm its test puts in training mode, next to a Linear + BatchNorm1d (whose eager
    fold needs shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C_IN, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_fc(self.fc(self.bn(self.conv(x)).mean((2, 3))))


# --------------------------------------------------------------------------------------------
# Producers and BatchNorms used more than once, or not after each other


class ConvThenBN(nn.Module):
    """conv (C_IN -> 6 channels, 3 x 3) -> bn; the models built on it change forward() or add
    what they need after these two."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C_IN, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.conv(x))


class TwoBranches(nn.Module):
    """conv_a -> bn_a and conv_b -> bn_b, side by side on the same input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(C_IN, 6, 3)
        self.bn_a = nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(C_IN, 6, 3)
        self.bn_b = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn_a(self.conv_a(x)), self.bn_b(self.conv_b(x))


class OutputUsedTwice(nn.Module):
    """The conv's output goes to the BatchNorm and to an add, or is also a model output."""

    def __init__(self, as_output: bool) -> None:
        super().__init__()
        self.producer = nn.Conv2d(C_IN, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.as_output = as_output

    def forward(self, x):
        y = self.producer(x)
        if self.as_output:
            return self.bn(y), y
        return self.bn(y) + y


class ProducerCalledTwice(nn.Module):
    """One conv module, two calls; only the first call goes through a BatchNorm. Eager mode
    must refuse (one weight, two calls); a graph gives the folded call its own weight."""

    def __init__(self) -> None:
        super().__init__()
        self.producer = nn.Conv2d(C_IN, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.producer(x)) - self.producer(2 * x)


class BnCalledTwice(nn.Module):
    """One BatchNorm module called after two convs (``other`` with or without a bias)."""

    def __init__(self, other_bias: bool = True) -> None:
        super().__init__()
        self.producer = nn.Conv2d(C_IN, 6, 3)
        self.other = nn.Conv2d(C_IN, 6, 3, bias=other_bias)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.producer(x)) + self.bn(self.other(x))


class TiedWeights(nn.Module):
    """Two convs share one weight; only one is followed by a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.producer = nn.Conv2d(C_IN, 6, 3)
        self.twin = nn.Conv2d(C_IN, 6, 3)
        self.twin.weight = self.producer.weight
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.producer(x)) * self.twin(x)


class ReadsProducerWeight(nn.Module):
    """The conv's weight is also read by other ops: eager mode must refuse; a graph may also
    fold with a private copy of the weight, but must not change what the other reader sees."""

    def __init__(self) -> None:
        super().__init__()
        self.producer = nn.Conv2d(C_IN, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.producer(x)) * self.producer.weight.abs().mean()


class NoProducer(nn.Module):
    """A BatchNorm on the input, after a ReLU, after a view of the conv's output (a BatchNorm1d
    then), or never called."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.producer = nn.Conv2d(C_IN, C_IN, 3, padding=1)
        self.bn = nn.BatchNorm2d(C_IN) if where != "view" else nn.BatchNorm1d(C_IN)
        self.where = where

    def forward(self, x):
        if self.where == "input":
            return self.producer(self.bn(x))
        if self.where == "relu":
            return self.bn(torch.relu(self.producer(x)))
        if self.where == "view":  # (N, C, H, W) -> (N, C, H*W): channels still on axis 1
            return self.bn(self.producer(x).flatten(2))
        return self.producer(x)  # never calls bn


class ChainedBNs(nn.Module):
    """conv -> bn1 -> bn2: the graph forms fold both into conv; the eager form folds bn1 (bn2's
    input is a BatchNorm when it is decided)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C_IN, 6, 3)
        self.bn1 = nn.BatchNorm2d(6)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn2(self.bn1(self.conv(x)))


class ConvBN(nn.Module):
    """conv (3 -> ``out`` channels, 3 x 3) -> bn; the models built on it change forward() or
    add what they need."""

    def __init__(self, out: int = 8, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, out, 3, padding=padding)
        self.bn = nn.BatchNorm2d(out)

    def forward(self, x):
        return self.bn(self.conv(x))


class OptionalMask(ConvBN):
    """Foldable whichever way forward is called."""

    def __init__(self) -> None:
        super().__init__(padding=1)

    def forward(self, x, mask=None, scale: float = 2.0):
        y = self.bn(self.conv(x)) * scale
        return y if mask is None else y * mask


class StepNet(nn.Module):
    """A network given as a list of steps over numbered values (value 0 is the input).

    A step is ``(kind, arg, inputs)``: ``call`` runs ``layers[arg]`` (so a layer can be called
    twice), the others are tensor functions. ``forward`` is a plain loop over constants, which
    torch.fx, torch.export and the ONNX exporter all unroll.
    """

    def __init__(self, layers: dict[str, nn.Module], steps: list, outputs: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.steps = tuple(steps)
        self.outputs = tuple(outputs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = [x]
        for kind, arg, ins in self.steps:
            a = [values[i] for i in ins]
            if kind == "call":
                y = self.layers[arg](a[0])
            elif kind == "add":
                y = a[0] + a[1]
            elif kind == "cat":
                y = torch.cat([a[0], a[1]], 1)
            elif kind == "slice":
                y = a[0][:, arg[0] : arg[1]]
            elif kind == "relu":
                y = torch.relu(a[0])
            elif kind == "tanh":
                y = torch.tanh(a[0])
            elif kind == "pool":
                y = a[0].mean(dim=arg)
            elif kind == "transpose":
                y = a[0].transpose(1, 2)
            elif kind == "probe":  # forward looking at a layer, not only calling it
                layer = self.layers[arg[0]]
                if arg[1] == "isinstance":
                    flag = isinstance(layer, nn.modules.batchnorm._BatchNorm)
                else:
                    flag = getattr(layer, "bias", None) is None
                y = a[0] * 2 if flag else a[0]
            elif kind == "is_tensor":  # False on a torch.fx proxy: the trace takes another path
                y = a[0] + a[0] if isinstance(a[0], torch.Tensor) else a[0]
            else:
                raise AssertionError(kind)
            values.append(y)
        return tuple(values[i] for i in self.outputs)
