"""Supervised fine-tuning of the MiniExpert models (small Llamas) with the loss on answer tokens only."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from etr.routing.miniexpert.tokenizer import BOS_ID, EOS_ID, PAD_ID, CharEncoder

Sampler = Callable[[random.Random], tuple[str, str]]


@dataclass(slots=True)
class ModelShape:
    """The Llama shape shared by the meta and every expert."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_positions: int = 64


def make_model(shape: ModelShape, vocab_size: int, seed: int):
    """A freshly initialized Llama of ``shape`` (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                      num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                      num_key_value_heads=shape.num_kv_heads, max_position_embeddings=shape.max_positions,
                      bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def batch_tensors(enc: CharEncoder, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 everywhere but the answer and its EOS)."""
    rows = [(enc.query(q), enc.answer(a)) for q, a in pairs]
    width = max(len(q) + len(a) for q, a in rows)
    ids = torch.full((len(rows), width), PAD_ID)
    labels = torch.full((len(rows), width), -100)
    for i, (q, a) in enumerate(rows):
        ids[i, :len(q) + len(a)] = torch.tensor(q + a)
        labels[i, len(q):len(q) + len(a)] = torch.tensor(a)
    return ids, labels


def train(model, enc: CharEncoder, sample: Sampler, steps: int, lr: float, batch_size: int, seed: int,
          desc: str = "sft", progress: bool = True) -> float:
    """AdamW with a one-cycle schedule; ``sample`` draws each training pair. Returns the last loss."""
    from tqdm.auto import tqdm
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
        ids, labels = batch_tensors(enc, [sample(rng) for _ in range(batch_size)])
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


def fine_tune(base, enc: CharEncoder, sample: Sampler, steps: int, lr: float, batch_size: int, seed: int,
              desc: str, progress: bool = True):
    """A copy of ``base`` trained on ``sample``; ``base`` is untouched."""
    model = copy.deepcopy(base)
    train(model, enc, sample, steps, lr, batch_size, seed, desc, progress)
    return model


def save_checkpoint(model, tokenizer, path: str | Path) -> Path:
    """An ordinary HF checkpoint directory (config, safetensors weights, generation config, tokenizer)."""
    path = Path(path)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path
