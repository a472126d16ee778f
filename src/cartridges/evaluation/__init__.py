"""Compare ways of giving a model its corpus: in context, not at all, truncated, or as cartridges.

``compare`` runs the whole comparison from a corpus and cartridges; ``methods`` builds the KV
prefixes, ``questions`` reads question sets, ``conversations`` picks held-out conversations,
``tasks`` is the registry of tasks (QA, log-perplexity, fidelity, chrF: one module each),
``answers`` asks a method a question, ``scoring`` scores answers, ``cost`` times prefill and
decoding, ``run`` loops over methods x tasks, ``report`` lays out one row per (method, task) and
``plot`` draws the trade-off figure. No Kedro, no MLflow here.
"""

from cartridges.evaluation.answers import answer_questions, question_ids
from cartridges.evaluation.compare import compare_methods
from cartridges.evaluation.config import EvalConfig
from cartridges.evaluation.conversations import (
    HeldOutConversation,
    held_out_conversations,
    held_out_ids,
)
from cartridges.evaluation.cost import measure_cost
from cartridges.evaluation.methods import (
    KINDS,
    DocumentCartridges,
    Method,
    build_methods,
    context_budget,
)
from cartridges.evaluation.questions import Question, QuestionsError, load_questions, prompt_text
from cartridges.evaluation.report import format_report, report_columns, report_metrics
from cartridges.evaluation.run import evaluate, question_scores, score_method
from cartridges.evaluation.scoring import (
    choose_option,
    chrf,
    exact_match,
    normalise_answer,
    token_f1,
)
from cartridges.evaluation.tasks import TASKS, Measure, Metric, Need, Task, get_task
from cartridges.evaluation.tasks.fidelity import fidelity_kl
from cartridges.evaluation.tasks.log_perplexity import answer_log_perplexity

__all__ = [
    "KINDS",
    "TASKS",
    "EvalConfig",
    "HeldOutConversation",
    "Measure",
    "Method",
    "Metric",
    "Need",
    "Question",
    "QuestionsError",
    "Task",
    "answer_log_perplexity",
    "answer_questions",
    "build_methods",
    "DocumentCartridges",
    "choose_option",
    "chrf",
    "compare_methods",
    "context_budget",
    "evaluate",
    "exact_match",
    "fidelity_kl",
    "format_report",
    "get_task",
    "held_out_conversations",
    "held_out_ids",
    "load_questions",
    "measure_cost",
    "normalise_answer",
    "prompt_text",
    "question_ids",
    "question_scores",
    "report_columns",
    "report_metrics",
    "score_method",
    "token_f1",
]
