"""Models: Hugging Face configs and modules built on the meta device, weights read shard by shard from
safetensors, LoRA/freeze, mixture-of-experts terms and the packing check."""
