"""An HTTP text-classification service (FastAPI + uvicorn) whose model runs through jitfreeze.

    python examples/service/app.py --port 8000 [--quick] [--cache-dir DIR]
    curl -s localhost:8000/classify -H 'content-type: application/json' -d '{"texts": ["a fine film"]}'

The model is a transformers BERT sequence classifier built from a config (seeded weights, no
download), so every process builds the same weights and finds the same cache entries. Requests are
padded to a few (batch, length) buckets; at start-up ``jitfreeze.precompile`` compiles (first
process) or loads (every later one) the graph of each bucket before the server accepts requests.

    POST /classify {"texts": [...]}  -> {"labels": [...], "scores": [[...], ...]}
    GET  /stats                      -> the function's cache_info() and the start-up precompile counts
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib

import torch
from pydantic import BaseModel

import jitfreeze
from jitfreeze import jitfreeze as jf

LABELS = ["negative", "neutral", "positive"]
VOCAB = 1000
PAD, CLS, SEP = 0, 1, 2


class ClassifyRequest(BaseModel):
    texts: list[str]


def buckets(quick: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(batch sizes, sequence lengths) requests are padded to."""
    return ((1, 4), (16,)) if quick else ((1, 4, 16), (16, 32, 64))


def build_model(quick: bool) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if quick else \
        dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    config = BertConfig(vocab_size=VOCAB, max_position_embeddings=128, num_labels=len(LABELS), **size)
    torch.manual_seed(0)                  # the same weights in every process: the same cache keys
    return BertForSequenceClassification(config).eval()


def tokenize(texts: list[str], quick: bool) -> dict[str, torch.Tensor]:
    """Word ids by hash (a stand-in for a real tokenizer: no download), padded to a bucket."""
    batch_sizes, lengths = buckets(quick)
    rows = [[CLS] + [3 + zlib.crc32(w.encode()) % (VOCAB - 3) for w in t.lower().split()] + [SEP] for t in texts]
    n = next((b for b in batch_sizes if b >= len(rows)), None)
    length = next((s for s in lengths if s >= max(map(len, rows))), None)
    if n is None or length is None:
        raise ValueError(f"at most {batch_sizes[-1]} texts of at most {lengths[-1] - 2} words")
    ids = torch.full((n, length), PAD, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, row in enumerate(rows + [[CLS, SEP]] * (n - len(rows))):     # padding rows: empty texts
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def classify(model, texts: list[str], quick: bool) -> dict:
    """What the service answers; ``model`` is the jitfreeze function or the eager model."""
    with torch.no_grad():
        logits = model(**tokenize(texts, quick)).logits[:len(texts)]
    scores = logits.softmax(-1)
    return {"labels": [LABELS[i] for i in scores.argmax(-1).tolist()], "scores": scores.tolist()}


def all_buckets(quick: bool) -> list[dict]:
    """One example per bucket, for jitfreeze.precompile."""
    batch_sizes, lengths = buckets(quick)
    return [tokenize(["x " * (s - 3)] * b, quick) for b in batch_sizes for s in lengths]


def make_function(quick: bool, cache_dir: str | None = None):
    """The jitfreeze-wrapped classifier: exact shapes (requests come in buckets), one graph per bucket."""
    batch_sizes, lengths = buckets(quick)
    return jf(build_model(quick), cache_dir=cache_dir, dynamic=False, max_signatures=len(batch_sizes) * len(lengths))


def precompile_entry(shapes=None):
    """For ``jitfreeze precompile app:precompile_entry [--shapes 1,4,16]`` (examples/image): the service's
    function and one example per bucket; ``shapes``: batch sizes to compile instead of the service's own
    (``SERVICE_QUICK=1``: the quick model)."""
    quick = os.environ.get("SERVICE_QUICK") == "1"
    examples = all_buckets(quick)
    if shapes is not None:
        lengths = buckets(quick)[1]
        examples = [tokenize(["x " * (s - 3)] * b, quick) for b in shapes for s in lengths]
    return make_function(quick), examples


def make_app(quick: bool, cache_dir: str | None = None):
    from fastapi import FastAPI, HTTPException

    fast = make_function(quick, cache_dir)
    report = jitfreeze.precompile(fast, all_buckets(quick))      # before the first request, not on it
    app = FastAPI(title="jitfreeze text classifier")

    @app.post("/classify")
    def post_classify(req: ClassifyRequest) -> dict:    # a plain def: FastAPI runs it in its thread pool
        if not req.texts:
            raise HTTPException(400, "texts is empty")
        try:
            return classify(fast, req.texts, quick)
        except ValueError as exc:
            raise HTTPException(413, str(exc)) from None

    @app.get("/stats")
    def stats() -> dict:
        return {"cache_info": fast.cache_info()._asdict(), "precompile": report.counts()}

    return app


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--quick", action="store_true", default=os.environ.get("SERVICE_QUICK") == "1",
                   help="a tiny model and two buckets, for tests (also SERVICE_QUICK=1)")
    p.add_argument("--cache-dir", help="jitfreeze cache directory (default: the environment's)")
    args = p.parse_args(argv)
    import uvicorn

    torch.set_num_threads(int(os.environ.get("SERVICE_THREADS", "1")))
    app = make_app(args.quick, args.cache_dir)
    print(f"serving on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
