"""The MiniExpert tokenizer: one token per character, built with the ``tokenizers`` library and saved in HF
format, shared by the meta and every expert (ETR needs one vocabulary)."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def char_vocab(alphabet: str) -> dict[str, int]:
    """Token id of every special token and character (specials first, then sorted characters)."""
    return {tok: i for i, tok in enumerate(SPECIALS + sorted(set(alphabet)))}


def build_tokenizer(alphabet: str):
    """A ``PreTrainedTokenizerFast``: BPE without merges over single characters (so digits and letters stay
    separate tokens), BOS prepended, characters fused back on decode."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(vocab=char_vocab(alphabet), merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


class CharEncoder:
    """The tokenizer's mapping without its per-call overhead, for the training loops."""

    def __init__(self, alphabet: str):
        self.vocab = char_vocab(alphabet)

    def query(self, text: str) -> list[int]:
        return [BOS_ID] + [self.vocab[c] for c in text]

    def answer(self, text: str) -> list[int]:
        return [self.vocab[c] for c in text] + [EOS_ID]


def save_tokenizer(tokenizer, path: str | Path) -> None:
    """Save the tokenizer in HF format into ``path``."""
    tokenizer.save_pretrained(str(path))
