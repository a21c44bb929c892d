"""The experiment harness: data, models, training runs, the paper's experiments, studies, reports, bench.

Installed with ``pip install 'backforward[experiments]'``; it imports the library, never the reverse.
"""
