"""Experiment tracking, model versioning, publishing and training-log inspection.

* ``llmtech.track.logs`` reads the logs a training run leaves behind (our ``trainer_log.jsonl``,
  Hugging Face ``trainer_state.json``, TensorBoard event files), plots them and diagnoses loss
  spikes, NaN/inf, divergence, plateaus and learning-rate schedule mistakes
  (``python -m llmtech.track.logs RUN_DIR_OR_FILE [--out DIR]``);
* ``llmtech.track.registry``: MLflow runs and Model Registry on a local SQLite store (aliases,
  lineage, a promotion rule) and W&B in offline mode;
* ``llmtech.track.hub``: Hugging Face publishing — model cards, accelerate configs, a resource
  plan, and ``push_to_hub`` that writes the upload to a local folder when offline.
"""
