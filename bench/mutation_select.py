"""pytest plugin of bench/mutation.py (`-p mutation_select`): keeps only the tests that run everything in
their own process (mutation.out_of_process says which do not), so that mutmut sees every call they make.
Deciding at collection time keeps mutmut's test selection, and with it an earlier run's results, the same
when tests are added: `mutation.py --again` then tests only the survivors."""
import ast
import inspect
import textwrap

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
        items[:] = kept
