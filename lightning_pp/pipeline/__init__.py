"""The pipeline itself: what runs where and when, and the loops that run it.

Schedules as data (``actions``, ``schedules``, ``simulation``), microbatches and
stage splits (pure, no process group), and the executors that walk a schedule
(``executor`` for training steps, ``streaming`` for predict and generation).
"""
