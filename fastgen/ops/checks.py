"""fastgen.ops.checks: the argument checks and the backend choice every op applies, public
for the layers, models and metrics built on the ops (and for users' own): one rule, one
message per bad argument, wherever the call comes from."""
from fastgen.ops._backend import BACKENDS, triton_available, triton_runs_on
from fastgen.ops._backend import resolve as resolve_backend
from fastgen.ops._validate import (FLOAT_DTYPES, alpha, distance_inputs, finite, flag, index_range, one_device,
                                   point_sets, points, positive_int, precision, same_kind)

__all__ = ["BACKENDS", "FLOAT_DTYPES", "alpha", "distance_inputs", "finite", "flag", "index_range", "one_device",
           "point_sets", "points", "positive_int", "precision", "resolve_backend", "same_kind", "triton_available",
           "triton_runs_on"]
