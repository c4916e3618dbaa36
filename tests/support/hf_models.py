"""Hugging Face models and tokenizers made inside the tests with transformers and tokenizers themselves
(nothing is downloaded): random models of each family with their logits, and tiny tokenizer directories."""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from bam_megatron.data.synthetic import synthetic_documents

VOCAB = 128
SEQ = 64
TOKENS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}


def hf_directory(path: str, family: str, **settings) -> torch.Tensor:
    """A random transformers model of ``family`` saved at ``path``; its fp32 logits of TOKENS
    (``model_class``: the class, if not ``{family}ForCausalLM``)."""
    import transformers

    torch.manual_seed(0)
    save = settings.pop("save", {})
    model_class = settings.pop("model_class", f"{family}ForCausalLM")
    config = getattr(transformers, f"{family}Config")(**{**SIZES, "initializer_range": 0.3, **settings})
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):  # transformers initialises biases to zero
                param.copy_(0.3 * torch.randn_like(param))
        model.save_pretrained(path, **save)
        return model(TOKENS).logits


def write_hf_tokenizer(directory: str) -> None:
    """A tiny word-level Hugging Face tokenizer (40 tokens, eos </s>) saved as transformers saves one."""
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(37)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(directory)


SPECIALS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2
HF_TOKENIZER_TEXTS = list(synthetic_documents(200, seed=11))


def build_hf_tokenizer(directory, vocab_size: int = 300, eos: bool = True, pad: bool = True) -> str:
    """Train a byte-level BPE on ``HF_TOKENIZER_TEXTS`` and save it as a Hugging Face tokenizer directory."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(HF_TOKENIZER_TEXTS, trainer)
    # As Llama's tokenizer does: encoding with special tokens adds <s> and </s>.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    special = {"bos_token": "<s>"}
    if eos:
        special["eos_token"] = "</s>"
    if pad:
        special["pad_token"] = "<pad>"
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(os.fspath(directory))
    return os.fspath(directory)
