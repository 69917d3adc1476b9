"""KV-cached generation through the pipeline, in plain torch.

``engine`` drives prefill and decode over the streaming ring, ``kv_cache`` holds
per-sequence keys and values, ``chunking`` sizes prefill chunks from a latency fit.
"""
