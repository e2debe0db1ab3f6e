"""Experiment tracking and training-log inspection.

``llmtech.track.logs`` reads the logs a training run leaves behind (our ``trainer_log.jsonl``,
Hugging Face ``trainer_state.json``, TensorBoard event files), plots them and diagnoses loss
spikes, NaN/inf, divergence, plateaus and learning-rate schedule mistakes
(``python -m llmtech.track.logs RUN_DIR_OR_FILE [--out DIR]``).
"""
