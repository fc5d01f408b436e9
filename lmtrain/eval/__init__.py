"""Evaluation: metrics, sandboxed code execution, safety probes and reports.

Heavy dependencies (sacrebleu, matplotlib) are imported only when a function needs them, so
importing this package stays cheap.
"""

from lmtrain.eval.metrics import (
    accuracy,
    bits_per_byte,
    bleu,
    bleu_with_signature,
    exact_match,
    mean_of,
    metric_by_slice,
    normalize_answer,
    perplexity,
    rouge_l,
    token_f1,
)
from lmtrain.eval.report import (
    compare_reports,
    flatten_metrics,
    read_loss_curves,
    render_markdown,
    write_report,
)
from lmtrain.eval.safety import (
    RefusalDetector,
    bias_report,
    builtin_refusal_probes,
    canary_leaks,
    expand_bias_templates,
    is_refusal,
    refusal_precision_recall,
)
from lmtrain.sandbox.code_exec import (
    CodeProblem,
    ExecLimits,
    ExecResult,
    evaluate_pass_at_k,
    pass_at_k,
    run_tests,
)

__all__ = [
    "CodeProblem",
    "ExecLimits",
    "ExecResult",
    "RefusalDetector",
    "accuracy",
    "bias_report",
    "bits_per_byte",
    "bleu",
    "bleu_with_signature",
    "builtin_refusal_probes",
    "canary_leaks",
    "compare_reports",
    "evaluate_pass_at_k",
    "exact_match",
    "expand_bias_templates",
    "flatten_metrics",
    "is_refusal",
    "mean_of",
    "metric_by_slice",
    "normalize_answer",
    "pass_at_k",
    "perplexity",
    "read_loss_curves",
    "refusal_precision_recall",
    "render_markdown",
    "rouge_l",
    "run_tests",
    "token_f1",
    "write_report",
]
