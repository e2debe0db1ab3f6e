"""Evaluation: LM losses and perplexity, generation, text metrics."""
