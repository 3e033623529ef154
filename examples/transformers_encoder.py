"""Sentence embeddings (mean pooling) with padded batches, through jitfreeze.

    python examples/transformers_encoder.py [--quick] [--cache-dir DIR]

A transformers BERT encoder built from a config (seeded weights; words hashed to ids as a stand-in
for a tokenizer: no download) and mean pooling over the attention mask, in one module that jitfreeze
wraps. Batches are padded to a multiple of 8 tokens, so lengths vary from batch to batch: jitfreeze's
automatic dynamic shapes compile the first length statically and, when the length changes, one graph
with a symbolic sequence dim that serves every later length. Each embedding is checked against eager,
and against the same sentence embedded alone (padding must not change it). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import zlib

import torch

from jitfreeze import jitfreeze

VOCAB, PAD, CLS, SEP = 1000, 0, 1, 2
SENTENCES = [
    "jitfreeze caches frozen graphs on disk",
    "a second process loads them instead of compiling",
    "padding must not change an embedding",
    "short one",
    "mean pooling averages the token vectors that the attention mask keeps, and only those, so a padded"
    " batch gives every sentence the embedding it has alone",
    "sentence embeddings",
    "the last batch is smaller than the others",
]


class SentenceEncoder(torch.nn.Module):
    def __init__(self, quick: bool):
        super().__init__()
        from transformers import BertConfig, BertModel

        size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if quick \
            else dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        torch.manual_seed(0)
        self.bert = BertModel(BertConfig(vocab_size=VOCAB, max_position_embeddings=128, **size), add_pooling_layer=False)

    def forward(self, input_ids, attention_mask):
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def tokenize(texts: list[str], multiple: int = 8) -> dict[str, torch.Tensor]:
    rows = [[CLS] + [3 + zlib.crc32(w.encode()) % (VOCAB - 3) for w in t.lower().split()] + [SEP] for t in texts]
    length = -(-max(map(len, rows)) // multiple) * multiple
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny encoder (for tests)")
    p.add_argument("--cache-dir", help="jitfreeze cache directory (default: the environment's)")
    p.add_argument("--batch-size", type=int, default=3)
    args = p.parse_args(argv)
    model = SentenceEncoder(args.quick).eval()
    fast = jitfreeze(model, cache_dir=args.cache_dir)
    embeddings, shapes, worst = [], [], 0.0
    with torch.no_grad():
        for i in range(0, len(SENTENCES), args.batch_size):
            batch = tokenize(SENTENCES[i:i + args.batch_size])
            out = fast(**batch)
            ref = model(**batch)
            worst = max(worst, (out - ref).abs().max().item())
            assert torch.allclose(out, ref, atol=1e-4, rtol=1e-3), "jitfreeze and eager disagree"
            shapes.append(list(batch["input_ids"].shape))
            embeddings.append(out)
        emb = torch.cat(embeddings)
        alone = torch.cat([model(**tokenize([s], multiple=1)) for s in SENTENCES])    # no padding at all
        padding_diff = (emb - alone).abs().max().item()
        assert padding_diff < 1e-4, f"padding changed an embedding by {padding_diff}"
    info = fast.cache_info()
    sim = emb @ emb.T
    print(f"{len(SENTENCES)} sentences in batches of shape {shapes}: dim {emb.shape[1]}; "
          f"compiled {info.compiles}, loaded {info.loads}, fallbacks {info.fallbacks}; "
          f"max |jitfreeze - eager| {worst:.2e}; max |padded - alone| {padding_diff:.2e}")
    print(f"most similar to {SENTENCES[0]!r}: {SENTENCES[int(sim[0, 1:].argmax()) + 1]!r}")
    result = {"shapes": shapes, "info": info._asdict(), "max_abs_diff": worst, "padding_diff": padding_diff,
              "matches_eager": True, "dim": emb.shape[1]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
