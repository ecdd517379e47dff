"""CLI processes forked from a warm Python, which imported TensorFlow once.

Importing TensorFlow is ~5 CPU-seconds of every fresh CLI process, most of a
tiny run's cost. A process test starts its CLI runs here instead: each is a
process of its own (its pid, its signals, its locks, its exit status), forked
from a "zygote" that has imported sonnet_vqvae.train and nothing else (no
TensorFlow runtime, no op run yet), then runs `python -m module args` or
`python -c code args` as the interpreter would, on tfds mock data. Tests of what a fresh interpreter prints at start-up keep
starting real ones.
"""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

# The zygote: imports, then forks one child per request line {argv, cwd, env,
# stdout, stderr} (argv: ["-m", module, *args] or ["-c", code, *args]),
# answering with the child's pid; a child's exit status goes to the file
# <status_dir>/<pid>.
_ZYGOTE = """
import json, os, runpy, signal, sys, traceback
import tensorflow_datasets as tfds
import sonnet_vqvae.train  # What every CLI process imports.

status_dir = sys.argv[1]


def reap(signum, frame):
  while True:
    try:
      pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
      return
    if pid == 0:
      return
    path = os.path.join(status_dir, str(pid))
    with open(path + ".tmp", "w") as f:
      f.write(str(os.waitstatus_to_exitcode(status)))
    os.replace(path + ".tmp", path)


signal.signal(signal.SIGCHLD, reap)
for line in sys.stdin:
  request = json.loads(line)
  pid = os.fork()
  if pid:
    print(pid, flush=True)
    continue
  signal.signal(signal.SIGCHLD, signal.SIG_DFL)
  os.chdir(request["cwd"])
  os.environ.clear()
  os.environ.update(request["env"])
  for fd, path in ((0, os.devnull), (1, request["stdout"]),
                   (2, request["stderr"])):
    opened = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    os.dup2(opened, fd)
    os.close(opened)
  option, target, *args = request["argv"]
  # As the interpreter runs a program and ends it: SystemExit's code or a
  # traceback.
  try:
    with tfds.testing.mock_data(num_examples=16):
      if option == "-m":
        sys.argv = [target, *args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
      else:
        sys.argv = ["-c", *args]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
    code = 0
  except SystemExit as e:
    if e.code is None:
      code = 0
    elif isinstance(e.code, int):
      code = e.code
    else:
      print(e.code, file=sys.stderr)
      code = 1
  except BaseException:
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)
"""


class Process:
  """A started CLI process: Popen's pid, poll, wait, send_signal, kill."""

  def __init__(self, pid: int, status: str, stdout: str, stderr: str):
    self.pid = pid
    self.returncode: Optional[int] = None
    self._status, self._stdout, self._stderr = status, stdout, stderr
    self._read = 0  # Bytes of stdout that readline returned.

  def poll(self) -> Optional[int]:
    if self.returncode is None and os.path.exists(self._status):
      with open(self._status) as f:
        self.returncode = int(f.read())
    return self.returncode

  def wait(self, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while self.poll() is None:
      if time.time() > deadline:
        self.kill()
        raise subprocess.TimeoutExpired(str(self.pid), timeout)
      time.sleep(0.02)
    return self.returncode

  def readline(self, timeout: float = 300) -> str:
    """stdout's next line, as a pipe's readline: "" at its end after the exit."""
    deadline = time.time() + timeout
    while True:
      exited = self.poll() is not None  # Before the read: all it wrote.
      line = b""
      if os.path.exists(self._stdout):  # The child creates it.
        with open(self._stdout, "rb") as f:
          f.seek(self._read)
          line = f.readline()
      if line.endswith(b"\n") or exited:
        self._read += len(line)
        return line.decode()
      if time.time() > deadline:
        self.kill()
        raise subprocess.TimeoutExpired(str(self.pid), timeout)
      time.sleep(0.01)

  def send_signal(self, sig: int) -> None:
    if self.poll() is None:
      try:
        os.kill(self.pid, sig)
      except ProcessLookupError:  # Exited since.
        pass

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)

  @property
  def stdout(self) -> str:
    with open(self._stdout) as f:
      return f.read()

  @property
  def stderr(self) -> str:
    with open(self._stderr) as f:
      return f.read()


class _Zygote:

  def __init__(self, env: Dict[str, str]):
    self.directory = tempfile.mkdtemp()
    self.log = os.path.join(self.directory, "zygote.err")  # TF's noise.
    with open(self.log, "w") as log:
      self.process = subprocess.Popen(
          [sys.executable, "-c", _ZYGOTE, self.directory], env=env,
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
          text=True)
    self.children: List[Process] = []
    self.count = 0

  def start(self, argv, env, cwd) -> Process:
    self.count += 1
    stdout, stderr = (os.path.join(self.directory, f"{self.count}.{name}")
                      for name in ("out", "err"))
    self.process.stdin.write(json.dumps(dict(
        argv=list(argv), env=env, cwd=cwd, stdout=stdout, stderr=stderr))
                             + "\n")
    self.process.stdin.flush()
    line = self.process.stdout.readline()
    if not line:
      with open(self.log) as log:
        raise RuntimeError(f"The zygote ended ({self.process.wait()}): "
                           f"{log.read()[-3000:]}")
    pid = int(line)
    child = Process(pid, os.path.join(self.directory, str(pid)), stdout,
                    stderr)
    self.children.append(child)
    return child

  def close(self):
    for child in self.children:
      child.kill()
    self.process.stdin.close()
    self.process.wait()
    shutil.rmtree(self.directory, ignore_errors=True)


_ZYGOTES: Dict[str, _Zygote] = {}


def environment(**extra: str) -> Dict[str, str]:
  """os.environ with TF quiet, this checkout and tests/ importable, `extra`.

  The tests' common environment: their processes share one zygote.
  """
  tests = os.path.dirname(os.path.abspath(__file__))
  environ = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
  environ["PYTHONPATH"] = os.pathsep.join(
      [os.path.dirname(tests), tests, environ.get("PYTHONPATH", "")])
  return environ


def start(argv: List[str], env: Dict[str, str],
          cwd: Optional[str] = None,
          zygote_env: Optional[Dict[str, str]] = None) -> Process:
  """Starts `python *argv` (on tfds mock data) from the zygote.

  argv: ["-m", module, *args] or ["-c", code, *args].

  One zygote per environment at start (what TensorFlow reads at import):
  `env`, or `zygote_env` where env only adds variables read after import
  (e.g. TPU_NAME), so the child comes from an existing zygote.
  """
  zygote_env = env if zygote_env is None else zygote_env
  # Not PYTEST_CURRENT_TEST, which pytest sets anew for every test: one
  # zygote serves all tests of a process.
  key = json.dumps(sorted((name, value) for name, value in zygote_env.items()
                          if name != "PYTEST_CURRENT_TEST"))
  if key not in _ZYGOTES:
    _ZYGOTES[key] = _Zygote(zygote_env)
  return _ZYGOTES[key].start(argv, env, cwd or os.getcwd())


def run(argv: List[str], env: Dict[str, str],
        cwd: Optional[str] = None, timeout: float = 300,
        zygote_env: Optional[Dict[str, str]] = None) -> Process:
  """`start`, then waits for the exit: .returncode, .stdout, .stderr."""
  process = start(argv, env, cwd, zygote_env)
  process.wait(timeout)
  return process


@atexit.register
def _close():
  for zygote in _ZYGOTES.values():
    zygote.close()
