#!/usr/bin/env bash
# Mutation score and line coverage of the algorithm modules (docs/mutation.md).
#
#   scripts/mutation.sh [DIGITS]
#
# Mutates fedhpro_flwr/algorithms/{losses,gradmatch,hyperproto,recalibration}.py,
# methods/payload.py and the aggregation of methods/strategy.py (weighted_average, mean_metric,
# aggregate_train, _validate, _decode) with mutmut, and runs on each mutant the fast unit tests
# of [tool.mutmut] in pyproject.toml that cover it. DIGITS samples the mutants by the last digit
# of their number: "0" (default) runs a tenth of them (~15 min on 2 cores), "0-9" all of them.
# Needs the `mutation` extra; the project is re-installed in setuptools' compat editable mode,
# because the default mode's import hook would load the unmutated sources instead of mutants/.
# Not run in CI (too slow); results: mutants/ and `mutmut results`, coverage below.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0
export OMP_NUM_THREADS=1  # mutmut limits CPU time: spinning OpenMP threads would time out
DIGITS="${1:-0}"
JOBS="${JOBS:-2}"

pip install --quiet --no-build-isolation -e ".[mutation]" --config-settings editable_mode=compat

MODULES=(fedhpro_flwr/algorithms/losses.py fedhpro_flwr/algorithms/gradmatch.py
         fedhpro_flwr/algorithms/hyperproto.py fedhpro_flwr/algorithms/recalibration.py
         fedhpro_flwr/methods/strategy.py fedhpro_flwr/methods/payload.py)
TESTS=$(python -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))
        ["tool"]["mutmut"]["pytest_add_cli_args_test_selection"]))')

# line coverage of the modules by the same tests (--cov with dotted module names crashes
# numpy's import under coverage here, so the package is measured and the report filtered)
python -m pytest $TESTS -q -p no:warnings --cov=fedhpro_flwr --cov-report= >/dev/null
python -m coverage report --include="$(IFS=,; echo "${MODULES[*]}")"

rm -rf mutants  # mutmut keeps earlier results of unchanged code: start clean
END="__mutmut_*[$DIGITS]"
mutmut run --max-children "$JOBS" \
    "fedhpro_flwr.algorithms.*$END" "fedhpro_flwr.methods.payload.*$END" \
    "*weighted_average$END" "*mean_metric$END" "*aggregate_train$END" "*_validate$END" \
    "*_decode$END" >/dev/null || true  # the summary comes from `mutmut results`
python scripts/mutation_summary.py "$DIGITS"
