"""Training: the loop, LR schedules, load balancing, checkpoints, reports."""
