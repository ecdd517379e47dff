"""Tests for sonnet_vqvae.optim."""

from absl.testing import absltest
import numpy as np
import pytest
import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import optim
from sonnet_vqvae import train


class AdamUpdateTest(absltest.TestCase):

  def test_matches_numpy(self):
    g, m, v = np.array([0.5, -2.0]), np.array([0.1, 0.2]), np.array([1., 2.])
    t = 3.0
    new_m = 0.9 * m + 0.1 * g
    new_v = 0.999 * v + 0.001 * g * g
    expected = 0.01 * (new_m / (1 - 0.9**t)) / (
        np.sqrt(new_v / (1 - 0.999**t)) + 1e-8)
    update, m_out, v_out = optim.adam_update(
        tf.constant(g), 0.01, 0.9, 0.999, 1e-8, tf.constant(t, tf.float64),
        tf.constant(m), tf.constant(v))
    np.testing.assert_allclose(update, expected, rtol=1e-12)
    np.testing.assert_allclose(m_out, new_m, rtol=1e-12)
    np.testing.assert_allclose(v_out, new_v, rtol=1e-12)


class AdamTest(absltest.TestCase):

  def test_matches_sonnet_adam(self):
    ours = [tf.Variable([1.0, -2.0]), tf.Variable([[0.5]])]
    stock = [tf.Variable(v) for v in ours]
    adam = optim.Adam(0.1)
    adam.build(ours)
    stock_adam = snt.optimizers.Adam(0.1)
    for i in range(3):
      grads = [tf.constant([0.3, -1.0]) * i, tf.constant([[2.0]]) + i]
      adam.apply(grads, ours)
      stock_adam.apply(grads, stock)
    # Bit-equal when run alone; within float32 rounding of the update after
    # other tests in the same process (TF may then compile the ops apart).
    for a, b in zip(ours, stock):
      np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5)
    for a, b in zip(adam.m + adam.v, stock_adam.m + stock_adam.v):
      np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4)

  @pytest.mark.nonfinite
  def test_skipped_step_changes_nothing(self):
    params = [tf.Variable([1.0, -2.0])]
    adam = optim.Adam(0.1)
    adam.build(params)
    adam.apply([tf.constant([0.5, 0.5])], params)
    before = [v.numpy() for v in (params[0], adam.m[0], adam.v[0], adam.step)]
    adam.apply([tf.constant([np.inf, np.nan])], params,
               apply_if=tf.constant(False))
    after = [v.numpy() for v in (params[0], adam.m[0], adam.v[0], adam.step)]
    for a, b in zip(before, after):
      np.testing.assert_array_equal(a, b)
    adam.apply([tf.constant([0.5, 0.5])], params, apply_if=tf.constant(True))
    self.assertEqual(int(adam.step.numpy()), 2)
    self.assertFalse(np.array_equal(params[0].numpy(), before[0]))

  def test_wrong_parameter_count(self):
    adam = optim.Adam(0.1)
    adam.build([tf.Variable(1.0)])
    with self.assertRaisesRegex(ValueError, "built for 1 parameters, got 2"):
      adam.apply([1.0, 1.0], [tf.Variable(1.0), tf.Variable(2.0)])

  def test_train_keeps_its_name(self):
    self.assertIs(train.Adam, optim.Adam)


if __name__ == "__main__":
  absltest.main()
