"""KV-cached generation and scoring through the pipeline, in plain torch.

``engine`` drives prefill and decode over the streaming ring, ``kv_cache`` holds
per-sequence keys and values, ``sampling`` picks tokens reproducibly, ``chunking``
sizes prefill chunks from a latency fit.
"""
