"""jitfreeze demo: decorate a model's forward, run it cold in one process and warm in another.

    bash scripts/demo.sh            # or: .venv/bin/python examples/demo.py
"""

import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = "--child"


def child(cache_dir: str) -> None:
    t_import = time.perf_counter()
    import torch
    import torch.nn as nn

    from jitfreeze import jitfreeze

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(x + self.bn2(self.conv2(y)))

    class SmallResNet(nn.Module):
        def __init__(self, classes=10):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.blocks = nn.Sequential(Block(32), Block(32), Block(32))
            self.head = nn.Linear(32, classes)

        @jitfreeze(cache_dir=cache_dir)            # the one line jitfreeze asks for
        def forward(self, x):
            x = self.blocks(self.stem(x))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(0)
    model = SmallResNet().eval()
    x = torch.randn(8, 3, 64, 64)
    t_ready = time.perf_counter()
    with torch.no_grad():
        t0 = time.perf_counter()
        y = model(x)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(10):
            model(x)
        steady = (time.perf_counter() - t0) / 10
        eager = SmallResNet.forward.__wrapped__
        t0 = time.perf_counter()
        for _ in range(10):
            ref = eager(model, x)
        eager_time = (time.perf_counter() - t0) / 10
    print(json.dumps({
        "first_call_s": first, "steady_ms": steady * 1e3, "eager_ms": eager_time * 1e3,
        "startup_s": t_ready - t_import, "info": model.forward.cache_info()._asdict(),
        "matches_eager": bool(torch.allclose(y, ref, atol=1e-4, rtol=1e-3)),
    }))


def main() -> None:
    cache_dir = os.path.join(tempfile.mkdtemp(prefix="jitfreeze-demo-"), "cache")
    print(f"cache directory: {cache_dir}")
    results = []
    for label in ("first process (cold cache)", "second process (warm cache)"):
        out = subprocess.run([sys.executable, __file__, CHILD, cache_dir], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        info = r["info"]
        print(f"{label}: first call {r['first_call_s'] * 1e3:8.1f} ms  "
              f"(compiled {info['compiles']}, loaded from cache {info['loads']}); "
              f"steady {r['steady_ms']:.2f} ms/call vs eager {r['eager_ms']:.2f} ms/call; "
              f"matches eager: {r['matches_eager']}")
    cold, warm = results
    assert warm["info"]["loads"] == 1 and warm["info"]["compiles"] == 0, "the second process did not load from the cache"
    print(f"warm start is {cold['first_call_s'] / warm['first_call_s']:.1f}x faster than cold; "
          "the second process loaded the frozen function from the cache.")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == CHILD:
        child(sys.argv[2])
    else:
        main()
