"""Training stages built on TRL / PEFT / transformers."""
