"""Tests of the rotation trick (`gradient="rotation"`) against its closed form."""

from absl.testing import parameterized
import numpy as np
import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import quantizers


def _rotation_matrices(e, q):
  """[N, D, D] rotations R of the paper, built explicitly in float64."""
  e_hat = e / np.linalg.norm(e, axis=1, keepdims=True)
  q_hat = q / np.linalg.norm(q, axis=1, keepdims=True)
  r = e_hat + q_hat
  r /= np.linalg.norm(r, axis=1, keepdims=True)
  eye = np.eye(e.shape[1])[None]
  return (eye - 2 * r[:, :, None] * r[:, None, :] +
          2 * q_hat[:, :, None] * e_hat[:, None, :])


def _closed_form_gradient(e, q, upstream):
  """|q| / |e| R^T g per row: the paper's gradient at the inputs."""
  rotations = _rotation_matrices(e, q)
  scale = np.linalg.norm(q, axis=1) / np.linalg.norm(e, axis=1)
  return scale[:, None] * np.einsum("nij,ni->nj", rotations, upstream)


def _gradient(fn, inputs, upstream):
  with tf.GradientTape() as tape:
    tape.watch(inputs)
    output = fn(inputs)
    loss = tf.reduce_sum(output * upstream)
  return output, tape.gradient(loss, inputs)


