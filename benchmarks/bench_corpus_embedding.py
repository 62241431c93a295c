"""Corpus embedding throughput: realm-jax against Hugging Face PyTorch on the same model
(all-MiniLM-L6-v2) and corpus (the Wikipedia sample shipped in gensim, as DPR passages
made by `prepare_corpus` with the MiniLM tokenizer), alternating in one run.

  - realm-jax: `realm_jax.index.embed_corpus` over the block store: rows
    [CLS] title [SEP] text [SEP] built from the stored tokens, length-bucketed batches on
    all local devices (on a CPU host, one JAX device per core, as `realm-jax embed-corpus`
    and the refresher set up by default: `--cpu_devices`), float16 output;
  - PyTorch, the way a user does it (sentence-transformers' `encode`): passages sorted by
    length, each batch tokenized as (title, text) pairs and padded to its longest row,
    BertModel forward, mean pooling, L2 normalization, numpy out;
  - PyTorch on the pre-tokenized rows (model time only, no tokenizer), for reference.

    python benchmarks/bench_corpus_embedding.py [--limit 1000 --batch 32 --repeats 3]

Prints a markdown table; ratios are "realm-jax docs/s / other docs/s" measured in this run.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np
from common import Report, add_markdown_flag, alternate, minilm_folder, wiki_sample_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=1000,
                        help="embed the first N passages (0: all 4467)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=256,
                        help="row cap (MiniLM's max_seq_length is 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="HF folder (default: installed MiniLM)")
    parser.add_argument("--workdir", default=None, help="where the block store goes")
    parser.add_argument("--cpu_devices", type=int, default=0,
                        help="as `realm-jax embed-corpus --cpu_devices` (0: one per core)")
    add_markdown_flag(parser)
    args = parser.parse_args()
    from realm_jax import sharding
    sharding.use_cpu_devices(args.cpu_devices)

    import torch
    import transformers
    from realm_jax import hf
    from realm_jax.data import BlockStore, prepare_corpus
    from realm_jax.index import embed_corpus as ec

    folder = minilm_folder(args.model)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_corpus_")
    result = prepare_corpus(wiki_sample_path(), os.path.join(workdir, "wiki_dpr"),
                            tokenizer=folder, mode="dpr", overwrite=True, progress=False)
    store = BlockStore.open(result.path)
    n = min(args.limit or len(store), len(store))
    ids = np.arange(n)

    # realm-jax
    config, params = hf.load_embedder(folder)
    embedder = ec.CorpusEmbedder(config, batch_size=args.batch, dtype="float16")
    rows = ec.RowBuilder.for_store(store, folder, max_length=args.max_length)
    placed = embedder.place(params)
    ours_out = {}

    def ours():
        ours_out["emb"] = embedder.embed_blocks(placed, rows, ids)

    # PyTorch, as sentence-transformers' encode does it
    tokenizer = hf.load_tokenizer(folder)
    model = transformers.BertModel.from_pretrained(folder).eval()
    titles = [store.title(i) for i in ids]
    texts = [store.text(i) for i in ids]
    by_length = np.argsort([-(len(t) + len(x)) for t, x in zip(titles, texts)], kind="stable")
    torch_out = {}

    def pool(out, mask):
        m = mask.unsqueeze(-1).float()
        return torch.nn.functional.normalize((out * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    def torch_user():
        result = np.zeros((n, config.output_dim), np.float32)
        with torch.inference_mode():
            for i in range(0, n, args.batch):
                idx = by_length[i:i + args.batch]
                batch = tokenizer([titles[j] for j in idx], [texts[j] for j in idx],
                                  padding=True, truncation="longest_first",
                                  max_length=args.max_length, return_tensors="pt")
                out = model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).last_hidden_state
                result[idx] = pool(out, batch["attention_mask"]).numpy()
        torch_out["emb"] = result

    token_rows = rows.rows(ids)
    by_rows = np.argsort([-len(r) for r in token_rows], kind="stable")

    def torch_pretokenized():
        with torch.inference_mode():
            for i in range(0, n, args.batch):
                chunk = [token_rows[j].tolist() for j in by_rows[i:i + args.batch]]
                batch = tokenizer.pad({"input_ids": chunk}, return_tensors="pt")
                out = model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).last_hidden_state
                pool(out, batch["attention_mask"]).numpy()

    seconds = alternate({"ours": ours, "torch_user": torch_user,
                         "torch_pretokenized": torch_pretokenized}, args.repeats)
    agree = float(np.min(np.sum(ours_out["emb"].astype(np.float32) * torch_out["emb"], axis=1)))
    lengths, _ = rows.lengths_and_titles(ids)

    report = Report()
    report.text(f"{n} of {len(store)} DPR passages, rows of mean {lengths.mean():.0f} wordpieces "
                f"([CLS] title [SEP] text [SEP], cap {args.max_length}); batch {args.batch}; "
                f"JAX on {len(jax.local_devices())} x {jax.devices()[0].platform}, PyTorch with "
                f"{torch.get_num_threads()} threads; median of {args.repeats} alternating runs; "
                f"lowest cosine between the two frameworks' embeddings {agree:.5f}.")
    ours_rate = n / seconds["ours"]
    rows = []
    for name, label in (("ours", "realm-jax embed_corpus (block store, bucketed, float16 out)"),
                        ("torch_user", "HF PyTorch, sentence-transformers style "
                                       "(length-sorted, tokenize + pad per batch)"),
                        ("torch_pretokenized", "HF PyTorch on pre-tokenized rows "
                                               "(length-sorted, pad per batch)")):
        rate = n / seconds[name]
        rows.append((label, f"{rate:,.1f}", f"{ours_rate / rate:.2f}x"))
    report.table(["embedding the corpus with all-MiniLM-L6-v2", "docs/s", "realm-jax vs this"],
                 rows)
    report.aim("docs/s against PyTorch done the sentence-transformers way:",
               seconds["torch_user"] / seconds["ours"], 1.3)
    report.emit(args.markdown)

if __name__ == "__main__":
    main()
