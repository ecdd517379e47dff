"""The self-check: its code comparison, and the whole report in a process."""

from absl.testing import absltest
import numpy as np
import pytest

from sonnet_vqvae import doctor
import warm_cli


class CheckCodesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.embeddings = rng.normal(size=(4, 16)).astype(np.float32)  # [D, K]
    self.inputs = rng.normal(size=(50, 4)).astype(np.float32)
    self.best = ((self.inputs[:, None, :].astype(np.float64) -
                  self.embeddings.T[None].astype(np.float64)) ** 2
                ).sum(-1).argmin(1)

  def test_float64_search_is_the_nearest_code(self):
    codes, distances = doctor.nearest_codes_float64(self.inputs,
                                                     self.embeddings)
    np.testing.assert_array_equal(codes, self.best)
    self.assertEqual(distances.shape, (50, 16))

  def test_nearest_codes_pass(self):
    ok, detail = doctor.check_codes(self.best, self.inputs, self.embeddings)
    self.assertTrue(ok)
    self.assertStartsWith(detail, "50 of 50 vectors' codes equal")

  def test_one_farther_code_fails(self):
    codes = self.best.copy()
    codes[7] = (codes[7] + 1) % 16
    ok, detail = doctor.check_codes(codes, self.inputs, self.embeddings)
    self.assertFalse(ok)
    self.assertIn("49 of 50", detail)
    self.assertIn("1 farther", detail)

  def test_a_tie_within_float32_rounding_passes(self):
    embeddings = self.embeddings.copy()
    # Code 5 duplicates vector 3's nearest code, one float32 ulp away.
    embeddings[:, 5] = np.nextafter(embeddings[:, self.best[3]], np.inf)
    codes = doctor.nearest_codes_float64(self.inputs, embeddings)[0]
    other = 5 if codes[3] != 5 else self.best[3]
    codes[3] = other
    ok, detail = doctor.check_codes(codes, self.inputs, embeddings)
    self.assertTrue(ok, detail)
    self.assertIn("1 within float32 rounding", detail)


@pytest.mark.slow
class DoctorRunTest(absltest.TestCase):

  def test_passes_on_two_logical_cpus(self):
    # A process of its own, forked from one that imported TensorFlow but
    # has not started its runtime (warm_cli): --logical_cpus still applies.
    run = warm_cli.run(["-m", "sonnet_vqvae.doctor", "--logical_cpus=2",
                        "--steps=8", "--batch_size=8"],
                       env=warm_cli.environment(), timeout=600)
    self.assertEqual(run.returncode, 0, run.stdout + run.stderr[-3000:])
    lines = run.stdout.splitlines()
    for name in ("strategy", "train", "replicas", "codes"):
      self.assertTrue(any(line.startswith(f"PASS  {name}") for line in lines),
                      (name, run.stdout))
    self.assertIn("Replicator with 2 replica(s)", run.stdout)
    self.assertIn("precision: 'auto' picks", run.stdout)
    self.assertEqual(lines[-1], "all checks passed")


if __name__ == "__main__":
  absltest.main()
