"""Evaluation pieces beyond BLEU (:mod:`megatron_yuyuan.evaluation` keeps the BLEU recipe and the
report): :mod:`.metrics` (ROUGE, chrF, lengths, repetition)."""