class RotationTrickTest(parameterized.TestCase):

  def test_reference_rotation_is_a_rotation_onto_the_code(self):
    # Checks the NumPy reference itself: R is orthogonal with det 1 and
    # turns e/|e| onto q/|q|.
    rng = np.random.RandomState(0)
    e, q = rng.randn(5, 4), rng.randn(5, 4)
    rotations = _rotation_matrices(e, q)
    for rotation, e_row, q_row in zip(rotations, e, q):
      np.testing.assert_allclose(rotation.T @ rotation, np.eye(4), atol=1e-12)
      np.testing.assert_allclose(np.linalg.det(rotation), 1., rtol=1e-12)
      np.testing.assert_allclose(rotation @ e_row / np.linalg.norm(e_row),
                                 q_row / np.linalg.norm(q_row), atol=1e-12)

  def test_value_is_the_code_and_gradient_the_closed_form(self):
    rng = np.random.RandomState(1)
    e, q, upstream = rng.randn(3, 7, 4), rng.randn(3, 7, 4), rng.randn(3, 7, 4)
    output, grad = _gradient(
        lambda x: quantizers.rotation_trick(x, tf.constant(q)),
        tf.constant(e), tf.constant(upstream))
    np.testing.assert_allclose(output, q, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        grad, _closed_form_gradient(e.reshape(-1, 4), q.reshape(-1, 4),
                                    upstream.reshape(-1, 4)).reshape(3, 7, 4),
        rtol=1e-10)

  def test_no_gradient_reaches_the_codes(self):
    e, q = tf.constant([[1., 2.]]), tf.constant([[-3., 1.]])
    with tf.GradientTape() as tape:
      tape.watch(q)
      loss = tf.reduce_sum(quantizers.rotation_trick(e, q))
    self.assertIsNone(tape.gradient(loss, q))

  def test_degenerate_vectors(self):
    # A zero input gets no gradient; an input opposite its code still
    # returns the code with a finite gradient of the right norm ratio.
    e = tf.constant([[0., 0.], [1., 0.]])
    q = tf.constant([[1., 1.], [-2., 0.]])
    output, grad = _gradient(lambda x: quantizers.rotation_trick(x, q), e,
                             tf.ones_like(e))
    np.testing.assert_allclose(output, q)
    np.testing.assert_array_equal(grad[0], [0., 0.])
    self.assertTrue(np.all(np.isfinite(grad)))
    np.testing.assert_allclose(np.linalg.norm(grad[1]), 2 * np.sqrt(2),
                               rtol=1e-6)

  @parameterized.product(ema=[False, True], cosine=[False, True])
  def test_quantizer_gradient_is_the_closed_form(self, ema, cosine):
    if ema:
      make = lambda **kw: quantizers.VectorQuantizerEMA(4, 8, 0.25, 0.9, **kw)
    else:
      make = lambda **kw: quantizers.VectorQuantizer(4, 8, 0.25, **kw)
    stock, rotating = make(cosine=cosine), make(cosine=cosine,
                                                  gradient="rotation")
    rotating.embeddings.assign(stock.embeddings)
    rng = np.random.RandomState(2)
    inputs = tf.constant(rng.randn(2, 3, 4).astype(np.float32))
    upstream = tf.constant(rng.randn(2, 3, 4).astype(np.float32))
    quantize = lambda vq: lambda x: vq(x, is_training=False)["quantize"]
    expected, _ = _gradient(quantize(stock), inputs, upstream)
    output, grad = _gradient(quantize(rotating), inputs, upstream)
    np.testing.assert_allclose(output, expected, rtol=1e-6, atol=1e-6)
    if cosine:
      # The rotation acts on the l2-normalised inputs; their Jacobian
      # carries the gradient back to the raw inputs.
      with tf.GradientTape() as tape:
        tape.watch(inputs)
        normalised = tf.math.l2_normalize(inputs, axis=-1)
      e = normalised.numpy().reshape(-1, 4)
      at_normalised = _closed_form_gradient(
          e, expected.numpy().reshape(-1, 4), upstream.numpy().reshape(-1, 4))
      closed_form = tape.gradient(
          normalised, inputs,
          output_gradients=tf.constant(at_normalised.reshape(2, 3, 4), tf.float32))
    else:
      closed_form = _closed_form_gradient(
          inputs.numpy().reshape(-1, 4), expected.numpy().reshape(-1, 4),
          upstream.numpy().reshape(-1, 4)).reshape(2, 3, 4)
    np.testing.assert_allclose(grad, closed_form, rtol=2e-4, atol=1e-5)

  @parameterized.parameters(False, True)
  def test_default_is_stock_bit_for_bit(self, ema):
    if ema:
      ours = quantizers.VectorQuantizerEMA(4, 8, 0.25, 0.9)
      stock = snt.nets.VectorQuantizerEMA(4, 8, 0.25, 0.9)
    else:
      ours = quantizers.VectorQuantizer(4, 8, 0.25)
      stock = snt.nets.VectorQuantizer(4, 8, 0.25)
    stock.embeddings.assign(ours.embeddings)
    self.assertEqual(ours.gradient, "straight_through")
    rng = np.random.RandomState(3)
    inputs = tf.constant(rng.randn(5, 4).astype(np.float32))
    upstream = tf.constant(rng.randn(5, 4).astype(np.float32))
    quantize = lambda vq: lambda x: vq(x, is_training=False)["quantize"]
    for actual, expected in zip(_gradient(quantize(ours), inputs, upstream),
                                _gradient(quantize(stock), inputs, upstream)):
      np.testing.assert_array_equal(actual, expected)

  def test_xla_and_bfloat16(self):
    vq = quantizers.VectorQuantizerEMA(4, 8, 0.25, 0.9, gradient="rotation")
    inputs = tf.constant(
        np.random.RandomState(4).randn(6, 4), tf.bfloat16)

    @tf.function(jit_compile=True)
    def step(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        out = vq(x, is_training=True)
        loss = tf.reduce_sum(tf.cast(out["quantize"], tf.float32))
      return out["quantize"], tape.gradient(loss, x)

    quantized, grad = step(inputs)
    self.assertEqual(quantized.dtype, tf.bfloat16)
    self.assertEqual(grad.dtype, tf.bfloat16)
    self.assertTrue(np.all(np.isfinite(tf.cast(grad, tf.float32))))

  def test_unknown_gradient_names_the_choices(self):
    with self.assertRaisesRegex(ValueError, "gradient must be one of .*'sign'"):
      quantizers.VectorQuantizer(4, 8, 0.25, gradient="sign")
