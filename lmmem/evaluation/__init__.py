"""Evaluation of causal language models: one engine (windows → model adapter → test-time methods →
sinks) for lmmem's models and any Hugging Face causal LM, with the neural cache, MbPA, dynamic
evaluation and kNN-LM; perplexity overall, by training-frequency bucket, per word and per byte.

    from lmmem.evaluation import evaluate, Methods
    from lmmem.memories import CacheConfig
    result = evaluate("runs/gut/best.pt", methods=Methods(cache=CacheConfig()), tune=True)
    print("\\n".join(result.lines()))
"""

from lmmem.evaluation.buckets import DEFAULT_BUCKET_EDGES, FrequencyBuckets, PerplexityReport, autocast_context
from lmmem.evaluation.config import EvalConfig, KNNSpec, Methods, TuneGrid
from lmmem.evaluation.dynamic import DynamicConfig
from lmmem.evaluation.perplexity import score_stream
from lmmem.evaluation.report import format_table, plot_bucketed_perplexity, write_json
from lmmem.evaluation.results import EvaluationResult, MethodReport
from lmmem.evaluation.run import Evaluation, evaluate
from lmmem.evaluation.sinks import TokenLogProbs

__all__ = [
    "DEFAULT_BUCKET_EDGES", "DynamicConfig", "EvalConfig", "Evaluation", "EvaluationResult", "FrequencyBuckets", "KNNSpec",
    "MethodReport", "Methods", "PerplexityReport", "TokenLogProbs", "TuneGrid", "autocast_context", "evaluate", "format_table",
    "plot_bucketed_perplexity", "score_stream", "write_json",
]
