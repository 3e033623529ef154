"""The benchmark models, built in code (no downloads), seeded, each with its example inputs.

Add a model by writing a builder and registering it::

    @model("name", "what it is", small=True)
    def build():
        return module_or_function, (example, inputs)

and, for the variable-batch case, a builder that takes the batch size::

    @varbatch("name", "what it is")
    def build():
        return module, make_inputs          # make_inputs(b) -> inputs with batch size b

``small`` models are the ones ``--quick`` runs (kept to two: on a 2-core machine each
model costs about 1.5 minutes per repetition, most of it process start-up and torch.compile). Builders must be deterministic
(seeded): the cache filled by one process is hit by the next only when the
weights are bit-identical.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MODELS", "ModelSpec", "model", "build", "names", "VARBATCH", "varbatch", "build_varbatch"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    label: str
    builder: Callable
    small: bool


MODELS: dict[str, ModelSpec] = {}


def model(name: str, label: str, *, small: bool = False):
    def register(builder):
        MODELS[name] = ModelSpec(name, label, builder, small)
        return builder
    return register


def names(small_only: bool = False) -> list[str]:
    return [n for n, s in MODELS.items() if s.small or not small_only]


# Variable-batch models (the ``varbatch`` case): a module and inputs for any batch size. Keyed by
# the name of the registered model they stand for, so ``--models cnn`` selects both.
VARBATCH: dict[str, ModelSpec] = {}


def varbatch(name: str, label: str):
    def register(builder):
        VARBATCH[name] = ModelSpec(name, label, builder, False)
        return builder
    return register


# Models named "PREFIX:..." come from another module's ``build(name)`` / ``build_varbatch(name)``
# (benchmarks.zoo: "zoo:ARCH:SIZE:BATCH", "zoo:ARCH:SIZE" for the variable-batch case).
PROVIDERS = {"zoo": "benchmarks.zoo"}


def _builder(name: str, registry: dict, attr: str):
    prefix = name.split(":", 1)[0]
    if ":" in name and prefix in PROVIDERS:
        import functools
        import importlib
        return functools.partial(getattr(importlib.import_module(PROVIDERS[prefix]), attr), name)
    return registry[name].builder


def build_varbatch(name: str, seed: int = 0):
    """(module in eval mode, make_inputs(batch) -> tuple of inputs, deterministic per batch size)."""
    torch.manual_seed(seed)
    fn, make = _builder(name, VARBATCH, "build_varbatch")()
    fn.eval()
    for p in fn.parameters():
        p.requires_grad_(False)

    def make_inputs(b: int):
        g = torch.Generator().manual_seed(1000 + b)
        return make(b, g)

    return fn, make_inputs


def build(name: str, seed: int = 0):
    """(module in eval mode, or a plain function; tuple of example inputs)."""
    torch.manual_seed(seed)
    fn, inputs = _builder(name, MODELS, "build")()
    if isinstance(fn, nn.Module):
        fn.eval()
        for p in fn.parameters():
            p.requires_grad_(False)
    return fn, inputs


# -- tiny: per-call overhead ------------------------------------------------------------------

def tiny_fn(x):
    return torch.relu(x) * 2.0 + 1.0


@model("tiny", "tiny elementwise function, 16 floats", small=True)
def _tiny():
    return tiny_fn, (torch.randn(16),)


# -- MLP --------------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self, d_in=256, d_hidden=512, d_out=10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.fc3 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@model("mlp", "MLP 256-512-512-10, batch 64", small=True)
def _mlp():
    return MLP(), (torch.randn(64, 256),)


# -- ResNet-style conv + BN + ReLU at 224x224 -------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.down is None else self.down(x)
        return F.relu(out + identity)


class ResNetish(nn.Module):
    """ResNet-18's stem and one basic block per stage (64-128-256-512)."""

    def __init__(self, classes=1000):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.layers = nn.Sequential(BasicBlock(64, 64, 1), BasicBlock(64, 128, 2),
                                    BasicBlock(128, 256, 2), BasicBlock(256, 512, 2))
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _randomize_bn(m):
    with torch.no_grad():   # non-trivial BN statistics, so folding them matters
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m


@model("cnn", "ResNet-style conv+BN+ReLU, 1x3x224x224")
def _cnn():
    return _randomize_bn(ResNetish()), (torch.randn(1, 3, 224, 224),)


@varbatch("cnn", "the same ResNet-style net at 64x64, batch x 3 x 64 x 64")
def _cnn_varbatch():
    # 64x64 instead of 224x224: batches 1..64 at 224 are ~12x the arithmetic (minutes per loop
    # on a small machine, and as much again for the eager reference) without changing what
    # is measured here: how often each system compiles and what it stores.
    return _randomize_bn(ResNetish()), lambda b, g: (torch.randn(b, 3, 64, 64, generator=g),)


# -- small nn.TransformerEncoder --------------------------------------------------------------

@model("transformer", "nn.TransformerEncoder 2 layers, d=256, 4 heads, 4x64 tokens")
def _transformer():
    layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), (torch.randn(4, 64, 256),)


# -- BERT-base-size encoder -------------------------------------------------------------------

class BertLayer(nn.Module):
    def __init__(self, d, heads, d_ff):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d, eps=1e-12)
        self.ff1 = nn.Linear(d, d_ff)
        self.ff2 = nn.Linear(d_ff, d)
        self.ln2 = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1) @ v
        x = self.ln1(x + self.out(att.transpose(1, 2).reshape(b, s, d)))
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))


class BertEncoder(nn.Module):
    """BERT-base shape: 12 post-LN layers, width 768, 12 heads, FFN 3072, vocabulary 30522."""

    def __init__(self, vocab=30522, d=768, layers=12, heads=12, d_ff=3072, max_len=512):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(d, heads, d_ff) for _ in range(layers))
        self.register_buffer("position_ids", torch.arange(max_len).unsqueeze(0), persistent=False)

    def forward(self, ids):
        x = self.ln(self.tok(ids) + self.pos(self.position_ids[:, :ids.shape[1]]))
        for layer in self.layers:
            x = layer(x)
        return x


@model("bert", "BERT-base-size encoder (12x768, FFN 3072), 1x128 tokens")
def _bert():
    m = BertEncoder()
    with torch.no_grad():
        for p in m.parameters():   # BERT's init scale (keeps activations sane through 12 layers)
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return m, (torch.randint(0, 30522, (1, 128)),)


@varbatch("bert", "BERT-base-size encoder (12x768, FFN 3072, vocabulary 30522), batch x 16 tokens")
def _bert_varbatch():
    # The same weights as the bert row (an artifact is ~440 MB, so exact shapes store ~28 GB
    # for sizes 1..64: the varbatch workers run with a cache size limit above that); 16 tokens
    # instead of 128 keep the loop (2,080 sequences per system, each checked against eager)
    # to minutes on a 2-core machine. Weights, not activations, set the compile and disk costs.
    m = BertEncoder()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return m, lambda b, g: (torch.randint(0, 30522, (b, 16), generator=g),)
