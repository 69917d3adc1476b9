"""KV-cached generation and scoring through the pipeline, in plain torch.

``engine`` drives prefill and decode over the streaming ring, ``scheduler`` admits
prompts as others finish, ``kv_cache`` holds per-sequence keys and values,
``sampling`` picks tokens reproducibly, ``chunking`` and ``profiler`` size prefill
chunks from a latency fit, ``stage`` says what a rank brings.
"""
