"""Task data: sources (toy, local file, hub), prompt templates, tokenization and batching."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from kdexp.data.encode import Example, collate_prompts, collate_train, encode
from kdexp.data.sources import SPLITS, load_splits
from kdexp.data.templates import TEMPLATES
from kdexp.errors import unknown_choice


def load_examples(data: DictConfig, tokenizer, splits: Sequence[str] = SPLITS,
                  ) -> dict[str, list[Example]]:
    """The tokenized examples of the requested splits of a ``data`` config."""
    for split in splits:
        if split not in SPLITS:
            raise unknown_choice("split", split, SPLITS)
    data_cfg = OmegaConf.to_container(data, resolve=True)
    records = load_splits(data_cfg)
    return {name: encode(records[name], tokenizer, data_cfg, name) for name in splits}


__all__ = ["SPLITS", "TEMPLATES", "Example", "collate_prompts", "collate_train", "encode",
           "load_examples", "load_splits"]
