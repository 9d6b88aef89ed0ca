"""Cluster orchestration (installed as ``pogdiff.dist``): Ray Train driver, DeepSpeed, FAISS service."""
