"""Distributed training and deployment helpers: DeepSpeed configs and inference, memory
estimates per method and per GPU. Launching is left to the field's launchers (deepspeed,
torchrun, accelerate); nothing here starts processes of its own."""
