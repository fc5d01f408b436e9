"""Ahead-of-time compiles for accelerator topologies that this host does not have.

``lmtrain compile`` lowers and compiles the programs ``lmtrain train`` runs (train step, eval
step, sampler) for the abstract devices of a TPU topology, with libtpu's compiler running on the
CPU host, and reports per-chip memory, FLOPs and collectives (see :mod:`lmtrain.aot.compile`).
"""

PROGRAMS = ("train_step", "eval_step", "sampler")
