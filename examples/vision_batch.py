"""A vision model over a DataLoader with worker processes and a smaller final batch.

    python examples/vision_batch.py [--quick] [--cache-dir DIR]

The model (a transformers ResNet built from a config, seeded: no download) runs in the main process
through jitfreeze; two worker processes decode the images (here: generate them, deterministically
per index). The dataset's size is not a multiple of the batch size, so the last batch is smaller:
with ``dynamic=False`` that is a second static graph (a DataLoader has only two batch sizes, full
and final), compiled once and loaded from the cache by every later run. Every batch is compared
with the eager model; the last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader, Dataset

from jitfreeze import jitfreeze


class Images(Dataset):
    """``n`` RGB images with labels, the same for an index in any process."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, self.size, self.size, generator=g), i % 10


def build_model(quick: bool) -> torch.nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10) \
        if quick else ResNetConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
                                   num_labels=10)                      # ResNet-18's shape
    torch.manual_seed(0)
    return ResNetForImageClassification(config).eval()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny model, 40 small images (for tests)")
    p.add_argument("--cache-dir", help="jitfreeze cache directory (default: the environment's)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    n, size, batch = (40, 32, 16) if args.quick else (1000, 224, 64)
    model = build_model(args.quick)
    fast = jitfreeze(model, cache_dir=args.cache_dir, dynamic=False)
    loader = DataLoader(Images(n, size), batch_size=batch, num_workers=args.workers, shuffle=False)
    sizes, correct, worst = [], 0, 0.0
    t0 = time.perf_counter()
    with torch.no_grad():
        for images, labels in loader:
            logits = fast(pixel_values=images).logits
            eager = model(pixel_values=images).logits
            worst = max(worst, (logits - eager).abs().max().item())
            assert torch.allclose(logits, eager, atol=1e-4, rtol=1e-3), "jitfreeze and eager disagree"
            sizes.append(len(images))
            correct += int((logits.argmax(-1) == labels).sum())
    seconds = time.perf_counter() - t0
    info = fast.cache_info()
    print(f"{n} images in {len(sizes)} batches {sizes} with {args.workers} workers: {seconds:.2f}s "
          f"(compiled {info.compiles}, loaded {info.loads}, fallbacks {info.fallbacks}); "
          f"max |jitfreeze - eager| {worst:.2e}; accuracy of the untrained model {correct / n:.2f}")
    result = {"batch_sizes": sizes, "info": info._asdict(), "max_abs_diff": worst, "matches_eager": True,
              "seconds": seconds}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
