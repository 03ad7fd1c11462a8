"""megatron_yuyuan: finetune the Yuyuan GPT-2 medical LM on MedQuAD with megatron-core."""

import warnings as _warnings

__version__ = "0.1.0"

# Apex and Transformer Engine are optional GPU accelerators; megatron-core warns at import time
# when they are absent, which is the normal case here (CPU runs, tests, conversion).
_warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TransformerEngine).*")
