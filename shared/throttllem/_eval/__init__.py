"""`throttllem evaluate`: the live controller on engine twins in simulated time."""

from throttllem._eval.cli import add_evaluate_parser
from throttllem._eval.driver import EvalOptions, evaluate, to_document
from throttllem._eval.policies import POLICIES, make_policy
from throttllem._eval.sim import SimPolicy, SimResult, Simulation

__all__ = ["POLICIES", "EvalOptions", "SimPolicy", "SimResult", "Simulation",
           "add_evaluate_parser", "evaluate", "make_policy", "to_document"]
