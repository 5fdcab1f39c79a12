"""Gate point discovery by structure (nad_guard.paths.discovery) on networks nad-guard does not ship.

Every network here has random weights (nothing is downloaded) and 32x32 inputs; each test names the
points it expects, in order.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from nad_guard.models import mnist_cnn, resnet20
from nad_guard.paths import GateCoverageWarning, PathModel, discover_gate_points, find_gate_points

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 32, 32)


# --------------------------------------------------------------------------- networks written elsewhere

class Residual(nn.Module):
    """A CIFAR residual unit written unlike nad_guard's BasicBlock: a 1x1 projection shortcut (a Sequential)
    when the shape changes, and the ReLU applied functionally after the add."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = nn.BatchNorm2d(cout)
        self.proj = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.n2(self.c2(F.relu(self.n1(self.c1(x)))))
        return F.relu(y + (x if self.proj is None else self.proj(x)))


class OtherResNet20(nn.Module):
    """ResNet-20 as found elsewhere: stages in a ModuleList of ModuleLists, looped over in forward; the stem's
    ReLU is a module (``stem_module=True``, the net a user reported: the old rule found only it) or F.relu."""

    def __init__(self, stem_module: bool):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.relu = nn.ReLU() if stem_module else None
        stages, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            stages.append(nn.ModuleList([Residual(cin if j == 0 else cout, cout, 2 if i and not j else 1)
                                         for j in range(3)]))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.relu(x) if self.relu is not None else F.relu(x)
        for stage in self.stages:
            for unit in stage:
                x = unit(x)
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def vgg_style() -> nn.Sequential:
    """A VGG-style net as one flat nn.Sequential (conv-bn-relu, max-pooling, a two-layer head)."""
    layers: list[nn.Module] = []
    cin = 3
    for w in (32, "M", 64, 64, "M", 128, 128, "M"):
        if w == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, int(w), 3, padding=1), nn.BatchNorm2d(int(w)), nn.ReLU(inplace=True)]
            cin = int(w)
    layers += [nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(256, 10)]
    return nn.Sequential(*layers)


