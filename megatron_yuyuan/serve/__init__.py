"""Serve a QA model over HTTP: FastAPI app (:mod:`.app`), dynamic batcher (:mod:`.batcher`), the
engine that runs batches on every TP/PP rank (:mod:`.engine`) and the web page (``static/``).
Start it with ``python -m megatron_yuyuan.serve`` (see :mod:`megatron_yuyuan.cli.serve`)."""
