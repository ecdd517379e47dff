"""No "remapper failed" line: grappler fuses our residual stacks.

With oneDNN (the default on x86), grappler's remapper fused conv + bias +
sum + relu and deleted a residual sum that another op still read; its whole
pass failed with `E0000 ... meta_optimizer.cc] remapper failed:
INVALID_ARGUMENT: Mutation::Apply error ...` on stderr (C++ logging, on file
descriptor 2, hence `capfd`) and nothing in the function was fused.

tests/readme_test.py checks the same in fresh processes, as users run them:
none of the README's programs (train, prior, sample and export, VQ-VAE and
VQ-VAE-2) prints the line, nor a process that loads their export and calls its
signatures.
"""

import numpy as np
import tensorflow as tf

from sonnet_vqvae import hierarchical
from sonnet_vqvae import networks

_REMAPPER = "remapper failed"


def _plain_stack(stack, inputs):
  """ResidualStack's maths written plainly (what the notebook's model does)."""
  h = inputs
  for conv3, conv1 in stack._layers:  # pylint: disable=protected-access
    h += conv1(tf.nn.relu(conv3(tf.nn.relu(h))))
  return tf.nn.relu(h)


def _outputs_and_gradients(stack, call, inputs):
  @tf.function
  def run(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = call(x)
      loss = tf.reduce_sum(y * y)
    return [y] + tape.gradient(loss, [x] + list(stack.trainable_variables))
  return [t.numpy() for t in run(inputs)]


def test_stacks_under_tf_function_print_no_remapper_error(capfd):
  x = tf.random.stateless_normal([2, 8, 8, 8], [0, 1])
  stack = networks.ResidualStack(8, 2, 4)
  stack(x)
  # With gradients (a train step), and forward only a stack whose output is
  # relu'd again (VQ-VAE-2's level decoder: grappler then reads a sum twice).
  ours = _outputs_and_gradients(stack, stack, x)
  decoder = hierarchical.LevelDecoder(8, 1, 4, output_channels=3)
  tf.function(decoder)(x).numpy()
  assert _REMAPPER not in capfd.readouterr().err

  # The node that avoids it changes no bit of the outputs or gradients.
  plain = _outputs_and_gradients(stack, lambda h: _plain_stack(stack, h), x)
  for a, b in zip(ours, plain):
    np.testing.assert_array_equal(a, b)
