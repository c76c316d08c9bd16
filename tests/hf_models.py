"""Tiny transformers models with local tokenizers and image processors, built in the tests
(random init, nothing downloaded): a causal LM, a text classifier, an image classifier."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = (
    "the cat sat on a mat and the dog ran to the park while a bird sang in the old tree "
    "one two three four five six seven eight nine ten red green blue yes no maybe"
)


def make_tokenizer(folder: Path) -> object:
    """A byte-level BPE tokenizer trained on CORPUS that adds <s> in front of every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator([CORPUS] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    fast.save_pretrained(folder)
    return fast


def causal_lm(folder: Path, seed: int = 0, noise_seed: int | None = None) -> Path:
    """A 2-layer Llama (tied embeddings) + tokenizer saved as an HF folder; `noise_seed`
    perturbs the weights of the seed-`seed` base (a 'fine-tune' in the same basin)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return _save(LlamaForCausalLM, config, folder, seed, noise_seed, tokenizer=True)


def text_classifier(folder: Path, seed: int = 0, noise_seed: int | None = None) -> Path:
    """A 1-layer BERT sequence classifier with 3 labels + tokenizer, as an HF folder."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    return _save(BertForSequenceClassification, config, folder, seed, noise_seed, tokenizer=True)


def image_classifier(folder: Path, seed: int = 0, noise_seed: int | None = None) -> Path:
    """A 1-layer ViT on 8x8 RGB images with 10 labels + its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, num_labels=10,
    )  # fmt: skip
    out = _save(ViTForImageClassification, config, folder, seed, noise_seed, tokenizer=False)
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(out)
    return out


def _save(
    cls: type, config: object, folder: Path, seed: int, noise_seed: int | None, *, tokenizer: bool
) -> Path:
    torch.manual_seed(seed)
    model = cls(config)
    if noise_seed is not None:
        g = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.eval().save_pretrained(folder)
    if tokenizer:
        make_tokenizer(folder)
    return folder


def digits_folder(root: Path, per_class: int = 6) -> Path:
    """scikit-learn's bundled 8x8 handwritten digits as an ImageFolder of PNGs (0..9)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = dict.fromkeys(range(10), 0)
    for image, label in zip(digits.images, digits.target, strict=True):
        if counts[int(label)] >= per_class:
            continue
        counts[int(label)] += 1
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        pixels = (image / 16.0 * 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(root / str(label) / f"{counts[int(label)]}.png")
    return root
