"""The runtime every layer above the models needs: the device mesh and shardings
(`mesh`), multi-host start-up, barriers and host-side gathers (`distributed`), and
pre-emption (`preemption`: SIGTERM -> stop at the next safe point, exit code 75).

Used by `data/` (sharded batches, safe points in dataset builds) and `train/`, `stages/`;
it imports nothing of the package but `fs`.
"""
