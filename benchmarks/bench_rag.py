"""RAG on CPU: realm-jax against transformers' PyTorch RAG on the same weights, alternating
in one run.

  (a) RAG-Token and RAG-Sequence training steps: question encoder (document scores against
      K retrieved document embeddings), BART over the B x K contexts, the loss, backward,
      Adam; steps/s, generator tokens/s, and model FLOP/s (XLA's count of the compiled
      step, the same work on both sides) against the measured float32 matmul peak;
  (b) RAG-Token beam search (RagTokenForGeneration.generate), sequences/s;
  (c) RAG-Sequence thorough decoding (RagSequenceForGeneration.generate), sequences/s.

Both sides get the same context ids, masks and document scores; dropout is off on both.

    python benchmarks/bench_rag.py [--batch 8 --docs 5 --context 128 --target 24 \\
                                    --d_model 256 --layers 2 --vocab 8000 --beams 4]

Prints a markdown table; ratios are realm-jax speed / PyTorch speed measured in this run.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from common import Report, add_markdown_flag, alternate, matmul_peak_flops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--docs", type=int, default=5)
    parser.add_argument("--question", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--target", type=int, default=24)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    add_markdown_flag(parser)
    args = parser.parse_args()

    import optax
    import torch
    import transformers as tr

    from realm_jax import hf
    from realm_jax.decode import GenerationConfig, rag_sequence_generate, rag_token_generate
    from realm_jax.objectives import rag_sequence_nll, rag_token_nll, shift_targets
    from realm_jax.train.metrics import matmul_flops

    b, k, d, v = args.batch, args.docs, args.d_model, args.vocab
    heads, ffn = max(1, d // 64), 4 * d
    q_cfg = tr.DPRConfig(vocab_size=v, hidden_size=d, num_hidden_layers=args.layers,
                         num_attention_heads=heads, intermediate_size=ffn,
                         max_position_embeddings=512, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
    g_cfg = tr.BartConfig(vocab_size=v, d_model=d, encoder_layers=args.layers,
                          decoder_layers=args.layers, encoder_attention_heads=heads,
                          decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                          max_position_embeddings=512, dropout=0.0, attention_dropout=0.0,
                          activation_dropout=0.0)
    config = tr.RagConfig.from_question_encoder_generator_configs(q_cfg, g_cfg, n_docs=k)
    torch.manual_seed(0)
    token_model = tr.RagTokenForGeneration(config)
    seq_model = tr.RagSequenceForGeneration(config, question_encoder=token_model.rag.question_encoder,
                                            generator=token_model.rag.generator)
    folder = tempfile.mkdtemp()
    token_model.save_pretrained(folder, safe_serialization=True)
    cfg, params = hf.load(folder)
    params = jax.tree.map(jnp.asarray, params)

    rng = np.random.default_rng(0)
    q_ids = rng.integers(3, v, (b, args.question)).astype(np.int32)
    q_mask = np.ones_like(q_ids)
    docs = rng.normal(size=(b, k, d)).astype(np.float32)
    ctx = rng.integers(3, v, (b, k, args.context)).astype(np.int32)
    ctx_mask = np.ones_like(ctx)
    labels = rng.integers(3, v, (b, args.target)).astype(np.int32)
    labels[:, 0], labels[:, -1] = cfg.generator.bos_token_id, cfg.generator.eos_token_id
    pad = cfg.generator.pad_token_id
    batch = (q_ids, q_mask, docs, ctx, ctx_mask, labels)
    model = cfg.module()

    # (a) training steps ------------------------------------------------------------------
    peak = matmul_peak_flops()
    t = lambda a: torch.from_numpy(np.asarray(a, np.int64))
    t_batch = dict(q_ids=t(q_ids), q_mask=t(q_mask), docs=torch.from_numpy(docs),
                   ctx=t(ctx.reshape(b * k, -1)), ctx_mask=t(ctx_mask.reshape(b * k, -1)),
                   labels=t(labels))
    tokens = b * k * (args.context + args.target)
    rows = []
    for name, nll, torch_model in (("RAG-Token", rag_token_nll, token_model),
                                   ("RAG-Sequence", rag_sequence_nll, seq_model)):
        def loss_fn(p, batch, nll=nll):
            q_ids, q_mask, docs, ctx, ctx_mask, labels = batch
            out = model.apply({"params": p}, q_ids, q_mask, docs, ctx, ctx_mask, labels)
            return nll(out.logits, shift_targets(labels, pad), out.doc_scores, pad_id=pad)

        tx = optax.adam(1e-4)
        state = {"params": jax.tree.map(jnp.copy, params), "opt": tx.init(params)}

        def train_step(params, opt_state, batch, loss_fn=loss_fn, tx=tx):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        train_step = jax.jit(train_step, donate_argnums=(0, 1))
        flops = matmul_flops(train_step, state["params"], state["opt"], batch)

        def jax_step(state=state, train_step=train_step):
            state["params"], state["opt"], loss = train_step(state["params"], state["opt"], batch)
            return loss

        torch_model.train()
        optimizer = torch.optim.Adam(torch_model.parameters(), lr=1e-4)

        def torch_step(torch_model=torch_model, optimizer=optimizer):
            q = torch_model.question_encoder(t_batch["q_ids"], attention_mask=t_batch["q_mask"])[0]
            scores = torch.bmm(q.unsqueeze(1), t_batch["docs"].transpose(1, 2)).squeeze(1)
            out = torch_model(context_input_ids=t_batch["ctx"],
                              context_attention_mask=t_batch["ctx_mask"], doc_scores=scores,
                              labels=t_batch["labels"], n_docs=k, reduce_loss=True)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step = alternate({"jax": jax_step, "torch": torch_step}, args.repeats)
        rows.append((f"{name} train step (fwd + bwd + Adam), steps/s",
                     1 / step["jax"], 1 / step["torch"], ".2f"))
        rows.append((f"{name} train step, generator tokens/s", tokens / step["jax"],
                     tokens / step["torch"], ",.0f"))
        rows.append((f"{name} train step, model GFLOP/s (utilization of the matmul peak)",
                     flops / step["jax"], flops / step["torch"], "util"))

    # (b), (c) decoding, both from the weights as saved (before the training steps) --------
    scores = np.asarray(jax.jit(lambda p: model.apply(
        {"params": p}, q_ids, q_mask, docs, method=type(model).doc_scores))(params))
    scores_t = torch.from_numpy(np.array(scores))
    gen_kwargs = dict(num_beams=args.beams, max_length=args.max_length)
    gen = GenerationConfig.from_rag(cfg, **gen_kwargs)
    fresh_token = tr.RagTokenForGeneration.from_pretrained(folder).eval()
    fresh_seq = tr.RagSequenceForGeneration.from_pretrained(folder).eval()

    def jax_token():
        rag_token_generate(params, ctx, ctx_mask, scores, config=cfg, gen=gen).sequences \
            .block_until_ready()

    def torch_token():
        with torch.inference_mode():
            fresh_token.generate(context_input_ids=t_batch["ctx"],
                                 context_attention_mask=t_batch["ctx_mask"], doc_scores=scores_t,
                                 n_docs=k, **gen_kwargs)

    def jax_sequence():
        rag_sequence_generate(params, ctx, ctx_mask, scores, config=cfg, gen=gen).sequences \
            .block_until_ready()

    def torch_sequence():
        with torch.inference_mode():
            fresh_seq.generate(context_input_ids=t_batch["ctx"],
                               context_attention_mask=t_batch["ctx_mask"], doc_scores=scores_t,
                               n_docs=k, **gen_kwargs)

    repeats = max(3, args.repeats // 2)
    dec = alternate({"jax_token": jax_token, "torch_token": torch_token}, repeats)
    rows.append((f"RAG-Token beam search ({args.beams} beams, max_length {args.max_length}), "
                 "sequences/s", b / dec["jax_token"], b / dec["torch_token"], ".2f"))
    dec = alternate({"jax_seq": jax_sequence, "torch_seq": torch_sequence}, repeats)
    rows.append((f"RAG-Sequence thorough decoding ({args.beams} beams), sequences/s",
                 b / dec["jax_seq"], b / dec["torch_seq"], ".2f"))

    def cell(value, fmt):
        if fmt == "util":
            return f"{value / 1e9:,.1f} ({value / peak:.0%})"
        return format(value, fmt)

    report = Report()
    report.text(f"d_model {d}, {args.layers}+{args.layers} BART layers, {args.layers}-layer DPR "
                f"question encoder, vocab {v}; batch {b} questions x {k} documents, question "
                f"{args.question}, context {args.context}, target {args.target} tokens; JAX on "
                f"{jax.devices()[0].platform}, PyTorch with {torch.get_num_threads()} threads; "
                f"matmul peak {peak / 1e9:.0f} GFLOP/s; median of {args.repeats} alternating "
                f"steps.")
    report.table(["measurement", "realm-jax", "PyTorch", "ratio"],
                 [(name, cell(ours, fmt), cell(other, fmt), f"{ours / other:.2f}x")
                  for name, ours, other, fmt in rows])
    report.aim("RAG-Token train steps/s against PyTorch:", rows[0][1] / rows[0][2], 2.0)
    report.emit(args.markdown)

if __name__ == "__main__":
    main()
