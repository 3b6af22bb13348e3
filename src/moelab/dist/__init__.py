"""Distributed training: device meshes, FSDP2 and expert parallelism, and the memory and communication
planner (:mod:`moelab.dist.plan`) that sizes a run before any GPU is involved."""
