"""Measurements of what FedHPro costs beside the benchmark suites: client time, the server step
as the classes grow, a round of Flower's engine alone, simulation against deployment, and the
class caps' effect at a saved round.

Each is a module with a `main(argv)`: `fedhpro-bench measure NAME [its flags]` or
`python -m fedhpro_lab.measure.NAME`. What they write goes to benchmarks/measurements/ unless
told otherwise.
"""

from fedhpro_lab.simulation import APP_DIR

RESULTS_DIR = APP_DIR / "benchmarks" / "measurements"
