"""precision.resolve("auto") by hardware, with CPU flags and the probe faked."""

from absl.testing import absltest
import tensorflow as tf

from sonnet_vqvae import precision


class _Probe:
  """Stands for `bfloat16_probe`: a fixed speedup; counts its calls."""

  def __init__(self, speedup):
    self.speedup = speedup
    self.calls = 0

  def __call__(self):
    self.calls += 1
    return self.speedup >= precision.PROBE_MIN_SPEEDUP, self.speedup


class AutoPrecisionTest(absltest.TestCase):

  def _resolve(self, flags, probe):
    return precision.resolve("auto", tf.distribute.get_strategy(),
                             flags=frozenset(flags), probe=probe)

  def test_amx_picks_bfloat16_without_probing(self):
    probe = _Probe(0.5)
    self.assertEqual(self._resolve({"avx512_bf16", "amx_bf16"}, probe),
                     ("bfloat16", "this CPU has AMX-BF16"))
    self.assertEqual(probe.calls, 0)

  def test_avx512_bf16_follows_the_probe(self):
    faster = _Probe(1.28)  # The AMD EPYC of issue 18.
    choice, why = self._resolve({"avx512f", "avx512_bf16"}, faster)
    self.assertEqual(choice, "bfloat16")
    self.assertIn("1.28x as fast", why)
    slower = _Probe(0.68)  # This Xeon with oneDNN capped below AMX.
    choice, why = self._resolve({"avx512f", "avx512_bf16"}, slower)
    self.assertIsNone(choice)
    self.assertIn("0.68x as fast", why)
    self.assertEqual((faster.calls, slower.calls), (1, 1))
    # Barely faster is not enough: bfloat16 costs some test NMSE.
    self.assertIsNone(self._resolve({"avx512_bf16"}, _Probe(1.05))[0])

  def test_no_bfloat16_instructions_is_float32_without_probing(self):
    probe = _Probe(2.0)
    choice, why = self._resolve({"avx2", "avx512f"}, probe)
    self.assertIsNone(choice)
    self.assertIn("no AMX-BF16 or AVX512-BF16", why)
    self.assertEqual(probe.calls, 0)

  def test_probe_measures_both_types(self):
    faster, speedup = precision.bfloat16_probe(rounds=1, calls=1)
    self.assertGreater(speedup, 0)
    self.assertEqual(faster, speedup >= precision.PROBE_MIN_SPEEDUP)


if __name__ == "__main__":
  absltest.main()
