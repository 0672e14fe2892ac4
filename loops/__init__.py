"""Training-loop variants and the workloads they run on."""

from loops.canonical import EvalIdioms, Idioms, Run, TrainLoop, eval_epoch, train_epoch
from loops.resolve import BadName
from loops.variants import (
                            BASELINES,
                            BUILTINS,
                            VERDICTS,
                            Variant,
                            builtin_names,
                            distributed,
                            evaluation,
                            resolve_variant,
                            verdict_matches,
)
from loops.workloads import WORKLOADS, Workload, resolve_workload

__all__ = [
                            "BASELINES",
                            "BUILTINS",
                            "VERDICTS",
                            "WORKLOADS",
                            "BadName",
                            "EvalIdioms",
                            "Idioms",
                            "Run",
                            "TrainLoop",
                            "Variant",
                            "Workload",
                            "builtin_names",
                            "distributed",
                            "eval_epoch",
                            "evaluation",
                            "resolve_variant",
                            "resolve_workload",
                            "train_epoch",
                            "verdict_matches",
]
