"""A tiny Llama-shaped model folder for benchmarks of the serving stack: config.json and a byte-level
tokenizer (256 ids, any text encodes), no weights — deployments load it with `load_format: dummy`."""
from __future__ import annotations

from pathlib import Path

TINY_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def write_tiny_model(folder: str | Path) -> str:
    """Write the folder (once; an existing one is kept); return its path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    folder = Path(folder)
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return str(folder)
    LlamaConfig(architectures=["LlamaForCausalLM"], **TINY_SHAPE).save_pretrained(folder)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[2]).save_pretrained(folder)
    return str(folder)
