"""fsdptrain: fine-tune and pretrain Hugging Face causal LMs with PyTorch FSDP2."""

__version__ = "0.1.0"
