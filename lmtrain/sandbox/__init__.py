"""Running untrusted, model-generated code: process isolation (``isolation``) and a judge that
decides verdicts outside the program's process (``code_exec``).

It sits below both callers: evaluation's pass@k and online RL's code rewards use the same runner.
"""
