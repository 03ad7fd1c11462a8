"""Checkpoints: one room for everything that reads or writes them.

* :mod:`.storage` — the format: megatron-core ``dist_checkpointing`` folders, the ``latest``
  pointer, ``model_config.yaml``, atomic saves, loading weights at any TP/PP. The only module that
  imports ``megatron.core.dist_checkpointing``.
* :mod:`.resume` — what a training run adds so a killed job continues exactly (optimizer,
  schedule, RNG, data position).
* :mod:`.adapters` — what a LoRA checkpoint records (settings, base checkpoint, its fingerprint).
* :mod:`.loader` — the one "checkpoint path -> model (+ adapters)" that training, conversion,
  generation, serving and ``--verify`` call.
"""
