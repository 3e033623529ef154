"""Small seeded models shared by the tests (and by subprocess scripts: ``from tests.models import ...``)."""

import torch
import torch.nn as nn


class MLP(nn.Module):
    def __init__(self, d_in=16, d_hidden=32, d_out=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class ConvBN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.b2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Projected(nn.Module):
    """A module with a tensor it does not register (a plain attribute): not one of its parameters
    or buffers, so the artifact stores it (48 KB: above diskcache's 32 KiB, a value file), while
    registered weights are bound at load and leave artifacts small (kept inline in cache.db)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 128)
        self.proj = torch.randn(128, 96)

    def forward(self, x):
        return torch.relu(self.fc(x)) @ self.proj


def make(name, seed=0):
    torch.manual_seed(seed)
    if name == "mlp":
        return MLP().eval(), (torch.randn(4, 16),)
    if name == "cnn":
        m = ConvBN().eval()
        with torch.no_grad():   # non-trivial running stats, so BN folding matters
            for bn in (m.b1, m.b2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
        return m, (torch.randn(2, 3, 16, 16),)
    if name == "projected":
        return Projected().eval(), (torch.randn(4, 16),)
    if name == "transformer":
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval(), (torch.randn(2, 10, 32),)
    raise KeyError(name)


