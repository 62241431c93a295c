"""Encoder forward throughput: the Flax encoder against Hugging Face PyTorch BertModel on
the same weights (all-MiniLM-L6-v2), alternating in one run.

  (a) fixed shape: batch x length tokens of random ids (default 32 x 128), tokens/s;
  (b) real text: passages of the Wikipedia sample shipped in gensim, embedded
      - by realm_jax.TextEmbedder (length-sorted batches padded to length buckets),
      - by the same jitted Flax forward with every batch padded to the maximum length,
      - by PyTorch on length-sorted batches padded to each batch's longest row (what
        sentence-transformers does), docs/s.

    python benchmarks/bench_encoder.py [--batch 32 --length 128 --repeats 7 --passages 1000]

Prints a markdown table; ratios are "Flax speed / other speed" measured in this run.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from common import Report, add_markdown_flag, alternate, minilm_folder, wiki_sample_path


def wiki_passages(n: int, words: int = 100) -> list[str]:
    from realm_jax.data.readers import SkipCounter, read_wiki_xml

    passages = []
    for doc in read_wiki_xml(wiki_sample_path(), SkipCounter()):
        tokens = doc.text.split()
        for i in range(0, len(tokens), words):
            passages.append(f"{doc.title} / " + " ".join(tokens[i:i + words]))
            if len(passages) >= n:
                return passages
    return passages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--model", default=None, help="HF folder (default: installed MiniLM)")
    add_markdown_flag(parser)
    args = parser.parse_args()

    import torch
    import transformers

    from realm_jax import TextEmbedder, hf

    folder = minilm_folder(args.model)

    embedder = TextEmbedder.from_hf(folder)
    module = embedder.config.module()
    forward = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m))
    model = transformers.BertModel.from_pretrained(folder).eval()
    tokenizer = hf.load_tokenizer(folder)

    rows = []
    # (a) fixed shape
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (args.batch, args.length)).astype(np.int32)
    mask = np.ones_like(ids)
    t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def run_torch():
        with torch.inference_mode():
            model(t_ids, attention_mask=t_mask)

    fixed = alternate({"flax": lambda: forward(embedder.params, ids, mask).block_until_ready(),
                       "torch": run_torch}, args.repeats)
    tokens = args.batch * args.length
    rows.append((f"encoder forward {args.batch}x{args.length}, tokens/s",
                 tokens / fixed["flax"], tokens / fixed["torch"]))

    # (b) real variable-length text
    texts = wiki_passages(args.passages)
    token_rows = embedder.tokenize(texts)
    max_len = embedder.max_length
    pad = embedder.config.encoder.pad_token_id

    def flax_bucketed():
        embedder.embed_token_ids(token_rows, batch_size=args.batch)

    def flax_padded():
        outs = []
        for i in range(0, len(token_rows), args.batch):
            chunk = token_rows[i:i + args.batch]
            b_ids = np.full((args.batch, max_len), pad, np.int32)
            b_mask = np.zeros_like(b_ids)
            b_mask[:, 0] = 1
            for r, t in enumerate(chunk):
                b_ids[r, :len(t)] = t
                b_mask[r, :len(t)] = 1
            outs.append(forward(embedder.params, b_ids, b_mask))
        jax.block_until_ready(outs)

    order = np.argsort([-len(t) for t in token_rows], kind="stable")

    def torch_sorted():
        with torch.inference_mode():
            for i in range(0, len(order), args.batch):
                batch = tokenizer.pad({"input_ids": [token_rows[j] for j in order[i:i + args.batch]]},
                                      return_tensors="pt")
                out = model(**batch).last_hidden_state
                m = batch["attention_mask"].unsqueeze(-1).float()
                torch.nn.functional.normalize((out * m).sum(1) / m.sum(1), dim=-1)

    real = alternate({"bucketed": flax_bucketed, "padded": flax_padded, "torch": torch_sorted},
                     max(3, args.repeats // 2))
    n = len(texts)
    mean_len = np.mean([len(t) for t in token_rows])
    rows.append((f"embed {n} Wikipedia passages (mean {mean_len:.0f} wordpieces), docs/s: "
                 "Flax bucketed vs PyTorch length-sorted", n / real["bucketed"], n / real["torch"]))
    rows.append((f"same passages: Flax bucketed vs Flax padded to {max_len}",
                 n / real["bucketed"], n / real["padded"]))

    report = Report()
    report.text(f"JAX on {jax.devices()[0].platform}; PyTorch with {torch.get_num_threads()} "
                f"threads; median of {args.repeats} alternating calls.")
    report.table(["measurement", "realm-jax", "other", "ratio"],
                 [(name, f"{ours:,.0f}", f"{other:,.0f}", f"{ours / other:.2f}x")
                  for name, ours, other in rows])
    report.emit(args.markdown)

if __name__ == "__main__":
    main()
