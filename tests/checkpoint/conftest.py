import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (HERE, os.path.join(os.path.dirname(HERE), "parallel")):   # store_workers; the gloo harness
    if path not in sys.path:
        sys.path.insert(0, path)
