"""Fine-tuning a chat model into a domain expert: chat-formatted question/answer pairs, the loss on the
answer and its end-of-turn token only, bf16 autocast over float32 weights, optionally only the top layers.

When only the top layers train, the frozen bottom's output for an example never changes: it is computed once
per example (``frozen_inputs``) and every step runs only the top layers on it. Logits are taken at the answer's
positions only (the vocabulary is 49,152 rows: at every position the LM head would cost as much as eight
decoder layers)."""

from __future__ import annotations

import math
import random
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

Example = tuple[list[int], list[int]]


def chat_example(tokenizer, question: str, answer: str) -> Example:
    """Token ids of one user turn with the assistant's answer, and the labels (-100 outside the answer)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)
    full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}], tokenize=False)
    p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    ids = tokenizer(full.rstrip("\n"), add_special_tokens=False).input_ids  # ends with the end-of-turn token
    if ids[:len(p_ids)] != p_ids:
        raise ValueError(f"the chat template does not extend the prompt with the answer for {question!r}")
    return ids, [-100] * len(p_ids) + ids[len(p_ids):]


def batch(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and labels."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, mask, labels


def pad_hidden(hidden: list[torch.Tensor]) -> torch.Tensor:
    """Right-padded ``[B, width, d]`` from per-example ``[len, d]`` hidden states (zeros past each end)."""
    out = hidden[0].new_zeros(len(hidden), max(h.shape[0] for h in hidden), hidden[0].shape[1])
    for i, h in enumerate(hidden):
        out[i, :h.shape[0]] = h
    return out


def trainable_top(model, layers: int | None) -> list[torch.nn.Parameter]:
    """Unfreeze the top ``layers`` decoder layers and the final norm (None: every parameter)."""
    if layers is None:
        return [p.requires_grad_(True) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for layer in model.model.layers[-layers:] for p in layer.parameters()]
    params += list(model.model.norm.parameters())
    return [p.requires_grad_(True) for p in params]


@contextmanager
def layer_range(model, layers: slice, final_norm: bool):
    """Inside the block, the model's decoder runs only the decoder layers ``layers`` (its final norm only if
    ``final_norm``); the whole model is restored on leaving, exception or not."""
    inner = model.model
    saved = inner.layers, inner.norm, inner.config.num_hidden_layers
    inner.layers = torch.nn.ModuleList(list(saved[0])[layers])
    inner.norm = saved[1] if final_norm else torch.nn.Identity()
    inner.config.num_hidden_layers = len(inner.layers)  # the decoder runs layers[:num_hidden_layers]
    try:
        yield model
    finally:
        inner.layers, inner.norm, inner.config.num_hidden_layers = saved


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()


@torch.no_grad()
def frozen_inputs(model, examples: list[Example], frozen: int, pad_id: int, autocast: bool = True,
                  chunk: int = 32) -> list[torch.Tensor]:
    """Per example, the float32 hidden states ``[len, d]`` entering decoder layer ``frozen`` (batched by
    length; causal attention makes an example's states independent of the padding after it)."""
    out: list[torch.Tensor | None] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    with layer_range(model, slice(0, frozen), final_norm=False), _autocast(autocast):
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            ids, mask, _ = batch([examples[i] for i in idx], pad_id)
            h = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.float()
            for row, i in enumerate(idx):
                out[i] = h[row, :len(examples[i][0])].clone()
    return out


def answer_loss(model, mask: torch.Tensor, labels: torch.Tensor, **inputs) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (what HF's ``labels=`` loss computes), with logits at those
    positions only; ``inputs``: ``input_ids`` or ``inputs_embeds`` for the decoder."""
    h = model.model(attention_mask=mask, use_cache=False, **inputs).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    return torch.nn.functional.cross_entropy(model.lm_head(h[keep]).float(), target[keep])


def fine_tune(meta_dir: str | Path, out_dir: str | Path, pairs: list[tuple[str, str]], epochs: float, lr: float,
              batch_size: int, layers: int | None, seed: int, desc: str = "sft",
              progress: bool = True) -> tuple[float, int]:
    """Train a copy of the chat model in ``meta_dir`` on (question, answer) ``pairs`` for ``epochs`` passes
    (rounded up to whole steps) and save it, with the meta's tokenizer and chat template, to ``out_dir``.
    Returns the mean loss of the last tenth of the steps, and the number of steps."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(meta_dir))
    model = AutoModelForCausalLM.from_pretrained(str(meta_dir), dtype=torch.float32)
    examples = [chat_example(tokenizer, q, a) for q, a in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps = math.ceil(epochs * len(examples) / batch_size)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    total = len(model.model.layers)
    if layers is not None and not 1 <= layers <= total:
        raise ValueError(f"layers={layers}: train between 1 and the model's {total} decoder layers (None: all)")
    params = trainable_top(model, layers)
    frozen = 0 if layers is None else total - layers
    cached = frozen_inputs(model, examples, frozen, pad) if frozen else None
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    model.train()
    order, losses = [], []
    with layer_range(model, slice(frozen, total), final_norm=True):
        for _ in tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
            if len(order) < batch_size:  # epochs in a fresh shuffled order
                order += rng.sample(range(len(examples)), len(examples))
            chosen, order = order[:batch_size], order[batch_size:]
            ids, mask, labels = batch([examples[i] for i in chosen], pad)
            inputs = {"input_ids": ids} if cached is None else {"inputs_embeds": pad_hidden([cached[i] for i in chosen])}
            with _autocast(True):
                loss = answer_loss(model, mask, labels, **inputs)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    tail = losses[-max(1, steps // 10):]
    return sum(tail) / len(tail), steps
