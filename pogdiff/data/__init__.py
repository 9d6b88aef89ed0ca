"""Datasets: sources, prepare, the shard format, the streaming reader, the frozen encoders."""
