"""Evaluation of QA answers against references: BLEU (:mod:`.bleu`), ROUGE / chrF / length /
EOS / repetition (:mod:`.metrics`), model-free baselines (:mod:`.baselines`), paired bootstrap
intervals and significance (:mod:`.bootstrap`), the report files (:mod:`.report`), and the
function that ties them together, :func:`megatron_yuyuan.eval.scoring.evaluate`."""
