"""Fine-tuning a chat model into a domain expert: chat-formatted question/answer pairs, the loss on the
answer and its end-of-turn token only, bf16 autocast over float32 weights, optionally only the top layers."""

from __future__ import annotations

import random
from pathlib import Path

import torch


def chat_example(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
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


def batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and labels."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, mask, labels


def trainable_top(model, layers: int | None) -> list[torch.nn.Parameter]:
    """Unfreeze the top ``layers`` decoder layers and the final norm (None: every parameter)."""
    if layers is None:
        return [p.requires_grad_(True) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for layer in model.model.layers[-layers:] for p in layer.parameters()]
    params += list(model.model.norm.parameters())
    return [p.requires_grad_(True) for p in params]


def fine_tune(meta_dir: str | Path, out_dir: str | Path, pairs: list[tuple[str, str]], steps: int, lr: float,
              batch_size: int, layers: int | None, seed: int, desc: str = "sft", progress: bool = True) -> float:
    """Train a copy of the chat model in ``meta_dir`` on (question, answer) ``pairs`` and save it, with the
    meta's tokenizer and chat template, to ``out_dir``. Returns the mean loss of the last tenth of the steps."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(meta_dir))
    model = AutoModelForCausalLM.from_pretrained(str(meta_dir), dtype=torch.float32)
    examples = [chat_example(tokenizer, q, a) for q, a in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = trainable_top(model, layers)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    model.train()
    order, losses = [], []
    for _ in tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
        if len(order) < batch_size:  # epochs in a fresh shuffled order
            order += rng.sample(range(len(examples)), len(examples))
        chosen, order = order[:batch_size], order[batch_size:]
        ids, mask, labels = batch([examples[i] for i in chosen], pad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
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
    return sum(tail) / len(tail)
