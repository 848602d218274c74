"""Any Hugging Face transformer as a classifier over a text stream's global classes.

:class:`TextClassifier` takes the packed ``(N, 2, L)`` samples of
:meth:`lifelong.continual.text.TextStream.to_benchmark` (token ids and attention mask) and
returns one score per global class, so every continual loop, metric and Avalanche strategy
treats a transformer like any classifier. Two routes:

* ``"head"`` (encoders, ``*ForSequenceClassification``): a sequence-classification model's own
  logits, or a new linear head on the mean-pooled last hidden state of a bare encoder (the
  pooling all-MiniLM-L6-v2 was trained with).
* ``"verbalizer"`` (decoders and encoder-decoders): the score of class c is the log-likelihood
  of its label text after the prompt, ``Σ_k log p(label_c[k] | prompt, label_c[<k])``; the
  prediction is the best-scoring label (rank classification). Training uses the language-modelling
  loss of the gold label text, averaged over its tokens (:class:`VerbalizerLoss`), as MIGU and
  O-LoRA train T5 and LLaMA on the continual-learning benchmark. Scoring runs the model once per
  candidate label, so ``candidates`` (set per task in task-incremental runs) keeps it to the
  task's own labels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["TextClassifier", "VerbalizerLoss", "model_route", "unpack_text", "ROUTES"]

ROUTES = ("auto", "head", "verbalizer")


def model_route(model: nn.Module) -> str:
    """``"verbalizer"`` for language models (causal or encoder-decoder), else ``"head"``."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"a text stream needs a Hugging Face transformers model (with .config), "
                        f"got {type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        return "verbalizer"
    name = type(_inner(model)).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "verbalizer"
    return "head"


def _inner(model: nn.Module) -> nn.Module:
    """The transformers model inside registry-adapter wrappers."""
    from ..adapters.model import AdaptedModel

    while isinstance(model, AdaptedModel):
        model = model.base_model
    return model


def unpack_text(x: Tensor) -> dict[str, Tensor]:
    """Packed ``(N, 2, L)`` samples → ``input_ids`` and ``attention_mask``, without shared padding."""
    if x.dim() != 3 or x.shape[1] != 2:
        raise ValueError(f"expected packed (batch, 2, length) token ids and masks, got {tuple(x.shape)}")
    width = int(x[:, 1].sum(1).max())
    return {"input_ids": x[:, 0, :width], "attention_mask": x[:, 1, :width]}


class VerbalizerLoss(nn.Module):
    """Language-modelling loss of the gold label text: ``−score[y] / len(label_y)``, batch mean."""

    def __init__(self, label_lengths: list[int]):
        super().__init__()
        self.register_buffer("lengths", torch.tensor(label_lengths, dtype=torch.float32), persistent=False)

    def forward(self, scores: Tensor, y: Tensor) -> Tensor:
        gold = scores.gather(1, y[:, None]).squeeze(1)
        return -(gold / self.lengths.to(scores.device)[y]).mean()


