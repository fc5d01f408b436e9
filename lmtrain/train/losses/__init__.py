"""Fine-tuning objectives (sft, dpo, reward, distill); each registers into ``OBJECTIVES``."""

# Importing a loss module directly must still run the registry first (objectives.py imports
# every loss module at its end), or the two would import each other half-initialised.
import lmtrain.train.objectives  # noqa: E402, F401
