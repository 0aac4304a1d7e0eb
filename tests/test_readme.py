"""The README's first lines and its Python example work as written."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
  with open(os.path.join(REPO, 'README.md')) as f:
    return f.read()


def test_first_lines_are_the_two_setup_commands():
  lines = _readme().splitlines()
  assert lines[0] == '```bash'
  install, tests = lines[1], lines[2]
  assert lines[3] == '```'
  assert 'pip install -r requirements.txt' in install
  assert 'python -m experiments.moons_study' in install
  command = tests.split('&&')[-1].strip()
  assert command.startswith('python -m pytest') and command.endswith(' tests')
  # .ci/run runs the same test command.
  with open(os.path.join(REPO, '.ci', 'run')) as f:
    assert command in f.read().splitlines()


def test_python_example_runs():
  blocks = re.findall(r'```python\n(.*?)```', _readme(), re.S)
  assert blocks
  namespace = {}
  exec(compile(blocks[0], 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['radius'].shape == (8,)
  assert namespace['cra'].shape == (3,)
