"""The body of a command run by the `forked` fixture (tests/conftest.py), in a process forked from
a multiprocessing forkserver that has imported the apps: run through `runpy.run_path` with these
globals set, it becomes the command's process (working directory, environment, argv, sys.path[0],
stdout and stderr to files, multiprocessing's default start method rather than the server's),
runs `SCRIPT` as `__main__` (a console script or a benchmark) and exits with its code, after the
atexit handlers an interpreter runs at exit (the forkserver's child ends with os._exit, which
skips them). The ranks a command forks (parallel.rank_start=auto) come from the session's server too
(FORKSERVER, its address): otherwise each command would start a server of its own and import moesys
and torch again for them (~3 s of CPU a command)."""
import atexit
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import sys

os.chdir(CWD)  # noqa: F821  (CWD, ENV, ARGV, SCRIPT, OUT, ERR: the init_globals of runpy.run_path)
os.environ.clear()
os.environ.update(ENV)  # noqa: F821
for fd, path in ((1, OUT), (2, ERR)):  # noqa: F821
    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(f, fd)
    os.close(f)
multiprocessing.set_start_method(None, force=True)  # the interpreter's default again, not the forkserver's
# this process holds the server's `alive` descriptor already (every process forked from it does);
# the server is pytest's child, not this one's, so ensure_running's waitpid cannot check it: the
# session keeps it running until every command has ended
_SERVER = multiprocessing.forkserver._forkserver
_SERVER._forkserver_address = FORKSERVER  # noqa: F821
_SERVER.ensure_running = lambda: None
sys.argv = list(ARGV)  # noqa: F821
sys.path.insert(0, os.path.dirname(os.path.abspath(SCRIPT)))  # noqa: F821  (as `python SCRIPT` has it)
try:
    runpy.run_path(SCRIPT, run_name="__main__")  # noqa: F821
    code = 0
except SystemExit as e:
    code = e.code
finally:
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
raise SystemExit(code)
