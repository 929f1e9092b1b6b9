"""`throttllem evaluate`: the controller's core functions on engine twins in simulated time."""

from throttllem._eval.cli import EvalOptions, add_evaluate_parser, evaluate, to_document
from throttllem._eval.policies import POLICIES, SimPolicy, make_policy
from throttllem._eval.sim import SimResult, Simulation

__all__ = ["POLICIES", "EvalOptions", "SimPolicy", "SimResult", "Simulation",
           "add_evaluate_parser", "evaluate", "make_policy", "to_document"]
