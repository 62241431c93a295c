"""The DPR training step against sentence-transformers, and the gradient cache's memory.

`throughput` (the default): the trainer's DPR step (`realm_jax.train.trainer.jit_train_step`
over the DPR task's loss: in-batch + one hard negative per question, all-MiniLM-L6-v2
towers, mean-pooled and normalised, logits 20 x cosine; clipping and AdamW as
`make_optimizer`), plain and with the gradient cache (`train.grad_cache_chunk_size`),
against the same training step in PyTorch with sentence-transformers:
`MultipleNegativesRankingLoss` (scale 20, cosine: the same loss) and its gradient-cache
twin `CachedMultipleNegativesRankingLoss` (mini-batches of the same chunk size) on the
same MiniLM weights, with the same (question, positive, hard negative) token rows, every
row at full length, so no side gains from padding less, and tokenization left out of both.
Each candidate runs --steps steps per round, the candidates interleaved round by round
(--rounds), so that other jobs on the host slow them alike; the first step of each is
warm-up (compilation). Reported: training examples (questions) per second, the median
over rounds with the range, and each against sentence-transformers' plain step. All run
in training mode (dropout on).

`memory`: for each global batch size (--batch_sizes), the trainer's step compiled plain and
with the gradient cache (chunks of --chunk_size rows), and XLA's memory analysis of each:
arguments (parameters, optimizer state, batch), temporaries (activations and workspace) and
their sum less what the donated state aliases. Deterministic for a given jax version.

    python benchmarks/bench_retriever_step.py throughput --batch_size 16 --rounds 3 --steps 2
    python benchmarks/bench_retriever_step.py memory --batch_sizes 16,64,256,1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from common import Report, add_markdown_flag, minilm_folder

CPU_KNOBS = ("model.encoder.dtype=float32", "model.encoder.scan_layers=false",
             "model.encoder.remat=false", "model.encoder.attention=einsum")


def dpr_config(batch_size: int, chunk_size: int, question_length: int, passage_length: int):
    from realm_jax import config as config_lib

    return config_lib.load_config(
        "dpr", f"model.init_from_hf={minilm_folder()}", *CPU_KNOBS,
        f"train.batch_size={batch_size}", f"train.grad_cache_chunk_size={chunk_size}",
        "train.loss_scale=20", "train.learning_rate=2e-5", "train.warmup_steps=0",
        "train.steps=1000", f"dpr.question_length={question_length}",
        f"dpr.passage_length={passage_length}", "dpr.num_hard_negatives=1")


def token_rows(batch_size: int, question_length: int, passage_length: int,
               vocab: int = 30522, seed: int = 0) -> dict:
    """Full-length rows ([CLS] random wordpieces [SEP]): questions [B, Q]; passages
    [2B, L], question i's positive at 2i and its hard negative at 2i + 1."""
    rng = np.random.default_rng(seed)

    def rows(n, length):
        ids = rng.integers(1000, vocab, (n, length)).astype(np.int32)
        ids[:, 0], ids[:, -1] = 101, 102
        return ids

    q, d = rows(batch_size, question_length), rows(2 * batch_size, passage_length)
    return dict(query_ids=q, query_mask=np.ones_like(q), doc_ids=d, doc_mask=np.ones_like(d),
                doc_valid=np.ones(len(d), bool))


class JaxStep:
    """The trainer's DPR step for `config`, its state, and the batch placed on the mesh."""

    def __init__(self, config, rows: dict):
        import jax

        from realm_jax import sharding, tasks
        from realm_jax.train.optim import make_optimizer
        from realm_jax.train.state import create_state, state_shardings
        from realm_jax.train.trainer import jit_train_step

        task = tasks.get("dpr")(config)
        configs, host_params = task.build()
        self.mesh = sharding.mesh_from_config(config)
        self.rules = sharding.rules_from_config(config)
        batch_sharding = sharding.batch_sharding(self.mesh)
        optimizer = make_optimizer(config.train, task.lr_multipliers())
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host_params)
        shardings = state_shardings(optimizer, abstract,
                                    task.param_shardings(configs, self.mesh, self.rules),
                                    self.mesh)
        self.state = create_state(optimizer, sharding.place(host_params, shardings.params),
                                  shardings)
        self.batch = sharding.global_batch(rows, batch_sharding)
        self.rng = jax.random.key(0)
        self.step = jit_train_step(task.loss, optimizer, shardings, batch_sharding,
                                   value_and_grad=task.value_and_grad)

    def compiled(self):
        from realm_jax import sharding

        with sharding.activate(self.mesh, self.rules):
            return self.step.lower(self.state, self.batch, None, self.rng).compile()

    def run(self) -> float:
        """One step; its loss (waited for)."""
        from realm_jax import sharding

        with sharding.activate(self.mesh, self.rules):
            self.state, metrics = self.step(self.state, self.batch, None, self.rng)
        return float(metrics["loss"])


