"""HF GPT2LMHeadModel / Megatron-LM legacy checkpoints <-> megatron-core checkpoints.

HF names appear only in this package; the library speaks megatron-core names.
"""
