"""Runs documentation code blocks: items (where, code, mode) as JSON on stdin, one result per
item as JSON to the file argv[1]. A block whose mode is not "run" (a fragment or a whole script)
only has its imports run. Launched by tests/test_readme.py in a fresh interpreter.
"""

import ast
import json
import sys
import traceback

results = []
for item in json.loads(sys.stdin.read()):
    try:
        tree = ast.parse(item["code"], item["where"])
        if item["mode"] != "run":  # a fragment or a script: its imports must still resolve
            tree.body = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        exec(compile(tree, item["where"], "exec"), {"__name__": "__doc_block__"})
        results.append({"where": item["where"], "error": ""})
    except BaseException:
        results.append({"where": item["where"], "error": traceback.format_exc(limit=-3)})
open(sys.argv[1], "w").write(json.dumps(results))
