"""Expert-token training cost: cached features (routing/train.py) vs two references.

The cheapest correct alternative (``frozen``): every step runs the frozen meta without gradients to get only
the batch's last hidden states, then trains the expert rows on them (no backward through the network): what a
careful user would write without the feature cache. The paper repository's method (``reference``) is the paper's training as a vocabulary extension: the expert tokens are new rows of the
(tied) token-embedding / LM-head matrix, only they are trainable, and every step runs the frozen meta
forward over the whole batch, computes logits over [W_V; W_E] at every position (as a causal LM does), takes
the cross-entropy of the expert token at the query's last position, and backpropagates through the whole
network (the embedding matrix requires grad). Both methods use the same initial rows, batch order, AdamW and
cosine schedule, so they follow the same trajectory: the final losses are printed side by side.

    python bench/train_cost.py [--model DIR] [--queries 96] [--experts 4] [--epochs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F


def synthetic_sets(vocab: int, n: int, experts: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Queries of 24-64 random tokens; each expert's queries share a prefix so the task is learnable."""
    g = torch.Generator().manual_seed(seed)
    prefixes = [torch.randint(0, vocab, (6,), generator=g).tolist() for _ in range(experts)]
    queries, targets = [], []
    for i in range(n):
        e = i % experts
        length = int(torch.randint(24, 65, (1,), generator=g))
        queries.append(prefixes[e] + torch.randint(0, vocab, (length,), generator=g).tolist())
        targets.append(e)
    return queries, targets


def cached_method(model_dir, queries, targets, experts, cfg):
    from etr.models import load_model
    from etr.routing.train import query_features, train_rows
    start = time.perf_counter()
    model = load_model(model_dir, torch.float32, "cpu", max_positions=256)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    features = query_features(model, queries, targets, batch_size=cfg.batch_size)
    features_s = time.perf_counter() - start
    init = model.lm_head_weight.float().mean(0, keepdim=True).repeat(experts, 1)
    start = time.perf_counter()
    train_rows(features, init, cfg=cfg)
    return {"load_s": load_s, "features_s": features_s, "train_s": time.perf_counter() - start,
            "total_s": features_s + time.perf_counter() - start, "final_loss": cfg.log[-1]["loss"]}


def frozen_forward_method(model_dir, queries, targets, experts, cfg):
    """Each step: a no-grad forward for the batch's last hidden states, then the loss over [W_V; W_E] rows."""
    from etr.models import load_model
    from etr.routing.nll import last_hidden
    model = load_model(model_dir, torch.float32, "cpu", max_positions=256)
    w_vocab = model.lm_head_weight.float()

    def loss_of(new, batch, batch_targets):
        with torch.no_grad():
            h = last_hidden(model, batch, batch_size=len(batch))
            vocab_logits = h @ w_vocab.T
        logits = torch.cat([vocab_logits, h @ new.T], dim=-1)
        return F.cross_entropy(logits, torch.tensor(batch_targets) + w_vocab.shape[0])
    return _train(loss_of, w_vocab, queries, targets, experts, cfg)


def reference_method(model_dir, queries, targets, experts, cfg):
    from transformers import AutoModelForCausalLM
    start = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    for p in hf.parameters():
        p.requires_grad_(False)
    w_vocab = hf.get_output_embeddings().weight

    def loss_of(new, batch, batch_targets):
        return _reference_loss(hf, w_vocab, new, batch, batch_targets, w_vocab.shape[0])
    return {"load_s": load_s, **_train(loss_of, w_vocab, queries, targets, experts, cfg)}


def _train(loss_of, w_vocab, queries, targets, experts, cfg) -> dict:
    """The shared schedule: rows from the mean vocabulary row, AdamW, cosine with warm-up, seeded batch order."""
    from etr.routing.train import cosine_lr
    new = torch.nn.Parameter(w_vocab.detach().float().mean(0, keepdim=True).repeat(experts, 1).clone())
    opt = torch.optim.AdamW([new], lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(queries)
    total = math.ceil(n / cfg.batch_size) * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, cfg.warmup_steps))
    g = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        for s in range(0, n, cfg.batch_size):
            idx = order[s:s + cfg.batch_size].tolist()
            loss = loss_of(new, [queries[i] for i in idx], [targets[i] for i in idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return {"total_s": time.perf_counter() - start, "final_loss": loss.item()}


def _reference_loss(hf, w_vocab, new, batch, targets, vocab):
    emb = torch.cat([w_vocab, new])  # the extended, tied embedding / LM-head matrix
    width = max(len(q) for q in batch)
    ids = torch.tensor([q + [0] * (width - len(q)) for q in batch])
    mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in batch])
    hidden = hf.model(inputs_embeds=F.embedding(ids, emb), attention_mask=mask).last_hidden_state
    logits = hidden @ emb.T  # every position, as a causal LM computes them
    last = logits[torch.arange(len(batch)), torch.tensor([len(q) - 1 for q in batch])]
    return F.cross_entropy(last, torch.tensor(targets) + vocab)


def main(argv=None) -> None:
    from etr.routing.train import TrainConfig
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="meta checkpoint (default: embedded SmolLM2-135M)")
    ap.add_argument("--queries", type=int, default=96)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    if args.model is None:
        from etr.default_model import default_model_dir
        args.model = str(default_model_dir(torch.float32))
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    queries, targets = synthetic_sets(vocab, args.queries, args.experts, seed=0)
    cached = cached_method(args.model, queries, targets, args.experts, TrainConfig(epochs=args.epochs))
    frozen = frozen_forward_method(args.model, queries, targets, args.experts, TrainConfig(epochs=args.epochs))
    ref = reference_method(args.model, queries, targets, args.experts, TrainConfig(epochs=args.epochs))
    ratio, frozen_ratio = ref["total_s"] / cached["total_s"], frozen["total_s"] / cached["total_s"]
    print(f"model {args.model}: {args.queries} queries, {args.experts} experts, {args.epochs} epochs, batch 16")
    print(f"{'method':<16}{'seconds':>9}{'final loss':>12}")
    print(f"{'cached':<16}{cached['total_s']:>9.2f}{cached['final_loss']:>12.5f}   "
          f"(features {cached['features_s']:.2f} s + training {cached['train_s']:.3f} s)")
    print(f"{'frozen forward':<16}{frozen['total_s']:>9.2f}{frozen['final_loss']:>12.5f}")
    print(f"{'reference':<16}{ref['total_s']:>9.2f}{ref['final_loss']:>12.5f}")
    print(f"speed-up: {frozen_ratio:.1f}x over the frozen forward, {ratio:.1f}x over the paper's method "
          "(model loading excluded from all)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cached": cached, "frozen": frozen, "reference": ref, "ratio": ratio,
                       "frozen_ratio": frozen_ratio, "queries": args.queries,
                       "experts": args.experts, "epochs": args.epochs}, f, indent=1)


if __name__ == "__main__":
    main()
