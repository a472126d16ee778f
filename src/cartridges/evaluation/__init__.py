"""Compare ways of giving a model its corpus: in context, not at all, truncated, or as cartridges.

``methods`` builds the KV prefixes, ``questions`` reads question sets, ``tasks`` runs QA,
log-perplexity and fidelity for one method, ``scoring`` scores answers, ``cost`` times prefill and
decoding, and ``report`` puts it all into one row per (method, task). No Kedro, no MLflow here.
"""

from cartridges.evaluation.cost import measure_cost
from cartridges.evaluation.methods import Method, build_methods, context_budget
from cartridges.evaluation.questions import Question, QuestionsError, load_questions, prompt_text
from cartridges.evaluation.report import (
    TASKS,
    EvalConfig,
    evaluate,
    format_report,
    report_metrics,
    score_method,
)
from cartridges.evaluation.scoring import (
    choose_option,
    chrf,
    exact_match,
    normalise_answer,
    token_f1,
)
from cartridges.evaluation.tasks import (
    HeldOutConversation,
    answer_log_perplexity,
    answer_questions,
    fidelity_kl,
    held_out_conversations,
    question_ids,
)

__all__ = [
    "TASKS",
    "EvalConfig",
    "HeldOutConversation",
    "Method",
    "Question",
    "QuestionsError",
    "answer_log_perplexity",
    "answer_questions",
    "build_methods",
    "choose_option",
    "chrf",
    "context_budget",
    "evaluate",
    "exact_match",
    "fidelity_kl",
    "format_report",
    "held_out_conversations",
    "load_questions",
    "measure_cost",
    "normalise_answer",
    "prompt_text",
    "question_ids",
    "report_metrics",
    "score_method",
    "token_f1",
]