class TextClassifier(nn.Module):
    """A transformers model (bare, or wrapped by a registry adapter) scoring the global classes.

    Args:
        backbone: the transformers model, possibly wrapped by ``lifelong.wrap`` or a
            ``TaskRoutedModel`` (a ``task_id`` given to :meth:`forward` is passed on).
        num_classes: size of the global class space.
        route: ``"auto"``, ``"head"`` or ``"verbalizer"``.
        label_ids: token ids of each class's label text (verbalizer route).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, route: str = "auto",
                 label_ids: list[list[int]] | None = None):
        super().__init__()
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; valid: {', '.join(ROUTES)}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.route = model_route(backbone) if route == "auto" else route
        self.encoder_decoder = bool(getattr(backbone.config, "is_encoder_decoder", False))
        self.candidates: list[int] | None = None  # classes to score (verbalizer); None: all
        self.head: nn.Linear | None = None
        if self.route == "head":
            self._build_head()
        else:
            self._set_labels(label_ids)

    # ---- construction ------------------------------------------------------------------------
    def _build_head(self) -> None:
        config = self.backbone.config
        if "SequenceClassification" in type(_inner(self.backbone)).__name__:
            if config.num_labels != self.num_classes:
                raise ValueError(f"the model's classification head has {config.num_labels} labels but the stream has "
                                 f"{self.num_classes} classes; load it with num_labels={self.num_classes} or pass a "
                                 "bare encoder (AutoModel), which gets a new head")
            return
        hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
        if hidden is None:
            raise ValueError(f"cannot size a classification head: {type(config).__name__} has no hidden_size")
        self.head = nn.Linear(hidden, self.num_classes)

    def _set_labels(self, label_ids: list[list[int]] | None) -> None:
        if label_ids is None or len(label_ids) != self.num_classes:
            raise ValueError(f"the verbalizer route needs the token ids of all {self.num_classes} label texts")
        width = max(len(ids) for ids in label_ids)
        labels = torch.zeros(self.num_classes, width, dtype=torch.long)
        mask = torch.zeros(self.num_classes, width, dtype=torch.long)
        for c, ids in enumerate(label_ids):
            labels[c, : len(ids)] = torch.tensor(ids)
            mask[c, : len(ids)] = 1
        self.register_buffer("label_tokens", labels, persistent=False)
        self.register_buffer("label_mask", mask, persistent=False)

    @property
    def label_lengths(self) -> list[int]:
        return self.label_mask.sum(1).tolist()

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: Tensor, task_id: Any = None) -> Tensor:
        inputs = unpack_text(x)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        extra = {} if task_id is None else {"task_id": task_id}
        if self.route == "head":
            return self._head_logits(ids, mask, extra)
        return self._verbalizer_scores(ids, mask, extra)

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """The mean-pooled last hidden state of each packed sample, ``(N, hidden)`` (the encoder's for
        encoder-decoders): what task inference compares (see :mod:`.task_inference`)."""
        inputs = unpack_text(x)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if self.encoder_decoder:
            hidden = _inner(self.backbone).get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        elif self.route == "head" and self.head is not None:
            out = self.backbone(input_ids=ids, attention_mask=mask)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        else:
            hidden = self.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def _head_logits(self, ids: Tensor, mask: Tensor, extra: dict) -> Tensor:
        out = self.backbone(input_ids=ids, attention_mask=mask, **extra)
        if self.head is None:
            return out.logits
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head(pooled.to(self.head.weight.dtype))

    def _verbalizer_scores(self, ids: Tensor, mask: Tensor, extra: dict) -> Tensor:
        classes = list(range(self.num_classes)) if self.candidates is None else list(self.candidates)
        labels, lmask = self.label_tokens[classes], self.label_mask[classes]  # (K, W)
        if self.encoder_decoder:
            logp = self._seq2seq_logprobs(ids, mask, labels, extra)
        else:
            logp = self._causal_logprobs(ids, mask, labels, lmask, extra)
        scores = (logp * lmask).sum(-1)  # (B, K)
        out = torch.full((ids.shape[0], self.num_classes), float("-inf"), dtype=scores.dtype, device=ids.device)
        out[:, classes] = scores
        return out

    def _causal_logprobs(self, ids: Tensor, mask: Tensor, labels: Tensor, lmask: Tensor, extra: dict) -> Tensor:
        """log p of each label token after each right-padded prompt: (B, K, W)."""
        b, length = ids.shape
        k, w = labels.shape
        lengths = mask.sum(1)
        pos = lengths[:, None, None] + torch.arange(w, device=ids.device)  # (B, 1, W)
        pos = pos.expand(b, k, w)
        seq = torch.zeros(b, k, length + w, dtype=ids.dtype, device=ids.device)
        seq[:, :, :length] = ids[:, None]
        seq.scatter_(2, pos, labels.expand(b, k, w))
        att = torch.zeros_like(seq)
        att[:, :, :length] = mask[:, None]
        att.scatter_(2, pos, lmask.expand(b, k, w))
        logits = self.backbone(input_ids=seq.reshape(b * k, -1), attention_mask=att.reshape(b * k, -1),
                               **_repeat_tasks(extra, k)).logits
        at = (pos - 1).reshape(b * k, w, 1).expand(-1, -1, logits.shape[-1])
        logp = F.log_softmax(logits.gather(1, at).float(), dim=-1)
        return logp.gather(2, labels.expand(b, k, w).reshape(b * k, w, 1)).reshape(b, k, w)

    def _seq2seq_logprobs(self, ids: Tensor, mask: Tensor, labels: Tensor, extra: dict) -> Tensor:
        """log p of each label token given the encoded prompt: (B, K, W)."""
        b = ids.shape[0]
        k, w = labels.shape
        config = self.backbone.config
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
        dec = torch.cat([torch.full((k, 1), start, dtype=labels.dtype, device=labels.device), labels[:, :-1]], 1)
        rep_ids, rep_mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        logits = self.backbone(input_ids=rep_ids, attention_mask=rep_mask, decoder_input_ids=dec.repeat(b, 1),
                               **_repeat_tasks(extra, k)).logits
        logp = F.log_softmax(logits.float(), dim=-1)
        return logp.gather(2, labels.repeat(b, 1).unsqueeze(-1)).reshape(b, k, w)


def _repeat_tasks(extra: dict, k: int) -> dict:
    """Per-sample task ids repeated for the k label candidates each sample is scored with."""
    task = extra.get("task_id")
    if isinstance(task, Tensor) and task.dim() == 1:
        return {**extra, "task_id": task.repeat_interleave(k)}
    return extra


class TextSetup:
    """What a run on a text stream needs: the tokenized benchmark, the route and the label tokens."""

    def __init__(self, model: nn.Module, stream, tokenizer, max_length: int, template: str, route: str):
        if tokenizer is None:
            raise ValueError("a text stream needs tokenizer=... (the model's tokenizer, e.g. "
                             "AutoTokenizer.from_pretrained(<model folder>))")
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; valid: {', '.join(ROUTES)}")
        self.route = model_route(model) if route == "auto" else route
        self.num_classes = len(stream.class_names)
        self.label_ids = self._label_ids(stream, tokenizer) if self.route == "verbalizer" else None
        self.benchmark = stream.to_benchmark(tokenizer, max_length=max_length, template=template)
        self.info = {**self.benchmark.lifelong_text, "route": self.route}

    def _label_ids(self, stream, tokenizer) -> list[list[int]]:
        names = stream.class_names
        if stream.scenario != "task-incremental" and len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"label texts {dup} name several classes: a verbalizer cannot tell them apart outside "
                             "task-incremental runs; build the stream with share_labels=True")
        ids = []
        for c, name in enumerate(names):
            tokens = list(tokenizer(" " + name, add_special_tokens=False)["input_ids"])
            if not tokens:
                raise ValueError(f"the tokenizer maps the label text {name!r} (class {c}) to no token; "
                                 "the verbalizer route needs every label to be at least one token")
            ids.append(tokens)
        return ids

    def classifier(self, backbone: nn.Module) -> TextClassifier:
        return TextClassifier(backbone, self.num_classes, self.route, self.label_ids)

    def criterion(self) -> nn.Module | None:
        """The verbalizer route trains with the label text's language-modelling loss."""
        return VerbalizerLoss([len(ids) for ids in self.label_ids]) if self.route == "verbalizer" else None
