"""Build tiny random-weight checkpoints of real architectures, offline and reproducibly.

Each checkpoint is saved with ``save_pretrained`` next to a byte-level BPE tokenizer trained
locally with ``tokenizers``, so the normal ``from_pretrained`` loading path is exercised.

    python -m models.tiny.recipes llama models/tiny/llama
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]

# Small but real shapes: several layers, GQA where the family uses it, head_dim 16.
ARCHS = {
    "llama": dict(
        cls="LlamaConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
    ),
    "qwen3": dict(
        cls="Qwen3Config", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
    ),
    "gemma3": dict(
        cls="Gemma3TextConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    ),
    "mistral": dict(
        cls="MistralConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        sliding_window=6,
    ),
    "qwen2": dict(
        cls="Qwen2Config", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    ),
    "olmo2": dict(
        cls="Olmo2Config", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
    ),
}


def default_corpus() -> list[str]:
    here = Path(__file__).resolve().parents[2] / "config" / "demo" / "corpus.jsonl"
    return [json.loads(line)["text"] for line in here.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_tokenizer(out_dir: str | Path, texts: list[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``texts`` and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts if texts is not None else default_corpus()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(arch: str, out_dir: str | Path, *, seed: int = 0, tokenizer=None, init_std: float = 0.2,
                dtype: str = "float32", **overrides) -> Path:
    """Save a random-weight ``arch`` checkpoint (and a tokenizer) to ``out_dir``."""
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else build_tokenizer(out)
    if tokenizer is not None:
        tok.save_pretrained(str(out))
    spec = dict(ARCHS[arch])
    spec.update(overrides)
    cfg_cls = getattr(transformers, spec.pop("cls"))
    cfg = cfg_cls(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=True, **spec,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    # the default init is tiny-scale; widen it so attention patterns are not uniform
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, init_std)
    model.to(getattr(torch, dtype)).save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", choices=sorted(ARCHS))
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build_model(args.arch, args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
