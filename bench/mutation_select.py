"""pytest plugin of bench/mutation.py (`-p mutation_select`): keeps only the tests that run everything in
their own process (mutation.out_of_process says which do not), so that mutmut sees every call they make.
Deciding at collection time keeps mutmut's test selection, and with it an earlier run's results, the same
when tests are added: `mutation.py --again` then tests only the survivors. It also runs the fastest tests
first (by mutmut's own timings, a file's tests together): mutmut stops at the first failure but hands pytest
a set of tests in no order, so a mutant a unit test kills in a second waited for minutes of update tests."""
import ast
import inspect
import json
import textwrap
from collections import defaultdict
from pathlib import Path

from mutation import out_of_process


def pytest_collection_modifyitems(config, items):
    verdict = {}  # one per test function, whatever its parameters
    kept, dropped = [], []
    for item in items:
        function = getattr(item, "function", None)
        if function not in verdict:
            node = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0] if function else None
            verdict[function] = node is not None and out_of_process(node)
        (dropped if verdict[function] else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    stats = Path("mutmut-stats.json")  # in mutmut's copy, where it runs the tests
    seconds = json.loads(stats.read_text()).get("duration_by_test", {}) if stats.exists() else {}
    by_file = defaultdict(float)
    for item in kept:
        by_file[item.path] += seconds.get(item.nodeid, 0.0)
    items[:] = sorted(kept, key=lambda item: (by_file[item.path], str(item.path),
                                              seconds.get(item.nodeid, float("inf"))))
