"""Run `aft` commands as real processes, fast: this script imports aft (torch, transformers) once, then forks
one child per command, which calls ``aft.cli.main`` with its own stdout/stderr files and exits with its exit
status, exactly as the `aft` entry point does. A test can SIGKILL a child like any `aft` process.

Protocol, one JSON object per line on stdin / stdout:
    {"argv": [...], "cwd": DIR, "env": {...}, "stdout": PATH, "stderr": PATH}  ->  {"pid": PID}
    {"wait": PID}                                                               ->  {"rc": EXIT_STATUS}
(a child killed by signal N reports rc -N).
"""

import json
import os
import sys
import traceback

import aft.cli
import aft.evaluate  # noqa: F401  (every stage's imports happen once, here, not in each child)
import aft.label  # noqa: F401
import aft.sample  # noqa: F401
import aft.train  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser  # noqa: F401


def child(request):
    for fd, key in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(request[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.chdir(request.get("cwd", "."))
    os.environ.update(request.get("env", {}))
    sys.argv = ["aft", *request["argv"]]
    try:
        code = aft.cli.main(request["argv"])
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else (0 if exit_info.code is None else 1)
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def serve():
    for line in sys.stdin:
        request = json.loads(line)
        if "wait" in request:
            _, status = os.waitpid(request["wait"], 0)
            reply = {"rc": os.waitstatus_to_exitcode(status)}
        else:
            pid = os.fork()
            if pid == 0:
                child(request)
            reply = {"pid": pid}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve()
