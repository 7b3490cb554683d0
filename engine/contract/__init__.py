"""What the bot and the engine share, and all the bot may import of the engine: the job contract
(protocol), the configuration, A1111's prompt language and the kohya LoRA file format. Nothing here
imports torch, diffusers, transformers, peft or discord (tests/test_boundaries.py checks)."""
