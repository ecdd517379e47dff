"""The snippets of docs/quantizers.md's section on the other quantizers run."""

import os
import re

from absl.testing import parameterized

_DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "docs", "quantizers.md")
_SECTION = "## Other quantizers"


def _snippets():
  with open(_DOC) as f:
    text = f.read()
  section = text[text.index(_SECTION):]
  return re.findall(r"```python\n(.*?)```", section, re.S)


class DocSnippetsTest(parameterized.TestCase):

  def test_every_module_has_a_snippet(self):
    snippets = "".join(_snippets())
    for name in ("ResidualVectorQuantizer", "FiniteScalarQuantizer",
                 "LookupFreeQuantizer", 'gradient="rotation"'):
      self.assertIn(name, snippets)

  @parameterized.parameters(range(4))
  def test_snippet_runs(self, index):
    snippet = _snippets()[index]
    # Users' code: nothing of ours but `import sonnet_vqvae`.
    self.assertEqual(re.findall(r"^(?:import|from) sonnet_vqvae.*$", snippet,
                                re.M), ["import sonnet_vqvae"])
    exec(compile(snippet, f"{_DOC} snippet {index}", "exec"), {})  # pylint: disable=exec-used
