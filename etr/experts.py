"""Setting up expert routing for ``LLM``: expert engines, tokenizer checks, the expert head."""

from __future__ import annotations

from pathlib import Path

from etr.engine import LLMEngine
from etr.engine.expert_worker import vocab_fingerprint
from etr.engine.switcher import Switcher
from etr.errors import ExpertHeadError, VocabularyMismatchError
from etr.models.expert_head import ExpertHead, load_expert_head, meta_fingerprint


def check_same_vocabulary(meta: LLMEngine, expert: LLMEngine, name: str) -> None:
    """Experts continue the meta's token ids, so both must mean the same thing by every id."""
    m, e = meta.model_config, expert.model_config
    where = f"meta {meta.model_dir} vs expert {name!r} ({expert.model_dir})"
    if m.vocab_size != e.vocab_size:
        raise VocabularyMismatchError(f"vocab_size differs: {m.vocab_size} vs {e.vocab_size} ({where})")
    mt, et = meta.tokenizer, expert.tokenizer
    if mt is None or et is None:
        return
    if mt.get_vocab() != et.get_vocab():
        diff = set(mt.get_vocab().items()) ^ set(et.get_vocab().items())
        raise VocabularyMismatchError(f"tokenizer vocabularies differ in {len(diff)} entries ({where})")
    if mt.all_special_tokens != et.all_special_tokens:
        raise VocabularyMismatchError(f"tokenizer special tokens differ: {mt.all_special_tokens} vs "
                                      f"{et.all_special_tokens} ({where})")


def check_head(head: ExpertHead, meta: LLMEngine, expert_names: list[str]) -> None:
    """Every row names a loaded expert, every expert has a row, and the head fits the meta."""
    cfg = meta.model_config
    unknown = [n for n in head.names if n not in expert_names]
    if unknown:
        raise ExpertHeadError(f"head row(s) {unknown} name no model in experts= (have {expert_names})")
    rowless = [n for n in expert_names if n not in head.names]
    if rowless:
        raise ExpertHeadError(f"expert(s) {rowless} have no row in the head ({head.sources})")
    if head.hidden_size != cfg.hidden_size:
        raise ExpertHeadError(f"head rows have hidden size {head.hidden_size}; meta {meta.model_dir} has "
                              f"{cfg.hidden_size}")
    if head.vocab_size is not None and head.vocab_size != cfg.vocab_size:
        raise ExpertHeadError(f"head was trained for vocab_size {head.vocab_size}; meta has {cfg.vocab_size}")
    if head.meta_fingerprint is not None:
        actual = meta_fingerprint(meta.runner.model.lm_head_weight)
        if actual != head.meta_fingerprint:
            raise ExpertHeadError(f"head was trained against meta fingerprint {head.meta_fingerprint}; "
                                  f"{meta.model_dir} has {actual}")


def _load_expert(meta: LLMEngine, name: str, path: str, device, placement: str):
    """One expert engine, here or in a Ray actor, checked to share the meta's vocabulary."""
    if placement == "ray":
        from etr.engine.remote_expert import RemoteExpertEngine
        engine = RemoteExpertEngine(meta.config, name, path, device, meta.model_dir if meta.tokenizer else None)
        mine, theirs = vocab_fingerprint(meta.tokenizer), engine.vocab_fingerprint
        if engine.model_config.vocab_size != meta.model_config.vocab_size or (mine and theirs and mine != theirs):
            raise VocabularyMismatchError(f"expert {name!r} ({path}, Ray actor) does not share the meta's vocabulary: "
                                          f"vocab_size {engine.model_config.vocab_size} vs "
                                          f"{meta.model_config.vocab_size}, tokenizer digest {theirs} vs {mine}")
        return engine
    engine = LLMEngine(meta.config, path, device)
    check_same_vocabulary(meta, engine, name)
    if engine.tokenizer is None:  # same ids, so the meta's tokenizer writes the expert's text
        engine.tokenizer = engine.stop_checker.tokenizer = meta.tokenizer
    return engine


def build_switcher(meta: LLMEngine) -> Switcher:
    """Load the config's experts (one engine per distinct checkpoint and device), check them, and extend the
    meta's head by the expert rows."""
    config = meta.config
    if not config.experts:
        if config.expert_head is not None:
            raise ExpertHeadError(f"expert_head={list(config.expert_head)} given without experts= to route to")
        return Switcher(meta, {}, [])
    # Without a head the meta never switches; experts are then reached only by pinning (generate(route=)).
    head = load_expert_head(list(config.expert_head)) if config.expert_head is not None else None
    if head is not None:
        check_head(head, meta, list(config.experts))
    loaded: dict[tuple[str, str, str], LLMEngine] = {}
    engines = {}
    for name, path in config.experts.items():
        device, placement = config.expert_devices[name], config.expert_placement[name]
        resources = sorted(config.expert_resources.get(name, {}).items())  # another ask: another actor
        key = (str(Path(path).resolve()), str(device), placement, repr(resources))
        if key not in loaded:
            loaded[key] = _load_expert(meta, name, path, device, placement)
        engines[name] = loaded[key]
    if head is None:
        return Switcher(meta, engines, [])
    meta.runner.set_expert_rows(head.embeddings)
    return Switcher(meta, engines, head.names)
