"""Seeing a pipeline run: trace windows, Chrome/Perfetto files, timeline pictures.

``trace`` gathers every rank's recorded actions and writes ``trace.json``;
``timeline`` draws planned or measured schedules (needs matplotlib).
"""
