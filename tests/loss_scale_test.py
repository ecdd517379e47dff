"""Tests for sonnet_vqvae.loss_scale."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf

from sonnet_vqvae import loss_scale


class DynamicLossScaleTest(parameterized.TestCase):

  def test_scales_loss_and_unscales_gradients(self):
    scale = loss_scale.DynamicLossScale(initial_scale=8.)
    self.assertEqual(float(scale.scale_loss(tf.constant(1.5))), 12.)
    grads, finite = scale.update([tf.constant([8., -16.]), tf.constant(4.)])
    np.testing.assert_array_equal(grads[0], [1., -2.])
    self.assertEqual(float(grads[1]), 0.5)
    self.assertTrue(bool(finite))
    self.assertEqual(int(scale.good_steps.numpy()), 1)
    self.assertEqual(float(scale.scale.numpy()), 8.)

  @parameterized.parameters(np.inf, -np.inf, np.nan)
  @pytest.mark.nonfinite
  def test_overflow_halves_scale_and_resets_run(self, bad):
    scale = loss_scale.DynamicLossScale(initial_scale=8.)
    scale.update([tf.constant(1.)])
    _, finite = scale.update([tf.constant(1.), tf.constant([0., bad])])
    self.assertFalse(bool(finite))
    self.assertEqual(float(scale.scale.numpy()), 4.)
    self.assertEqual(int(scale.good_steps.numpy()), 0)

  def test_grows_after_growth_interval_finite_steps(self):
    scale = loss_scale.DynamicLossScale(initial_scale=4., growth_interval=3)
    update = tf.function(scale.update)
    seen = []
    for _ in range(7):
      update([tf.constant(1.)])
      seen.append(float(scale.scale.numpy()))
    self.assertEqual(seen, [4., 4., 8., 8., 8., 16., 16.])

  @pytest.mark.nonfinite
  def test_never_below_min_scale(self):
    scale = loss_scale.DynamicLossScale(initial_scale=2., min_scale=1.)
    for _ in range(3):
      scale.update([tf.constant(np.nan)])
    self.assertEqual(float(scale.scale.numpy()), 1.)

  def test_float16_gradient_survives_only_when_scaled(self):
    # 1e-8 underflows in float16 (smallest subnormal ~6e-8); scaled it does not.
    x = tf.constant(1., tf.float16)
    scale = loss_scale.DynamicLossScale(initial_scale=2.**15)
    for factor, expect_zero in ((1., True), (None, False)):
      with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.cast(x * tf.constant(1e-4, tf.float16), tf.float32) * 1e-4
        loss = loss * factor if factor else scale.scale_loss(loss)
      grad = tape.gradient(loss, x)
      if factor is None:
        (grad,), _ = scale.update([tf.cast(grad, tf.float32)])
      self.assertEqual(float(grad) == 0., expect_zero)
    np.testing.assert_allclose(float(grad), 1e-8, rtol=1e-2)

  @parameterized.named_parameters(
      ("min_scale", dict(min_scale=0.), "min_scale"),
      ("initial_below_min", dict(initial_scale=0.5), "initial_scale"),
      ("growth_interval", dict(growth_interval=0), "growth_interval"),
      ("multiplier", dict(multiplier=1.), "multiplier"))
  def test_bad_arguments(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      loss_scale.DynamicLossScale(**kwargs)


if __name__ == "__main__":
  absltest.main()
