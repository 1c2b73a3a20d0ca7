"""Tiny, randomly initialised models that nobody here wrote: Hugging Face ``transformers`` (built
from their config classes, nothing downloaded) and the digits-sized MLP.

Each :class:`ZooModel` gives a seeded builder, a batch maker, and one ``loss`` used both by
ftrain's ``loss_fn`` (through ``apply``) and by a plain PyTorch loop (calling the module), so the
two compute the same thing. The test suite (tests/test_zoo.py) and benchmarks/real_models.py
share these.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network: configs only, random init

import torch
from torch import nn

VOCAB, SEQ, BATCH = 96, 16, 4

Batch = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """A model family: ``build(seed, dropout)`` a fresh module, ``batches(n, seed)`` its inputs."""

    name: str
    build: Callable[..., nn.Module]
    batches: Callable[..., list[Batch]]
    # The loss of the model's output on a batch (for models that compute it themselves: ``out.loss``).
    loss: Callable[[Any, Batch], torch.Tensor] = lambda out, batch: out.loss
    # The output that to_module()/eval comparisons look at.
    logits: Callable[[Any], torch.Tensor] = lambda out: out.logits

    def loss_fn(self, apply, params, buffers, batch, key):
        """ftrain's ``loss_fn``: the model through ``apply``, keyed dropout, new buffers returned."""
        out, buffers = apply(params, buffers, **batch, key=key)
        return self.loss(out, batch), {}, buffers

    def torch_loss(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        """The same loss from the plain module, for a plain PyTorch loop."""
        return self.loss(module(**batch), batch)


def _seeded(build: Callable[[float], nn.Module]) -> Callable[..., nn.Module]:
    def seeded(seed: int = 0, dropout: float = 0.0) -> nn.Module:
        torch.manual_seed(seed)
        return build(dropout)

    return seeded


def _token_batches(labels: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> Callable[..., list[Batch]]:
    def batches(n: int, seed: int = 0) -> list[Batch]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
            out.append({"input_ids": ids, "labels": labels(ids, g)})
        return out

    return batches


def _image_batches(size: int, num_labels: int) -> Callable[..., list[Batch]]:
    def batches(n: int, seed: int = 0) -> list[Batch]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            x = torch.randn(BATCH, 3, size, size, generator=g)
            # A learnable label: which channel is brightest, folded into num_labels classes.
            labels = (x.mean((2, 3)).argmax(-1) + 3 * (x[:, 0].mean((1, 2)) > 0)) % num_labels
            out.append({"pixel_values": x, "labels": labels})
        return out

    return batches


def _lm_labels(ids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return ids.clone()


def _seq2seq_labels(ids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return ids.flip(-1)  # (learn to reverse the sequence)


def _class_labels(num_labels: int) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    return lambda ids, g: ids[:, 0] % num_labels  # (learnable: the first token decides)


def _gpt2(dropout: float) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def _bert(dropout: float) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ, num_labels=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def _vit(dropout: float) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=5, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    return ViTForImageClassification(config)


def _resnet(dropout: float) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=5)
    return ResNetForImageClassification(config)


def _llama(dropout: float) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, attention_dropout=dropout, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _t5(dropout: float) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=dropout, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


class DigitsMLP(nn.Module):
    """The digits example's shape: 64-128-256-10."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


def _digits_batches(n: int, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 10, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(64, 64, generator=g)
        out.append({"x": x, "labels": (x @ w).argmax(-1)})
    return out


def _cross_entropy(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    return nn.functional.cross_entropy(out, batch["labels"])


GPT2 = ZooModel("gpt2", _seeded(_gpt2), _token_batches(_lm_labels))
BERT = ZooModel("bert", _seeded(_bert), _token_batches(_class_labels(3)))
VIT = ZooModel("vit", _seeded(_vit), _image_batches(16, 5))
RESNET = ZooModel("resnet", _seeded(_resnet), _image_batches(32, 5))
LLAMA = ZooModel("llama", _seeded(_llama), _token_batches(_lm_labels))
T5 = ZooModel("t5", _seeded(_t5), _token_batches(_seq2seq_labels))
DIGITS_MLP = ZooModel("digits-mlp", _seeded(DigitsMLP), _digits_batches, loss=_cross_entropy, logits=lambda out: out)

TRANSFORMERS = (GPT2, BERT, VIT, RESNET, LLAMA, T5)
ALL = (*TRANSFORMERS, DIGITS_MLP)
BY_NAME = {m.name: m for m in ALL}
