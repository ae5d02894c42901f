"""Data: tokenizer, sources, conversation tokenisation with loss masks, and per-rank batching."""