class SharedBody(nn.Module):
    """A stem and one residual block applied three times (shared weights): the block runs more than once,
    so it cannot carry gates, and nothing in it can."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.body = Residual(16, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for _ in range(3):
            x = self.body(x)
        return self.head(x.mean((2, 3)))


def points_of(net: nn.Module) -> list[tuple[str, int, tuple[int, ...], str]]:
    torch.manual_seed(0)
    return [(p.name, p.channels, p.size, p.kind) for p in find_gate_points(net, input_shape=SHAPE)]


# --------------------------------------------------------------------------- the four architectures

BLOCKS20 = [(f"stages.{i}.{j}", c, (s, s), "block") for i, (c, s) in enumerate(((16, 32), (32, 16), (64, 8)))
            for j in range(3)]


@pytest.mark.parametrize("stem_module, stem", [(True, ("relu", 16, (32, 32), "activation")),
                                               (False, ("bn1", 16, (32, 32), "pre-activation"))])
def test_custom_residual_net_gives_its_nine_blocks_and_stem(stem_module: bool, stem: tuple) -> None:
    assert points_of(OtherResNet20(stem_module)) == [stem] + BLOCKS20


def test_vgg_style_sequential_gives_its_conv_activations() -> None:
    assert points_of(vgg_style()) == [
        ("2", 32, (32, 32), "activation"), ("6", 64, (16, 16), "activation"), ("9", 64, (16, 16), "activation"),
        ("13", 128, (8, 8), "activation"), ("16", 128, (8, 8), "activation")]  # not the head's 2-D ReLU


def test_torchvision_mobilenet_v3_small_gives_stem_inverted_residuals_and_last_conv() -> None:
    net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    channels = [16, 24, 24, 40, 40, 40, 48, 48, 96, 96, 96]
    sizes = [8, 4, 4, 2, 2, 2, 2, 2, 1, 1, 1]
    assert points_of(net) == (
        [("features.0.2", 16, (16, 16), "activation")]
        + [(f"features.{i}", c, (s, s), "block") for i, c, s in zip(range(1, 12), channels, sizes)]
        + [("features.12.2", 576, (1, 1), "activation")])
    assert net.training  # the dry forward ran in eval mode and restored the mode


def test_torchvision_resnet18_gives_stem_and_every_basic_block() -> None:
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    bn = net.bn1.running_mean.clone()
    blocks = [(f"layer{i}.{j}", 64 * 2 ** (i - 1), (2 ** (4 - i),) * 2, "block") for i in (1, 2, 3, 4) for j in (0, 1)]
    assert points_of(net) == [("relu", 64, (16, 16), "activation")] + blocks
    assert torch.equal(net.bn1.running_mean, bn)  # no batch statistics were updated


def test_outside_cifar_vgg_keeps_its_points() -> None:
    import sys

    sys.path.insert(0, str(ROOT / "bench" / "outside_models"))
    try:
        from cifar_vgg import cifar_vgg
    finally:
        sys.path.remove(str(ROOT / "bench" / "outside_models"))
    found = discover_gate_points(cifar_vgg(weights=None))
    assert [p.name for p in found.points] == [f"stages.{i}.act" for i in (0, 1, 3, 4, 6, 7, 9)]
    assert found.automatic and found.depth == 8 and found.coverage == 7 / 8 and found.warning is None


# --------------------------------------------------------------------------- the reference models

@pytest.mark.parametrize("build, meta", [
    (mnist_cnn, "nad_guard/default_guard/meta.json"),
    (resnet20, "bench/results/guard_cifar10-resnet20/meta.json"),
])
def test_reference_models_give_the_points_their_committed_guards_list(build, meta: str) -> None:
    committed = json.loads((ROOT / meta).read_text())["layers"]
    points = find_gate_points(build())
    assert [{"name": p.name, "channels": p.channels} for p in points] == committed


def test_reference_resnet20_points_describe_themselves() -> None:
    found = discover_gate_points(resnet20())
    assert found.method == "graph" and found.depth == 20  # 19 convolutions and the linear head
    assert [(p.kind, p.depth, p.size) for p in found.points[:3]] == [
        ("activation", 1, (32, 32)), ("block", 3, (32, 32)), ("block", 5, (32, 32))]
    assert found.points[-1].depth == 19 and found.coverage == 0.95
    table = found.describe().splitlines()
    assert table[0].startswith("gate points (chosen automatically, 10;") and "19 of 20" in table[0]
    assert table[1].split() == ["relu", "16", "ch", "32", "x", "32", "activation", "depth", "1"]
    assert table[-1].split()[:6] == ["layer3.2", "64", "ch", "8", "x", "8"]


# --------------------------------------------------------------------------- weak points are warned

def test_few_or_shallow_points_are_warned() -> None:
    with pytest.warns(GateCoverageWarning, match=r"only 1 gate point .*1 of the network.s 8 conv/linear layers"
                      r".*blocks passed over: body \(runs 3 times\)"):
        found = discover_gate_points(SharedBody(), input_shape=SHAPE)
    assert [p.name for p in found.points] == ["stem.1"] and found.depth == 8  # 1 + 3 x 2 convs + the head
    assert found.skipped == ("body (runs 3 times)",) and "blocks passed over: body" in found.describe()
    with pytest.warns(GateCoverageWarning, match=r"only 2 gate points .*these are the layers named"):
        discover_gate_points(mnist_cnn(), ["features.5", "classifier.3"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", GateCoverageWarning)
        discover_gate_points(resnet20())  # ten points, 95% of the depth: nothing to say
        assert len(find_gate_points(SharedBody(), input_shape=SHAPE)) == 1  # find_gate_points never warns


def test_named_points_get_kinds_sizes_and_depths() -> None:
    points = find_gate_points(mnist_cnn(), ["features.5", "classifier.3"])
    assert [(p.name, p.channels, p.size, p.kind, p.depth) for p in points] == [
        ("features.5", 32, (28, 28), "activation", 2), ("classifier.3", 128, (), "given", 5)]


# --------------------------------------------------------------------------- the artifact records them

def test_artifact_records_the_points_and_loads_without_the_record(tmp_path: Path) -> None:
    clf = mnist_cnn()
    clf.eval()
    points = find_gate_points(clf)
    torch.manual_seed(0)
    pm = PathModel(clf).set_gates({p.name: torch.rand(10, p.channels) for p in points})
    pm.fit_stats(torch.rand(20, 1, 28, 28), torch.arange(20) % 10)
    meta = json.loads((pm.save(tmp_path / "a") / "meta.json").read_text())
    record = meta["gate_points"]
    assert record["automatic"] and record["method"] == "graph" and record["network_depth"] == 6
    assert record["points"][0] == {"name": "features.2", "channels": 32, "size": [28, 28], "kind": "activation",
                                   "depth": 1}
    assert [d["name"] for d in record["points"]] == [d["name"] for d in meta["layers"]]
    del meta["gate_points"]  # as written before the record existed
    (tmp_path / "a" / "meta.json").write_text(json.dumps(meta))
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(PathModel.load(tmp_path / "a", clf).features(x).X, pm.features(x).X)


def test_a_plain_module_in_train_mode_is_traced_in_eval_mode_and_restored() -> None:
    net = vgg_style()
    net.train()
    net[1].eval()  # a mixed state is restored as it was
    find_gate_points(net, input_shape=SHAPE)
    assert net.training and not net[1].training and net[4].training


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = vgg_style()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # no autograd graph to read
            return self.net(x)


def test_without_a_graph_activation_modules_after_convs_are_taken_in_call_order() -> None:
    found = discover_gate_points(Detached(), input_shape=SHAPE, warn=False)
    assert found.method == "module order" and found.depth == 7  # 5 convolution and 2 linear modules
    assert [(p.name, p.kind, p.depth) for p in found.points] == [
        ("net.2", "activation", 1), ("net.6", "activation", 2), ("net.9", "activation", 3),
        ("net.13", "activation", 4), ("net.16", "activation", 5)]


def test_discovery_reads_the_graph_inside_inference_mode() -> None:
    clf = resnet20()
    with torch.inference_mode():  # as a service may load a guard
        found = discover_gate_points(clf, warn=False)
    assert found.method == "graph" and [p.name for p in found.points] == [p.name for p in find_gate_points(clf)]
