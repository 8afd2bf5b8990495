"""NAS-Bench-201 cell networks built from architecture strings.

The NB201 (NATS-Bench topology) space: a cell of 4 nodes where each edge ``j → i``
(``j < i``) applies one of five operations; the architecture string lists, node by
node, the edges coming in: ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``.

Macro skeleton (Dong & Yang, ICLR 2020), for CIFAR-sized inputs: stem 3×3 conv (C
channels) + BN; three stages of ``N`` cells with C, 2C, 4C channels, separated by
residual reduction blocks (ReLU-Conv3×3/2-BN → ReLU-Conv3×3-BN, shortcut avg-pool 2 +
1×1 conv); then BN-ReLU, global average pooling and a linear classifier. Convolution
edges are ReLU-Conv-BN; ``avg_pool_3x3`` is a stride-1 average pool (padding excluded
from the count); ``none`` outputs zeros; node ``i`` sums its incoming edges and the
cell's output is its last node.
"""

from __future__ import annotations

import torch
from torch import nn

from nndiag.errors import InputError

#: The five NB201 operations.
OPS: tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")

Genotype = tuple[tuple[tuple[str, int], ...], ...]


def parse_arch(arch: str) -> Genotype:
    """Parse an NB201 architecture string into ``((op, from_node), ...)`` per node.

    Parameters
    ----------
    arch : str
        ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``.

    Returns
    -------
    tuple
        Three tuples (nodes 1, 2, 3) of ``(op, input_node)`` pairs.

    Raises
    ------
    InputError
        When the string is malformed; the message lists the valid operations.

    Examples
    --------
    >>> parse_arch("|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|none~1|nor_conv_1x1~2|")[0]
    (('nor_conv_3x3', 0),)
    """
    valid = ", ".join(OPS)
    form = "'|op~0|+|op~0|op~1|+|op~0|op~1|op~2|'"
    if not isinstance(arch, str) or not arch.strip():
        raise InputError(f"empty NB201 architecture string; expected {form} with ops {valid}")
    groups = arch.strip().split("+")
    if len(groups) != 3:
        raise InputError(f"NB201 architecture {arch!r} must have 3 node groups separated by '+' "
                         f"({form}); valid ops: {valid}")
    nodes = []
    for i, g in enumerate(groups, start=1):
        if not (g.startswith("|") and g.endswith("|")):
            raise InputError(f"NB201 architecture {arch!r}: group {g!r} must start and end with '|'")
        items = [t for t in g[1:-1].split("|")]
        if len(items) != i:
            raise InputError(f"NB201 architecture {arch!r}: node {i} needs {i} incoming edges, "
                             f"got {len(items)} in {g!r}")
        edges = []
        for j, item in enumerate(items):
            op, sep, src = item.partition("~")
            if op not in OPS:
                raise InputError(f"NB201 architecture {arch!r}: unknown operation {op!r}; valid ops: {valid}")
            if not sep or src != str(j):
                raise InputError(f"NB201 architecture {arch!r}: edge {item!r} must read '{op}~{j}'")
            edges.append((op, j))
        nodes.append(tuple(edges))
    return tuple(nodes)


def arch_string(genotype: Genotype) -> str:
    """The canonical string of a parsed genotype (inverse of :func:`parse_arch`)."""
    return "+".join("|" + "|".join(f"{op}~{j}" for op, j in node) + "|" for node in genotype)


class ReLUConvBN(nn.Sequential):
    """ReLU → Conv (no bias) → BN."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out),
        )


class Zero(nn.Module):
    """The ``none`` operation: zeros of the input's shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.0)


def _op(name: str, c: int) -> nn.Module:
    if name == "none":
        return Zero()
    if name == "skip_connect":
        return nn.Identity()
    if name == "nor_conv_1x1":
        return ReLUConvBN(c, c, 1, 1, 0)
    if name == "nor_conv_3x3":
        return ReLUConvBN(c, c, 3, 1, 1)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    raise InputError(f"unknown NB201 operation {name!r}; valid ops: {', '.join(OPS)}")


class NB201Cell(nn.Module):
    """One NB201 cell: node ``i`` = Σ_j op_{j→i}(node j); output = node 3."""

    def __init__(self, genotype: Genotype, c: int) -> None:
        super().__init__()
        self.genotype = genotype
        self.edges = nn.ModuleDict()
        for i, node in enumerate(genotype, start=1):
            for op, j in node:
                self.edges[f"{j}_{i}"] = _op(op, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for i, node in enumerate(self.genotype, start=1):
            nodes.append(sum(self.edges[f"{j}_{i}"](nodes[j]) for _, j in node))
        return nodes[-1]


class ResidualReduction(nn.Module):
    """The NB201 reduction block: two ReLU-Conv-BN (stride 2, then 1) plus a pooled 1×1 shortcut."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, 2, 1)
        self.conv_b = ReLUConvBN(c_out, c_out, 3, 1, 1)
        self.downsample = nn.Sequential(
            nn.AvgPool2d(2, stride=2, padding=0),
            nn.Conv2d(c_in, c_out, 1, stride=1, padding=0, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class NB201Network(nn.Module):
    """A NAS-Bench-201 network for CIFAR-sized images.

    Parameters
    ----------
    arch : str
        The cell's architecture string.
    num_classes : int
        Output classes (10 for CIFAR-10, 100 for CIFAR-100, 120 for ImageNet16-120).
    channels : int
        C, the first stage's width (16 in the benchmark).
    cells_per_stage : int
        N, cells per stage (5 in the benchmark).
    in_channels : int
        Input image channels.
    """

    def __init__(self, arch: str, num_classes: int = 10, channels: int = 16,
                 cells_per_stage: int = 5, in_channels: int = 3) -> None:
        super().__init__()
        if channels < 1 or cells_per_stage < 1 or num_classes < 1:
            raise InputError("NB201 network: channels, cells_per_stage and num_classes must be >= 1")
        self.genotype = parse_arch(arch)
        self.arch = arch_string(self.genotype)
        c = channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        layers: list[nn.Module] = []
        for stage in range(3):
            if stage > 0:
                layers.append(ResidualReduction(c, 2 * c))
                c *= 2
            layers.extend(NB201Cell(self.genotype, c) for _ in range(cells_per_stage))
        self.cells = nn.Sequential(*layers)
        self.lastact = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=False))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward_pre_gap(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before global pooling (used by the Zen-score)."""
        return self.lastact(self.cells(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.global_pooling(self.forward_pre_gap(x)).flatten(1)
        return self.classifier(out)


def nb201(arch: str, num_classes: int = 10, channels: int = 16, cells_per_stage: int = 5,
          in_channels: int = 3) -> NB201Network:
    """Build an NB201 network (registered as ``"nb201:<arch string>"``).

    Examples
    --------
    >>> from nndiag.models import build_model
    >>> conv = "nor_conv_3x3"
    >>> net = build_model(f"nb201:|{conv}~0|+|{conv}~0|{conv}~1|+|{conv}~0|{conv}~1|{conv}~2|")
    >>> sum(p.numel() for p in net.parameters())
    1531546
    """
    return NB201Network(arch, num_classes=num_classes, channels=channels,
                        cells_per_stage=cells_per_stage, in_channels=in_channels)