class TorchStep:
    """sentence-transformers' training step (what its trainer does per batch: loss,
    backward, gradient clipping at 1.0, AdamW, zero_grad) on MiniLM."""

    def __init__(self, rows: dict, cached_chunk: int = 0):
        import torch
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer import losses

        torch.manual_seed(0)
        self.torch = torch
        self.model = SentenceTransformer(minilm_folder(), device="cpu")
        self.model.train()
        if cached_chunk:
            self.loss = losses.CachedMultipleNegativesRankingLoss(
                self.model, scale=20.0, mini_batch_size=cached_chunk)
        else:
            self.loss = losses.MultipleNegativesRankingLoss(self.model, scale=20.0)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=2e-5, eps=1e-6,
                                           weight_decay=0.01)

        def features(ids):
            ids = torch.from_numpy(ids.astype(np.int64))
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "token_type_ids": torch.zeros_like(ids)}

        docs = rows["doc_ids"]
        self.features = [features(rows["query_ids"]), features(docs[0::2]),
                         features(docs[1::2])]
        self.labels = torch.arange(len(rows["query_ids"]))

    def run(self) -> float:
        loss = self.loss([dict(f) for f in self.features], self.labels)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss)


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"


def throughput(args, report: Report) -> None:
    rows = token_rows(args.batch_size, args.question_length, args.passage_length)
    lengths = (args.question_length, args.passage_length)
    candidates = {
        "realm-jax DPR step": JaxStep(dpr_config(args.batch_size, 0, *lengths), rows),
        f"realm-jax DPR step, gradient cache (chunks of {args.chunk_size})":
            JaxStep(dpr_config(args.batch_size, args.chunk_size, *lengths), rows),
        "sentence-transformers MultipleNegativesRankingLoss": TorchStep(rows),
        f"sentence-transformers CachedMultipleNegativesRankingLoss (mini-batches of "
        f"{args.chunk_size})": TorchStep(rows, args.chunk_size),
    }
    first = {name: c.run() for name, c in candidates.items()}  # warm-up: compilation
    print("first-step losses:", first, flush=True)
    loads = [load_text()]
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    for r in range(args.rounds):
        for name, c in candidates.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                c.run()
            rates[name].append(args.batch_size * args.steps / (time.perf_counter() - start))
        loads.append(load_text())
        print(f"round {r + 1}:", {n: f"{v[-1]:.2f}" for n, v in rates.items()}, flush=True)
    base = rates["sentence-transformers MultipleNegativesRankingLoss"]
    table = []
    for name, values in rates.items():
        ratios = [v / b for v, b in zip(values, base)]
        table.append((name, f"{statistics.median(values):.2f}",
                      f"{min(values):.2f}-{max(values):.2f}",
                      f"{statistics.median(ratios):.2f}x",
                      f"{min(ratios):.2f}-{max(ratios):.2f}x"))
    report.text(
        f"DPR training step on all-MiniLM-L6-v2 (CPU, float32): {args.batch_size} questions, "
        f"each with its positive and one hard negative ({2 * args.batch_size} passages, all "
        f"in-batch negatives), questions of {args.question_length} and passages of "
        f"{args.passage_length} wordpieces; {args.rounds} rounds of {args.steps} steps per "
        f"candidate, interleaved. Load average (1 / 5 / 15 min) before and after each round: "
        f"{'; '.join(loads)}. First-step losses (same weights and rows, dropout on in both, so "
        f"they differ by its noise; the losses on equal embeddings are equal, "
        f"tests/test_retrieval_objectives.py): "
        + ", ".join(f"{n.split(' ')[0]} {v:.5f}" for n, v in list(first.items())[::2]) + ".")
    report.table(["step", "examples/s (median)", "range", "vs sentence-transformers MNRL",
                  "ratio range"], table)


def memory(args, report: Report) -> None:
    rows = []
    for b in (int(x) for x in args.batch_sizes.split(",")):
        data = token_rows(b, args.question_length, args.passage_length)
        for chunk in (0, args.chunk_size):
            step = JaxStep(dpr_config(b, chunk, args.question_length, args.passage_length), data)
            m = step.compiled().memory_analysis()
            total = (m.argument_size_in_bytes + m.output_size_in_bytes
                     + m.temp_size_in_bytes - m.alias_size_in_bytes)
            mib = lambda x: f"{x / 2 ** 20:.1f}"  # noqa: E731
            rows.append((b, 2 * b, f"gradient cache ({chunk})" if chunk else "plain",
                         mib(m.argument_size_in_bytes), mib(m.temp_size_in_bytes), mib(total)))
            print(rows[-1], flush=True)
            del step
    report.text(
        f"The trainer's DPR step on all-MiniLM-L6-v2 (float32, CPU), compiled for each global "
        f"batch (questions; passages = 2x with one hard negative each), questions of "
        f"{args.question_length} and passages of {args.passage_length} wordpieces; XLA's "
        f"memory analysis in MiB. Arguments: parameters, AdamW state and the batch; "
        f"temporaries: activations and workspace; peak: arguments + outputs + temporaries - "
        f"the donated state's aliasing.")
    report.table(["questions", "passages", "step", "arguments", "temporaries", "peak"],
                 rows, numeric_from=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", choices=("throughput", "memory"),
                        default="throughput")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--batch_sizes", default="16,64,256,1024")
    parser.add_argument("--chunk_size", type=int, default=8)
    parser.add_argument("--question_length", type=int, default=32)
    parser.add_argument("--passage_length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    add_markdown_flag(parser)
    args = parser.parse_args()
    report = Report()
    (throughput if args.what == "throughput" else memory)(args, report)
    report.emit(args.markdown)


if __name__ == "__main__":
    main()
