import os
import sys

# Benchmarks are scripts, run by hand; pytest never collects them.
collect_ignore = ["bench"]

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
