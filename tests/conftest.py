import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# The suite compiles well over a thousand small XLA programs and runs each a few times, so compilation is most of
# its time: LLVM's optimisation passes are turned down for the tests (about 15 % of the suite's time on a 2-core
# CPU). This leaves floating-point semantics unchanged (XLA:CPU compiles without fast-math at every level), so
# what is asserted is unaffected. Set xla_backend_optimization_level in XLA_FLAGS yourself to override it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
